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
# With 8-bit states the state addresses are their codes', and the *_scales_addr columns their
# scales' (0 for float states).
ROW = ("param_addr", "grad_addr", "exp_avg_addr", "exp_avg_sq_addr", "exp_grad_var_addr", "numel", "first_block",
       "step_slot", "rng_seed", "aligned", "exp_avg_scales_addr", "exp_avg_sq_scales_addr", "exp_grad_var_scales_addr")

# Partial sums of the gate statistics, one row per program / chunk, in this column order.
STATS = ("sum_q", "count_above", "sum_signal", "sum_noise")

# Param (real) dtypes each fused kernel serves; the eager path serves every floating dtype.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU_DTYPES = (torch.float32, torch.bfloat16)
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)  # uint8: 8-bit states (snr_triton/codebook.py)
TRITON_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)  # what the Triton kernel stores
CPU_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)

# 8-bit states (snr_triton/codebook.py): one scale per CODE_BLOCK elements; the kernels find a code
# through a lookup table indexed by the sign, exponent (from LUT_EXP_MIN up, lower ones clamped to
# the first bucket) and top LUT_MANTISSA_BITS mantissa bits of x / scale, then one comparison.
CODE_BLOCK = 256
LUT_EXP_MIN = 103  # 2^-24: below the smallest midpoint of either table
LUT_MANTISSA_BITS = 8  # buckets narrower than the tables' closest midpoints: one comparison decides
LUT_HALF = (127 - LUT_EXP_MIN + 1) << LUT_MANTISSA_BITS  # entries per sign


def c_defines() -> dict[str, int]:
    """The contract as C preprocessor constants (the C kernel has no copy of its own)."""
    out = {f"GATE_{name.upper()}": i for name, i in GATE_IDS.items()}
    out.update({f"ROW_{c.upper()}": i for i, c in enumerate(ROW)})
    out.update({f"STAT_{c.upper()}": i for i, c in enumerate(STATS)})
    out.update(ROW_COLUMNS=len(ROW), STAT_COLUMNS=len(STATS), CODE_BLOCK=CODE_BLOCK, LUT_EXP_MIN=LUT_EXP_MIN,
               LUT_MANTISSA_BITS=LUT_MANTISSA_BITS, LUT_HALF=LUT_HALF)
    return out
