"""SNRAdamW inside the trainers people use.

`param_groups` is plain torch; `transformers` (SNRStatsCallback) and `lightning`
(SNRStatsLogger) import their frameworks, installed by the `integrations` extra:
pip install 'snr-triton[integrations]'.
"""

from __future__ import annotations

from typing import Any

import torch

from ..optimizer import SNRAdamW

STAT_PREFIX = "snr/"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The usual split: weight decay for weights, none for biases, norms and embeddings (as
    Hugging Face's get_decay_parameter_names, plus embeddings). Params are named, so
    `opt.stats(per_param=True)` works: `SNRAdamW(param_groups(model, 0.1), lr=3e-4)`."""
    no_decay_modules = {id(p) for module in model.modules()
                        if isinstance(module, torch.nn.Embedding) or "Norm" in type(module).__name__
                        or "Embedding" in type(module).__name__
                        for p in module.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lowered = name.lower()
        skip = id(p) in no_decay_modules or lowered.endswith("bias") or "norm" in lowered
        (no_decay if skip else decay).append((name, p))
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def unwrap(optimizer: Any) -> SNRAdamW:
    """The SNRAdamW inside a trainer's wrapper (Accelerate's AcceleratedOptimizer, Lightning's
    LightningOptimizer); a clear error for any other optimizer."""
    seen = inner = optimizer
    for _ in range(4):
        if isinstance(seen, SNRAdamW):
            return seen
        inner = seen
        seen = getattr(seen, "optimizer", None) or getattr(seen, "_optimizer", None)
        if seen is None:
            break
    raise TypeError(f"the SNR statistics callbacks need an SNRAdamW optimizer, got {type(inner).__name__}: "
                    "pass SNRAdamW to the trainer (e.g. optimizer_cls_and_kwargs=(SNRAdamW, {...}))")


def start_tracking(optimizer: Any, model: torch.nn.Module | None = None) -> SNRAdamW:
    """Turn on track_stats; name the params from `model` where the trainer built unnamed groups
    (as torch does for named parameters), so per-param statistics can be logged."""
    opt = unwrap(optimizer)
    names = {p: n for n, p in model.named_parameters()} if model is not None else {}
    for group in opt.param_groups:
        group["track_stats"] = True
        if "param_names" not in group and names and all(p in names for p in group["params"]):
            group["param_names"] = [names[p] for p in group["params"]]
    return opt


def log_entries(opt: SNRAdamW, lowest: int = 0) -> dict[str, float]:
    """The last step's statistics as flat log keys (one device read): snr/mean_gate, ...,
    snr/group<i>/..., snr/skipped_steps, snr/grad_norm with `max_grad_norm` (the norm before
    clipping), and with `lowest` > 0 and named params, the mean gate of the `lowest` params whose
    gate is lowest (snr/lowest_gate/<name>). Empty before the first tracked step."""
    if not opt._last["stats"]:
        return {}
    named = lowest > 0 and all("param_names" in g for g in opt.param_groups)
    stats = opt.stats(per_param=named)
    keys = ("mean_gate", "frac_above", "signal", "noise")
    out = {f"{STAT_PREFIX}{k}": stats[k] for k in keys}
    if len(stats["groups"]) > 1:
        for i, group in enumerate(stats["groups"]):
            out.update({f"{STAT_PREFIX}group{i}/{k}": group[k] for k in keys})
    if named:
        worst = sorted(stats["params"].items(), key=lambda kv: kv[1]["mean_gate"])[:lowest]
        out.update({f"{STAT_PREFIX}lowest_gate/{name}": s["mean_gate"] for name, s in worst})
    out[f"{STAT_PREFIX}skipped_steps"] = stats["skipped_steps"]
    if opt.defaults.get("max_grad_norm") is not None:  # the step's own clipping: log its norm
        out[f"{STAT_PREFIX}grad_norm"] = float(opt.last_grad_norm())
    return out
