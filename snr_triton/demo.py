"""`snr-triton demo`: AdamW and SNRAdamW side by side, the paper's claim printed beside what is
measured: in this run, and in our studies (snr_triton.claims reads their result files): the
noisy-photo INR (snr_triton/inr.py) or grokking (snr_triton/grokking.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import claims


PAPER_CLAIMS = {
    "inr": "paper: SNR gating memorizes less when an INR is fitted to noisy pixels",
    "grokking": "paper: about 5x faster grokking (steps to generalize) than AdamW",
}


def run(args: argparse.Namespace) -> int:
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
        print(f"  measured here: SNRAdamW ends {gain:+.2f} dB against AdamW (seed {args.seed})")
        study = claims.inr()
        if study:
            print(f"  our study (bench/paper/inr.py --control): {study}")
        plot = _plot_inr
    else:
        from .grokking import train_side_by_side

        steps = args.steps or (300 if args.quick else 40000)
        result = train_side_by_side(train_fraction=args.train_fraction, steps=steps, lr=args.lr or 3e-3,
                                    weight_decay=args.weight_decay, seed=args.seed, gate=args.gate,
                                    eval_every=50 if args.quick else 100, time_budget=args.time_budget,
                                    progress=progress, model=args.model)
        print(f"\na*b^-1 mod 97, {result['config']['model']}, {result['config']['train_fraction']:.0%} of pairs "
              f"for training, lr {result['config']['lr']:g}, "
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
        study = claims.grokking("transformer")
        if study:
            print("  " + ("this is a small MLP, where AdamW groks fast; " if args.model == "mlp" else "")
                  + f"our study with the standard grokking transformer (bench/paper/grokking.py): {study}")
        plot = _plot_demo
    (out / "demo.json").write_text(json.dumps({k: v for k, v in result.items() if k != "images"}, indent=1))
    plot(result, out / "demo.png")
    print(f"wrote {out / 'demo.json'} and {out / 'demo.png'}")
    return 0


def _curves_panel(ax, curves: dict, series, ylabel: str, title: str) -> None:
    """One line per optimizer and series (key, line style, label) against steps."""
    for name, color in (("AdamW", "tab:blue"), ("SNRAdamW", "tab:orange")):
        c = curves[name]
        for key, style, label in series:
            ax.plot(c["steps"], c[key], style, color=color, label=f"{name}, {label}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


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
    _curves_panel(fig.add_subplot(grid[1, :2]), result["curves"],
                  (("psnr_clean", "-", "against the clean photo"), ("psnr_noisy", ":", "against the noisy targets")),
                  "PSNR (dB)", "PSNR; a falling clean-photo curve is memorized noise")
    _gate_panel(fig.add_subplot(grid[1, 2:]), result["curves"]["SNRAdamW"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_demo(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, gate) = plt.subplots(1, 2, figsize=(12, 4.2))
    _curves_panel(acc, result["curves"], (("train_acc", "--", "train"), ("test_acc", "-", "held out")), "accuracy",
                  f"grokking a*b^-1 mod 97 ({PAPER_CLAIMS['grokking'][7:]})")
    _gate_panel(gate, result["curves"]["SNRAdamW"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
