/* Vector math shared by the AVX-512 kernels (header-only; each .c includes it). */
#ifndef PROMPTFLEET_VEC_MATH_AVX512_H
#define PROMPTFLEET_VEC_MATH_AVX512_H
#include <immintrin.h>
#include <stdint.h>

/* exp(x): Cephes expf's range reduction and polynomial (relative error ~2e-7), 2^n applied
 * with scalef; x is clamped to +-88.38, so exp never overflows to inf (NaN comes out as a
 * finite value: callers that must keep NaN carry it through another operand). */
static inline __m512 exp512(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* GPT-2's tanh GELU, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), written as
 * the identical x / (1 + exp(-2u)): one exp. Where exp(-2u) would overflow (x below about
 * -10) the answer is x * 0, torch's -0 (NaN for -inf); NaN in x stays NaN. */
static inline __m512 gelu_tanh512(__m512 x) {
    const __m512 c = _mm512_set1_ps(-2.0f * 0.7978845608028654f), a = _mm512_set1_ps(0.044715f);
    __m512 inner = _mm512_fmadd_ps(_mm512_mul_ps(a, x), _mm512_mul_ps(x, x), x); /* x + a x^3 */
    __m512 arg = _mm512_mul_ps(c, inner);
    __m512 y = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(arg)));
    __mmask16 huge = _mm512_cmp_ps_mask(arg, _mm512_set1_ps(88.0f), _CMP_GT_OQ);
    return _mm512_mask_mul_ps(y, huge, x, _mm512_setzero_ps());
}

/* 16 bf16 values (raw uint16 bits) at p as fp32: a bf16 is the top half of an fp32. */
static inline __m512 bf16x16_load_f32(const void *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* 16 fp32 -> bf16 bits, rounded to nearest even like torch's .to(torch.bfloat16); NaN
 * stays (a quiet) NaN. */
static inline __m256i f32x16_to_bf16(__m512 x) {
    __m512i bits = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

/* Scalar bf16 <-> fp32 (raw uint16 bits), same rounding as the vector versions. */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline __mmask16 tail_mask(long left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u); }

#endif
