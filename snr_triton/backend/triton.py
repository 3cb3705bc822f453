"""The Triton backend: one fused launch per bucket (kernels/snr_adamw.py), on a GPU or, for
tests, under Triton's interpreter on the CPU.

Host work per step: the param and grad addresses compared with the last step's (refreshed by
one non-blocking copy from pinned memory when they moved, snr_triton/tables.py), the step
counters bumped on the device, one launch. Nothing is read back from the device, so the step
is CUDA-graph capturable with a tensor lr.
"""

from __future__ import annotations

import math
import os
import struct

import torch
from torch import Tensor

from .. import clipping, codebook, fused_op
from ..contract import TRITON_STATE_DTYPES, GATE_IDS, TRITON_DTYPES
from ..hyperparams import Hyper
from ..param_states import BucketStates, Slot
from . import Degraded, kernel_file

BLOCK = 1024
NUM_WARPS = 4
AUTO_DEVICE_TYPES = ("cuda",)  # interpreted on a CPU: only when asked for by name

_kernel_module = None


def unavailable_reason(device: torch.device, dtype: torch.dtype, hyper: Hyper) -> str | None:
    if device.type not in ("cuda", "cpu"):
        return f"Triton cannot run on device type {device.type!r}; use backend='eager' or 'auto'"
    try:
        import triton  # noqa: F401
    except ImportError:
        reason = "Triton is not installed: `pip install triton` (CUDA builds of torch ship it)"
        return Degraded(reason) if device.type == "cuda" and dtype in TRITON_DTYPES else reason
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 in the "
                "environment before the first step (slow; for tests), or use backend='eager' or 'auto'")
    if dtype not in TRITON_DTYPES:
        return (f"the kernel supports {', '.join(map(str, TRITON_DTYPES))} params; "
                f"use backend='eager' or 'auto' for {dtype}")
    if hyper.state_dtype not in TRITON_STATE_DTYPES:
        return f"the kernel stores no {hyper.state_dtype} states; use backend='eager' or 'auto'"
    return None


def kernel_module():
    """Import the kernels lazily: triton.jit reads TRITON_INTERPRET when the module is imported."""
    global _kernel_module
    if _kernel_module is None:
        try:
            from ..kernels import snr_adamw
        except ModuleNotFoundError:
            snr_adamw = _load_from_source_tree("snr_adamw")
        _kernel_module = snr_adamw
    return _kernel_module


def _load_from_source_tree(name: str):
    """Installed, the kernels are snr_triton.kernels; in a source checkout imported from its root
    (`python -c ...` there), the package is the folder snr_triton/ and they sit in ../kernels/."""
    import importlib.util
    import sys

    try:
        path = kernel_file(f"{name}.py")
    except FileNotFoundError as e:
        raise ModuleNotFoundError(str(e)) from None
    spec = importlib.util.spec_from_file_location(f"snr_triton.kernels.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _split_f32(x: float) -> tuple[float, float]:
    """x as hi + lo, both float32, so a float64 survives the kernel's float32 scalar arguments."""
    if math.isinf(x):
        return x, 0.0
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
            torch.uint8: tl.uint8}[dtype]


def launch(job: fused_op.Launch) -> None:
    """Step counters, then one kernel launch over the job's block map; with track_stats, this
    step's gate sums per param into `job.stats` (shape [active params, len(STATS)])."""
    table, steps = job.table, job.steps
    dev = steps.device
    grad_scale = job.grad_scale.to(dev, non_blocking=True) if job.grad_scale is not None else None
    found_inf = job.found_inf.to(dev, non_blocking=True) if job.found_inf is not None else None
    table.count_step(steps, found_inf)  # the kernel reads the new step (a no-op step reads the old)
    partials = table.partial_sums(torch.float32) if job.track_stats else None
    if table.num_blocks:
        lb1, lb2, lrho = (_split_f32(_log(b)) for b in (job.beta1, job.beta2, job.rho))
        dummy = steps
        coded = job.bucket.state_dtype == torch.uint8
        tables = codebook.kernel_buffer(dev) if coded else None
        kernel_module().snr_adamw_kernel[(table.num_blocks,)](
            table.rows, table.block_tensor, steps,
            job.lr, job.lr_tensor if job.lr_tensor is not None else dummy,
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            partials if partials is not None else dummy,
            job.beta1, 1.0 - job.beta1, job.beta2, 1.0 - job.beta2, job.rho, 1.0 - job.rho, *lb1, *lb2, *lrho,
            job.eps, job.weight_decay, job.alpha, job.softness, job.gate_eps, job.warmup_steps,
            tables.view(torch.float32) if coded else dummy, tables[512:] if coded else dummy,  # values, lookups
            PARAM_DTYPE=_tl_dtype(job.bucket.dtype), STATE_DTYPE=_tl_dtype(job.bucket.state_dtype),
            GATE=GATE_IDS[job.gate], MAXIMIZE=job.maximize,
            LR_IS_TENSOR=job.lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            STOCHASTIC_ROUNDING=job.stochastic_rounding and job.bucket.dtype == torch.bfloat16,
            TRACK_STATS=job.track_stats, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
    if job.track_stats:  # the per-block partial sums, added per tensor on the device
        job.stats.zero_()
        if table.num_blocks:
            job.stats.index_add_(0, table.block_tensor, partials)


fused_step_op, fused_step = fused_op.register("triton_step", launch, BLOCK)


def step(bucket: BucketStates, slots: list[Slot], params: list[Tensor], grads: list[Tensor], hyper: Hyper, *,
         grad_scale: Tensor | None, found_inf: Tensor | None) -> Tensor | None:
    return fused_op.call(fused_step_op, fused_step, bucket, slots, params, grads, hyper, grad_scale, found_inf,
                         torch.float32)


def _launch_sq(bucket: BucketStates, table) -> Tensor:
    partials = torch.empty(table.num_blocks, dtype=torch.float64, device=bucket.device)
    if table.num_blocks:
        kernel_module().grad_sq_kernel[(table.num_blocks,)](table.rows, table.block_tensor, partials,
                                                           PARAM_DTYPE=_tl_dtype(bucket.dtype), BLOCK=BLOCK,
                                                           num_warps=NUM_WARPS)
    return partials.sum()


grad_sq_op, grad_sq = fused_op.register_norm("triton_grad_sq", _launch_sq, BLOCK)


def _launch_clip(total: Tensor, grad_scale: Tensor | None, found_inf: Tensor | None, skipped: Tensor | None,
                 max_norm: float) -> clipping.Coefficients:
    out = [total.new_empty((), dtype=torch.float32) for _ in range(3)] + [total.new_empty((), dtype=torch.float64)]
    kernel_module().clip_coefficients_kernel[(1,)](
        total, grad_scale if grad_scale is not None else total, found_inf if found_inf is not None else total,
        skipped if skipped is not None else total, *out, float(max_norm), HAS_SCALE=grad_scale is not None,
        HAS_FOUND=found_inf is not None, HAS_SKIPPED=skipped is not None, num_warps=1)
    return tuple(out)


clip_op, clip = clipping.register("triton_clip_coefficients", _launch_clip)


def grad_sq_sum(bucket: BucketStates, slots: list[Slot], params: list[Tensor], grads: list[Tensor]) -> Tensor:
    """Sum of g^2 over the active grads (float64, on the device): one read of each grad."""
    return fused_op.call_norm(grad_sq_op, grad_sq, bucket, slots, params, grads)


def clip_coefficients(total: Tensor, grad_scale: Tensor | None, found_inf: Tensor | None, skipped: Tensor | None,
                      max_norm: float) -> clipping.Coefficients:
    """max_grad_norm's coefficient in one launch (snr_triton/clipping.py)."""
    return clipping.call(clip_op, clip, total, grad_scale, found_inf, skipped, max_norm)
