/* Linear on many tokens in one call: quantize the rows, int8 GEMM on a weight packed once at load, rescale (+ bias)
 * in the store. Replaces three passes (native quantizer, torch._int_mm, native epilogue) and their Python glue, and
 * torch._int_mm's per-call packing of its operands.
 *
 * Packed weight ("tiles", tq_gemm_pack): the codes w (N, K) int8 as column blocks of 16 output channels, each
 * (Kp / 4, 16, 4): row k4 of a block holds, for its 16 channels, the codes k4*4 .. k4*4+3; N padded to a multiple
 * of 16 and K to a multiple of 64 with zero codes. This is the layout of an AMX B tile (16 rows of 64 bytes, 4
 * consecutive k per int32 lane) and, one row at a time, of an AVX-512 vpdpbusd operand (16 channels x 4 k), so one
 * copy serves every ISA. The row sums of w (wsum, Np entries, 0 past N) undo the +128 of the unsigned-byte products (vpdpbusd).
 *
 * Inner loops (tq_gemm_isa: the best this build and the OS allow, capped by tq_gemm_isa(cap) for tests):
 *   2  AMX (amx_int8, -march=native on a CPU with it; the OS grants the tile state once per process via
 *      arch_prctl(ARCH_REQ_XCOMP_PERM)): tdpbssd, signed x signed bytes, 32 x 32 outputs per 2 x 2 block of tiles;
 *   1  AVX-512 VNNI: vpdpbusd on (x + 128) x w, 8 rows x 32 channels of int32 accumulators in registers;
 *   0  portable C (any compiler, -march=x86-64): the same sums, in the order the auto-vectorizer likes.
 * The sums are exact integers (|sum| <= K * 128 * 128 < 2^31 for K < 2^17), so every path gives the same int32
 * products, and the float epilogue is tq_linear_epilogue's operations in its order: the output equals the
 * int8_gemm kernel's (native quantizer + torch._int_mm + epilogue) bit for bit, at any thread count.
 *
 * Parallel over blocks of 32 output channels (tq_parallel_for, torch's OpenMP pool): each thread reads its share of
 * the weight once, and each (rows, channels) output is computed by the same instructions whatever chunk holds it.
 */
#define _GNU_SOURCE /* syscall() for arch_prctl */
#include "ternq_kernels.h"
#include "ternq_internal.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AMX_INT8__)
#include <immintrin.h>
#endif
#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#define TQ_AMX 1
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define TQ_VNNI512 1
#endif

#define TQ_KB 64 /* K padding: one AMX tile row of bytes */
#define TQ_NB 16 /* channels per packed column block */

static inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

void tq_gemm_pack(const int8_t *w, int64_t N, int64_t K, int8_t *wp, int32_t *wsum) {
    const int64_t Kp = round_up(K, TQ_KB), Np = round_up(N, TQ_NB);
    memset(wp, 0, (size_t)(Np * Kp));
    memset(wsum, 0, (size_t)Np * sizeof(int32_t));
    for (int64_t n = 0; n < N; ++n) {
        int8_t *block = wp + (n / TQ_NB) * TQ_NB * Kp + (n % TQ_NB) * 4;
        int32_t total = 0;
        for (int64_t k = 0; k < K; ++k) {
            block[(k / 4) * TQ_NB * 4 + k % 4] = w[n * K + k];
            total += w[n * K + k];
        }
        wsum[n] = total;
    }
}

/* --- ISA choice ---------------------------------------------------------------------------------------------- */

static int tq_gemm_cap = 2;

#if defined(TQ_AMX)
#define TQ_ARCH_REQ_XCOMP_PERM 0x1023
#define TQ_XFEATURE_XTILEDATA 18
static int amx_granted(void) {
    /* asked once per process (the permission is the process's); a kernel without AMX support refuses it */
    static int granted = -1;
    if (granted < 0) granted = syscall(SYS_arch_prctl, TQ_ARCH_REQ_XCOMP_PERM, TQ_XFEATURE_XTILEDATA) == 0;
    return granted;
}
#endif

static int gemm_isa(void) {
#if defined(TQ_AMX)
    if (tq_gemm_cap >= 2 && amx_granted()) return 2;
#endif
#if defined(TQ_VNNI512)
    if (tq_gemm_cap >= 1) return 1;
#endif
    return 0;
}

int tq_gemm_isa(int cap) {
    if (cap >= 0) tq_gemm_cap = cap;
    return gemm_isa();
}

/* --- the job ----------------------------------------------------------------------------------------------- */

struct gemm_job {
    const int8_t *q;   /* (Mp, Kp) codes, zero padded (AMX, portable) */
    const uint8_t *xu; /* (Mp, Kp) codes + 128 (VNNI) */
    const int8_t *wp;
    const int32_t *wsum;
    int64_t M, N, Kp;
    const float *s, *wscale, *bias;
    int per_channel, isa;
    float *y;
};

/* y[m, n0:n0+cols] from the int32 sums acc[0:cols] (the operations of tq_linear_epilogue, in its order) */
static inline void store_row(const struct gemm_job *g, int64_t m, int64_t n0, int64_t cols, const int32_t *acc) {
    const float sm = g->s[m];
    float *dst = g->y + m * g->N + n0;
    if (g->per_channel) {
        const float *ws = g->wscale + n0;
        for (int64_t j = 0; j < cols; ++j) dst[j] = (float)acc[j] * ws[j] * sm;
    } else {
        const float f = sm * g->wscale[0];
        for (int64_t j = 0; j < cols; ++j) dst[j] = (float)acc[j] * f;
    }
    if (g->bias) {
        const float *b = g->bias + n0;
        for (int64_t j = 0; j < cols; ++j) dst[j] += b[j];
    }
}

#if defined(TQ_AMX) || defined(TQ_VNNI512)
/* the outputs of a block of `rows` x 32 channels from its sums acc (row stride 32), clipped to M x N */
static void store_block(const struct gemm_job *g, int64_t m0, int64_t rows, int64_t n0, const int32_t *acc) {
    const int64_t cols = g->N - n0 < 32 ? g->N - n0 : 32;
    if (cols <= 0) return;
    for (int64_t i = 0; i < rows && m0 + i < g->M; ++i) store_row(g, m0 + i, n0, cols, acc + i * 32);
}
#endif

#if defined(TQ_AMX)
struct tq_tilecfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* every tile 16 rows x 64 bytes: A (16 rows of 64 codes), B (16 k4 rows of 16 channels x 4), C (16 x 16 int32) */
static void amx_config(void) {
    struct tq_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

/* channel blocks [b0, b1) (of 16): 32 x 32 outputs per pass in tiles 0-3, A in 4-5, B in 6-7; a 16-row or
 * 16-channel remainder runs the same loop with the tiles it needs */
static void amx_blocks(const struct gemm_job *g, int64_t b0, int64_t b1) {
    const int64_t Kp = g->Kp, Mp = round_up(g->M, 16), bstride = TQ_NB * Kp;
    int32_t acc[32 * 32];
    amx_config();
    for (int64_t b = b0; b < b1; b += 2) {
        const int two_cols = b + 1 < b1;
        const int8_t *w0 = g->wp + b * bstride, *w1 = w0 + bstride;
        for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
            const int two_rows = m0 + 16 < Mp;
            const int8_t *a0 = g->q + m0 * Kp, *a1 = a0 + 16 * Kp;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t k = 0; k < Kp; k += TQ_KB) {
                _tile_loadd(4, a0 + k * 16, 64);
                _tile_loadd(6, w0 + k * TQ_NB, 64);
                _tile_dpbssd(0, 4, 6);
                if (two_cols) {
                    _tile_loadd(7, w1 + k * TQ_NB, 64);
                    _tile_dpbssd(1, 4, 7);
                }
                if (two_rows) {
                    _tile_loadd(5, a1 + k * 16, 64);
                    _tile_dpbssd(2, 5, 6);
                    if (two_cols) _tile_dpbssd(3, 5, 7);
                }
            }
            _tile_stored(0, acc, 128);
            if (two_cols) _tile_stored(1, acc + 16, 128);
            if (two_rows) {
                _tile_stored(2, acc + 16 * 32, 128);
                if (two_cols) _tile_stored(3, acc + 16 * 32 + 16, 128);
            }
            store_block(g, m0, two_rows ? 32 : 16, b * TQ_NB, acc);
        }
    }
    _tile_release();
}
#endif

#if defined(TQ_VNNI512)
/* channel blocks [b0, b1): up to 8 rows x 32 channels of int32 sums in 16 registers, one activation broadcast
 * (4 codes + 128) feeding two vpdpbusd; a lone last block of 16 channels reads zeros for the second half */
static void vnni_blocks(const struct gemm_job *g, int64_t b0, int64_t b1) {
    const int64_t Kp = g->Kp, M = g->M, bstride = TQ_NB * Kp, K4 = Kp / 4;
    int32_t acc[8 * 32];
    static const int8_t zeros[64] = {0};
    for (int64_t b = b0; b < b1; b += 2) {
        const int two_cols = b + 1 < b1;
        const int8_t *w0 = g->wp + b * bstride, *w1 = two_cols ? w0 + bstride : zeros;
        const int64_t w1step = two_cols ? 64 : 0;
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            const int rows = M - m0 < 8 ? (int)(M - m0) : 8;
            __m512i c0[8], c1[8];
            for (int i = 0; i < 8; ++i) c0[i] = c1[i] = _mm512_setzero_si512();
            const uint8_t *x = g->xu + m0 * Kp;
            for (int64_t k4 = 0; k4 < K4; ++k4) {
                const __m512i v0 = _mm512_loadu_si512((const void *)(w0 + k4 * 64));
                const __m512i v1 = _mm512_loadu_si512((const void *)(w1 + k4 * w1step));
                for (int i = 0; i < 8; ++i) {
                    if (i < rows) {
                        int32_t word;
                        memcpy(&word, x + i * Kp + k4 * 4, 4);
                        const __m512i a = _mm512_set1_epi32(word);
                        c0[i] = _mm512_dpbusd_epi32(c0[i], a, v0);
                        c1[i] = _mm512_dpbusd_epi32(c1[i], a, v1);
                    }
                }
            }
            const __m512i s0 = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(g->wsum + b * TQ_NB)), 7);
            const __m512i s1 = two_cols ? _mm512_slli_epi32(_mm512_loadu_si512((const void *)(g->wsum + b * TQ_NB + 16)), 7)
                                        : _mm512_setzero_si512();
            for (int i = 0; i < rows; ++i) {
                _mm512_storeu_si512((void *)(acc + i * 32), _mm512_sub_epi32(c0[i], s0));
                _mm512_storeu_si512((void *)(acc + i * 32 + 16), _mm512_sub_epi32(c1[i], s1));
            }
            store_block(g, m0, rows, b * TQ_NB, acc);
        }
    }
}
#endif

/* portable: 4 rows x 16 channels of sums per pass, the 4 codes of a k4 step in the innermost loops */
static void generic_blocks(const struct gemm_job *g, int64_t b0, int64_t b1) {
    const int64_t Kp = g->Kp, M = g->M, bstride = TQ_NB * Kp, K4 = Kp / 4;
    for (int64_t b = b0; b < b1; ++b) {
        const int8_t *wb = g->wp + b * bstride;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int rows = M - m0 < 4 ? (int)(M - m0) : 4;
            int32_t c[4][TQ_NB];
            memset(c, 0, sizeof c);
            for (int64_t k4 = 0; k4 < K4; ++k4) {
                const int8_t *wk = wb + k4 * 64;
                for (int i = 0; i < rows; ++i) {
                    const int8_t *x = g->q + (m0 + i) * Kp + k4 * 4;
                    for (int j = 0; j < TQ_NB; ++j)
                        c[i][j] += x[0] * wk[j * 4] + x[1] * wk[j * 4 + 1] + x[2] * wk[j * 4 + 2] + x[3] * wk[j * 4 + 3];
                }
            }
            const int64_t n0 = b * TQ_NB, cols = g->N - n0 < TQ_NB ? g->N - n0 : TQ_NB;
            for (int i = 0; i < rows; ++i) store_row(g, m0 + i, n0, cols, c[i]);
        }
    }
}

static void gemm_blocks(void *arg, int64_t b0, int64_t b1) {
    const struct gemm_job *g = (const struct gemm_job *)arg;
#if defined(TQ_AMX)
    if (g->isa == 2) {
        amx_blocks(g, b0, b1);
        return;
    }
#endif
#if defined(TQ_VNNI512)
    if (g->isa == 1) {
        vnni_blocks(g, b0, b1);
        return;
    }
#endif
    generic_blocks(g, b0, b1);
}

int tq_linear_gemm(const float *x, int64_t R, int64_t K, int norm, float eps, int bits, int64_t rows_per_sample,
                   const int8_t *wp, const int32_t *wsum, int64_t N, const float *wscale, int per_channel,
                   const float *bias, float *y) {
    const int isa = gemm_isa();
    const int64_t Kp = round_up(K, TQ_KB), Mp = round_up(R, 32);
    int8_t *q = (int8_t *)malloc((size_t)(R * K));
    int8_t *qp = (int8_t *)malloc((size_t)(Mp * Kp));
    float *s = (float *)malloc((size_t)R * sizeof(float));
    const int ok = q && qp && s;
    if (ok) {
        tq_quantize_rows(x, R, K, norm, eps, bits, rows_per_sample, q, s);
        /* rows padded to Kp codes (and Mp rows) of zeros; + 128 for vpdpbusd (a padded k meets a zero weight); for
         * AMX each 16 x 64 tile of codes contiguous (tile (i, j) at (i * Kp / 64 + j) * 1024: the same start of a
         * block of 16 rows as row-major), which the prefetcher streams better than 16 rows Kp apart */
        const uint8_t offset = isa == 1 ? 128 : 0;
        memset(qp, (int)offset, (size_t)(Mp * Kp));
        for (int64_t m = 0; m < R; ++m) {
            const int8_t *src = q + m * K;
            if (isa == 2) {
                int8_t *dst = qp + (m / 16) * 16 * Kp + (m % 16) * TQ_KB;
                for (int64_t k0 = 0; k0 < K; k0 += TQ_KB)
                    memcpy(dst + k0 * 16, src + k0, (size_t)(K - k0 < TQ_KB ? K - k0 : TQ_KB));
            } else {
                int8_t *dst = qp + m * Kp;
                for (int64_t k = 0; k < K; ++k) dst[k] = (int8_t)(uint8_t)((uint8_t)src[k] + offset);
            }
        }
        struct gemm_job g = {qp, (const uint8_t *)qp, wp, wsum, R, N, Kp, s, wscale, bias, per_channel, isa, y};
        const int64_t blocks = round_up(N, TQ_NB) / TQ_NB;
        tq_parallel_for(blocks, 2, R * N * K, gemm_blocks, &g);
    }
    free(q);
    free(qp);
    free(s);
    return ok ? 0 : -1;
}
