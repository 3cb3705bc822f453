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
         --jobs 2 --steps 40000 --json bench/paper/results/grokking_transformer.json
The lr-matched control (is SNRAdamW's speed at lr 1e-3 more than a smaller step?): add
     --lr-matched 1e-3 --seeds 0 1 (SNRAdamW's mean gate recorded, AdamW at lr x that gate).
The JSON file is written after every run and read at the start: runs already in it are not run
again, so a sweep can be stopped and resumed, and the tables cover every run in the file
(`--jobs 0` only prints them). A run is deterministic per seed, so one with a larger step cap
stands for the same run with a smaller cap, cut there.
"""

import argparse
import itertools
import json
import os
import statistics
from multiprocessing import Pool


def one(job):
    import torch

    torch.set_num_threads(1)
    from snr_triton.grokking import train_one

    optimizer, settings, lr, seed, model, steps = job
    return {**train_one(optimizer, model=model, lr=lr, seed=seed, steps=steps, **settings), "cap": steps}


def key(r):
    """What makes two runs the same run (the default alpha is stored as its value)."""
    alpha = None if r["optimizer"] == "AdamW" else r["alpha"] == 1.0
    return r["optimizer"], r["gate"], alpha, r["lr"], r["seed"], r["model"], r.get("control")


def lr_matched(job):
    """The lr-matched control for one seed: SNRAdamW at `lr` (its mean gate recorded), then AdamW
    at lr times that gate, which takes steps of about SNRAdamW's size."""
    lr, seed, model, steps = job
    snr = one(("SNRAdamW", {"gate": "snr"}, lr, seed, model, steps))
    adam = one(("AdamW", {}, lr * snr["mean_gate"], seed, model, steps))
    # both kept apart from the sweep's runs: a run is the same run only under the same code, and a
    # change in the kernels' rounding moves grokking by thousands of steps
    return [{**r, "control": "lr-matched", "matched_to": lr} for r in (snr, adam)]


def job_key(job):
    optimizer, settings, lr, seed, model, steps = job
    return key({"optimizer": optimizer, "gate": settings.get("gate"), "alpha": settings.get("alpha"), "lr": lr,
                "seed": seed, "model": model})


def at_cap(results: list, cap: int) -> list:
    """The runs as if capped at `cap`: a run is deterministic per seed, so one with a larger cap
    is the same run, cut at `cap` (the step of the last evaluation at or below it), and one that
    stopped before its own cap (at 95%, or diverged) is the same run under any larger cap."""
    out = {}
    for r in results:
        stopped = r["to_95"] is not None or r["diverged"]
        if (r["cap"] >= cap or stopped) and (key(r) not in out or r["cap"] < out[key(r)]["cap"]):
            out[key(r)] = r
    cut = lambda step: step if step is not None and step <= cap else None  # noqa: E731
    return [{**r, "to_50": cut(r["to_50"]), "to_95": cut(r["to_95"]), "cap": cap,
             "final_test_acc": r["final_test_acc"] if r["cap"] == cap or cut(r["to_95"]) else None}
            for r in out.values()]


def label(r):
    if r.get("control"):
        return f"{r['optimizer']}, {r['control']} control at {r['matched_to']:g}"
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
    parser.add_argument("--steps", type=int, default=40000, help="step cap per run")
    parser.add_argument("--jobs", type=int, default=2, help="parallel runs; 0: only print the tables")
    parser.add_argument("--json")
    parser.add_argument("--lr-matched", type=float, metavar="LR",
                        help="instead of the sweep: per seed SNRAdamW at LR and AdamW at LR x its mean gate")
    args = parser.parse_args()
    settings = [("AdamW", {})] + [("SNRAdamW", {"gate": c.split("-")[0], **({"alpha": 1.0} if "alpha1" in c else {})})
                                  for c in args.configs]
    results = []
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            results = json.load(f)
    if args.lr_matched:
        return control(args, results)
    done = {key(r) for r in at_cap(results, args.steps)}
    # in the order given: settings first, so the first settings' sweep is complete first
    jobs = [(o, s, lr, seed, args.model, args.steps)
            for (o, s), lr, seed in itertools.product(settings, args.lrs, args.seeds)]
    jobs = [j for j in jobs if job_key(j) not in done] if args.jobs else []
    print(f"{len(jobs)} runs to do, {len(results)} in {args.json or 'no file'}", flush=True)
    if jobs:
        with Pool(args.jobs) as pool:
            for r in pool.imap_unordered(one, jobs):
                results.append(r)
                print(f"{label(r)} lr {r['lr']:g} seed {r['seed']}: to 95% {r['to_95']}"
                      + (" DIVERGED" if r["diverged"] else ""), flush=True)
                if args.json:
                    with open(args.json + ".tmp", "w") as f:
                        json.dump(results, f, indent=1)
                    os.replace(args.json + ".tmp", args.json)
    results = [r for r in at_cap(results, args.steps) if r["model"] == args.model]
    report(results, args.model, args.steps)


def control(args, results: list) -> None:
    """Run the lr-matched control's missing seeds and print them."""
    done = {r["seed"] for r in results if r.get("control") == "lr-matched" and r["matched_to"] == args.lr_matched
            and r["model"] == args.model and r["cap"] == args.steps and r["optimizer"] == "AdamW"}
    jobs = [(args.lr_matched, seed, args.model, args.steps) for seed in args.seeds if seed not in done]
    print(f"{len(jobs)} seeds of the lr-matched control to run", flush=True)
    with Pool(max(1, args.jobs)) as pool:
        for snr, adam in pool.imap_unordered(lr_matched, jobs):
            results += [snr, adam]
            print(f"seed {snr['seed']}: SNRAdamW lr {snr['lr']:g} (mean gate {snr['mean_gate']:.3f}) to 95% "
                  f"{snr['to_95']}; AdamW lr {adam['lr']:.3g} to 95% {adam['to_95']}", flush=True)
            with open(args.json + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(args.json + ".tmp", args.json)


def ratio(adam, this, cap) -> str:
    """AdamW's steps / this run's; a run that missed 95% counts at the cap, making it a bound."""
    if adam is None and this is None:
        return "-"
    value = (adam or cap) / (this or cap)
    return f">{value:.2f}" if adam is None else f"<{value:.2f}" if this is None else f"{value:.2f}"


def held_out(r, cap) -> str:
    """Held-out accuracy of a run that missed 95%: at the cap, and its peak where it fell since
    (a peak needs the run's own cap to be this one; earlier files kept no peak)."""
    if r["final_test_acc"] is None:
        return "?"
    text = f"{r['final_test_acc']:.0%}"
    if r.get("best_test_acc") is not None and r["best_test_acc"] > r["final_test_acc"] + 0.05:
        text += f" (peak {r['best_test_acc']:.0%})"
    elif r.get("to_50") is not None:
        text += " (was ≥ 50%)"
    return text


def report(results: list, model: str, cap: int) -> None:
    by = {}
    for r in results:
        by.setdefault((label(r), r["lr"]), {})[r["seed"]] = r
    order = lambda kv: (kv[0][0] != "AdamW", kv[0])  # noqa: E731
    print(f"\n{model}, cap {cap} steps; ratios are AdamW's steps to 95% / this one's, per seed "
          "(>: AdamW missed 95% in the cap, <: this one did)\n")
    print("| optimizer | lr | seeds | steps to 95% (mean ± sd) | diverged | held out at the cap, runs that missed "
          "| same lr: AdamW / this, per seed |")
    print("|---|---|---|---|---|---|---|")
    for (name, lr), runs in sorted(by.items(), key=order):
        adam = by.get(("AdamW", lr), {})
        ratios = [ratio(adam[s]["to_95"], r["to_95"], cap) for s, r in sorted(runs.items()) if s in adam]
        missed = [held_out(r, cap) for r in runs.values() if r["to_95"] is None and not r["diverged"]]
        print(f"| {name} | {lr:g} | {len(runs)} | {summarize([r['to_95'] for r in runs.values()], cap)} | "
              f"{sum(r['diverged'] for r in runs.values())} | {' '.join(missed)} | "
              f"{' '.join(ratios) if name != 'AdamW' else ''} |")
    # each setting's best lr, by mean steps with misses at the cap; then per seed, AdamW at its best lr
    # against this setting at its best lr
    score = lambda runs: statistics.mean(r["to_95"] or cap for r in runs.values())  # noqa: E731
    best = {}
    n_seeds = {}  # only lrs run on every seed of a setting compete, so one lucky seed cannot win
    for (name, lr), runs in by.items():
        n_seeds[name] = max(n_seeds.get(name, 0), len(runs))
    for (name, lr), runs in by.items():
        if len(runs) == n_seeds[name] and (name not in best or score(runs) < score(by[(name, best[name])])):
            best[name] = lr
    if "AdamW" not in best:
        return
    adam = by[("AdamW", best["AdamW"])]
    print("\n| optimizer | best lr | steps to 95% there | best lr against AdamW's best lr, per seed | mean ± sd |")
    print("|---|---|---|---|---|")
    for name, lr in sorted(best.items(), key=lambda kv: kv[0] != "AdamW"):
        runs = by[(name, lr)]
        seeds = sorted(set(runs) & set(adam))
        per_seed = [ratio(adam[s]["to_95"], runs[s]["to_95"], cap) for s in seeds]
        values = [(adam[s]["to_95"] or cap) / (runs[s]["to_95"] or cap) for s in seeds]
        spread = f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")
        print(f"| {name} | {lr:g} | {summarize([r['to_95'] for r in runs.values()], cap)} | "
              f"{' '.join(per_seed) if name != 'AdamW' else ''} | {spread if name != 'AdamW' else ''} |")

if __name__ == "__main__":
    main()
