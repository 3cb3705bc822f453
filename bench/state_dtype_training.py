"""Does SNRAdamW train as well with bf16 or 8-bit states as with fp32 states? Three tasks, three seeds.

Each (task, seed) trains SNRAdamW three times from the same init on the same batches, with
state_dtype float32, bfloat16 and uint8 (8-bit states), and records the final metric:
- inr: the noisy-image fit of `snr-triton demo` (snr_triton.inr.fit), PSNR against the clean image (dB, higher better);
- pinn: the convection PINN of bench/paper/pinn.py, final relative L2 error (lower better);
- lm: a 2-layer width-128 Llama on the stdlib's .py files as bytes (bench/train_llm.py's corpus,
  no FSDP: 8-bit states do not take DTensor params yet), held-out loss (nats/byte, lower better).

Results go to bench/state_dtype_training.json (runs already there are not rerun); the summary is
mean ± sd over seeds per task and state dtype, and each 8-bit run minus its fp32 twin.
Run: python bench/state_dtype_training.py [--tasks inr pinn lm] [--seeds 0 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "paper"))

STATES = {"fp32": torch.float32, "bf16": torch.bfloat16, "8bit": torch.uint8}
HIGHER_IS_BETTER = {"inr": True, "pinn": False, "lm": False}


def inr(seed: int, quick: bool) -> dict[str, float]:
    from snr_triton import inr as task

    runs = {name: ("SNRAdamW", 3e-4, {"state_dtype": dt}) for name, dt in STATES.items()}
    out = task.fit(task.photo(32 if quick else 64), runs, steps=50 if quick else 3000, seed=seed,
                   eval_every=50 if quick else 100, progress=False)
    return out["final"]


def pinn(seed: int, quick: bool) -> dict[str, float]:
    import pinn as task

    return {name: task.run("SNRAdamW", 3e-3, 50 if quick else 3000, seed, options={"state_dtype": dt})[1]
            for name, dt in STATES.items()}


def lm(seed: int, quick: bool) -> dict[str, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from snr_triton import SNRAdamW
    from snr_triton.integrations import param_groups
    from train_llm import batch, corpus

    train, held = corpus(1 << 20 if quick else 4 << 20)
    steps, width, seq, size = (10, 64, 32, 4) if quick else (400, 128, 64, 16)
    config = LlamaConfig(vocab_size=256, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                         num_attention_heads=max(1, width // 64), num_key_value_heads=max(1, width // 64),
                         max_position_embeddings=seq)
    out = {}
    for name, dt in STATES.items():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        opt = SNRAdamW(param_groups(model, 0.1), lr=3e-3, betas=(0.9, 0.95), state_dtype=dt)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x = batch(train, size, seq, gen)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        held_gen = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            losses = [model(input_ids=x, labels=x).loss.item() for x in (batch(held, 32, seq, held_gen)
                                                                        for _ in range(4))]
        out[name] = sum(losses) / len(losses)
    return out


TASKS = {"inr": inr, "pinn": pinn, "lm": lm}


def summary(results: list[dict]) -> str:
    lines = ["| task | seeds | fp32 states | bf16 states | 8-bit states | 8-bit minus fp32, per seed |", "|---|---|---|---|---|---|"]
    for task in TASKS:
        rows = [r for r in results if r["task"] == task and not r.get("quick")]
        if not rows:
            continue
        cells = []
        for name in STATES:
            values = [r["final"][name] for r in rows]
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            cells.append(f"{statistics.mean(values):.4g} ± {sd:.2g}")
        diffs = ", ".join(f"{r['final']['8bit'] - r['final']['fp32']:+.3g}" for r in sorted(rows, key=lambda r: r["seed"]))
        better = "higher" if HIGHER_IS_BETTER[task] else "lower"
        lines.append(f"| {task} ({better} is better) | {len(rows)} | {' | '.join(cells)} | {diffs} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="a few steps of each (a smoke test)")
    parser.add_argument("--out", type=Path, default=HERE / "state_dtype_training.json")
    parser.add_argument("--summary", action="store_true", help="print the table of the results file and stop")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else []
    if not args.summary:
        for task in args.tasks:
            for seed in args.seeds:
                if any(r["task"] == task and r["seed"] == seed and r.get("quick", False) == args.quick for r in results):
                    continue
                start = time.perf_counter()
                final = TASKS[task](seed, args.quick)
                results.append({"task": task, "seed": seed, "quick": args.quick, "final": final,
                                "seconds": round(time.perf_counter() - start, 1)})
                args.out.write_text(json.dumps(results, indent=1))
                print(task, seed, {k: round(v, 4) for k, v in final.items()}, flush=True)
    print(summary(results))


if __name__ == "__main__":
    main()
