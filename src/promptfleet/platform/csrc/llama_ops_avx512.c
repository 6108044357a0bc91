/* The Llama family's element-wise kernels on AVX-512 (fp32, or bf16 tensors with fp32
 * arithmetic): RMSNorm, rotary position embeddings and the SwiGLU gate.
 *
 * Why: at decode these see [batch, width] rows (tens of KB): the arithmetic is a few
 * microseconds and torch's dispatch around its several element-wise ops per call (square,
 * mean, rsqrt, mul, mul; chunk, neg, cat, mul, mul, add) costs more. Each follows
 * transformers' Llama operation for operation (same products and sums in the same order,
 * no fused multiply-adds: this file's operations are written as separate multiplies and
 * adds, and the library is compiled with -ffp-contract=off), so fp32 results agree with
 * torch to its rounding of the reductions.
 *
 * With `bf16`, tensors hold bf16 (raw uint16 bits): values are widened to fp32, computed,
 * and rounded where transformers rounds (its bf16 ops round every result). */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "vec_math_avx512.h"

/* 16 (or the k-masked first few) elements at element i of p as fp32; AVX-512F only (the
 * masked 16-bit loads and stores need BW/VL, which this library does not assume) */
static inline __m512 load_x(const void *p, long i, __mmask16 k, int bf16) {
    if (!bf16) return _mm512_maskz_loadu_ps(k, (const float *)p + i);
    if (k == 0xFFFF) return bf16x16_load_f32((const uint16_t *)p + i);
    uint16_t tmp[16] = {0};
    memcpy(tmp, (const uint16_t *)p + i, sizeof(uint16_t) * __builtin_popcount(k));
    return bf16x16_load_f32(tmp);
}

static inline void store_x(void *p, long i, __mmask16 k, __m512 v, int bf16) {
    if (!bf16) {
        _mm512_mask_storeu_ps((float *)p + i, k, v);
        return;
    }
    __m256i h = f32x16_to_bf16(v);
    if (k == 0xFFFF) {
        _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), h);
        return;
    }
    uint16_t tmp[16];
    _mm256_storeu_si256((__m256i *)tmp, h);
    memcpy((uint16_t *)p + i, tmp, sizeof(uint16_t) * __builtin_popcount(k));
}

/* v rounded to bf16 precision (kept in fp32): what a bf16 tensor op's result holds */
static inline __m512 round_bf16(__m512 v) {
    __m512i h = _mm512_cvtepu16_epi32(f32x16_to_bf16(v));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}

static inline int threads_for(long elements, int threads) { return elements >= (1L << 16) ? threads : 1; }

/* y[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)) over `rows` rows of D (transformers'
 * LlamaRMSNorm: normalised in fp32, rounded to the tensor's dtype, then times w). */
void pf_rms_norm(const void *x, long rows, long D, const void *w, float eps, void *y, int bf16, int threads) {
#pragma omp parallel for num_threads(threads_for(rows * D, threads)) schedule(static)
    for (long r = 0; r < rows; r++) {
        const char *xr = (const char *)x + r * D * (bf16 ? 2 : 4);
        char *yr = (char *)y + r * D * (bf16 ? 2 : 4);
        __m512 ss = _mm512_setzero_ps();
        for (long d = 0; d < D; d += 16) {
            __m512 v = load_x(xr, d, tail_mask(D - d), bf16);
            ss = _mm512_add_ps(ss, _mm512_mul_ps(v, v));
        }
        __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)D + eps));
        for (long d = 0; d < D; d += 16) {
            __mmask16 k = tail_mask(D - d);
            __m512 h = _mm512_mul_ps(load_x(xr, d, k, bf16), inv);
            if (bf16) h = round_bf16(h);
            store_x(yr, d, k, _mm512_mul_ps(load_x(w, d, k, bf16), h), bf16);
        }
    }
}

/* cos and sin [rows][half] of positions[r] * inv_freq[i] (the angle in fp32, as
 * transformers computes it; cos/sin correctly rounded from double). */
void pf_rope_table(const long *positions, long rows, const float *inv_freq, long half, float *cos_out,
                   float *sin_out) {
    for (long r = 0; r < rows; r++)
        for (long i = 0; i < half; i++) {
            float angle = (float)positions[r] * inv_freq[i];
            cos_out[r * half + i] = (float)cos((double)angle);
            sin_out[r * half + i] = (float)sin((double)angle);
        }
}

/* Rotate `heads` heads of D at the start of each of `rows` rows (row_stride elements
 * apart) in place, with the row's cos/sin [half = D/2] from pf_rope_table: the two halves
 * of a head are the pairs (transformers' rotate_half), x1' = x1 c - x2 s, x2' = x2 c + x1 s.
 * D must be even. */
void pf_rope(void *x, long rows, long row_stride, long heads, long D, const float *cos_t, const float *sin_t, int bf16,
             int threads) {
    long half = D / 2, elem = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads_for(rows * heads * D, threads)) schedule(static)
    for (long r = 0; r < rows; r++) {
        char *row = (char *)x + r * row_stride * elem;
        for (long i = 0; i < half; i += 16) {
            __mmask16 k = tail_mask(half - i);
            __m512 c = _mm512_maskz_loadu_ps(k, cos_t + r * half + i), s = _mm512_maskz_loadu_ps(k, sin_t + r * half + i);
            if (bf16) {
                c = round_bf16(c);
                s = round_bf16(s);
            }
            for (long h = 0; h < heads; h++) {
                char *head = row + h * D * elem;
                __m512 x1 = load_x(head, i, k, bf16), x2 = load_x(head, half + i, k, bf16);
                __m512 a = _mm512_mul_ps(x1, c), b = _mm512_mul_ps(x2, s);
                __m512 e = _mm512_mul_ps(x2, c), f = _mm512_mul_ps(x1, s);
                if (bf16) {
                    a = round_bf16(a), b = round_bf16(b), e = round_bf16(e), f = round_bf16(f);
                }
                store_x(head, i, k, _mm512_sub_ps(a, b), bf16);
                store_x(head, half + i, k, _mm512_add_ps(e, f), bf16);
            }
        }
    }
}

/* out[r][j] = silu(gu[r][j]) * gu[r][I + j] for `rows` rows of gu [rows][2I] (gate, then
 * up, as one gate_up linear writes them) into out [rows][I]; silu(g) = g / (1 + exp(-g)). */
void pf_silu_gate(const void *gu, long rows, long I, void *out, int bf16, int threads) {
    long elem = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads_for(rows * I, threads)) schedule(static)
    for (long r = 0; r < rows; r++) {
        const char *g = (const char *)gu + r * 2 * I * elem, *u = g + I * elem;
        char *o = (char *)out + r * I * elem;
        for (long j = 0; j < I; j += 16) {
            __mmask16 k = tail_mask(I - j);
            __m512 gv = load_x(g, j, k, bf16);
            __m512 act = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
            /* exp512 clamps its argument: for g below -88 the quotient is g / (1 + e^88), torch's -0 x tiny */
            if (bf16) act = round_bf16(act);
            store_x(o, j, k, _mm512_mul_ps(act, load_x(u, j, k, bf16)), bf16);
        }
    }
}
