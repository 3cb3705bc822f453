"""SNRAdamW: AdamW whose every coordinate is gated by its signal-to-noise ratio.

A drop-in `torch.optim.Optimizer`. The math is ALGORITHM.md; this module keeps torch.optim's
contracts (param groups, state_dict and its hooks, GradScaler, AdamW checkpoints), owns each
param's states (param_states.py), and runs a step in two parts: plan (validate every group,
check every active param against what its states were made for, bucket the params, choose a
backend for each bucket, all before anything changes) and run (one call of the backend
interface per bucket, snr_triton/backend/__init__.py).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from copy import deepcopy
from dataclasses import dataclass
from itertools import chain
from types import ModuleType
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backend, codebook
from .contract import STATS
from .hyperparams import (DEFAULTS, RUNTIME_DEFAULTS, Hyper, StepHypers, check_betas_kinds, validate_group,
                          validate_runtime)
from .param_states import (CODES, MAPS_KEPT, SCALES, STATE_KEYS, BucketStates, Slot, StateEntry, TrackedState, as_real,
                           is_dense, is_dtensor, like_param, local, local_scales, real_dtype, resharded, rng_seed,
                           scales_layout)
from .warn import warn_user

# Keys of torch.optim.AdamW groups that have no meaning here.
ADAMW_ONLY_KEYS = ("amsgrad", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")
STAT_KEYS = ("mean_gate", "frac_above", "signal", "noise")


@dataclass
class Work:
    """The active params of one bucket this step, with their slots and local real views."""

    group_index: int
    hyper: Hyper
    bucket: BucketStates
    slots: list[Slot]
    params: list[Tensor]  # the params as the user holds them
    real_params: list[Tensor] | None  # what the kernels walk (local, real); None: `params` themselves
    real_grads: list[Tensor]

    def add(self, slot: Slot, p: Tensor, real_p: Tensor, real_g: Tensor) -> None:
        self.slots.append(slot)
        self.params.append(p)
        if real_p is not p and self.real_params is None:
            self.real_params = self.params[:-1]
        if self.real_params is not None:
            self.real_params.append(real_p)
        self.real_grads.append(real_g)
    backend: ModuleType | None = None


@dataclass
class _Repair:
    """A param whose states must be (re)made before this step: new, reset, replaced, moved."""

    group_index: int
    param_index: int
    param: Tensor
    device: torch.device
    dtype: torch.dtype
    source: dict[str, Any]  # the state to adopt (empty: fresh)
    entry: Any  # the dict the user sees in optimizer.state[p], refilled in place
    old: Slot | None
    hyper: Hyper  # the group's, frozen once per step
    real_grad: Tensor | None = None  # the local real grad (a DTensor's redistributed once), for the step
    reuse: bool = False  # the old slot still fits: only its place in the group changed


class SNRAdamW(Optimizer):
    """AdamW with the SNR gate of Litman & Guo (2026); see ALGORITHM.md and README for the hyperparameters.

    `params, lr, betas, eps, weight_decay` are positional as in torch.optim.AdamW; the rest keyword-only.
    backend: "auto" (the first available of snr_triton.backend.ORDER: Triton for CUDA tensors,
        the fused C kernel for CPU tensors, eager for what neither serves), "triton", "cpu", "eager".
    state_dtype: torch.float32 (default) or torch.bfloat16 to cut state bytes (every backend).
    stochastic_rounding: round bf16 params stochastically when storing them.
    track_stats: keep the gate statistics of the last step for `stats()`.
    max_grad_norm: clip the global grad norm to this inside the step, as
        `torch.nn.utils.clip_grad_norm_` would before it, without modifying the grads; a
        non-finite norm skips the step (ALGORITHM.md, "Gradient clipping in the step").
    """

    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] | tuple[Tensor, Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, rho: float = 0.99, gate: str = "snr", alpha: float = 1.0,
                 softness: float = 1.0, gate_eps: float = 1e-16, warmup_steps: int = 0, maximize: bool = False,
                 backend: str = "auto", state_dtype: torch.dtype = torch.float32,
                 stochastic_rounding: bool = False, track_stats: bool = False, max_grad_norm: float | None = None):
        defaults = dict(lr=lr, betas=betas, rho=rho, eps=eps, weight_decay=weight_decay, gate=gate,
                        alpha=alpha, softness=softness, gate_eps=gate_eps, warmup_steps=warmup_steps,
                        maximize=maximize, backend=backend, state_dtype=state_dtype,
                        stochastic_rounding=stochastic_rounding, track_stats=track_stats)
        check_betas_kinds(betas)
        self._hyper(defaults)
        _check_max_grad_norm(max_grad_norm)
        if max_grad_norm is not None and _built_by_zero_redundancy_optimizer():
            raise ValueError("max_grad_norm: ZeroRedundancyOptimizer gives each rank's SNRAdamW only its shard of the "
                             "params, so the norm would be the shard's; leave max_grad_norm=None and clip with "
                             "torch.nn.utils.clip_grad_norm_(model.parameters(), c) before opt.step()")
        self._reset_caches()
        super().__init__(params, defaults)
        if max_grad_norm is not None:
            _check_not_sharded_by_fsdp1([p for group in self.param_groups for p in group["params"]])
        self.state = TrackedState(self.state)
        # the whole optimizer's, not a group's: one norm over every group (kept in defaults, which
        # pickling and deepcopy keep, and taken out of each group)
        self.defaults["max_grad_norm"] = max_grad_norm

    # ----------------------------------------------------------------- groups
    @staticmethod
    def _hyper(group: dict[str, Any], where: str = "", *, read_tensors: bool = True) -> Hyper:
        """Validate a group (ValueError naming the argument and the valid choices) and freeze it."""
        try:
            validate_group(group, read_tensors=read_tensors)
            validate_runtime(group)
            return Hyper.of(group)
        except ValueError as e:
            raise ValueError(f"{e}{where}") from None

    def _step_hyper(self, gi: int, group: dict[str, Any]) -> Hyper:
        """A step's Hyper of group gi: validated as `_hyper` does without reading tensors, but only its lr
        where its other settings are what they were at the last step (`StepHypers`)."""
        if torch.compiler.is_compiling():  # the full check, as before the record existed
            return self._hyper(group, f" (param group {gi})", read_tensors=False)
        try:
            return self._step_hypers.of(gi, group)
        except ValueError as e:
            raise ValueError(f"{e} (param group {gi})") from None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Check a merged copy first: a rejected group must not be half-added.
        if "max_grad_norm" in param_group:
            raise ValueError("max_grad_norm is the whole optimizer's (one norm over every group): pass it to "
                             f"SNRAdamW(..., max_grad_norm=...), not in param group {len(self.param_groups)}")
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        where = f" (param group {len(self.param_groups)})"
        hyper = self._hyper(merged, where)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        seen: dict[int, int] = {}
        tensors: list[Tensor] = []
        for i, p in enumerate(params):
            name, p = (p[0], p[1]) if isinstance(p, tuple) else (None, p)  # named parameters: (name, tensor)
            if not isinstance(p, Tensor):
                continue
            if id(p) in seen:
                named = f" ({name!r})" if name is not None else ""
                raise ValueError(f"param {i}{named} of param group {len(self.param_groups)} is the same tensor as "
                                 f"param {seen[id(p)]} of that group: each param may appear once (it would be "
                                 "stepped twice)")
            seen[id(p)] = i
            tensors.append(p)
            self._choose(merged["backend"], p.device, real_dtype(p), hyper, where)
        if self.defaults.get("max_grad_norm") is not None:  # set after the constructor's groups
            _check_not_sharded_by_fsdp1(tensors)
        super().add_param_group({**param_group, "params": params})
        self.param_groups[-1].pop("max_grad_norm", None)

    @staticmethod
    def _choose(name: str, device: torch.device, dtype: torch.dtype, hyper: Hyper, where: str):
        try:
            return backend.choose(name, device, dtype, hyper)
        except RuntimeError as e:
            raise RuntimeError(f"{e}{where}") from None

    def backend_of(self, param: Tensor) -> str:
        """Which backend steps `param`: "triton", "cpu" or "eager"."""
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return backend.choose(group["backend"], param.device, real_dtype(param), Hyper.of(group))[0]
        raise KeyError("param is not in this optimizer")

    # ----------------------------------------------------------------- state
    def _reset_caches(self) -> None:
        self._slots: dict[Tensor, Slot] = {}  # every param's slot: the slow path's
        # [group, [slot of each of its params or None]] by group index: the step's cheap path finds
        # slots by position, never through a dict keyed by tensors (torch.compile would guard on
        # the grads of its keys, and recompile whenever zero_grad() frees one)
        self._group_slots: list[list] = []
        self._buckets: dict[tuple, BucketStates] = {}
        self._step_hypers = StepHypers()
        # The last step's gate statistics: "stats" holds (group index, params, numels, device sums per
        # param). step() only mutates this dict, never assigns an attribute of the optimizer: dynamo
        # in torch 2.11 fails on attribute assignment to an optimizer (pytorch/pytorch#171590).
        self._last: dict[str, Any] = {"stats": [], "found_inf": None, "grad_norm": None, "skipped": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.state = TrackedState(self.state)
        for group in self.param_groups:  # groups saved by an older version: our keys only
            for key, value in self._own_defaults().items():
                group.setdefault(key, value)
        self._reset_caches()

    def _own_defaults(self) -> dict[str, Any]:
        """This optimizer's defaults for its own keys (torch adds others, e.g. `differentiable`)."""
        return {k: self.defaults.get(k, v) for k, v in {**DEFAULTS, **RUNTIME_DEFAULTS}.items()}

    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict, each param's state a plain dict (as torch.optim.AdamW's)."""
        saved = super().state_dict()
        saved["state"] = {k: dict(v) if isinstance(v, StateEntry) else v for k, v in saved["state"].items()}
        skipped = self._last["skipped"]
        if skipped is not None:  # stats()'s count of skipped steps, so a resumed run counts on
            saved["skipped_steps"] = int(skipped.item())
        return saved

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ours or a torch.optim.AdamW state dict (its exp_grad_var is derived, ALGORITHM.md).

        In torch's order: the pre-hooks (which may repair the checkpoint), then the checks and the
        loading, then the post-hooks, which see the final state (tensors of the param's shape).
        States keep their values exactly: they are stored in this optimizer's `state_dtype` (a bf16
        checkpoint into fp32 states is exact; fp32 into bf16 rounds to nearest), never cast to the
        param's dtype. Everything is checked before anything changes.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = []
        saved_groups = deepcopy(state_dict["param_groups"])
        for i, saved in enumerate(saved_groups):
            group = {k: v for k, v in saved.items() if k not in ADAMW_ONLY_KEYS}
            if saved.get("amsgrad"):
                warn_user("loading an AdamW state dict with amsgrad=True: SNRAdamW has no amsgrad; "
                          "max_exp_avg_sq is ignored")
            for key, value in self._own_defaults().items():
                group.setdefault(key, value)
            if i < len(self.param_groups):  # how to run stays this optimizer's choice
                group.update({k: self.param_groups[i][k] for k in RUNTIME_DEFAULTS})
            self._hyper(group, f" (param group {i} of the state dict)")
            groups.append(group)
        self._check_saved_states(state_dict)
        id_map = dict(zip(chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        state: defaultdict[Any, dict] = defaultdict(dict)
        for k, v in state_dict["state"].items():
            state[id_map.get(k, k)] = dict(v) if k in id_map else v
        for old, new in zip(self.param_groups, groups):
            new["params"] = old["params"]
            if "param_names" in old and "param_names" not in new:
                new["param_names"] = old["param_names"]
        self.__setstate__({"state": state, "param_groups": groups})
        if state_dict.get("skipped_steps"):
            self._last["skipped"] = torch.tensor(float(state_dict["skipped_steps"]), dtype=torch.float64)
        # Make every param's states now, so state (an AdamW checkpoint's exp_grad_var included) is final.
        repairs = []
        for gi, group in enumerate(self.param_groups):
            hyper = Hyper.of(group)
            for i, p in enumerate(group["params"]):
                if self.state.get(p):
                    repairs.append(_Repair(gi, i, p, local(p).device, real_dtype(p), dict(self.state[p]),
                                           self.state[p], None, hyper))
        self._apply(repairs)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_saved_states(self, state_dict: dict[str, Any]) -> None:
        """Shapes and keys of a checkpoint's states against this optimizer's params."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}")
        params = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {gi} of the state dict has {len(saved['params'])} params, "
                                 f"this optimizer's {len(group['params'])}")
            params.update(zip(saved["params"], group["params"]))
        for pid, st in state_dict["state"].items():
            p = params.get(pid)
            if p is not None:
                _check_state(p, st, f"param {pid}", "")

    def _param_ids(self) -> dict[Tensor, int]:
        """Each param's index across groups, as in state_dict()."""
        params = (p for group in self.param_groups for p in group["params"])
        return {p: i for i, p in enumerate(params)}

    def _bucket(self, group: dict[str, Any], device: torch.device, dtype: torch.dtype,
                state_dtype: torch.dtype) -> BucketStates:
        key = (id(group), device, dtype, state_dtype)
        bucket = self._buckets.get(key)
        if bucket is None or bucket.group is not group:
            bucket = self._buckets[key] = BucketStates(group, device, dtype, state_dtype)
        return bucket

    def _apply(self, repairs: list[_Repair]) -> list[Slot]:
        """Make the states of checked repairs: a new slot per param, adopting the state given (none:
        fresh zeros). Nothing here can fail on user input: `_plan` checked it all."""
        ids = self._param_ids() if repairs else {}
        made, replaced = [], []
        for r in repairs:
            group = self.param_groups[r.group_index]
            if r.reuse:
                slot = r.old
            else:
                bucket = self._bucket(group, r.device, r.dtype, r.hyper.state_dtype)
                slot = bucket.new_slot(r.param, rng_seed(ids[r.param]))
                slot.adopt(r.source, r.hyper)
                self.state[r.param] = slot.show(r.entry if isinstance(r.entry, dict) else None)
                self._slots[r.param] = slot
                if r.old is not None:
                    r.old.bucket.release(r.old)
                    replaced.append(r.old)
            self._place(r.group_index, r.param_index, slot)
            made.append(slot)
        # a param moved to another group leaves its old slot in the old group's record: were it
        # moved back to the same index, the cheap path would take that slot, whose bucket is gone
        self._unrecord(replaced)
        self._drop_dead_buckets()
        return made

    def _unrecord(self, slots: list[Slot]) -> None:
        """Take released slots out of every group's record of slots by position."""
        if not slots:
            return
        gone = {id(slot) for slot in slots}
        for record in self._group_slots:
            record[1] = [None if id(s) in gone else s for s in record[1]]

    def _place(self, gi: int, i: int, slot: Slot) -> None:
        """Record `slot` as that of param i of group gi, for the step's cheap path."""
        group = self.param_groups[gi]
        while len(self._group_slots) <= gi:
            self._group_slots.append([None, [], None])
        record = self._group_slots[gi]
        if record[0] is not group or len(record[1]) != len(group["params"]) or record[2] is not slot.bucket.requested:
            record[:] = group, [None] * len(group["params"]), slot.bucket.requested
        record[1][i] = slot

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, grad_scale: Tensor | None = None,
             found_inf: Tensor | None = None):
        """One step. `grad_scale`/`found_inf` (or the attributes GradScaler sets) unscale in the
        same pass and turn the step into a no-op when found_inf is non-zero."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        self._run(self._plan(), grad_scale, found_inf)
        return loss

    def _sort(self, check_entries: bool) -> tuple[dict[int, Work], list[tuple]]:
        """The active params of every group sorted into buckets by their slots; those whose slot
        does not fit (or that have none) listed as (group index, index, param, grad, group's Hyper),
        to be checked in full. Changes nothing."""
        works: dict[int, Work] = {}
        misfits: list[tuple] = []
        group_slots = self._group_slots
        for gi, group in enumerate(self.param_groups):
            hyper = self._step_hyper(gi, group)
            params = group["params"]
            record = group_slots[gi] if gi < len(group_slots) else None
            slots = record[1] if record is not None and record[0] is group and len(record[1]) == len(params) \
                and record[2] is hyper.state_dtype else None  # slots made for this group and state dtype
            work, handle = None, None
            for i, p in enumerate(params):
                g = p.grad
                if g is None:
                    continue
                slot = slots[i] if slots is not None else None
                entry = (self.state.get(p) if check_entries else slot.entry) if slot is not None else None
                if slot is not None and slot.param is p and slot.fits(p, g, entry):
                    if slot.handle != handle:  # its bucket's (slot.bucket, a weak reference, costs a call)
                        handle = slot.handle
                        work = works.get(handle)
                        if work is None:
                            work = works[handle] = Work(gi, hyper, slot.bucket, [], [], None, [])
                    if slot.plain:
                        work.slots.append(slot)
                        work.params.append(p)
                        work.real_grads.append(g)
                        if work.real_params is not None:
                            work.real_params.append(p)
                    else:
                        work.add(slot, p, as_real(p), _local_grad(p, g, slot.real_shape,
                                                                  f" (param {i} of param group {gi})"))
                else:
                    misfits.append((gi, i, p, g, hyper))
        return works, misfits

    def _plan(self) -> list[Work]:
        """Validate every group, check every active param against its slot, choose every bucket's
        backend; raises before anything changes. What users change between steps (p.data resized
        or re-laid out, a state replaced or deleted, a param new to a bucket or moved to another
        device, dtype, group or state dtype) fails the cheap check (`Slot.fits`) and is checked in
        full here, then adopted, or refused with an error naming the param."""
        works, misfits = self._sort(check_entries=False)
        # Which entry of opt.state is whose is checked again only after opt.state was written, and
        # only now: torch.compile's guards name each tensor by the first place the step reaches it,
        # and a param reached first as a key of self.state would have its grad guarded by identity
        # (a recompile whenever zero_grad() frees it).
        state = self.state
        if not isinstance(state, TrackedState) or state.edited:
            if not isinstance(state, TrackedState):  # replaced by hand (opt.state = {...})
                state = self.state = TrackedState(state)
            # Slots whose entry in opt.state was deleted or replaced, of every param, with a grad or
            # not, in a group or not: this pass is the only one that sees the edit (later steps
            # trust the entries again), so a param without a grad now must not step on with the
            # old states when it trains again, and deleted states are freed now, as AdamW's are.
            stale = [slot for p, slot in self._slots.items() if state.get(p) is not slot.entry]
            if stale:
                self._forget(stale)
            works, misfits = self._sort(check_entries=True)
        if misfits:
            places = self._places()
            repairs = [self._check_repair(*m, places) for m in misfits]  # all checked before any is made
            for r, slot in zip(repairs, self._apply(repairs)):  # in group order: after the params above
                work = works.get(slot.bucket.handle)
                if work is None:
                    work = works[slot.bucket.handle] = Work(r.group_index, r.hyper, slot.bucket, [], [], None, [])
                work.add(slot, r.param, as_real(r.param), r.real_grad)
        if state.edited:  # every entry checked, or made by _apply: consistent until the next write
            state.edited = False
        plan = list(works.values())
        for work in plan:
            _check_once(work)
            group = self.param_groups[work.group_index]
            where = f" (param group {work.group_index})"
            _, work.backend = self._choose(group["backend"], work.bucket.device, work.bucket.dtype, work.hyper, where)
        return plan

    def _forget(self, stale: list[Slot]) -> None:
        """Drop slots whose entries in opt.state are no longer theirs: a param of one steps next from
        what opt.state then holds (nothing: fresh zeros), as with AdamW."""
        for slot in stale:
            self._slots.pop(slot.param, None)
            bucket = slot.bucket
            if bucket is not None:
                bucket.release(slot)
        self._unrecord(stale)
        self._drop_dead_buckets()

    def _drop_dead_buckets(self) -> None:
        for key, bucket in list(self._buckets.items()):  # buckets that own no state any more
            if not bucket.live():
                del self._buckets[key]

    def _places(self) -> dict[int, list[tuple[int, int]]]:
        """Where each param stands: id -> [(group index, index)], one pass over every group."""
        places: dict[int, list[tuple[int, int]]] = {}
        for k, group in enumerate(self.param_groups):
            for j, q in enumerate(group["params"]):
                places.setdefault(id(q), []).append((k, j))
        return places

    def _check_repair(self, gi: int, i: int, p: Tensor, g: Tensor, hyper: Hyper,
                      places: dict[int, list[tuple[int, int]]]) -> _Repair:
        """Check in full a param that failed the cheap check; raises (naming it) what cannot be adopted."""
        where = f" (param {i} of param group {gi})"
        _check_grad(p, g, where)
        if self.defaults.get("max_grad_norm") is not None:  # wrapped by FSDP1 after the constructor saw it
            _check_not_sharded_by_fsdp1([p])
        others = [k for k, _ in places[id(p)] if k != gi]
        if others:
            raise ValueError(f"param {i} of param group {gi} is also in param group {others[0]}: a param may "
                             "belong to one group only")
        if any(k == gi and j < i for k, j in places[id(p)]):
            raise ValueError(f"param {i} of param group {gi} appears twice in that group: each param may appear "
                             "once (it would be stepped twice)")
        real = as_real(p)
        group = self.param_groups[gi]
        self._choose(group["backend"], real.device, real_dtype(p), hyper, f" (param group {gi})")
        entry = self.state.get(p)
        slot = self._slots.get(p)  # by param: the list by position may be stale
        if slot is not None and slot.param is p and slot.bucket.group is group \
                and slot.bucket.requested is hyper.state_dtype and slot.fits(p, g, entry):
            # only its place changed (groups reordered, params added to the group): keep the slot
            return _Repair(gi, i, p, real.device, real_dtype(p), {}, entry, slot, hyper,
                           _local_grad(p, g, slot.real_shape, where), reuse=True)
        source = dict(entry) if entry else {}
        if source:
            _check_state(p, source, f"param {i} of param group {gi}",
                         " (the param changed shape since its state was made? torch.optim.AdamW refuses this "
                         "too; reset the state with `del optimizer.state[p]`, or give the param back its shape)")
        real_grad = _local_grad(p, g, real.shape, where)  # a DTensor grad this step cannot use: refused now
        return _Repair(gi, i, p, real.device, real_dtype(p), source, entry, slot, hyper, real_grad)

    def _run(self, plan: list[Work], grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        max_norm = self.defaults.get("max_grad_norm")
        if max_norm is not None and plan:  # counts a skipped step too
            grad_scale, found_inf = self._clip(plan, max_norm, grad_scale, found_inf)
        else:
            if max_norm is not None:  # no grads: N = 0, as clip_grad_norm_'s over none, not the last step's
                self._last["grad_norm"] = torch.zeros((), device=self._first_param_device())
            if found_inf is not None:  # skipped steps, counted on the device
                skipped = self._last["skipped"]
                found = found_inf != 0  # added to the float64 count as 0 or 1: one op, not a cast and an add
                self._last["skipped"] = found.double() if skipped is None else skipped.to(found.device) + found
        self._last["stats"], self._last["found_inf"] = [], found_inf
        for work in plan:
            real_params = work.real_params if work.real_params is not None else work.params
            sums = work.backend.step(work.bucket, work.slots, real_params, work.real_grads, work.hyper,
                                     grad_scale=grad_scale, found_inf=found_inf)
            if sums is not None:  # kept on the device; read only by stats()
                self._last["stats"].append((work.group_index, work.params, [s.numel for s in work.slots], sums))

    def _clip(self, plan: list[Work], max_norm: float, grad_scale: Tensor | None,
              found_inf: Tensor | None) -> tuple[Tensor, Tensor]:
        """The global grad norm N of this step (every bucket's grads, after GradScaler's unscale; a
        DTensor's over all its shards) and clip_grad_norm_'s coefficient k = min(1, c / (N + 1e-6)),
        folded into the grad scale the kernels divide by; a non-finite N is a found_inf, and a
        skipped step is counted. All on the device of the first bucket, in one call of its
        backend's `clip_coefficients` (snr_triton/clipping.py): no host read of a GPU tensor."""
        device = plan[0].bucket.device
        total = None
        for work in plan:
            real_params = work.real_params if work.real_params is not None else work.params
            for part in _by_mesh(work, real_params):
                partial = work.backend.grad_sq_sum(work.bucket, *part[:3])
                if part[3] is not None:  # local shards of DTensors: the sum over the mesh
                    partial = _sum_over_shards(partial, *part[3])
                partial = partial.to(device, non_blocking=True)
                total = partial if total is None else total + partial
        moved = [t.to(device, non_blocking=True) if t is not None else None
                 for t in (grad_scale, found_inf, self._last["skipped"])]
        divide_by, found, self._last["grad_norm"], self._last["skipped"] = \
            plan[0].backend.clip_coefficients(total, *moved, max_norm)
        return divide_by, found

    def _first_param_device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def last_grad_norm(self) -> Tensor:
        """N, the global grad norm of the last step (after GradScaler's unscale, before clipping), as
        a 0-dim tensor on the first param's device: reading it is the only synchronization."""
        if self.defaults.get("max_grad_norm") is None:
            raise RuntimeError("last_grad_norm() needs SNRAdamW(..., max_grad_norm=...): without it the "
                               "step computes no norm (use torch.nn.utils.get_total_norm)")
        if self._last["grad_norm"] is None:
            raise RuntimeError("last_grad_norm(): no step has run yet")
        return self._last["grad_norm"]

    def decoded_state(self, param: Tensor) -> dict[str, Tensor]:
        """`param`'s step and m, v, s as float tensors shaped like it: with 8-bit states the decoded
        values of its codes (a copy: writing to it changes nothing), else the states themselves."""
        slot = self._slots.get(param)
        if slot is None or slot.edited or self.state.get(param) is not slot.entry:
            raise KeyError("decoded_state(): this param has no states of this optimizer (no step taken since "
                           "it was added, or its state was edited: the next step adopts it)")
        out = {"step": slot.step}
        for i, key in enumerate(STATE_KEYS):
            out[key] = like_param(slot.value(i), param)
        return out

    # ----------------------------------------------------------------- monitor
    def stats(self, per_param: bool = False) -> dict[str, Any]:
        """Gate statistics of the last step over all stepped elements (needs track_stats=True).

        mean_gate: mean of q; frac_above: fraction with m-hat^2 > alpha*s-hat;
        signal: sum of m-hat^2; noise: sum of alpha*s-hat; groups: the same per param group.
        With per_param=True: {param name: the same} for every param stepped, which needs named
        parameters (`SNRAdamW(model.named_parameters(), ...)`). Computed on the device in the
        step's pass; reading synchronizes with the device once, the step itself never does.
        """
        if not any(g["track_stats"] for g in self.param_groups):
            raise RuntimeError("stats() needs SNRAdamW(..., track_stats=True)")
        if per_param and self._last["stats"] and not all("param_names" in g for g in self.param_groups):
            raise ValueError("stats(per_param=True) needs named parameters: pass model.named_parameters() "
                             "(or groups of (name, param) pairs) to SNRAdamW")
        found_inf = self._last["found_inf"]
        skipped = found_inf is not None and found_inf.item() != 0
        rows: dict[int, list[Tensor]] = {}  # group -> [count, *STATS] per param
        names: dict[str, Tensor] = {}
        for gi, params, numels, sums in self._last["stats"]:
            counts = torch.tensor(numels, dtype=torch.float64)
            table = torch.cat([counts[:, None], sums.double().cpu()], 1)
            if skipped:
                table[:, 0] = 0  # the step was skipped: nothing was stepped
            rows.setdefault(gi, []).append(table)
            if per_param:
                group = self.param_groups[gi]
                index = {p: k for k, p in enumerate(group["params"])}
                for p, row in zip(params, table):
                    names[group["param_names"][index[p]]] = row
        groups = [torch.cat(rows[gi]).sum(0) if gi in rows else None for gi in range(len(self.param_groups))]
        present = [g for g in groups if g is not None]
        total = torch.stack(present).sum(0) if present else None
        out = {**_stats_dict(total), "groups": [_stats_dict(g) for g in groups]}
        skipped = self._last["skipped"]
        out["skipped_steps"] = int(skipped.item()) if skipped is not None else 0
        if per_param:
            out["params"] = {name: _stats_dict(row) for name, row in names.items()}
        return out


def _check_max_grad_norm(value: Any) -> None:
    if value is None:
        return
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"max_grad_norm must be None (no clipping) or a finite number > 0, got {value!r}")


def _built_by_zero_redundancy_optimizer() -> bool:
    """Whether torch's ZeroRedundancyOptimizer is constructing this optimizer (it builds a local
    one per rank over that rank's shard of the params): a `self` of that class a few frames up."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.optim import ZeroRedundancyOptimizer

    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            return False
        if isinstance(frame.f_locals.get("self"), ZeroRedundancyOptimizer):
            return True
        frame = frame.f_back
    return False


def _check_not_sharded_by_fsdp1(params: list[Any]) -> None:
    """FullyShardedDataParallel (FSDP1) marks its flat params, and the original params under
    use_orig_params=True, `_fsdp_flattened`; across ranks their grads are each rank's shard as plain
    tensors, so a norm over them would be the shard's (FSDP2's are DTensors, normed over the mesh)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return
    if any(getattr(p, "_fsdp_flattened", False) for p in params if isinstance(p, Tensor)):
        raise ValueError("max_grad_norm: these params are FullyShardedDataParallel's (FSDP1), whose grads on each "
                         "rank are that rank's shard, so the norm would be the shard's; leave max_grad_norm=None "
                         "and clip with FSDP's model.clip_grad_norm_(c) before opt.step(), or shard with FSDP2 "
                         "(torch.distributed.fsdp.fully_shard), whose DTensor grads the step norms over the mesh")


def _by_mesh(work: Work, real_params: list[Tensor]):
    """The bucket's active (slots, params, grads) as the norm pass takes them: one part for plain
    tensors; for DTensors one part per (mesh, placements), with what to sum their shards over."""
    if all(s.placements is None for s in work.slots):
        yield work.slots, real_params, work.real_grads, None
        return
    parts: dict[Any, list] = {}
    for s, p, g in zip(work.slots, real_params, work.real_grads):
        key = None if s.placements is None else (id(s.placements[0]), tuple(s.placements[1]))
        parts.setdefault(key, [[], [], [], s.placements]).__getitem__(0).append(s)
        parts[key][1].append(p)
        parts[key][2].append(g)
    for slots, ps, gs, placements in parts.values():
        yield slots, ps, gs, placements


def _sum_over_shards(partial: Tensor, mesh: Any, placements: Any) -> Tensor:
    """A local sum of squares of Shard-placed grads, summed over the mesh dims they are sharded on
    (as torch.nn.utils.get_total_norm does for DTensors); Replicate dims hold copies, not parts."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    kinds = [Partial() if pl.is_shard() else Replicate() for pl in placements]
    return DTensor.from_local(partial, mesh, kinds, run_check=False).full_tensor()


def _check_once(work: Work) -> None:
    """A param listed twice in a group (appended to group["params"] after construction) would be
    stepped twice in one launch: refused. Checked once per active set, of which a bucket remembers
    as many as it keeps block maps (MoE experts make a new active set almost every step)."""
    key = tuple(s.index for s in work.slots)
    checked = work.bucket.checked
    if key in checked:
        return
    if len(set(key)) != len(key):
        twice = next(s for k, s in enumerate(work.slots) if s.index in key[:k])
        raise ValueError(f"a param of shape {tuple(twice.shape)} appears twice in param group {work.group_index}: "
                         "each param may appear once (it would be stepped twice)")
    if len(checked) >= MAPS_KEPT:
        checked.clear()
    checked.add(key)


def _check_grad(p: Tensor, g: Tensor, where: str) -> None:
    """The kernels read a grad as the param's dtype and layout: anything else is refused up front."""
    if g.is_sparse:
        raise RuntimeError(f"SNRAdamW does not support sparse gradients{where}; "
                           "use dense gradients (e.g. nn.Embedding(sparse=False))")
    if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
        raise RuntimeError(f"grad does not match its param{where}: grad {g.dtype} {tuple(g.shape)} on "
                           f"{g.device}, param {p.dtype} {tuple(p.shape)} on {p.device}; they must agree")
    if is_dtensor(p) != is_dtensor(g):
        raise RuntimeError(f"grad does not match its param{where}: one is a DTensor, the other is not")


def _local_grad(p: Tensor, g: Tensor, real_shape: torch.Size, where: str) -> Tensor:
    """The local real grad to step `p`'s local shard with. A DTensor grad with other placements than
    its param (Replicate or Partial next to a Shard param) is redistributed to the param's, as
    torch.optim does through DTensor ops; its local shape must then be the param's."""
    if is_dtensor(g):
        if g.device_mesh != p.device_mesh:
            raise RuntimeError(f"grad does not match its param{where}: the grad lives on another device mesh")
        if g.placements != p.placements:
            g = g.redistribute(p.device_mesh, p.placements)
    rg = as_real(g)
    if rg.shape != real_shape:
        raise RuntimeError(f"grad does not match its param{where}: local shard {tuple(rg.shape)}, the "
                           f"param's {tuple(real_shape)}")
    return rg


def _check_state(p: Tensor, st: Any, name: str, hint: str) -> None:
    """A state (a checkpoint's, or one edited by hand) that this param's states can adopt."""
    if not isinstance(st, dict):
        raise ValueError(f"the state of {name} must be a dict, got {type(st).__name__}")
    if not st:
        return
    missing = {"step", "exp_avg", "exp_avg_sq"} - {k.removesuffix(CODES) for k in st}
    if missing:
        raise ValueError(f"the state of {name} lacks {', '.join(sorted(missing))} "
                         f"(needs step, exp_avg, exp_avg_sq; exp_grad_var optional; 8-bit states as "
                         f"<key>{CODES} and <key>{SCALES})")
    for key in STATE_KEYS:
        if key + CODES in st or key + SCALES in st:
            _check_codes(p, st, key, name)
            continue
        if key not in st:
            continue
        value = st[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"state {key!r} of {name} must be a tensor, got {type(value).__name__}")
        _check_mesh(p, value, key, name)
        if (tuple(value.shape) != _shown_shape(p, value)) if resharded(value, p) else \
                (as_real(value).shape != as_real(p).shape and value.shape != p.shape):
            raise ValueError(f"state {key!r} of {name} has shape {tuple(value.shape)}, its param "
                             f"{tuple(p.shape)}{hint}")
    step = st["step"]
    if isinstance(step, Tensor) and step.numel() != 1:
        raise ValueError(f"state 'step' of {name} must hold one number, got shape {tuple(step.shape)}")


def _shown_shape(p: Tensor, state: Tensor) -> tuple[int, ...]:
    """p's global shape as a state of `state`'s kind shows it: a real state of a complex param
    (bfloat16 states, 8-bit codes) as the real view's."""
    return (*p.shape, 2) if p.is_complex() and not state.is_complex() else tuple(p.shape)


def _check_mesh(p: Tensor, t: Tensor, key: str, name: str) -> None:
    """A DTensor param's DTensor state on its param's mesh: a state is redistributed to a param
    resharded since, and redistribution cannot leave a mesh."""
    if is_dtensor(t) and is_dtensor(p) and t.device_mesh != p.device_mesh:
        raise ValueError(f"state {key!r} of {name} is a DTensor on another device mesh ({t.device_mesh}) "
                         f"than its param ({p.device_mesh})")


def _check_codes(p: Tensor, st: dict, key: str, name: str) -> None:
    """An 8-bit state: uint8 codes laid out densely like the param, one float32 scale per block."""
    codes, scales = st.get(key + CODES), st.get(key + SCALES)
    for k, t in ((key + CODES, codes), (key + SCALES, scales)):
        if not isinstance(t, Tensor):
            raise ValueError(f"state {k!r} of {name} must be a tensor (8-bit states come as {key}{CODES} and "
                             f"{key}{SCALES}), got {type(t).__name__}")
    _check_mesh(p, codes, key + CODES, name)
    whole = resharded(codes, p)  # its shard's blocks are decoded and redistributed: global shapes compared
    want = _shown_shape(p, codes) if whole else as_real(p).shape
    got = as_real(codes)
    shape = codes.shape if whole else got.shape
    laid_out_by = codes if whole else p  # the scales of resharded codes: laid out as the codes are
    if got.dtype != torch.uint8 or tuple(shape) != tuple(want) or not is_dense(got):
        raise ValueError(f"state {key + CODES!r} of {name} must be a dense uint8 tensor of its param's shape "
                         f"{tuple(want)}, got {got.dtype} {tuple(shape)}")
    n = codebook.blocks(got.numel())
    if scales.dtype != torch.float32 or local_scales(scales, n) is None:
        laid_out = f"laid out by scales_layout, {tuple(scales_layout(laid_out_by)[0])}" if is_dtensor(p) else f"({n},)"
        raise ValueError(f"state {key + SCALES!r} of {name} must be float32 of shape {laid_out} (one scale per "
                         f"{codebook.BLOCK} elements), got {scales.dtype} {tuple(scales.shape)}")


def _stats_dict(sums: Tensor | None) -> dict[str, float]:
    """sums = (count, *contract.STATS)."""
    if sums is None or sums[0] == 0:
        return {k: float("nan") if k in ("mean_gate", "frac_above") else 0.0 for k in STAT_KEYS}
    count, *rest = (float(x) for x in sums)
    col = dict(zip(STATS, rest))
    return {"mean_gate": col["sum_q"] / count, "frac_above": col["count_above"] / count,
            "signal": col["sum_signal"], "noise": col["sum_noise"]}
