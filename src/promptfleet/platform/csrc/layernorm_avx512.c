/* Layer norm over the last dimension on AVX-512 (see pf_layer_norm).
 *
 * Why: at decode a GPT-2 layer norm sees [batch, 768] (~100 KB): the work is a few
 * microseconds and torch's dispatch around it is most of the cost (25 calls a step). */
#include <immintrin.h>
#include <omp.h>

#include "vec_math_avx512.h"

static void norm_row(const float *x, long D, const float *w, const float *b, float eps, float *y) {
    __m512 s = _mm512_setzero_ps();
    for (long d = 0; d < D; d += 16) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(tail_mask(D - d), x + d));
    __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(s) / (float)D), ss = _mm512_setzero_ps();
    for (long d = 0; d < D; d += 16) {
        __mmask16 k = tail_mask(D - d);
        __m512 c = _mm512_maskz_sub_ps(k, _mm512_maskz_loadu_ps(k, x + d), mean);
        ss = _mm512_fmadd_ps(c, c, ss);
    }
    /* two passes (mean, then squared deviations) like torch, population variance */
    __m512 inv = _mm512_set1_ps(1.0f / __builtin_sqrtf(_mm512_reduce_add_ps(ss) / (float)D + eps));
    for (long d = 0; d < D; d += 16) {
        __mmask16 k = tail_mask(D - d);
        __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + d), mean), inv);
        __m512 wv = w ? _mm512_maskz_loadu_ps(k, w + d) : _mm512_set1_ps(1.0f);
        __m512 bv = b ? _mm512_maskz_loadu_ps(k, b + d) : _mm512_setzero_ps();
        _mm512_mask_storeu_ps(y + d, k, _mm512_fmadd_ps(c, wv, bv));
    }
}

/* y[r] = (x[r] - mean) / sqrt(var + eps) * w + b for each of `rows` rows of D floats; w, b
 * may be NULL. Rows split over threads only when there are enough to pay for the fork. */
void pf_layer_norm(const float *x, long rows, long D, const float *w, const float *b, float eps, float *y,
                   int threads) {
    int nt = rows * D >= (1L << 16) ? threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long r = 0; r < rows; r++) norm_row(x + r * D, D, w, b, eps, y + r * D);
}
