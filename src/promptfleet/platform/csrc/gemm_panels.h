/* The panel loop shared by the fp32 and bf16 GEMMs (gemm_avx512.c, gemm_bf16_avx512.c).
 *
 * W is packed once into column panels of NR = 48 output columns (three zmm registers of
 * fp32 accumulators), each panel one contiguous stream of `panel_bytes`; threads split the
 * panels; each panel is multiplied against all rows in blocks of MR = 8 (24 accumulators)
 * by the element type's `block` function, and while the later row blocks run on the panel
 * (now in L2) the next panel is prefetched into L2, its lines spread over those blocks.
 * The epilogue fuses what follows a linear in GPT-2: C = act(A W^T + bias) + R. */
#ifndef PROMPTFLEET_GEMM_PANELS_H
#define PROMPTFLEET_GEMM_PANELS_H
#include <immintrin.h>
#include <omp.h>

#include "vec_math_avx512.h"

#define NR 48
#define MR 8
#define PF_K 32 /* k steps ahead for in-panel prefetch of a panel nobody prefetched */

enum { ACT_NONE = 0, ACT_GELU_TANH = 1, ACT_RELU = 2 };

static inline __m512 activate(__m512 v, int act) {
    if (act == ACT_GELU_TANH) return gelu_tanh512(v);
    if (act == ACT_RELU) return _mm512_max_ps(_mm512_setzero_ps(), v); /* NaN stays NaN, as in torch */
    return v;
}

/* One MR x NR block: rows A[0..MR) (lda elements apart) against one panel B; writes
 * ncols (<= NR) columns of C (ldc apart) with bias/act/R applied. While it runs it
 * prefetches `pf_lines` cache lines from `pf` into L2; `cold` prefetches the panel's own
 * lines PF_K steps ahead (its first pass, when nothing prefetched it). */
typedef void (*panel_block_fn)(const void *A, long lda, const void *B, long K, void *C, long ldc, int ncols,
                               const void *bias, int act, const void *R, const char *pf, long pf_lines, int cold);

/* C [M][N] = act(A [M][K] . W^T + bias) + R over all panels; elem: bytes per A/C/bias/R
 * element; panel_bytes: bytes of one packed panel. */
static void drive_panels(const void *A, long M, long K, const void *W, long N, const void *bias, int act,
                         const void *R, void *C, int threads, long elem, long panel_bytes, panel_block_fn block) {
    long panels = (N + NR - 1) / NR, blocks = M / MR;
#pragma omp parallel num_threads(threads)
    {
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        long p0 = panels * t / nt, p1 = panels * (t + 1) / nt;
        for (long p = p0; p < p1; p++) {
            const char *B = (const char *)W + p * panel_bytes;
            int ncols = (int)(N - p * NR < NR ? N - p * NR : NR);
            /* the next panel's lines, spread over row blocks 1.. (block 0 reads this panel cold) */
            const char *next = p + 1 < p1 ? B + panel_bytes : 0;
            long lines = next ? panel_bytes / 64 : 0;
            long per = blocks > 1 ? (lines + blocks - 2) / (blocks - 1) : 0;
            for (long r = 0; r < blocks; r++) {
                long lo = per * (r - 1), hi = per * r < lines ? per * r : lines;
                long n_pf = (r == 0 || hi <= lo) ? 0 : hi - lo;
                long at = (r * MR * N + p * NR) * elem;
                block((const char *)A + r * MR * K * elem, K, B, K, (char *)C + at, N, ncols,
                      bias ? (const char *)bias + p * NR * elem : 0, act, R ? (const char *)R + at : 0,
                      n_pf ? next + 64 * lo : 0, n_pf, r == 0 && (p == p0 || blocks == 1));
            }
        }
    }
}

#endif
