/* Layer norm over the last dimension on AVX-512, fp32 or bf16 (see pf_layer_norm).
 *
 * Why: at decode a GPT-2 layer norm sees [batch, 768] (~100 KB): the work is a few
 * microseconds and torch's dispatch around it is most of the cost (25 calls a step). */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

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

/* bf16 rows -> fp32 (vector for whole 16s, scalar for the tail) and back */
static void widen(const uint16_t *h, long n, float *f) {
    long i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(f + i, bf16x16_load_f32(h + i));
    for (; i < n; i++) f[i] = bf16_to_f32(h[i]);
}

static void narrow(const float *f, long n, uint16_t *h) {
    long i = 0;
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i *)(h + i), f32x16_to_bf16(_mm512_loadu_ps(f + i)));
    for (; i < n; i++) h[i] = f32_to_bf16(f[i]);
}

/* y[r] = (x[r] - mean) / sqrt(var + eps) * w + b for each of `rows` rows of D elements; w, b
 * may be NULL. fp32, or with `bf16` every tensor in bf16: each row is widened to fp32,
 * normalised there and rounded once on the way out (as torch does). Rows split over
 * threads only when there are enough to pay for the fork. Returns 0, or -1 when scratch
 * memory is short. */
int pf_layer_norm(const void *x, long rows, long D, const void *w, const void *b, float eps, void *y, int bf16,
                  int threads) {
    int nt = rows * D >= (1L << 16) ? threads : 1;
    if (!bf16) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (long r = 0; r < rows; r++) norm_row((const float *)x + r * D, D, w, b, eps, (float *)y + r * D);
        return 0;
    }
    int failed = 0;
#pragma omp parallel num_threads(nt) reduction(| : failed)
    {
        float *buf = malloc((size_t)(4 * D) * sizeof(float)); /* row in, row out, w, b */
        if (!buf) failed = 1;
        float *wf = buf ? buf + 2 * D : 0, *bf = buf ? buf + 3 * D : 0;
        if (buf && w) widen(w, D, wf);
        if (buf && b) widen(b, D, bf);
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            if (!buf) continue;
            widen((const uint16_t *)x + r * D, D, buf);
            norm_row(buf, D, w ? wf : 0, b ? bf : 0, eps, buf + D);
            narrow(buf + D, D, (uint16_t *)y + r * D);
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
