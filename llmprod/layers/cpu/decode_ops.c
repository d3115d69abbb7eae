/* Fused CPU operations for the decode step: the small operations between the
 * matrix products, one call each instead of several torch operations.
 *
 * Built at first use with the system C compiler (llmprod/layers/cpu/__init__.py)
 * and called through ctypes with raw pointers. Every function computes each row
 * on its own, in the same order whatever the batch, so a row's result never
 * depends on the other rows; large batches split their rows over `threads`
 * OpenMP threads (torch's own runtime where it is libgomp, which this library
 * then shares). Compiled with -ffp-contract=off: a product and a sum are
 * rounded separately, as torch's element-wise operations round them.
 *
 * Activation buffers are float32 (dtype 0) or bfloat16 (dtype 1).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Rows of `width` values worth a parallel region: below this much work one
 * thread finishes before a team would start. */
#define PARALLEL_WORK 32768

static inline float bf16_load(const uint16_t *p) {
    uint32_t u = (uint32_t)(*p) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch converts float32 to bfloat16. */
static inline uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float load(const void *base, int dtype, int64_t i) {
    return dtype ? bf16_load((const uint16_t *)base + i) : ((const float *)base)[i];
}

static inline void store(void *base, int dtype, int64_t i, float v) {
    if (dtype)
        ((uint16_t *)base)[i] = bf16_round(v);
    else
        ((float *)base)[i] = v;
}

/* hidden += delta (when delta is given), then out = rms_norm(hidden) * weight.
 * hidden: float32 [rows, dim] (the residual stream, updated in place);
 * delta: [rows, dim] of delta_dtype, row stride delta_stride, or NULL;
 * out: [rows, dim] of out_dtype. */
void llmprod_add_rms_norm(float *hidden, const void *delta, int delta_dtype,
                          int64_t delta_stride, const float *weight, void *out,
                          int out_dtype, int64_t rows, int64_t dim, float eps,
                          int threads) {
#pragma omp parallel for num_threads(threads) if (rows * dim >= PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        float scratch[16];
        float *h = hidden + r * dim;
        if (delta) {
            if (delta_dtype) {
                const uint16_t *d = (const uint16_t *)delta + r * delta_stride;
                for (int64_t i = 0; i < dim; i++) h[i] += bf16_load(d + i);
            } else {
                const float *d = (const float *)delta + r * delta_stride;
                for (int64_t i = 0; i < dim; i++) h[i] += d[i];
            }
        }
        for (int j = 0; j < 16; j++) scratch[j] = 0.0f;
        int64_t i = 0;
        for (; i + 16 <= dim; i += 16)
            for (int j = 0; j < 16; j++) scratch[j] += h[i + j] * h[i + j];
        float ss = 0.0f;
        for (int j = 0; j < 16; j++) ss += scratch[j];
        for (; i < dim; i++) ss += h[i] * h[i];
        float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        if (out_dtype) {
            uint16_t *o = (uint16_t *)out + r * dim;
            for (int64_t k = 0; k < dim; k++) o[k] = bf16_round(h[k] * inv * weight[k]);
        } else {
            float *o = (float *)out + r * dim;
            for (int64_t k = 0; k < dim; k++) o[k] = h[k] * inv * weight[k];
        }
    }
}

/* out = silu(gate) * up, gate and up the two halves of each row of gate_up
 * ([rows, 2 * inter] of in_dtype); out: [rows, inter] of out_dtype. */
void llmprod_silu_mul(const void *gate_up, int in_dtype, void *out, int out_dtype,
                      int64_t rows, int64_t inter, int threads) {
#pragma omp parallel for num_threads(threads) if (rows * inter >= PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        int64_t g0 = r * 2 * inter, o0 = r * inter;
        for (int64_t i = 0; i < inter; i++) {
            float g = load(gate_up, in_dtype, g0 + i);
            float u = load(gate_up, in_dtype, g0 + inter + i);
            float s = g / (1.0f + expf(-g));
            store(out, out_dtype, o0 + i, s * u);
        }
    }
}

/* Rotary embedding in place (the rotate-half form), on the first `heads` heads
 * of each row of x (float32, row stride x_stride, head_dim contiguous values
 * per head); cos and sin: float32 [rows, head_dim]. */
void llmprod_rope(float *x, int64_t x_stride, const float *cos_, const float *sin_,
                  int64_t rows, int64_t heads, int64_t head_dim, int threads) {
    int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(threads) if (rows * heads * head_dim >= PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos_ + r * head_dim, *s = sin_ + r * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + r * x_stride + h * head_dim;
            for (int64_t i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

/* Decode attention over the paged cache, one query token per sequence, with
 * the sequence's new key and value written to its slot first.
 *
 * q: float32, row r's heads at q + r * q_stride ([heads, head_dim]);
 * k_new, v_new: float32, row r at + r * k_stride, + r * v_stride
 *     ([kv_heads, head_dim]);
 * k_cache, v_cache: float32 [num_blocks, block_size, kv_heads, head_dim];
 * slots: int64 [rows]; block_tables: int32, row r at + r * table_stride;
 * seq_lens: int32 [rows] (the new token included); window: attend to the last
 * `window` positions only (0 = all); out: float32 [rows, heads, head_dim]. */
void llmprod_paged_decode(const float *q, int64_t q_stride, const float *k_new,
                          const float *v_new, int64_t k_stride, int64_t v_stride,
                          float *k_cache,
                          float *v_cache, const int64_t *slots,
                          const int32_t *block_tables, int64_t table_stride,
                          const int32_t *seq_lens, int64_t rows, int64_t heads,
                          int64_t kv_heads, int64_t head_dim, int64_t block_size,
                          float scale, int64_t window, float *out, int threads) {
    int64_t token = kv_heads * head_dim, group = heads / kv_heads;
    for (int64_t r = 0; r < rows; r++) {
        memcpy(k_cache + slots[r] * token, k_new + r * k_stride, token * sizeof(float));
        memcpy(v_cache + slots[r] * token, v_new + r * v_stride, token * sizeof(float));
    }
#pragma omp parallel for num_threads(threads) schedule(dynamic) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        static __thread float *scores = NULL;
        static __thread int64_t capacity = 0;
        int64_t len = seq_lens[r];
        int64_t start = (window > 0 && len > window) ? len - window : 0;
        int64_t n = len - start;
        if (capacity < n * group) {
            free(scores);
            capacity = n * group * 2;
            scores = (float *)malloc(capacity * sizeof(float));
        }
        const int32_t *table = block_tables + r * table_stride;
        for (int64_t g = 0; g < kv_heads; g++) {
            const float *qg = q + r * q_stride + g * group * head_dim;
            float *og = out + (r * heads + g * group) * head_dim;
            float best[group > 0 ? group : 1];
            for (int64_t j = 0; j < group; j++) best[j] = -INFINITY;
            for (int64_t t = 0; t < n; t++) {
                int64_t pos = start + t;
                const float *kt = k_cache +
                                  ((int64_t)table[pos / block_size] * block_size +
                                   pos % block_size) * token + g * head_dim;
                for (int64_t j = 0; j < group; j++) {
                    const float *qh = qg + j * head_dim;
                    float acc[8] = {0};
                    int64_t i = 0;
                    for (; i + 8 <= head_dim; i += 8)
                        for (int l = 0; l < 8; l++) acc[l] += qh[i + l] * kt[i + l];
                    float dot = 0.0f;
                    for (int l = 0; l < 8; l++) dot += acc[l];
                    for (; i < head_dim; i++) dot += qh[i] * kt[i];
                    dot *= scale;
                    scores[j * n + t] = dot;
                    if (dot > best[j]) best[j] = dot;
                }
            }
            for (int64_t j = 0; j < group; j++) {
                float *sj = scores + j * n, total = 0.0f;
                for (int64_t t = 0; t < n; t++) {
                    sj[t] = expf(sj[t] - best[j]);
                    total += sj[t];
                }
                float inv = 1.0f / total;
                for (int64_t t = 0; t < n; t++) sj[t] *= inv;
                memset(og + j * head_dim, 0, head_dim * sizeof(float));
            }
            for (int64_t t = 0; t < n; t++) {
                int64_t pos = start + t;
                const float *vt = v_cache +
                                  ((int64_t)table[pos / block_size] * block_size +
                                   pos % block_size) * token + g * head_dim;
                for (int64_t j = 0; j < group; j++) {
                    float p = scores[j * n + t], *o = og + j * head_dim;
                    for (int64_t i = 0; i < head_dim; i++) o[i] += p * vt[i];
                }
            }
        }
    }
}

#ifdef __AVX512F__
#include <immintrin.h>

/* sum_k x[k] * w[k] over K values, float32 accumulation in 32 lanes. */
static inline float dot_i8(const float *x, const int8_t *w, int64_t K) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512 w0 = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k))));
        __m512 w1 = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k + 16))));
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), w0, acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), w1, acc1);
    }
    for (; k + 16 <= K; k += 16) {
        __m512 w0 = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k))));
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), w0, acc0);
    }
    float total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    for (; k < K; k++) total += x[k] * (float)w[k];
    return total;
}
#else
static inline float dot_i8(const float *x, const int8_t *w, int64_t K) {
    float acc[16] = {0};
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
        for (int j = 0; j < 16; j++) acc[j] += x[k + j] * (float)w[k + j];
    float total = 0.0f;
    for (int j = 0; j < 16; j++) total += acc[j];
    for (; k < K; k++) total += x[k] * (float)w[k];
    return total;
}
#endif

/* out[m, n] = scales[n] * sum_k x[m, k] * w[n, k]: a weight-only int8 product
 * for a few rows, reading each weight row once for all of them.
 * x: float32 [rows, K] (contiguous); w: int8 [N, K]; scales: float32 [N];
 * out: [rows, N] of out_dtype. Output columns are split over the threads; each
 * value is summed in the same order whatever the split. */
void llmprod_int8_linear(const float *x, int64_t rows, int64_t K, const int8_t *w,
                         const float *scales, int64_t N, void *out, int out_dtype,
                         int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (N * K >= PARALLEL_WORK)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wn = w + n * K;
        for (int64_t m = 0; m < rows; m++)
            store(out, out_dtype, m * N + n, dot_i8(x + m * K, wn, K) * scales[n]);
    }
}
