"""The fused SNR-AdamW step: one Triton launch per (param group, device, dtype).

Each program updates BLOCK elements of one tensor. It finds its tensor in a block table, and
the tensor's param, grad and state addresses, length and step slot in a metadata table
(snr_triton/tables.py), both built once per active set on the host; only the param and grad
addresses are refreshed when storages move. Every element's theta, g, m, v, s is read once and
theta, m, v, s written once: ALGORITHM.md's 36 bytes per fp32 element. With 8-bit states a
program's BLOCK elements are whole code blocks: it decodes m, v, s, steps, takes each code
block's absmax and encodes (snr_triton/codebook.py), all in registers.
"""

import triton
import triton.language as tl

from snr_triton import contract

# The contract (snr_triton/contract.py) as compile-time constants: table columns, gate ids,
# stats columns.
ROW_COLUMNS = tl.constexpr(len(contract.ROW))
PARAM_ADDR = tl.constexpr(contract.ROW.index("param_addr"))
GRAD_ADDR = tl.constexpr(contract.ROW.index("grad_addr"))
EXP_AVG_ADDR = tl.constexpr(contract.ROW.index("exp_avg_addr"))
EXP_AVG_SQ_ADDR = tl.constexpr(contract.ROW.index("exp_avg_sq_addr"))
EXP_GRAD_VAR_ADDR = tl.constexpr(contract.ROW.index("exp_grad_var_addr"))
NUMEL = tl.constexpr(contract.ROW.index("numel"))
FIRST_BLOCK = tl.constexpr(contract.ROW.index("first_block"))
STEP_SLOT = tl.constexpr(contract.ROW.index("step_slot"))
RNG_SEED = tl.constexpr(contract.ROW.index("rng_seed"))
ALIGNED = tl.constexpr(contract.ROW.index("aligned"))
EXP_AVG_SCALES_ADDR = tl.constexpr(contract.ROW.index("exp_avg_scales_addr"))
EXP_AVG_SQ_SCALES_ADDR = tl.constexpr(contract.ROW.index("exp_avg_sq_scales_addr"))
EXP_GRAD_VAR_SCALES_ADDR = tl.constexpr(contract.ROW.index("exp_grad_var_scales_addr"))
CODE_BLOCK = tl.constexpr(contract.CODE_BLOCK)
LUT_EXP_MIN = tl.constexpr(contract.LUT_EXP_MIN)
LUT_MANTISSA_BITS = tl.constexpr(contract.LUT_MANTISSA_BITS)
LUT_HALF = tl.constexpr(contract.LUT_HALF)
LUT_SHIFT = tl.constexpr(23 - contract.LUT_MANTISSA_BITS)  # the mantissa bits a bucket drops
LUT_MANTISSA_MASK = tl.constexpr((1 << contract.LUT_MANTISSA_BITS) - 1)
LUT_LOW_MASK = tl.constexpr((1 << (23 - contract.LUT_MANTISSA_BITS)) - 1)  # the mantissa bits below a bucket's
GATE_NONE = tl.constexpr(contract.GATE_IDS["none"])
GATE_SNR = tl.constexpr(contract.GATE_IDS["snr"])
GATE_SOFT = tl.constexpr(contract.GATE_IDS["soft"])
GATE_HARD = tl.constexpr(contract.GATE_IDS["hard"])
STAT_COLUMNS = tl.constexpr(len(contract.STATS))
SUM_Q = tl.constexpr(contract.STATS.index("sum_q"))
COUNT_ABOVE = tl.constexpr(contract.STATS.index("count_above"))
SUM_SIGNAL = tl.constexpr(contract.STATS.index("sum_signal"))
SUM_NOISE = tl.constexpr(contract.STATS.index("sum_noise"))


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
def _load5(p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, mask, MASKED: tl.constexpr):
    return (_load(p_ptr, mask, MASKED), _load(g_ptr, mask, MASKED), _load(m_ptr, mask, MASKED),
            _load(v_ptr, mask, MASKED), _load(s_ptr, mask, MASKED))


@triton.jit
def _store_param(p_ptr, p, mask, seed_ptr, rand_offsets, STOCHASTIC_ROUNDING: tl.constexpr, MASKED: tl.constexpr):
    if STOCHASTIC_ROUNDING:  # the param's own stream (its seed), varied by element and step
        rounded = _stochastic_round_bf16(p, tl.load(seed_ptr), rand_offsets)
        if MASKED:
            tl.store(p_ptr, rounded, mask=mask)
        else:
            tl.store(p_ptr, rounded)
    else:
        _store(p_ptr, p, mask, MASKED)


@triton.jit
def _store4(p_ptr, m_ptr, v_ptr, s_ptr, p, m, v, s, mask, seed_ptr, rand_offsets,
            STOCHASTIC_ROUNDING: tl.constexpr, MASKED: tl.constexpr):
    _store_param(p_ptr, p, mask, seed_ptr, rand_offsets, STOCHASTIC_ROUNDING, MASKED)
    _store(m_ptr, m, mask, MASKED)
    _store(v_ptr, v, mask, MASKED)
    _store(s_ptr, s, mask, MASKED)


@triton.jit
def _decode(codes, scales_ptr, offs, mask, values_ptr):
    """8-bit state values: table[code] * the scale of the element's code block (codes arrive as
    float32 from _load: small integers, exact)."""
    scale = tl.load(scales_ptr + offs // CODE_BLOCK, mask=mask, other=0.0)
    code = tl.where(mask, codes, 0.0).to(tl.int32)  # a masked lane's load is undefined: not an index
    return tl.load(values_ptr + code, mask=mask, other=0.0) * scale


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _encode(x, mask, codes_ptr, scales_ptr, offs, start, numel, lut_ptr, BLOCK: tl.constexpr,
            MASKED: tl.constexpr):
    """Each code block's scale (max |x|) and the codes of x / scale (ALGORITHM.md "8-bit states"):
    y's sign, exponent and top mantissa bits pick a lookup bucket, which holds the code of its
    smallest y and at most one threshold, whose low mantissa bits (codebook.packed_lut) one
    comparison with y's finishes it (as the C kernel)."""
    ax = tl.where(mask, tl.abs(x), 0.0)
    # a max that keeps a NaN, as torch.amax's and the reference's (tl.max skips it): the block
    # decodes as NaN, as float states keep a NaN
    a = tl.reduce(tl.reshape(ax, [BLOCK // CODE_BLOCK, CODE_BLOCK]), 1, _max_keeping_nan)
    a_each = tl.reshape(tl.broadcast_to(a[:, None], [BLOCK // CODE_BLOCK, CODE_BLOCK]), [BLOCK])
    y = tl.math.div_rn(x, tl.where(a_each == 0.0, 1.0, a_each))  # a = 0: every x is 0, y = 0
    bits = y.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    e = tl.minimum(mag >> 23, 127)
    k = tl.where(e < LUT_EXP_MIN, 0,
                 ((e - LUT_EXP_MIN) << LUT_MANTISSA_BITS) | ((mag >> LUT_SHIFT) & LUT_MANTISSA_MASK))
    k = k + tl.where(bits < 0, LUT_HALF, 0)
    entry = tl.load(lut_ptr + k)
    low = (bits ^ (bits >> 31)) & LUT_LOW_MASK  # inverted when negative, as the entry's threshold bits
    code = ((entry & 0xFF) + tl.where(low > (entry >> 8), 1, 0)).to(tl.uint8)
    if MASKED:
        tl.store(codes_ptr, code, mask=mask)
    else:
        tl.store(codes_ptr, code)
    block = start // CODE_BLOCK + tl.arange(0, BLOCK // CODE_BLOCK).to(tl.int64)
    tl.store(scales_ptr + block, a, mask=block * CODE_BLOCK < numel)


@triton.jit
def _gate(m, s, first, bc1_over_sqrt_bc3, gate_eps_bc1_sq, alpha, softness, GATE: tl.constexpr):
    """q of ALGORITHM.md, overflow-safe: m-hat^2 and alpha*s-hat are never formed. A = |m| and
    B = sqrt(s)*bc1/sqrt(bc3) (B/bc1 = sqrt(s-hat)); B weighed by the root of the coefficient k its
    square has in the gate's denominator (snr: lambda*alpha; soft: max(alpha, lambda); hard:
    alpha), B' = B*sqrt(k), so that where k = 0 (softness = 0, say) a large s does not push m out of
    float32's range; both divided by C = max(A, B'): x = m-hat^2/c^2 and yk = k*s-hat/c^2 lie in
    [0, 1], and delta/c^2 = delta*bc1^2/C^2; q = 0 when C = 0. Finite in [0, 1] for every finite m
    and s. `above` (m-hat^2 > alpha*s-hat) compares A with sqrt(alpha)*B unsquared."""
    a = tl.abs(m)
    b = tl.where(first, a, tl.sqrt_rn(s) * bc1_over_sqrt_bc3)  # t = 1: s-hat := m-hat^2
    if GATE == GATE_SNR:
        k = softness * alpha
    elif GATE == GATE_SOFT:
        k = tl.maximum(alpha, softness)
    else:
        k = alpha
    k = tl.cast(k, tl.float32)  # a hyperparameter below float32's range arrives as fp64: 0 here, as in the math
    bk = tl.where(k > 0.0, b * tl.sqrt_rn(k), 0.0)  # not inf * 0 where s overflowed
    c = tl.maximum(a, bk)
    nonzero = c > 0.0
    # 1/c of a subnormal c overflows, and 0 * inf would be NaN: FLT_MAX (1/c for every normal c is
    # below it) keeps ra, rb finite and the tail inf, so q = 0, as the C kernel's exact scaling gives
    inv = tl.minimum(1.0 / tl.where(nonzero, c, 1.0), 3.4028234663852886e38)
    ra = tl.where(a >= bk, 1.0, a * inv)  # the larger is exactly 1: also when s overflowed to inf
    rb = tl.where(bk >= a, 1.0, bk * inv)
    x = ra * ra
    yk = rb * rb
    tail = (gate_eps_bc1_sq * inv) * inv
    # each denominator is floored at float32's smallest normal: it is 0 only where its numerator is,
    # and 0 / 0 would be NaN, not q = 0
    if GATE == GATE_SNR:
        q = x / tl.maximum(x + yk + tail, 1.1754943508222875e-38)
    elif GATE == GATE_SOFT:
        k_pos = tl.maximum(k, 1.1754943508222875e-38)
        d = tl.maximum(x - (alpha / k_pos) * yk, 0.0)
        q = d / tl.maximum(d + (softness / k_pos) * yk + tail, 1.1754943508222875e-38)
    elif GATE == GATE_HARD:
        q = tl.where(x > yk, 1.0, 0.0)
    else:  # none
        q = tl.full(m.shape, 1.0, tl.float32)
    if GATE != GATE_NONE:
        q = tl.where(nonzero, q, 0.0)  # m = s = 0
    return q, a > tl.sqrt_rn(tl.cast(alpha, tl.float32)) * b


@triton.jit
def snr_adamw_kernel(
    meta_ptr, block_tensor_ptr, step_ptr,
    lr, lr_ptr, grad_scale_ptr, found_inf_ptr, stats_ptr,
    beta1, one_minus_beta1, beta2, one_minus_beta2, rho, one_minus_rho,
    lb1_hi, lb1_lo, lb2_hi, lb2_lo, lrho_hi, lrho_lo,
    eps, weight_decay, alpha, softness, gate_eps, warmup_steps, code_values_ptr, code_lut_ptr,
    PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, GATE: tl.constexpr, MAXIMIZE: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr, TRACK_STATS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_tensor_ptr + pid).to(tl.int64)
    row = meta_ptr + tensor * ROW_COLUMNS
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
    mask = offs < numel
    p_base = tl.load(row + PARAM_ADDR).to(tl.pointer_type(PARAM_DTYPE))
    g_base = tl.load(row + GRAD_ADDR).to(tl.pointer_type(PARAM_DTYPE))
    m_base = tl.load(row + EXP_AVG_ADDR).to(tl.pointer_type(STATE_DTYPE))
    v_base = tl.load(row + EXP_AVG_SQ_ADDR).to(tl.pointer_type(STATE_DTYPE))
    s_base = tl.load(row + EXP_GRAD_VAR_ADDR).to(tl.pointer_type(STATE_DTYPE))
    hot = (aligned != 0) & (start + BLOCK <= numel)
    if hot:  # whole blocks of 16-byte-aligned tensors: unmasked, full-width accesses
        p, g, m, v, s = _load5(tl.multiple_of(p_base, 16) + offs, tl.multiple_of(g_base, 16) + offs,
                               tl.multiple_of(m_base, 16) + offs, tl.multiple_of(v_base, 16) + offs,
                               tl.multiple_of(s_base, 16) + offs, mask, False)
    else:  # a tensor's last block, or an unaligned tensor (an odd view)
        p, g, m, v, s = _load5(p_base + offs, g_base + offs, m_base + offs, v_base + offs, s_base + offs,
                               mask, True)

    CODED: tl.constexpr = STATE_DTYPE == tl.uint8
    if CODED:  # 8-bit states: code_values_ptr holds the signed then the unsigned table's 256
        # values, code_lut_ptr their two packed lookup tables (codebook.kernel_buffer from its
        # element 512 on)
        ms_ptr = tl.load(row + EXP_AVG_SCALES_ADDR).to(tl.pointer_type(tl.float32))
        vs_ptr = tl.load(row + EXP_AVG_SQ_SCALES_ADDR).to(tl.pointer_type(tl.float32))
        ss_ptr = tl.load(row + EXP_GRAD_VAR_SCALES_ADDR).to(tl.pointer_type(tl.float32))
        m = _decode(m, ms_ptr, offs, mask, code_values_ptr)
        v = _decode(v, vs_ptr, offs, mask, code_values_ptr + 256)
        s = _decode(s, ss_ptr, offs, mask, code_values_ptr + 256)
    if HAS_GRAD_SCALE:
        g = g / tl.load(grad_scale_ptr).to(tl.float32)
    if MAXIMIZE:
        g = -g
    # bias corrections: per-program scalars
    bc1 = _one_minus_pow(lb1_hi, lb1_lo, t)
    bc2 = _one_minus_pow(lb2_hi, lb2_lo, t)
    bc3 = _one_minus_pow(lrho_hi, lrho_lo, t)

    diff = g - m  # m before this step's update
    # (1-rho)*diff first: finite for every finite g; rho = 0 forgets s (0 * inf would be NaN)
    s = tl.where(rho != 0.0, rho * s, 0.0) + (one_minus_rho * diff) * diff
    # torch's lerp(m, g, w = 1 - beta1), both of its branches: from g when w >= 0.5, so that
    # beta1 = 0 gives m = g exactly (m + w * (g - m) cancels to 0 where |m| >> |g|)
    m = tl.where(one_minus_beta1 < 0.5, m + one_minus_beta1 * diff, g - diff * (1.0 - one_minus_beta1))
    v = beta2 * v + (one_minus_beta2 * g) * g  # as torch's addcmul
    denom = tl.sqrt_rn(v) / tl.sqrt_rn(bc2) + eps
    first = t == 1.0  # ALGORITHM.md: at t = 1 the gate uses s-hat := m-hat^2
    q, above = _gate(m, s, first, bc1 / tl.sqrt_rn(bc3), gate_eps * bc1 * bc1, alpha, softness, GATE)
    q = tl.where(t <= warmup_steps, 1.0, q)
    p = p * (1.0 - lr * weight_decay)
    p = p - (lr / bc1) * (q * m / denom)

    rand_offsets = offs + (t.to(tl.int64) << 40)
    if CODED:
        if hot:
            _store_param(tl.multiple_of(p_base, 16) + offs, p, mask, row + RNG_SEED, rand_offsets,
                         STOCHASTIC_ROUNDING, False)
        else:
            _store_param(p_base + offs, p, mask, row + RNG_SEED, rand_offsets, STOCHASTIC_ROUNDING, True)
        lut_unsigned = code_lut_ptr + 2 * LUT_HALF
        _encode(m, mask, m_base + offs, ms_ptr, offs, start, numel, code_lut_ptr, BLOCK, True)
        _encode(v, mask, v_base + offs, vs_ptr, offs, start, numel, lut_unsigned, BLOCK, True)
        _encode(s, mask, s_base + offs, ss_ptr, offs, start, numel, lut_unsigned, BLOCK, True)
    elif hot:
        _store4(tl.multiple_of(p_base, 16) + offs, tl.multiple_of(m_base, 16) + offs,
                tl.multiple_of(v_base, 16) + offs, tl.multiple_of(s_base, 16) + offs, p, m, v, s, mask,
                row + RNG_SEED, rand_offsets, STOCHASTIC_ROUNDING, False)
    else:
        _store4(p_base + offs, m_base + offs, v_base + offs, s_base + offs, p, m, v, s, mask, row + RNG_SEED,
                rand_offsets, STOCHASTIC_ROUNDING, True)

    if TRACK_STATS:  # partial sums per program, reduced on the device when stats() is read
        mhat = m / bc1
        signal = mhat * mhat
        noise = alpha * tl.where(first, signal, s / bc3)
        zero = tl.zeros([BLOCK], tl.float32)
        stats_row = stats_ptr + pid * STAT_COLUMNS
        tl.store(stats_row + SUM_Q, tl.sum(tl.where(mask, q, zero)))
        tl.store(stats_row + COUNT_ABOVE, tl.sum(tl.where(mask & above, 1.0, zero)))
        tl.store(stats_row + SUM_SIGNAL, tl.sum(tl.where(mask, signal, zero)))
        tl.store(stats_row + SUM_NOISE, tl.sum(tl.where(mask, noise, zero)))


@triton.jit
def grad_sq_kernel(meta_ptr, block_tensor_ptr, out_ptr, PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Sum of g^2 over each block of the bucket's active grads (the global grad norm of
    `max_grad_norm`), one partial per program, in float64: finite for every finite float32 grad
    (|g| = 3e19 squares past float32's range). Reads g once: 4 bytes per fp32 element."""
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_tensor_ptr + pid).to(tl.int64)
    row = meta_ptr + tensor * ROW_COLUMNS
    numel = tl.load(row + NUMEL)
    start = (pid - tl.load(row + FIRST_BLOCK)) * BLOCK
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    g_base = tl.load(row + GRAD_ADDR).to(tl.pointer_type(PARAM_DTYPE))
    g = tl.load(g_base + offs, mask=offs < numel, other=0.0).to(tl.float64)
    tl.store(out_ptr + pid, tl.sum(g * g))


@triton.jit
def clip_coefficients_kernel(total_ptr, scale_ptr, found_ptr, skipped_ptr, divide_by_ptr, found_out_ptr,
                             norm_out_ptr, skipped_out_ptr, max_norm: tl.float64, HAS_SCALE: tl.constexpr,
                             HAS_FOUND: tl.constexpr, HAS_SKIPPED: tl.constexpr):
    """max_grad_norm's coefficient from the sum of squares, in one launch instead of a dozen small
    ops (snr_triton/clipping.py's `torch_ops` is the same arithmetic, op for op, in float64): the
    norm N (after unscaling), the multiplier the step divides g by, found_inf with a non-finite N
    added, and the count of skipped steps. Its float64 division and sqrt are IEEE's, correctly
    rounded (div.rn.f64, sqrt.rn.f64: tests/test_codegen.py reads the PTX)."""
    norm = tl.sqrt(tl.load(total_ptr).to(tl.float64))
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float64)
        norm = norm / scale
    # torch's `c / t` is reciprocal(t) * c: the same two roundings here
    k = tl.minimum((1.0 / (norm + 1e-6)) * max_norm, 1.0)
    bad = (norm - norm) != 0.0  # inf or NaN
    k = tl.where(bad, 1.0, k)  # (its divisor is not used then)
    if HAS_SCALE:
        divide_by = scale / k
    else:
        divide_by = 1.0 / k
    found = tl.where(bad, 1.0, 0.0).to(tl.float32)
    if HAS_FOUND:
        found = found + tl.load(found_ptr).to(tl.float32)
    tl.store(divide_by_ptr, tl.where(bad, 1.0, divide_by).to(tl.float32))
    tl.store(found_out_ptr, found)
    tl.store(norm_out_ptr, norm.to(tl.float32))
    skipped = tl.where(found != 0.0, 1.0, 0.0).to(tl.float64)
    if HAS_SKIPPED:
        skipped = skipped + tl.load(skipped_ptr).to(tl.float64)
    tl.store(skipped_out_ptr, skipped)
