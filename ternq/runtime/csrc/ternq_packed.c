/* Linear layers computed on 2-bit weight codes as storage="packed" keeps them (ternq/runtime/storage.py:
 * pack_rows): decode (one token, a few tokens) reads the weight at 2 bits per code in its inner loop, and never
 * writes the int8 codes anywhere. Decode is weight-bandwidth bound, so reading a quarter of the bytes is most of
 * the speed; the decoding itself is two vector ops per code plane (the SIMD trick of llama.cpp's TQ2_0 dot
 * product, ggml-cpu's ggml_vec_dot_tq2_0_q8_K):
 *
 *   row layout (pack_rows, planar): width = ceil(K / 4) bytes; field p (bits 2p..2p+1) of byte j holds the code of
 *   element p * width + j, in two's complement. XOR with 0b10 turns a 2-bit two's-complement field f (value v) into
 *   the offset-binary u = v + 2 in [0, 3], so one XOR of the bytes with 0xAA, then a shift and a mask per plane,
 *   gives unsigned bytes u. The activations stay signed int8 codes x, so the products are (unsigned u) x (signed x):
 *   vpdpbusd (VNNI), or vpmaddubsw + vpmaddwd (AVX2; |u * x| <= 3 * 128, pair and plane sums fit int16), and
 *       sum_k v_k x_k = sum_k u_k x_k - 2 * sum_k x_k,
 *   with the activation sum computed once per token (not a weight sum per row: nothing besides the 2-bit codes
 *   stays resident). Exact integer arithmetic: the result equals the int8 kernels' bit for bit.
 *
 * The four planes of one byte read the activations at four offsets p * width + j of the same row, so the
 * activations need no reordering, only zeros past K (the padding fields of the last plane then multiply 0).
 *
 * Prefill (many tokens) stays on torch._int_mm: tq_unpack_2bit decodes a tile of rows into a small int8 buffer
 * that the GEMM reads from cache (ternq/runtime/kernels.py: linear_int8_packed).
 *
 * Both are parallel over output rows (tq_parallel_for, ternq_kernels.c: torch's OpenMP pool), each thread reading
 * its share of the weight once; every output is computed by the same instructions at any thread count.
 */
#include "ternq_kernels.h"
#include "ternq_internal.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define TQ_INLINE static inline __attribute__((always_inline))
/* The SIMD loops prefetch the rows TQ_AHEAD passes ahead: a row is a few hundred bytes, too short a stream for
 * the hardware prefetcher to ramp up on, and one core's bandwidth depends on the misses it keeps in flight (about
 * 2x faster decode over a 28-layer model's weights on a loaded Xeon; prefetches past the end never fault). */
#define TQ_AHEAD 2

/* The float operations of tq_linear_epilogue, in its order: the output equals the int8 path's bit for bit. */
TQ_INLINE float rescale(int32_t acc, float sm, const float *wscale, int per_channel, const float *bias, int64_t n) {
    float v = (float)acc;
    v = per_channel ? v * wscale[n] * sm : v * (sm * wscale[0]);
    return bias ? v + bias[n] : v;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* The four planes of a row's 64 bytes b (offset binary) against the activations x0..x3, into the row's two
 * accumulators: a (planes 0 and 2: u) and o (planes 1 and 3 in place: 4u). */
#define TQ_PLANES512(b, a, o)                                                                                      \
    do {                                                                                                           \
        const __m512i hi_ = _mm512_srli_epi16(b, 4);                                                               \
        a = _mm512_dpbusd_epi32(a, _mm512_and_si512(b, low), x0);                                                  \
        o = _mm512_dpbusd_epi32(o, _mm512_and_si512(b, high), x1);                                                 \
        a = _mm512_dpbusd_epi32(a, _mm512_and_si512(hi_, low), x2);                                                \
        o = _mm512_dpbusd_epi32(o, _mm512_and_si512(hi_, high), x3);                                               \
    } while (0)

/* `rows` (1 or 4) weight rows from n against activation row xm, each activation load shared by the rows. A byte
 * b (XORed with 0xAA: offset binary) holds plane p's field at bits 2p: b & 3 is plane 0's u, b & 0xC plane 1's
 * 4u, and the same of b >> 4 planes 2 and 3; the odd planes go to their own accumulator o, whose lanes are then
 * 4 times their sums exactly. Per 64 bytes of a row: 1 XOR, 1 shift, 4 ANDs, 4 vpdpbusd, on the two ports (0, 5)
 * that run 512-bit integer ops, which bound the loop: a shift per plane (3 per 64 bytes) made it 15 % slower
 * (8.2 bytes of weight per cycle on a Xeon with AMX, now 9.5). Named accumulators, not arrays: GCC spilled arrays
 * of vectors to the stack every step. o's lanes stay below 2^31 for K < 2^25. */
TQ_INLINE void dots_vnni512(int rows, const int8_t *xm, const uint8_t *w, int64_t width, int32_t *out) {
    const __m512i flip = _mm512_set1_epi8((char)0xAA), low = _mm512_set1_epi8(0x03), high = _mm512_set1_epi8(0x0C);
    const int64_t full = width / 64 * 64;
    const uint8_t *w1 = rows == 4 ? w + width : w, *w2 = rows == 4 ? w + 2 * width : w, *w3 = rows == 4 ? w + 3 * width : w;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, o0 = a0, o1 = a0, o2 = a0, o3 = a0;
    __m512i b0, b1, b2, b3;
#define TQ_COLUMN512(j)                                                                                            \
    do {                                                                                                           \
        const __m512i x0 = _mm512_loadu_si512((const void *)(xm + (j)));                                          \
        const __m512i x1 = _mm512_loadu_si512((const void *)(xm + width + (j)));                                   \
        const __m512i x2 = _mm512_loadu_si512((const void *)(xm + 2 * width + (j)));                               \
        const __m512i x3 = _mm512_loadu_si512((const void *)(xm + 3 * width + (j)));                               \
        TQ_PLANES512(b0, a0, o0);                                                                                  \
        if (rows == 4) {                                                                                           \
            TQ_PLANES512(b1, a1, o1);                                                                              \
            TQ_PLANES512(b2, a2, o2);                                                                              \
            TQ_PLANES512(b3, a3, o3);                                                                              \
        }                                                                                                          \
    } while (0)
    for (int64_t j = 0; j < full; j += 64) {
        _mm_prefetch((const char *)(w + TQ_AHEAD * rows * width + j), _MM_HINT_T0);
        b0 = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + j)), flip);
        if (rows == 4) {
            _mm_prefetch((const char *)(w1 + TQ_AHEAD * rows * width + j), _MM_HINT_T0);
            _mm_prefetch((const char *)(w2 + TQ_AHEAD * rows * width + j), _MM_HINT_T0);
            _mm_prefetch((const char *)(w3 + TQ_AHEAD * rows * width + j), _MM_HINT_T0);
            b1 = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w1 + j)), flip);
            b2 = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w2 + j)), flip);
            b3 = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w3 + j)), flip);
        }
        TQ_COLUMN512(j);
    }
    if (full < width) { /* the tail: bytes past the row decode to 0 (not 2), facing the next plane's activations */
        const __mmask64 tail = ((__mmask64)1 << (width - full)) - 1;
        b0 = _mm512_maskz_mov_epi8(tail, _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail, w + full), flip));
        if (rows == 4) {
            b1 = _mm512_maskz_mov_epi8(tail, _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail, w1 + full), flip));
            b2 = _mm512_maskz_mov_epi8(tail, _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail, w2 + full), flip));
            b3 = _mm512_maskz_mov_epi8(tail, _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail, w3 + full), flip));
        }
        TQ_COLUMN512(full);
    }
#undef TQ_COLUMN512
    out[0] = _mm512_reduce_add_epi32(_mm512_add_epi32(a0, _mm512_srai_epi32(o0, 2)));
    if (rows == 4) {
        out[1] = _mm512_reduce_add_epi32(_mm512_add_epi32(a1, _mm512_srai_epi32(o1, 2)));
        out[2] = _mm512_reduce_add_epi32(_mm512_add_epi32(a2, _mm512_srai_epi32(o2, 2)));
        out[3] = _mm512_reduce_add_epi32(_mm512_add_epi32(a3, _mm512_srai_epi32(o3, 2)));
    }
}
#define TQ_DOTS dots_vnni512
#define TQ_PACKED_ISA 3
#elif defined(__AVX2__)
TQ_INLINE int32_t hsum256(__m256i a) {
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
    return _mm_cvtsi128_si32(h);
}

/* AVX2 (and AVX-VNNI's 256-bit vpdpbusd where the build has it); the last width % 32 bytes in scalar code. */
TQ_INLINE void dots_avx2(int rows, const int8_t *xm, const uint8_t *w, int64_t width, int32_t *out) {
    const __m256i three = _mm256_set1_epi8(3), flip = _mm256_set1_epi8((char)0xAA);
    const int64_t full = width / 32 * 32;
    __m256i a[4], b[4];
    for (int r = 0; r < rows; ++r) a[r] = _mm256_setzero_si256();
    for (int64_t j = 0; j < full; j += 32) {
        for (int r = 0; r < rows; ++r) {
            if (!(j & 63)) _mm_prefetch((const char *)(w + (r + TQ_AHEAD * rows) * width + j), _MM_HINT_T0);
            b[r] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + r * width + j)), flip);
        }
#if defined(__AVXVNNI__)
        for (int p = 0; p < 4; ++p) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xm + p * width + j));
            for (int r = 0; r < rows; ++r)
                a[r] = _mm256_dpbusd_avx_epi32(a[r], _mm256_and_si256(_mm256_srli_epi16(b[r], 2 * p), three), xv);
        }
#else
        /* int16 sums of the four planes: at most 4 * 2 * 3 * 128 = 3072 in magnitude, then one widening madd */
        const __m256i ones = _mm256_set1_epi16(1);
        __m256i h[4];
        for (int r = 0; r < rows; ++r) h[r] = _mm256_setzero_si256();
        for (int p = 0; p < 4; ++p) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xm + p * width + j));
            for (int r = 0; r < rows; ++r)
                h[r] = _mm256_add_epi16(h[r], _mm256_maddubs_epi16(
                    _mm256_and_si256(_mm256_srli_epi16(b[r], 2 * p), three), xv));
        }
        for (int r = 0; r < rows; ++r) a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(h[r], ones));
#endif
    }
    for (int r = 0; r < rows; ++r) {
        const uint8_t *wr = w + r * width;
        int32_t total = hsum256(a[r]);
        for (int p = 0; p < 4; ++p)
            for (int64_t j = full; j < width; ++j)
                total += (int32_t)(((wr[j] ^ 0xAA) >> (2 * p)) & 3) * (int32_t)xm[p * width + j];
        out[r] = total;
    }
}
#define TQ_DOTS dots_avx2
#if defined(__AVXVNNI__)
#define TQ_PACKED_ISA 2
#else
#define TQ_PACKED_ISA 1
#endif
#else
/* Portable: any CPU (compilers vectorize the j loop). */
TQ_INLINE void dots_generic(int rows, const int8_t *xm, const uint8_t *w, int64_t width, int32_t *out) {
    for (int r = 0; r < rows; ++r) {
        const uint8_t *wr = w + r * width;
        int32_t total = 0;
        for (int p = 0; p < 4; ++p) {
            const int8_t *xp = xm + p * width;
            for (int64_t j = 0; j < width; ++j) total += (int32_t)(((wr[j] ^ 0xAA) >> (2 * p)) & 3) * (int32_t)xp[j];
        }
        out[r] = total;
    }
}
#define TQ_DOTS dots_generic
#define TQ_PACKED_ISA 0
#endif

/* Which inner loop this build runs: 0 portable C, 1 AVX2, 2 AVX-VNNI (256-bit), 3 AVX-512 VNNI. The loader picks
 * the storage by it (ternq.runtime.picker.choose_storage): the portable loop is not faster than the int8 one. */
int tq_packed_isa(void) { return TQ_PACKED_ISA; }

/* One call's operands: activation codes xp (M, ldx) int8, zero from K to ldx >= 4 * width + 64, their row sums
 * xsum, scales s (M,); w2 (N, width) 2-bit rows; y (M, N). */
struct gemv_2bit_job {
    const int8_t *xp;
    const int32_t *xsum;
    int64_t M, ldx;
    const uint8_t *w2;
    int64_t width, N;
    const float *s, *wscale, *bias;
    int per_channel;
    float *y;
};

/* y[m, n] for the output rows n in [r0, r1), every m: four weight rows per pass (from L1 for each m). */
static void gemv_2bit_range(void *arg, int64_t r0, int64_t r1) {
    const struct gemv_2bit_job *g = (const struct gemv_2bit_job *)arg;
    const int64_t M = g->M, N = g->N, width = g->width;
    int32_t d[4];
    int64_t n = r0;
    for (; n + 4 <= r1; n += 4)
        for (int64_t m = 0; m < M; ++m) {
            TQ_DOTS(4, g->xp + m * g->ldx, g->w2 + n * width, width, d);
            for (int r = 0; r < 4; ++r)
                g->y[m * N + n + r] = rescale(d[r] - 2 * g->xsum[m], g->s[m], g->wscale, g->per_channel, g->bias,
                                              n + r);
        }
    for (; n < r1; ++n)
        for (int64_t m = 0; m < M; ++m) {
            TQ_DOTS(1, g->xp + m * g->ldx, g->w2 + n * width, width, d);
            g->y[m * N + n] = rescale(d[0] - 2 * g->xsum[m], g->s[m], g->wscale, g->per_channel, g->bias, n);
        }
}

int tq_linear_2bit(const float *x, int64_t R, int64_t K, int norm, float eps, int bits, int64_t rows_per_sample,
                   const uint8_t *w2, int64_t N, const float *wscale, int per_channel, const float *bias, float *y) {
    const int64_t width = (K + 3) / 4, ldx = 4 * width + 64;
    /* one block: the padded codes xp (R, ldx), then their scales and sums; one token's codes are quantized in place
     * (rows of more tokens are K apart, then spread to ldx) */
    const size_t codes = (size_t)(R * ldx + (R > 1 ? R * K : 0)), floats = (size_t)R * sizeof(float);
    int8_t *xp = (int8_t *)malloc(codes + floats + (size_t)R * sizeof(int32_t) + 64);
    if (xp == NULL) return -1;
    float *s = (float *)(void *)(xp + (codes + 63) / 64 * 64);
    int32_t *xsum = (int32_t *)(void *)(s + R);
    int8_t *q = R > 1 ? xp + R * ldx : xp;
    tq_quantize_rows(x, R, K, norm, eps, bits, rows_per_sample, q, s);
    for (int64_t m = 0; m < R; ++m) {
        int32_t total = 0;
        for (int64_t k = 0; k < K; ++k) total += q[m * K + k];
        if (R > 1) memcpy(xp + m * ldx, q + m * K, (size_t)K);
        memset(xp + m * ldx + K, 0, (size_t)(ldx - K));
        xsum[m] = total;
    }
    struct gemv_2bit_job g = {xp, xsum, R, ldx, w2, width, N, s, wscale, bias, per_channel, y};
    /* chunks of 16 rows: a cache line of y, and whole 4-row passes */
    tq_parallel_for(N, 16, R * N * width + N * width, gemv_2bit_range, &g);
    free(xp);
    return 0;
}

/* Rows [r0, r1) of 2-bit rows w2 (N, ceil(K / 4)) as int8 codes into out ((r1 - r0), K): a tile for the GEMM.
 * Vectorized by hand: the compilers' version of the scalar loop was 8x slower, as slow as the AMX GEMM it feeds. */
struct unpack_job {
    const uint8_t *w2;
    int64_t K, r0;
    int8_t *out;
};

static void unpack_range(void *arg, int64_t u0, int64_t u1) {
    const struct unpack_job *u = (const struct unpack_job *)arg;
    const int64_t K = u->K, width = (K + 3) / 4;
    const uint8_t *w2 = u->w2;
    const int64_t r0 = u->r0;
    int8_t *out = u->out;
    for (int64_t n = r0 + u0; n < r0 + u1; ++n) {
        const uint8_t *src = w2 + n * width;
        int8_t *dst = out + (n - r0) * K;
        int64_t j = 0;
#if defined(__AVX512BW__)
        const __m512i three = _mm512_set1_epi8(3), two = _mm512_set1_epi8(2);
        for (; j < width; j += 64) {
            const int64_t c = width - j < 64 ? width - j : 64;
            const __m512i b = _mm512_maskz_loadu_epi8(c == 64 ? ~(__mmask64)0 : ((__mmask64)1 << c) - 1, src + j);
            for (int p = 0; p < 4; ++p) {
                const int64_t lo = p * width + j, cnt = K - lo < c ? K - lo : c;
                if (cnt <= 0) break;
                const __m512i v = _mm512_sub_epi8(_mm512_xor_si512(_mm512_and_si512(_mm512_srli_epi16(b, 2 * p),
                                                                                    three), two), two);
                _mm512_mask_storeu_epi8(dst + lo, cnt == 64 ? ~(__mmask64)0 : ((__mmask64)1 << cnt) - 1, v);
            }
        }
#elif defined(__AVX2__)
        const __m256i three = _mm256_set1_epi8(3), two = _mm256_set1_epi8(2);
        for (; j + 32 <= width && 3 * width + j + 32 <= K; j += 32) {
            const __m256i b = _mm256_loadu_si256((const __m256i *)(src + j));
            for (int p = 0; p < 4; ++p)
                _mm256_storeu_si256((__m256i *)(dst + p * width + j), _mm256_sub_epi8(_mm256_xor_si256(
                    _mm256_and_si256(_mm256_srli_epi16(b, 2 * p), three), two), two));
        }
#endif
        for (int p = 0; p < 4; ++p) /* the rest (all of it in the portable build) */
            for (int64_t i = j; i < width && p * width + i < K; ++i)
                dst[p * width + i] = (int8_t)((((src[i] >> (2 * p)) & 3) ^ 2) - 2);
    }
}

void tq_unpack_2bit(const uint8_t *w2, int64_t K, int64_t r0, int64_t r1, int8_t *out) {
    struct unpack_job u = {w2, K, r0, out};
    tq_parallel_for(r1 - r0, 1, (r1 - r0) * K, unpack_range, &u);
}
