"""Hyperparameter defaults, validation, and the frozen per-group scalars every backend reads.

Validation lives here, apart from the optimizer, so that a group can be checked
*before* anything is mutated: a rejected call must leave the optimizer as it was.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Any

import torch

from .backend import ORDER
from .contract import GATES, STATE_DTYPES

BACKENDS = ("auto", *ORDER)

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
# How to run, not what to compute: keyword-only arguments, never overridden by a checkpoint.
RUNTIME_DEFAULTS: dict[str, Any] = dict(
    backend="auto",
    state_dtype=torch.float32,
    stochastic_rounding=False,
    track_stats=False,
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


def _check_scalar_tensor(name: str, t: torch.Tensor) -> None:
    if t.numel() != 1:
        raise ValueError(f"{name} as a tensor must hold one element (0-dim or shape [1]), "
                         f"got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} as a tensor must be floating point, got {t.dtype}")


def _check_lr(lr: Any, read_tensors: bool) -> None:
    if isinstance(lr, torch.Tensor):
        _check_scalar_tensor("lr", lr)
        if read_tensors:  # construction only, as torch.optim.AdamW: a step never reads a device lr
            _check_range("lr", float(lr.item()), 0.0, None, lo_open=False)
        return
    _check_range("lr", lr, 0.0, None, lo_open=False)


def _check_betas(betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), each in [0, 1), got {betas!r}")
    tensors = [isinstance(b, torch.Tensor) for b in betas]
    for i, b in enumerate(betas):
        if tensors[i]:
            _check_scalar_tensor(f"betas[{i}]", b)
        else:
            _check_range(f"betas[{i}]", b, 0.0, 1.0, lo_open=False)


def check_betas_kinds(betas: Any) -> None:
    """The constructor's rule, as torch.optim.AdamW's: both floats or both tensors. Only the
    constructor checks it: OneCycleLR and CyclicLR write a float beta1 beside a tensor beta2."""
    if isinstance(betas, (tuple, list)) and len(betas) == 2:
        if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):
            raise ValueError(f"betas must be both floats or both tensors (as torch.optim.AdamW's "
                             f"constructor requires), got {betas!r}")


def read_betas(betas: Any) -> tuple[float, float]:
    """(beta1, beta2) as floats, range-checked; tensor betas are read on the host once, together
    when they share a device (one synchronization for a CUDA pair, as torch.optim.AdamW's host reads).
    A float beside a tensor (what a momentum-cycling scheduler leaves) is read as each is."""
    if all(isinstance(b, torch.Tensor) for b in betas) and betas[0].device == betas[1].device:
        values = torch.stack([b.reshape(()).to(torch.float64) for b in betas]).tolist()
    else:
        values = [b.item() if isinstance(b, torch.Tensor) else float(b) for b in betas]
    for i, b in enumerate(values):
        _check_range(f"betas[{i}]", b, 0.0, 1.0, lo_open=False)
    return values[0], values[1]


def validate_group(group: dict[str, Any], *, read_tensors: bool = True) -> None:
    """Raise ValueError naming the argument, its value and the valid range. `read_tensors` also
    checks the values of tensor lr and betas (construction, add_param_group, load_state_dict); a
    step checks tensor betas as it reads them (`read_betas`) and never reads a tensor lr."""
    _check_lr(group["lr"], read_tensors)
    _check_betas(group["betas"])
    if read_tensors:
        read_betas(group["betas"])
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


def validate_runtime(group: dict[str, Any]) -> None:
    backend = group["backend"]
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if group["state_dtype"] not in STATE_DTYPES:
        names = ", ".join(str(d) for d in STATE_DTYPES)
        raise ValueError(f"state_dtype must be one of {names}; got {group['state_dtype']!r}")
    for key in ("stochastic_rounding", "track_stats"):
        if not isinstance(group[key], bool):
            raise ValueError(f"{key} must be a bool (True or False), got {group[key]!r}")


@dataclass(frozen=True)
class Hyper:
    """One param group's settings as plain scalars: what every backend's step() receives.

    Built from a validated group at every step (a scheduler may have changed the group).
    `lr` stays a tensor when the group holds one, so a device lr is never read on the host;
    tensor betas are read once (`read_betas`), which also checks their range.
    """

    lr: float | torch.Tensor
    beta1: float
    beta2: float
    rho: float
    eps: float
    weight_decay: float
    gate: str
    alpha: float
    softness: float
    gate_eps: float
    warmup_steps: int
    maximize: bool
    state_dtype: torch.dtype
    stochastic_rounding: bool
    track_stats: bool

    @classmethod
    def of(cls, group: dict[str, Any]) -> "Hyper":
        lr = group["lr"]
        lr = lr.reshape(()) if isinstance(lr, torch.Tensor) else float(lr)
        beta1, beta2 = read_betas(group["betas"])
        return cls(lr, beta1, beta2, *(float(group[k]) for k in ("rho", "eps", "weight_decay")),
                   group["gate"], float(group["alpha"]), float(group["softness"]), float(group["gate_eps"]),
                   int(group["warmup_steps"]), bool(group["maximize"]), group["state_dtype"],
                   group["stochastic_rounding"], group["track_stats"])


DEFAULT_HYPER = Hyper.of({**DEFAULTS, **RUNTIME_DEFAULTS})

_KEY_NAMES = tuple(name for name in (*DEFAULTS, *RUNTIME_DEFAULTS) if name != "lr")
_BETAS = _KEY_NAMES.index("betas")


def _values_key(group: dict[str, Any]) -> tuple | None:
    """The group's settings but lr, types first (True and 1, 0 and 0.0 validate differently; and
    values are compared only where their types are those validated), or None where lr or a beta
    is a tensor (validation refuses a tensor anywhere else): their values can change in place."""
    betas = group["betas"]
    if isinstance(group["lr"], torch.Tensor):
        return None
    if isinstance(betas, (tuple, list)):
        if any(isinstance(b, torch.Tensor) for b in betas):
            return None
        betas = (type(betas), tuple(map(type, betas)), tuple(betas))
    values = [group[name] for name in _KEY_NAMES]
    values[_BETAS] = betas
    return tuple(map(type, values)), tuple(values)


class StepHypers:
    """Each group's `Hyper` at a step. Every step must validate every group (a scheduler or the
    user may have changed it), which was about half of a step's host time with many small groups
    (layer-wise lr decay, a group per param). A group whose settings are the plain values it had
    at the last step, but for lr (schedulers change it every step), has only its lr checked; one
    whose lr or betas are tensors is validated every step."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[tuple, Hyper]] = {}  # group index -> (its values' key, its Hyper)

    def of(self, index: int, group: dict[str, Any]) -> Hyper:
        key = _values_key(group)
        last = self._last.get(index)
        if key is not None and last is not None and last[0] == key:
            hyper, lr = last[1], group["lr"]
            if type(lr) is float and lr == hyper.lr:  # NaN is never equal: it is checked below
                return hyper
            _check_lr(lr, read_tensors=False)
            hyper = replace(hyper, lr=float(lr))
        else:
            validate_group(group, read_tensors=False)
            validate_runtime(group)
            hyper = Hyper.of(group)
        if key is not None:
            self._last[index] = (key, hyper)
        return hyper
