/* fp32 GEMM for the engine's linears on AVX-512 CPUs: C[m, n] = sum_k A[m, k] W[n, k] + bias[n].
 *
 * Why: at decode a linear sees M = batch (~32) rows and reads its whole weight from DRAM
 * for them. MKL and oneDNN then run at 10-11 GB/s of weight traffic on this project's
 * machines (about half the 22 GB/s two cores can stream) because the loads do not overlap
 * the FMAs. Here W is packed once into column panels of NR = 48 (three zmm registers),
 * [P][K][NR], so a panel is one contiguous stream, and the next panel is prefetched while
 * the current one is multiplied (the loop: gemm_panels.h).
 * Python (native_kernels.py) compiles this once per machine and calls it through ctypes;
 * threads come from torch's own OpenMP runtime (this library links the libgomp torch
 * loaded), split over panels.
 *
 * The epilogue fuses what follows a linear in GPT-2, so no extra pass over the output:
 * C = act(A W^T + bias) + R, with act none, tanh GELU or ReLU and R (the residual) optional.
 *
 * Contract: M a multiple of MR (the caller pads rows), A row-major [M][K], C and R
 * row-major [M][N]; bias and R may be NULL. */
#include <immintrin.h>
#include <omp.h>

#include "gemm_panels.h"

int pf_panel_width(void) { return NR; }
int pf_row_block(void) { return MR; }

/* fp32 panels are [K][NR]: one k step is 3 cache lines. */
static void block_f32(const void *A_, long lda, const void *B_, long K, void *C_, long ldc, int ncols,
                      const void *bias_, int act, const void *R_, const char *pf, long pf_lines, int cold) {
    const float *A = A_, *B = B_, *bias = bias_, *R = R_;
    float *C = C_;
    __m512 acc[MR][3];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 3; j++) acc[i][j] = _mm512_setzero_ps();
    long issued = 0;
    for (long k = 0; k < K; k++) {
        const float *b = B + k * NR;
        if (cold && k + PF_K < K) {
            _mm_prefetch((const char *)(b + PF_K * NR), _MM_HINT_T0);
            _mm_prefetch((const char *)(b + PF_K * NR + 16), _MM_HINT_T0);
            _mm_prefetch((const char *)(b + PF_K * NR + 32), _MM_HINT_T0);
        }
        if (issued < pf_lines) _mm_prefetch(pf + 64 * issued++, _MM_HINT_T1);
        __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16), b2 = _mm512_loadu_ps(b + 32);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            __m512 a = _mm512_set1_ps(A[i * lda + k]);
            acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(a, b2, acc[i][2]);
        }
    }
    for (int j = 0; j < 3; j++) {
        int c0 = j * 16;
        if (c0 >= ncols) break;
        int n = ncols - c0 < 16 ? ncols - c0 : 16;
        __mmask16 mask = (__mmask16)((1u << n) - 1u);
        __m512 bj = bias ? _mm512_maskz_loadu_ps(mask, bias + c0) : _mm512_setzero_ps();
        for (int i = 0; i < MR; i++) {
            __m512 v = activate(_mm512_add_ps(acc[i][j], bj), act);
            if (R) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, R + i * ldc + c0));
            _mm512_mask_storeu_ps(C + i * ldc + c0, mask, v);
        }
    }
}

void pf_linear(const float *A, long M, long K, const float *W, long N, const float *bias, int act, const float *R,
               float *C, int threads) {
    drive_panels(A, M, K, W, N, bias, act, R, C, threads, sizeof(float), K * NR * (long)sizeof(float), block_f32);
}

/* W [N][K] row-major -> [P][K][NR], zero columns past N. */
void pf_pack(const float *W, long N, long K, float *out) {
    long panels = (N + NR - 1) / NR;
#pragma omp parallel for
    for (long p = 0; p < panels; p++)
        for (long k = 0; k < K; k++)
            for (long j = 0; j < NR; j++) {
                long n = p * NR + j;
                out[(p * K + k) * NR + j] = n < N ? W[n * K + k] : 0.f;
            }
}
