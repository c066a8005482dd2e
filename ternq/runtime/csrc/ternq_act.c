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

/* lines of C contiguous floats: [r0, r1) of them */
static void act_rows(void *arg, int64_t r0, int64_t r1) {
    const struct act_job *j = (const struct act_job *)arg;
    const int64_t C = j->C;
    for (int64_t r = r0; r < r1; ++r) {
        const float *x = j->x + r * C;
        float *y = j->y + r * C;
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
        float mx = 0.f, nan = 0.f;
        for (int l = 0; l < ACT_LANES; ++l) { mx = m[l] > mx ? m[l] : mx; nan += n[l]; }
        const float s = act_scale(mx, nan, j->eps, j->qmax);
        for (i = 0; i < C; ++i) y[i] = rintf(x[i] / s) * s;
    }
}

/* channel-major lines: units of (one outer index, up to ACT_BLOCK consecutive inner positions) */
static void act_columns(void *arg, int64_t u0, int64_t u1) {
    const struct act_job *j = (const struct act_job *)arg;
    const int64_t C = j->C, T = j->inner;
    float m[ACT_BLOCK], n[ACT_BLOCK], s[ACT_BLOCK];
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / j->nblocks, t0 = u % j->nblocks * ACT_BLOCK;
        const int w = (int)(T - t0 < ACT_BLOCK ? T - t0 : ACT_BLOCK);
        const float *x = j->x + b * C * T + t0;
        float *y = j->y + b * C * T + t0;
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
