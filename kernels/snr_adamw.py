"""The fused SNR-AdamW step: one Triton launch per (param group, device, dtype).

Each program updates BLOCK elements of one tensor. It finds its tensor in a
block table, and the tensor's param/grad addresses, state offset, length and
step slot in a metadata table, both built once on the host and rebuilt only
when a storage changes. States live in one flat buffer per state, so they are
reached by base pointer + offset. Every element's theta, g, m, v, s is read
once and theta, m, v, s written once: ALGORITHM.md's 36 bytes per fp32 element.
"""

import triton
import triton.language as tl

from snr_triton import contract

# The contract (snr_triton/contract.py) as compile-time constants: table columns, gate ids,
# stats columns, state alignment.
ROW_COLUMNS = tl.constexpr(len(contract.ROW))
PARAM_ADDR = tl.constexpr(contract.ROW.index("param_addr"))
GRAD_ADDR = tl.constexpr(contract.ROW.index("grad_addr"))
STATE_OFFSET = tl.constexpr(contract.ROW.index("state_offset"))
NUMEL = tl.constexpr(contract.ROW.index("numel"))
FIRST_BLOCK = tl.constexpr(contract.ROW.index("first_block"))
STEP_SLOT = tl.constexpr(contract.ROW.index("step_slot"))
RNG_SEED = tl.constexpr(contract.ROW.index("rng_seed"))
GATE_NONE = tl.constexpr(contract.GATE_IDS["none"])
GATE_SNR = tl.constexpr(contract.GATE_IDS["snr"])
GATE_SOFT = tl.constexpr(contract.GATE_IDS["soft"])
GATE_HARD = tl.constexpr(contract.GATE_IDS["hard"])
STAT_COLUMNS = tl.constexpr(len(contract.STATS))
SUM_Q = tl.constexpr(contract.STATS.index("sum_q"))
COUNT_ABOVE = tl.constexpr(contract.STATS.index("count_above"))
SUM_SIGNAL = tl.constexpr(contract.STATS.index("sum_signal"))
SUM_NOISE = tl.constexpr(contract.STATS.index("sum_noise"))
ALIGN = tl.constexpr(contract.ALIGN)


@triton.jit
def _one_minus_pow(log_hi, log_lo, t):
    """1 - beta**t in float64, from log(beta) split in two float32 (scalars are float32)."""
    log_beta = tl.cast(log_hi, tl.float64) + tl.cast(log_lo, tl.float64)
    return (1.0 - tl.exp(t * log_beta)).to(tl.float32)


@triton.jit
def _round_bf16(x):
    """float32 -> bfloat16, round to nearest even, done on the bits (as c10::BFloat16 does), so
    the interpreter (whose cast truncates) and the GPU store the same value."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) & -65536).to(tl.float32, bitcast=True)
    finite = tl.abs(x) < float("inf")
    return tl.where(finite, rounded, x).to(tl.bfloat16)


@triton.jit
def _store_as(ptr, x, mask):
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr, _round_bf16(x), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stochastic_round_bf16(x, seed, rand_offsets):
    """Round float32 to bfloat16 up or down with probability given by the distance (unbiased)."""
    noise = (tl.randint(seed, rand_offsets) & 0xFFFF).to(tl.int32, bitcast=True)
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + noise) & -65536).to(tl.float32, bitcast=True)
    finite = tl.abs(x) < float("inf")
    return tl.where(finite, rounded, x).to(tl.bfloat16)


@triton.jit
def snr_adamw_kernel(
    meta_ptr, block_tensor_ptr,
    exp_avg_ptr, exp_avg_sq_ptr, exp_grad_var_ptr, step_ptr,
    lr, lr_ptr, grad_scale_ptr, found_inf_ptr, stats_ptr,
    beta1, one_minus_beta1, beta2, one_minus_beta2, rho, one_minus_rho,
    lb1_hi, lb1_lo, lb2_hi, lb2_lo, lrho_hi, lrho_lo,
    eps, weight_decay, alpha, softness, gate_eps, warmup_steps,
    PARAM_DTYPE: tl.constexpr, GATE: tl.constexpr, MAXIMIZE: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr, TRACK_STATS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_tensor_ptr + pid).to(tl.int64)
    row = meta_ptr + tensor * ROW_COLUMNS
    param_addr = tl.load(row + PARAM_ADDR)
    grad_addr = tl.load(row + GRAD_ADDR)
    state_offset = tl.multiple_of(tl.load(row + STATE_OFFSET), ALIGN)
    numel = tl.load(row + NUMEL)
    first_block = tl.load(row + FIRST_BLOCK)
    step_slot = tl.load(row + STEP_SLOT)

    if HAS_FOUND_INF:  # GradScaler found inf/nan: read nothing, write nothing
        numel = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)
    offs = (pid - first_block) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel

    param_ptr = param_addr.to(tl.pointer_type(PARAM_DTYPE)) + offs
    grad_ptr = grad_addr.to(tl.pointer_type(PARAM_DTYPE)) + offs
    state_idx = state_offset + offs
    p = tl.load(param_ptr, mask=mask).to(tl.float32)
    g = tl.load(grad_ptr, mask=mask).to(tl.float32)
    m = tl.load(exp_avg_ptr + state_idx, mask=mask).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + state_idx, mask=mask).to(tl.float32)
    s = tl.load(exp_grad_var_ptr + state_idx, mask=mask).to(tl.float32)

    if HAS_GRAD_SCALE:
        g = g / tl.load(grad_scale_ptr).to(tl.float32)
    if MAXIMIZE:
        g = -g
    if LR_IS_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float32)

    # step was incremented before the launch; bias corrections are per-program scalars
    t = tl.load(step_ptr + step_slot).to(tl.float64)
    bc1 = _one_minus_pow(lb1_hi, lb1_lo, t)
    bc2 = _one_minus_pow(lb2_hi, lb2_lo, t)
    bc3 = _one_minus_pow(lrho_hi, lrho_lo, t)

    diff = g - m  # m before this step's update
    s = rho * s + one_minus_rho * (diff * diff)
    m = m + one_minus_beta1 * diff  # torch's lerp(m, g, 1 - beta1)
    v = beta2 * v + one_minus_beta2 * (g * g)

    denom = tl.sqrt_rn(v) / tl.sqrt_rn(bc2) + eps
    mhat = m / bc1
    signal = mhat * mhat
    shat = tl.where(t == 1.0, signal, s / bc3)  # ALGORITHM.md: at t = 1 the gate uses s-hat := m-hat^2
    noise = alpha * shat
    if GATE == GATE_SNR:
        q = signal / (signal + softness * noise + gate_eps)
    elif GATE == GATE_SOFT:
        d = tl.maximum(signal - noise, 0.0)
        q = d / (d + softness * shat + gate_eps)
    elif GATE == GATE_HARD:
        q = tl.where(signal > noise, 1.0, 0.0)
    else:  # none
        q = tl.full([BLOCK], 1.0, tl.float32)
    q = tl.where(t <= warmup_steps, 1.0, q)

    p = p * (1.0 - lr * weight_decay)
    p = p - (lr / bc1) * (q * m / denom)

    if STOCHASTIC_ROUNDING:
        # the param's own stream (its seed), varied by element and step
        seed = tl.load(row + RNG_SEED)
        tl.store(param_ptr, _stochastic_round_bf16(p, seed, offs + (t.to(tl.int64) << 40)), mask=mask)
    else:
        _store_as(param_ptr, p, mask)
    _store_as(exp_avg_ptr + state_idx, m, mask)
    _store_as(exp_avg_sq_ptr + state_idx, v, mask)
    _store_as(exp_grad_var_ptr + state_idx, s, mask)

    if TRACK_STATS:  # partial sums per program, reduced on the device when stats() is read
        zero = tl.zeros([BLOCK], tl.float32)
        stats_row = stats_ptr + pid * STAT_COLUMNS
        tl.store(stats_row + SUM_Q, tl.sum(tl.where(mask, q, zero)))
        tl.store(stats_row + COUNT_ABOVE, tl.sum(tl.where(mask & (signal > noise), 1.0, zero)))
        tl.store(stats_row + SUM_SIGNAL, tl.sum(tl.where(mask, signal, zero)))
        tl.store(stats_row + SUM_NOISE, tl.sum(tl.where(mask, noise, zero)))
