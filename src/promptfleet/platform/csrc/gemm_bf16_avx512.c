/* bf16 GEMM for the engine's linears on CPUs with AVX512-BF16: C = act(A W^T + bias) + R
 * with A, W, bias, R and C in bf16 and fp32 accumulation (what torch/oneDNN compute for a
 * bf16 linear), the output rounded to bf16 once, after the epilogue.
 *
 * Why: at decode the linears stream their weights from DRAM every step; in bf16 that is
 * half the bytes of fp32, and VDPBF16PS does two multiply-adds per fp32 lane. The panel
 * loop and prefetching are the fp32 kernel's (gemm_panels.h); a panel here is
 * [K/2][NR][2]: for each pair of k, the pair of weights of every column side by side,
 * which is the operand layout VDPBF16PS wants.
 *
 * Only these functions use AVX512-BF16/BW/VL (target attributes): the library still loads
 * on an AVX-512F CPU without them, and Python calls them only where the CPU has them.
 *
 * Contract: K even, M a multiple of MR, everything row-major; bias and R may be NULL. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "gemm_panels.h"

/* AVX512-BF16 intrinsics need GCC 10 / clang 9; an older compiler (or -DPF_NO_BF16) still
 * builds the rest of the library, with pf_has_bf16() = 0 so Python never asks for these. */
#if !defined(PF_NO_BF16) && \
    ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))

int pf_has_bf16(void) { return 1; }

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

BF16_TARGET static inline __m512 bf16x16_to_f32(__mmask16 mask, const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

BF16_TARGET static void block_bf16(const void *A_, long lda, const void *B_, long K, void *C_, long ldc, int ncols,
                                   const void *bias_, int act, const void *R_, const char *pf, long pf_lines,
                                   int cold) {
    const uint16_t *A = A_, *B = B_, *bias = bias_, *R = R_;
    uint16_t *C = C_;
    __m512 acc[MR][3];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 3; j++) acc[i][j] = _mm512_setzero_ps();
    long issued = 0, K2 = K / 2;
    for (long k2 = 0; k2 < K2; k2++) {
        const uint16_t *b = B + k2 * 2 * NR; /* 96 bf16: 3 cache lines */
        if (cold && k2 + PF_K < K2) {
            const char *ahead = (const char *)(b + PF_K * 2 * NR);
            _mm_prefetch(ahead, _MM_HINT_T0);
            _mm_prefetch(ahead + 64, _MM_HINT_T0);
            _mm_prefetch(ahead + 128, _MM_HINT_T0);
        }
        if (issued < pf_lines) _mm_prefetch(pf + 64 * issued++, _MM_HINT_T1);
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 32),
                 b2 = (__m512bh)_mm512_loadu_si512(b + 64);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            int32_t pair;
            memcpy(&pair, A + i * lda + 2 * k2, sizeof pair);
            __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, b1);
            acc[i][2] = _mm512_dpbf16_ps(acc[i][2], a, b2);
        }
    }
    for (int j = 0; j < 3; j++) {
        int c0 = j * 16;
        if (c0 >= ncols) break;
        int n = ncols - c0 < 16 ? ncols - c0 : 16;
        __mmask16 mask = (__mmask16)((1u << n) - 1u);
        __m512 bj = bias ? bf16x16_to_f32(mask, bias + c0) : _mm512_setzero_ps();
        for (int i = 0; i < MR; i++) {
            __m512 v = activate(_mm512_add_ps(acc[i][j], bj), act);
            if (R) v = _mm512_add_ps(v, bf16x16_to_f32(mask, R + i * ldc + c0));
            _mm256_mask_storeu_epi16(C + i * ldc + c0, mask, (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

void pf_linear_bf16(const uint16_t *A, long M, long K, const uint16_t *W, long N, const uint16_t *bias, int act,
                    const uint16_t *R, uint16_t *C, int threads) {
    drive_panels(A, M, K, W, N, bias, act, R, C, threads, sizeof(uint16_t), K * NR * (long)sizeof(uint16_t),
                 block_bf16);
}

/* W [N][K] bf16 row-major (K even) -> [P][K/2][NR][2], zero columns past N. */
void pf_pack_bf16(const uint16_t *W, long N, long K, uint16_t *out) {
    long panels = (N + NR - 1) / NR, K2 = K / 2;
#pragma omp parallel for
    for (long p = 0; p < panels; p++)
        for (long k2 = 0; k2 < K2; k2++)
            for (long j = 0; j < NR; j++) {
                long n = p * NR + j;
                uint16_t *o = out + ((p * K2 + k2) * NR + j) * 2;
                o[0] = n < N ? W[n * K + 2 * k2] : 0;
                o[1] = n < N ? W[n * K + 2 * k2 + 1] : 0;
            }
}

#else
int pf_has_bf16(void) { return 0; }
#endif
