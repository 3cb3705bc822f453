"""The one call schema of the fused kernels, each registered as its own torch custom op.

Like bitsandbytes' op schemas: every fused backend implements `impl(params, grads, exp_avg,
exp_avg_sq, exp_grad_var, steps, stats, flat_handle, slots, lr, lr_tensor, grad_scale,
found_inf, scalars, gate, warmup_steps, maximize, stochastic_rounding, track_stats)` and
registers it with `register`. Under torch.compile the step is then one opaque, mutating call
(no graph break, correct aliasing); a tensor lr is an input, so an lr schedule does not
recompile. Host reads (a CPU found_inf, a CPU lr tensor) happen inside the op, where the
compiler does not see them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .flat_state import FlatState
from .hyperparams import Hyper

MUTATES = ("params", "exp_avg", "exp_avg_sq", "exp_grad_var", "steps", "stats")


def register(name: str, impl: Callable) -> Callable:
    """`impl` as the custom op snr_triton::<name>, with a fake kernel for tracing."""
    op = torch.library.custom_op(f"snr_triton::{name}", impl, mutates_args=MUTATES)
    op.register_fake(lambda *args, **kwargs: None)  # only mutates its inputs
    return op


def call(op: Callable, impl: Callable, flat: FlatState, params: list[Tensor], grads: list[Tensor], h: Hyper,
         grad_scale: Tensor | None, found_inf: Tensor | None, stats_dtype: torch.dtype) -> Tensor | None:
    """Step a bucket through `impl` (eager) or `op` (under torch.compile); returns the per-param
    stats buffer ([len(params), len(STATS)], on the device) with track_stats."""
    lr, lr_tensor = h.lr, None
    if isinstance(lr, Tensor):
        if lr.device == flat.device:
            lr_tensor, lr = lr, 0.0
        else:  # a CPU tensor next to CUDA params: reading it does not synchronize the GPU
            lr = lr.item()
    stats = flat.stats_buffer(len(params) if h.track_stats else 0, stats_dtype)  # [0, STATS] when off
    fn = op if torch.compiler.is_compiling() else impl
    fn(params, grads, flat.buffers["exp_avg"], flat.buffers["exp_avg_sq"], flat.buffers["exp_grad_var"],
       flat.steps, stats, flat.handle, [flat.index[p] for p in params], float(lr), lr_tensor, grad_scale,
       found_inf, [h.beta1, h.beta2, h.rho, h.eps, h.weight_decay, h.alpha, h.softness, h.gate_eps],
       h.gate, h.warmup_steps, h.maximize, h.stochastic_rounding, h.track_stats)
    return stats if h.track_stats else None
