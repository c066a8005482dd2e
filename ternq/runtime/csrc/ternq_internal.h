/* What the translation units of the kernel library share and native.py does not bind (ternq_kernels.h is the
 * ctypes interface): the parallel loop over output rows (ternq_kernels.c, "threads") and the per-thread scratch buffers. */
#ifndef TERNQ_INTERNAL_H
#define TERNQ_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

typedef void (*tq_range_fn)(void *ctx, int64_t r0, int64_t r1);

/* fn(ctx, r0, r1) for chunks covering [0, n), on up to tq_num_threads() threads (ternq_kernels.c) */
void tq_parallel_for(int64_t n, int64_t grain, int64_t work, tq_range_fn fn, void *ctx);

/* tq_quantize_rows on the calling thread (inside another kernel's parallel chunk) */
void tq_quantize_rows_serial(const float *x, int64_t R, int64_t C, int norm, float eps, int bits,
                             int64_t rows_per_sample, int8_t *q, float *s);

/* A 64-byte aligned buffer of at least `bytes` for this thread's `slot` (0 .. TQ_SCRATCH_SLOTS - 1), kept between
 * calls (a worker thread of the pool keeps its own; freed when the thread exits) up to TQ_SCRATCH_MAX bytes; a
 * larger one is allocated for the call. Give it back with tq_scratch_done (which frees only the latter). NULL when
 * out of memory. (ternq_gemm.c) */
#define TQ_SCRATCH_SLOTS 5
enum { TQ_SLOT_Q, TQ_SLOT_QP, TQ_SLOT_S, TQ_SLOT_ROW, TQ_SLOT_PANEL }; /* codes, their layout, scales, a row, a panel */
#define TQ_SCRATCH_MAX ((size_t)16 << 20)
void *tq_scratch(int slot, size_t bytes);
void tq_scratch_done(int slot, void *p);

#endif /* TERNQ_INTERNAL_H */
