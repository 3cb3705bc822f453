/* The fused SNR-AdamW step for CPU tensors: one pass per element, the CPU twin of snr_adamw.py.
 *
 * Compiled on first use by snr_triton/backend/cpu.py (the system C compiler, -O3) and cached on
 * disk, so later processes start at once. Threads are plain pthreads, not OpenMP: a second OpenMP
 * runtime beside torch's own would share the process badly. Work is a table of chunks, each a slice of
 * one tensor; params, grads and each param's own states are reached through an address table.
 * Math in float32, bias corrections in float64 once per chunk.
 *
 * The contract (gate ids, table columns, stats columns) is not written here: it comes from
 * snr_triton/contract.py as -D defines when snr_triton/backend/cpu.py compiles this file.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>

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

/* Calls LOOP with the gate and the stats flag as compile-time constants. */
#define GATE_SWITCH(LOOP, STATS)                                                                    \
    switch (gate) {                                                                                 \
    case GATE_SNR: LOOP(param, grad, m, v, s, n, h, t, maximize, stats, GATE_SNR, STATS); break;    \
    case GATE_SOFT: LOOP(param, grad, m, v, s, n, h, t, maximize, stats, GATE_SOFT, STATS); break;  \
    case GATE_HARD: LOOP(param, grad, m, v, s, n, h, t, maximize, stats, GATE_HARD, STATS); break;  \
    default: LOOP(param, grad, m, v, s, n, h, t, maximize, stats, GATE_NONE, STATS);                \
    }

/* One chunk; P and S are the param and state storage types (float or uint16_t = bf16). GATE and
 * STATS are compile-time constants at every call, so each variant is a branch-free, vectorized loop. */
#define DEFINE_CHUNK(NAME, P, LOADP, STOREP, S, LOADS, STORES)                                      \
static inline __attribute__((always_inline)) void NAME##_loop(                                     \
        P *restrict param, const P *restrict grad, S *restrict m_buf, S *restrict v_buf,           \
        S *restrict s_buf, int64_t n, const Hyper *h, double t, int maximize, double *stats,       \
        const int GATE, const int STATS) {                                                          \
    const double bc1 = 1.0 - pow(h->beta1, t), bc3 = 1.0 - pow(h->rho, t);                        \
    const float inv_bc1 = (float)(1.0 / bc1);                                                      \
    const float inv_bc2_sqrt = (float)(1.0 / sqrt(1.0 - pow(h->beta2, t)));                        \
    const float inv_bc3 = (float)(1.0 / bc3);                                                      \
    const float b_scale = (float)(bc1 / sqrt(bc3)); /* sqrt(s) * b_scale = bc1 * sqrt(s-hat) */   \
    const float tail_scale = (float)(h->gate_eps * bc1 * bc1);                                     \
    const float omb1 = (float)(1.0 - h->beta1);                                                    \
    const float b2 = (float)h->beta2, omb2 = (float)(1.0 - h->beta2);                             \
    const float rho = (float)h->rho, omrho = (float)(1.0 - h->rho);                               \
    const float eps = (float)h->eps, alpha = (float)h->alpha, lam = (float)h->softness;           \
    const float lam_alpha = (float)(h->softness * h->alpha);                                       \
    const float decay = (float)(1.0 - h->lr * h->weight_decay);                                    \
    const float step_size = (float)(h->lr / bc1);                                                  \
    const float sign = (float)(maximize ? -h->inv_grad_scale : h->inv_grad_scale);                 \
    const int first = t == 1.0;                                                                    \
    double sum_q = 0, sum_above = 0, sum_signal = 0, sum_noise = 0;                                \
    _Pragma("omp simd reduction(+:sum_q,sum_above,sum_signal,sum_noise)")                         \
    for (int64_t i = 0; i < n; i++) {                                                              \
        const float g = LOADP(grad[i]) * sign;                                                     \
        float m = LOADS(m_buf[i]);                                                                 \
        const float diff = g - m;                                                                  \
        const float s = rho * LOADS(s_buf[i]) + (omrho * diff) * diff; /* finite for finite g */   \
        m = m + omb1 * diff;                                                                       \
        const float v = b2 * LOADS(v_buf[i]) + (omb2 * g) * g; /* as torch's addcmul */            \
        const float denom = sqrtf(v) * inv_bc2_sqrt + eps;                                         \
        /* the gate, overflow-safe (ALGORITHM.md "Numerics"): x = m-hat^2/c^2, y = s-hat/c^2 */    \
        const float a = m < 0.0f ? -m : m; /* selects, not fabsf/fmaxf: those do not vectorize */  \
        const float b = first ? a : sqrtf(s) * b_scale; /* t = 1: s-hat := m-hat^2 */              \
        const float c = a > b ? a : b, inv = 1.0f / (c > 0.0f ? c : 1.0f);                         \
        const float ra = a >= b ? 1.0f : a * inv, rb = b >= a ? 1.0f : b * inv; /* max is 1 */    \
        const float x = ra * ra, y = rb * rb, tail = (tail_scale * inv) * inv;                    \
        const int above = x > alpha * y;                                                           \
        const float d = x - alpha * y > 0.0f ? x - alpha * y : 0.0f;                               \
        const float gated = GATE == GATE_SNR ? x / (x + lam_alpha * y + tail)                      \
                          : GATE == GATE_SOFT ? d / (d + lam * y + tail)                           \
                          : (above ? 1.0f : 0.0f);                                                 \
        const float q = GATE == GATE_NONE ? 1.0f : (c > 0.0f ? gated : 0.0f); /* m = s = 0: 0 */   \
        const float p = LOADP(param[i]) * decay - step_size * (q * m / denom);                     \
        param[i] = STOREP(p);                                                                      \
        m_buf[i] = STORES(m);                                                                      \
        v_buf[i] = STORES(v);                                                                      \
        s_buf[i] = STORES(s);                                                                      \
        if (STATS) {                                                                               \
            const float mhat = m * inv_bc1, signal = mhat * mhat;                                  \
            sum_q += q; sum_above += above ? 1.0 : 0.0;                                            \
            sum_signal += signal; sum_noise += alpha * (first ? signal : s * inv_bc3);             \
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
    if (stats) GATE_SWITCH(NAME##_loop, 1)                                                          \
    else GATE_SWITCH(NAME##_loop, 0)                                                                \
}

#define ID(x) (x)
DEFINE_CHUNK(chunk_f32_f32, float, ID, ID, float, ID, ID)
DEFINE_CHUNK(chunk_f32_bf16, float, ID, ID, uint16_t, bf16_to_f32, f32_to_bf16)
DEFINE_CHUNK(chunk_bf16_f32, uint16_t, bf16_to_f32, f32_to_bf16, float, ID, ID)
DEFINE_CHUNK(chunk_bf16_bf16, uint16_t, bf16_to_f32, f32_to_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

typedef struct {
    const int64_t *rows;
    const int32_t *block_tensor;
    int64_t block;
    const float *steps;
    const Hyper *h;
    int gate, maximize, param_bf16, state_bf16;
    double *stats;
    int64_t begin, end;
} Work;

static void *run_chunks(void *arg) {
    const Work *w = (const Work *)arg;
    const int64_t state_size = w->state_bf16 ? 2 : 4, param_size = w->param_bf16 ? 2 : 4;
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
        if (!w->param_bf16 && !w->state_bf16)
            chunk_f32_f32((float *)param, (const float *)grad, (float *)m, (float *)v, (float *)s, n,
                          w->h, step, w->gate, w->maximize, st);
        else if (!w->param_bf16)
            chunk_f32_bf16((float *)param, (const float *)grad, (uint16_t *)m, (uint16_t *)v,
                           (uint16_t *)s, n, w->h, step, w->gate, w->maximize, st);
        else if (!w->state_bf16)
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
 * split evenly over `threads` threads, the caller's one. */
int snr_adamw_step(const int64_t *rows, const int32_t *block_tensor, int64_t nchunks, int64_t block,
                   const float *steps, const Hyper *h, int gate,
                   int maximize, int param_bf16, int state_bf16, double *stats, int threads) {
    Work work[MAX_THREADS];
    threads = thread_count(threads, nchunks);
    for (int i = 0; i < threads; i++) {
        Work w = {rows, block_tensor, block, steps, h, gate, maximize, param_bf16,
                  state_bf16, stats, nchunks * i / threads, nchunks * (i + 1) / threads};
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

static void *run_sq(void *arg) {
    const SqWork *w = (const SqWork *)arg;
    for (int64_t c = w->begin; c < w->end; c++) {
        const int64_t *row = w->rows + ROW_COLUMNS * (int64_t)w->block_tensor[c];
        const int64_t start = (c - row[ROW_FIRST_BLOCK]) * w->block;
        const int64_t left = row[ROW_NUMEL] - start, n = left < w->block ? left : w->block;
        double sum = 0;
        if (w->param_bf16) {
            const uint16_t *g = (const uint16_t *)(intptr_t)row[ROW_GRAD_ADDR] + start;
            _Pragma("omp simd reduction(+:sum)")
            for (int64_t i = 0; i < n; i++) { const double x = bf16_to_f32(g[i]); sum += x * x; }
        } else {
            const float *g = (const float *)(intptr_t)row[ROW_GRAD_ADDR] + start;
            _Pragma("omp simd reduction(+:sum)")
            for (int64_t i = 0; i < n; i++) { const double x = g[i]; sum += x * x; }
        }
        w->out[c] = sum;
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
                              STAT_COUNT_ABOVE, STAT_SUM_SIGNAL, STAT_SUM_NOISE, ROW_COLUMNS, STAT_COLUMNS};
    const int64_t n = (int64_t)(sizeof values / sizeof values[0]);
    if (out)
        for (int64_t i = 0; i < n; i++) out[i] = values[i];
    return n;
}
