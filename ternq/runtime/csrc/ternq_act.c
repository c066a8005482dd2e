/* QAT's activation fake-quantizer in one pass (ternq.qat.quantizers._fake_quantize, registered by native.py):
 * y = round(x / s) * s, s = max(max|x|, eps) / qmax over each line of C elements, the same IEEE float operations
 * in the same order as the eager torch form (abs, amax, clamp, divide by qmax, divide, round half to even,
 * multiply), so the output is bit for bit the eager one. A line is C elements `inner` apart in x viewed as
 * (outer, C, inner), contiguous: a Linear input's tokens (inner = 1) or a convolution input's time steps over its
 * channels (inner = T). x and y may be the same memory. */
#include "ternq_kernels.h"
#include "ternq_internal.h"

#include <math.h>
#include <stdint.h>

#define ACT_LANES 16   /* independent max / sum lanes: the compiler vectorizes them without reassociating */
#define ACT_BLOCK 256  /* time steps per unit of a channel-major input: C x 256 floats stay in L2 */

struct act_job {
    const float *x;
    float *y;
    int64_t C, inner, nblocks;
    float eps, qmax;
};

/* max(max|x|, eps) / qmax of one maximum and its NaN detector (a sum of the |x| taken the max of: NaN only if
 * one of them is; the plain max below drops a NaN, torch's amax keeps it, and clamp keeps it too) */
static inline float act_scale(float m, float nan, float eps, float qmax) {
    if (nan != nan) m = nan;
    m = m < eps ? eps : m;
    return m / qmax;
}

#if defined(__AVX512F__)
#include <immintrin.h>

#define ACT_ROUND (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

/* one line: max |x| (NaN dropped) and the NaN detector in 16-float vectors, the tail under a mask */
static float act_row_max(const float *x, int64_t C, float *nan) {
    __m512 vm = _mm512_setzero_ps(), vn = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= C; i += 16) {
        const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
        vm = _mm512_max_ps(a, vm); /* vm when a is NaN: the detector keeps it */
        vn = _mm512_add_ps(vn, a);
    }
    if (i < C) {
        const __mmask16 k = (__mmask16)((1u << (C - i)) - 1u);
        const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(k, x + i));
        vm = _mm512_max_ps(a, vm);
        vn = _mm512_add_ps(vn, a);
    }
    *nan = _mm512_reduce_add_ps(vn);
    return _mm512_reduce_max_ps(vm);
}

static void act_row_round(const float *x, int64_t C, float s, float *y) {
    const __m512 vs = _mm512_set1_ps(s);
    int64_t i = 0;
    for (; i + 16 <= C; i += 16)
        _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + i), vs),
                                                                   ACT_ROUND), vs));
    if (i < C) {
        const __mmask16 k = (__mmask16)((1u << (C - i)) - 1u);
        const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(k, x + i), vs), ACT_ROUND);
        _mm512_mask_storeu_ps(y + i, k, _mm512_mul_ps(r, vs));
    }
}

/* columns [0, w) of one block of a sample (C rows T apart), 16 at a time: their maxima and scales in registers */
static void act_block(const struct act_job *j, const float *x, float *y, int w) {
    const int64_t C = j->C, T = j->inner;
    const __m512 veps = _mm512_set1_ps(j->eps), vq = _mm512_set1_ps(j->qmax);
    for (int i = 0; i < w; i += 16) {
        const __mmask16 k = (__mmask16)(w - i >= 16 ? 0xFFFFu : (1u << (w - i)) - 1u);
        __m512 vm = _mm512_setzero_ps(), vn = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; ++c) {
            const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(k, x + c * T + i));
            vm = _mm512_max_ps(a, vm);
            vn = _mm512_add_ps(vn, a);
        }
        /* act_scale in lanes: NaN where the detector is; max(eps, s) is s when s is NaN (its second operand) */
        vm = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(vn, vn, _CMP_UNORD_Q), vm, vn);
        const __m512 vs = _mm512_div_ps(_mm512_max_ps(veps, vm), vq);
        for (int64_t c = 0; c < C; ++c) {
            const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(k, x + c * T + i), vs),
                                                  ACT_ROUND);
            _mm512_mask_storeu_ps(y + c * T + i, k, _mm512_mul_ps(r, vs));
        }
    }
}
#else
/* portable: the same operations in 16 independent lanes, which compilers vectorize without reassociating */
static float act_row_max(const float *x, int64_t C, float *nan) {
    float m[ACT_LANES], n[ACT_LANES];
    for (int l = 0; l < ACT_LANES; ++l) { m[l] = 0.f; n[l] = 0.f; }
    int64_t i = 0;
    for (; i + ACT_LANES <= C; i += ACT_LANES)
        for (int l = 0; l < ACT_LANES; ++l) {
            const float a = fabsf(x[i + l]);
            m[l] = a > m[l] ? a : m[l];
            n[l] += a;
        }
    for (int l = 0; i < C; ++i, ++l) {
        const float a = fabsf(x[i]);
        m[l] = a > m[l] ? a : m[l];
        n[l] += a;
    }
    float mx = 0.f, sum = 0.f;
    for (int l = 0; l < ACT_LANES; ++l) { mx = m[l] > mx ? m[l] : mx; sum += n[l]; }
    *nan = sum;
    return mx;
}

static void act_row_round(const float *x, int64_t C, float s, float *y) {
    for (int64_t i = 0; i < C; ++i) y[i] = rintf(x[i] / s) * s;
}

static void act_block(const struct act_job *j, const float *x, float *y, int w) {
    const int64_t C = j->C, T = j->inner;
    float m[ACT_BLOCK], n[ACT_BLOCK], s[ACT_BLOCK];
    for (int i = 0; i < w; ++i) { m[i] = 0.f; n[i] = 0.f; }
    for (int64_t c = 0; c < C; ++c) {
        const float *row = x + c * T;
        for (int i = 0; i < w; ++i) {
            const float a = fabsf(row[i]);
            m[i] = a > m[i] ? a : m[i];
            n[i] += a;
        }
    }
    for (int i = 0; i < w; ++i) s[i] = act_scale(m[i], n[i], j->eps, j->qmax);
    for (int64_t c = 0; c < C; ++c) {
        const float *row = x + c * T;
        float *dst = y + c * T;
        for (int i = 0; i < w; ++i) dst[i] = rintf(row[i] / s[i]) * s[i];
    }
}
#endif

/* lines of C contiguous floats: [r0, r1) of them */
static void act_rows(void *arg, int64_t r0, int64_t r1) {
    const struct act_job *j = (const struct act_job *)arg;
    const int64_t C = j->C;
    for (int64_t r = r0; r < r1; ++r) {
        float nan;
        const float m = act_row_max(j->x + r * C, C, &nan);
        act_row_round(j->x + r * C, C, act_scale(m, nan, j->eps, j->qmax), j->y + r * C);
    }
}

/* channel-major lines: units of (one outer index, up to ACT_BLOCK consecutive inner positions) */
static void act_columns(void *arg, int64_t u0, int64_t u1) {
    const struct act_job *j = (const struct act_job *)arg;
    const int64_t C = j->C, T = j->inner;
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / j->nblocks, t0 = u % j->nblocks * ACT_BLOCK;
        const int w = (int)(T - t0 < ACT_BLOCK ? T - t0 : ACT_BLOCK);
        act_block(j, j->x + b * C * T + t0, j->y + b * C * T + t0, w);
    }
}

void tq_fake_quantize(const float *x, int64_t outer, int64_t C, int64_t inner, float eps, int bits, float *y) {
    struct act_job j;
    j.x = x;
    j.y = y;
    j.C = C;
    j.inner = inner;
    j.nblocks = (inner + ACT_BLOCK - 1) / ACT_BLOCK;
    j.eps = eps;
    j.qmax = (float)((1 << (bits - 1)) - 1);
    const int64_t work = 8 * outer * C * inner; /* bytes read and written */
    if (inner == 1)
        tq_parallel_for(outer, 1, work, act_rows, &j);
    else
        tq_parallel_for(outer * j.nblocks, 1, work, act_columns, &j);
}
