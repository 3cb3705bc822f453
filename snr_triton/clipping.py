"""max_grad_norm's coefficient: from the grads' sum of squares to what the step divides g by.

One step of `max_grad_norm` needs, after the norm pass, the norm N (unscaled by GradScaler's
scale), k = min(1, c / (N + 1e-6)) folded with the scale into one divisor, found_inf with a
non-finite N added, and the count of skipped steps. As torch ops that is some twenty small
launches, each a few microseconds of host time: on a GPU, more than the step itself below ~16M
params. So a backend with a kernel computes all of it in one call (`register`): the Triton
backend in one single-program launch, the C backend on the host. `torch_ops` is the same
arithmetic as torch ops (the eager backend's, and the others' reference in the tests): every
implementation rounds exactly as it does.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

Coefficients = tuple[Tensor, Tensor, Tensor, Tensor]  # divide_by, found_inf, norm (float32), skipped (float64)


def torch_ops(total: Tensor, grad_scale: Tensor | None, found_inf: Tensor | None, skipped: Tensor | None,
              max_norm: float) -> Coefficients:
    """(g's divisor g / divide_by = g * k / grad_scale, found_inf + [N not finite], N, skipped + [found_inf
    != 0]) from total = the sum of g^2 (float64, on the device of the step)."""
    # a float32 scale is promoted to float64 (exactly) by each op with the float64 norm: no cast
    scale = grad_scale.to(total.device, non_blocking=True) if grad_scale is not None else None
    norm = total.sqrt() if scale is None else total.sqrt() / scale
    k = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # torch: reciprocal(N + 1e-6) * c
    bad = (~torch.isfinite(norm)).float()
    found = bad if found_inf is None else bad + found_inf.to(total.device, torch.float32, non_blocking=True)
    divide_by = (1.0 / k) if scale is None else scale / k  # 1 / k: reciprocal(k)
    skip = (found != 0).double()
    skipped = skip if skipped is None else skipped.to(skip) + skip
    return torch.where(bad > 0, 1.0, divide_by).float(), found, norm.float(), skipped


def _divide(a: float, b: float) -> float:
    """a / b in IEEE arithmetic (Python raises on b = 0)."""
    if b != 0:
        return a / b
    return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a) * math.copysign(1.0, b)


def host(total: Tensor, grad_scale: Tensor | None, found_inf: Tensor | None, skipped: Tensor | None,
         max_norm: float) -> Coefficients:
    """`torch_ops` in Python floats (IEEE float64, the same operations in the same order), for CPU
    tensors: reading them waits for nothing, and five tensors are made instead of twenty ops run."""
    norm = math.sqrt(total.item())  # a sum of squares: never negative
    if grad_scale is not None:
        scale = float(grad_scale.item())
        norm = _divide(norm, scale)
    bad = not math.isfinite(norm)
    k = min(_divide(1.0, norm + 1e-6) * max_norm, 1.0) if not bad else 1.0
    divide_by = 1.0 if bad else _divide(scale, k) if grad_scale is not None else _divide(1.0, k)
    # two float32s added in float64 and rounded once: torch_ops' float32 addition, exactly
    found = torch.tensor((1.0 if bad else 0.0) + (float(found_inf.to(torch.float32).item()) if found_inf is not None else 0.0),
                         dtype=torch.float32)
    count = (1.0 if found.item() != 0 else 0.0) + (float(skipped.item()) if skipped is not None else 0.0)
    return (torch.tensor(divide_by, dtype=torch.float32), found, torch.tensor(norm, dtype=torch.float32),
            torch.tensor(count, dtype=torch.float64))


def register(name: str, impl: Callable[..., Coefficients]) -> tuple[Callable, Callable]:
    """(custom op snr_triton::<name>, `impl`): under torch.compile the coefficient is one opaque call."""

    def coefficients(total: Tensor, grad_scale: Tensor | None, found_inf: Tensor | None, skipped: Tensor | None,
                     max_norm: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return impl(total, grad_scale, found_inf, skipped, max_norm)

    coefficients.__name__ = f"{name}_impl"
    op = torch.library.custom_op(f"snr_triton::{name}", coefficients, mutates_args=())

    def fake(total, grad_scale, found_inf, skipped, max_norm):
        return (*(total.new_empty((), dtype=torch.float32) for _ in range(3)), total.new_empty((), dtype=torch.float64))

    op.register_fake(fake)
    return op, impl


def call(op: Callable, impl: Callable, total: Tensor, grad_scale: Tensor | None, found_inf: Tensor | None,
         skipped: Tensor | None, max_norm: float) -> Coefficients:
    fn = op if torch.compiler.is_compiling() else impl
    return fn(total, grad_scale, found_inf, skipped, float(max_norm))
