"""The `snr-triton` command: `check` compares every backend here with the float64 reference;
`bench` times them against torch.optim.AdamW."""

from __future__ import annotations

import argparse
import os
import sys

import torch


def available_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs this machine can run; Triton on a CPU runs interpreted."""
    from .cpu_backend import cpu_unavailable_reason

    found = [("eager", "cpu")] + ([("cpu", "cpu")] if cpu_unavailable_reason() is None else [])
    try:
        import triton  # noqa: F401
    except ImportError:
        return found
    if torch.cuda.is_available():
        found += [("eager", "cuda"), ("triton", "cuda")]
    else:
        # The kernels are imported on first use, so setting this now still takes effect.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if os.environ["TRITON_INTERPRET"] == "1":
            found.append(("triton", "cpu"))
    return found


def cmd_check(args: argparse.Namespace) -> int:
    from .check import DTYPES, Case, passes, run_case, tolerances
    from .hyperparams import GATES

    rows, failed = [], 0
    for backend, device in available_backends():
        for dtype in DTYPES:
            if backend in ("triton", "cpu") and dtype not in ("fp32", "bf16", "fp16"):
                continue  # the kernels serve training dtypes; fp64 is the eager path's
            if backend == "cpu" and dtype == "fp16":
                continue
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
    print(f"\n{len(rows) - failed} passed, {failed} failed "
          f"({args.steps} steps, params of sizes 7, 33, 0 and 3x5 in two groups, vs float64 reference)")
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark import run

    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    sizes = [int(float(s) * 2**20) for s in args.sizes] if args.sizes else None
    return run(devices, sizes, args.steps, args.dtype, args.json)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="snr-triton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="every backend here against the float64 reference")
    check.add_argument("--steps", type=int, default=10, help="optimizer steps per case (default 10)")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=cmd_check)
    bench = sub.add_parser("bench", help="step time and bandwidth against torch AdamW, one table per device")
    bench.add_argument("--device", action="append", choices=["cpu", "cuda"], help="default: every device here")
    bench.add_argument("--sizes", nargs="+", help="params per tensor, in Mi (default CPU 1 16 64; GPU 1..1024)")
    bench.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    bench.add_argument("--steps", type=int, default=20, help="timed steps per implementation (default 20)")
    bench.add_argument("--json", help="also write the results here (bench/plot.py draws them)")
    bench.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
