/* The fused SNR-AdamW step for CPU tensors: one pass per element, the CPU twin of snr_adamw.py.
 *
 * Compiled on first use by snr_triton/backend/cpu.py (the system C compiler, -O3) and cached on
 * disk, so later processes start at once. Threads are plain pthreads, not OpenMP: a second OpenMP
 * runtime beside torch's own would share the process badly. Work is a table of chunks, each a slice of
 * one tensor; params, grads and each param's own states are reached through an address table.
 * Math in float32, bias corrections in float64 once per chunk. 8-bit states (codes and one scale
 * per CODE_BLOCK elements, snr_triton/codebook.py) are decoded into float32 buffers a few blocks
 * at a time, stepped by the float32-state loop, and encoded back.
 *
 * The contract (gate ids, table columns, stats columns) is not written here: it comes from
 * snr_triton/contract.py as -D defines when snr_triton/backend/cpu.py compiles this file.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define DECODE_VBMI 1 /* decode_block's byte-table lookups, below */
#endif

#if !defined(GATE_SNR) || !defined(ROW_COLUMNS) || !defined(STAT_COLUMNS)
#error "compile through snr_triton/backend/cpu.py: it passes the kernel contract as -D defines"
#endif

typedef struct {
    double beta1, beta2, rho, eps, weight_decay, alpha, softness, gate_eps, lr, inv_grad_scale;
    int64_t warmup_steps;
} Hyper;

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } x = { (uint32_t)h << 16 };
    return x.f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as c10::BFloat16 */
    union { float f; uint32_t u; } x = { f };
    if (isnan(f)) return (uint16_t)((x.u >> 16) | 0x40);
    return (uint16_t)((x.u + 0x7FFF + ((x.u >> 16) & 1)) >> 16);
}

static inline int32_t float_bits(float f) {
    union { float f; int32_t i; } x = { f };
    return x.i;
}

static inline float bits_float(int32_t i) {
    union { int32_t i; float f; } x = { i };
    return x.f;
}

/* floor(log2(b_scale)): b_scale = bc1 / sqrt(bc3) lies in [2^-54, 2^27] for any betas and rho in
 * [0, 1) held in double, which bounds the scaled y = s * r^2 * b_scale^2 of the gate below. */
static int32_t b_scale_exponent(double b_scale) {
    int e;
    frexp(b_scale, &e);
    return e - 1;
}

/* Calls LOOP with the gate, the stats flag and t = 1 as compile-time constants. */
#define GATE_SWITCH(LOOP, STATS, FIRST)                                                             \
    switch (gate) {                                                                                 \
    case GATE_SNR: LOOP(param, grad, m, v, s, n, h, t, maximize, stats, GATE_SNR, STATS, FIRST); break;   \
    case GATE_SOFT: LOOP(param, grad, m, v, s, n, h, t, maximize, stats, GATE_SOFT, STATS, FIRST); break; \
    case GATE_HARD: LOOP(param, grad, m, v, s, n, h, t, maximize, stats, GATE_HARD, STATS, FIRST); break; \
    default: LOOP(param, grad, m, v, s, n, h, t, maximize, stats, GATE_NONE, STATS, FIRST);               \
    }

/* One chunk; P and S are the param and state storage types (float or uint16_t = bf16). GATE, STATS
 * and FIRST (t = 1) are compile-time constants at every call, so each variant is a branch-free,
 * vectorized loop (a run-time t = 1 test made the compiler compute both gates and select). */
#define DEFINE_CHUNK(NAME, P, LOADP, STOREP, S, LOADS, STORES)                                      \
static inline __attribute__((always_inline)) void NAME##_loop(                                     \
        P *restrict param, const P *restrict grad, S *restrict m_buf, S *restrict v_buf,           \
        S *restrict s_buf, int64_t n, const Hyper *h, double t, int maximize, double *stats,       \
        const int GATE, const int STATS, const int FIRST) {                                         \
    const double bc1 = 1.0 - pow(h->beta1, t), bc3 = 1.0 - pow(h->rho, t);                        \
    const float inv_bc1 = (float)(1.0 / bc1);                                                      \
    const float inv_bc2_sqrt = (float)(1.0 / sqrt(1.0 - pow(h->beta2, t)));                        \
    const float inv_bc3 = (float)(1.0 / bc3);                                                      \
    /* b = bc1 * sqrt(s-hat) = sqrt(s) * bc1 / sqrt(bc3), kept squared (no sqrt per element). The  \
     * scale weighs b by the root of the coefficient its square has in the gate's denominator    \
     * (snr: lambda*alpha; soft: the larger of alpha, lambda; hard and stats: alpha): where that is \
     * 0 (softness = 0, say), a large s must not push m below float32's range. */                \
    const double coef = GATE == GATE_SNR ? h->softness * h->alpha                                  \
                      : GATE == GATE_SOFT ? (h->alpha > h->softness ? h->alpha : h->softness) : h->alpha; \
    const int32_t b_scale_exp = coef > 0 ? b_scale_exponent(bc1 / sqrt(bc3) * sqrt(coef)) : -(1 << 20); \
    const float tail_scale = (float)(h->gate_eps * bc1 * bc1);                                     \
    const float omb1 = (float)(1.0 - h->beta1);                                                    \
    const int lerp_low = omb1 < 0.5f;                                                              \
    const float lerp_w = lerp_low ? omb1 : -(1.0f - omb1); /* as torch: 1 - weight, in float */  \
    const float b2 = (float)h->beta2, omb2 = (float)(1.0 - h->beta2);                             \
    const float rho = (float)h->rho, omrho = (float)(1.0 - h->rho);                               \
    const float eps = (float)h->eps, alpha = (float)h->alpha;                                      \
    const double b_scale_sq = FIRST ? 1.0 : bc1 * bc1 / bc3; /* t = 1: y = x, no b_scale */      \
    const float alpha_y = (float)(h->alpha * b_scale_sq), lam_y = (float)(h->softness * b_scale_sq);  \
    const float lam_alpha_y = (float)(h->softness * h->alpha * b_scale_sq);                        \
    const float decay = (float)(1.0 - h->lr * h->weight_decay);                                    \
    const float step_size = (float)(h->lr / bc1);                                                  \
    const float sign = (float)(maximize ? -h->inv_grad_scale : h->inv_grad_scale);                 \
    double sum_q = 0, sum_above = 0, sum_signal = 0, sum_noise = 0;                                \
    _Pragma("omp simd reduction(+:sum_q,sum_above,sum_signal,sum_noise)")                         \
    for (int64_t i = 0; i < n; i++) {                                                              \
        const float g = LOADP(grad[i]) * sign;                                                     \
        float m = LOADS(m_buf[i]);                                                                 \
        const float diff = g - m;                                                                  \
        /* finite for finite g; rho = 0 forgets s (0 * inf would be NaN) by a select of the old s, \
         * not of rho * s: a multiply under a condition may trap, so gcc keeps it a branch where   \
         * it has no masked multiply (AVX2), and the whole loop stayed scalar, 5-10x slower */    \
        const float s_kept = rho != 0.0f ? LOADS(s_buf[i]) : 0.0f;                                 \
        const float s = rho * s_kept + (omrho * diff) * diff;                                      \
        /* torch's lerp(m, g, w = 1 - beta1), both branches: from g when w >= 0.5, so beta1 = 0   \
         * gives m = g exactly (m + w * (g - m) cancels to 0 where |m| >> |g|) */                \
        m = (lerp_low ? m : g) + lerp_w * diff; /* g - (1 - w) * diff: the same rounding */      \
        const float v = b2 * LOADS(v_buf[i]) + (omb2 * g) * g; /* as torch's addcmul */            \
        const float denom = sqrtf(v) * inv_bc2_sqrt + eps;                                         \
        /* the gate, overflow-safe (ALGORITHM.md "Numerics"): a = |m| and b*sqrt(coef), b =      \
         * bc1 * sqrt(s-hat), are scaled by r, a power of two from their exponents (exact, no     \
         * division): the larger of the two scaled lies in [2^-1.5, 2), so x = (a*r)^2 and        \
         * coef*y = coef*(b*r)^2 neither overflow nor vanish. y = b_scale^2 * (s*r*r), the        \
         * b_scale^2 folded into the coefficients of y. The                                       \
         * gate is x/(x + lambda*alpha*y + tail) (snr; soft likewise), folded with m/denom into    \
         * one division: update = m * (x / ((x + ...) * denom)). */                               \
        const int32_t ea = (float_bits(m) >> 23) & 255; /* |m|'s exponent field */               \
        const int32_t es = (float_bits(s) >> 23) & 255; /* sqrt(s)'s exponent field: (es + 127) / 2 */ \
        const int32_t eb = FIRST ? ea : ((es + 127) >> 1) + b_scale_exp;                          \
        const int32_t e0 = ea > eb ? ea : eb, e = e0 < 252 ? e0 : 252;                             \
        const float r = bits_float((253 - e) << 23); /* 2^(126 - e): a normal float */            \
        const float mr = m * r, x = mr * mr;                                                       \
        const float ys0 = (s * r) * r; /* y / b_scale^2, finite where coef > 0 (t = 1: y = x) */  \
        const float ys = FIRST ? x : (ys0 < FLT_MAX ? ys0 : FLT_MAX); /* not inf: 0 * inf = NaN */ \
        const float tail = (tail_scale * r) * r; /* inf for tiny a, b: q = 0, as exactly */       \
        const int above = x > alpha_y * ys;                                                        \
        const float d = x - alpha_y * ys > 0.0f ? x - alpha_y * ys : 0.0f;                         \
        const float num = GATE == GATE_SNR ? x : d;                                                \
        const float den0 = GATE == GATE_SNR ? x + lam_alpha_y * ys + tail : d + lam_y * ys + tail; \
        const float dd0 = den0 * denom, dd = dd0 > FLT_MIN ? dd0 : FLT_MIN; /* 0 only where num is */ \
        /* the hard gate's select as a mask of the bits: `above ? m / denom : 0` lets gcc move the \
         * division under the condition, a branch where it has no masked division (AVX2) */     \
        const float adam = m / denom;                                                              \
        const float update = GATE == GATE_NONE ? adam                                              \
                           : GATE == GATE_HARD ? bits_float(float_bits(adam) & -above)             \
                           : m * (num / dd);                                                        \
        const float p = LOADP(param[i]) * decay - step_size * update;                              \
        param[i] = STOREP(p);                                                                      \
        m_buf[i] = STORES(m);                                                                      \
        v_buf[i] = STORES(v);                                                                      \
        s_buf[i] = STORES(s);                                                                      \
        if (STATS) {                                                                               \
            const float mhat = m * inv_bc1, signal = mhat * mhat;                                  \
            const float q = GATE == GATE_NONE ? 1.0f : GATE == GATE_HARD ? (float)above            \
                          : num / (den0 > FLT_MIN ? den0 : FLT_MIN);                               \
            sum_q += q; sum_above += (double)above;                                                \
            sum_signal += signal; sum_noise += alpha * (FIRST ? signal : s * inv_bc3);             \
        }                                                                                          \
    }                                                                                              \
    if (STATS) {                                                                                   \
        stats[STAT_SUM_Q] = sum_q; stats[STAT_COUNT_ABOVE] = sum_above;                            \
        stats[STAT_SUM_SIGNAL] = sum_signal; stats[STAT_SUM_NOISE] = sum_noise;                    \
    }                                                                                              \
}                                                                                                   \
static void NAME(P *param, const P *grad, S *m, S *v, S *s, int64_t n, const Hyper *h, float step, \
                 int gate, int maximize, double *stats) {                                           \
    const double t = step;                                                                          \
    if (t <= (double)h->warmup_steps) gate = GATE_NONE;                                            \
    if (stats && t == 1.0) GATE_SWITCH(NAME##_loop, 1, 1)                                          \
    else if (stats) GATE_SWITCH(NAME##_loop, 1, 0)                                                  \
    else if (t == 1.0) GATE_SWITCH(NAME##_loop, 0, 1)                                               \
    else GATE_SWITCH(NAME##_loop, 0, 0)                                                             \
}

#define ID(x) (x)
DEFINE_CHUNK(chunk_f32_f32, float, ID, ID, float, ID, ID)
DEFINE_CHUNK(chunk_f32_bf16, float, ID, ID, uint16_t, bf16_to_f32, f32_to_bf16)
DEFINE_CHUNK(chunk_bf16_f32, uint16_t, bf16_to_f32, f32_to_bf16, float, ID, ID)
DEFINE_CHUNK(chunk_bf16_bf16, uint16_t, bf16_to_f32, f32_to_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

/* One 8-bit code table (snr_triton/codebook.py): the 256 values and, per lookup bucket of y's
 * sign, exponent and top mantissa bits, packed_lut's entry: the code of the bucket's smallest y
 * (bits 0-7) and the low mantissa bits of the threshold in the bucket (inverted in negative
 * buckets; all ones where there is none). */
typedef struct {
    const float *values;
    const int32_t *packed;
    _Alignas(64) uint8_t planes[4][256]; /* byte k of every value: the VBMI decode's tables */
} Codes;

static void make_planes(Codes *c) {
    for (int i = 0; i < 256; i++) {
        uint32_t u;
        memcpy(&u, c->values + i, 4);
        for (int k = 0; k < 4; k++) c->planes[k][i] = (uint8_t)(u >> (8 * k));
    }
}

/* Scalar loads, eight codes from one 64-bit load, the loop not vectorized: on an AMD EPYC with
 * AVX-512 (2026-12-04) m, v and s decoded in 0.54-0.56 ns per element, against 0.80-0.86 with the
 * 16-lane gathers gcc makes of the vectorized loop (and 0.36-0.45 ns per element per table for
 * 8-lane AVX2 gathers, 0.18 for these loads, in a microbenchmark). */
__attribute__((optimize("no-tree-vectorize")))
static void decode_scalar(const uint8_t *restrict codes, float scale, const float *restrict values,
                          float *restrict out, int n) {
    int i = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ /* code i + j is byte j of w */
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, codes + i, 8);
        for (int j = 0; j < 8; j++) out[i + j] = values[(w >> (8 * j)) & 255] * scale;
    }
#endif
    for (; i < n; i++) out[i] = values[codes[i]] * scale;
}

#ifdef DECODE_VBMI
/* With AVX-512 VBMI, 64 codes at a time without a memory lookup per element: each byte of the
 * 256 values is one 256-byte table, looked up by two vpermi2b (128 entries each) and a blend on
 * the code's top bit; two rounds of unpacks put the four bytes together into floats (the codes
 * are first shuffled so that the floats come out in order), then one multiply by the scale, as
 * decode_scalar's, so the same bits (a C harness compared the two at every length from 0 to 300;
 * the 8-bit tests run this one wherever the CPU has VBMI). On the AMD EPYC above, m, v and s in
 * 0.10 ns per element against 0.53 (that harness, 2026-12-05). */
static void decode_block(const uint8_t *restrict codes, float scale, const Codes *restrict c,
                         float *restrict out, int n) {
    uint8_t order[64]; /* byte 16L + 4r + i holds code 16r + 4L + i: unpacked, float r*16 + j is code r*16 + j */
    for (int lane = 0; lane < 4; lane++)
        for (int r = 0; r < 4; r++)
            for (int i = 0; i < 4; i++) order[16 * lane + 4 * r + i] = (uint8_t)(16 * r + 4 * lane + i);
    const __m512i perm = _mm512_loadu_si512(order);
    const __m512 s = _mm512_set1_ps(scale);
    int i = 0;
    for (; i + 64 <= n; i += 64) {
        const __m512i x = _mm512_permutexvar_epi8(perm, _mm512_loadu_si512(codes + i));
        const __mmask64 high = _mm512_movepi8_mask(x);
        __m512i b[4];
        for (int k = 0; k < 4; k++) {
            const __m512i *t = (const __m512i *)c->planes[k];
            const __m512i lo = _mm512_permutex2var_epi8(_mm512_load_si512(t), x, _mm512_load_si512(t + 1));
            const __m512i hi = _mm512_permutex2var_epi8(_mm512_load_si512(t + 2), x, _mm512_load_si512(t + 3));
            b[k] = _mm512_mask_blend_epi8(high, lo, hi);
        }
        const __m512i w0 = _mm512_unpacklo_epi8(b[0], b[1]), w1 = _mm512_unpackhi_epi8(b[0], b[1]);
        const __m512i u0 = _mm512_unpacklo_epi8(b[2], b[3]), u1 = _mm512_unpackhi_epi8(b[2], b[3]);
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(w0, u0)), s));
        _mm512_storeu_ps(out + i + 16, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(w0, u0)), s));
        _mm512_storeu_ps(out + i + 32, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(w1, u1)), s));
        _mm512_storeu_ps(out + i + 48, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(w1, u1)), s));
    }
    decode_scalar(codes + i, scale, c->values, out + i, n - i);
}
#else
static void decode_block(const uint8_t *restrict codes, float scale, const Codes *restrict c,
                         float *restrict out, int n) {
    decode_scalar(codes, scale, c->values, out, n);
}
#endif

/* scale = max |x| over the block; codes of x / scale (x / 1 = 0 everywhere when the scale is 0): the
 * nearest code, ties to the lower (the threshold search of codebook.encode), found from y's lookup
 * bucket (sign, exponent, top mantissa bits) with one comparison, as a bucket holds at most one
 * threshold: y's low mantissa bits against the threshold's, both in the entry's one gather. */
static inline void encode_block(const float *restrict x, int n, const Codes *c, uint8_t *restrict codes,
                                float *restrict scale) {
    float a = 0.0f;
    int nan = 0; /* a NaN makes the scale NaN (the max of torch.amax and the reference): the block
                  * decodes as NaN, as float states keep a NaN; a max alone would skip it */
    _Pragma("omp simd reduction(max:a) reduction(|:nan)")
    for (int i = 0; i < n; i++) { const float ax = fabsf(x[i]); a = ax > a ? ax : a; nan |= x[i] != x[i]; }
    a = nan ? NAN : a;
    *scale = a;
    const float d = a == 0.0f ? 1.0f : a;
    const int32_t *restrict packed = c->packed;
    _Pragma("omp simd")
    for (int i = 0; i < n; i++) {
        const float y = x[i] / d;
        const int32_t bits = float_bits(y), mag = bits & 0x7FFFFFFF;
        const int32_t e0 = mag >> 23, e = e0 < 127 ? e0 : 127;
        const int32_t k = (e < LUT_EXP_MIN ? 0 : ((e - LUT_EXP_MIN) << LUT_MANTISSA_BITS)
                           | ((mag >> (23 - LUT_MANTISSA_BITS)) & ((1 << LUT_MANTISSA_BITS) - 1)))
                          + (bits < 0 ? LUT_HALF : 0);
        const int32_t entry = packed[k], low = (bits ^ (bits >> 31)) & ((1 << (23 - LUT_MANTISSA_BITS)) - 1);
        const int32_t above = low > (entry >> 8);
        codes[i] = (uint8_t)((entry & 0xFF) + above);
    }
}

/* A chunk with 8-bit states, SUB elements (whole code blocks) at a time through float buffers a
 * core's cache holds: decode m, v, s, the float32-state loop (F32), encode. */
#define SUB 2048
#define DEFINE_CHUNK_U8(NAME, P, F32)                                                               \
static void NAME(P *param, const P *grad, uint8_t *mc, uint8_t *vc, uint8_t *sc, float *ms, float *vs,  \
                 float *ss, int64_t n, const Hyper *h, float step, int gate, int maximize, double *stats,  \
                 const Codes *sgn, const Codes *uns) {                                              \
    float mb[SUB], vb[SUB], sb[SUB];                                                               \
    double sums[STAT_COLUMNS] = {0}, part[STAT_COLUMNS];                                           \
    for (int64_t off = 0; off < n; off += SUB) {                                                   \
        const int64_t k = n - off < SUB ? n - off : SUB;                                           \
        for (int64_t b = 0; b < k; b += CODE_BLOCK) {                                              \
            const int len = (int)(k - b < CODE_BLOCK ? k - b : CODE_BLOCK);                        \
            const int64_t blk = (off + b) / CODE_BLOCK;                                             \
            decode_block(mc + off + b, ms[blk], sgn, mb + b, len);                                  \
            decode_block(vc + off + b, vs[blk], uns, vb + b, len);                                  \
            decode_block(sc + off + b, ss[blk], uns, sb + b, len);                                  \
        }                                                                                          \
        F32(param + off, grad + off, mb, vb, sb, k, h, step, gate, maximize, stats ? part : 0);    \
        if (stats)                                                                                 \
            for (int j = 0; j < STAT_COLUMNS; j++) sums[j] += part[j];                             \
        for (int64_t b = 0; b < k; b += CODE_BLOCK) {                                              \
            const int len = (int)(k - b < CODE_BLOCK ? k - b : CODE_BLOCK);                        \
            const int64_t blk = (off + b) / CODE_BLOCK;                                             \
            encode_block(mb + b, len, sgn, mc + off + b, ms + blk);                                 \
            encode_block(vb + b, len, uns, vc + off + b, vs + blk);                                 \
            encode_block(sb + b, len, uns, sc + off + b, ss + blk);                                 \
        }                                                                                          \
    }                                                                                              \
    if (stats) memcpy(stats, sums, sizeof sums);                                                   \
}
DEFINE_CHUNK_U8(chunk_f32_u8, float, chunk_f32_f32)
DEFINE_CHUNK_U8(chunk_bf16_u8, uint16_t, chunk_bf16_f32)

enum { STATE_F32 = 0, STATE_BF16 = 1, STATE_U8 = 2 };

typedef struct {
    const int64_t *rows;
    const int32_t *block_tensor;
    int64_t block;
    const float *steps;
    const Hyper *h;
    int gate, maximize, param_bf16, state_kind;
    double *stats;
    int64_t begin, end;
    const Codes *codes; /* [signed, unsigned] for 8-bit states */
} Work;

static void *run_chunks(void *arg) {
    const Work *w = (const Work *)arg;
    const int64_t state_size = w->state_kind == STATE_BF16 ? 2 : w->state_kind == STATE_U8 ? 1 : 4;
    const int64_t param_size = w->param_bf16 ? 2 : 4;
    for (int64_t c = w->begin; c < w->end; c++) {
        const int64_t *row = w->rows + ROW_COLUMNS * (int64_t)w->block_tensor[c];
        const int64_t start = (c - row[ROW_FIRST_BLOCK]) * w->block;
        const int64_t left = row[ROW_NUMEL] - start, n = left < w->block ? left : w->block;
        char *param = (char *)(intptr_t)row[ROW_PARAM_ADDR] + start * param_size;
        const char *grad = (const char *)(intptr_t)row[ROW_GRAD_ADDR] + start * param_size;
        const int64_t off = start * state_size;
        char *m = (char *)(intptr_t)row[ROW_EXP_AVG_ADDR] + off, *v = (char *)(intptr_t)row[ROW_EXP_AVG_SQ_ADDR] + off,
             *s = (char *)(intptr_t)row[ROW_EXP_GRAD_VAR_ADDR] + off;
        const float step = w->steps[row[ROW_STEP_SLOT]];
        double *st = w->stats ? w->stats + STAT_COLUMNS * c : 0;
        if (w->state_kind == STATE_U8) { /* chunks start on a code block: start is a multiple of CODE_BLOCK */
            float *ms = (float *)(intptr_t)row[ROW_EXP_AVG_SCALES_ADDR] + start / CODE_BLOCK;
            float *vs = (float *)(intptr_t)row[ROW_EXP_AVG_SQ_SCALES_ADDR] + start / CODE_BLOCK;
            float *ss = (float *)(intptr_t)row[ROW_EXP_GRAD_VAR_SCALES_ADDR] + start / CODE_BLOCK;
            if (!w->param_bf16)
                chunk_f32_u8((float *)param, (const float *)grad, (uint8_t *)m, (uint8_t *)v, (uint8_t *)s, ms, vs,
                             ss, n, w->h, step, w->gate, w->maximize, st, &w->codes[0], &w->codes[1]);
            else
                chunk_bf16_u8((uint16_t *)param, (const uint16_t *)grad, (uint8_t *)m, (uint8_t *)v, (uint8_t *)s,
                              ms, vs, ss, n, w->h, step, w->gate, w->maximize, st, &w->codes[0], &w->codes[1]);
        } else if (!w->param_bf16 && w->state_kind == STATE_F32)
            chunk_f32_f32((float *)param, (const float *)grad, (float *)m, (float *)v, (float *)s, n,
                          w->h, step, w->gate, w->maximize, st);
        else if (!w->param_bf16)
            chunk_f32_bf16((float *)param, (const float *)grad, (uint16_t *)m, (uint16_t *)v,
                           (uint16_t *)s, n, w->h, step, w->gate, w->maximize, st);
        else if (w->state_kind == STATE_F32)
            chunk_bf16_f32((uint16_t *)param, (const uint16_t *)grad, (float *)m, (float *)v, (float *)s,
                           n, w->h, step, w->gate, w->maximize, st);
        else
            chunk_bf16_bf16((uint16_t *)param, (const uint16_t *)grad, (uint16_t *)m, (uint16_t *)v,
                            (uint16_t *)s, n, w->h, step, w->gate, w->maximize, st);
    }
    return 0;
}

#define MAX_THREADS 256

static int thread_count(int threads, int64_t nchunks) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > nchunks) threads = (int)nchunks;
    return threads < 1 ? 1 : threads;
}

/* fn on each of `threads` work items (`size` bytes apart): item 0 on the calling thread, the others
 * on threads of their own, run here if a thread cannot be started. */
static void run_parallel(void *(*fn)(void *), void *work, size_t size, int threads) {
    pthread_t ids[MAX_THREADS];
    char *items = (char *)work;
    int started = 1;
    for (; started < threads; started++)
        if (pthread_create(&ids[started], 0, fn, items + size * started) != 0) break;
    for (int i = started; i < threads; i++) fn(items + size * i); /* could not start: do it here */
    fn(items);
    for (int i = 1; i < started; i++) pthread_join(ids[i], 0);
}

/* rows: [tensors][ROW_COLUMNS] int64 (snr_triton/contract.py ROW). block_tensor: [nchunks] int32,
 * the row of each chunk of `block` elements. stats: [nchunks][STAT_COLUMNS] or NULL. Chunks are
 * split evenly over `threads` threads, the caller's one. state_kind: STATE_F32, STATE_BF16 or
 * STATE_U8; for 8-bit states `block` is a multiple of CODE_BLOCK and `codebook` holds the signed
 * then the unsigned table's 256 values (floats), then their packed_lut tables of 2 * LUT_HALF
 * int32 each (codebook.kernel_buffer). */
int snr_adamw_step(const int64_t *rows, const int32_t *block_tensor, int64_t nchunks, int64_t block,
                   const float *steps, const Hyper *h, int gate,
                   int maximize, int param_bf16, int state_kind, double *stats, int threads, const int32_t *codebook) {
    Work work[MAX_THREADS];
    Codes codes[2];
    if (state_kind == STATE_U8) {
        if (block % CODE_BLOCK != 0 || !codebook) return -1;
        for (int t = 0; t < 2; t++) {
            codes[t].values = (const float *)(codebook + 256 * t);
            codes[t].packed = codebook + 512 + 2 * LUT_HALF * t;
            make_planes(&codes[t]);
        }
    }
    threads = thread_count(threads, nchunks);
    for (int i = 0; i < threads; i++) {
        Work w = {rows, block_tensor, block, steps, h, gate, maximize, param_bf16,
                  state_kind, stats, nchunks * i / threads, nchunks * (i + 1) / threads, codes};
        work[i] = w;
    }
    run_parallel(run_chunks, work, sizeof(Work), threads);
    return 0;
}

typedef struct {
    const int64_t *rows;
    const int32_t *block_tensor;
    int64_t block, begin, end;
    int param_bf16;
    double *out;
} SqWork;

/* Sum of x^2 over SQ_LANES independent accumulators (one would make the pass wait on the add's
 * latency). Squares are summed in float over runs of SQ_RUN elements per lane and the runs in
 * double: a float-to-double convert per element halved this pass's speed, and a lane's run of 8
 * squares adds at most 7 roundings of 2^-24 to the sum. A chunk whose float runs overflowed (|g| >
 * ~1e19) is summed again in double, so the sum is finite for every finite float grad. */
#define SQ_LANES 32
#define SQ_RUN 8
#define DEFINE_SQ_SUM(NAME, T, LOAD)                                                                \
static double NAME(const T *restrict g, int64_t n) {                                               \
    double lanes[SQ_LANES] = {0};                                                                  \
    const int64_t whole = n - n % (SQ_LANES * SQ_RUN);                                             \
    for (int64_t i = 0; i < whole; i += SQ_LANES * SQ_RUN) {                                       \
        float run[SQ_LANES] = {0};                                                                 \
        for (int k = 0; k < SQ_LANES * SQ_RUN; k += SQ_LANES)                                      \
            _Pragma("omp simd")                                                                    \
            for (int j = 0; j < SQ_LANES; j++) { const float x = LOAD(g[i + k + j]); run[j] += x * x; } \
        _Pragma("omp simd")                                                                        \
        for (int j = 0; j < SQ_LANES; j++) lanes[j] += run[j];                                     \
    }                                                                                              \
    double sum = 0;                                                                                \
    for (int j = 0; j < SQ_LANES; j++) sum += lanes[j];                                            \
    if (!isfinite(sum)) { /* overflowed in float: every element in double */                      \
        sum = 0;                                                                                   \
        for (int64_t i = 0; i < whole; i++) { const double x = LOAD(g[i]); sum += x * x; }        \
    }                                                                                              \
    for (int64_t i = whole; i < n; i++) { const double x = LOAD(g[i]); sum += x * x; }             \
    return sum;                                                                                    \
}
DEFINE_SQ_SUM(sq_sum_f32, float, ID)
DEFINE_SQ_SUM(sq_sum_bf16, uint16_t, bf16_to_f32)

static void *run_sq(void *arg) {
    const SqWork *w = (const SqWork *)arg;
    for (int64_t c = w->begin; c < w->end; c++) {
        const int64_t *row = w->rows + ROW_COLUMNS * (int64_t)w->block_tensor[c];
        const int64_t start = (c - row[ROW_FIRST_BLOCK]) * w->block;
        const int64_t left = row[ROW_NUMEL] - start, n = left < w->block ? left : w->block;
        w->out[c] = w->param_bf16 ? sq_sum_bf16((const uint16_t *)(intptr_t)row[ROW_GRAD_ADDR] + start, n)
                                  : sq_sum_f32((const float *)(intptr_t)row[ROW_GRAD_ADDR] + start, n);
    }
    return 0;
}

/* Sum of g^2 per chunk of the active grads (max_grad_norm's global norm), in double: finite for
 * every finite float grad. out: [nchunks]. Split over threads as snr_adamw_step is. */
int snr_grad_sq(const int64_t *rows, const int32_t *block_tensor, int64_t nchunks, int64_t block, int param_bf16,
                double *out, int threads) {
    SqWork work[MAX_THREADS];
    threads = thread_count(threads, nchunks);
    for (int i = 0; i < threads; i++) {
        SqWork w = {rows, block_tensor, block, nchunks * i / threads, nchunks * (i + 1) / threads, param_bf16, out};
        work[i] = w;
    }
    run_parallel(run_sq, work, sizeof(SqWork), threads);
    return 0;
}

/* What this library was compiled with, in snr_triton.contract.c_defines() order of the names
 * below: the host checks it on load, so a stale or mismatched build is never used. */
int64_t snr_adamw_contract(int64_t *out) {
    const int64_t values[] = {GATE_NONE, GATE_SNR, GATE_SOFT, GATE_HARD, ROW_PARAM_ADDR, ROW_GRAD_ADDR,
                              ROW_EXP_AVG_ADDR, ROW_EXP_AVG_SQ_ADDR, ROW_EXP_GRAD_VAR_ADDR, ROW_NUMEL,
                              ROW_FIRST_BLOCK, ROW_STEP_SLOT, ROW_RNG_SEED, ROW_ALIGNED, STAT_SUM_Q,
                              STAT_COUNT_ABOVE, STAT_SUM_SIGNAL, STAT_SUM_NOISE, ROW_COLUMNS, STAT_COLUMNS,
                              ROW_EXP_AVG_SCALES_ADDR, ROW_EXP_AVG_SQ_SCALES_ADDR, ROW_EXP_GRAD_VAR_SCALES_ADDR,
                              CODE_BLOCK, LUT_EXP_MIN, LUT_MANTISSA_BITS, LUT_HALF};
    const int64_t n = (int64_t)(sizeof values / sizeof values[0]);
    if (out)
        for (int64_t i = 0; i < n; i++) out[i] = values[i];
    return n;
}
