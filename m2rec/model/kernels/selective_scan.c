/*
 * Exact CPU selective scan (the S6 recurrence of Mamba): forward and backward.
 *
 * Loaded by m2rec/model/selective_scan.py through ctypes (no Python or torch headers).
 * Compiled on first use with `cc -O3 -fopenmp-simd -fno-trapping-math -shared -fPIC
 * -pthread`.  The file includes itself once per variant (float/double, and on x86-64 an
 * AVX2+FMA copy of each chosen at run time), so no -march flag is needed.
 *
 * This is the core recurrence only; delta_bias, softplus, the D skip term and the
 * silu(z) gate are cheap elementwise ops done by the caller.  Per (batch b, channel d)
 * row, with dt already final:
 *     h_t[n] = exp(dt_t * A[d,n]) * h_{t-1}[n] + dt_t * u_t * B[b,t,n]
 *     y_t    = sum_n C[b,t,n] * h_t[n]
 * The decay exp(dt*A) is formed one step at a time, so no exponential of a cumulative
 * sum is ever computed (no overflow for large time steps).
 *
 * Layouts (all contiguous, row-major):
 *   u, dt, y, gy, gu, gdt        : (batch, dim, L)
 *   Bt, Ct                       : (batch, L, dstate)     (time-major)
 *   gBt_part, gCt_part           : (batch, G, L, dstate)  (G channel groups, summed by caller)
 *   A                            : (dim, dstate)
 *   h0, last, glast, gh0, gA_part: (batch, dim, dstate)   (gA_part summed over batch by caller)
 * Optional pointers (h0, last, gy, glast, gh0) may be NULL.
 *
 * Inference at one position per sequence (m2rec_ss_last_*): no states kept, no backward,
 * only y at position pos[b] of each batch row (the scan stops there), channel-last inputs
 * as the projections produce them:
 *   u, dt                        : (batch, L, dim)
 *   Bt, Ct                       : rows of dstate values, row (b, t) at (b*L + t)*bc_stride
 *                                  (e.g. column slices of one (batch, L, bc_stride) tensor)
 *   pos                          : (batch,) int64 in [0, L)
 *   y                            : (batch, dim)
 *
 * The causal depthwise conv + SiLU in front of the scan (m2rec_conv_silu_*), channel-last:
 *   x, out                       : (batch, L, dim)
 *   w                            : (width, dim)  (tap k multiplies the input width-1-k steps back)
 *   bias                         : (dim,) or NULL
 *
 * The time steps (m2rec_dt_softplus_*): dt = softplus(bias + W x_r) per row (b, t), x_r the
 * first `rank` values of row (b, t) of x_proj's output (rows at distance x_stride), W given as
 * (rank, dim), out (batch, L, dim); softplus as torch computes it (v itself above 20).
 *
 * Work is split over (batch, dim) rows in the forward and over (batch, channel group)
 * tasks in the backward, with plain pthreads started per call (no persistent thread
 * pool, so the library stays usable after fork()) taking ranges of tasks on demand.  The
 * backward recomputes the forward states of one row into a per-thread (L+1)*dstate buffer,
 * then runs the adjoint recurrence backwards in time.
 */
#ifndef SS_TEMPLATE_PASS

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(_WIN32)
#define SS_EXPORT __declspec(dllexport)
#else
#define SS_EXPORT __attribute__((visibility("default")))
#endif

#define SS_CAT2(a, b) a##_##b
#define SS_CAT(a, b) SS_CAT2(a, b)
#define SUF(name) SS_CAT(name, SS_SUFFIX)

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(SS_NO_AVX2)
#define SS_HAVE_AVX2_CLONE 1
#endif

/* ------------------------------------------------- vectorizable exponentials */
/*
 * Branch-free exp() so that loops over the state dimension vectorize (libm's exp is an
 * opaque call).  Cody-Waite range reduction x = k*ln2 + r, |r| <= ln2/2, then the Cephes
 * approximations of exp(r) (polynomial for float, Pade rational for double, both about
 * 1 ulp), scaled by 2^k built directly in the exponent bits.  Results that would be
 * subnormal are flushed to 0 (double) or computed as one product (float); overflow gives
 * +inf; NaN propagates.
 */
static inline float ss_expf(float x) {
    const float lo = -87.33654f, hi = 88.37f; /* keeps 2^k normal and finite */
    float xc = x < lo ? lo : (x > hi ? hi : x);
    const float magic = 12582912.0f; /* 1.5 * 2^23: rounds to nearest integer */
    float kf = xc * 1.44269504088896341f + magic;
    uint32_t kb;
    memcpy(&kb, &kf, sizeof kb);
    kf -= magic;
    float r = xc - kf * 0.693359375f;
    r = r + kf * 2.12194440e-4f;
    float r2 = r * r;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r2 + r + 1.0f;
    uint32_t sb = (kb - 0x4B400000u + 127u) << 23;
    float scale;
    memcpy(&scale, &sb, sizeof scale);
    float res = p * scale;
    res = x < lo ? 0.0f : res;
    res = x > hi ? INFINITY : res;
    return x != x ? x : res;
}
static inline double ss_exp(double x) {
    const double lo = -708.3964185322641, hi = 709.0895657128241;
    double xc = x < lo ? lo : (x > hi ? hi : x);
    const double magic = 6755399441055744.0; /* 1.5 * 2^52 */
    double kd = xc * 1.4426950408889634074 + magic;
    uint64_t kb;
    memcpy(&kb, &kd, sizeof kb);
    kd -= magic;
    double r = xc - kd * 6.93145751953125E-1;
    r = r - kd * 1.42860682030941723212E-6;
    double r2 = r * r;
    double px = 1.26177193074810590878E-4;
    px = px * r2 + 3.02994407707441961300E-2;
    px = px * r2 + 9.99999999999999999910E-1;
    px = px * r;
    double q = 3.00198505138664455042E-6;
    q = q * r2 + 2.52448340349684104192E-3;
    q = q * r2 + 2.27265548208155028766E-1;
    q = q * r2 + 2.00000000000000000009E0;
    double e = 1.0 + 2.0 * (px / (q - px));
    uint64_t sb = (kb - 0x4338000000000000ull + 1023ull) << 52;
    double scale;
    memcpy(&scale, &sb, sizeof scale);
    double res = e * scale;
    res = x < lo ? 0.0 : res;
    res = x > hi ? (double)INFINITY : res;
    return x != x ? x : res;
}

/* log(x) for normal x > 0, vectorizable: Cephes logf (mantissa in [sqrt(.5), sqrt(2))). */
static inline float ss_logf(float x) {
    uint32_t ix;
    memcpy(&ix, &x, sizeof ix);
    float e = (float)((int32_t)((ix >> 23) & 0xff) - 126);
    ix = (ix & 0x007fffffu) | 0x3f000000u; /* mantissa in [0.5, 1) */
    float m;
    memcpy(&m, &ix, sizeof m);
    const int small = m < 0.707106781186547524f;
    e = small ? e - 1.0f : e;
    m = small ? m + m - 1.0f : m - 1.0f;
    const float z = m * m;
    float y = 7.0376836292E-2f;
    y = y * m - 1.1514610310E-1f;
    y = y * m + 1.1676998740E-1f;
    y = y * m - 1.2420140846E-1f;
    y = y * m + 1.4249322787E-1f;
    y = y * m - 1.6668057665E-1f;
    y = y * m + 2.0000714765E-1f;
    y = y * m - 2.4999993993E-1f;
    y = y * m + 3.3333331174E-1f;
    y = y * m * z - 2.12194440e-4f * e - 0.5f * z;
    return (m + y) + 0.693359375f * e;
}

/* torch's softplus: v above 20, else log1p(exp(v)) = max(v, 0) + log1p(exp(-|v|)), with
 * log1p(q) = log(1 + q) * q / ((1 + q) - 1). */
static inline float ss_softplusf(float v) {
    const float q = ss_expf(-fabsf(v)), u = 1.0f + q;
    const float l1p = u == 1.0f ? q : ss_logf(u) * (q / (u - 1.0f));
    return v > 20.0f ? v : (v > 0.0f ? v : 0.0f) + l1p;
}

static inline double ss_softplus(double v) { return v > 20.0 ? v : log1p(exp(v)); }

/* ---------------------------------------------------------------- threads */

typedef void (*ss_range_fn)(void *ctx, int64_t begin, int64_t end);

typedef struct {
    ss_range_fn fn;
    void *ctx;
    int64_t ntasks, grain;
    int64_t next; /* the first task nobody has taken yet (atomic) */
} ss_queue;

/* Take ranges of `grain` tasks until none is left: a thread slowed by a busy core takes fewer. */
static void *ss_worker(void *arg) {
    ss_queue *q = (ss_queue *)arg;
    for (;;) {
        const int64_t begin = __atomic_fetch_add(&q->next, q->grain, __ATOMIC_RELAXED);
        if (begin >= q->ntasks) return NULL;
        q->fn(q->ctx, begin, begin + q->grain < q->ntasks ? begin + q->grain : q->ntasks);
    }
}

/* Run fn over [0, ntasks) on nthreads threads (this one included), about 8 ranges per thread
 * handed out on demand; every task runs once, each on its own, so the results do not depend
 * on the split. */
static void ss_parallel_for(int nthreads, int64_t ntasks, ss_range_fn fn, void *ctx) {
    if (ntasks <= 0) return;
    if (nthreads > ntasks) nthreads = (int)ntasks;
    if (nthreads <= 1) {
        fn(ctx, 0, ntasks);
        return;
    }
    ss_queue q = {fn, ctx, ntasks, 0, 0};
    q.grain = ntasks / ((int64_t)nthreads * 8);
    if (q.grain < 1) q.grain = 1;
    pthread_t *tids = (pthread_t *)malloc(sizeof(pthread_t) * (size_t)nthreads);
    int *started = (int *)calloc((size_t)nthreads, sizeof(int));
    if (tids && started)
        for (int i = 1; i < nthreads; ++i)
            started[i] = pthread_create(&tids[i], NULL, ss_worker, &q) == 0;
    ss_worker(&q); /* threads that could not start leave their share to the others */
    for (int i = 1; tids && started && i < nthreads; ++i)
        if (started[i]) pthread_join(tids[i], NULL);
    free(tids);
    free(started);
}

typedef struct {
    const void *u, *dt, *A, *Bt, *Ct, *h0, *gy, *glast;
    void *y, *last;
    void *gu, *gdt, *gA_part, *gBt_part, *gCt_part, *gh0;
    int64_t batch, dim, dstate, L, groups;
    int64_t bc_stride;   /* m2rec_ss_last_*: distance between rows of Bt and Ct */
    const int64_t *pos;  /* m2rec_ss_last_*: the one position of each batch row to output */
    volatile int failed; /* set by a worker that could not allocate its buffers */
} ss_args;

typedef struct {
    const void *x, *w, *bias;
    void *out;
    int64_t L, dim, width;
} ss_conv_args;

typedef struct {
    const void *x, *w, *bias;
    void *out;
    int64_t x_stride, rank, dim;
} ss_dt_args;

typedef void (*ss_kernel_fn)(void *ctx, int64_t begin, int64_t end);

/* ------------------------------------------------ instantiate per variant */

#define SS_TEMPLATE_PASS 1

#define SS_TARGET
#define T float
#define SS_SUFFIX f32
#define EXP ss_expf
#define SOFTPLUS ss_softplusf
#include __FILE__
#undef T
#undef SS_SUFFIX
#undef EXP
#undef SOFTPLUS

#define T double
#define SS_SUFFIX f64
#define EXP ss_exp
#define SOFTPLUS ss_softplus
#include __FILE__
#undef T
#undef SS_SUFFIX
#undef EXP
#undef SOFTPLUS
#undef SS_TARGET

#ifdef SS_HAVE_AVX2_CLONE
#define SS_TARGET __attribute__((target("avx2,fma")))
#define T float
#define SS_SUFFIX f32_avx2
#define EXP ss_expf
#define SOFTPLUS ss_softplusf
#include __FILE__
#undef T
#undef SS_SUFFIX
#undef EXP
#undef SOFTPLUS

#define T double
#define SS_SUFFIX f64_avx2
#define EXP ss_exp
#define SOFTPLUS ss_softplus
#include __FILE__
#undef T
#undef SS_SUFFIX
#undef EXP
#undef SOFTPLUS
#undef SS_TARGET

static int ss_use_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        const char *env = getenv("M2REC_SCAN_NO_AVX2");
        __builtin_cpu_init();
        cached = (env && env[0] && env[0] != '0')
                     ? 0
                     : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
    }
    return cached;
}
#define SS_PICK(name, suf) (ss_use_avx2() ? name##_##suf##_avx2 : name##_##suf)
#else
#define SS_PICK(name, suf) (name##_##suf)
static int ss_use_avx2(void) { return 0; }
#endif

/* ------------------------------------------------------------- entry points */

#define SS_ENTRY(suf)                                                                        \
    SS_EXPORT int m2rec_ss_fwd_##suf(const void *u, const void *dt, const void *A,          \
                                     const void *Bt, const void *Ct, const void *h0,         \
                                     int64_t batch, int64_t dim, int64_t dstate, int64_t L,  \
                                     void *y, void *last, int nthreads) {                    \
        ss_args a;                                                                           \
        memset(&a, 0, sizeof(a));                                                            \
        a.u = u, a.dt = dt, a.A = A, a.Bt = Bt, a.Ct = Ct, a.h0 = h0, a.y = y;               \
        a.last = last, a.batch = batch, a.dim = dim, a.dstate = dstate, a.L = L;             \
        a.groups = 1;                                                                        \
        ss_parallel_for(nthreads, batch * dim, SS_PICK(ss_fwd_range, suf), &a);              \
        return a.failed ? -1 : 0;                                                            \
    }                                                                                        \
    SS_EXPORT int m2rec_ss_bwd_##suf(const void *u, const void *dt, const void *A,          \
                                     const void *Bt, const void *Ct, const void *h0,         \
                                     int64_t batch, int64_t dim, int64_t dstate, int64_t L,  \
                                     const void *gy, const void *glast, int64_t groups,      \
                                     void *gu, void *gdt, void *gA_part, void *gBt_part,     \
                                     void *gCt_part, void *gh0, int nthreads) {              \
        ss_args a;                                                                           \
        memset(&a, 0, sizeof(a));                                                            \
        a.u = u, a.dt = dt, a.A = A, a.Bt = Bt, a.Ct = Ct, a.h0 = h0, a.gy = gy;             \
        a.glast = glast, a.gu = gu, a.gdt = gdt, a.gA_part = gA_part;                        \
        a.gBt_part = gBt_part, a.gCt_part = gCt_part, a.gh0 = gh0;                           \
        a.batch = batch, a.dim = dim, a.dstate = dstate, a.L = L, a.groups = groups;         \
        ss_parallel_for(nthreads, batch * groups, SS_PICK(ss_bwd_range, suf), &a);           \
        return a.failed ? -1 : 0;                                                            \
    }

#define SS_LAST_ENTRY(suf)                                                                   \
    SS_EXPORT int m2rec_ss_last_##suf(const void *u, const void *dt, const void *A,         \
                                      const void *Bt, const void *Ct, int64_t bc_stride,     \
                                      const int64_t *pos, int64_t batch, int64_t dim,        \
                                      int64_t dstate, int64_t L, void *y, int nthreads) {    \
        ss_args a;                                                                           \
        memset(&a, 0, sizeof(a));                                                            \
        a.u = u, a.dt = dt, a.A = A, a.Bt = Bt, a.Ct = Ct, a.bc_stride = bc_stride;          \
        a.pos = pos, a.y = y, a.batch = batch, a.dim = dim, a.dstate = dstate, a.L = L;      \
        ss_parallel_for(nthreads, batch * dim, SS_PICK(ss_last_range, suf), &a);             \
        return a.failed ? -1 : 0;                                                            \
    }

#define SS_CONV_ENTRY(suf)                                                                   \
    SS_EXPORT void m2rec_conv_silu_##suf(const void *x, const void *w, const void *bias,    \
                                         int64_t batch, int64_t L, int64_t dim,              \
                                         int64_t width, void *out, int nthreads) {           \
        ss_conv_args a = {x, w, bias, out, L, dim, width};                                   \
        ss_parallel_for(nthreads, batch * L, SS_PICK(ss_conv_silu_range, suf), &a);          \
    }

SS_ENTRY(f32)
SS_ENTRY(f64)
SS_LAST_ENTRY(f32)
SS_LAST_ENTRY(f64)
#define SS_DT_ENTRY(suf)                                                                     \
    SS_EXPORT void m2rec_dt_softplus_##suf(const void *x, int64_t x_stride, const void *w,  \
                                           const void *bias, int64_t rows, int64_t rank,     \
                                           int64_t dim, void *out, int nthreads) {           \
        ss_dt_args a = {x, w, bias, out, x_stride, rank, dim};                               \
        ss_parallel_for(nthreads, rows, SS_PICK(ss_dt_softplus_range, suf), &a);             \
    }

SS_CONV_ENTRY(f32)
SS_CONV_ENTRY(f64)
SS_DT_ENTRY(f32)
SS_DT_ENTRY(f64)

/* 1 if the AVX2+FMA variants are in use. */
SS_EXPORT int m2rec_ss_uses_avx2(void) { return ss_use_avx2(); }

/* Version tag, bumped when the ABI of the entry points changes. */
SS_EXPORT int m2rec_ss_abi_version(void) { return 5; }

#else /* ================================================= SS_TEMPLATE_PASS */

/* One forward step over the state, in place: h <- exp(dt*A) h + dtu*B; returns C.h. */
SS_TARGET static inline T SUF(ss_step_inplace)(int64_t N, T dt, T dtu, const T *restrict Ad,
                                               T *restrict h, const T *restrict Bn,
                                               const T *restrict Cn) {
    T y = 0;
#pragma omp simd reduction(+ : y)
    for (int64_t n = 0; n < N; ++n) {
        const T hn = EXP(dt * Ad[n]) * h[n] + dtu * Bn[n];
        h[n] = hn;
        y += Cn[n] * hn;
    }
    return y;
}

/* One forward step without output: h <- exp(dt*A) h + dtu*B. */
SS_TARGET static inline void SUF(ss_step_state)(int64_t N, T dt, T dtu, const T *restrict Ad,
                                                T *restrict h, const T *restrict Bn) {
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) h[n] = EXP(dt * Ad[n]) * h[n] + dtu * Bn[n];
}

/* Same step keeping the previous state hp and storing the new state hc and the decays. */
SS_TARGET static inline T SUF(ss_step_store)(int64_t N, T dt, T dtu, const T *restrict Ad,
                                             const T *restrict hp, T *restrict hc,
                                             T *restrict dA, const T *restrict Bn,
                                             const T *restrict Cn) {
    T y = 0;
#pragma omp simd reduction(+ : y)
    for (int64_t n = 0; n < N; ++n) {
        const T dAn = EXP(dt * Ad[n]);
        const T hn = dAn * hp[n] + dtu * Bn[n];
        dA[n] = dAn;
        hc[n] = hn;
        y += Cn[n] * hn;
    }
    return y;
}

/*
 * One adjoint step.  On entry gh holds the part of dL/dh_t carried from step t+1; on
 * exit it holds the part of dL/dh_{t-1} carried through the decay.  Accumulates gB,
 * gC, gA; returns sum_n dL/d(dt*A_n) * A_n in *gdt_dA and sum_n dL/dh_t[n] * B[n] in
 * *ghB.
 */
SS_TARGET static inline void SUF(ss_adjoint_step)(int64_t N, T gy, T dt, T dtu,
                                                  const T *restrict Ad, const T *restrict hp,
                                                  const T *restrict hc, const T *restrict dA,
                                                  const T *restrict Bn, const T *restrict Cn,
                                                  T *restrict gh, T *restrict gBn,
                                                  T *restrict gCn, T *restrict gAacc,
                                                  T *gdt_dA, T *ghB) {
    T s_dA = 0, s_B = 0;
#pragma omp simd reduction(+ : s_dA, s_B)
    for (int64_t n = 0; n < N; ++n) {
        const T ghn = gh[n] + gy * Cn[n]; /* dL/dh_t[n] */
        gCn[n] += gy * hc[n];
        const T gx = ghn * hp[n] * dA[n]; /* dL/d(dt * A[n]) */
        s_dA += gx * Ad[n];
        gAacc[n] += gx * dt;
        s_B += ghn * Bn[n];
        gBn[n] += ghn * dtu;
        gh[n] = ghn * dA[n]; /* carried to h_{t-1} */
    }
    *gdt_dA = s_dA;
    *ghB = s_B;
}

SS_TARGET static void SUF(ss_fwd_range)(void *vctx, int64_t begin, int64_t end) {
    ss_args *a = (ss_args *)vctx;
    const int64_t L = a->L, N = a->dstate, dim = a->dim;
    const T *u = (const T *)a->u, *dtv = (const T *)a->dt, *A = (const T *)a->A;
    const T *Bt = (const T *)a->Bt, *Ct = (const T *)a->Ct, *h0 = (const T *)a->h0;
    T *yv = (T *)a->y, *last = (T *)a->last;
    T *h = (T *)malloc(sizeof(T) * (size_t)(N > 0 ? N : 1));
    if (!h) {
        a->failed = 1;
        return;
    }
    for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / dim, d = row % dim;
        const T *ur = u + row * L, *dr = dtv + row * L;
        const T *Ad = A + d * N;
        const T *Bb = Bt + b * L * N, *Cb = Ct + b * L * N;
        T *yr = yv + row * L;
        if (h0)
            memcpy(h, h0 + row * N, sizeof(T) * (size_t)N);
        else
            memset(h, 0, sizeof(T) * (size_t)N);
        for (int64_t t = 0; t < L; ++t)
            yr[t] = SUF(ss_step_inplace)(N, dr[t], dr[t] * ur[t], Ad, h, Bb + t * N, Cb + t * N);
        if (last) memcpy(last + row * N, h, sizeof(T) * (size_t)N);
    }
    free(h);
}

/* Rows (b, t) of the causal depthwise conv + SiLU:
 * out = silu(bias + sum_k w[k] * x[t - (width-1-k)]). */
SS_TARGET static void SUF(ss_conv_silu_range)(void *vctx, int64_t begin, int64_t end) {
    const ss_conv_args *a = (const ss_conv_args *)vctx;
    const int64_t L = a->L, dim = a->dim, K = a->width;
    const T *x = (const T *)a->x, *w = (const T *)a->w, *bias = (const T *)a->bias;
    for (int64_t row = begin; row < end; ++row) {
        const int64_t t = row % L;
        T *restrict o = (T *)a->out + row * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) o[d] = bias ? bias[d] : (T)0;
        for (int64_t k = 0; k < K; ++k) {
            const int64_t back = K - 1 - k;
            if (back > t) continue; /* before the sequence: zeros */
            const T *restrict xr = x + (row - back) * dim, *restrict wk = w + k * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) o[d] += wk[d] * xr[d];
        }
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) o[d] = o[d] / ((T)1 + EXP(-o[d]));
    }
}

/* Rows (b, t) of the time steps: out = softplus(bias + W x_r), W as (rank, dim). */
SS_TARGET static void SUF(ss_dt_softplus_range)(void *vctx, int64_t begin, int64_t end) {
    const ss_dt_args *a = (const ss_dt_args *)vctx;
    const int64_t R = a->rank, dim = a->dim;
    const T *w = (const T *)a->w, *bias = (const T *)a->bias;
    for (int64_t row = begin; row < end; ++row) {
        const T *xr = (const T *)a->x + row * a->x_stride;
        T *restrict o = (T *)a->out + row * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) o[d] = bias ? bias[d] : (T)0;
        for (int64_t r = 0; r < R; ++r) {
            const T xv = xr[r];
            const T *restrict wr = w + r * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) o[d] += wr[d] * xv;
        }
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) o[d] = SOFTPLUS(o[d]);
    }
}

/* Inference rows (b, d): scan up to pos[b] on channel-last inputs, output y there only. */
SS_TARGET static void SUF(ss_last_range)(void *vctx, int64_t begin, int64_t end) {
    ss_args *a = (ss_args *)vctx;
    const int64_t L = a->L, N = a->dstate, dim = a->dim, S = a->bc_stride;
    const T *u = (const T *)a->u, *dtv = (const T *)a->dt, *A = (const T *)a->A;
    const T *Bt = (const T *)a->Bt, *Ct = (const T *)a->Ct;
    T *yv = (T *)a->y;
    T *h = (T *)malloc(sizeof(T) * (size_t)(N > 0 ? N : 1));
    if (!h) {
        a->failed = 1;
        return;
    }
    for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / dim, d = row % dim, last = a->pos[b];
        const T *ub = u + b * L * dim + d, *db = dtv + b * L * dim + d; /* stride dim over t */
        const T *Ad = A + d * N, *Bb = Bt + b * L * S, *Cb = Ct + b * L * S;
        memset(h, 0, sizeof(T) * (size_t)N);
        for (int64_t t = 0; t < last; ++t) {
            const T dt = db[t * dim];
            SUF(ss_step_state)(N, dt, dt * ub[t * dim], Ad, h, Bb + t * S);
        }
        const T dt = db[last * dim];
        yv[row] = SUF(ss_step_inplace)(N, dt, dt * ub[last * dim], Ad, h, Bb + last * S,
                                       Cb + last * S);
    }
    free(h);
}

/*
 * Backward task = (batch b, channel group g).  The channels of a group run in sequence,
 * so the partial gB/gC of (b, g) are accumulated without races.
 */
SS_TARGET static void SUF(ss_bwd_range)(void *vctx, int64_t begin, int64_t end) {
    ss_args *a = (ss_args *)vctx;
    const int64_t L = a->L, N = a->dstate, dim = a->dim, G = a->groups;
    const T *u = (const T *)a->u, *dtv = (const T *)a->dt, *A = (const T *)a->A;
    const T *Bt = (const T *)a->Bt, *Ct = (const T *)a->Ct, *h0 = (const T *)a->h0;
    const T *gyv = (const T *)a->gy, *glast = (const T *)a->glast;
    T *gu = (T *)a->gu, *gdt = (T *)a->gdt, *gA_part = (T *)a->gA_part;
    T *gBt_part = (T *)a->gBt_part, *gCt_part = (T *)a->gCt_part, *gh0 = (T *)a->gh0;
    /* states hs ((L+1)*N, hs[0] = initial state), decays dAs (L*N), gh (N), gAacc (N) */
    T *buf = (T *)malloc(sizeof(T) * (size_t)((2 * L + 3) * N + 1));
    if (!buf) {
        a->failed = 1;
        return;
    }
    T *hs = buf, *dAs = hs + (L + 1) * N, *gh = dAs + L * N, *gAacc = gh + N;
    for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / G, g = task % G;
        const int64_t d_lo = dim * g / G, d_hi = dim * (g + 1) / G;
        const T *Bb = Bt + b * L * N, *Cb = Ct + b * L * N;
        T *gBb = gBt_part + (b * G + g) * L * N, *gCb = gCt_part + (b * G + g) * L * N;
        for (int64_t d = d_lo; d < d_hi; ++d) {
            const int64_t row = b * dim + d;
            const T *ur = u + row * L, *dr = dtv + row * L;
            const T *Ad = A + d * N;
            /* 1) recompute the forward pass, keeping every state and decay */
            if (h0)
                memcpy(hs, h0 + row * N, sizeof(T) * (size_t)N);
            else
                memset(hs, 0, sizeof(T) * (size_t)N);
            for (int64_t t = 0; t < L; ++t)
                (void)SUF(ss_step_store)(N, dr[t], dr[t] * ur[t], Ad, hs + t * N,
                                         hs + (t + 1) * N, dAs + t * N, Bb + t * N,
                                         Cb + t * N);
            /* 2) adjoint recurrence, backwards in time */
            if (glast)
                memcpy(gh, glast + row * N, sizeof(T) * (size_t)N);
            else
                memset(gh, 0, sizeof(T) * (size_t)N);
            memset(gAacc, 0, sizeof(T) * (size_t)N);
            for (int64_t t = L - 1; t >= 0; --t) {
                const T ut = ur[t], dt = dr[t];
                const T gy = gyv ? gyv[row * L + t] : (T)0;
                T gdt_dA, ghB;
                SUF(ss_adjoint_step)(N, gy, dt, dt * ut, Ad, hs + t * N, hs + (t + 1) * N,
                                     dAs + t * N, Bb + t * N, Cb + t * N, gh, gBb + t * N,
                                     gCb + t * N, gAacc, &gdt_dA, &ghB);
                gu[row * L + t] = ghB * dt;
                gdt[row * L + t] = gdt_dA + ghB * ut;
            }
            if (gh0) memcpy(gh0 + row * N, gh, sizeof(T) * (size_t)N);
            memcpy(gA_part + row * N, gAacc, sizeof(T) * (size_t)N);
        }
    }
    free(buf);
}

#endif /* SS_TEMPLATE_PASS */
