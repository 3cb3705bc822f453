"""The `snr-triton` command: `demo` AdamW and SNRAdamW side by side (noisy-photo INR, or grokking); `check` every
backend here against the float64 reference; `bench` step times against torch.optim.AdamW;
`codegen` the Triton kernel's GPU machine code, compiled here."""

from __future__ import annotations

import argparse
import os
import sys

import torch


# What this Triton and its ptxas compile the kernel for (measured: below 75 nvdisasm fails, and
# 101 ends in an internal PTX codegen error); another number ended in ptxas's stack trace.
CODEGEN_ARCHS = (75, 80, 86, 87, 89, 90, 100, 103, 120, 121)


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


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError:
        print("snr-triton demo needs the demo extra: pip install 'snr-triton[demo]'", file=sys.stderr)
        return 2
    from .demo import run

    return run(args)


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
    codegen.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=CODEGEN_ARCHS,
                         metavar="ARCH", help="CUDA compute capabilities, of " + " ".join(map(str, CODEGEN_ARCHS))
                         + " (default: 80 90)")
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
                    "photo, reconstructions and the gate monitor in demo.png. grokking: a*b^-1 mod 97 with an "
                    "MLP (up to --time-budget). Each prints what our studies measured, read from their result "
                    "files (bench/paper/results).")
    demo.add_argument("task", nargs="?", default="inr", choices=["inr", "grokking"], help="which comparison")
    demo.add_argument("--steps", type=positive_int, help="steps (default: inr 3000, grokking 40000)")
    demo.add_argument("--lr", type=float, help="learning rate (default: inr 1e-3, grokking 3e-3)")
    demo.add_argument("--gate", default="snr", choices=["snr", "soft", "hard", "none"], help="SNRAdamW's gate")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="snr-demo", help="folder for demo.png and demo.json")
    demo.add_argument("--quick", action="store_true", help="300 steps: a smoke test of the whole pipeline")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    grok = demo.add_argument_group("grokking only")
    grok.add_argument("--model", choices=["mlp", "transformer"], default="mlp",
                      help="mlp: fast on a CPU; transformer: the paper's model (2 layers, 4 heads), ~30 ms a "
                           "step here; with --lr 1e-3 it is the regime where SNRAdamW was faster (set --time-budget)")
    grok.add_argument("--train-fraction", type=float, default=0.25, help="share of pairs to train on")
    grok.add_argument("--weight-decay", type=float, default=1.0)
    grok.add_argument("--time-budget", type=float, default=270.0, help="stop after this many seconds")
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
