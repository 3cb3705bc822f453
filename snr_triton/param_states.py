"""Each param's optimizer states, and what they were made for.

Every param has state tensors of its own (m, v, s in the group's state dtype, laid out like the
param's memory when the param is dense), and one float32 step counter in its bucket's counter
array. `optimizer.state[p]` holds these very tensors (shown as complex or as a DTensor when the
param is one), so torch-style code, `state_dict()` and `torch.save(opt.state[p])` see ordinary
per-param tensors of the param's size. The fused kernels reach them by address (tables.py), so a
param joining a bucket allocates its own states and copies nothing else.

A `Slot` remembers the layout its states were made for; the optimizer compares every active
param against it before a step (`Slot.fits`), and adopts or refuses what changed in between.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict, defaultdict
from typing import Any

import torch
from torch import Tensor

from . import codebook
from .contract import STATS
from .reference import exp_grad_var_from_adam

STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_grad_var")
SIGNED = (True, False, False)  # which 8-bit code table each state uses (m signed; v, s unsigned)
# 8-bit states (state_dtype=torch.uint8) show under these keys: what is stored, not a decoded copy
CODES, SCALES = "_codes", "_scales"

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


def is_dtensor(t: Tensor) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2, tensor parallel): the update is elementwise, so each
    rank steps its own shard. Plain tensors pass through."""
    return t.to_local() if is_dtensor(t) else t


def as_real(t: Tensor) -> Tensor:
    """The local, real view of a param, grad or state: what the kernels walk."""
    t = local(t)
    return torch.view_as_real(t) if t.is_complex() else t


def real_dtype(t: Tensor) -> torch.dtype:
    return t.real.dtype if t.is_complex() else t.dtype


def like_param(real: Tensor, p: Tensor) -> Tensor:
    """A state shown as the user sees its param: complex again, and a DTensor again with the
    param's mesh and placements (so distributed checkpointing shards states like params).
    bfloat16 states and 8-bit codes of a complex param stay real: torch has no such complex dtype."""
    if p.is_complex() and real.dtype in (torch.float32, torch.float64):
        real = torch.view_as_complex(real)
    if is_dtensor(p):
        shape, stride = p.shape, p.stride()
        if real.dim() == p.dim() + 1:  # the real view of a complex param's shard: (..., 2)
            shape, stride = (*shape, 2), (*(2 * st for st in stride), 1)
        real = _dtensor_class().from_local(real, p.device_mesh, p.placements, run_check=False,
                                           shape=shape, stride=stride)
    return real


def scales_layout(p: Tensor) -> tuple[tuple[int, ...], list]:
    """How a DTensor param's 8-bit scales are shown, so distributed checkpointing can save them.

    Each rank's blocks cover its own local shard (a block never spans two shards), so scales are
    per rank: a tensor with one dim per mesh dim (the mesh dim's size, sharded over it, where the
    param is sharded; 1, replicated, where it is replicated) and a last dim holding the blocks of
    the largest local shard a rank can hold (torch.chunk's split, as FSDP2 and DTensor use); a
    smaller shard leaves the rest of its row zero."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, sizes, placements, split = p.device_mesh, [], [], {}
    for j, placement in enumerate(p.placements):
        if placement.is_shard():
            sizes.append(mesh.size(j))
            placements.append(Shard(j))
            split[placement.dim] = split.get(placement.dim, 1) * mesh.size(j)
        else:
            sizes.append(1)
            placements.append(Replicate())
    largest = 2 if p.is_complex() else 1
    for d, size in enumerate(p.shape):
        largest *= -(-size // split.get(d, 1))
    return (*sizes, codebook.blocks(largest)), placements


def like_scales(held: Tensor, p: Tensor, layout: tuple | None) -> Tensor:
    """A param's 8-bit scales as the user sees them: the 1-D block scales, or for a DTensor param
    its rank's row of the `scales_layout` DTensor."""
    if layout is None:
        return held
    shape, placements = layout
    row = held.view(*(1,) * (len(shape) - 1), shape[-1])
    stride = torch.empty(shape, device="meta").stride()
    return _dtensor_class().from_local(row, p.device_mesh, placements, run_check=False, shape=shape, stride=stride)


def local_scales(scales: Tensor, blocks: int) -> Tensor | None:
    """The scales of a local shard's `blocks` blocks from a checkpoint's scales (1-D, or a DTensor
    laid out by `scales_layout`); None when they do not hold that many."""
    if is_dtensor(scales):
        row = scales.to_local().reshape(-1)
        return row[:blocks] if row.numel() >= blocks else None
    return scales if scales.shape == (blocks,) else None


def in_layout_of(t: Tensor, p: Tensor) -> Tensor:
    """A DTensor state laid out as its DTensor param is now. A param resharded in place
    (`torch.utils.swap_tensors`, as `module.to` does under swap_module_params_on_conversion) or
    a checkpoint of another parallelism keeps its states' old placements; the update is
    elementwise, so redistributing them is exact. A collective: every rank adopts the same states."""
    return t.redistribute(p.device_mesh, p.placements) if resharded(t, p) else t


def resharded(t: Tensor, p: Tensor) -> bool:
    """True when DTensor state t is laid out otherwise than DTensor param p (on the same mesh)."""
    return is_dtensor(t) and is_dtensor(p) and tuple(t.placements) != tuple(p.placements)


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


class _NotesWrites:
    """A dict that calls `_edited()` after every write (set, delete, update, pop, clear), so the step
    checks one flag instead of every key. Mixed in before dict or defaultdict."""

    __slots__ = ()

    def _edited(self) -> None:
        raise NotImplementedError

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._edited()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._edited()

    def __ior__(self, other):
        super().update(other)
        self._edited()
        return self

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._edited()

    def pop(self, *args):
        self._edited()
        return super().pop(*args)

    def popitem(self):
        self._edited()
        return super().popitem()

    def setdefault(self, key, default=None):
        self._edited()
        return super().setdefault(key, default)

    def clear(self):
        super().clear()
        self._edited()


class StateEntry(_NotesWrites, dict):
    """optimizer.state[p] as this package fills it: a plain dict to every reader, which tells its
    slot when it is written (a state replaced, deleted, added). `state_dict()` hands out plain
    dicts; pickled on its own (`torch.save(opt.state[p])`) it is an OrderedDict, which
    `torch.load(weights_only=True)` reads."""

    __slots__ = ("owner",)  # a weak reference to its slot: the slot holds the entry (no cycle)

    def _edited(self) -> None:
        owner = getattr(self, "owner", None)
        slot = owner() if owner is not None else None
        if slot is not None:
            slot.edited = True

    def __reduce__(self):
        return OrderedDict, (), None, None, iter(self.items())


class TrackedState(_NotesWrites, defaultdict):
    """optimizer.state: torch's defaultdict(dict), which notes when it is written (an entry set,
    replaced, deleted, cleared), so a step re-checks which entry belongs to which param only after
    a write, not for every param of every step. Pickles as a plain defaultdict."""

    def __init__(self, items: Any = ()):
        super().__init__(dict, items)
        self.edited = True

    def _edited(self) -> None:
        self.edited = True

    def __reduce__(self):
        return defaultdict, (dict,), None, None, iter(self.items())


class Slot:
    """One param's states and the layout they were made for.

    `real` holds the local real (m, v, s) the kernels walk (with 8-bit states their codes, and
    `scales` the float32 scale of each block of their memory order), `step` the param's view of its
    bucket's step counters; `entry` is the dict in optimizer.state[p]: a step goes ahead only while the entry
    is unedited and the param's layout is the one recorded."""

    # Its bucket and its entry refer back to it weakly: with no reference cycle, a deleted
    # optimizer frees its states at once (as torch's do), not at the next cyclic collection.
    __slots__ = ("param", "_bucket", "handle", "index", "dtype", "device", "device_index", "shape", "stride", "plain",
                 "placements", "real_shape", "real_stride", "dense", "contiguous", "numel", "real", "scales", "held",
                 "layout", "entry", "step", "seed", "stand_in", "edited", "dtensor_class", "__weakref__")

    def __init__(self, param: Tensor, bucket: "BucketStates", index: int, seed: int):
        self.param, self._bucket, self.index, self.seed = param, weakref.ref(bucket), index, seed
        self.handle = bucket.handle
        self.dtype, self.device, self.shape, self.stride = param.dtype, param.device, param.shape, param.stride()
        self.device_index = param.get_device()
        self.plain = not param.is_complex() and not is_dtensor(param)
        self.placements = (param.device_mesh, param.placements) if is_dtensor(param) else None
        self.dtensor_class = _dtensor_class()  # None where torch.distributed is not built
        r = as_real(param)
        self.real_shape, self.real_stride, self.dense, self.numel = r.shape, r.stride(), is_dense(r), r.numel()
        # a plain contiguous param: is_contiguous() (a cached flag) then stands for the stride
        # check; strides of size-1 dims may differ, which the linear walk never sees
        self.contiguous = self.plain and r.is_contiguous()
        self.stand_in: dict[str, Tensor] = {}  # persistent copies for a non-dense param or odd grad
        self.edited = True
        sdt = bucket.state_dtype
        coded = sdt == torch.uint8
        zeros = [codebook.zero_code(signed) if coded else 0 for signed in SIGNED]  # 8-bit: the code of 0
        if self.dense:  # the param's own memory order: one linear index walks param, grad and states
            self.real = tuple(torch.empty_strided(r.shape, r.stride(), dtype=sdt, device=r.device).fill_(z)
                              for z in zeros)
        else:
            self.real = tuple(torch.full(r.shape, z, dtype=sdt, device=r.device) for z in zeros)
        # 8-bit scales: `held` the tensors shown (a DTensor param's padded to `layout`, the same
        # size on every rank), `scales` the views of its blocks that the kernels walk
        self.layout = scales_layout(param) if coded and is_dtensor(param) else None
        blocks = codebook.blocks(self.numel)
        held = self.layout[0][-1] if self.layout else blocks
        if blocks > held:
            raise RuntimeError(f"a local shard of {self.numel} elements is larger than its placements allow "
                               f"({held} blocks): a DTensor layout this package does not know")
        self.held = tuple(torch.zeros(held, dtype=torch.float32, device=r.device)
                          for _ in STATE_KEYS) if coded else None
        self.scales = tuple(t[:blocks] for t in self.held) if coded else None
        self.entry: StateEntry = StateEntry()
        self.step: Tensor | None = None

    @property
    def bucket(self) -> "BucketStates":
        return self._bucket()

    def show(self, entry: Any = None) -> StateEntry:
        """Fill `entry` (refilled in place when it is a StateEntry, so a user's reference to it
        sees the new tensors; else a new one) with this slot's tensors as the user sees them."""
        if not isinstance(entry, StateEntry):
            entry = StateEntry()
        entry.owner = None
        dict.clear(entry)
        dict.__setitem__(entry, "step", self.bucket.step_view(self.index))
        for i, (key, t) in enumerate(zip(STATE_KEYS, self.real)):
            if self.scales is None:
                dict.__setitem__(entry, key, like_param(t, self.param))
            else:
                dict.__setitem__(entry, key + CODES, like_param(t, self.param))
                dict.__setitem__(entry, key + SCALES, like_scales(self.held[i], self.param, self.layout))
        entry.owner = weakref.ref(self)
        self.entry = entry
        self.step = entry["step"]
        self.edited = False
        return entry

    def fits(self, p: Tensor, g: Tensor, entry: Any) -> bool:
        """True when `entry` is this slot's and unedited, and p and g have the layout the states
        were made for (g a DTensor exactly when p is: a plain slot handed a DTensor grad would give
        the kernels the wrapper's address). Cheap: a few attribute reads per param and step."""
        return entry is self.entry and not self.edited and p.dtype is self.dtype and g.dtype is self.dtype \
            and not g.is_sparse and p.shape == self.shape and g.shape == self.shape \
            and (p.is_contiguous() if self.contiguous else p.stride() == self.stride) \
            and p.get_device() == self.device_index \
            and (self.dtensor_class is None or not isinstance(g, self.dtensor_class) if self.placements is None
                 else isinstance(g, self.dtensor_class) and (p.device_mesh, p.placements) == self.placements)

    def adopt(self, old: dict[str, Any], hyper) -> None:
        """Copy existing state (a checkpoint's, a replaced tensor, the states of this param's
        previous slot) into this slot's tensors, on the device: no host read unless a step
        count lives on the host anyway, or an AdamW checkpoint needs its exp_grad_var derived."""
        step = self.bucket.steps[self.index]
        value = old.get("step", 0)
        if isinstance(value, Tensor) and value.device == step.device:
            step.copy_(value.reshape(()))
        else:
            step.fill_(float(value.item() if isinstance(value, Tensor) else value))
        given = {}  # the values of the states given, where they were not copied bit for bit
        for i, key in enumerate(STATE_KEYS):
            if key + CODES in old and key + SCALES in old:  # 8-bit states
                shown = old[key + CODES]
                codes = as_real(shown)
                scales = local_scales(old[key + SCALES], codebook.blocks(codes.numel()))
                other = resharded(shown, self.param)  # its blocks cover other shards: decoded
                if self.scales is not None and not other and codes.stride() == self.real[i].stride():
                    self.real[i].copy_(codes)  # the same blocks: resumed bit for bit
                    self.scales[i].copy_(scales)
                    continue
                given[key] = codebook.decode(codes, scales, SIGNED[i])
                if other:
                    values = _dtensor_class().from_local(given[key], shown.device_mesh, shown.placements,
                                                         run_check=False, shape=shown.shape, stride=shown.stride())
                    given[key] = as_real(in_layout_of(values, self.param))
            elif key in old:
                given[key] = as_real(in_layout_of(old[key], self.param))
            else:
                continue
            self.store(i, given[key])

        def has(key: str) -> bool:
            return key in old or key + CODES in old

        if not has("exp_grad_var") and has("exp_avg") and has("exp_avg_sq"):  # an AdamW checkpoint
            m, v = (given[k] if k in given else self.value(i) for i, k in enumerate(STATE_KEYS[:2]))
            self.store(2, exp_grad_var_from_adam(m, v, float(step.item()), (hyper.beta1, hyper.beta2), hyper.rho))

    def store(self, i: int, value: Tensor) -> None:
        """Write values into state i (encoding them for 8-bit states)."""
        if self.scales is None:
            self.real[i].copy_(value)
            return
        laid_out = torch.empty_like(self.real[i], dtype=torch.float32).copy_(value)  # in the codes' memory order
        codebook.encode(laid_out, SIGNED[i], self.real[i], self.scales[i])

    def value(self, i: int) -> Tensor:
        """State i's values (decoded from 8-bit states; the stored tensor itself otherwise)."""
        if self.scales is None:
            return self.real[i]
        return codebook.decode(self.real[i], self.scales[i], SIGNED[i])


_by_handle: "weakref.WeakValueDictionary[int, BucketStates]" = weakref.WeakValueDictionary()
MAPS_KEPT = 8  # block maps per bucket: active sets that alternate (MoE experts, frozen layers)


class BucketStates:
    """The slots of one bucket (the params of one group on one device with one real dtype and
    one state dtype), their step counters, and what backends derive from them (block maps per
    active set, stats buffers)."""

    def __init__(self, group: dict[str, Any], device: torch.device, dtype: torch.dtype,
                 state_dtype: torch.dtype):
        self.group, self.device, self.dtype, self.requested = group, device, dtype, state_dtype
        # float64 params keep float64 states, unless 8-bit states were asked for
        self.state_dtype = torch.float64 if dtype == torch.float64 and state_dtype != torch.uint8 else state_dtype
        self.steps = torch.zeros(16, dtype=torch.float32, device=device)
        self.slots: list[Slot | None] = []  # by index; an index is never reused, so block-map keys stay unique
        self.maps: OrderedDict[tuple, Any] = OrderedDict()
        self.stats: dict[tuple, Tensor] = {}
        self.checked: set[tuple] = set()  # active sets known to list no param twice
        self.handle = id(self)
        _by_handle[self.handle] = self

    @staticmethod
    def find(handle: int) -> "BucketStates":
        """The bucket with this handle: how a custom op, which takes only tensors and scalars, finds it."""
        return _by_handle[handle]

    def step_view(self, index: int) -> Tensor:
        return self.steps[index]

    def new_slot(self, param: Tensor, seed: int) -> Slot:
        """A slot with zeroed states for `param`; grows the step counters without a host read."""
        index = len(self.slots)
        if index >= self.steps.numel():
            grown = torch.zeros(2 * self.steps.numel(), dtype=torch.float32, device=self.device)
            grown[:index].copy_(self.steps[:index])
            self.steps = grown
            for slot in self.slots:  # the entries show views of the new counters
                if slot is not None and not slot.edited:
                    slot.show(slot.entry)
        slot = Slot(param, self, index, seed)
        self.slots.append(slot)
        self.steps[index].zero_()
        return slot

    def release(self, slot: Slot) -> None:
        """`slot` no longer steps here (its param moved or was reset): forget its maps."""
        if self.slots[slot.index] is slot:
            self.slots[slot.index] = None
            for key in [k for k in self.maps if slot.index in k]:
                del self.maps[key]

    def live(self) -> bool:
        return any(s is not None for s in self.slots)

    def stats_buffer(self, rows: int, dtype: torch.dtype) -> Tensor:
        """The [rows, len(STATS)] buffer a backend writes a step's per-param gate sums into: kept
        with the bucket, so a step allocates nothing."""
        key = (rows, dtype)
        buf = self.stats.get(key)
        if buf is None:
            if len(self.stats) >= MAPS_KEPT:
                self.stats.clear()
            buf = self.stats[key] = torch.zeros(rows, len(STATS), dtype=dtype, device=self.device)
        return buf
