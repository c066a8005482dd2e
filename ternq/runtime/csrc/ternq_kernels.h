/* The interface of ternq_kernels.c, ternq_packed.c, ternq_gemm.c and ternq_act.c: the functions ternq/runtime/native.py binds with ctypes.
 *
 * native.py reads this file: the ABI number below is the one the library must report (tq_abi_version), and each
 * prototype must match the ctypes signature native.py declares for it, or loading raises (a mismatched ctypes
 * signature would pass wrong values, or corrupt memory, instead of failing). Change a prototype here, in
 * ternq_kernels.c and in native.py together, and bump the ABI number.
 */
#ifndef TERNQ_KERNELS_H
#define TERNQ_KERNELS_H

#include <stdint.h>

#define TQ_ABI_VERSION 12

void tq_quantize_channels(const float *x, int64_t B, int64_t C, int64_t T, int norm, float eps, int bits, int
    per_sample, int8_t *q, int64_t ldq, float *s, int64_t lds, int64_t off);

void tq_quantize_rows(const float *x, int64_t R, int64_t C, int norm, float eps, int bits, int64_t rows_per_sample,
    int8_t *q, float *s);

void tq_tap_sum(const int32_t *acc, int64_t k, int64_t out, int64_t W, const float *s, int64_t n, int64_t stride,
    int64_t dil, const float *wscale, int64_t wstep, const float *bias, float *y, int64_t ldy);

void tq_tap_scatter(const int32_t *acc, int64_t k, int64_t out, int64_t W, const float *s, int64_t n, int64_t
    stride, int64_t dil, float *full, int64_t ldf, int64_t start);

void tq_linear_epilogue(const int32_t *acc, int64_t M, int64_t N, int transposed, const float *s, const float
    *wscale, int per_channel, const float *bias, float *y);

void tq_gemv_s8(const int8_t *x, const int8_t *w, const int32_t *wsum, int64_t M, int64_t N, int64_t K, uint8_t *xu,
    int32_t *acc);

int tq_linear_rows(const float *x, int64_t R, int64_t K, int norm, float eps, int bits, int64_t rows_per_sample,
    const int8_t *w, const int32_t *wsum, int64_t N, const float *wscale, int per_channel, const float *bias,
    float *y);

int tq_quantize_grouped(const float *x, int64_t B, int64_t C, int64_t T, float slope, int norm, float eps, int bits,
    int per_sample, uint8_t *xg, int64_t in_g, int64_t C4, int64_t Tp, int64_t left, float *s);

void tq_conv1d_grouped(const uint8_t *xg, int64_t C4, int64_t Tp, const int8_t *wg, const int32_t *wsum, int wmax,
    int64_t out, int64_t k, int64_t dil, int64_t stride, int64_t T_out, const float *s, const float *wscale, int64_t
    wstep, const float *bias, float *y, int64_t ldy);

int tq_conv_transpose1d_grouped(const uint8_t *xg, int64_t C4, int64_t Tp, const int8_t *wg, const int32_t *wsum,
    int wmax, int64_t out, int64_t k, int64_t up, int64_t pad, int64_t T_out, const float *s, const float *wscale,
    int64_t wstep, const float *bias, float *y, int64_t ldy);

/* a whole int8_direct layer call: x (B, C, T) float32 quantized (tq_quantize_grouped; left / right zero steps), then
 * every sample and group in one parallel region into y (B, groups * out_g, T_out); wg (groups, k, outp, C4 * 4) and
 * wsum (groups, k * outp): each group's ternq.native.ConvWeights. Conv1d: wscale per channel of all groups;
 * ConvTranspose1d: per channel of one group (the same for every group), taps in phase order. Returns 0, -1 out of
 * memory, -2 a geometry the input does not cover. */
int tq_conv1d_direct(const float *x, int64_t B, int64_t C, int64_t T, float slope, int norm, float eps, int bits,
    int per_sample, int64_t groups, int64_t left, int64_t right, const int8_t *wg, const int32_t *wsum, int wmax,
    int64_t out_g, int64_t k, int64_t dil, int64_t stride, int64_t T_out, const float *wscale, int per_channel,
    const float *bias, float *y);

int tq_conv_transpose1d_direct(const float *x, int64_t B, int64_t C, int64_t T, float slope, int norm, float eps,
    int bits, int per_sample, int64_t groups, int64_t left, int64_t right, const int8_t *wg, const int32_t *wsum,
    int wmax, int64_t out_g, int64_t k, int64_t up, int64_t pad, int64_t T_out, const float *wscale, int
    per_channel, const float *bias, float *y);

int tq_row_sums(const int8_t *w, int64_t N, int64_t K, int32_t *sums);

/* threads: the OpenMP runtime's GOMP_parallel and omp_get_max_threads (NULL, NULL: serial); the threads the next
 * call may use */
void tq_set_openmp(void *parallel, void *max_threads);

int tq_num_threads(void);

/* the least work per parallel chunk (default 256 K; tests set 1 so that small shapes split too) */
void tq_set_min_work(int64_t work);

/* ternq_act.c: QAT's activation fake-quantizer, x viewed as (outer, C, inner) contiguous, absmax over C (y may be x) */

void tq_fake_quantize(const float *x, int64_t outer, int64_t C, int64_t inner, float eps, int bits, float *y);

/* ternq_packed.c: Linear on 2-bit rows (storage="packed") */

int tq_linear_2bit(const float *x, int64_t R, int64_t K, int norm, float eps, int bits, int64_t rows_per_sample,
    const uint8_t *w2, int64_t N, const float *wscale, int per_channel, const float *bias, float *y);

void tq_unpack_2bit(const uint8_t *w2, int64_t K, int64_t r0, int64_t r1, int8_t *out);

int tq_packed_isa(void);

/* ternq_gemm.c: Linear on many tokens (int8 GEMM on a weight packed once, tq_gemm_pack) */

void tq_gemm_pack(const int8_t *w, int64_t N, int64_t K, int8_t *wp, int32_t *wsum);

int tq_linear_gemm(const float *x, int64_t R, int64_t K, int norm, float eps, int bits, int64_t rows_per_sample,
    const int8_t *wp, const int32_t *wsum, int64_t N, const float *wscale, int per_channel, const float *bias,
    float *y);

/* the same on the 2-bit rows w2 (N, ceil(K / 4)) of storage="packed", read as stored (decoded per thread into a
 * cache-sized panel, never unpacked whole); wsum: their row sums, N rounded up to 16 entries (0 past N) */
int tq_linear_gemm_2bit(const float *x, int64_t R, int64_t K, int norm, float eps, int bits, int64_t rows_per_sample,
    const uint8_t *w2, const int32_t *wsum, int64_t N, const float *wscale, int per_channel, const float *bias,
    float *y);

/* the inner loop tq_linear_gemm and tq_linear_gemm_2bit run (0 portable, 1 AVX-512 VNNI, 2 AMX), after capping it at `cap` (< 0: no
 * change; tests run each loop this build has) */
int tq_gemm_isa(int cap);

int tq_abi_version(void);

#endif /* TERNQ_KERNELS_H */
