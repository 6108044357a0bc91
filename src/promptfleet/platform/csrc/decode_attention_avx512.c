/* Decode attention on AVX-512 (fp32, or a bf16 cache and bf16 q/out with fp32 arithmetic):
 * one query token per row against that row's cached keys.
 *
 * Why: at decode, attention is a pass over the batch's whole K/V cache (~200 MB a step for
 * GPT-2-small at batch 32 and ~84 positions), so it is bound by how fast that streams.
 * torch's CPU SDPA walks it per (row, head): 64-float pieces with a 3 KB stride in the
 * engine's [slot][position][head][dim] layout. Here each row's keys, then values, are read
 * front to back once, all heads together: scores for every head from one pass over K,
 * a vectorised softmax, then one pass over V.
 *
 * q: B rows of [H][D], k_new, v_new: B rows of [KVH][D], all `row_stride` elements apart
 * (they are usually views into one fused qkv projection, so no copy is made); out: [B][H][D];
 * K, V: [slots][positions][KVH][D] (slot stride `slot_stride` elements). Grouped-query
 * attention: query head h reads key/value head h / (H / KVH) (KVH = H: one each);
 * row b uses slot `slot0 + b` and attends to its first lens[b] (>= 1) positions. When
 * k_new/v_new are given, row b's are first written at position lens[b] - 1
 * (the decode step's own token), by the thread that then reads them.
 * D must be a multiple of 16. With `bf16`, every tensor holds bf16 (raw uint16 bits): K/V
 * are widened to fp32 as they stream in (half the bytes of an fp32 cache), q into a
 * scratch row, and the fp32 output is rounded to bf16 once at the end. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec_math_avx512.h"

/* 16 cached values at element i of p as fp32 (bf16 is a constant at each call site) */
static inline __m512 load16(const void *p, long i, int bf16) {
    return bf16 ? bf16x16_load_f32((const uint16_t *)p + i) : _mm512_loadu_ps((const float *)p + i);
}

static inline void one_row(const float *q, const void *K, const void *V, long len, long H, long KVH, long D,
                           float scale, float *s /* [H][lpad] */, long lpad, float *out, int bf16) {
    long hd = H * D, kvd = KVH * D, group = H / KVH, row_bytes = kvd * (bf16 ? 2 : 4);
    /* scores: one pass over K, every head per position */
    for (long t = 0; t < len; t++) {
        if (t + 4 < len) _mm_prefetch((const char *)K + (t + 4) * row_bytes, _MM_HINT_T0);
        for (long h = 0; h < H; h++) {
            __m512 acc = _mm512_setzero_ps();
            for (long d = 0; d < D; d += 16)
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * D + d), load16(K, t * kvd + h / group * D + d, bf16), acc);
            s[h * lpad + t] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
    /* softmax per head (unnormalised; divided at the end) */
    float inv[H];
    for (long h = 0; h < H; h++) {
        float *sh = s + h * lpad;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (long t = 0; t < len; t += 16)
            mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail_mask(len - t), sh + t));
        __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
        for (long t = 0; t < len; t += 16) {
            __mmask16 k = tail_mask(len - t);
            __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sh + t), m));
            e = _mm512_maskz_mov_ps(k, e);
            _mm512_mask_storeu_ps(sh + t, k, e);
            sum = _mm512_add_ps(sum, e);
        }
        inv[h] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    /* weighted values: one pass over V */
    for (long i = 0; i < hd; i += 16) _mm512_storeu_ps(out + i, _mm512_setzero_ps());
    for (long t = 0; t < len; t++) {
        if (t + 4 < len) _mm_prefetch((const char *)V + (t + 4) * row_bytes, _MM_HINT_T0);
        for (long h = 0; h < H; h++) {
            __m512 p = _mm512_set1_ps(s[h * lpad + t]);
            for (long d = 0; d < D; d += 16) {
                float *o = out + h * D + d;
                _mm512_storeu_ps(o, _mm512_fmadd_ps(p, load16(V, t * kvd + h / group * D + d, bf16), _mm512_loadu_ps(o)));
            }
        }
    }
    for (long h = 0; h < H; h++) {
        __m512 f = _mm512_set1_ps(inv[h]);
        for (long d = 0; d < D; d += 16) _mm512_storeu_ps(out + h * D + d, _mm512_mul_ps(f, _mm512_loadu_ps(out + h * D + d)));
    }
}

/* Returns 0, or -1 when a row's length is out of range or scratch memory is short. */
int pf_decode_attention(const void *q, void *K, void *V, long slot_stride, long slot0, const int *lens,
                        const void *k_new, const void *v_new, long row_stride, long B, long H, long KVH, long D,
                        long max_len, float scale, void *out, int bf16, int threads) {
    if (D % 16 || KVH < 1 || H % KVH) return -1;
    for (long b = 0; b < B; b++)
        if (lens[b] < 1 || lens[b] > max_len) return -1;
    long lpad = (max_len + 15) / 16 * 16, hd = H * D, kvd = KVH * D, elem = bf16 ? 2 : 4;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        /* scores [H][lpad], and for bf16 an fp32 q row and output row */
        float *s = aligned_alloc(64, (size_t)(H * lpad + 2 * hd) * sizeof(float));
        if (!s) failed = 1; /* every thread still takes its share of the loop below */
#pragma omp for schedule(static)
        for (long b = 0; b < B; b++) {
            char *Kb = (char *)K + (slot0 + b) * slot_stride * elem, *Vb = (char *)V + (slot0 + b) * slot_stride * elem;
            if (k_new && v_new) {
                memcpy(Kb + (lens[b] - 1) * kvd * elem, (const char *)k_new + b * row_stride * elem, (size_t)(kvd * elem));
                memcpy(Vb + (lens[b] - 1) * kvd * elem, (const char *)v_new + b * row_stride * elem, (size_t)(kvd * elem));
            }
            if (!s) continue;
            if (!bf16) {
                one_row((const float *)q + b * row_stride, Kb, Vb, lens[b], H, KVH, D, scale, s, lpad,
                        (float *)out + b * hd, 0);
                continue;
            }
            float *qf = s + H * lpad, *of = qf + hd;
            const uint16_t *qb = (const uint16_t *)q + b * row_stride;
            for (long i = 0; i < hd; i += 16) _mm512_storeu_ps(qf + i, bf16x16_load_f32(qb + i));
            one_row(qf, Kb, Vb, lens[b], H, KVH, D, scale, s, lpad, of, 1);
            uint16_t *ob = (uint16_t *)out + b * hd;
            for (long i = 0; i < hd; i += 16) _mm256_storeu_si256((__m256i *)(ob + i), f32x16_to_bf16(_mm512_loadu_ps(of + i)));
        }
        free(s);
    }
    return failed ? -1 : 0;
}
