"""Address tables: where a fused kernel finds each active tensor of a bucket.

Params, grads and states are read where they are, through int64 addresses, so the host never
copies them into a flat buffer. A `BlockMap` (rows and block table) depends only on which slots
are active and their sizes: it is built once per active set (a few kept per bucket). Each step
then compares the param and grad addresses with the last ones and, when a storage moved (a
fresh grad after `zero_grad()`, `p.data = ...`), refreshes only those columns: on CPU in place,
on CUDA by one non-blocking copy from pinned memory. No step reads anything back from the device.
Both fused kernels read the same layout (contract.ROW).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contract import ROW, STATS
from .param_states import MAPS_KEPT, BucketStates, Slot

P, G, M, V, S = (ROW.index(c) for c in ("param_addr", "grad_addr", "exp_avg_addr", "exp_avg_sq_addr",
                                         "exp_grad_var_addr"))
ALIGNED = ROW.index("aligned")
MS, SS = ROW.index("exp_avg_scales_addr"), ROW.index("exp_grad_var_scales_addr")  # 8-bit states' scales

# How often each kind of host work ran (tests count them; nothing reads them on the step's path).
counters = {"maps_built": 0, "addresses_refreshed": 0, "stand_in_copies": 0}


class BlockMap:
    """The kernel's view of one active set: rows (contract.ROW) and the row of each block."""

    def __init__(self, bucket: BucketStates, slots: list[Slot], block: int):
        counters["maps_built"] += 1
        self.device = bucket.device
        blocks = [-(-slot.numel // block) for slot in slots]
        rows, first = [], 0
        for slot, n in zip(slots, blocks):
            m, v, s = (t.data_ptr() for t in slot.real)
            scales = [t.data_ptr() for t in slot.scales] if slot.scales is not None else [0, 0, 0]
            rows.append([0, 0, m, v, s, slot.numel, first, slot.index, slot.seed, 0, *scales])
            first += n
        self.static = torch.tensor(rows, dtype=torch.int64).reshape(-1, len(ROW))
        self.slots = slots
        assert G == P + 1 and S == M + 2 and SS == MS + 2, "the kernels' columns moved: update BlockMap.refresh"
        self.static_aligned = (self.static[:, M:S + 1] & 15).sum(1) == 0
        self.states_aligned = bool(self.static_aligned.all())  # our own allocations: always
        self.states_moved = False  # the rows point at other state tensors than the slots' (compile)
        self.dense = all(slot.dense for slot in slots)
        self.contiguous = all(slot.contiguous for slot in slots)
        self.strides = [slot.real_stride for slot in slots]  # a grad laid out like its param
        self.numel = sum(slot.numel for slot in slots)
        self.num_blocks = first
        # the row of each block: one int32 per block (6.5M for a 6.7B-param model), made by torch
        self.keep: list[Tensor] = []  # pinned sources of copies a CUDA graph may replay
        self.block_tensor = self._to_device(torch.repeat_interleave(torch.arange(len(slots), dtype=torch.int32),
                                                                    torch.tensor(blocks, dtype=torch.int64)))
        indices = [slot.index for slot in slots]
        # step += 1 for the active slots: one op; a plain add_ when they are the first n in order
        self.step_prefix = len(indices) if indices == list(range(len(indices))) else None
        self.step_index = self._to_device(torch.tensor(indices, dtype=torch.int64))
        self.rows = self.static.clone() if bucket.device.type == "cpu" else \
            torch.empty_like(self.static, device=bucket.device)
        self.addresses: list[int] | None = None  # what the rows point at: [param, grad] * n (+ states)
        self.partials: Tensor | None = None  # per-block partial stats sums, made on first use

    def _to_device(self, host: Tensor) -> Tensor:
        """A host tensor on the bucket's device without a host synchronization: a non-blocking copy
        from pinned memory (the caching host allocator keeps it until the copy has run; under
        CUDA-graph capture it is kept for replays)."""
        if self.device.type == "cpu":
            return host
        pinned = host.pin_memory()
        if torch.cuda.is_current_stream_capturing():
            self.keep.append(pinned)
        return pinned.to(self.device, non_blocking=True)

    def refresh(self, addresses: list[int], states: list[int] | None = None, scales: list[int] | None = None) -> None:
        """Point the rows at these param and grad addresses ([p0, g0, p1, g1, ...]) and, when given
        ([m0, v0, s0, m1, ...]: under torch.compile the op may be handed copies of the states), at
        those state addresses instead of the slots' own (and with 8-bit states at those `scales`,
        in the same order)."""
        key = addresses if states is None else addresses + states + (scales or [])
        if key == self.addresses:
            return
        counters["addresses_refreshed"] += 1
        host = self.static.clone() if self.device.type != "cpu" else self.rows
        pg = torch.tensor(addresses, dtype=torch.int64).view(-1, 2)
        host[:, P:G + 1] = pg  # P, G adjacent (contract.ROW)
        aligned = (pg & 15).sum(1) == 0
        if states is not None:
            st = torch.tensor(states, dtype=torch.int64).view(-1, 3)
            host[:, M:S + 1] = st
            aligned &= (st & 15).sum(1) == 0
            if scales:
                host[:, MS:SS + 1] = torch.tensor(scales, dtype=torch.int64).view(-1, 3)
        else:
            if self.states_moved:
                host[:, M:S + 1] = self.static[:, M:S + 1]
                host[:, MS:SS + 1] = self.static[:, MS:SS + 1]
            if not self.states_aligned:
                aligned &= self.static_aligned
        self.states_moved = states is not None
        host[:, ALIGNED] = aligned
        if self.device.type != "cpu":  # on CPU the kernel runs on this thread: updated in place
            # stream-ordered after the previous step's launch, from pinned memory (see _to_device)
            self.rows.copy_(self._to_device(host))
        self.addresses = key

    def count_step(self, steps: Tensor, found_inf: Tensor | None = None) -> None:
        """step += 1 for the active slots, unless found_inf (on the steps' device) is non-zero: as in
        torch's fused Adam a skipped step does not count (GradScaler's found_inf is a sum over
        devices: any non-zero value is one skipped step). Device ops only (one or two), no host read."""
        keep = 1 if found_inf is None else found_inf == 0
        if self.step_prefix is not None:
            steps[:self.step_prefix].add_(keep)
        elif found_inf is None:
            steps.index_add_(0, self.step_index, torch.ones_like(self.step_index, dtype=steps.dtype))
        else:
            steps.index_add_(0, self.step_index, keep.to(steps.dtype).expand(self.step_index.numel()))

    def partial_sums(self, dtype: torch.dtype) -> Tensor:
        if self.partials is None or self.partials.dtype != dtype:
            self.partials = torch.zeros(self.num_blocks, len(STATS), dtype=dtype, device=self.device)
        return self.partials


def operands(table: BlockMap, slots: list[Slot], params: list[Tensor], grads: list[Tensor]) -> tuple[list[int], list]:
    """The addresses the kernel reads this step ([p0, g0, ...]) and the stand-ins to copy back.

    A param that is not dense is stepped in a contiguous stand-in (kept with its slot, so its
    address does not move), copied back by `write_back`; a grad laid out otherwise than its
    param is copied into a stand-in in the param's layout."""
    if table.contiguous and all([g.is_contiguous() for g in grads]) or \
            table.dense and [g.stride() for g in grads] == table.strides:  # the usual cases, in bulk
        addresses = [0] * (2 * len(params))
        addresses[0::2] = [p.data_ptr() for p in params]
        addresses[1::2] = [g.data_ptr() for g in grads]
        return addresses, []
    addresses, back = [], []
    for slot, p, g in zip(slots, params, grads):
        if not slot.dense:
            sp = slot.stand_in.get("param")
            if sp is None:
                sp = slot.stand_in["param"] = torch.empty(p.shape, dtype=p.dtype, device=p.device)
                slot.stand_in["grad"] = torch.empty_like(sp)
            sp.copy_(p)
            slot.stand_in["grad"].copy_(g)
            counters["stand_in_copies"] += 1
            back.append((p, sp))
            addresses += (sp.data_ptr(), slot.stand_in["grad"].data_ptr())
            continue
        if g.stride() != slot.real_stride:
            sg = slot.stand_in.get("grad")
            if sg is None:
                sg = slot.stand_in["grad"] = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype,
                                                                 device=p.device)
            sg.copy_(g)
            counters["stand_in_copies"] += 1
            g = sg
        addresses += (p.data_ptr(), g.data_ptr())
    return addresses, back


def write_back(back: list) -> None:
    for dst, src in back:
        dst.copy_(src)


def block_map(bucket: BucketStates, indices: list[int], block: int) -> BlockMap:
    """The bucket's map for this active set (the slots at `indices`), built on first use."""
    key = (block, *indices)
    table = bucket.maps.get(key)
    if table is None:
        if len(bucket.maps) >= MAPS_KEPT:
            bucket.maps.popitem(last=False)
        table = bucket.maps[key] = BlockMap(bucket, [bucket.slots[i] for i in indices], block)
    else:
        bucket.maps.move_to_end(key)
    return table
