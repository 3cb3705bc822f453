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

from .flat_state import FlatState, as_real

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024
NUM_WARPS = 4

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


class TritonBucket:
    """Tables and launch for one FlatState; `step` updates the active params of the bucket."""

    def __init__(self, flat: FlatState):
        self.flat = flat
        self._key: tuple | None = None
        self.launches = 0  # for tests and benchmarks: kernel launches issued by this bucket
        self.stats_buf: Tensor | None = None

    def _build(self, indices: list[int], params: list[Tensor], grads: list[Tensor]) -> None:
        flat, rows, block_tensor = self.flat, [], []
        for j, (i, p, g) in enumerate(zip(indices, params, grads)):
            n = flat.numels[i]
            blocks = -(-n // BLOCK)
            rows.append([p.data_ptr(), g.data_ptr(), flat.offsets[i], n, len(block_tensor), i])
            block_tensor.extend([j] * blocks)
        dev = flat.device
        self.meta = torch.tensor(rows, dtype=torch.int64).reshape(-1, 6).to(dev)
        self.block_tensor = torch.tensor(block_tensor, dtype=torch.int32).to(dev)
        self.num_blocks = len(block_tensor)
        self.all_active = indices == list(range(len(flat.params)))
        self.slots = torch.tensor(indices, dtype=torch.int64).to(dev)

    def step(self, params: list[Tensor], grads: list[Tensor], group: dict[str, Any], *,
             grad_scale: Tensor | None, found_inf: Tensor | None, stochastic_rounding: bool,
             track_stats: bool, seed: int) -> Tensor | None:
        """Returns, with track_stats, the device sums (q, above, signal, noise) of this step."""
        flat = self.flat
        indices = [flat.index[p] for p in params]
        real_p = [as_real(p) for p in params]
        real_g = [as_real(g) for g in grads]
        # Tensors the kernel cannot walk linearly get contiguous stand-ins, written back after.
        write_back = []
        for k, (i, p, g) in enumerate(zip(indices, real_p, real_g)):
            if not flat.same_layout[i]:
                real_p[k] = p.contiguous()
                real_g[k] = g.contiguous()
                write_back.append((p, real_p[k]))
            elif g.stride() != p.stride():
                real_g[k] = torch.empty_like(p).copy_(g)
        key = (tuple(indices), tuple(p.data_ptr() for p in real_p), tuple(g.data_ptr() for g in real_g))
        if key != self._key:
            self._build(indices, real_p, real_g)
            self._key = key
        dev = flat.device
        if grad_scale is not None:
            grad_scale = grad_scale.to(dev, non_blocking=True)
        if found_inf is not None:
            found_inf = found_inf.to(dev, non_blocking=True)

        if self.all_active:
            flat.steps.add_(1)
        else:
            flat.steps.index_add_(0, self.slots, torch.ones_like(self.slots, dtype=flat.steps.dtype))
        if self.num_blocks:
            self._launch(group, grad_scale, found_inf, stochastic_rounding, track_stats, seed)
        if found_inf is not None:  # as torch's fused Adam: the step does not count
            flat.steps.index_add_(0, self.slots, found_inf.to(flat.steps.dtype).expand(len(indices)),
                                  alpha=-1)
        for dst, src in write_back:
            dst.copy_(src)
        if not track_stats:
            return None
        if not self.num_blocks:
            return torch.zeros(4, device=dev)
        return self.stats_buf.sum(0)

    def _launch(self, group, grad_scale, found_inf, stochastic_rounding, track_stats, seed) -> None:
        km = kernel_module()
        flat = self.flat
        beta1, beta2 = group["betas"]
        rho = group["rho"]
        lr = group["lr"]
        lr_tensor = None
        if isinstance(lr, Tensor):
            if lr.device == flat.device:
                lr_tensor, lr = lr, 0.0
            else:  # a CPU tensor next to CUDA params: reading it does not synchronize the GPU
                lr = lr.item()
        if track_stats:
            if self.stats_buf is None or self.stats_buf.shape[0] != self.num_blocks:
                self.stats_buf = torch.zeros(self.num_blocks, km.STAT_COLUMNS, device=flat.device)
        dummy = flat.steps
        lb1, lb2, lrho = (_split_f32(_log(b)) for b in (beta1, beta2, rho))
        bufs = flat.buffers
        km.snr_adamw_kernel[(self.num_blocks,)](
            self.meta, self.block_tensor,
            bufs["exp_avg"], bufs["exp_avg_sq"], bufs["exp_grad_var"], flat.steps,
            float(lr), lr_tensor if lr_tensor is not None else dummy,
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            self.stats_buf if track_stats else dummy,
            beta1, 1.0 - beta1, beta2, 1.0 - beta2, rho, 1.0 - rho,
            *lb1, *lb2, *lrho,
            group["eps"], group["weight_decay"], group["alpha"], group["softness"], group["gate_eps"],
            group["warmup_steps"], seed,
            PARAM_DTYPE=_tl_dtype(flat.dtype), GATE=km.GATE_IDS[group["gate"]],
            MAXIMIZE=group["maximize"], LR_IS_TENSOR=lr_tensor is not None,
            HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            STOCHASTIC_ROUNDING=stochastic_rounding and flat.dtype == torch.bfloat16,
            TRACK_STATS=track_stats, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
        self.launches += 1
