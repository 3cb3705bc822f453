"""Optimizer states of one bucket in one contiguous buffer per state.

A bucket is the params of one param group on one device with one (real) dtype.
``optimizer.state[p]`` holds views into the buffers, so state_dict() and
torch-style code keep working, while the kernel reaches every state through a
base pointer and an offset. Packing copies whatever state a param already has
(from a checkpoint, an AdamW checkpoint, or an older bucket), so buckets can be
rebuilt at any time without losing anything.
"""

from __future__ import annotations

import functools
from typing import Iterable

import torch
from torch import Tensor

STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_grad_var")
_ALIGN = 16  # elements: every segment starts on a 64-byte boundary (fp32) for vector loads


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2, tensor parallel): the update is elementwise, so each
    rank steps its own shard. Plain tensors pass through."""
    return t.to_local() if _is_dtensor(t) else t


@functools.cache
def _dtensor_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _is_dtensor(t: Tensor) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def as_real(t: Tensor) -> Tensor:
    """The local, real view of a param, grad or state: what the kernels walk."""
    t = local(t)
    return torch.view_as_real(t) if t.is_complex() else t


def _like_param(view: Tensor, p: Tensor) -> Tensor:
    """A state view shaped as the user sees its param: complex again, and a DTensor again with the
    param's mesh and placements (so distributed checkpointing shards states like params)."""
    if p.is_complex():
        view = torch.view_as_complex(view)
    if _is_dtensor(p):
        view = _dtensor_class().from_local(view, p.device_mesh, p.placements, run_check=False,
                                           shape=p.shape, stride=p.stride())
    return view


def is_dense(t: Tensor) -> bool:
    """True when the elements fill exactly numel slots of memory from data_ptr on (any order)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def exp_grad_var_from_adam(exp_avg: Tensor, exp_avg_sq: Tensor, step: float,
                           betas: tuple[float, float], rho: float) -> Tensor:
    """ALGORITHM.md: an AdamW checkpoint has no s; start from s-hat = max(v-hat - m-hat^2, 0)."""
    if step == 0:
        return torch.zeros_like(as_real(exp_avg_sq))
    beta1, beta2 = betas
    m, v = as_real(exp_avg).double(), as_real(exp_avg_sq).double()
    shat = torch.clamp(v / (1 - beta2**step) - (m / (1 - beta1**step)) ** 2, min=0.0)
    return shat * (1 - rho**step)  # local and real, as the flat buffers


def kernel_operands(params: list[Tensor], grads: list[Tensor], slots: list[int]):
    """What a fused kernel walks: local real views of params and grads, one linear index each.

    A param that is not dense gets a contiguous stand-in (copied back by the caller through
    `write_back` after the step); a grad with other strides than its param gets a copy in the
    param's layout. `key` identifies the storages, so address tables are rebuilt only when one
    moves (a new grad after zero_grad(set_to_none=True), `p.data = ...`, another active set).
    """
    real_p = [as_real(p) for p in params]
    real_g = [as_real(g) for g in grads]
    write_back = []
    for k, (p, g) in enumerate(zip(real_p, real_g)):
        if not is_dense(p):
            real_p[k], real_g[k] = p.contiguous(), g.contiguous()
            write_back.append((p, real_p[k]))
        elif g.stride() != p.stride():
            real_g[k] = torch.empty_like(p).copy_(g)
    key = (tuple(slots), tuple(p.data_ptr() for p in real_p), tuple(g.data_ptr() for g in real_g))
    return real_p, real_g, write_back, key


class FlatState:
    """The states of one bucket; `params` fixes the order of segments."""

    def __init__(self, params: list[Tensor], state: dict, group: dict, state_dtype: torch.dtype):
        self.params = list(params)
        self.index = {p: i for i, p in enumerate(self.params)}
        real = [as_real(p) for p in self.params]
        self.device = real[0].device
        self.dtype = real[0].dtype
        store_dtype = state_dtype if self.dtype != torch.float64 else torch.float64
        self.offsets: list[int] = []
        self.numels: list[int] = []
        total = 0
        for r in real:
            self.offsets.append(total)
            self.numels.append(r.numel())
            total += -(-r.numel() // _ALIGN) * _ALIGN
        self.buffers = {k: torch.zeros(total, dtype=store_dtype, device=self.device) for k in STATE_KEYS}
        self.steps = torch.zeros(len(self.params), dtype=torch.float32, device=self.device)
        for i, (p, r) in enumerate(zip(self.params, real)):
            # A dense param's states share its memory order, so the kernel walks param, grad and
            # states with one linear index; others get contiguous states (and stand-ins there).
            dense = is_dense(r)
            old = state.get(p, {})
            views = {}
            for key in STATE_KEYS:
                buf = self.buffers[key]
                if dense:
                    views[key] = buf.as_strided(r.shape, r.stride(), self.offsets[i])
                else:
                    views[key] = buf[self.offsets[i]:self.offsets[i] + r.numel()].view(r.shape)
            self._adopt(old, views, self.steps[i], group)
            state[p] = {"step": self.steps[i], **{k: _like_param(v, p) for k, v in views.items()}}

    @staticmethod
    def _adopt(old: dict, views: dict, step: Tensor, group: dict) -> None:
        """Copy existing state into the flat (local, real) views; fill a missing exp_grad_var
        (an AdamW checkpoint)."""
        if not old:
            return
        if "step" in old:
            value = old["step"]
            step.fill_(float(value.item() if isinstance(value, Tensor) else value))
        for key in STATE_KEYS:
            if key in old:
                views[key].copy_(as_real(old[key]))
        if "exp_grad_var" not in old and "exp_avg" in old and "exp_avg_sq" in old:
            views["exp_grad_var"].copy_(exp_grad_var_from_adam(
                old["exp_avg"], old["exp_avg_sq"], float(step.item()), group["betas"], group["rho"]))

    def covers(self, params: Iterable[Tensor]) -> bool:
        return all(p in self.index for p in params)

    def views(self, params: list[Tensor], state: dict) -> tuple[list[Tensor], ...]:
        """Real views of the states of `params`, in order, for the eager path."""
        sts = [state[p] for p in params]
        return tuple([as_real(st[k]) for st in sts] for k in STATE_KEYS) + ([st["step"] for st in sts],)
