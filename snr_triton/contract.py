"""The kernel contract: what the host and every kernel must agree on, written once.

The Triton kernel imports these names as constexprs; the C kernel is compiled with them as
`-D` defines (`c_defines()`), and reports back what it was built with, so a test can tell if
any copy disagrees. Nothing else in the package spells a gate id, a table column, the state
alignment or a stats column.
"""

from __future__ import annotations

import torch

GATES = ("snr", "soft", "hard", "none")  # as users see them; ids are the kernels' switch values
GATE_IDS = {"none": 0, "snr": 1, "soft": 2, "hard": 3}

# The address table (snr_triton/tables.py), read by both fused kernels: one int64 row per active
# tensor, and an int32 block table giving the tensor (row) of each block of BLOCK elements. Every
# param has state tensors of its own (snr_triton/param_states.py), reached by address like the
# param and its grad; `step_slot` indexes the bucket's float32 step counters. `aligned` is 1 when
# all five addresses are 16-byte aligned: the tensor's full blocks take the unmasked, full-width path.
ROW = ("param_addr", "grad_addr", "exp_avg_addr", "exp_avg_sq_addr", "exp_grad_var_addr", "numel", "first_block",
       "step_slot", "rng_seed", "aligned")

# Partial sums of the gate statistics, one row per program / chunk, in this column order.
STATS = ("sum_q", "count_above", "sum_signal", "sum_noise")

# Param (real) dtypes each fused kernel serves; the eager path serves every floating dtype.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU_DTYPES = (torch.float32, torch.bfloat16)
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)  # uint8: 8-bit states (snr_triton/codebook.py)
FUSED_STATE_DTYPES = (torch.float32, torch.bfloat16)  # what the fused kernels store (8-bit: eager so far)


def c_defines() -> dict[str, int]:
    """The contract as C preprocessor constants (the C kernel has no copy of its own)."""
    out = {f"GATE_{name.upper()}": i for name, i in GATE_IDS.items()}
    out.update({f"ROW_{c.upper()}": i for i, c in enumerate(ROW)})
    out.update({f"STAT_{c.upper()}": i for i, c in enumerate(STATS)})
    out.update(ROW_COLUMNS=len(ROW), STAT_COLUMNS=len(STATS))
    return out
