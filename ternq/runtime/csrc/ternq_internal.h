/* What the translation units of the kernel library share and native.py does not bind (ternq_kernels.h is the
 * ctypes interface): the parallel loop over output rows (ternq_kernels.c, "threads"). */
#ifndef TERNQ_INTERNAL_H
#define TERNQ_INTERNAL_H

#include <stdint.h>

typedef void (*tq_range_fn)(void *ctx, int64_t r0, int64_t r1);

/* fn(ctx, r0, r1) for chunks covering [0, n), on up to tq_num_threads() threads (ternq_kernels.c) */
void tq_parallel_for(int64_t n, int64_t grain, int64_t work, tq_range_fn fn, void *ctx);

#endif /* TERNQ_INTERNAL_H */
