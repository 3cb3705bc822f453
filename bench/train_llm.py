"""A small Llama trained from scratch, AdamW against SNRAdamW, the way LLMs are trained.

The corpus needs no download: the Python standard library's own source files, as bytes (a
vocabulary of 256), split by file into a fixed train and held-out set. The model is a
transformers `LlamaForCausalLM` (default 4 layers, width 256), sharded with FSDP2
(`fully_shard` per block), compiled with torch.compile, run under bf16 autocast, and
checkpointed with torch.distributed.checkpoint (DCP); each optimizer is trained twice, straight
and from a checkpoint taken halfway, and the two must end equal. Data parallel over the ranks
of `torchrun` (gloo on CPU, NCCL on GPU). Prints tokens/s, the optimizer's share of the step
time, train and held-out loss; writes a PNG of the loss and gate curves and a JSON.

Run:  torchrun --nproc-per-node 2 bench/train_llm.py [--quick] [--seed 0] [--steps 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from snr_triton import SNRAdamW
from snr_triton.integrations import param_groups


def corpus(limit_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stdlib's .py files as uint8 tokens; one file in 20 (by name hash) is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = {"train": [], "held": []}
    sizes = {"train": 0, "held": 0}
    for path in sorted(root.glob("*.py")):
        split = "held" if zlib.crc32(path.name.encode()) % 20 == 0 else "train"
        if sizes[split] < (limit_bytes if split == "train" else limit_bytes // 10):
            parts[split].append(path.read_bytes())
            sizes[split] += len(parts[split][-1])
    train, held = parts["train"], parts["held"]
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(held)


def batch(data: torch.Tensor, n: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq, (n,), generator=gen)
    return torch.stack([data[s:s + seq] for s in starts.tolist()])


def build(args, device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=args.width, intermediate_size=4 * args.width,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.width // 64),
                         num_key_value_heads=max(1, args.width // 64), max_position_embeddings=args.seq)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device)
    # the mesh on the ranks' own device type: FSDP2's default takes the machine's accelerator, which
    # is wrong for two CPU ranks on a one-GPU machine
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def make_optimizer(name: str, model, args):
    lr = torch.tensor(args.lr)  # a tensor lr: the compiled step does not recompile when it changes
    if name == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    return SNRAdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95), track_stats=True,
                    state_dtype=getattr(torch, args.state_dtype))


def held_out_loss(model, held, args, device, rank, world) -> float:
    gen = torch.Generator().manual_seed(1234 + rank)
    total = torch.zeros((), device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for _ in range(args.eval_batches):
            x = batch(held, args.batch, args.seq, gen).to(device)
            total += model(input_ids=x, labels=x).loss.float()
    dist.all_reduce(total)
    return total.item() / (args.eval_batches * world)


def train(name: str, args, train_data, held, device, rank, world, stop: int, resume: str | None,
          save: str | None) -> dict:
    model = build(args, device)
    opt = make_optimizer(name, model, args)
    start = 0
    if resume:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=resume)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        start = int(Path(resume, "step").read_text()) if rank == 0 else 0
        start_t = torch.tensor(start)
        dist.broadcast(start_t, 0)
        start = int(start_t)
    forward = torch.compile(model, backend=args.compile_backend) if args.compile_backend != "none" else model
    log = {"step": [], "train": [], "held": [], "gate": []}
    opt_seconds = total_seconds = 0.0
    for step in range(start + 1, stop + 1):
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 101 + rank)
        x = batch(train_data, args.batch, args.seq, gen).to(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forward(input_ids=x, labels=x).loss
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if step > start + 1:  # the first step compiles
            opt_seconds += t2 - t1
            total_seconds += t2 - t0
        if save and step == stop:
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.save(state, checkpoint_id=save)
            if rank == 0:
                Path(save, "step").write_text(str(step))
        if step % args.eval_every == 0 or step == stop:
            loss_t = loss.detach().float()
            dist.all_reduce(loss_t)
            log["step"].append(step)
            log["train"].append(loss_t.item() / world)
            log["held"].append(held_out_loss(model, held, args, device, rank, world))
            log["gate"].append(opt.stats()["mean_gate"] if isinstance(opt, SNRAdamW) else None)
    tokens = (stop - start - 1) * args.batch * args.seq * world
    return {**log, "tokens_per_s": tokens / total_seconds if total_seconds else float("nan"),
            "optimizer_share": opt_seconds / total_seconds if total_seconds else float("nan"),
            "final_params": [getattr(p, "to_local", lambda: p)().detach().clone() for p in model.parameters()]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss, gate) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, color in (("AdamW", "tab:blue"), ("SNRAdamW", "tab:orange")):
        if name not in results:
            continue
        r = results[name]
        loss.plot(r["step"], r["train"], "--", color=color, label=f"{name} train")
        loss.plot(r["step"], r["held"], "-", color=color, label=f"{name} held out")
    loss.set_xlabel("step")
    loss.set_ylabel("loss (nats per byte)")
    loss.set_title("Llama on the Python standard library, bytes")
    loss.legend()
    loss.grid(alpha=0.3)
    if "SNRAdamW" in results:
        gate.plot(results["SNRAdamW"]["step"], results["SNRAdamW"]["gate"], color="tab:orange")
    gate.set_xlabel("step")
    gate.set_ylabel("mean gate q")
    gate.set_title("SNRAdamW monitor (opt.stats())")
    gate.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 2-layer width-64 model for 20 steps (CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--corpus-bytes", type=int, default=8 << 20)
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend, or none")
    parser.add_argument("--skip-resume", action="store_true",
                        help="train each optimizer once (no halfway checkpoint and resume check)")
    parser.add_argument("--state-dtype", default="float32", choices=["float32", "bfloat16", "uint8"],
                        help="SNRAdamW's state dtype (uint8: 8-bit states)")
    parser.add_argument("--optimizers", nargs="+", default=["AdamW", "SNRAdamW"], choices=["AdamW", "SNRAdamW"])
    parser.add_argument("--out", default="llm-run")
    args = parser.parse_args()
    if args.quick:
        args.width, args.layers, args.steps, args.seq, args.batch = 64, 2, 20, 64, 4
        args.eval_every, args.eval_batches, args.corpus_bytes = 10, 2, 1 << 20
        args.compile_backend = "aot_eager"  # inductor's first compile alone takes minutes on 2 cores
    # one GPU per rank, or all ranks on the CPU (gloo): two ranks on a one-GPU machine run on the CPU
    cuda = torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    train_data, held = corpus(args.corpus_bytes)
    results, exact = {}, {}
    for name in args.optimizers:
        ckpt = str(out / f"ckpt-{name}-seed{args.seed}")
        results[name] = train(name, args, train_data, held, device, rank, world, args.steps, None, None)
        if args.skip_resume:
            exact[name] = None
            continue
        train(name, args, train_data, held, device, rank, world, args.steps // 2, None, ckpt)
        resumed = train(name, args, train_data, held, device, rank, world, args.steps, ckpt, None)
        same = all(torch.equal(a, b) for a, b in zip(resumed["final_params"], results[name]["final_params"]))
        flag = torch.tensor(int(same))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        exact[name] = bool(flag)
    if rank == 0:
        print(f"\n{args.layers} layers, width {args.width}, {world} ranks, {args.steps} steps, "
              f"{args.batch * world} x {args.seq} bytes a step, seed {args.seed}, lr {args.lr}\n")
        print("| optimizer | tokens/s | optimizer share of step | train loss | held-out loss | resume exact |")
        print("|---|---|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['tokens_per_s']:.0f} | {r['optimizer_share']:.1%} | {r['train'][-1]:.4f} | "
                  f"{r['held'][-1]:.4f} | {'not checked' if exact[name] is None else 'yes' if exact[name] else 'NO'} |")
        summary = {name: {k: v for k, v in r.items() if k != "final_params"} for name, r in results.items()}
        (out / f"train_llm_seed{args.seed}.json").write_text(json.dumps(
            {"args": vars(args), "world": world, "resume_exact": exact, "results": summary}, indent=1))
        plot(results, out / f"train_llm_seed{args.seed}.png")
        print(f"\nwrote {out}/train_llm_seed{args.seed}.json and .png")
    dist.barrier()
    dist.destroy_process_group()
    if False in exact.values():
        raise SystemExit("a resumed run did not end where the straight run ended")


if __name__ == "__main__":
    main()
