/* Linear on many tokens in one call: quantize the rows, int8 GEMM on a weight packed once at load (or on 2-bit rows
 * decoded into the same tiles inside the call), rescale (+ bias) in the store. Replaces three passes (native
 * quantizer, torch._int_mm, native epilogue) and their Python glue, and torch._int_mm's per-call packing of its
 * operands.
 *
 * Packed weight ("tiles", tq_gemm_pack): the codes w (N, K) int8 as column blocks of 16 output channels, each
 * (Kp / 4, 16, 4): row k4 of a block holds, for its 16 channels, the codes k4*4 .. k4*4+3; N padded to a multiple
 * of 16 and K to a multiple of 64 with zero codes. This is the layout of an AMX B tile (16 rows of 64 bytes, 4
 * consecutive k per int32 lane) and, one row at a time, of an AVX-512 vpdpbusd operand (16 channels x 4 k), so one
 * copy serves every ISA. The row sums of w (wsum, Np entries, 0 past N) undo the +128 of the unsigned-byte products (vpdpbusd).
 *
 * 2-bit rows (tq_linear_gemm_2bit, storage="packed", the default of a large Linear): no packed copy. Each thread
 * decodes its channel blocks, two at a time, into that layout in a panel of 32 x Kp bytes (L1 / L2), one byte of a
 * row to one 4-code group, in the rows' own k order (planar_order: the activations are reordered instead, once
 * per row); resident: the rows and their sums, 2 bits + 32 / K bits per weight.
 *
 * Inner loops (tq_gemm_isa: the best this build and the OS allow, capped by tq_gemm_isa(cap) for tests):
 *   2  AMX (amx_int8, -march=native on a CPU with it; the OS grants the tile state once per process via
 *      arch_prctl(ARCH_REQ_XCOMP_PERM)): tdpbssd, signed x signed bytes, 32 x 32 outputs per 2 x 2 block of tiles;
 *   1  AVX-512 VNNI: vpdpbusd on (x + 128) x w, 8 rows x 32 channels of int32 accumulators in registers;
 *   0  portable C (any compiler, -march=x86-64): the same sums, in the order the auto-vectorizer likes.
 * The sums are exact integers (|sum| <= K * 128 * 128 < 2^31 for K < 2^17), so every path and k order gives the
 * same int32 products, and the float epilogue is tq_linear_epilogue's operations in its order: the output equals the
 * int8_gemm kernel's (native quantizer + torch._int_mm + epilogue) bit for bit, at any thread count.
 *
 * Threads (tq_parallel_for, torch's OpenMP pool): the activations are quantized and laid out in parallel over
 * samples (prepare), then the GEMM runs in parallel over blocks of 32 output channels: each thread reads (or
 * decodes) its share of the weight once, and each output is computed by the same instructions whatever chunk
 * holds it.
 */
#define _GNU_SOURCE /* syscall() for arch_prctl */
#include "ternq_kernels.h"
#include "ternq_internal.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__) || defined(__AVX512F__) || defined(__AMX_INT8__)
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

/* --- per-thread scratch ---------------------------------------------------------------------------------------
 *
 * 64-byte aligned: an AMX tile row or a zmm load that straddles two cache lines costs two (the GEMM ran 1.4-1.9x
 * slower on malloc's 16-byte aligned buffers). Kept per thread between calls: a call allocated and freed three
 * buffers, and each worker thread its panel, every time (glibc maps and unmaps those past 128 KiB). */
#if defined(_WIN32)
#include <malloc.h>
static void *aligned_get(size_t bytes) { return _aligned_malloc(bytes ? bytes : 1, 64); }
static void aligned_put(void *p) { _aligned_free(p); }
#else
static void *aligned_get(size_t bytes) {
    void *p = NULL;
    return posix_memalign(&p, 64, bytes ? bytes : 1) == 0 ? p : NULL;
}
static void aligned_put(void *p) { free(p); }
#endif

#if defined(__GNUC__) && !defined(_WIN32) && !defined(TQ_NO_TLS)
#include <pthread.h>
/* each thread's buffers, freed when the thread exits (a server's short-lived request threads would otherwise leave
 * theirs behind: up to TQ_SCRATCH_SLOTS x TQ_SCRATCH_MAX each) */
struct tq_scratch_set {
    void *buf[TQ_SCRATCH_SLOTS];
    size_t size[TQ_SCRATCH_SLOTS];
};
static __thread struct tq_scratch_set *tq_mine;
static pthread_key_t tq_scratch_key;
static pthread_once_t tq_scratch_once = PTHREAD_ONCE_INIT;
static int tq_scratch_keyed;

static void tq_scratch_free(void *arg) {
    struct tq_scratch_set *set = (struct tq_scratch_set *)arg;
    for (int i = 0; i < TQ_SCRATCH_SLOTS; ++i) aligned_put(set->buf[i]);
    free(set);
}

static void tq_scratch_make_key(void) { tq_scratch_keyed = pthread_key_create(&tq_scratch_key, tq_scratch_free) == 0; }

/* this thread's set, made at its first use; NULL where it cannot be freed at the thread's exit (no key) */
static struct tq_scratch_set *tq_scratch_set(void) {
    if (tq_mine == NULL) {
        pthread_once(&tq_scratch_once, tq_scratch_make_key);
        if (!tq_scratch_keyed) return NULL;
        struct tq_scratch_set *set = (struct tq_scratch_set *)calloc(1, sizeof *set);
        if (set == NULL || pthread_setspecific(tq_scratch_key, set) != 0) {
            free(set);
            return NULL;
        }
        tq_mine = set;
    }
    return tq_mine;
}

void *tq_scratch(int slot, size_t bytes) {
    struct tq_scratch_set *set = bytes > TQ_SCRATCH_MAX ? NULL : tq_scratch_set();
    if (set == NULL) return aligned_get(bytes);
    if (set->size[slot] < bytes || set->buf[slot] == NULL) {
        aligned_put(set->buf[slot]);
        set->buf[slot] = aligned_get(bytes);
        set->size[slot] = set->buf[slot] ? bytes : 0;
    }
    return set->buf[slot];
}

void tq_scratch_done(int slot, void *p) {
    if (tq_mine == NULL || p != tq_mine->buf[slot]) aligned_put(p);
}
#else /* no thread-local storage or thread-exit hook: a buffer per call */
void *tq_scratch(int slot, size_t bytes) {
    (void)slot;
    return aligned_get(bytes);
}

void tq_scratch_done(int slot, void *p) {
    (void)slot;
    aligned_put(p);
}
#endif

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
    const int8_t *q;   /* (Mp, Kp) codes, zero padded (AMX: 16 x 64 tiles, portable: rows) */
    const uint8_t *xu; /* (Mp, Kp) codes + 128 (VNNI) */
    const int8_t *wp;  /* int8 weight: tq_gemm_pack's tiles */
    const uint8_t *w2; /* 2-bit weight: its rows (N, W), decoded per thread into tiles (decode_blocks) */
    const int32_t *wsum;
    int64_t M, N, Kp, W;
    const float *s, *wscale, *bias;
    int per_channel, isa;
    float *y;
    int failed;
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

/* --- the activations: quantized and laid out in one pass, parallel over samples ----------------------------- */

struct prep_job {
    const float *x;
    int64_t R, K, rows_per_sample;
    int norm, bits;
    float eps;
    int8_t *q; /* (R, K) codes */
    float *s;
    int amx;        /* 16 x 64 tiles, else rows */
    uint8_t offset; /* added to every code (128 for vpdpbusd's unsigned operand) */
    int64_t Kp;
    int64_t W;      /* > 0: the weight is 2-bit rows of W bytes: the codes in their k order (planar_order) */
    uint8_t *dst;
};

/* The k order of 2-bit rows: byte j of a row holds the codes k = j, W + j, 2W + j, 3W + j (the planar fields of
 * ternq/runtime/storage.py), so the activations are multiplied in the order k' = 4j + p <-> k = pW + j: one weight
 * byte decodes to one 4-code group of the tiles. A sum over k in another order is the same integer. row: K codes;
 * out: 4W (zero past K). */
static void planar_order(const int8_t *row, int64_t K, int64_t W, int8_t *out) {
    int64_t j = 0;
#if defined(__SSE2__)
    for (; j + 16 <= W && 3 * W + j + 16 <= K; j += 16) {
        const __m128i p0 = _mm_loadu_si128((const __m128i *)(row + j));
        const __m128i p1 = _mm_loadu_si128((const __m128i *)(row + W + j));
        const __m128i p2 = _mm_loadu_si128((const __m128i *)(row + 2 * W + j));
        const __m128i p3 = _mm_loadu_si128((const __m128i *)(row + 3 * W + j));
        const __m128i lo01 = _mm_unpacklo_epi8(p0, p1), hi01 = _mm_unpackhi_epi8(p0, p1);
        const __m128i lo23 = _mm_unpacklo_epi8(p2, p3), hi23 = _mm_unpackhi_epi8(p2, p3);
        _mm_storeu_si128((__m128i *)(out + 4 * j), _mm_unpacklo_epi16(lo01, lo23));
        _mm_storeu_si128((__m128i *)(out + 4 * j + 16), _mm_unpackhi_epi16(lo01, lo23));
        _mm_storeu_si128((__m128i *)(out + 4 * j + 32), _mm_unpacklo_epi16(hi01, hi23));
        _mm_storeu_si128((__m128i *)(out + 4 * j + 48), _mm_unpackhi_epi16(hi01, hi23));
    }
#endif
    for (; j < W; ++j)
        for (int64_t p = 0; p < 4; ++p) out[4 * j + p] = p * W + j < K ? row[p * W + j] : 0;
}

static void lay_row(const struct prep_job *p, int64_t m, const int8_t *src, int64_t K) {
    const int64_t Kp = p->Kp;
    if (p->amx) {
        /* each 16 x 64 tile of codes contiguous (tile (i, j) at (i * Kp / 64 + j) * 1024: the same start of a block
         * of 16 rows as row-major), which the prefetcher streams better than 16 rows Kp apart */
        uint8_t *dst = p->dst + (m / 16) * 16 * Kp + (m % 16) * TQ_KB;
        for (int64_t k0 = 0; k0 < Kp; k0 += TQ_KB) {
            const int64_t n = K - k0 < TQ_KB ? (K > k0 ? K - k0 : 0) : TQ_KB;
            memcpy(dst + k0 * 16, src + k0, (size_t)n);
            memset(dst + k0 * 16 + n, 0, (size_t)(TQ_KB - n));
        }
    } else {
        uint8_t *dst = p->dst + m * Kp;
        for (int64_t k = 0; k < K; ++k) dst[k] = (uint8_t)((uint8_t)src[k] + p->offset);
        memset(dst + K, p->offset, (size_t)(Kp - K));
    }
}

/* samples [u0, u1) (a row each per token): quantized on this thread (no nested parallel region; per token all
 * rows in one call, which takes four rows' reductions at once), then laid out */
static void prep_samples(void *arg, int64_t u0, int64_t u1) {
    const struct prep_job *p = (const struct prep_job *)arg;
    const int64_t rps = p->rows_per_sample, K = p->K, W = p->W;
    const int64_t m1 = u1 * rps < p->R ? u1 * rps : p->R;
    tq_quantize_rows_serial(p->x + u0 * rps * K, m1 - u0 * rps, K, p->norm, p->eps, p->bits, rps,
                            p->q + u0 * rps * K, p->s + u0 * rps);
    int8_t *ordered = W ? (int8_t *)tq_scratch(TQ_SLOT_ROW, (size_t)(4 * W)) : NULL;
    for (int64_t m = u0 * rps; m < m1; ++m) {
        if (ordered) {
            planar_order(p->q + m * K, K, W, ordered);
            lay_row(p, m, ordered, 4 * W);
        } else {
            lay_row(p, m, p->q + m * K, W ? 0 : K); /* W without memory: rows of zeros, the call fails */
        }
    }
    if (ordered) tq_scratch_done(TQ_SLOT_ROW, ordered);
}

/* quantize x (R, K) into s and the layout, padding rows [R, Mp) with zero codes (+ offset). The quantizer's passes
 * over each float (norm, mean, absmax, round) and the copies count as 32 units of work per code, so that 16 rows of
 * 1024 codes already split over the threads (at 16 units, 16 x 1024 was exactly one chunk's least work: serial). */
static void prepare(const struct prep_job *p, int64_t Mp) {
    const int64_t units = (p->R + p->rows_per_sample - 1) / p->rows_per_sample;
    tq_parallel_for(units, 1, 32 * p->R * p->K, prep_samples, (void *)p);
    if (p->amx) {
        for (int64_t m = p->R; m < Mp; ++m)
            for (int64_t k0 = 0; k0 < p->Kp; k0 += TQ_KB)
                memset(p->dst + (m / 16) * 16 * p->Kp + (m % 16) * TQ_KB + k0 * 16, 0, TQ_KB);
    } else {
        memset(p->dst + p->R * p->Kp, p->offset, (size_t)((Mp - p->R) * p->Kp));
    }
}

/* --- the weight: tq_gemm_pack's tiles, or 2-bit rows decoded into them --------------------------------------- */

#if defined(TQ_VNNI512)
/* the 16 x 16 int32 matrix r (rows r[i]) transposed in place */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) { /* u[4i + q], lane L: rows 4i..4i+3 of column 4L + q */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int q = 0; q < 4; ++q) {
        const __m512i v0 = _mm512_shuffle_i32x4(r[q], r[4 + q], 0x44), v1 = _mm512_shuffle_i32x4(r[q], r[4 + q], 0xEE);
        const __m512i v2 = _mm512_shuffle_i32x4(r[8 + q], r[12 + q], 0x44);
        const __m512i v3 = _mm512_shuffle_i32x4(r[8 + q], r[12 + q], 0xEE);
        t[q] = _mm512_shuffle_i32x4(v0, v2, 0x88);
        t[4 + q] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
        t[8 + q] = _mm512_shuffle_i32x4(v1, v3, 0x88);
        t[12 + q] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
}

/* 16 bytes of a 2-bit row -> their 16 x 4 codes (sign-extended fields, byte f of lane j = field f of byte j) */
static inline __m512i decode16(const uint8_t *b) {
#if defined(__AVX512VBMI__)
    const __m512i v = _mm512_cvtepu16_epi64(_mm_loadu_si128((const __m128i *)b));
    const __m512i fields = _mm512_multishift_epi64_epi8(_mm512_set1_epi64(0x0E0C0A0806040200LL), v);
    const __m512i codes = _mm512_set4_epi32(0, 0, 0, (int)0xFFFE0100u); /* 0, 1, -2, -1 */
    return _mm512_shuffle_epi8(codes, _mm512_and_si512(fields, _mm512_set1_epi8(3)));
#else
    const __m512i two = _mm512_set1_epi32(0x02020202);
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b));
    /* field f (bits 2f, 2f + 1) to bits 8f, 8f + 1 of its lane, then sign-extended: (f ^ 2) - 2 */
    v = _mm512_or_si512(_mm512_or_si512(v, _mm512_slli_epi32(v, 6)),
                        _mm512_or_si512(_mm512_slli_epi32(v, 12), _mm512_slli_epi32(v, 18)));
    return _mm512_sub_epi8(_mm512_xor_si512(_mm512_and_si512(v, _mm512_set1_epi32(0x03030303)), two), two);
#endif
}
#endif

/* channel blocks [b0, b1) of the 2-bit rows into tq_gemm_pack's layout at wp (block b at (b - b0) * 16 * Kp; k
 * in the planar order, zero past W and past N) */
static void decode_blocks(const struct gemm_job *g, int64_t b0, int64_t b1, int8_t *wp) {
    const int64_t W = g->W, Kp = g->Kp, J = Kp / 4;
    for (int64_t b = b0; b < b1; ++b) {
        int8_t *block = wp + (b - b0) * TQ_NB * Kp;
#if defined(TQ_VNNI512) && defined(__AVX512VBMI__)
        /* 64 bytes of each of the 16 rows, transposed as 16 x 16 words (word q of every row in r[q]: 4 k4 rows of
         * the tiles), then each byte's 4 fields picked out by one multishift per k4 row: one transposition per 64
         * bytes of a row, not per 16 after decoding (decode16's 4x larger vectors) */
        const __m512i codes = _mm512_set4_epi32(0, 0, 0, (int)0xFFFE0100u); /* 0, 1, -2, -1 */
        const __m512i three = _mm512_set1_epi8(3);
        __m512i pick[4];
        for (int jj = 0; jj < 4; ++jj) /* byte jj of each word: fields at bits 8 jj + 2 f (+ 32: the odd word) */
            pick[jj] = _mm512_set1_epi64((long long)((uint64_t)(8 * jj) | (uint64_t)(8 * jj + 2) << 8 |
                                                     (uint64_t)(8 * jj + 4) << 16 | (uint64_t)(8 * jj + 6) << 24 |
                                                     (uint64_t)(32 + 8 * jj) << 32 | (uint64_t)(34 + 8 * jj) << 40 |
                                                     (uint64_t)(36 + 8 * jj) << 48 | (uint64_t)(38 + 8 * jj) << 56));
        for (int64_t j0 = 0; j0 < J; j0 += 64) {
            __m512i r[16];
            const __mmask64 m = j0 >= W ? 0 : W - j0 >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << (W - j0)) - 1;
            for (int c = 0; c < TQ_NB; ++c) {
                const int64_t n = b * TQ_NB + c;
                r[c] = n < g->N ? _mm512_maskz_loadu_epi8(m, (const void *)(g->w2 + n * W + j0)) : _mm512_setzero_si512();
            }
            transpose16(r); /* r[q], lane c: bytes j0 + 4q .. j0 + 4q + 3 of row c */
            for (int64_t q = 0; q < 16 && j0 + 4 * q < J; ++q)
                for (int jj = 0; jj < 4; ++jj) {
                    const __m512i f = _mm512_and_si512(_mm512_multishift_epi64_epi8(pick[jj], r[q]), three);
                    _mm512_storeu_si512((void *)(block + (j0 + 4 * q + jj) * 64), _mm512_shuffle_epi8(codes, f));
                }
        }
#elif defined(TQ_VNNI512)
        static const uint8_t zeros[16] = {0};
        for (int64_t j0 = 0; j0 < J; j0 += 16) {
            __m512i r[16];
            for (int c = 0; c < TQ_NB; ++c) {
                const int64_t n = b * TQ_NB + c;
                uint8_t tail[16];
                const uint8_t *src = n < g->N && j0 < W ? g->w2 + n * W + j0 : zeros;
                if (src != zeros && j0 + 16 > W) {
                    memset(tail, 0, sizeof tail);
                    memcpy(tail, src, (size_t)(W - j0));
                    src = tail;
                }
                r[c] = decode16(src); /* lane j: channel c's codes of k4 row j0 + j */
            }
            transpose16(r); /* r[j]: k4 row j0 + j, lane c: channel c */
            for (int j = 0; j < 16; ++j) _mm512_storeu_si512((void *)(block + (j0 + j) * 64), r[j]);
        }
#else
        for (int64_t j = 0; j < J; ++j)
            for (int c = 0; c < TQ_NB; ++c) {
                const int64_t n = b * TQ_NB + c;
                const unsigned byte = n < g->N && j < W ? g->w2[n * W + j] : 0u;
                for (int f = 0; f < 4; ++f)
                    block[j * 64 + c * 4 + f] = (int8_t)((int)(((byte >> (2 * f)) & 3u) ^ 2u) - 2);
            }
#endif
    }
}

/* --- the inner loops, on channel blocks [b0, b1) whose tiles start at wp ------------------------------------- */

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

/* 32 x 32 outputs per pass in tiles 0-3, A in 4-5, B in 6-7; a 16-row or 16-channel remainder runs the same loop
 * with the tiles it needs */
static void amx_blocks(const struct gemm_job *g, const int8_t *wp, int64_t b0, int64_t b1) {
    const int64_t Kp = g->Kp, Mp = round_up(g->M, 16), bstride = TQ_NB * Kp;
    int32_t acc[32 * 32];
    for (int64_t b = b0; b < b1; b += 2) {
        const int two_cols = b + 1 < b1;
        const int8_t *w0 = wp + (b - b0) * bstride, *w1 = w0 + bstride;
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
}
#endif

#if defined(TQ_VNNI512)
/* up to 8 rows x 32 channels of int32 sums in 16 registers, one activation broadcast (4 codes + 128) feeding two
 * vpdpbusd; a lone last block of 16 channels reads zeros for the second half */
static void vnni_blocks(const struct gemm_job *g, const int8_t *wp, int64_t b0, int64_t b1) {
    const int64_t Kp = g->Kp, M = g->M, bstride = TQ_NB * Kp, K4 = Kp / 4;
    int32_t acc[8 * 32];
    static const int8_t zeros[64] = {0};
    for (int64_t b = b0; b < b1; b += 2) {
        const int two_cols = b + 1 < b1;
        const int8_t *w0 = wp + (b - b0) * bstride, *w1 = two_cols ? w0 + bstride : zeros;
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
static void generic_blocks(const struct gemm_job *g, const int8_t *wp, int64_t b0, int64_t b1) {
    const int64_t Kp = g->Kp, M = g->M, bstride = TQ_NB * Kp, K4 = Kp / 4;
    for (int64_t b = b0; b < b1; ++b) {
        const int8_t *wb = wp + (b - b0) * bstride;
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

static void run_blocks(const struct gemm_job *g, const int8_t *wp, int64_t b0, int64_t b1) {
#if defined(TQ_AMX)
    if (g->isa == 2) {
        amx_blocks(g, wp, b0, b1);
        return;
    }
#endif
#if defined(TQ_VNNI512)
    if (g->isa == 1) {
        vnni_blocks(g, wp, b0, b1);
        return;
    }
#endif
    generic_blocks(g, wp, b0, b1);
}

/* a chunk of channel blocks: the packed tiles in place, or the 2-bit rows decoded two blocks at a time into this
 * thread's panel (32 channels x Kp codes: in L1 / L2 for K up to a few thousand) and multiplied by every row */
static void gemm_blocks(void *arg, int64_t b0, int64_t b1) {
    struct gemm_job *g = (struct gemm_job *)arg;
#if defined(TQ_AMX)
    if (g->isa == 2) amx_config();
#endif
    if (g->w2 == NULL) {
        run_blocks(g, g->wp + b0 * TQ_NB * g->Kp, b0, b1);
    } else {
        int8_t *panel = (int8_t *)tq_scratch(TQ_SLOT_PANEL, (size_t)(2 * TQ_NB * g->Kp));
        if (panel == NULL) {
            __atomic_store_n(&g->failed, 1, __ATOMIC_RELAXED);
        } else {
            for (int64_t b = b0; b < b1; b += 2) {
                const int64_t e = b + 2 < b1 ? b + 2 : b1;
                decode_blocks(g, b, e, panel);
                run_blocks(g, panel, b, e);
            }
            tq_scratch_done(TQ_SLOT_PANEL, panel);
        }
    }
#if defined(TQ_AMX)
    if (g->isa == 2) _tile_release();
#endif
}

/* the call of tq_linear_gemm (wp) and tq_linear_gemm_2bit (w2 with W bytes per row) */
static int linear_gemm(const float *x, int64_t R, int64_t K, int norm, float eps, int bits, int64_t rows_per_sample,
                       const int8_t *wp, const uint8_t *w2, int64_t W, const int32_t *wsum, int64_t N,
                       const float *wscale, int per_channel, const float *bias, float *y) {
    const int isa = gemm_isa();
    const int64_t Kp = round_up(w2 ? 4 * W : K, TQ_KB), Mp = round_up(R, 32);
    int8_t *q = (int8_t *)tq_scratch(TQ_SLOT_Q, (size_t)(R * K));
    uint8_t *qp = (uint8_t *)tq_scratch(TQ_SLOT_QP, (size_t)(Mp * Kp));
    float *s = (float *)tq_scratch(TQ_SLOT_S, (size_t)R * sizeof(float));
    int ok = q && qp && s;
    if (ok) {
        /* rows padded to Kp codes (and Mp rows) of zeros; + 128 for vpdpbusd (a padded k meets a zero weight) */
        const struct prep_job p = {x, R, K, rows_per_sample, norm, bits, eps, q, s, isa == 2,
                                   (uint8_t)(isa == 1 ? 128 : 0), Kp, w2 ? W : 0, qp};
        prepare(&p, Mp);
        struct gemm_job g = {(const int8_t *)qp, qp, wp, w2, wsum, R, N, Kp, W, s, wscale, bias, per_channel, isa, y, 0};
        const int64_t blocks = round_up(N, TQ_NB) / TQ_NB;
        tq_parallel_for(blocks, 2, R * N * K, gemm_blocks, &g);
        ok = !g.failed;
    }
    if (q) tq_scratch_done(TQ_SLOT_Q, q);
    if (qp) tq_scratch_done(TQ_SLOT_QP, qp);
    if (s) tq_scratch_done(TQ_SLOT_S, s);
    return ok ? 0 : -1;
}

int tq_linear_gemm(const float *x, int64_t R, int64_t K, int norm, float eps, int bits, int64_t rows_per_sample,
                   const int8_t *wp, const int32_t *wsum, int64_t N, const float *wscale, int per_channel,
                   const float *bias, float *y) {
    return linear_gemm(x, R, K, norm, eps, bits, rows_per_sample, wp, NULL, 0, wsum, N, wscale, per_channel, bias, y);
}

int tq_linear_gemm_2bit(const float *x, int64_t R, int64_t K, int norm, float eps, int bits, int64_t rows_per_sample,
                        const uint8_t *w2, const int32_t *wsum, int64_t N, const float *wscale, int per_channel,
                        const float *bias, float *y) {
    return linear_gemm(x, R, K, norm, eps, bits, rows_per_sample, NULL, w2, (K + 3) / 4, wsum, N, wscale,
                       per_channel, bias, y);
}
