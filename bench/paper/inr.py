"""Paper claim: implicit neural representations fitted to noisy targets memorize less with SNR.

The task of `snr-triton demo` (snr_triton/inr.py): a Fourier-feature MLP fitted to noisy pixels
(Gaussian noise sigma 0.1) in minibatches of 512; PSNR against the *clean* image rises while the
network learns the image and falls as it starts fitting the noise. Same init, batches and lr for
both optimizers; SNRAdamW with alpha = b/(n-b).

The lr-matched control (`--control`) asks whether the gate does more than a smaller learning
rate: SNRAdamW's mean gate (over the run) is well below 1, so it also takes smaller steps. Per
seed it fits, on the same batches, SNRAdamW and AdamW at --lr and at a sweep of smaller lrs (the
same tuning budget for both), and AdamW at --lr times SNRAdamW's measured mean gate; final and
peak PSNR (the early-stopping baseline: what a user who stops at AdamW's best step gets) go to
--json, one record per run, which `snr-triton demo` reads for its verdict.

Run: python bench/paper/inr.py [--image photo|synthetic] [--steps 3000] [--seeds 0 1 2]
     python bench/paper/inr.py --control --json bench/paper/results/inr_control.json
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from snr_triton.inr import fit, photo, synthetic_image, train_side_by_side

SWEEP = (3e-4, 1.5e-4, 1e-4)


def record(label: str, kind: str, lr: float, seed: int, curve: dict) -> dict:
    k = max(range(len(curve["steps"])), key=lambda i: curve["psnr_clean"][i])
    gates = [g[0] for g in curve["gate"]]
    return {"run": label, "optimizer": kind, "lr": lr, "seed": seed, "final_psnr": curve["psnr_clean"][-1],
            "peak_psnr": curve["psnr_clean"][k], "peak_step": curve["steps"][k],
            "final_psnr_noisy": curve["psnr_noisy"][-1],
            "mean_gate": statistics.fmean(gates) if gates else None}


def control(image, args) -> list[dict]:
    """Every run of the lr-matched control, written to args.json as it finishes. Runs are
    deterministic per seed (init, noise and batches come from it, not from which runs share the
    loop), so the file is resumable per (seed, run)."""
    out = Path(args.json)
    records = json.loads(out.read_text())["runs"] if out.exists() else []
    for seed in args.seeds:
        have = {r["run"]: r for r in records if r["seed"] == seed}
        runs = {name: (name, args.lr) for name in ("SNRAdamW", "AdamW")}
        runs.update({f"{name}, lr {lr:g}": (name, lr) for name in ("AdamW", "SNRAdamW") for lr in SWEEP})
        todo = {label: run for label, run in runs.items() if label not in have}
        new = []
        if todo:
            result = fit(image, todo, steps=args.steps, seed=seed, progress=False)
            new = [record(label, kind, lr, seed, result["curves"][label]) for label, (kind, lr) in todo.items()]
        gate = ({**have, **{r["run"]: r for r in new}})["SNRAdamW"]["mean_gate"]
        if "AdamW, lr-matched" not in have:
            label = "AdamW, lr-matched"
            result = fit(image, {label: ("AdamW", args.lr * gate)}, steps=args.steps, seed=seed, progress=False)
            new.append(record(label, "AdamW", args.lr * gate, seed, result["curves"][label]))
        if not new:
            continue
        records += new
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"task": "inr", "image": args.image, "steps": args.steps, "lr": args.lr,
                                   "noisy_psnr": result["noisy_psnr"], "runs": records}, indent=1))
        for r in new:
            print(f"| {seed} | {r['run']} | {r['lr']:.3g} | {r['peak_psnr']:.2f} dB ({r['peak_step']}) | "
                  f"{r['final_psnr']:.2f} dB |", flush=True)
    return records


def summary(records: list[dict]) -> str:
    """Mean ± sd per run over seeds (markdown), then the verdict snr_triton.claims draws from the file."""
    from snr_triton.claims import spread

    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["run"], []).append(r)
    lines = ["", "| run | lr | seeds | final PSNR vs clean (dB) | peak PSNR vs clean (dB) | peak step | mean gate |",
             "|---|---|---|---|---|---|---|"]
    for run, rs in sorted(by.items(), key=lambda kv: (kv[1][0]["optimizer"], -kv[1][0]["lr"])):
        gate = spread([r["mean_gate"] for r in rs], 3) if rs[0]["mean_gate"] is not None else "-"
        lrs = sorted({r["lr"] for r in rs})
        lr = f"{lrs[0]:.3g}" if len(lrs) == 1 else f"{lrs[0]:.3g}-{lrs[-1]:.3g}"
        lines.append(f"| {run} | {lr} | {len(rs)} | "
                     f"{spread([r['final_psnr'] for r in rs], 2)} | {spread([r['peak_psnr'] for r in rs], 2)} | "
                     f"{spread([r['peak_step'] for r in rs])} | {gate} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", choices=["photo", "synthetic"], default="photo")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--control", action="store_true", help="the lr-matched control and early-stopping baseline")
    parser.add_argument("--json", default="bench/paper/results/inr_control.json", help="--control writes its runs here")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    image = photo(64) if args.image == "photo" else synthetic_image(64)
    print(f"image: {args.image} 64x64, {args.steps} steps, lr {args.lr}\n")
    print("| seed | optimizer | lr | peak PSNR vs clean (step) | final PSNR vs clean |")
    print("|---|---|---|---|---|")
    if args.control:
        print(summary(control(image, args)))
        return
    gains = []
    for seed in args.seeds:
        result = train_side_by_side(image, steps=args.steps, lr=args.lr, seed=seed, progress=False)
        for name in result["curves"]:
            r = record(name, name, args.lr, seed, result["curves"][name])
            print(f"| {seed} | {name} | {args.lr:g} | {r['peak_psnr']:.2f} dB ({r['peak_step']}) | "
                  f"{r['final_psnr']:.2f} dB |", flush=True)
        gains.append(result["final"]["SNRAdamW"] - result["final"]["AdamW"])
    mean = sum(gains) / len(gains)
    print(f"\nfinal PSNR, SNRAdamW minus AdamW: {', '.join(f'{g:+.2f}' for g in gains)} dB (mean {mean:+.2f}); "
          f"the noisy targets themselves: {result['noisy_psnr']:.2f} dB")


if __name__ == "__main__":
    main()
