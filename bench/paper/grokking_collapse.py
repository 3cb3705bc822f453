"""Why SNRAdamW's grokking runs at lr 1e-2 fail: one run traced every 250 steps.

The same run as `grokking.py --model transformer --lrs 1e-2` (same data, init and batches per
seed), printing the batch loss, train and held-out accuracy, SNRAdamW's mean gate and the
weight norm. The update is scaled by the gate q <= 1, the decoupled weight decay
theta * (1 - lr * wd) is not (ALGORITHM.md), so where the gate falls the decay wins.

Run: python bench/paper/grokking_collapse.py [--lr 1e-2] [--seed 0] [--steps 4000]
"""

import argparse

import torch

from snr_triton import SNRAdamW
from snr_triton.grokking import MODELS, accuracy, division_dataset
from snr_triton.hyperparams import finite_alpha


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--gate", default="snr", choices=["snr", "soft", "hard", "none"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    (xt, yt), (xv, yv) = division_dataset(97, 0.25, args.seed)
    torch.manual_seed(args.seed)
    net = MODELS["transformer"](97)
    opt = SNRAdamW(net.parameters(), lr=args.lr, weight_decay=1.0, betas=(0.9, 0.98), gate=args.gate,
                   alpha=finite_alpha(512, len(xt)), track_stats=True)
    gen = torch.Generator().manual_seed(args.seed + 1)
    print("| step | batch loss | train acc | held-out acc | mean gate | weight norm |")
    print("|---|---|---|---|---|---|")
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(xt), (512,), generator=gen)
        loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            norm = torch.cat([p.detach().flatten() for p in net.parameters()]).norm().item()
            print(f"| {step} | {loss.item():.3f} | {accuracy(net, xt, yt):.2f} | {accuracy(net, xv, yv):.2f} | "
                  f"{opt.stats()['mean_gate']:.3f} | {norm:.1f} |", flush=True)


if __name__ == "__main__":
    main()
