"""The `snr-triton` command: `demo` AdamW and SNRAdamW side by side (noisy-photo INR, or grokking); `check` every
backend here against the float64 reference; `bench` step times against torch.optim.AdamW;
`codegen` the Triton kernel's GPU machine code, compiled here."""

from __future__ import annotations

import argparse
import os
import sys

import torch


def backend_matrix() -> tuple[list[tuple[str, str, str]], list[str]]:
    """(backend, device, dtype) cells this machine can check, and one line per skipped backend
    and device saying why. Triton on a CPU runs interpreted (TRITON_INTERPRET=1)."""
    from .backend import ORDER, get
    from .check import DTYPES
    from .hyperparams import DEFAULT_HYPER

    if not torch.cuda.is_available():
        # The kernels are imported on first use, so setting this now still takes effect.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cells, skipped = [], []
    for name in ORDER:
        for device in devices:
            dev = torch.device(device)
            reasons = {dt: get(name).unavailable_reason(dev, DTYPES[dt], DEFAULT_HYPER) for dt in DTYPES}
            runs = [dt for dt, why in reasons.items() if why is None]
            cells += [(name, device, dt) for dt in runs]
            if not runs:
                skipped.append(f"{name}:{device} skipped: {next(iter(reasons.values()))}")
            elif len(runs) < len(reasons):
                skipped.append(f"{name}:{device} skips {', '.join(d for d in reasons if d not in runs)} "
                               f"params (not served by this backend)")
    if torch.cuda.is_available():  # a GPU machine checks the GPU; the CPU's eager path is the same code
        cells = [c for c in cells if not (c[1] == "cpu" and c[0] != "cpu")]
    return cells, skipped


def cmd_check(args: argparse.Namespace) -> int:
    from .check import Case, passes, run_case, tolerances
    from .contract import GATES

    cells, skipped = backend_matrix()
    rows, failed = [], 0
    for backend, device, dtype in cells:
        for gate in GATES:
            case = Case(gate=gate, dtype=dtype, steps=args.steps, seed=args.seed)
            err = run_case(case, backend, device)
            ok = passes(case, err)
            failed += not ok
            states = max(err["exp_avg"], err["exp_avg_sq"], err["exp_grad_var"])
            rows.append((f"{backend}:{device}", gate, dtype, f"{err['param']:.2e}", f"{states:.2e}",
                         f"{tolerances(case)[0]:.1e}", "pass" if ok else "FAIL"))
    header = ("backend", "gate", "dtype", "param rel err", "state rel err", "param tol", "result")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    for line in skipped:
        print(line)
    print(f"\n{len(rows) - failed} passed, {failed} failed "
          f"({args.steps} steps, params of sizes 7, 33, 0 and 3x5 in two groups, vs float64 reference)")
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark import run

    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    return run(devices, args.sizes, args.steps, args.dtype, args.json)


def cmd_codegen(args: argparse.Namespace) -> int:
    import warnings

    from . import codegen
    from .backend.triton import BLOCK, NUM_WARPS

    try:
        import triton  # noqa: F401
    except ImportError:
        print("snr-triton codegen needs Triton: pip install triton", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    reports = codegen.run(args.arch, args.out, args.variants, progress=sys.stderr.isatty())
    if args.json:
        import json
        from dataclasses import asdict

        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=1)
    header = ("variant", "sm", "regs", "spill B", "stack B", "128-bit ld", "narrow ld", "128-bit st", "narrow st",
              "SASS/elem")
    rows = [(r.variant, r.arch, r.registers, r.spills, r.stack, r.loads_128, r.loads_narrow, r.stores_128,
             r.stores_narrow, f"{r.sass_per_element:.2f}") for r in reports]
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    spills = sum(r.spills > 0 for r in reports)
    stacks = sum(r.stack > 0 for r in reports)
    print(f"\n{len(reports)} compiled (BLOCK {BLOCK}, {NUM_WARPS} warps): {spills} with spills, {stacks} with a "
          f"call stack (the IEEE sqrt slow path out of line); registers "
          f"{min(r.registers for r in reports)}-{max(r.registers for r in reports)}. 128-bit counts are per "
          f"thread, the unmasked fast path; narrow ones are the masked tail path and table reads."
          + (f" PTX and SASS in {args.out}/" if args.out else ""))
    return 1 if spills else 0


PAPER_CLAIMS = {
    "inr": "paper: SNR gating memorizes less when an INR is fitted to noisy pixels",
    "grokking": "paper: about 5x faster grokking (steps to generalize) than AdamW",
}


def cmd_demo(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    try:
        import matplotlib  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError:
        print("snr-triton demo needs the demo extra: pip install 'snr-triton[demo]'", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    if args.task == "inr":
        from .inr import photo, train_side_by_side

        steps = args.steps or (300 if args.quick else 3000)
        result = train_side_by_side(photo(64), steps=steps, lr=args.lr or 1e-3, seed=args.seed, gate=args.gate,
                                    eval_every=50 if args.quick else 100, progress=progress)
        print(f"\nINR of a noisy photo (Grace Hopper, 64x64, noise sigma 0.1 = {result['noisy_psnr']:.1f} dB), "
              f"{steps} steps in {result['seconds']:.0f} s, seed {args.seed}")
        print(f"  {PAPER_CLAIMS['inr']}")
        for name in ("AdamW", "SNRAdamW"):
            print(f"  {name:9s} PSNR against the clean photo: peak {result['peak'][name]:.2f} dB, "
                  f"final {result['final'][name]:.2f} dB")
        gain = result["final"]["SNRAdamW"] - result["final"]["AdamW"]
        print(f"  measured here: SNRAdamW ends {gain:+.2f} dB against AdamW (seed {args.seed}; 3 seeds in "
              f"bench/RESULTS.md)")
        plot = _plot_inr
    else:
        from .grokking import train_side_by_side

        steps = args.steps or (300 if args.quick else 40000)
        result = train_side_by_side(train_fraction=args.train_fraction, steps=steps, lr=args.lr or 3e-3,
                                    weight_decay=args.weight_decay, seed=args.seed, gate=args.gate,
                                    eval_every=50 if args.quick else 100, time_budget=args.time_budget,
                                    progress=progress)
        print(f"\na*b^-1 mod 97, {result['config']['train_fraction']:.0%} of pairs for training, "
              f"{result['steps_run']} steps in {result['seconds']:.0f} s (seed {args.seed})")
        print(f"  {PAPER_CLAIMS['grokking']}")
        for name in ("AdamW", "SNRAdamW"):
            s50, s95 = result["to_50"][name], result["to_95"][name]
            print(f"  {name:9s} steps to 50% held-out: {s50 or 'not reached':>12}   to 95%: "
                  f"{s95 or 'not reached':>12}")
        a, b = result["to_95"]["AdamW"], result["to_95"]["SNRAdamW"]
        if a and b:
            print(f"  measured here: SNRAdamW needs {b / a:.2f}x AdamW's steps to 95% (seed {args.seed}; "
                  f"3 seeds in bench/RESULTS.md)")
        plot = _plot_demo
    (out / "demo.json").write_text(json.dumps({k: v for k, v in result.items() if k != "images"}, indent=1))
    plot(result, out / "demo.png")
    print(f"wrote {out / 'demo.json'} and {out / 'demo.png'}")
    return 0


def _gate_panel(ax, curve) -> None:
    if curve["gate"]:
        ax.plot(curve["steps"], [g[0] for g in curve["gate"]], label="mean gate q")
        ax.plot(curve["steps"], [g[1] for g in curve["gate"]], label="fraction with m-hat^2 > alpha s-hat")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of coordinates")
    ax.set_ylim(0, 1)
    ax.set_title("SNRAdamW monitor (opt.stats())")
    ax.legend()
    ax.grid(alpha=0.3)


def _plot_inr(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(14, 6.5))
    grid = fig.add_gridspec(2, 4)
    images = result["images"]
    titles = {"clean": "clean photo", "noisy": f"noisy targets ({result['noisy_psnr']:.1f} dB)",
              "AdamW": f"AdamW ({result['final']['AdamW']:.1f} dB)",
              "SNRAdamW": f"SNRAdamW ({result['final']['SNRAdamW']:.1f} dB)"}
    for k, key in enumerate(("clean", "noisy", "AdamW", "SNRAdamW")):
        ax = fig.add_subplot(grid[0, k])
        ax.imshow(images[key], cmap="gray", vmin=0, vmax=1)
        ax.set_title(titles[key])
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :2])
    for name, color in (("AdamW", "tab:blue"), ("SNRAdamW", "tab:orange")):
        c = result["curves"][name]
        ax.plot(c["steps"], c["psnr_clean"], "-", color=color, label=f"{name}, against the clean photo")
        ax.plot(c["steps"], c["psnr_noisy"], ":", color=color, label=f"{name}, against the noisy targets")
    ax.set_xlabel("step")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("PSNR; a falling clean-photo curve is memorized noise")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _gate_panel(fig.add_subplot(grid[1, 2:]), result["curves"]["SNRAdamW"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_demo(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, gate) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, color in (("AdamW", "tab:blue"), ("SNRAdamW", "tab:orange")):
        c = result["curves"][name]
        acc.plot(c["steps"], c["train_acc"], "--", color=color, label=f"{name} train")
        acc.plot(c["steps"], c["test_acc"], "-", color=color, label=f"{name} held out")
    acc.set_xlabel("step")
    acc.set_ylabel("accuracy")
    acc.set_title(f"grokking a*b^-1 mod 97 ({PAPER_CLAIMS['grokking'][7:]})", fontsize=9)
    acc.legend()
    acc.grid(alpha=0.3)
    _gate_panel(gate, result["curves"]["SNRAdamW"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    from .benchmark import parse_size
    parser = argparse.ArgumentParser(prog="snr-triton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="every backend here against the float64 reference")
    check.add_argument("--steps", type=int, default=10, help="optimizer steps per case (default 10)")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=cmd_check)
    bench = sub.add_parser("bench", help="step time and bandwidth against torch AdamW, one table per device")
    bench.add_argument("--device", action="append", choices=["cpu", "cuda"], help="default: every device here")
    bench.add_argument("--sizes", nargs="+", type=parse_size, metavar="SIZE",
                       help="params per tensor, e.g. 256K 16M 1G (default CPU 1M 16M 64M; GPU 16M 64M 256M 1G)")
    bench.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    bench.add_argument("--steps", type=positive_int, default=20, help="timed steps per implementation (default 20)")
    bench.add_argument("--json", help="also write the results here (bench/plot.py draws them)")
    bench.set_defaults(func=cmd_bench)
    codegen = sub.add_parser("codegen", help="the Triton kernel's machine code for real GPUs, compiled here "
                             "(no GPU needed): registers, spills, access widths")
    codegen.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                         help="CUDA compute capabilities (default: 80 90)")
    codegen.add_argument("--out", help="write each variant's PTX and SASS into this folder")
    codegen.add_argument("--variants", choices=["paths", "each", "all"], default="each",
                         help="paths: each dtype pair x gate, plain and with every option on; each (default): "
                              "also each option alone; all: every combination (1,280 per arch)")
    codegen.add_argument("--json", help="also write the table here")
    codegen.set_defaults(func=cmd_codegen)
    demo = sub.add_parser(
        "demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="AdamW and SNRAdamW side by side: a noisy-photo INR (default, ~1 min on 2 cores) or grokking",
        description="AdamW and SNRAdamW side by side, the paper's claim printed beside what is measured. "
                    "inr: an implicit neural representation fitted to a noisy photo, PSNR against the clean "
                    "photo, reconstructions and the gate monitor in demo.png (where our runs reproduce the "
                    "paper). grokking: a*b^-1 mod 97 with an MLP (where they do not; up to --time-budget).")
    demo.add_argument("task", nargs="?", default="inr", choices=["inr", "grokking"], help="which comparison")
    demo.add_argument("--steps", type=positive_int, help="steps (default: inr 3000, grokking 40000)")
    demo.add_argument("--lr", type=float, help="learning rate (default: inr 1e-3, grokking 3e-3)")
    demo.add_argument("--gate", default="snr", choices=["snr", "soft", "hard", "none"], help="SNRAdamW's gate")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="snr-demo", help="folder for demo.png and demo.json")
    demo.add_argument("--quick", action="store_true", help="300 steps: a smoke test of the whole pipeline")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    grok = demo.add_argument_group("grokking only")
    grok.add_argument("--train-fraction", type=float, default=0.25, help="share of pairs to train on")
    grok.add_argument("--weight-decay", type=float, default=1.0)
    grok.add_argument("--time-budget", type=float, default=270.0, help="stop after this many seconds")
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
