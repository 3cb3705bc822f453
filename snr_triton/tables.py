"""Address tables: where a fused kernel finds each active tensor of a bucket.

Params and grads are read where they are, through int64 addresses, so the host never
copies them into a flat buffer. A table is built once and rebuilt only when a storage
moves (a new grad after zero_grad(set_to_none=True), `p.data = ...`, another active set):
the per-step host work is one tuple comparison of data pointers. Both fused kernels read
the same layout (contract.ROW).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contract import ROW
from .flat_state import FlatState, as_real, is_dense


class Operands:
    """What a fused kernel walks this step: local real views of params and grads, one linear index
    each. A param that is not dense gets a contiguous stand-in, copied back by `write_back()`
    after the kernel; a grad with other strides than its param gets a copy in the param's layout.
    Keep this object alive until the kernel has run: the table points into those copies."""

    def __init__(self, params: list[Tensor], grads: list[Tensor], slots: list[int]):
        self.params = [as_real(p) for p in params]
        self.grads = [as_real(g) for g in grads]
        self._stand_ins = []
        for k, (p, g) in enumerate(zip(self.params, self.grads)):
            if not is_dense(p):
                self.params[k], self.grads[k] = p.contiguous(), g.contiguous()
                self._stand_ins.append((p, self.params[k]))
            elif g.stride() != p.stride():
                self.grads[k] = torch.empty_like(p).copy_(g)
        self.key = (tuple(slots), tuple(p.data_ptr() for p in self.params),
                    tuple(g.data_ptr() for g in self.grads))

    def write_back(self) -> None:
        for dst, src in self._stand_ins:
            dst.copy_(src)


class AddressTable:
    """Rows (contract.ROW) of the active tensors and the tensor of each block of `block` elements."""

    def __init__(self, key: tuple, flat: FlatState, params: list[Tensor], grads: list[Tensor],
                 slots: list[int], block: int):
        rows, block_tensor = [], []
        for j, (p, g, slot) in enumerate(zip(params, grads, slots)):
            aligned = p.data_ptr() % 16 == 0 and g.data_ptr() % 16 == 0
            rows.append([p.data_ptr(), g.data_ptr(), flat.offsets[slot], p.numel(), len(block_tensor), slot,
                         flat.seeds[slot], int(aligned)])
            block_tensor.extend([j] * -(-p.numel() // block))
        self.key = key
        self.block = block
        self.numel = sum(p.numel() for p in params)
        self.rows = torch.tensor(rows, dtype=torch.int64).reshape(-1, len(ROW)).to(flat.device)
        self.block_tensor = torch.tensor(block_tensor, dtype=torch.int32).to(flat.device)
        self.num_blocks = len(block_tensor)
        self.all_active = list(slots) == list(range(len(flat.params)))
        self.slots = torch.tensor(slots, dtype=torch.int64).to(flat.device)
        self.stats: Tensor | None = None  # per-block partial sums (contract.STATS), made on first use

    def count_step(self, steps: Tensor) -> None:
        """step += 1 for the active tensors: one op, no host read."""
        if self.all_active:
            steps.add_(1)
        else:
            steps.index_add_(0, self.slots, torch.ones_like(self.slots, dtype=steps.dtype))


def table_for(backend: str, flat: FlatState, params: list[Tensor], grads: list[Tensor], slots: list[int],
              block: int):
    """The operands of this step and the bucket's cached table for `backend`, rebuilt if stale.
    `slots` place params in the bucket (a compiled step hands the kernel other tensor objects)."""
    operands = Operands(params, grads, slots)
    table = flat.tables.get(backend)
    if table is None or table.key != operands.key:
        table = flat.tables[backend] = AddressTable(operands.key, flat, operands.params, operands.grads,
                                                    slots, block)
    return table, operands
