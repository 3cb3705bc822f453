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
ALIGNED = tl.constexpr(contract.ROW.index("aligned"))
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
def _stochastic_round_bf16(x, seed, rand_offsets):
    """Round float32 to bfloat16 up or down with probability given by the distance (unbiased)."""
    noise = (tl.randint(seed, rand_offsets) & 0xFFFF).to(tl.int32, bitcast=True)
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + noise) & -65536).to(tl.float32, bitcast=True)
    finite = tl.abs(x) < float("inf")
    return tl.where(finite, rounded, x).to(tl.bfloat16)


@triton.jit
def _load(ptr, mask, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptr, mask=mask)
    else:
        x = tl.load(ptr)
    return x.to(tl.float32)


@triton.jit
def _store(ptr, x, mask, MASKED: tl.constexpr):
    if ptr.dtype.element_ty == tl.bfloat16:
        x = _round_bf16(x)
    else:
        x = x.to(ptr.dtype.element_ty)
    if MASKED:
        tl.store(ptr, x, mask=mask)
    else:
        tl.store(ptr, x)


@triton.jit
def _step_block(
    param_ptr, grad_ptr, m_ptr, v_ptr, s_ptr, offs, numel, t, lr, grad_scale_ptr, stats_row, seed_ptr,
    beta1, one_minus_beta1, beta2, one_minus_beta2, rho, one_minus_rho, lb1_hi, lb1_lo, lb2_hi, lb2_lo,
    lrho_hi, lrho_lo, eps, weight_decay, alpha, softness, gate_eps, warmup_steps,
    GATE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr, TRACK_STATS: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr,
):
    """BLOCK elements of one tensor: every element of theta, g, m, v, s read once, theta, m, v, s
    written once. MASKED=False is the fast path: a full block of 16-byte-aligned tensors."""
    mask = offs < numel
    p = _load(param_ptr, mask, MASKED)
    g = _load(grad_ptr, mask, MASKED)
    m = _load(m_ptr, mask, MASKED)
    v = _load(v_ptr, mask, MASKED)
    s = _load(s_ptr, mask, MASKED)

    if HAS_GRAD_SCALE:
        g = g / tl.load(grad_scale_ptr).to(tl.float32)
    if MAXIMIZE:
        g = -g

    # step was incremented before the launch; bias corrections are per-program scalars
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
        rounded = _stochastic_round_bf16(p, tl.load(seed_ptr), offs + (t.to(tl.int64) << 40))
        if MASKED:
            tl.store(param_ptr, rounded, mask=mask)
        else:
            tl.store(param_ptr, rounded)
    else:
        _store(param_ptr, p, mask, MASKED)
    _store(m_ptr, m, mask, MASKED)
    _store(v_ptr, v, mask, MASKED)
    _store(s_ptr, s, mask, MASKED)

    if TRACK_STATS:  # partial sums per program, reduced on the device when stats() is read
        zero = tl.zeros([BLOCK], tl.float32)
        tl.store(stats_row + SUM_Q, tl.sum(tl.where(mask, q, zero)))
        tl.store(stats_row + COUNT_ABOVE, tl.sum(tl.where(mask & (signal > noise), 1.0, zero)))
        tl.store(stats_row + SUM_SIGNAL, tl.sum(tl.where(mask, signal, zero)))
        tl.store(stats_row + SUM_NOISE, tl.sum(tl.where(mask, noise, zero)))


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
    start = tl.multiple_of((pid - tl.load(row + FIRST_BLOCK)) * BLOCK, BLOCK)
    aligned = tl.load(row + ALIGNED)
    # step was incremented before the launch
    t = tl.load(step_ptr + tl.load(row + STEP_SLOT)).to(tl.float64)
    if LR_IS_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float32)

    if HAS_FOUND_INF:  # GradScaler found inf/nan: every block masked off, nothing read or written
        numel = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    state_idx = state_offset + offs
    param_base = param_addr.to(tl.pointer_type(PARAM_DTYPE))
    grad_base = grad_addr.to(tl.pointer_type(PARAM_DTYPE))
    stats_row = stats_ptr + pid * STAT_COLUMNS
    if (aligned != 0) & (start + BLOCK <= numel):
        # the hot path: whole blocks of 16-byte-aligned tensors, unmasked, full-width accesses
        _step_block(
            tl.multiple_of(param_base, 16) + offs, tl.multiple_of(grad_base, 16) + offs,
            exp_avg_ptr + state_idx, exp_avg_sq_ptr + state_idx, exp_grad_var_ptr + state_idx, offs, numel,
            t, lr, grad_scale_ptr, stats_row, row + RNG_SEED,
            beta1, one_minus_beta1, beta2, one_minus_beta2, rho, one_minus_rho, lb1_hi, lb1_lo, lb2_hi,
            lb2_lo, lrho_hi, lrho_lo, eps, weight_decay, alpha, softness, gate_eps, warmup_steps,
            GATE, MAXIMIZE, HAS_GRAD_SCALE, STOCHASTIC_ROUNDING, TRACK_STATS, BLOCK, False)
    else:  # a tensor's last block, or an unaligned tensor (an odd view)
        _step_block(
            param_base + offs, grad_base + offs,
            exp_avg_ptr + state_idx, exp_avg_sq_ptr + state_idx, exp_grad_var_ptr + state_idx, offs, numel,
            t, lr, grad_scale_ptr, stats_row, row + RNG_SEED,
            beta1, one_minus_beta1, beta2, one_minus_beta2, rho, one_minus_rho, lb1_hi, lb1_lo, lb2_hi,
            lb2_lo, lrho_hi, lrho_lo, eps, weight_decay, alpha, softness, gate_eps, warmup_steps,
            GATE, MAXIMIZE, HAS_GRAD_SCALE, STOCHASTIC_ROUNDING, TRACK_STATS, BLOCK, True)
