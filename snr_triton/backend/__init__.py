"""The backends: one interface, one registry, one order for `auto`.

Every backend module exposes the same four functions:

    unavailable_reason(device, dtype, hyper) -> str | None
        None when it can step params of this (real) dtype on this device with these settings,
        else what to do instead.
    step(bucket, slots, params, grads, hyper, *, grad_scale, found_inf) -> Tensor | None
        One step of the active `params` (local real views, with their `grads`) of one bucket
        (param_states.BucketStates), whose states their `slots` hold; returns, when
        hyper.track_stats, the gate statistics' sums per param on the device (shape
        [len(params), len(contract.STATS)]), else None. A non-zero found_inf makes it a no-op.
    grad_sq_sum(bucket, slots, params, grads) -> Tensor
        The sum of g^2 over the active grads (0-dim, float64, on the bucket's device): the norm
        pass of `max_grad_norm`, before any bucket steps. One read of each grad.
    clip_coefficients(total, grad_scale, found_inf, skipped, max_norm) -> (divide_by, found_inf, norm, skipped)
        From the norm pass's total to what the step divides g by, in as few device calls as it
        can (snr_triton/clipping.py; `clipping.torch_ops` is the arithmetic).

and may declare AUTO_DEVICE_TYPES, the device types `auto` may pick it for (default: all):
Triton on a CPU runs interpreted, for tests, and is used only when named.

`auto` takes the first backend of ORDER that is available. Adding a backend means adding a
module with these four functions and its name to ORDER.

(The package is `backend`, not `backends`: torch.compile skips every file whose path contains
"triton/backends", which snr_triton/backends/ would, and the step would break its graph.)
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from ..warn import warn_user

if TYPE_CHECKING:
    from ..hyperparams import Hyper

ORDER = ("triton", "cpu", "eager")


class Degraded(str):
    """A reason meaning: this backend would serve these tensors, but cannot run on this machine
    (no C compiler, Triton missing). `auto` then falls back, and says so once."""


_modules: dict[str, ModuleType] = {}


def kernel_file(name: str) -> Path:
    """A kernel source file: installed, snr_triton/kernels/<name>; in a source checkout (the package
    imported from the repository root), the top-level kernels/ folder."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "kernels" / name, package.parent / "kernels" / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"kernels/{name} is missing: reinstall snr-triton")


def get(name: str) -> ModuleType:
    """The backend module `name`, imported on first use (a plain dict lookup after that, which
    torch.compile traces)."""
    module = _modules.get(name)
    if module is None:
        if name not in ORDER:
            raise ValueError(f"backend must be one of {', '.join(map(repr, ORDER))}; got {name!r}")
        module = _modules[name] = importlib.import_module(f"{__name__}.{name}")
    return module


_warned: set[str] = set()


def _importable(name: str) -> tuple[ModuleType | None, str | None]:
    """(module, None), or (None, why) when it cannot be imported on this machine (a POSIX-only
    module on Windows, a broken install): a degraded choice, not a crash of `auto`."""
    try:
        return get(name), None
    except ImportError as e:
        return None, Degraded(f"the {name} backend cannot be imported here ({e})")


def choose(backend: str, device: torch.device, dtype: torch.dtype, hyper: "Hyper") -> tuple[str, ModuleType]:
    """The backend that steps params of `dtype` on `device`: the one named, or under "auto" the
    first available in ORDER. Raises RuntimeError when a named backend cannot run."""
    if backend != "auto":
        if backend not in ORDER:
            get(backend)  # the ValueError naming the choices
        module, why = _importable(backend)
        if module is None:
            raise RuntimeError(f"backend={backend!r} cannot step a {dtype} param on {device}: {why}")
        reason = module.unavailable_reason(device, dtype, hyper)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot step a {dtype} param on {device}: {reason}")
        return backend, module
    degraded = []
    for name in ORDER:
        module, why = _importable(name)
        if module is None:
            degraded.append((name, why))
            continue
        if device.type not in getattr(module, "AUTO_DEVICE_TYPES", (device.type,)):
            continue
        reason = module.unavailable_reason(device, dtype, hyper)
        if reason is None:
            for skipped, why in degraded:
                if why not in _warned:
                    _warned.add(why)
                    warn_user(f"SNRAdamW backend='auto' steps {dtype} params on {device} with the "
                              f"{name} backend, several times slower than the fused {skipped} kernel, "
                              f"because {why}")
            return name, module
        if isinstance(reason, Degraded):
            degraded.append((name, reason))
    raise RuntimeError(f"no backend can step a {dtype} param on {device}")


def available(device: torch.device, dtype: torch.dtype, hyper: "Hyper") -> list[str]:
    """The backends that can step `dtype` params on `device` here, in ORDER."""
    modules = {name: _importable(name)[0] for name in ORDER}
    return [name for name, m in modules.items() if m is not None and m.unavailable_reason(device, dtype, hyper) is None]
