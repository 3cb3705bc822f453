"""Optimizer states of one bucket in one contiguous buffer per state.

A bucket is the params of one param group on one device with one (real) dtype.
``optimizer.state[p]`` holds views into the buffers, so state_dict() and
torch-style code keep working, while the kernels reach every state through a
base pointer and an offset.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from .contract import ALIGN, STATS
from .reference import exp_grad_var_from_adam

STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_grad_var")


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2, tensor parallel): the update is elementwise, so each
    rank steps its own shard. Plain tensors pass through."""
    return t.to_local() if _is_dtensor(t) else t


_dtensor: list = []  # [DTensor or None], filled on first use: importing it costs ~0.1 s


def _dtensor_class() -> type | None:
    # a plain global, not functools.cache: torch.compile traces this on every step
    if not _dtensor:
        if torch.distributed.is_available():
            from torch.distributed.tensor import DTensor

            _dtensor.append(DTensor)
        else:
            _dtensor.append(None)
    return _dtensor[0]


def _is_dtensor(t: Tensor) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def as_real(t: Tensor) -> Tensor:
    """The local, real view of a param, grad or state: what the kernels walk."""
    t = local(t)
    return torch.view_as_real(t) if t.is_complex() else t


def _like_param(view: Tensor, p: Tensor) -> Tensor:
    """A state view shaped as the user sees its param: complex again, and a DTensor again with the
    param's mesh and placements (so distributed checkpointing shards states like params).
    bfloat16 states of a complex param stay real views: torch has no bfloat16 complex dtype."""
    if p.is_complex() and view.dtype != torch.bfloat16:
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


SEED = 0x5EED


def rng_seed(param_id: int) -> int:
    """Stochastic rounding's random stream of one param: fixed per param (its index in the
    optimizer, as in state_dict), so runs and resumed runs round alike while no two params share
    bits. The step count varies them from step to step."""
    return (SEED ^ (param_id * 0x9E3779B97F4A7C15)) & 0x7FFFFFFFFFFFFFFF


_by_handle: "weakref.WeakValueDictionary[int, FlatState]" = weakref.WeakValueDictionary()


class FlatState:
    """The states of one bucket; `params` fixes the order of segments.

    Packing copies whatever state a param already has into the new buffers (cast to
    `state_dtype`), so a bucket can be rebuilt at any time: a checkpoint, an AdamW checkpoint,
    a changed state_dtype, a param moved to another device or dtype. Nothing in `state` changes
    until every view is built. `tables` caches what a backend derives from the bucket (address
    tables, keyed by the backend's name; stats buffers, by shape and dtype).
    """

    def __init__(self, params: list[Tensor], ids: list[int], state: dict, hyper, device: torch.device,
                 dtype: torch.dtype):
        self.params = list(params)
        self.index = {p: i for i, p in enumerate(self.params)}
        self.seeds = [rng_seed(i) for i in ids]
        self.device, self.dtype = device, dtype
        self.state_dtype = hyper.state_dtype if dtype != torch.float64 else torch.float64
        self.tables: dict[str, Any] = {}
        real = [as_real(p) for p in self.params]
        self.offsets: list[int] = []
        self.numels: list[int] = []
        total = 0
        for r in real:
            self.offsets.append(total)
            self.numels.append(r.numel())
            total += -(-r.numel() // ALIGN) * ALIGN
        self.buffers = {k: torch.zeros(total, dtype=self.state_dtype, device=device) for k in STATE_KEYS}
        self.steps = torch.zeros(len(self.params), dtype=torch.float32, device=device)
        self.views: list[dict[str, Tensor]] = []
        entries = {}
        for i, (p, r) in enumerate(zip(self.params, real)):
            # A dense param's states share its memory order, so the kernel walks param, grad and
            # states with one linear index; others get contiguous states (and stand-ins there).
            dense = is_dense(r)
            views = {}
            for key in STATE_KEYS:
                buf = self.buffers[key]
                if dense:
                    views[key] = buf.as_strided(r.shape, r.stride(), self.offsets[i])
                else:
                    views[key] = buf[self.offsets[i]:self.offsets[i] + r.numel()].view(r.shape)
            self._adopt(state.get(p, {}), views, self.steps[i], hyper)
            self.views.append(views)
            entries[p] = {"step": self.steps[i], **{k: _like_param(v, p) for k, v in views.items()}}
        state.update(entries)
        self.entries = [entries[p] for p in self.params]
        self.handle = id(self)
        _by_handle[self.handle] = self

    @staticmethod
    def find(handle: int) -> "FlatState":
        """The bucket with this handle: how a custom op, which takes only tensors and scalars, finds it."""
        return _by_handle[handle]

    @staticmethod
    def _adopt(old: dict, views: dict, step: Tensor, hyper) -> None:
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
                as_real(old["exp_avg"]), as_real(old["exp_avg_sq"]), float(step.item()),
                (hyper.beta1, hyper.beta2), hyper.rho))

    def serves(self, params: list[Tensor], state: dict, state_dtype: torch.dtype) -> bool:
        """True when every param in `params` has its states here (not replaced since, e.g. by a
        rebuilt bucket elsewhere) and the group still asks for this state dtype."""
        if state_dtype != self.state_dtype and self.dtype != torch.float64:
            return False
        index, entries = self.index, self.entries
        for p in params:
            i = index.get(p)
            if i is None or state.get(p) is not entries[i]:
                return False
        return True

    def stats_buffer(self, rows: int, dtype: torch.dtype) -> Tensor:
        """The [rows, len(STATS)] buffer a backend writes a step's per-param gate sums into: kept
        with the bucket, so a step allocates nothing."""
        key = ("stats", rows, dtype)
        buf = self.tables.get(key)
        if buf is None:
            buf = self.tables[key] = torch.zeros(rows, len(STATS), dtype=dtype, device=self.device)
        return buf

    def real_views(self, params: list[Tensor]) -> tuple[list[Tensor], ...]:
        """(exp_avg, exp_avg_sq, exp_grad_var, step) views of `params`, in order, for the eager path."""
        slots = [self.index[p] for p in params]
        return tuple([self.views[i][k] for i in slots] for k in STATE_KEYS) + ([self.steps[i] for i in slots],)
