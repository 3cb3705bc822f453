"""Host side of the Triton backend: availability, address tables, the launch.

The kernel reads params and grads where they are, through an int64 address
table built once per bucket and rebuilt only when a storage moves (a new grad
after zero_grad(set_to_none=True), `p.data = ...`, a new active set). The host
work per step is one tuple comparison of data pointers, one step-counter
update on the device and one launch per bucket.
"""

from __future__ import annotations

import math
import os
import struct
from typing import Any

import torch
from torch import Tensor

from .flat_state import FlatState, kernel_operands

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024
NUM_WARPS = 4
SEED = 0x5EED  # stochastic rounding: fixed, so runs are reproducible; the step count varies the bits

_kernel_module = None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when the kernel can run on `device`, else what to do about it."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed: `pip install triton` (CUDA builds of torch ship it)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return ("Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 in the "
                "environment before the first step (slow; for tests), or use backend='eager' or 'auto'")
    return f"Triton cannot run on device type {device.type!r}; use backend='eager' or 'auto'"


def kernel_module():
    """Import the kernels lazily: triton.jit reads TRITON_INTERPRET when the module is imported."""
    global _kernel_module
    if _kernel_module is None:
        try:
            from .kernels import snr_adamw
        except ModuleNotFoundError:
            snr_adamw = _load_from_source_tree("snr_adamw")
        _kernel_module = snr_adamw
    return _kernel_module


def _load_from_source_tree(name: str):
    """Installed, the kernels are snr_triton.kernels; in a source checkout imported from its root
    (`python -c ...` there), the package is the folder snr_triton/ and they sit in ../kernels/."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "kernels" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"snr_triton.kernels.{name}", path)
    if spec is None or not path.exists():
        raise ModuleNotFoundError(f"snr_triton.kernels.{name} is missing: reinstall snr-triton")
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

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


class _Tables:
    """Address and block tables of one bucket's active tensors, kept on the flat exp_avg buffer."""

    def __init__(self, key: tuple, params: list[Tensor], grads: list[Tensor], offsets: list[int],
                 slots: list[int], num_slots: int, device: torch.device):
        rows, block_tensor = [], []
        for j, (p, g, off, slot) in enumerate(zip(params, grads, offsets, slots)):
            rows.append([p.data_ptr(), g.data_ptr(), off, p.numel(), len(block_tensor), slot])
            block_tensor.extend([j] * -(-p.numel() // BLOCK))
        self.key = key
        self.meta = torch.tensor(rows, dtype=torch.int64).reshape(-1, 6).to(device)
        self.block_tensor = torch.tensor(block_tensor, dtype=torch.int32).to(device)
        self.num_blocks = len(block_tensor)
        self.all_active = list(slots) == list(range(num_slots))
        self.slots = torch.tensor(slots, dtype=torch.int64).to(device)
        self.stats = None


def fused_step(params: list[Tensor], grads: list[Tensor], exp_avg: Tensor, exp_avg_sq: Tensor,
               exp_grad_var: Tensor, steps: Tensor, stats: Tensor, offsets: list[int],
               slots: list[int], lr: float, lr_tensor: Tensor | None, grad_scale: Tensor | None,
               found_inf: Tensor | None, hyper: list[float], gate: str, warmup_steps: int,
               maximize: bool, stochastic_rounding: bool) -> None:
    """One step of the active params of a bucket: step counters, then one kernel launch.

    `offsets`/`slots` place each param in the flat state buffers and the step buffer;
    `hyper` = [beta1, beta2, rho, eps, weight_decay, alpha, softness, gate_eps]. With a
    non-empty `stats` (shape [4]) the gate statistics of this step are written there.
    """
    dev = steps.device
    real_p, real_g, write_back, key = kernel_operands(params, grads, slots)
    tables = getattr(exp_avg, "_snr_tables", None)
    if tables is None or tables.key != key:
        tables = _Tables(key, real_p, real_g, offsets, slots, steps.numel(), dev)
        exp_avg._snr_tables = tables
    if grad_scale is not None:
        grad_scale = grad_scale.to(dev, non_blocking=True)
    if found_inf is not None:
        found_inf = found_inf.to(dev, non_blocking=True)

    if tables.all_active:
        steps.add_(1)
    else:
        steps.index_add_(0, tables.slots, torch.ones_like(tables.slots, dtype=steps.dtype))
    track_stats = stats.numel() > 0
    if tables.num_blocks:
        if track_stats and (tables.stats is None or tables.stats.shape[0] != tables.num_blocks):
            tables.stats = torch.zeros(tables.num_blocks, kernel_module().STAT_COLUMNS, device=dev)
        _launch(tables, real_p[0].dtype, exp_avg, exp_avg_sq, exp_grad_var, steps, lr, lr_tensor,
                grad_scale, found_inf, hyper, gate, warmup_steps, maximize, stochastic_rounding,
                track_stats)
    if found_inf is not None:  # as torch's fused Adam: the step does not count
        steps.index_add_(0, tables.slots, found_inf.to(steps.dtype).expand(len(slots)), alpha=-1)
    for dst, src in write_back:
        dst.copy_(src)
    if track_stats:
        if tables.num_blocks:
            torch.sum(tables.stats, 0, out=stats)
        else:
            stats.zero_()


def _launch(tables, dtype, exp_avg, exp_avg_sq, exp_grad_var, steps, lr, lr_tensor, grad_scale,
            found_inf, hyper, gate, warmup_steps, maximize, stochastic_rounding, track_stats) -> None:
    km = kernel_module()
    beta1, beta2, rho, eps, weight_decay, alpha, softness, gate_eps = hyper
    lb1, lb2, lrho = (_split_f32(_log(b)) for b in (beta1, beta2, rho))
    dummy = steps
    km.snr_adamw_kernel[(tables.num_blocks,)](
        tables.meta, tables.block_tensor, exp_avg, exp_avg_sq, exp_grad_var, steps,
        lr, lr_tensor if lr_tensor is not None else dummy,
        grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        tables.stats if track_stats else dummy,
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, rho, 1.0 - rho, *lb1, *lb2, *lrho,
        eps, weight_decay, alpha, softness, gate_eps, warmup_steps, SEED,
        PARAM_DTYPE=_tl_dtype(dtype), GATE=km.GATE_IDS[gate], MAXIMIZE=maximize,
        LR_IS_TENSOR=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        STOCHASTIC_ROUNDING=stochastic_rounding and dtype == torch.bfloat16,
        TRACK_STATS=track_stats, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )


# Registered as a custom op so that torch.compile treats the step as one opaque, mutating call
# (no graph break, correct aliasing) instead of tracing into Triton's launcher.
fused_step_op = torch.library.custom_op(
    "snr_triton::fused_step", fused_step,
    mutates_args=("params", "exp_avg", "exp_avg_sq", "exp_grad_var", "steps", "stats"))


def triton_step(flat: FlatState, params: list[Tensor], grads: list[Tensor], group: dict[str, Any], *,
                grad_scale: Tensor | None, found_inf: Tensor | None, stochastic_rounding: bool,
                track_stats: bool) -> Tensor | None:
    """Step the active `params` of a bucket; returns the device sums (q, above, signal, noise)
    of this step with track_stats."""
    slots = [flat.index[p] for p in params]
    offsets = [flat.offsets[i] for i in slots]
    lr, lr_tensor = group["lr"], None
    if isinstance(lr, Tensor):
        if lr.device == flat.device:
            lr_tensor, lr = lr, 0.0
        else:  # a CPU tensor next to CUDA params: reading it does not synchronize the GPU
            lr = lr.item()
    beta1, beta2 = group["betas"]
    hyper = [float(x) for x in (beta1, beta2, group["rho"], group["eps"], group["weight_decay"],
                                group["alpha"], group["softness"], group["gate_eps"])]
    stats = torch.zeros(4 if track_stats else 0, device=flat.device)
    op = fused_step_op if torch.compiler.is_compiling() else fused_step
    op(params, grads, flat.buffers["exp_avg"], flat.buffers["exp_avg_sq"], flat.buffers["exp_grad_var"],
       flat.steps, stats, offsets, slots, float(lr), lr_tensor, grad_scale, found_inf, hyper,
       group["gate"], int(group["warmup_steps"]), bool(group["maximize"]), stochastic_rounding)
    return stats if track_stats else None
