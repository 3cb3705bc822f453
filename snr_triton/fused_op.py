"""The one call schema of the fused kernels, each registered as its own torch custom op.

Like bitsandbytes' op schemas: `register(name, launch, block)` wraps a backend's
`launch(job: Launch)` in a torch custom op whose arguments are tensors and scalars only. Under
torch.compile the step is one opaque, mutating call (no graph break, correct aliasing: every
state tensor it writes is an argument); a tensor lr is an input, so an lr schedule does not
recompile. Inside the op the bucket's block map is found (tables.py), the addresses refreshed,
and the backend's `launch` gets everything by name. Where an lr tensor is read: one on the
params' device is an input of the op (the Triton kernel loads it on the GPU; the CPU op reads
it on the host, inside the op, where the compiler does not see it); a CPU lr next to CUDA
params is read in `call` (host memory: no GPU synchronization). A CPU found_inf is read inside
the CPU op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .hyperparams import Hyper
from .param_states import BucketStates, Slot
from .tables import BlockMap, block_map, operands, write_back

MUTATES = ("params", "exp_avg", "exp_avg_sq", "exp_grad_var", "exp_avg_scales", "exp_avg_sq_scales",
           "exp_grad_var_scales", "steps", "stats")
# Hyper's float settings in the order the schema's `scalars` list carries them (a custom op takes
# no structs); read back by name into Launch, never unpacked by position elsewhere.
SCALARS = ("beta1", "beta2", "rho", "eps", "weight_decay", "alpha", "softness", "gate_eps")


@dataclass
class Launch:
    """One fused step of a bucket's active params, as a backend's `launch` receives it."""

    bucket: BucketStates
    table: BlockMap
    steps: Tensor
    stats: Tensor  # [len(active), len(STATS)], written when track_stats
    lr: float
    lr_tensor: Tensor | None
    grad_scale: Tensor | None
    found_inf: Tensor | None
    beta1: float
    beta2: float
    rho: float
    eps: float
    weight_decay: float
    alpha: float
    softness: float
    gate_eps: float
    gate: str
    warmup_steps: int
    maximize: bool
    stochastic_rounding: bool
    track_stats: bool


def register(name: str, launch: Callable[[Launch], None], block: int) -> tuple[Callable, Callable]:
    """(custom op snr_triton::<name>, its eager implementation) around `launch`."""

    def impl(params: list[Tensor], grads: list[Tensor], exp_avg: list[Tensor], exp_avg_sq: list[Tensor],
             exp_grad_var: list[Tensor], exp_avg_scales: list[Tensor], exp_avg_sq_scales: list[Tensor],
             exp_grad_var_scales: list[Tensor], steps: Tensor, stats: Tensor, bucket_handle: int, slots: list[int],
             lr: float, lr_tensor: Tensor | None, grad_scale: Tensor | None, found_inf: Tensor | None,
             scalars: list[float], gate: str, warmup_steps: int, maximize: bool, stochastic_rounding: bool,
             track_stats: bool) -> None:
        bucket = BucketStates.find(bucket_handle)  # stable for the bucket's life: no recompiles
        table = block_map(bucket, slots, block)
        addresses, back = operands(table, table.slots, params, grads)
        states = [t.data_ptr() for ts in zip(exp_avg, exp_avg_sq, exp_grad_var) for t in ts] if exp_avg else None
        scales = [t.data_ptr() for ts in zip(exp_avg_scales, exp_avg_sq_scales, exp_grad_var_scales) for t in ts]
        table.refresh(addresses, states, scales)
        launch(Launch(bucket, table, steps, stats, lr, lr_tensor, grad_scale, found_inf,
                      **dict(zip(SCALARS, scalars)), gate=gate, warmup_steps=warmup_steps, maximize=maximize,
                      stochastic_rounding=stochastic_rounding, track_stats=track_stats))
        write_back(back)

    impl.__name__ = f"{name}_impl"
    op = torch.library.custom_op(f"snr_triton::{name}", impl, mutates_args=MUTATES)
    op.register_fake(lambda *args, **kwargs: None)  # only mutates its inputs
    return op, impl


def call(op: Callable, impl: Callable, bucket: BucketStates, slots: list[Slot], params: list[Tensor],
         grads: list[Tensor], h: Hyper, grad_scale: Tensor | None, found_inf: Tensor | None,
         stats_dtype: torch.dtype) -> Tensor | None:
    """Step a bucket's active `slots` through `impl` (eager) or `op` (under torch.compile); returns the
    per-param stats buffer ([len(slots), len(STATS)], on the device) with track_stats."""
    lr, lr_tensor = h.lr, None
    if isinstance(lr, Tensor):
        if lr.device == bucket.device:
            lr_tensor, lr = lr, 0.0
        else:  # a CPU tensor next to CUDA params: reading it does not synchronize the GPU
            lr = lr.item()
    stats = bucket.stats_buffer(len(slots) if h.track_stats else 0, stats_dtype)  # [0, STATS] when off
    if torch.compiler.is_compiling():  # every tensor the op writes is an argument
        fn, states = op, tuple([s.real[k] for s in slots] for k in range(3))
        states += tuple([s.scales[k] for s in slots] if bucket.state_dtype == torch.uint8 else [] for k in range(3))
    else:  # the kernel reaches the states by address
        fn, states = impl, ([],) * 6
    fn(params, grads, *states, bucket.steps, stats, bucket.handle, [s.index for s in slots], float(lr), lr_tensor,
       grad_scale, found_inf, [float(getattr(h, k)) for k in SCALARS], h.gate, h.warmup_steps, h.maximize,
       h.stochastic_rounding, h.track_stats)
    return stats if h.track_stats else None


def register_norm(name: str, launch_sq: Callable[[BucketStates, BlockMap], Tensor], block: int):
    """(custom op snr_triton::<name>, its eager implementation): the sum of g^2 over a bucket's
    active grads, a 0-dim float64 tensor on the bucket's device (max_grad_norm's norm pass). It
    finds and refreshes the same block map as the step that follows, which then refreshes nothing."""

    def impl(params: list[Tensor], grads: list[Tensor], bucket_handle: int, slots: list[int]) -> Tensor:
        bucket = BucketStates.find(bucket_handle)
        table = block_map(bucket, slots, block)
        addresses, _ = operands(table, table.slots, params, grads)  # grads in their param's layout
        table.refresh(addresses)
        return launch_sq(bucket, table)

    impl.__name__ = f"{name}_impl"
    op = torch.library.custom_op(f"snr_triton::{name}", impl, mutates_args=())
    op.register_fake(lambda params, grads, bucket_handle, slots: grads[0].new_empty((), dtype=torch.float64))
    return op, impl


def call_norm(op: Callable, impl: Callable, bucket: BucketStates, slots: list[Slot], params: list[Tensor],
              grads: list[Tensor]) -> Tensor:
    fn = op if torch.compiler.is_compiling() else impl
    return fn(params, grads, bucket.handle, [s.index for s in slots])
