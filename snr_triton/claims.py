"""What our studies measured, read from their result files, so that what the demo tells users
changes when a study is run again (no claim lives in a string).

The files are bench/paper/results/*.json, written by the scripts in bench/paper/ and shipped in
the wheel as `snr_triton.results`. Each function returns one or more sentences, or None when
its file is missing.
"""

from __future__ import annotations

import json
import statistics
from importlib import resources


def load(name: str):
    """A result file's parsed JSON, or None when it is not there."""
    try:
        return json.loads(resources.files("snr_triton.results").joinpath(name).read_text())
    except (FileNotFoundError, ModuleNotFoundError):
        return None


def spread(values: list[float], digits: int = 0, sep: str = ",") -> str:
    """mean ± sd (sd only for 2+ values)."""
    fmt = f"{{:{sep}.{digits}f}}"
    text = fmt.format(statistics.fmean(values))
    return text + (" ± " + fmt.format(statistics.stdev(values)) if len(values) > 1 else "")


def best_of(cells: dict, seeds: int, score):
    """The key of the cell (its runs) with the highest score, among the cells that hold all `seeds`
    runs, so one lucky seed cannot win; a tie goes to the first key."""
    full = [k for k, c in cells.items() if len(c) == seeds]
    return max(full, key=lambda k: score(cells[k])) if full else None


def grokking(model: str = "transformer") -> str | None:
    """Steps to 95% held out for AdamW and SNRAdamW (gate snr, alpha b/(n-b)), each at its best lr
    and per lr, over every lr that was run on every seed to the largest step cap."""
    runs = load(f"grokking_{model}.json")
    if not runs:
        return None
    controls = [r for r in runs if r["model"] == model and r.get("control") == "lr-matched"]
    runs = [r for r in runs if r["model"] == model and not r.get("control")
            and (r["optimizer"] == "AdamW" or (r["gate"] == "snr" and r["alpha"] != 1.0))]
    cap = max(r["cap"] for r in runs)
    cells: dict[tuple[str, float], dict[int, dict]] = {}
    for r in runs:
        if r["cap"] == cap or r["to_95"] is not None or r["diverged"]:  # a run that stopped is the same under any cap
            cells.setdefault((r["optimizer"], r["lr"]), {})[r["seed"]] = r
    seeds = max(len(c) for c in cells.values())
    cells = {k: c for k, c in cells.items() if len(c) == seeds}
    steps = lambda c: [r["to_95"] or cap for r in c.values()]  # noqa: E731  (a miss counts at the cap)
    best = {}
    for opt in ("AdamW", "SNRAdamW"):
        k = best_of({k: c for k, c in cells.items() if k[0] == opt}, seeds, lambda c: -statistics.fmean(steps(c)))
        if k is None:
            return None
        best[opt] = k[1]
    a, s = cells[("AdamW", best["AdamW"])], cells[("SNRAdamW", best["SNRAdamW"])]
    ratios = [(a[k]["to_95"] or cap) / (s[k]["to_95"] or cap) for k in sorted(set(a) & set(s))]
    lrs = sorted({lr for _, lr in cells})

    def cell(opt, lr):
        c = cells.get((opt, lr))
        if c is None:
            return "-"
        reached = [r["to_95"] for r in c.values() if r["to_95"] is not None]
        if not reached:
            return f"none of {len(c)} in {cap:,}"
        return spread(reached) + (f" ({len(reached)} of {len(c)})" if len(reached) < len(c) else "")

    per_lr = "; ".join(f"{lr:g}: {cell('AdamW', lr)} / {cell('SNRAdamW', lr)}" for lr in lrs)
    verdict = "faster" if statistics.fmean(ratios) > 1 else "slower"
    matched = ""
    pairs = {}
    for r in controls:
        pairs.setdefault(r["seed"], {})[r["optimizer"]] = r
    pairs = {k: v for k, v in sorted(pairs.items()) if len(v) == 2}
    if pairs:
        steps_of = lambda r: f"{r['to_95']:,}" if r["to_95"] else f"not in {r['cap']:,}"  # noqa: E731
        lr = controls[0]["matched_to"]
        matched = (f". The lr-matched control at lr {lr:g} (SNRAdamW run again with its gate measured, and "
                   "AdamW at that lr x the gate, steps of SNRAdamW's size), per seed, SNRAdamW / AdamW steps to "
                   "95%: " + "; ".join(f"seed {k}, gate {v['SNRAdamW']['mean_gate']:.2f}: "
                                       f"{steps_of(v['SNRAdamW'])} / {steps_of(v['AdamW'])}"
                                       for k, v in pairs.items()))
    return (f"each at its best of lrs {' / '.join(f'{lr:g}' for lr in lrs)} ({seeds} seeds, cap {cap:,} steps), "
            f"AdamW needs {spread(steps(a))} steps to 95% held out (lr {best['AdamW']:g}) and SNRAdamW "
            f"{spread(steps(s))} (lr {best['SNRAdamW']:g}): SNRAdamW is {verdict}, "
            f"{spread(ratios, 2)}x AdamW's speed per seed. Steps to 95% per lr, AdamW / SNRAdamW: {per_lr}"
            + matched)


def inr() -> str | None:
    """The noisy-photo INR against the lr-matched control and the early-stopping baseline."""
    data = load("inr_control.json")
    if not data:
        return None
    runs = data["runs"]
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["run"], []).append(r)
    snr, adam, matched = by.get("SNRAdamW"), by.get("AdamW"), by.get("AdamW, lr-matched")
    if not (snr and adam and matched):
        return None
    final = lambda rs: [r["final_psnr"] for r in rs]  # noqa: E731
    peak = lambda rs: [r["peak_psnr"] for r in rs]  # noqa: E731

    seeds = max(len(rs) for rs in by.values())

    def best(optimizer, key):
        cells = {k: rs for k, rs in by.items() if rs[0]["optimizer"] == optimizer}
        return cells[best_of(cells, seeds, lambda rs: statistics.fmean(key(rs)))]

    def versus(key):
        """Each optimizer's best lr by `key`: both, and SNRAdamW minus AdamW per seed."""
        a, s = best("AdamW", key), best("SNRAdamW", key)
        by_seed = {r["seed"]: key([r])[0] for r in a}
        diffs = [key([r])[0] - by_seed[r["seed"]] for r in s if r["seed"] in by_seed]
        return (f"AdamW {spread(key(a), 2)} dB (lr {a[0]['lr']:g}), SNRAdamW {spread(key(s), 2)} dB "
                f"(lr {s[0]['lr']:g}), per seed {', '.join(f'{d:+.2f}' for d in diffs)} dB")

    gate = statistics.fmean(r["mean_gate"] for r in snr)
    lr = data["lr"]
    explained = statistics.fmean(final(matched)) >= statistics.fmean(final(snr))
    return (f"at lr {lr:g} ({len(snr)} seeds) SNRAdamW ends at {spread(final(snr), 2)} dB and AdamW at "
            f"{spread(final(adam), 2)} dB; SNRAdamW's mean gate is {gate:.2f}, and AdamW at lr {lr:g} x {gate:.2f} "
            f"(the lr-matched control) ends at {spread(final(matched), 2)} dB: "
            + ("the gain is explained by SNRAdamW's smaller steps. " if explained else
               "the gain is more than SNRAdamW's smaller steps. ")
            + f"Each at its best lr: final {versus(final)}; peak (stopping early) {versus(peak)}")


def dpo_best(runs: list[dict]) -> dict[tuple[float, str], tuple[float, list[dict]]]:
    """{(noise, optimizer): (its best lr by mean greedy accuracy, those runs)}, among the lrs run on
    every seed."""
    cells: dict[tuple, list[dict]] = {}
    for r in runs:
        cells.setdefault((r["noise"], r["optimizer"], r["lr"]), []).append(r)
    seeds = max(len(rs) for rs in cells.values())
    best: dict[tuple[float, str], tuple[float, list[dict]]] = {}
    for noise, opt in sorted({k[:2] for k in cells}):
        mine = {k: cells[k] for k in sorted(cells) if k[:2] == (noise, opt)}
        k = best_of(mine, seeds, lambda rs: statistics.fmean(r["greedy_accuracy"] for r in rs))
        if k is not None:
            best[(noise, opt)] = (k[2], cells[k])
    return best


def dpo() -> str | None:
    """DPO under flipped preference labels: each optimizer at its best lr per noise level."""
    data = load("dpo.json")
    if not data or not data["runs"]:
        return None
    best = dpo_best(data["runs"])
    parts = []
    for noise in sorted({n for n, _ in best}):
        text = [f"{opt} {spread([100 * r['greedy_accuracy'] for r in rs], 1)}% right, KL "
                f"{spread([r['kl_per_token'] for r in rs], 2)} (lr {lr:g})"
                for opt in ("AdamW", "SNRAdamW") if (noise, opt) in best for lr, rs in [best[(noise, opt)]]]
        parts.append(f"{noise:.0%} flipped: " + ", ".join(text))
    seeds = len(next(iter(best.values()))[1])
    return (f"greedy answers right on held-out prompts and KL(pi || pi_ref) per token, {seeds} seeds, each "
            f"optimizer at its best lr: " + "; ".join(parts))
