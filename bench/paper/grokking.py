"""Paper claim: grokking a*b^-1 mod 97 with 25% of pairs, steps to 95% held-out accuracy.

Litman & Guo report 5,950 (SNR) against 29,450 (AdamW) steps, about 4.9x. Two models:
`mlp` (snr_triton.grokking.DivisionMLP, fast on a CPU; AdamW groks in ~10k steps at lr 3e-3)
and `transformer` (the standard grokking model: decoder-only, 2 layers, 4 heads, width 64,
tokens [a, b, =]), in the slower regime the paper measured. A sweep over learning rates x
seeds x SNRAdamW settings (gate snr/soft, alpha = b/(n-b) and 1), every run on the same data,
init and batches per seed, run in parallel processes (one thread each). Nothing is tuned for
the claim: weight decay 1.0, batch 512, betas (0.9, 0.98) for every run.

Reported: steps to 95% per run; same-lr ratios AdamW / SNRAdamW per seed; the best lr of each
optimizer against the best of the other (by mean steps, runs that did not reach 95% counted at
the step cap); runs that diverged (non-finite loss).

Run: python bench/paper/grokking.py --model transformer --lrs 1e-3 3e-3 1e-2 --seeds 0 1 2 \\
         --jobs 2 --steps 60000 --json out.json
"""

import argparse
import itertools
import json
import statistics
from multiprocessing import Pool


def one(job):
    import torch

    torch.set_num_threads(1)
    from snr_triton.grokking import train_one

    optimizer, settings, lr, seed, model, steps = job
    return train_one(optimizer, model=model, lr=lr, seed=seed, steps=steps, **settings)


def label(r):
    if r["optimizer"] == "AdamW":
        return "AdamW"
    alpha = "1" if r["alpha"] == 1.0 else "b/(n-b)"
    return f"SNRAdamW {r['gate']}, alpha {alpha}"


def summarize(values, cap):
    reached = [v for v in values if v is not None]
    text = f"{statistics.mean(reached):.0f}" if reached else "not reached"
    if len(reached) > 1:
        text += f" ± {statistics.stdev(reached):.0f}"
    if len(reached) < len(values):
        text += f" ({len(values) - len(reached)} of {len(values)} not in {cap})"
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["mlp", "transformer"], default="transformer")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=["snr", "snr-alpha1", "soft", "soft-alpha1"],
                        help="SNRAdamW settings: gate, with -alpha1 for alpha = 1 (else b/(n-b))")
    parser.add_argument("--steps", type=int, default=60000, help="step cap per run")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    settings = [("AdamW", {})] + [("SNRAdamW", {"gate": c.split("-")[0], **({"alpha": 1.0} if "alpha1" in c else {})})
                                  for c in args.configs]
    jobs = [(o, s, lr, seed, args.model, args.steps)
            for (o, s), lr, seed in itertools.product(settings, args.lrs, args.seeds)]
    results = []
    with Pool(args.jobs) as pool:
        for r in pool.imap_unordered(one, jobs):
            results.append(r)
            print(f"{label(r)} lr {r['lr']:g} seed {r['seed']}: to 95% {r['to_95']}"
                  + (" DIVERGED" if r["diverged"] else ""), flush=True)
    by = {}
    for r in results:
        by.setdefault((label(r), r["lr"]), {})[r["seed"]] = r
    print(f"\n{args.model}, cap {args.steps} steps, seeds {args.seeds}\n")
    print("| optimizer | lr | steps to 95% (mean ± sd) | diverged | AdamW / this, same lr, per seed |")
    print("|---|---|---|---|---|")
    for (name, lr), runs in sorted(by.items(), key=lambda kv: (kv[0][0] != "AdamW", kv[0])):
        adam = by.get(("AdamW", lr), {})
        ratios = [f"{adam[s]['to_95'] / r['to_95']:.2f}" if adam.get(s, {}).get("to_95") and r["to_95"] else "-"
                  for s, r in sorted(runs.items())]
        print(f"| {name} | {lr:g} | {summarize([r['to_95'] for r in runs.values()], args.steps)} | "
              f"{sum(r['diverged'] for r in runs.values())} | {' '.join(ratios) if name != 'AdamW' else ''} |")
    # best lr of each optimizer setting, scored by mean steps with misses at the cap
    score = lambda runs: statistics.mean(r["to_95"] or args.steps for r in runs.values())  # noqa: E731
    best = {}
    for (name, lr), runs in by.items():
        if name not in best or score(runs) < score(by[(name, best[name])]):
            best[name] = lr
    print("\n| optimizer | best lr | steps to 95% at its best lr | AdamW best / this best |")
    print("|---|---|---|---|")
    adam_best = score(by[("AdamW", best["AdamW"])]) if "AdamW" in best else None
    for name, lr in sorted(best.items(), key=lambda kv: kv[0] != "AdamW"):
        s = score(by[(name, lr)])
        print(f"| {name} | {lr:g} | {summarize([r['to_95'] for r in by[(name, lr)].values()], args.steps)} | "
              f"{adam_best / s:.2f} |" if adam_best else "")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
