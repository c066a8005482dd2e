/* ternq's native CPU kernels: one pass where eager torch needs many.
 *
 * Plain C99 with no torch headers, so it compiles in about a second with any C compiler and loads with ctypes
 * (ternq/native.py); every function works on raw float32 / int8 / int32 pointers of contiguous tensors. The
 * loops are written for the compiler's auto-vectorizer (-O3 -march=...): the innermost loop of each function
 * runs over contiguous memory.
 *
 * Numerics follow the eager reference (ternq.quantizers.normalize_input + activation_scale + round) op for op:
 * float32 throughout, two-pass mean / variance, 1 / sqrt, division by the scale, round half to even. Sums are
 * taken in blocks of 16 terms like torch's cascade sum, so the result usually matches torch bit for bit, but
 * torch's summation order is an implementation detail of its build: an activation code may differ by one
 * where the normalized value lies within float32 rounding of a rounding boundary (documented tolerance).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 256 /* time steps per block of a channel-major input: C x 256 floats stay in L2 */

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
    for (int i = 0; i < n; ++i) amax[i] = 0.f;
    for (int64_t c = 0; c < C; ++c) {
        const float *row = x + c * T;
        if (norm == 0) {
            for (int i = 0; i < n; ++i) { float a = fabsf(row[i]); amax[i] = a > amax[i] ? a : amax[i]; }
        } else if (norm == 1) {
            for (int i = 0; i < n; ++i) {
                float a = fabsf((row[i] - mean[i]) * rstd[i]);
                amax[i] = a > amax[i] ? a : amax[i];
            }
        } else {
            for (int i = 0; i < n; ++i) {
                float a = fabsf(row[i] * rstd[i]);
                amax[i] = a > amax[i] ? a : amax[i];
            }
        }
    }
}

static void column_round(const float *x, int64_t C, int64_t T, int n, int norm, const float *mean,
                         const float *rstd, const float *scale, int scale_step, float qmax, int8_t *q,
                         int64_t ldq) {
    for (int64_t c = 0; c < C; ++c) {
        const float *row = x + c * T;
        int8_t *dst = q + c * ldq;
        for (int i = 0; i < n; ++i) {
            float v = norm == 0 ? row[i] : norm == 1 ? (row[i] - mean[i]) * rstd[i] : row[i] * rstd[i];
            float t = rintf(v / scale[i * scale_step]);
            t = t > qmax ? qmax : t < -qmax - 1.f ? -qmax - 1.f : t;
            dst[i] = (int8_t)t;
        }
    }
}

/* Channel-major input x (B, C, T), normalized over C per time step, quantized to signed `bits`.
 * q: (B, C, ldq) int8, written at columns [off, off + T); s: (B, lds) float32, written at [off, off + T)
 * (per token) or s[b * lds] (per sample, one scale per sample). */
void tq_quantize_channels(const float *x, int64_t B, int64_t C, int64_t T, int norm, float eps, int bits,
                          int per_sample, int8_t *q, int64_t ldq, float *s, int64_t lds, int64_t off) {
    const float qmax = (float)((1 << (bits - 1)) - 1);
    float mean[BLOCK], rstd[BLOCK], amax[BLOCK];
    for (int64_t b = 0; b < B; ++b) {
        const float *xb = x + b * C * T;
        int8_t *qb = q + b * C * ldq + off;
        float *sb = s + b * lds;
        float sample_max = 0.f;
        if (per_sample) {
            for (int64_t t0 = 0; t0 < T; t0 += BLOCK) {
                int n = (int)(T - t0 < BLOCK ? T - t0 : BLOCK);
                column_stats(xb + t0, C, T, n, norm, eps, mean, rstd);
                column_absmax(xb + t0, C, T, n, norm, mean, rstd, amax);
                for (int i = 0; i < n; ++i) sample_max = amax[i] > sample_max ? amax[i] : sample_max;
            }
            sample_max = (sample_max < eps ? eps : sample_max) / qmax;
            sb[0] = sample_max;
        }
        for (int64_t t0 = 0; t0 < T; t0 += BLOCK) {
            int n = (int)(T - t0 < BLOCK ? T - t0 : BLOCK);
            column_stats(xb + t0, C, T, n, norm, eps, mean, rstd);
            if (per_sample) {
                column_round(xb + t0, C, T, n, norm, mean, rstd, &sample_max, 0, qmax, qb + t0, ldq);
            } else {
                column_absmax(xb + t0, C, T, n, norm, mean, rstd, amax);
                float *st = sb + off + t0;
                for (int i = 0; i < n; ++i) st[i] = (amax[i] < eps ? eps : amax[i]) / qmax;
                column_round(xb + t0, C, T, n, norm, mean, rstd, st, 1, qmax, qb + t0, ldq);
            }
        }
    }
}

/* Row-major input x (R, C), normalized over C per row like torch's layer_norm (x * rstd + (-rstd * mean)),
 * quantized per row, or per group of `rows_per_sample` rows (per sample). q: (R, C) int8; s: (R,) float32. */
void tq_quantize_rows(const float *x, int64_t R, int64_t C, int norm, float eps, int bits,
                      int64_t rows_per_sample, int8_t *q, float *s) {
    const float qmax = (float)((1 << (bits - 1)) - 1);
    const float fc = (float)C;
    for (int64_t r0 = 0; r0 < R; r0 += rows_per_sample) {
        int64_t r1 = r0 + rows_per_sample < R ? r0 + rows_per_sample : R;
        float sample_max = 0.f;
        for (int pass = rows_per_sample > 1 ? 0 : 1; pass < 2; ++pass) {
            for (int64_t r = r0; r < r1; ++r) {
                const float *row = x + r * C;
                float a = 1.f, b = 0.f;
                if (norm == 1) {
                    double sum = 0.0, sq = 0.0;
                    for (int64_t c = 0; c < C; ++c) sum += row[c];
                    double m = sum / (double)C;
                    for (int64_t c = 0; c < C; ++c) { double d = row[c] - m; sq += d * d; }
                    float var = (float)(sq / (double)C);
                    a = 1.f / sqrtf(var + eps);
                    b = -a * (float)m;
                } else if (norm == 2) {
                    float acc = 0.f;
                    for (int64_t c = 0; c < C; ++c) { float v = row[c] * row[c]; acc += v; }
                    a = 1.f / sqrtf(acc / fc + eps);
                }
                float amax = 0.f;
                for (int64_t c = 0; c < C; ++c) {
                    float v = norm == 1 ? row[c] * a + b : norm == 2 ? row[c] * a : row[c];
                    float m = fabsf(v);
                    amax = m > amax ? m : amax;
                }
                if (pass == 0) {
                    sample_max = amax > sample_max ? amax : sample_max;
                    continue;
                }
                float scale = rows_per_sample > 1 ? sample_max : (amax < eps ? eps : amax) / qmax;
                s[r] = scale;
                int8_t *dst = q + r * C;
                for (int64_t c = 0; c < C; ++c) {
                    float v = norm == 1 ? row[c] * a + b : norm == 2 ? row[c] * a : row[c];
                    float t = rintf(v / scale);
                    t = t > qmax ? qmax : t < -qmax - 1.f ? -qmax - 1.f : t;
                    dst[c] = (int8_t)t;
                }
            }
            if (pass == 0) sample_max = (sample_max < eps ? eps : sample_max) / qmax;
        }
    }
}

/* Conv1d per-token epilogue: the int8 GEMM of all taps gave acc (k, out, W) int32; for output steps
 * t < n: y[o, t] = (sum_j acc[j, o, t*stride + j*dil] * s[t*stride + j*dil]) * wscale[o] + bias[o]
 * (wscale / bias may be NULL; wscale[o * wstep]: wstep 1 per channel, 0 per tensor). y rows are ldy apart. */
void tq_tap_sum(const int32_t *acc, int64_t k, int64_t out, int64_t W, const float *s, int64_t n,
                int64_t stride, int64_t dil, const float *wscale, int64_t wstep, const float *bias, float *y,
                int64_t ldy) {
    for (int64_t o = 0; o < out; ++o) {
        float *dst = y + o * ldy;
        for (int64_t t = 0; t < n; ++t) dst[t] = 0.f;
        for (int64_t j = 0; j < k; ++j) {
            const int32_t *a = acc + (j * out + o) * W + j * dil;
            const float *sj = s + j * dil;
            if (stride == 1) {
                for (int64_t t = 0; t < n; ++t) dst[t] += (float)a[t] * sj[t];
            } else {
                for (int64_t t = 0; t < n; ++t) dst[t] += (float)a[t * stride] * sj[t * stride];
            }
        }
        float w = wscale ? wscale[o * wstep] : 1.f, b = bias ? bias[o] : 0.f;
        if (wscale || bias)
            for (int64_t t = 0; t < n; ++t) dst[t] = dst[t] * w + b;
    }
}

/* ConvTranspose1d per-token epilogue: overlap-add of the taps of n input steps into full (out, ldf):
 * full[o, start + i*stride + j*dil] += acc[j, o, i] * s[i]. */
void tq_tap_scatter(const int32_t *acc, int64_t k, int64_t out, int64_t W, const float *s, int64_t n,
                    int64_t stride, int64_t dil, float *full, int64_t ldf, int64_t start) {
    for (int64_t o = 0; o < out; ++o) {
        for (int64_t j = 0; j < k; ++j) {
            const int32_t *a = acc + (j * out + o) * W;
            float *dst = full + o * ldf + start + j * dil;
            for (int64_t i = 0; i < n; ++i) dst[i * stride] += (float)a[i] * s[i];
        }
    }
}

/* Linear epilogue: acc (M, N) int32, or (N, M) when transposed; y (M, N) = acc * s[m] * wscale[.] + bias[n].
 * wscale has N entries (per channel) or 1 (per tensor). */
void tq_linear_epilogue(const int32_t *acc, int64_t M, int64_t N, int transposed, const float *s,
                        const float *wscale, int per_channel, const float *bias, float *y) {
    for (int64_t m = 0; m < M; ++m) {
        float *dst = y + m * N;
        const float sm = s[m];
        if (transposed) {
            for (int64_t n = 0; n < N; ++n) dst[n] = (float)acc[n * M + m];
        } else {
            const int32_t *a = acc + m * N;
            for (int64_t n = 0; n < N; ++n) dst[n] = (float)a[n];
        }
        if (per_channel) {
            for (int64_t n = 0; n < N; ++n) dst[n] = dst[n] * wscale[n] * sm;
        } else {
            const float f = sm * wscale[0];
            for (int64_t n = 0; n < N; ++n) dst[n] = dst[n] * f;
        }
        if (bias)
            for (int64_t n = 0; n < N; ++n) dst[n] += bias[n];
    }
}

/* int8 x int8 -> int32 for a few rows: acc (M, N) = x (M, K) @ w (N, K)^T. For M <= 4 this reads the weight
 * once, without a GEMM library's packing. With VNNI the dot products run as vpdpbusd (unsigned x signed bytes):
 * x + 128 is unsigned, and 128 * rowsum(w) (wsum, precomputed per layer) is subtracted again; exact. */
void tq_gemv_s8(const int8_t *x, const int8_t *w, const int32_t *wsum, int64_t M, int64_t N, int64_t K,
                uint8_t *xu, int32_t *acc) {
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
    if (wsum && xu) {
        for (int64_t i = 0; i < M * K; ++i) xu[i] = (uint8_t)(x[i] + 128);
        for (int64_t n = 0; n < N; ++n) {
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
#endif
    (void)wsum;
    (void)xu;
    for (int64_t n = 0; n < N; ++n) {
        const int8_t *wn = w + n * K;
        for (int64_t m = 0; m < M; ++m) {
            const int8_t *xm = x + m * K;
            int32_t total = 0;
            for (int64_t c = 0; c < K; ++c) total += (int32_t)xm[c] * (int32_t)wn[c];
            acc[m * N + n] = total;
        }
    }
}

int tq_abi_version(void) { return 1; }
