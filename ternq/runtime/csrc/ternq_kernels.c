/* ternq's native CPU kernels: one pass where eager torch needs many.
 *
 * Plain C99 with no torch headers, so it compiles in about a second with any C compiler and loads with ctypes
 * (ternq/runtime/native.py, which binds the prototypes of ternq_kernels.h); every function works on raw float32 / int8 / int32 pointers of contiguous tensors. The
 * loops are written for the compiler's auto-vectorizer (-O3 -march=...): the innermost loop of each function
 * runs over contiguous memory.
 *
 * Numerics follow the eager reference (ternq.qat.quantizers.normalize_input + activation_scale + round) op for op:
 * float32 throughout, two-pass mean / variance, 1 / sqrt, division by the scale, round half to even. Sums are
 * taken in blocks of 16 terms like torch's cascade sum, so the result usually matches torch bit for bit, but
 * torch's summation order is an implementation detail of its build: an activation code may differ by one
 * where the normalized value lies within float32 rounding of a rounding boundary (documented tolerance).
 *
 * Non-finite input stays non-finite: the absmax propagates NaN (TQ_MAX), so a token (or sample) holding a NaN or
 * an Inf gets a NaN or Inf scale, and every output that reads it is NaN or Inf, as in the QAT layer. Its NaN
 * codes are written as qmax (tq_code): a NaN cast to an integer is undefined behaviour in C.
 */
#include "ternq_kernels.h"
#include "ternq_internal.h"

#include <math.h>
#include <stdint.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <string.h>

#define BLOCK 256 /* time steps per block of a channel-major input: C x 256 floats stay in L2 */

/* --- threads -----------------------------------------------------------------------------------------------
 *
 * One pool, torch's own. native.py hands the library two entry points of the OpenMP runtime torch loaded
 * (tq_set_openmp): GOMP_parallel, the GNU OpenMP ABI that libgomp, LLVM's libomp and Intel's libiomp5 all
 * export, and omp_get_max_threads. The kernels' parallel regions then run on the worker threads torch's own
 * regions use (no second pool whose spinning workers fight torch's), with the count torch.set_num_threads set
 * (torch sets it with omp_set_num_threads). Nothing here needs omp.h or -fopenmp, so any C compiler builds it;
 * without a runtime every kernel runs on the calling thread.
 *
 * A kernel is parallel by computing a range of independent output rows [r0, r1) in a function of that shape
 * and calling tq_parallel_for: the rows are split into chunks of a multiple of `grain` rows, claimed by the
 * threads in turn. Every output is computed by the same instructions whichever chunk holds it, so results are
 * bitwise identical at any thread count. */
typedef void (*tq_gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*tq_omp_max_threads_fn)(void);
static tq_gomp_parallel_fn tq_gomp_parallel = NULL;
static tq_omp_max_threads_fn tq_omp_max_threads = NULL;

/* the least work (about bytes touched or multiply-adds) worth a chunk of its own: a fork and join of the
 * pool's threads costs about as much as 256 K of it; tq_set_min_work changes it (tests split small shapes) */
static int64_t tq_min_work = (int64_t)1 << 18;

void tq_set_min_work(int64_t work) { tq_min_work = work > 1 ? work : 1; }

void tq_set_openmp(void *parallel, void *max_threads) {
    /* both or neither: a runtime without one of them leaves the kernels serial (memcpy: ISO C has no cast from
     * an object pointer to a function pointer; POSIX's dlsym relies on the same representation) */
    if (parallel == NULL || max_threads == NULL) {
        tq_gomp_parallel = NULL;
        tq_omp_max_threads = NULL;
        return;
    }
    memcpy(&tq_gomp_parallel, &parallel, sizeof tq_gomp_parallel);
    memcpy(&tq_omp_max_threads, &max_threads, sizeof tq_omp_max_threads);
}

int tq_num_threads(void) {
    const int n = tq_omp_max_threads ? tq_omp_max_threads() : 1;
    return n > 1 ? n : 1;
}

struct tq_job {
    tq_range_fn fn;
    void *ctx;
    int64_t n, chunk, next;
};

static void tq_job_run(void *arg) {
    struct tq_job *job = (struct tq_job *)arg;
    for (;;) {
        const int64_t r0 = __atomic_fetch_add(&job->next, job->chunk, __ATOMIC_RELAXED);
        if (r0 >= job->n) break;
        job->fn(job->ctx, r0, r0 + job->chunk < job->n ? r0 + job->chunk : job->n);
    }
}

/* fn(ctx, r0, r1) for chunks covering [0, n), on up to tq_num_threads() threads. Chunks hold a multiple of
 * `grain` rows (the last one the rest) and tq_min_work of the total `work` at least, up to 4 per thread
 * (a thread delayed by another process leaves its chunks to the others). */
void tq_parallel_for(int64_t n, int64_t grain, int64_t work, tq_range_fn fn, void *ctx) {
    if (n <= 0) return;
    const int64_t threads = tq_num_threads();
    int64_t parts = (n + grain - 1) / grain;
    if (parts > work / tq_min_work) parts = work / tq_min_work;
    if (parts > 4 * threads) parts = 4 * threads;
    if (parts <= 1 || threads <= 1 || tq_gomp_parallel == NULL) {
        fn(ctx, 0, n);
        return;
    }
    struct tq_job job;
    job.fn = fn;
    job.ctx = ctx;
    job.n = n;
    job.chunk = ((n + parts - 1) / parts + grain - 1) / grain * grain;
    job.next = 0;
    parts = (n + job.chunk - 1) / job.chunk;
    tq_gomp_parallel(tq_job_run, &job, (unsigned)(parts < threads ? parts : threads), 0);
}

/* max(a, m) that propagates a NaN of either (C's a > m ? a : m keeps m when a is NaN); for the few maxima of
 * maxima. The loops over every element keep the plain max (one vmaxps) and detect a NaN by a sum of the |x|
 * they take the max of (one vaddps): a sum of non-negative numbers is NaN only if one of them is. */
#define TQ_MAX(a, m) (((a) > (m) || (a) != (a)) ? (a) : (m))

/* a rounded code t clamped to [-qmax - 1, qmax], in this order so that a NaN (of a token whose scale is NaN or
 * Inf) becomes qmax (vminps), not a NaN cast to an integer (undefined behaviour in C) */
static inline float tq_code(float t, float qmax) {
    t = t < qmax ? t : qmax;
    return t > -qmax - 1.f ? t : -qmax - 1.f;
}

/* sum of rows[0..n) of a column block, torch's 4-level cascade with a step of 16 (per column). */
static void cascade_sum(const float *x, int64_t row_stride, int64_t rows, int n, float *out,
                        float *lv1, float *lv2, float *lv3, int square, const float *mean) {
    for (int i = 0; i < n; ++i) { out[i] = 0.f; lv1[i] = 0.f; lv2[i] = 0.f; lv3[i] = 0.f; }
    int64_t r = 0;
    while (r + 16 <= rows) {
        for (int j = 0; j < 16; ++j, ++r) {
            const float *row = x + r * row_stride;
            if (square == 0) {
                for (int i = 0; i < n; ++i) out[i] += row[i];
            } else if (square == 1) {
                for (int i = 0; i < n; ++i) { float d = row[i] - mean[i]; float d2 = d * d; out[i] += d2; }
            } else {
                for (int i = 0; i < n; ++i) { float d2 = row[i] * row[i]; out[i] += d2; }
            }
        }
        for (int i = 0; i < n; ++i) { lv1[i] += out[i]; out[i] = 0.f; }
        if ((r & (15 << 4)) != 0) continue;
        for (int i = 0; i < n; ++i) { lv2[i] += lv1[i]; lv1[i] = 0.f; }
        if ((r & (15 << 8)) != 0) continue;
        for (int i = 0; i < n; ++i) { lv3[i] += lv2[i]; lv2[i] = 0.f; }
    }
    for (; r < rows; ++r) {
        const float *row = x + r * row_stride;
        if (square == 0) {
            for (int i = 0; i < n; ++i) out[i] += row[i];
        } else if (square == 1) {
            for (int i = 0; i < n; ++i) { float d = row[i] - mean[i]; float d2 = d * d; out[i] += d2; }
        } else {
            for (int i = 0; i < n; ++i) { float d2 = row[i] * row[i]; out[i] += d2; }
        }
    }
    for (int i = 0; i < n; ++i) { out[i] += lv1[i]; out[i] += lv2[i]; out[i] += lv3[i]; }
}

/* mean and 1/std of a column block (norm: 0 none, 1 layernorm, 2 rmsnorm). */
static void column_stats(const float *x, int64_t C, int64_t T, int n, int norm, float eps, float *mean,
                         float *rstd) {
    float acc[BLOCK], l1[BLOCK], l2[BLOCK], l3[BLOCK];
    const float fc = (float)C;
    if (norm == 1) {
        cascade_sum(x, T, C, n, acc, l1, l2, l3, 0, NULL);
        for (int i = 0; i < n; ++i) mean[i] = acc[i] / fc;
        cascade_sum(x, T, C, n, acc, l1, l2, l3, 1, mean);
    } else {
        for (int i = 0; i < n; ++i) mean[i] = 0.f;
        cascade_sum(x, T, C, n, acc, l1, l2, l3, 2, NULL);
    }
    for (int i = 0; i < n; ++i) { float v = acc[i] / fc + eps; rstd[i] = 1.f / sqrtf(v); }
}

/* max |normalized x| over the channels of a column block, into amax[0..n). */
static void column_absmax(const float *x, int64_t C, int64_t T, int n, int norm, const float *mean,
                          const float *rstd, float *amax) {
    float nan[BLOCK]; /* NaN where a column holds one (TQ_MAX) */
    for (int i = 0; i < n; ++i) { amax[i] = 0.f; nan[i] = 0.f; }
    for (int64_t c = 0; c < C; ++c) {
        const float *row = x + c * T;
        if (norm == 0) {
            for (int i = 0; i < n; ++i) { float a = fabsf(row[i]); amax[i] = a > amax[i] ? a : amax[i]; nan[i] += a; }
        } else if (norm == 1) {
            for (int i = 0; i < n; ++i) {
                float a = fabsf((row[i] - mean[i]) * rstd[i]);
                amax[i] = a > amax[i] ? a : amax[i];
                nan[i] += a;
            }
        } else {
            for (int i = 0; i < n; ++i) {
                float a = fabsf(row[i] * rstd[i]);
                amax[i] = a > amax[i] ? a : amax[i];
                nan[i] += a;
            }
        }
    }
    for (int i = 0; i < n; ++i) amax[i] = nan[i] != nan[i] ? nan[i] : amax[i];
}

static void column_round(const float *x, int64_t C, int64_t T, int n, int norm, const float *mean,
                         const float *rstd, const float *scale, int scale_step, float qmax, int8_t *q,
                         int64_t ldq) {
    for (int64_t c = 0; c < C; ++c) {
        const float *row = x + c * T;
        int8_t *dst = q + c * ldq;
        for (int i = 0; i < n; ++i) {
            float v = norm == 0 ? row[i] : norm == 1 ? (row[i] - mean[i]) * rstd[i] : row[i] * rstd[i];
            dst[i] = (int8_t)tq_code(rintf(v / scale[i * scale_step]), qmax);
        }
    }
}

/* Channel-major input x (B, C, T), normalized over C per time step, quantized to signed `bits`.
 * q: (B, C, ldq) int8, written at columns [off, off + T); s: (B, lds) float32, written at [off, off + T)
 * (per token) or s[b * lds] (per sample, one scale per sample). Parallel over blocks of BLOCK time steps. */
struct channels_job {
    const float *x;
    int64_t C, T, span, nblocks, ldq, lds, off; /* blocks of `span` <= BLOCK steps: the parallel units */
    int norm, per_sample;
    float eps, qmax;
    int8_t *q;
    float *s, *block_max; /* block_max: per sample, each block's absmax (first pass) */
    float slope; /* the leaky ReLU applied to x first (tq_quantize_grouped); 1: none */
    int failed; /* a chunk found no memory for its leaky ReLU buffer */
};

/* A buffer for one block of the leaky-ReLU'd input (NULL where slope is 1: the passes read x). Without the memory
 * the job fails (the caller reports it) rather than quantize the input without its activation. */
static float *block_buffer(const struct channels_job *j) {
    if (j->slope == 1.f) return NULL;
    float *buf = (float *)malloc((size_t)(j->C * j->span) * sizeof(float));
    if (buf == NULL) __atomic_store_n(&((struct channels_job *)j)->failed, 1, __ATOMIC_RELAXED);
    return buf;
}

/* The columns [t0, t0 + n) of sample b as the passes read them: x itself (rows *ld = T apart), or, with a buffer,
 * leaky_relu(x) as torch computes it (x > 0 ? x : x * slope, the same float operations), rows *ld = n apart. */
static const float *block_input(const struct channels_job *j, int64_t b, int64_t t0, int n, float *buf,
                                int64_t *ld) {
    const float *xb = j->x + b * j->C * j->T + t0;
    if (buf == NULL) {
        *ld = j->T;
        return xb;
    }
    const float slope = j->slope;
    for (int64_t c = 0; c < j->C; ++c) {
        const float *row = xb + c * j->T;
        float *dst = buf + c * n;
        for (int i = 0; i < n; ++i) dst[i] = row[i] > 0.f ? row[i] : row[i] * slope;
    }
    *ld = n;
    return buf;
}

static void channels_absmax(void *arg, int64_t u0, int64_t u1) {
    const struct channels_job *j = (const struct channels_job *)arg;
    float mean[BLOCK], rstd[BLOCK], amax[BLOCK];
    float *buf = block_buffer(j);
    if (j->slope != 1.f && buf == NULL) return;
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / j->nblocks, t0 = u % j->nblocks * j->span;
        const int n = (int)(j->T - t0 < j->span ? j->T - t0 : j->span);
        int64_t ld;
        const float *xb = block_input(j, b, t0, n, buf, &ld);
        column_stats(xb, j->C, ld, n, j->norm, j->eps, mean, rstd);
        column_absmax(xb, j->C, ld, n, j->norm, mean, rstd, amax);
        float m = 0.f;
        for (int i = 0; i < n; ++i) m = TQ_MAX(amax[i], m);
        j->block_max[u] = m;
    }
    free(buf);
}

static void channels_round(void *arg, int64_t u0, int64_t u1) {
    const struct channels_job *j = (const struct channels_job *)arg;
    float mean[BLOCK], rstd[BLOCK], amax[BLOCK];
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / j->nblocks, t0 = u % j->nblocks * j->span;
        const int n = (int)(j->T - t0 < j->span ? j->T - t0 : j->span);
        const float *xb = j->x + b * j->C * j->T + t0;
        int8_t *qb = j->q + b * j->C * j->ldq + j->off + t0;
        float *sb = j->s + b * j->lds;
        column_stats(xb, j->C, j->T, n, j->norm, j->eps, mean, rstd);
        if (j->per_sample) {
            column_round(xb, j->C, j->T, n, j->norm, mean, rstd, sb, 0, j->qmax, qb, j->ldq);
        } else {
            column_absmax(xb, j->C, j->T, n, j->norm, mean, rstd, amax);
            float *st = sb + j->off + t0;
            for (int i = 0; i < n; ++i) st[i] = (amax[i] < j->eps ? j->eps : amax[i]) / j->qmax;
            column_round(xb, j->C, j->T, n, j->norm, mean, rstd, st, 1, j->qmax, qb, j->ldq);
        }
    }
}

void tq_quantize_channels(const float *x, int64_t B, int64_t C, int64_t T, int norm, float eps, int bits,
                          int per_sample, int8_t *q, int64_t ldq, float *s, int64_t lds, int64_t off) {
    struct channels_job j;
    j.x = x;
    j.C = C;
    j.T = T;
    j.span = BLOCK;
    j.nblocks = (T + BLOCK - 1) / BLOCK;
    j.ldq = ldq;
    j.lds = lds;
    j.off = off;
    j.norm = norm;
    j.per_sample = per_sample;
    j.eps = eps;
    j.qmax = (float)((1 << (bits - 1)) - 1);
    j.q = q;
    j.s = s;
    j.block_max = NULL;
    j.slope = 1.f;
    j.failed = 0;
    const int64_t units = B * j.nblocks, work = 4 * C * T * B;
    if (per_sample) {
        float one[1];
        j.block_max = units > 1 ? (float *)malloc((size_t)units * sizeof(float)) : one;
        if (j.block_max == NULL) { /* no memory for the block maxima: one block at a time, serially */
            j.block_max = one;
            for (int64_t u = 0; u < units; ++u) {
                channels_absmax(&j, u, u + 1);
                const int64_t b = u / j.nblocks;
                s[b * lds] = u % j.nblocks == 0 ? one[0] : TQ_MAX(one[0], s[b * lds]);
            }
        } else {
            tq_parallel_for(units, 1, work, channels_absmax, &j);
            for (int64_t b = 0; b < B; ++b) {
                float m = 0.f; /* in block order, as one pass over the steps would (the same NaN wins) */
                for (int64_t i = 0; i < j.nblocks; ++i) m = TQ_MAX(j.block_max[b * j.nblocks + i], m);
                s[b * lds] = m;
            }
            if (j.block_max != one) free(j.block_max);
        }
        for (int64_t b = 0; b < B; ++b) s[b * lds] = (s[b * lds] < eps ? eps : s[b * lds]) / j.qmax;
    }
    tq_parallel_for(units, 1, work, channels_round, &j);
}

/* a row's sum from its 16 lanes (lane_sum's, the AVX-512 row quantizer's): the tail past c16 added first, then the lanes in order */
static float lane_total(const float *row, int64_t c16, int64_t n, float m, int kind, const float *lanes) {
    float total = 0.f;
    for (int64_t c = c16; c < n; ++c) {
        float v = row[c];
        if (kind == 1) v -= m;
        if (kind) v = v * v;
        total += v;
    }
    for (int i = 0; i < 16; ++i) total += lanes[i];
    return total;
}

/* sum of row[0..n) (kind 0), of (row - m)^2 (kind 1) or of row^2 (kind 2), in 16 vectorizable lanes */
static float lane_sum(const float *row, int64_t n, float m, int kind) {
    float lanes[16] = {0.f};
    const int64_t n16 = n / 16 * 16;
    for (int64_t c0 = 0; c0 < n16; c0 += 16) {
        for (int i = 0; i < 16; ++i) {
            float v = row[c0 + i];
            if (kind == 1) v -= m;
            if (kind) v = v * v;
            lanes[i] += v;
        }
    }
    return lane_total(row, n16, n, m, kind, lanes);
}

/* Row-major input x (R, C), normalized over C per row like torch's layer_norm (x * rstd + (-rstd * mean)),
 * quantized per row, or per group of `rows_per_sample` rows (per sample). q: (R, C) int8; s: (R,) float32. */
struct rows_job {
    const float *x;
    int64_t R, C, rows_per_sample;
    int norm, bits;
    float eps;
    int8_t *q;
    float *s;
};

static void quantize_samples(void *arg, int64_t u0, int64_t u1);

static void rows_job_init(struct rows_job *j, const float *x, int64_t R, int64_t C, int norm, float eps, int bits,
                          int64_t rows_per_sample, int8_t *q, float *s) {
    j->x = x;
    j->R = R;
    j->C = C;
    j->rows_per_sample = rows_per_sample;
    j->norm = norm;
    j->bits = bits;
    j->eps = eps;
    j->q = q;
    j->s = s;
}

void tq_quantize_rows_serial(const float *x, int64_t R, int64_t C, int norm, float eps, int bits,
                             int64_t rows_per_sample, int8_t *q, float *s) {
    struct rows_job j;
    rows_job_init(&j, x, R, C, norm, eps, bits, rows_per_sample, q, s);
    quantize_samples(&j, 0, (R + rows_per_sample - 1) / rows_per_sample);
}

/* Parallel over samples (groups of rows_per_sample rows; a row each per token). */
void tq_quantize_rows(const float *x, int64_t R, int64_t C, int norm, float eps, int bits,
                      int64_t rows_per_sample, int8_t *q, float *s) {
    struct rows_job j;
    rows_job_init(&j, x, R, C, norm, eps, bits, rows_per_sample, q, s);
    tq_parallel_for((R + rows_per_sample - 1) / rows_per_sample, 1, 4 * R * C, quantize_samples, &j);
}

#if defined(__AVX512F__)
/* The lane loop of quantize_samples' absmax in registers, the same operations per lane in the same order (the
 * compiler kept `lanes` and `nan` on the stack, reloading them every step: 45% of the quantizer's time). */
static void absmax_lanes_avx512(const float *row, int64_t c16, int norm, float a, float b, float *lanes,
                                float *nan) {
    const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
    __m512 m = _mm512_loadu_ps(lanes), sum = _mm512_loadu_ps(nan);
    for (int64_t c0 = 0; c0 < c16; c0 += 16) {
        __m512 v = _mm512_loadu_ps(row + c0);
        if (norm == 1) v = _mm512_add_ps(_mm512_mul_ps(v, va), vb);
        else if (norm == 2) v = _mm512_mul_ps(v, va);
        v = _mm512_abs_ps(v);
        m = _mm512_max_ps(v, m); /* v > m ? v : m, as the scalar loop: a NaN v keeps m, the sum catches it */
        sum = _mm512_add_ps(sum, v);
    }
    _mm512_storeu_ps(lanes, m);
    _mm512_storeu_ps(nan, sum);
}

/* dst[0:C) = tq_code(rintf(v / scale)) of the (normalized) row, 16 at a time; returns how many it wrote (C rounded
 * down to 16). A division is 4x the cost of a multiply, so t = v * (1 / scale) first: it is within 2^-16 of v / scale
 * (|v / scale| <= 128, two roundings of 2^-24), so both round to the same integer unless v / scale lies within
 * 2^-16 of a half-integer, where rint's result changes; a vector with a lane within 2^-14 of one (and only those,
 * rare) is divided. NaN lanes stay NaN (no compare is true for them), as with the division. */
static int64_t round_row_avx512(const float *row, int64_t C, int norm, float a, float b, float scale, float qmax,
                                int8_t *dst) {
    const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b), vs = _mm512_set1_ps(scale);
    const __m512 vr = _mm512_set1_ps(1.f / scale), near = _mm512_set1_ps(0.5f - 0x1p-14f); /* |p - rint(p)| > near */
    const __m512 hi = _mm512_set1_ps(qmax), lo = _mm512_set1_ps(-qmax - 1.f);
    const int64_t C16 = C / 16 * 16;
    for (int64_t c = 0; c < C16; c += 16) {
        __m512 v = _mm512_loadu_ps(row + c);
        if (norm == 1) v = _mm512_add_ps(_mm512_mul_ps(v, va), vb);
        else if (norm == 2) v = _mm512_mul_ps(v, va);
        const __m512 p = _mm512_mul_ps(v, vr);
        __m512 t = _mm512_roundscale_ps(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        /* |p - rint(p)| (exact) within 2^-14 of 1/2 <=> p's fraction within 2^-14 of a half-integer */
        const __mmask16 tie = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(p, t)), near, _CMP_GT_OQ);
        if (tie) t = _mm512_mask_roundscale_ps(t, tie, _mm512_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        t = _mm512_max_ps(_mm512_min_ps(t, hi), lo); /* tq_code: min returns hi for a NaN t */
        _mm_storeu_si128((__m128i *)(dst + c), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(t)));
    }
    return C16;
}
#endif

#if defined(__AVX512F__)
/* lane_sum of up to 4 rows at once (lanes[r] = the 16 lanes of row r): the same additions per lane in the same
 * order, 4 independent chains of vaddps instead of one (one row's chain waited 4 cycles per 16 floats: the
 * quantizer of a 64-token Linear took as long as a third of its AMX GEMM) */
static void lane_sums4(const float *const *rows, int nr, int64_t c16, const float *m, int kind, float lanes[4][16]) {
    __m512 acc[4], mv[4];
    for (int r = 0; r < 4; ++r) {
        acc[r] = _mm512_setzero_ps();
        mv[r] = _mm512_set1_ps(r < nr ? m[r] : 0.f);
    }
    for (int64_t c0 = 0; c0 < c16; c0 += 16) {
        for (int r = 0; r < 4; ++r) {
            if (r >= nr) break;
            __m512 v = _mm512_loadu_ps(rows[r] + c0);
            if (kind == 1) v = _mm512_sub_ps(v, mv[r]);
            if (kind) v = _mm512_mul_ps(v, v);
            acc[r] = _mm512_add_ps(acc[r], v);
        }
    }
    for (int r = 0; r < nr; ++r) _mm512_storeu_ps(lanes[r], acc[r]);
}

/* absmax_lanes_avx512 of up to 4 rows at once (independent chains, the same operations per row) */
static void absmax_lanes4(const float *const *rows, int nr, int64_t c16, int norm, const float *a, const float *b,
                          float lanes[4][16], float nan[4][16]) {
    __m512 mx[4], sm[4], va[4], vb[4];
    for (int r = 0; r < 4; ++r) {
        mx[r] = sm[r] = _mm512_setzero_ps();
        va[r] = _mm512_set1_ps(r < nr ? a[r] : 1.f);
        vb[r] = _mm512_set1_ps(r < nr ? b[r] : 0.f);
    }
    for (int64_t c0 = 0; c0 < c16; c0 += 16) {
        for (int r = 0; r < 4; ++r) {
            if (r >= nr) break;
            __m512 v = _mm512_loadu_ps(rows[r] + c0);
            if (norm == 1) v = _mm512_add_ps(_mm512_mul_ps(v, va[r]), vb[r]);
            else if (norm == 2) v = _mm512_mul_ps(v, va[r]);
            v = _mm512_abs_ps(v);
            mx[r] = _mm512_max_ps(v, mx[r]);
            sm[r] = _mm512_add_ps(sm[r], v);
        }
    }
    for (int r = 0; r < nr; ++r) {
        _mm512_storeu_ps(lanes[r], mx[r]);
        _mm512_storeu_ps(nan[r], sm[r]);
    }
}

/* per token (one row per scale), rows [r0, r1) four at a time (r1 - r0 a multiple of 4): quantize_samples'
 * operations per row, bit for bit */
static void quantize_tokens4(const struct rows_job *j, int64_t r0, int64_t r1) {
    const int64_t C = j->C, c16 = C / 16 * 16;
    const int norm = j->norm;
    const float eps = j->eps, fc = (float)C, qmax = (float)((1 << (j->bits - 1)) - 1);
    for (int64_t g = r0; g < r1; g += 4) {
        const int nr = r1 - g < 4 ? (int)(r1 - g) : 4;
        const float *rows[4];
        float a[4] = {1.f, 1.f, 1.f, 1.f}, b[4] = {0.f, 0.f, 0.f, 0.f}, m[4] = {0.f, 0.f, 0.f, 0.f};
        float lanes[4][16], nan[4][16];
        for (int r = 0; r < nr; ++r) rows[r] = j->x + (g + r) * C;
        if (norm == 1) {
            lane_sums4(rows, nr, c16, m, 0, lanes);
            for (int r = 0; r < nr; ++r) m[r] = lane_total(rows[r], c16, C, 0.f, 0, lanes[r]) / fc;
            lane_sums4(rows, nr, c16, m, 1, lanes);
            for (int r = 0; r < nr; ++r) {
                a[r] = 1.f / sqrtf(lane_total(rows[r], c16, C, m[r], 1, lanes[r]) / fc + eps);
                b[r] = -a[r] * m[r];
            }
        } else if (norm == 2) {
            lane_sums4(rows, nr, c16, m, 2, lanes);
            for (int r = 0; r < nr; ++r) a[r] = 1.f / sqrtf(lane_total(rows[r], c16, C, 0.f, 2, lanes[r]) / fc + eps);
        }
        absmax_lanes4(rows, nr, c16, norm, a, b, lanes, nan);
        for (int r = 0; r < nr; ++r) {
            const float *row = rows[r];
            for (int64_t c = c16; c < C; ++c) {
                float v = fabsf(norm == 1 ? row[c] * a[r] + b[r] : norm == 2 ? row[c] * a[r] : row[c]);
                lanes[r][0] = TQ_MAX(v, lanes[r][0]);
            }
            float amax = 0.f;
            for (int i = 0; i < 16; ++i) amax = TQ_MAX(lanes[r][i], amax);
            for (int i = 0; i < 16; ++i) amax = nan[r][i] != nan[r][i] ? nan[r][i] : amax;
            const float scale = (amax < eps ? eps : amax) / qmax;
            j->s[g + r] = scale;
            int8_t *dst = j->q + (g + r) * C;
            int64_t c = round_row_avx512(row, C, norm, a[r], b[r], scale, qmax, dst);
            for (; c < C; ++c) {
                float v = norm == 1 ? row[c] * a[r] + b[r] : norm == 2 ? row[c] * a[r] : row[c];
                dst[c] = (int8_t)tq_code(rintf(v / scale), qmax);
            }
        }
    }
}
#endif

static void quantize_samples(void *arg, int64_t u0, int64_t u1) {
    const struct rows_job *j = (const struct rows_job *)arg;
#if defined(__AVX512F__)
    if (j->rows_per_sample == 1) { /* whole groups of four rows; the rest (a decode step's one row) below */
        const int64_t r1 = u1 < j->R ? u1 : j->R, r4 = u0 + (r1 - u0) / 4 * 4;
        quantize_tokens4(j, u0, r4);
        u0 = r4;
    }
#endif
    const float *x = j->x;
    const int64_t R = j->R, C = j->C, rows_per_sample = j->rows_per_sample;
    const int norm = j->norm;
    const float eps = j->eps;
    int8_t *q = j->q;
    float *s = j->s;
    const float qmax = (float)((1 << (j->bits - 1)) - 1);
    const float fc = (float)C;
    const int64_t end = u1 * rows_per_sample < R ? u1 * rows_per_sample : R;
    for (int64_t r0 = u0 * rows_per_sample; r0 < end; r0 += rows_per_sample) {
        int64_t r1 = r0 + rows_per_sample < R ? r0 + rows_per_sample : R;
        float sample_max = 0.f;
        for (int pass = rows_per_sample > 1 ? 0 : 1; pass < 2; ++pass) {
            for (int64_t r = r0; r < r1; ++r) {
                const float *row = x + r * C;
                float a = 1.f, b = 0.f;
                if (norm == 1) {
                    const float m = lane_sum(row, C, 0.f, 0) / fc;
                    a = 1.f / sqrtf(lane_sum(row, C, m, 1) / fc + eps);
                    b = -a * m;
                } else if (norm == 2) {
                    a = 1.f / sqrtf(lane_sum(row, C, 0.f, 2) / fc + eps);
                }
                float lanes[16] = {0.f}, nan[16] = {0.f}; /* nan: see TQ_MAX */
                int64_t c16 = C / 16 * 16;
#if defined(__AVX512F__)
                absmax_lanes_avx512(row, c16, norm, a, b, lanes, nan);
#else
                for (int64_t c0 = 0; c0 < c16; c0 += 16) {
                    for (int i = 0; i < 16; ++i) {
                        float v = norm == 1 ? row[c0 + i] * a + b : norm == 2 ? row[c0 + i] * a : row[c0 + i];
                        v = fabsf(v);
                        lanes[i] = v > lanes[i] ? v : lanes[i];
                        nan[i] += v;
                    }
                }
#endif
                for (int64_t c = c16; c < C; ++c) {
                    float v = fabsf(norm == 1 ? row[c] * a + b : norm == 2 ? row[c] * a : row[c]);
                    lanes[0] = TQ_MAX(v, lanes[0]);
                }
                float amax = 0.f;
                for (int i = 0; i < 16; ++i) amax = TQ_MAX(lanes[i], amax);
                for (int i = 0; i < 16; ++i) amax = nan[i] != nan[i] ? nan[i] : amax;
                if (pass == 0) {
                    sample_max = TQ_MAX(amax, sample_max);
                    continue;
                }
                float scale = rows_per_sample > 1 ? sample_max : (amax < eps ? eps : amax) / qmax;
                s[r] = scale;
                int8_t *dst = q + r * C;
                int64_t c = 0;
#if defined(__AVX512F__)
                c = round_row_avx512(row, C, norm, a, b, scale, qmax, dst);
#endif
                for (; c < C; ++c) {
                    float v = norm == 1 ? row[c] * a + b : norm == 2 ? row[c] * a : row[c];
                    dst[c] = (int8_t)tq_code(rintf(v / scale), qmax);
                }
            }
            if (pass == 0) sample_max = (sample_max < eps ? eps : sample_max) / qmax;
        }
    }
}

/* Conv1d per-token epilogue: the int8 GEMM of all taps gave acc (k, out, W) int32; for output steps
 * t < n: y[o, t] = (sum_j acc[j, o, t*stride + j*dil] * s[t*stride + j*dil]) * wscale[o] + bias[o]
 * (wscale / bias may be NULL; wscale[o * wstep]: wstep 1 per channel, 0 per tensor). y rows are ldy apart. */
struct taps_job {
    const int32_t *acc;
    int64_t k, out, W, n, stride, dil, wstep, ldy, start;
    const float *s, *wscale, *bias;
    float *y;
};

static void tap_sum_rows(void *arg, int64_t o0, int64_t o1) {
    const struct taps_job *p = (const struct taps_job *)arg;
    const int64_t k = p->k, out = p->out, W = p->W, n = p->n, stride = p->stride, dil = p->dil;
    for (int64_t o = o0; o < o1; ++o) {
        float *dst = p->y + o * p->ldy;
        for (int64_t t = 0; t < n; ++t) dst[t] = 0.f;
        for (int64_t j = 0; j < k; ++j) {
            const int32_t *a = p->acc + (j * out + o) * W + j * dil;
            const float *sj = p->s + j * dil;
            if (stride == 1) {
                for (int64_t t = 0; t < n; ++t) dst[t] += (float)a[t] * sj[t];
            } else {
                for (int64_t t = 0; t < n; ++t) dst[t] += (float)a[t * stride] * sj[t * stride];
            }
        }
        float w = p->wscale ? p->wscale[o * p->wstep] : 1.f, b = p->bias ? p->bias[o] : 0.f;
        if (p->wscale || p->bias)
            for (int64_t t = 0; t < n; ++t) dst[t] = dst[t] * w + b;
    }
}

/* Parallel over output channels. */
void tq_tap_sum(const int32_t *acc, int64_t k, int64_t out, int64_t W, const float *s, int64_t n,
                int64_t stride, int64_t dil, const float *wscale, int64_t wstep, const float *bias, float *y,
                int64_t ldy) {
    struct taps_job p = {acc, k, out, W, n, stride, dil, wstep, ldy, 0, s, wscale, bias, y};
    tq_parallel_for(out, 1, 8 * k * out * n, tap_sum_rows, &p);
}

static void tap_scatter_rows(void *arg, int64_t o0, int64_t o1) {
    const struct taps_job *p = (const struct taps_job *)arg;
    const int64_t k = p->k, out = p->out, W = p->W, n = p->n, stride = p->stride;
    for (int64_t o = o0; o < o1; ++o) {
        for (int64_t j = 0; j < k; ++j) {
            const int32_t *a = p->acc + (j * out + o) * W;
            float *dst = p->y + o * p->ldy + p->start + j * p->dil;
            for (int64_t i = 0; i < n; ++i) dst[i * stride] += (float)a[i] * p->s[i];
        }
    }
}

/* ConvTranspose1d per-token epilogue: overlap-add of the taps of n input steps into full (out, ldf):
 * full[o, start + i*stride + j*dil] += acc[j, o, i] * s[i]. Parallel over output channels. */
void tq_tap_scatter(const int32_t *acc, int64_t k, int64_t out, int64_t W, const float *s, int64_t n,
                    int64_t stride, int64_t dil, float *full, int64_t ldf, int64_t start) {
    struct taps_job p = {acc, k, out, W, n, stride, dil, 0, ldf, start, s, NULL, NULL, full};
    tq_parallel_for(out, 1, 8 * k * out * n, tap_scatter_rows, &p);
}

/* Linear epilogue: acc (M, N) int32, or (N, M) when transposed; y (M, N) = acc * s[m] * wscale[.] + bias[n].
 * wscale has N entries (per channel) or 1 (per tensor). */
struct epilogue_job {
    const int32_t *acc;
    int64_t M, N;
    const float *s, *wscale, *bias;
    int per_channel;
    float *y;
};

#define TQ_TILE 16 /* rows x columns of the transposed epilogue's tiles: 16 x 16 int32 = 16 cache lines */

/* y[m, n0:n1] from float products v[0:n1-n0] (in place in y's row), the same operations in the same order for
 * every element: (v * wscale[n]) * s[m] per channel, v * (s[m] * wscale[0]) per tensor, then + bias[n] */
static inline void epilogue_row(const struct epilogue_job *p, int64_t m, int64_t n0, int64_t n1, float *dst) {
    const float sm = p->s[m];
    if (p->per_channel) {
        for (int64_t n = n0; n < n1; ++n) dst[n] = dst[n] * p->wscale[n] * sm;
    } else {
        const float f = sm * p->wscale[0];
        for (int64_t n = n0; n < n1; ++n) dst[n] = dst[n] * f;
    }
    if (p->bias)
        for (int64_t n = n0; n < n1; ++n) dst[n] += p->bias[n];
}

static void epilogue_rows(void *arg, int64_t m0, int64_t m1) {
    const struct epilogue_job *p = (const struct epilogue_job *)arg;
    const int64_t N = p->N;
    for (int64_t m = m0; m < m1; ++m) {
        float *dst = p->y + m * N;
        const int32_t *a = p->acc + m * N;
        for (int64_t n = 0; n < N; ++n) dst[n] = (float)a[n];
        epilogue_row(p, m, 0, N, dst);
    }
}

#if defined(__AVX512F__)
/* a full 16 x 16 tile: 16 rows of acc (16 columns of y) loaded and converted, transposed in registers (the
 * unpack / shuffle network), rescaled with the same operations as epilogue_row, stored as 16 rows of y */
static void epilogue_tile16(const struct epilogue_job *p, int64_t mb, int64_t nb) {
    __m512 r[16], t[16];
    for (int j = 0; j < 16; ++j)
        r[j] = _mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)(p->acc + (nb + j) * p->M + mb)));
    for (int j = 0; j < 16; j += 2) {
        t[j] = _mm512_unpacklo_ps(r[j], r[j + 1]);
        t[j + 1] = _mm512_unpackhi_ps(r[j], r[j + 1]);
    }
    for (int j = 0; j < 16; j += 4) {
        r[j] = _mm512_shuffle_ps(t[j], t[j + 2], 0x44);
        r[j + 1] = _mm512_shuffle_ps(t[j], t[j + 2], 0xEE);
        r[j + 2] = _mm512_shuffle_ps(t[j + 1], t[j + 3], 0x44);
        r[j + 3] = _mm512_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
    }
    for (int h = 0; h < 16; h += 8)
        for (int j = 0; j < 4; ++j) {
            t[h + j] = _mm512_shuffle_f32x4(r[h + j], r[h + 4 + j], 0x88);
            t[h + 4 + j] = _mm512_shuffle_f32x4(r[h + j], r[h + 4 + j], 0xDD);
        }
    for (int j = 0; j < 8; ++j) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
    }
    const __m512 ws = p->per_channel ? _mm512_loadu_ps(p->wscale + nb) : _mm512_setzero_ps();
    const __m512 b = p->bias ? _mm512_loadu_ps(p->bias + nb) : _mm512_setzero_ps();
    for (int i = 0; i < 16; ++i) {
        const float sm = p->s[mb + i];
        __m512 v = p->per_channel ? _mm512_mul_ps(_mm512_mul_ps(r[i], ws), _mm512_set1_ps(sm))
                                  : _mm512_mul_ps(r[i], _mm512_set1_ps(sm * p->wscale[0]));
        if (p->bias) v = _mm512_add_ps(v, b);
        _mm512_storeu_ps(p->y + (mb + i) * p->N + nb, v);
    }
}
#endif

/* acc (N, M): read in TQ_TILE x TQ_TILE tiles, each row of a tile contiguous, transposed (in registers with
 * AVX-512, else in a local buffer), then written row by row; the strided reads of a row of y across all of acc
 * thrashed the cache */
static void epilogue_rows_t(void *arg, int64_t m0, int64_t m1) {
    const struct epilogue_job *p = (const struct epilogue_job *)arg;
    const int64_t M = p->M, N = p->N;
    float tile[TQ_TILE][TQ_TILE];
    for (int64_t mb = m0; mb < m1; mb += TQ_TILE) {
        const int64_t rows = m1 - mb < TQ_TILE ? m1 - mb : TQ_TILE;
        for (int64_t nb = 0; nb < N; nb += TQ_TILE) {
            const int64_t cols = N - nb < TQ_TILE ? N - nb : TQ_TILE;
#if defined(__AVX512F__)
            if (rows == 16 && cols == 16) {
                epilogue_tile16(p, mb, nb);
                continue;
            }
#endif
            for (int64_t j = 0; j < cols; ++j) {
                const int32_t *a = p->acc + (nb + j) * M + mb;
                for (int64_t i = 0; i < rows; ++i) tile[j][i] = (float)a[i];
            }
            for (int64_t i = 0; i < rows; ++i) {
                float *dst = p->y + (mb + i) * N;
                for (int64_t j = 0; j < cols; ++j) dst[nb + j] = tile[j][i];
                epilogue_row(p, mb + i, nb, nb + cols, dst);
            }
        }
    }
}

/* Parallel over rows of y (blocks of TQ_TILE rows when transposed). */
void tq_linear_epilogue(const int32_t *acc, int64_t M, int64_t N, int transposed, const float *s,
                        const float *wscale, int per_channel, const float *bias, float *y) {
    struct epilogue_job p = {acc, M, N, s, wscale, bias, per_channel, y};
    tq_parallel_for(M, transposed ? TQ_TILE : 1, 8 * M * N, transposed ? epilogue_rows_t : epilogue_rows, &p);
}

/* int8 x int8 -> int32 for a few rows: acc (M, N) = x (M, K) @ w (N, K)^T. For M <= 4 this reads the weight
 * once, without a GEMM library's packing. With VNNI the dot products run as vpdpbusd (unsigned x signed bytes):
 * x + 128 is unsigned (xu), and 128 * rowsum(w) (wsum, precomputed per layer) is subtracted again; exact.
 * Parallel over the weight's rows (output columns), each thread reading its share of the weight once. */
struct gemv_job {
    const int8_t *x;
    const int8_t *w; /* (N, K) codes */
    const int32_t *wsum;
    int64_t M, N, K;
    const uint8_t *xu; /* x + 128 (NULL: the signed-byte loop) */
    int32_t *acc;
    const struct epilogue_job *epilogue; /* tq_linear_rows: y[:, n0:n1] right after acc[:, n0:n1] */
};

/* the unsigned-byte path exists in this build: VNNI, or AVX2's vpmaddubsw (exact only for |w| <= 64: on
 * builds without VNNI the caller passes wsum only for such weights) */
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__) || defined(__AVX2__)
#define TQ_GEMV_UNSIGNED 1
#endif

static void gemv_s8_cols(const struct gemv_job *g, int64_t n0, int64_t n1) {
    const int8_t *x = g->x, *w = g->w;
    const int32_t *wsum = g->wsum;
    const uint8_t *xu = g->xu;
    const int64_t M = g->M, N = g->N, K = g->K;
    int32_t *acc = g->acc;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (xu) {
        /* four weight rows per pass share the activation loads; K tails are masked loads */
        const int64_t K64 = K / 64 * 64;
        const __mmask64 tail = K - K64 ? (((__mmask64)1 << (K - K64)) - 1) : 0;
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) {
            const int8_t *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
            for (int64_t m = 0; m < M; ++m) {
                const uint8_t *xm = xu + m * K;
                __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t c = 0; c < K64; c += 64) {
                    const __m512i xv = _mm512_loadu_si512((const void *)(xm + c));
                    a0 = _mm512_dpbusd_epi32(a0, xv, _mm512_loadu_si512((const void *)(w0 + c)));
                    a1 = _mm512_dpbusd_epi32(a1, xv, _mm512_loadu_si512((const void *)(w1 + c)));
                    a2 = _mm512_dpbusd_epi32(a2, xv, _mm512_loadu_si512((const void *)(w2 + c)));
                    a3 = _mm512_dpbusd_epi32(a3, xv, _mm512_loadu_si512((const void *)(w3 + c)));
                }
                if (tail) {
                    const __m512i xv = _mm512_maskz_loadu_epi8(tail, xm + K64);
                    a0 = _mm512_dpbusd_epi32(a0, xv, _mm512_maskz_loadu_epi8(tail, w0 + K64));
                    a1 = _mm512_dpbusd_epi32(a1, xv, _mm512_maskz_loadu_epi8(tail, w1 + K64));
                    a2 = _mm512_dpbusd_epi32(a2, xv, _mm512_maskz_loadu_epi8(tail, w2 + K64));
                    a3 = _mm512_dpbusd_epi32(a3, xv, _mm512_maskz_loadu_epi8(tail, w3 + K64));
                }
                int32_t *dst = acc + m * N + n;
                dst[0] = _mm512_reduce_add_epi32(a0) - 128 * wsum[n];
                dst[1] = _mm512_reduce_add_epi32(a1) - 128 * wsum[n + 1];
                dst[2] = _mm512_reduce_add_epi32(a2) - 128 * wsum[n + 2];
                dst[3] = _mm512_reduce_add_epi32(a3) - 128 * wsum[n + 3];
            }
        }
        for (; n < n1; ++n) {
            const int8_t *wn = w + n * K;
            for (int64_t m = 0; m < M; ++m) {
                const uint8_t *xm = xu + m * K;
                int32_t total = 0;
                for (int64_t c = 0; c < K; ++c) total += (int32_t)xm[c] * (int32_t)wn[c];
                acc[m * N + n] = total - 128 * wsum[n];
            }
        }
        return;
    }
#elif defined(__AVX512VNNI__) || defined(__AVXVNNI__)
    if (xu) {
        for (int64_t n = n0; n < n1; ++n) {
            const int8_t *wn = w + n * K;
            for (int64_t m = 0; m < M; ++m) {
                const uint8_t *xm = xu + m * K;
                int32_t total = 0;
                for (int64_t c = 0; c < K; ++c) total += (int32_t)xm[c] * (int32_t)wn[c];
                acc[m * N + n] = total - 128 * wsum[n];
            }
        }
        return;
    }
#elif defined(__AVX2__)
    /* vpmaddubsw on x + 128 (u8) and w (s8); exact while |w| <= 64 (the int16 pair sums cannot saturate) */
    if (xu) {
        const __m256i ones = _mm256_set1_epi16(1);
        const int64_t K32 = K / 32 * 32;
        for (int64_t n = n0; n < n1; ++n) {
            const int8_t *wn = w + n * K;
            for (int64_t m = 0; m < M; ++m) {
                const uint8_t *xm = xu + m * K;
                __m256i a = _mm256_setzero_si256();
                for (int64_t c = 0; c < K32; c += 32) {
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(xm + c));
                    const __m256i wv = _mm256_loadu_si256((const __m256i *)(wn + c));
                    a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(xv, wv), ones));
                }
                __m128i h = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
                h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
                h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
                int32_t total = _mm_cvtsi128_si32(h);
                for (int64_t c = K32; c < K; ++c) total += (int32_t)xm[c] * (int32_t)wn[c];
                acc[m * N + n] = total - 128 * wsum[n];
            }
        }
        return;
    }
#endif
    (void)wsum;
    (void)xu;
    for (int64_t n = n0; n < n1; ++n) {
        const int8_t *wn = w + n * K;
        for (int64_t m = 0; m < M; ++m) {
            const int8_t *xm = x + m * K;
            int32_t total = 0;
            for (int64_t c = 0; c < K; ++c) total += (int32_t)xm[c] * (int32_t)wn[c];
            acc[m * N + n] = total;
        }
    }
}

static void gemv_cols(void *arg, int64_t n0, int64_t n1) {
    const struct gemv_job *g = (const struct gemv_job *)arg;
    gemv_s8_cols(g, n0, n1);
    const struct epilogue_job *e = g->epilogue;
    if (e)
        for (int64_t m = 0; m < g->M; ++m) {
            float *dst = e->y + m * g->N;
            const int32_t *a = g->acc + m * g->N;
            for (int64_t n = n0; n < n1; ++n) dst[n] = (float)a[n];
            epilogue_row(e, m, n0, n1, dst);
        }
}

/* acc = x @ w^T (and, given an epilogue, its y) in one parallel region; chunks of 16 columns (a cache line of
 * acc and y, and the VNNI loop's blocks of 4 rows) */
static void gemv_run(struct gemv_job *g, uint8_t *xu) {
    g->xu = NULL;
#if defined(TQ_GEMV_UNSIGNED)
    if (g->wsum && xu) {
        for (int64_t i = 0; i < g->M * g->K; ++i) xu[i] = (uint8_t)(g->x[i] + 128);
        g->xu = xu;
    }
#else
    (void)xu;
#endif
    tq_parallel_for(g->N, 16, g->M * g->N * g->K + g->N * g->K / 8,
                    gemv_cols, g);
}

void tq_gemv_s8(const int8_t *x, const int8_t *w, const int32_t *wsum, int64_t M, int64_t N, int64_t K,
                uint8_t *xu, int32_t *acc) {
    struct gemv_job g = {x, w, wsum, M, N, K, NULL, acc, NULL};
    gemv_run(&g, xu);
}

/* A Linear on a few rows in one call: quantize the rows, GEMV, rescale (+ bias) into y (R, N). One call instead
 * of three keeps a one-token layer's Python / ctypes overhead below its arithmetic; the GEMV and the rescale
 * share one parallel region. */
int tq_linear_rows(const float *x, int64_t R, int64_t K, int norm, float eps, int bits, int64_t rows_per_sample,
                   const int8_t *w, const int32_t *wsum, int64_t N, const float *wscale, int per_channel,
                   const float *bias, float *y) {
    /* w (N, K) int8 codes; 2-bit rows (storage="packed"): tq_linear_2bit in ternq_packed.c */
    int8_t *q = (int8_t *)malloc((size_t)(R * K));
    uint8_t *xu = (uint8_t *)malloc((size_t)(R * K));
    float *s = (float *)malloc((size_t)R * sizeof(float));
    int32_t *acc = (int32_t *)malloc((size_t)(R * N) * sizeof(int32_t));
    int ok = q && xu && s && acc;
    if (ok) {
        tq_quantize_rows(x, R, K, norm, eps, bits, rows_per_sample, q, s);
        struct epilogue_job e = {acc, R, N, s, wscale, bias, per_channel, y};
        struct gemv_job g = {q, w, wsum, R, N, K, NULL, acc, &e};
        gemv_run(&g, xu);
    }
    free(q);
    free(xu);
    free(s);
    free(acc);
    return ok ? 0 : -1;
}

/* --- direct int8 Conv1d (per-step activation scales), no tap planes in memory ---------------------------------
 *
 * Activations are stored "grouped": xg (C4, Tp, 4) uint8, code + 128, four consecutive channels of one time step
 * in one 32-bit word (C padded to C4 * 4 channels with code 0). A vector of time steps then loads contiguously
 * and one vpdpbusd multiplies 4 channels of 16 steps by 4 broadcast weight codes. Weights wg (k, outp, C4, 4) int8
 * (outp = out rounded up to 8, zero rows); with their row sums w_sum, sum (q + 128) w - 128 w_sum is exact. For every tap j the int32 dot products are converted and scaled by the per-step scale s[p] of the input
 * step p they read, and accumulated in float32 registers: y[o, t] = sum_j s[p] * sum_c w[j, o, c] q[c, p],
 * p = t * stride + j * dil. */

struct grouped_job {
    struct channels_job c; /* first: channels_absmax reads it */
    uint8_t *xg;
    int64_t in_g, C4, Tp, left;
    const float *sample; /* per sample: each sample's scale, sample_stride apart */
    int64_t sample_stride;
};

static void grouped_round(void *arg, int64_t u0, int64_t u1) {
    const struct grouped_job *j = (const struct grouped_job *)arg;
    const int64_t C = j->c.C, T = j->c.T, in_g = j->in_g, C4 = j->C4, Tp = j->Tp, groups = C / in_g;
    const int norm = j->c.norm;
    const float eps = j->c.eps, qmax = j->c.qmax;
    float mean[BLOCK], rstd[BLOCK], amax[BLOCK], step[BLOCK];
    float *buf = block_buffer(&j->c);
    if (j->c.slope != 1.f && buf == NULL) return;
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / j->c.nblocks, t0 = u % j->c.nblocks * j->c.span;
        const int n = (int)(T - t0 < j->c.span ? T - t0 : j->c.span);
        int64_t ld;
        const float *xin = block_input(&j->c, b, t0, n, buf, &ld);
        uint8_t *gb = j->xg + b * groups * C4 * Tp * 4;
        column_stats(xin, C, ld, n, norm, eps, mean, rstd);
        if (j->sample) {
            for (int i = 0; i < n; ++i) step[i] = j->sample[b * j->sample_stride];
        } else {
            column_absmax(xin, C, ld, n, norm, mean, rstd, amax);
            for (int i = 0; i < n; ++i) step[i] = (amax[i] < eps ? eps : amax[i]) / qmax;
        }
        for (int i = 0; i < n; ++i) j->c.s[b * Tp + j->left + t0 + i] = step[i];
        /* one word of 4 channels per step, assembled in `word` and stored whole: byte stores 4 apart did not
         * vectorize (the pass took 5x the convolution's time on 8 channels) */
        for (int64_t g = 0; g < groups; ++g) {
            for (int64_t c4 = 0; c4 < C4; ++c4) {
                uint32_t word[BLOCK];
                for (int i = 0; i < n; ++i) word[i] = 0;
                for (int lane = 0; lane < 4; ++lane) {
                    const int64_t cc = c4 * 4 + lane;
                    const int shift = 8 * lane;
                    if (cc >= in_g) { /* padding channel: code 0 */
                        for (int i = 0; i < n; ++i) word[i] |= (uint32_t)128 << shift;
                        continue;
                    }
                    const float *row = xin + (g * in_g + cc) * ld;
                    for (int i = 0; i < n; ++i) {
                        float v = norm == 0 ? row[i] : norm == 1 ? (row[i] - mean[i]) * rstd[i] : row[i] * rstd[i];
                        word[i] |= (uint32_t)((int32_t)tq_code(rintf(v / step[i]), qmax) + 128) << shift;
                    }
                }
                memcpy(gb + ((g * C4 + c4) * Tp + j->left + t0) * 4, word, (size_t)n * 4);
            }
        }
    }
    free(buf);
}

/* Parallel over blocks of time steps (per sample: a first parallel pass finds each block's absmax): BLOCK steps,
 * or down to 64 where the input has too few blocks to give every thread some (a convolution's 100-500 frames were
 * one or two blocks, quantized on one thread while the others waited). Every step's code and scale is computed
 * by the same operations whatever the block size, so the split never changes a result. */
int tq_quantize_grouped(const float *x, int64_t B, int64_t C, int64_t T, float slope, int norm, float eps,
                        int bits, int per_sample, uint8_t *xg, int64_t in_g, int64_t C4, int64_t Tp, int64_t left,
                        float *s) {
    /* xg: (B, groups, C4, Tp, 4), channel c of conv group c / in_g in word (c % in_g) / 4; s: (B, Tp) per-step
     * scales (per sample: the sample's scale in every step), zero in the padding, whose codes are 0 (byte 128).
     * Input step t goes to column left + t. The norm and the scale cover all C channels. slope != 1: the input
     * is leaky_relu(x, slope) (the activation before a convolution, without its own pass over memory).
     * Returns -1 where the leaky ReLU's block buffers found no memory, else 0. */
    struct grouped_job j;
    memset(&j, 0, sizeof j);
    j.c.slope = slope;
    j.c.x = x;
    j.c.C = C;
    j.c.T = T;
    const int64_t threads = tq_num_threads();
    j.c.span = BLOCK;
    while (j.c.span > 64 && B * ((T + j.c.span - 1) / j.c.span) < 4 * threads) j.c.span /= 2;
    j.c.nblocks = (T + j.c.span - 1) / j.c.span;
    j.c.norm = norm;
    j.c.eps = eps;
    j.c.qmax = (float)((1 << (bits - 1)) - 1);
    j.c.s = s;
    j.xg = xg;
    j.in_g = in_g;
    j.C4 = C4;
    j.Tp = Tp;
    j.left = left;
    /* the padding columns only: the rounding pass writes every other byte and scale */
    for (int64_t r = 0; r < B * (C / in_g) * C4; ++r) {
        memset(xg + r * Tp * 4, 128, (size_t)left * 4);
        memset(xg + (r * Tp + left + T) * 4, 128, (size_t)(Tp - left - T) * 4);
    }
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t i = 0; i < left; ++i) s[b * Tp + i] = 0.f;
        for (int64_t i = left + T; i < Tp; ++i) s[b * Tp + i] = 0.f;
    }
    /* work: about 16 units per element (two passes, a division and the word assembly; 0.5-1 ns per element, the
     * 2-bit GEMV's time for 16 bytes), so that 100 K elements already split */
    const int64_t units = B * j.c.nblocks, work = 16 * B * C * T;
    float *sample = NULL;
    if (per_sample) {
        /* the samples' scales, then each block's maxima in one buffer; without the memory for it, one block at a
         * time, serially, each sample's scale waiting in its s[b, 0] */
        sample = (float *)malloc((size_t)(B + units) * sizeof(float));
        float one[1];
        j.c.block_max = sample ? sample + B : one;
        if (sample) tq_parallel_for(units, 1, work, channels_absmax, &j.c);
        j.sample = sample ? sample : s;
        j.sample_stride = sample ? 1 : Tp;
        for (int64_t b = 0; b < B; ++b) {
            float m = 0.f; /* in block order, as one pass over the steps would (the same NaN wins) */
            for (int64_t i = 0; i < j.c.nblocks; ++i) {
                if (!sample) channels_absmax(&j.c, b * j.c.nblocks + i, b * j.c.nblocks + i + 1);
                m = TQ_MAX(j.c.block_max[sample ? b * j.c.nblocks + i : 0], m);
            }
            *(sample ? sample + b : s + b * Tp) = (m < eps ? eps : m) / j.c.qmax;
        }
        if (!sample) {
            grouped_round(&j, 0, units); /* writes the same scale over s[b, left:left + T] */
            if (left > 0)
                for (int64_t b = 0; b < B; ++b) s[b * Tp] = 0.f;
            return j.c.failed ? -1 : 0;
        }
    }
    if (!j.c.failed) tq_parallel_for(units, 1, work, grouped_round, &j);
    free(sample);
    return j.c.failed ? -1 : 0;
}

/* The inner loops of the direct convolution take one span of work: output channels [ob, oe) (multiples of the
 * loop's block), output steps [tb, te) (tb a multiple of TQ_CONV_TILE), written to y[o * ldy + t * ys] (ys > 1:
 * a phase of a transposed convolution, every ys-th step). The steps are taken in blocks from t = 0 whatever the
 * span, so every output is computed by the same instructions however the work is split: results are bitwise
 * identical at any thread count. */
#define TQ_CONV_TILE 256 /* output steps per parallel unit: a multiple of every loop's block (16, 8, 64) */

struct conv_span {
    const uint8_t *xg; /* (C4, Tp, 4), at the step that output step 0 reads first */
    int64_t C4, Tp;
    const int8_t *wg; /* (k, outp, C4 * 4) */
    const int32_t *wsum; /* (k, outp) */
    int64_t out, outp, k, dil, stride;
    const float *s; /* per-step scales, aligned with xg */
    const float *wscale;
    int64_t wstep;
    const float *bias;
    float *y; /* output step 0 of channel 0 */
    int64_t ldy, ys;
};

/* store 8 / 4 / n output values of channel o at steps t0.. (masked / strided forms in the callers) */
static inline void conv_store(const struct conv_span *c, int64_t o, int64_t t0, const float *v, int64_t n) {
    float *dst = c->y + o * c->ldy + t0 * c->ys;
    for (int64_t i = 0; i < n; ++i) dst[i * c->ys] = v[i];
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define TQ_CONV_VNNI 1
static void conv_span_vnni(const struct conv_span *c, int64_t ob, int64_t oe, int64_t tb, int64_t te) {
    /* outputs [ob, oe), multiples of 8 */
    const int32_t *w32 = (const int32_t *)c->wg;
    const int64_t C4 = c->C4, Tp = c->Tp, outp = c->outp, k = c->k, dil = c->dil;
    for (int64_t o0 = ob; o0 < oe; o0 += 8) {
        for (int64_t t0 = tb; t0 < te; t0 += 16) {
            const int64_t n = te - t0 < 16 ? te - t0 : 16;
            const __mmask16 m = (__mmask16)(n == 16 ? 0xFFFF : (1u << n) - 1);
            __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0, f4 = f0, f5 = f0, f6 = f0, f7 = f0;
            for (int64_t j = 0; j < k; ++j) {
                const int64_t p = t0 + j * dil;
                __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
                const int32_t *wp = w32 + (j * outp + o0) * C4;
                const uint8_t *xp = c->xg + p * 4;
                for (int64_t c4 = 0; c4 < C4; ++c4) {
                    const __m512i xv = _mm512_maskz_loadu_epi32(m, xp + c4 * Tp * 4);
                    a0 = _mm512_dpbusd_epi32(a0, xv, _mm512_set1_epi32(wp[c4]));
                    a1 = _mm512_dpbusd_epi32(a1, xv, _mm512_set1_epi32(wp[C4 + c4]));
                    a2 = _mm512_dpbusd_epi32(a2, xv, _mm512_set1_epi32(wp[2 * C4 + c4]));
                    a3 = _mm512_dpbusd_epi32(a3, xv, _mm512_set1_epi32(wp[3 * C4 + c4]));
                    a4 = _mm512_dpbusd_epi32(a4, xv, _mm512_set1_epi32(wp[4 * C4 + c4]));
                    a5 = _mm512_dpbusd_epi32(a5, xv, _mm512_set1_epi32(wp[5 * C4 + c4]));
                    a6 = _mm512_dpbusd_epi32(a6, xv, _mm512_set1_epi32(wp[6 * C4 + c4]));
                    a7 = _mm512_dpbusd_epi32(a7, xv, _mm512_set1_epi32(wp[7 * C4 + c4]));
                }
                const __m512 sv = _mm512_maskz_loadu_ps(m, c->s + p);
                const int32_t *ws = c->wsum + j * outp + o0;
#define TQ_ACC(r) f##r = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a##r, _mm512_set1_epi32(128 * ws[r]))), sv, f##r)
                TQ_ACC(0); TQ_ACC(1); TQ_ACC(2); TQ_ACC(3); TQ_ACC(4); TQ_ACC(5); TQ_ACC(6); TQ_ACC(7);
#undef TQ_ACC
            }
            __m512 fs[8] = {f0, f1, f2, f3, f4, f5, f6, f7};
            for (int r = 0; r < 8 && o0 + r < c->out; ++r) {
                const int64_t o = o0 + r;
                __m512 v = fs[r];
                if (c->wscale) v = _mm512_mul_ps(v, _mm512_set1_ps(c->wscale[o * c->wstep]));
                if (c->bias) v = _mm512_add_ps(v, _mm512_set1_ps(c->bias[o]));
                if (c->ys == 1) {
                    _mm512_mask_storeu_ps(c->y + o * c->ldy + t0, m, v);
                } else {
                    float lanes[16];
                    _mm512_storeu_ps(lanes, v);
                    conv_store(c, o, t0, lanes, n);
                }
            }
        }
    }
}
#endif

#if !defined(TQ_CONV_VNNI) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TQ_CONV_AVX2 1
/* AVX2 without VNNI: vpmaddubsw (u8 x s8 -> pairs of int16) + vpmaddwd, 8 time steps per vector, 4 outputs per
 * block. The int16 pair sums cannot saturate while |w| <= 64 (2 * 255 * 64 < 32768): the caller checks. */
static void conv_span_avx2(const struct conv_span *c, int64_t ob, int64_t oe, int64_t tb, int64_t te) {
    /* outputs [ob, oe), multiples of 4 */
    const int32_t *w32 = (const int32_t *)c->wg;
    const int64_t C4 = c->C4, Tp = c->Tp, outp = c->outp, k = c->k, dil = c->dil;
    const __m256i ones = _mm256_set1_epi16(1), lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t o0 = ob; o0 < oe; o0 += 4) {
        for (int64_t t0 = tb; t0 < te; t0 += 8) {
            const int64_t n = te - t0 < 8 ? te - t0 : 8;
            const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), lanes);
            __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
            for (int64_t j = 0; j < k; ++j) {
                const int64_t p = t0 + j * dil;
                __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
                const int32_t *wp = w32 + (j * outp + o0) * C4;
                const uint8_t *xp = c->xg + p * 4;
                for (int64_t c4 = 0; c4 < C4; ++c4) {
                    const __m256i xv = _mm256_maskload_epi32((const int *)(xp + c4 * Tp * 4), m);
#define TQ_DOT(r) a##r = _mm256_add_epi32(a##r, _mm256_madd_epi16(_mm256_maddubs_epi16(xv, _mm256_set1_epi32(wp[r * C4 + c4])), ones))
                    TQ_DOT(0); TQ_DOT(1); TQ_DOT(2); TQ_DOT(3);
#undef TQ_DOT
                }
                const __m256 sv = _mm256_maskload_ps(c->s + p, m);
                const int32_t *ws = c->wsum + j * outp + o0;
#define TQ_ACC(r) f##r = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(a##r, _mm256_set1_epi32(128 * ws[r]))), sv, f##r)
                TQ_ACC(0); TQ_ACC(1); TQ_ACC(2); TQ_ACC(3);
#undef TQ_ACC
            }
            __m256 fs[4] = {f0, f1, f2, f3};
            for (int r = 0; r < 4 && o0 + r < c->out; ++r) {
                const int64_t o = o0 + r;
                __m256 v = fs[r];
                if (c->wscale) v = _mm256_mul_ps(v, _mm256_set1_ps(c->wscale[o * c->wstep]));
                if (c->bias) v = _mm256_add_ps(v, _mm256_set1_ps(c->bias[o]));
                if (c->ys == 1) {
                    _mm256_maskstore_ps(c->y + o * c->ldy + t0, m, v);
                } else {
                    float vals[8];
                    _mm256_storeu_ps(vals, v);
                    conv_store(c, o, t0, vals, n);
                }
            }
        }
    }
}
#endif

/* Portable version of the same loop (any CPU; AVX2 compilers vectorize the time loop). */
static void conv_span_generic(const struct conv_span *c, int64_t ob, int64_t oe, int64_t tb, int64_t te) {
    int32_t acc[64];
    float f[64];
    const int64_t C4 = c->C4, Tp = c->Tp, outp = c->outp, k = c->k, dil = c->dil, stride = c->stride;
    for (int64_t o = ob; o < oe && o < c->out; ++o) {
        const float w = c->wscale ? c->wscale[o * c->wstep] : 1.f, b = c->bias ? c->bias[o] : 0.f;
        for (int64_t t0 = tb; t0 < te; t0 += 64) {
            const int64_t n = te - t0 < 64 ? te - t0 : 64;
            for (int64_t i = 0; i < n; ++i) f[i] = 0.f;
            for (int64_t j = 0; j < k; ++j) {
                const int8_t *wj = c->wg + ((j * outp + o) * C4) * 4;
                for (int64_t i = 0; i < n; ++i) acc[i] = 0;
                for (int64_t c4 = 0; c4 < C4; ++c4) {
                    const uint8_t *xp = c->xg + (c4 * Tp + (t0 * stride + j * dil)) * 4;
                    const int8_t *wc = wj + c4 * 4;
                    for (int64_t i = 0; i < n; ++i) {
                        const uint8_t *v = xp + i * stride * 4;
                        acc[i] += (int32_t)v[0] * wc[0] + (int32_t)v[1] * wc[1] + (int32_t)v[2] * wc[2] +
                                  (int32_t)v[3] * wc[3];
                    }
                }
                const int32_t corr = 128 * c->wsum[j * outp + o];
                const float *sp = c->s + t0 * stride + j * dil;
                for (int64_t i = 0; i < n; ++i) f[i] += (float)(acc[i] - corr) * sp[i * stride];
            }
            if (c->wscale || c->bias)
                for (int64_t i = 0; i < n; ++i) f[i] = f[i] * w + b;
            conv_store(c, o, t0, f, n);
        }
    }
}

static void conv_span_run(const struct conv_span *c, int wmax, int64_t ob, int64_t oe, int64_t tb, int64_t te) {
#ifdef TQ_CONV_VNNI
    (void)wmax;
    if (c->stride == 1) {
        conv_span_vnni(c, ob, oe, tb, te);
        return;
    }
#elif defined(TQ_CONV_AVX2)
    if (c->stride == 1 && wmax <= 64) {
        conv_span_avx2(c, ob, oe, tb, te);
        return;
    }
#else
    (void)wmax;
#endif
    conv_span_generic(c, ob, oe, tb, te);
}

/* The parallel units of a convolution: (phase, block of 8 output channels, tile of TQ_CONV_TILE output steps),
 * so that a layer with few channels splits over time and one with few steps over channels. */
struct conv_job {
    struct conv_span c; /* phase 0 (a plain convolution: the only one) */
    int wmax;
    int64_t nob, ntiles, T_out;
    /* transposed: phases of the upsampling factor `up`, taps `lmax` at most (xg / s start at step 0 here) */
    int64_t up, pad, k;
};

static void conv_units(void *arg, int64_t u0, int64_t u1) {
    const struct conv_job *j = (const struct conv_job *)arg;
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t tile = u % j->ntiles, ob = (u / j->ntiles) % j->nob * 8;
        const int64_t oe = ob + 8 < j->c.outp ? ob + 8 : j->c.outp;
        const int64_t tb = tile * TQ_CONV_TILE;
        const int64_t te = tb + TQ_CONV_TILE < j->T_out ? tb + TQ_CONV_TILE : j->T_out;
        if (tb < te) conv_span_run(&j->c, j->wmax, ob, oe, tb, te);
    }
}

/* y (out, T_out) rows ldy apart = the convolution of grouped codes xg (C4, Tp, 4) by the weight wg
 * (k, outp, C4 * 4) int8, outp = out rounded up to 8, zero padded, with wsum its row sums (k, outp) and wmax
 * its largest |code| (packed once per layer: ternq.native.conv_weights). Parallel over channels and time. */
void tq_conv1d_grouped(const uint8_t *xg, int64_t C4, int64_t Tp, const int8_t *wg, const int32_t *wsum, int wmax,
                       int64_t out, int64_t k, int64_t dil, int64_t stride, int64_t T_out, const float *s,
                       const float *wscale, int64_t wstep, const float *bias, float *y, int64_t ldy) {
    struct conv_job j;
    memset(&j, 0, sizeof j);
    const int64_t outp = (out + 7) / 8 * 8;
    const struct conv_span c = {xg, C4, Tp, wg, wsum, out, outp, k, dil, stride, s, wscale, wstep, bias, y, ldy, 1};
    j.c = c;
    j.wmax = wmax;
    j.nob = outp / 8;
    j.ntiles = (T_out + TQ_CONV_TILE - 1) / TQ_CONV_TILE;
    j.T_out = T_out;
    tq_parallel_for(j.nob * j.ntiles, 1, outp * k * C4 * 4 * T_out, conv_units, &j);
}

/* the taps of phase r of a transposed convolution (k taps, upsampling `up`), and the first of them in the
 * phase-ordered weight */
static int64_t phase_taps(int64_t k, int64_t up, int64_t r) { return r < k ? (k - r + up - 1) / up : 0; }

struct conv_t_job {
    struct conv_job base;
    int64_t lmax, first[64], lo[64], len[64]; /* per phase: first tap, first input block m, output steps */
};

static void conv_t_units(void *arg, int64_t u0, int64_t u1) {
    const struct conv_t_job *j = (const struct conv_t_job *)arg;
    const struct conv_job *b = &j->base;
    const int64_t C4 = b->c.C4, outp = b->c.outp;
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t tile = u % b->ntiles, ob = (u / b->ntiles) % b->nob * 8, r = u / (b->ntiles * b->nob);
        const int64_t tb = tile * TQ_CONV_TILE;
        const int64_t te = tb + TQ_CONV_TILE < j->len[r] ? tb + TQ_CONV_TILE : j->len[r];
        if (tb >= te) continue;
        const int64_t taps = phase_taps(b->k, b->up, r), shift = j->lo[r] + j->lmax - taps;
        struct conv_span c = b->c;
        c.xg += shift * 4;
        c.s += shift;
        c.wg += j->first[r] * outp * C4 * 4;
        c.wsum += j->first[r] * outp;
        c.k = taps;
        c.y += j->lo[r] * b->up + r - b->pad;
        conv_span_run(&c, b->wmax, ob, ob + 8 < outp ? ob + 8 : outp, tb, te);
    }
}

/* The phases of a transposed convolution (1 <= up <= 64) into j: each one's first tap, first input block and
 * output steps, and the tiles of the longest; -1 where Tp input steps do not cover the steps a phase reads. */
static int transpose_plan(struct conv_t_job *j, int64_t k, int64_t up, int64_t pad, int64_t T_out, int64_t Tp) {
    j->base.T_out = T_out;
    j->base.up = up;
    j->base.pad = pad;
    j->base.k = k;
    j->lmax = phase_taps(k, up, 0);
    int64_t first = 0, longest = 0;
    for (int64_t r = 0; r < up; ++r) {
        const int64_t taps = phase_taps(k, up, r);
        j->first[r] = first;
        first += taps;
        /* output steps t in [0, T_out) with t + pad = m * up + r: m in [lo, hi) (pad - r > -up: lo >= 0) */
        j->lo[r] = (pad - r + up - 1) / up;
        const int64_t hi = (T_out + pad - r + up - 1) / up;
        j->len[r] = hi > j->lo[r] ? hi - j->lo[r] : 0;
        if (j->len[r] && hi - 1 + j->lmax - 1 >= Tp) return -1; /* the last step this phase reads */
        longest = j->len[r] > longest ? j->len[r] : longest;
    }
    j->base.ntiles = (longest + TQ_CONV_TILE - 1) / TQ_CONV_TILE;
    return 0;
}

/* ConvTranspose1d (dilation 1) as `up` interleaved convolutions: output step t = m * up + r - pad (phase r) is
 * sum over the phase's taps l of W[r + (L_r - 1 - l) * up] x[m - L_r + 1 + l], a stride-1 convolution over the
 * input, written every up-th step. No tap planes, no overlap-add: the same inner loops as tq_conv1d_grouped.
 * xg (C4, Tp, 4) / s (Tp,): the input at steps lmax - 1 .. lmax - 1 + T_in of Tp (lmax = the taps of phase 0),
 * zero padded; wg (k, outp, C4 * 4): the taps in phase order (ternq.native.conv_transpose_weights). Returns -1
 * where Tp is shorter than the phases read or up > 64, else 0. Parallel over phases, channels and time. */
int tq_conv_transpose1d_grouped(const uint8_t *xg, int64_t C4, int64_t Tp, const int8_t *wg, const int32_t *wsum,
                                int wmax, int64_t out, int64_t k, int64_t up, int64_t pad, int64_t T_out,
                                const float *s, const float *wscale, int64_t wstep, const float *bias, float *y,
                                int64_t ldy) {
    struct conv_t_job j;
    memset(&j, 0, sizeof j);
    if (up < 1 || up > 64 || k < 1 || pad < 0 || transpose_plan(&j, k, up, pad, T_out, Tp) != 0) return -1;
    const int64_t outp = (out + 7) / 8 * 8;
    const struct conv_span c = {xg, C4, Tp, wg, wsum, out, outp, 0, 1, 1, s, wscale, wstep, bias, y, ldy, up};
    j.base.c = c;
    j.base.wmax = wmax;
    j.base.nob = outp / 8;
    tq_parallel_for(up * j.base.nob * j.base.ntiles, 1, outp * k * C4 * 4 * (T_out / up + 1), conv_t_units, &j);
    return 0;
}

/* --- a whole int8_direct layer in one call --------------------------------------------------------------------
 *
 * A Conv1d / ConvTranspose1d forward of any batch and groups: the input quantized into this thread's scratch
 * (tq_quantize_grouped), then every (sample, group) in one parallel region whose units are the plain call's units
 * of each. From Python this was a quantizer call with two tensors allocated, then a ctypes call per sample and group
 * (each a fork and join of the threads), with the library and environment lookups of each: ~20 us per layer call,
 * as much as the arithmetic of a small layer, and serial. Every output is still computed by the same instructions
 * whichever unit holds it: bitwise identical at any thread count, and to the per-group calls. */

struct layer_job {
    const struct conv_job *conv;     /* the plain call's job for sample 0, group 0 (conv_units) */
    const struct conv_t_job *conv_t; /* or the transposed call's (conv_t_units) */
    int64_t groups, per;             /* per: units of one (sample, group) */
    int64_t x_step, s_step, w_step, wsum_step, scale_step, out_g, y_step;
};

static void layer_units(void *arg, int64_t u0, int64_t u1) {
    const struct layer_job *L = (const struct layer_job *)arg;
    while (u0 < u1) {
        const int64_t bg = u0 / L->per, b = bg / L->groups, g = bg % L->groups;
        const int64_t r0 = u0 % L->per, r1 = (bg + 1) * L->per < u1 ? L->per : u1 - bg * L->per;
        struct conv_t_job t;
        struct conv_job *j = &t.base;
        if (L->conv_t) t = *L->conv_t;
        else *j = *L->conv;
        j->c.xg += bg * L->x_step;
        j->c.s += b * L->s_step;
        j->c.wg += g * L->w_step;
        j->c.wsum += g * L->wsum_step;
        if (j->c.wscale) j->c.wscale += g * L->scale_step;
        if (j->c.bias) j->c.bias += g * L->out_g;
        j->c.y += bg * L->y_step;
        if (L->conv_t) conv_t_units(&t, r0, r1);
        else conv_units(j, r0, r1);
        u0 = bg * L->per + r1;
    }
}

/* The scratch for the grouped codes (B, groups, C4, Tp, 4) and scales (B, Tp), quantized; NULL (and *status -1)
 * without the memory. */
static uint8_t *layer_input(const float *x, int64_t B, int64_t C, int64_t T, float slope, int norm, float eps,
                            int bits, int per_sample, int64_t groups, int64_t C4, int64_t Tp, int64_t left,
                            float **s) {
    uint8_t *xg = (uint8_t *)tq_scratch(TQ_SLOT_QP, (size_t)(B * groups * C4 * Tp * 4));
    *s = (float *)tq_scratch(TQ_SLOT_S, (size_t)(B * Tp) * sizeof(float));
    if (xg == NULL || *s == NULL ||
        tq_quantize_grouped(x, B, C, T, slope, norm, eps, bits, per_sample, xg, C / groups, C4, Tp, left, *s) != 0) {
        if (xg) tq_scratch_done(TQ_SLOT_QP, xg);
        if (*s) tq_scratch_done(TQ_SLOT_S, *s);
        return NULL;
    }
    return xg;
}

int tq_conv1d_direct(const float *x, int64_t B, int64_t C, int64_t T, float slope, int norm, float eps, int bits,
                     int per_sample, int64_t groups, int64_t left, int64_t right, const int8_t *wg,
                     const int32_t *wsum, int wmax, int64_t out_g, int64_t k, int64_t dil, int64_t stride,
                     int64_t T_out, const float *wscale, int per_channel, const float *bias, float *y) {
    const int64_t in_g = C / groups, C4 = (in_g + 3) / 4, Tp = left + T + right, outp = (out_g + 7) / 8 * 8;
    if (B <= 0 || T_out <= 0) return 0;
    if (groups < 1 || C % groups || (T_out - 1) * stride + dil * (k - 1) >= Tp) return -2;
    float *s;
    uint8_t *xg = layer_input(x, B, C, T, slope, norm, eps, bits, per_sample, groups, C4, Tp, left, &s);
    if (xg == NULL) return -1;
    struct conv_job j;
    memset(&j, 0, sizeof j);
    const struct conv_span c = {xg, C4, Tp, wg, wsum, out_g, outp, k, dil, stride, s, wscale, per_channel, bias, y,
                                T_out, 1};
    j.c = c;
    j.wmax = wmax;
    j.nob = outp / 8;
    j.ntiles = (T_out + TQ_CONV_TILE - 1) / TQ_CONV_TILE;
    j.T_out = T_out;
    const struct layer_job L = {&j, NULL, groups, j.nob * j.ntiles, C4 * Tp * 4, Tp, k * outp * C4 * 4, k * outp,
                                per_channel ? out_g : 0, out_g, out_g * T_out};
    tq_parallel_for(B * groups * L.per, 1, B * groups * outp * k * C4 * 4 * T_out, layer_units, (void *)&L);
    tq_scratch_done(TQ_SLOT_QP, xg);
    tq_scratch_done(TQ_SLOT_S, s);
    return 0;
}

int tq_conv_transpose1d_direct(const float *x, int64_t B, int64_t C, int64_t T, float slope, int norm, float eps,
                               int bits, int per_sample, int64_t groups, int64_t left, int64_t right,
                               const int8_t *wg, const int32_t *wsum, int wmax, int64_t out_g, int64_t k,
                               int64_t up, int64_t pad, int64_t T_out, const float *wscale, int per_channel,
                               const float *bias, float *y) {
    const int64_t in_g = C / groups, C4 = (in_g + 3) / 4, Tp = left + T + right, outp = (out_g + 7) / 8 * 8;
    if (B <= 0 || T_out <= 0) return 0;
    if (groups < 1 || C % groups || up < 1 || up > 64 || k < 1 || pad < 0) return -2;
    struct conv_t_job j;
    memset(&j, 0, sizeof j);
    if (transpose_plan(&j, k, up, pad, T_out, Tp) != 0) return -2;
    float *s;
    uint8_t *xg = layer_input(x, B, C, T, slope, norm, eps, bits, per_sample, groups, C4, Tp, left, &s);
    if (xg == NULL) return -1;
    /* per channel: the scales of one group's outputs, the same for every group (the weight's dim 1) */
    const struct conv_span c = {xg, C4, Tp, wg, wsum, out_g, outp, 0, 1, 1, s, wscale, per_channel, bias, y, T_out,
                                up};
    j.base.c = c;
    j.base.wmax = wmax;
    j.base.nob = outp / 8;
    const struct layer_job L = {NULL, &j, groups, up * j.base.nob * j.base.ntiles, C4 * Tp * 4, Tp,
                                k * outp * C4 * 4, k * outp, 0, out_g, out_g * T_out};
    tq_parallel_for(B * groups * L.per, 1, B * groups * outp * k * C4 * 4 * (T_out / up + 1), layer_units,
                    (void *)&L);
    tq_scratch_done(TQ_SLOT_QP, xg);
    tq_scratch_done(TQ_SLOT_S, s);
    return 0;
}

/* Row sums of int8 codes w (N, K) into sums (int32), returning max |w|: what the unsigned-byte GEMV needs, without
 * the int32 copy of the whole weight that torch's sum(dtype=int32) makes. */
struct sums_job {
    const int8_t *w;
    int64_t K;
    int32_t *sums;
    int wmax;
};

static void row_sums_rows(void *arg, int64_t n0, int64_t n1) {
    struct sums_job *j = (struct sums_job *)arg;
    int wmax = 0;
    for (int64_t n = n0; n < n1; ++n) {
        int32_t total = 0;
        int rmax = 0;
        for (int64_t c = 0; c < j->K; ++c) {
            const int v = j->w[n * j->K + c];
            total += v;
            rmax = (v < 0 ? -v : v) > rmax ? (v < 0 ? -v : v) : rmax;
        }
        j->sums[n] = total;
        wmax = rmax > wmax ? rmax : wmax;
    }
    int seen = __atomic_load_n(&j->wmax, __ATOMIC_RELAXED);
    while (wmax > seen && !__atomic_compare_exchange_n(&j->wmax, &seen, wmax, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

/* Parallel over rows. */
int tq_row_sums(const int8_t *w, int64_t N, int64_t K, int32_t *sums) {
    struct sums_job j = {w, K, sums, 0};
    tq_parallel_for(N, 16, N * K, row_sums_rows, &j);
    return j.wmax;
}

int tq_abi_version(void) { return TQ_ABI_VERSION; }
