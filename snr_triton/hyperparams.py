"""Hyperparameter defaults and validation, shared by every backend.

Validation lives here, apart from the optimizer, so that a group can be checked
*before* anything is mutated: a rejected call must leave the optimizer as it was.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

GATES = ("snr", "soft", "hard", "none")
BACKENDS = ("auto", "triton", "cpu", "eager")
STATE_DTYPES = (torch.float32, torch.bfloat16)

DEFAULTS: dict[str, Any] = dict(
    lr=1e-3,
    betas=(0.9, 0.999),
    rho=0.99,
    eps=1e-8,
    weight_decay=1e-2,
    gate="snr",
    alpha=1.0,
    softness=1.0,
    gate_eps=1e-16,
    warmup_steps=0,
    maximize=False,
)


def finite_alpha(batch_size: int, dataset_size: int) -> float:
    """Leave-one-out coefficient b/(n-b) for many epochs over n examples in batches of b."""
    for name, value in (("batch_size", batch_size), ("dataset_size", dataset_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if not 0 < batch_size < dataset_size:
        raise ValueError(
            f"finite_alpha needs 0 < batch_size < dataset_size, got batch_size={batch_size}, "
            f"dataset_size={dataset_size}"
        )
    return batch_size / (dataset_size - batch_size)


def _real(name: str, value: Any, *, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number {where}, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a real number {where}, got nan")
    return value


def _check_range(name: str, value: Any, lo: float, hi: float | None, *, lo_open: bool) -> None:
    hi_txt = f"{hi})" if hi is not None else "inf)"
    where = f"in {'(' if lo_open else '['}{lo}, {hi_txt}"
    x = _real(name, value, where=where)
    ok = (x > lo if lo_open else x >= lo) and (hi is None or x < hi)
    if not ok:
        raise ValueError(f"{name} must be {where}, got {value!r}")


def _check_lr(lr: Any) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or lr.dim() != 0:
            raise ValueError(f"lr as a tensor must be 0-dim, got shape {tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise ValueError(f"lr as a tensor must be floating point, got {lr.dtype}")
        return  # a device tensor is not read here: reading it would synchronize
    _check_range("lr", lr, 0.0, None, lo_open=False)


def validate_group(group: dict[str, Any]) -> None:
    """Raise ValueError naming the argument, its value and the valid range."""
    _check_lr(group["lr"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), each in [0, 1), got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, torch.Tensor):
            raise ValueError(f"betas[{i}] must be a float in [0, 1), got a tensor")
        _check_range(f"betas[{i}]", b, 0.0, 1.0, lo_open=False)
    _check_range("rho", group["rho"], 0.0, 1.0, lo_open=False)
    _check_range("eps", group["eps"], 0.0, None, lo_open=True)
    _check_range("weight_decay", group["weight_decay"], 0.0, None, lo_open=False)
    _check_range("alpha", group["alpha"], 0.0, None, lo_open=False)
    _check_range("softness", group["softness"], 0.0, None, lo_open=False)
    _check_range("gate_eps", group["gate_eps"], 0.0, None, lo_open=True)
    gate = group["gate"]
    if gate not in GATES:
        raise ValueError(f"gate must be one of {', '.join(map(repr, GATES))}; got {gate!r}")
    warmup = group["warmup_steps"]
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup!r}")
    if not isinstance(group["maximize"], bool):
        raise ValueError(f"maximize must be a bool (True or False), got {group['maximize']!r}")


def validate_backend(backend: Any) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")


def validate_state_dtype(state_dtype: Any) -> None:
    if state_dtype not in STATE_DTYPES:
        names = ", ".join(str(d) for d in STATE_DTYPES)
        raise ValueError(f"state_dtype must be one of {names}; got {state_dtype!r}")
