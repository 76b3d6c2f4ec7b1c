/*
 * Fused CPU kernels for packed ternary and binary layers (tbquant.nn.native loads them).
 *
 * The codes are in the planar layout of tbquant/nn/kernels.py: with P = 8 / bits planes, byte
 * (r, j) of a [height, columns] uint8 matrix contains the unsigned codes u of rows r, r + height,
 * ..., r + (P - 1) * height in column j, plane i in bits bits * i to bits * i + bits - 1.
 * Ternary weights are w = u - 1 (2 bits), binary weights w = 2u - 1 (1 bit).
 *
 * Each call runs on the calling thread. It reads every byte of the codes once per token and
 * produces P output rows from it, so a layer costs one pass over its 2-bit (or 1-bit) codes
 * instead of unpacking them to a full matrix first. The formulas are those of tbquant/nn/kernels.py and tbquant/nn/linear.py,
 * in the same order of float operations, so the outputs equal the torch path's.
 *
 * Built by tbquant/nn/native.py with the system C compiler (-O3 -march=native). The inner
 * products use AVX-512 VNNI, AVX2 and F16C intrinsics where the compiler targets them, and plain
 * loops (vectorized by the compiler) elsewhere, so the same source builds on x86-64 and ARM.
 */

#include <math.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TBQ_ABI_VERSION 5

/* Activation quantization modes, matching tbquant.quantizers.activation.ActivationQuantizer. */
#define TBQ_DYNAMIC 0 /* per-token absmax: s = max(amax, 1e-8) / levels, c = clamp(round(x / s)) */
#define TBQ_LEARNED_ROUND 1 /* c = round(clamp(x / alpha, low, levels)) */
#define TBQ_LEARNED_SIGN 2  /* c = x / alpha >= 0 ? 1 : -1 */

#define TBQ_MIN_DYNAMIC_SCALE 1e-8f

int tbq_abi_version(void) { return TBQ_ABI_VERSION; }

/* One packed layer: everything a call needs besides its input (built once per layer). */
typedef struct {
    const uint8_t *planes;       /* [height, columns] planar codes */
    int64_t height;
    int64_t columns;             /* in_features padded to a multiple of 8 */
    int64_t in_features;
    int64_t out_features;
    const int32_t *weight_sums;  /* U[n] = sum_k u[n, k] */
    const float *row_scale;      /* a[n] */
    const float *row_offset;     /* mu[n], or NULL */
    const float *bias;           /* or NULL */
    int32_t bits;                /* 2 (ternary) or 1 (binary) */
    int32_t mode;                /* TBQ_DYNAMIC, TBQ_LEARNED_ROUND or TBQ_LEARNED_SIGN */
    int32_t levels;              /* Qp */
    int32_t is_signed;
    int32_t shift;               /* z, subtracted from the codes to fit int8 */
} tbq_layer;

/*
 * Largest value of x (of |x| when `absolute`), at least 0, in TBQ_MAX_LANES independent running
 * maxima that the compiler vectorizes. The maximum does not depend on the order of comparisons.
 */
#define TBQ_MAX_LANES 16

static inline float absolute_max(const float *x, int64_t length, int absolute) {
    float partial[TBQ_MAX_LANES] = {0};
    int64_t k = 0;
    for (; k + TBQ_MAX_LANES <= length; k += TBQ_MAX_LANES)
        for (int l = 0; l < TBQ_MAX_LANES; l++) {
            float v = absolute ? fabsf(x[k + l]) : x[k + l];
            partial[l] = v > partial[l] ? v : partial[l];
        }
    float amax = 0.0f;
    for (int l = 0; l < TBQ_MAX_LANES; l++)
        amax = partial[l] > amax ? partial[l] : amax;
    for (; k < length; k++) {
        float v = absolute ? fabsf(x[k]) : x[k];
        amax = v > amax ? v : amax;
    }
    return amax;
}

/* Scale of the dynamic per-token quantizer: s = max(amax, 1e-8) / levels. */
static inline float dynamic_scale(const float *x, int64_t length, int levels, int is_signed) {
    float amax = absolute_max(x, length, is_signed);
    return (amax > TBQ_MIN_DYNAMIC_SCALE ? amax : TBQ_MIN_DYNAMIC_SCALE) / (float)levels;
}

/* Code of one value: clamp(round(v / s), low, high), rounding half to even as torch.round does. */
static inline float dynamic_code(float v, float s, float low, float high) {
    float c = nearbyintf(v / s);
    return c < low ? low : (c > high ? high : c);
}

/*
 * Quantize one token's activations to int8 codes c' = c - shift and return the code sum
 * S = sum c (as float, exactly) and the scale s.
 */
static void quantize_token(const float *x, int64_t in_features, int64_t columns, int mode, int levels, int is_signed,
                           float alpha, int shift, int8_t *codes, float *code_sum, float *scale) {
    float low = is_signed ? (float)-levels : 0.0f;
    float high = (float)levels;
    int32_t sum = 0;

    if (mode == TBQ_DYNAMIC) {
        float s = dynamic_scale(x, in_features, levels, is_signed);
        for (int64_t k = 0; k < in_features; k++) {
            int32_t code = (int32_t)dynamic_code(x[k], s, low, high) - shift;
            codes[k] = (int8_t)code;
            sum += code;
        }
        *scale = s;
    } else {
        for (int64_t k = 0; k < in_features; k++) {
            float v = x[k] / alpha;
            float c;
            if (mode == TBQ_LEARNED_SIGN) {
                v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
                c = v >= 0.0f ? 1.0f : -1.0f;
            } else {
                v = v < low ? low : (v > high ? high : v);
                c = nearbyintf(v);
            }
            int32_t code = (int32_t)c - shift;
            codes[k] = (int8_t)code;
            sum += code;
        }
        *scale = alpha;
    }
    memset(codes + in_features, 0, (size_t)(columns - in_features));
    *code_sum = (float)sum + (float)shift * (float)in_features;
}

/*
 * Fake-quantize `rows` rows of `length` float32 values with the dynamic per-token quantizer:
 * out = clamp(round(x / s), low, levels) * s with s = max(amax, 1e-8) / levels, the same
 * float operations as ActivationQuantizer on torch, in two passes over each row instead of
 * torch's eight operations over the whole tensor.
 */
void tbq_fake_quantize(const float *x, int64_t rows, int64_t length, int levels, int is_signed, float *out) {
    float low = is_signed ? (float)-levels : 0.0f;
    float high = (float)levels;
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * length;
        float *target = out + r * length;
        float s = dynamic_scale(row, length, levels, is_signed);
        for (int64_t k = 0; k < length; k++)
            target[k] = dynamic_code(row[k], s, low, high) * s;
    }
}

/*
 * D[i] = sum_j c'[j] * u_i[j] for the P rows of one byte row: P = 4 (ternary, 2 bits) or 8
 * (binary, 1 bit). On x86-64 with AVX-512 VNNI or AVX2, each step multiplies 64 or 32 columns
 * of unsigned codes by signed activation codes and sums them into int32 lanes. The portable loop
 * handles other CPUs and the last columns.
 */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define TBQ_VECTOR 64
static inline int64_t dot_planes_vector(const int8_t *codes, const uint8_t *row, int64_t columns, int bits, int32_t *dots) {
    int planes = 8 / bits;
    __m512i mask = _mm512_set1_epi8((char)((1 << bits) - 1));
    __m512i sums[8];
    for (int i = 0; i < planes; i++)
        sums[i] = _mm512_setzero_si512();
    int64_t j = 0;
    for (; j + TBQ_VECTOR <= columns; j += TBQ_VECTOR) {
        __m512i packed = _mm512_loadu_si512((const void *)(row + j));
        __m512i activations = _mm512_loadu_si512((const void *)(codes + j));
        for (int i = 0; i < planes; i++) {
            __m512i weights = _mm512_and_si512(_mm512_srli_epi16(packed, bits * i), mask);
            sums[i] = _mm512_dpbusd_epi32(sums[i], weights, activations);
        }
    }
    for (int i = 0; i < planes; i++)
        dots[i] = _mm512_reduce_add_epi32(sums[i]);
    return j;
}
#elif defined(__AVX2__)
#include <immintrin.h>
#define TBQ_VECTOR 32
static inline int32_t reduce_add_256(__m256i v) {
    __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0x4e));
    sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0xb1));
    return _mm_cvtsi128_si32(sum);
}
static inline int64_t dot_planes_vector(const int8_t *codes, const uint8_t *row, int64_t columns, int bits, int32_t *dots) {
    int planes = 8 / bits;
    __m256i mask = _mm256_set1_epi8((char)((1 << bits) - 1));
    __m256i ones = _mm256_set1_epi16(1);
    __m256i sums[8];
    for (int i = 0; i < planes; i++)
        sums[i] = _mm256_setzero_si256();
    int64_t j = 0;
    for (; j + TBQ_VECTOR <= columns; j += TBQ_VECTOR) {
        __m256i packed = _mm256_loadu_si256((const __m256i *)(row + j));
        __m256i activations = _mm256_loadu_si256((const __m256i *)(codes + j));
        for (int i = 0; i < planes; i++) {
            __m256i weights = _mm256_and_si256(_mm256_srli_epi16(packed, bits * i), mask);
            /* Pairs of u * c' fit in int16 (|u| <= 3, |c'| <= 128), then pairs of pairs in int32. */
            __m256i pairs = _mm256_maddubs_epi16(weights, activations);
            sums[i] = _mm256_add_epi32(sums[i], _mm256_madd_epi16(pairs, ones));
        }
    }
    for (int i = 0; i < planes; i++)
        dots[i] = reduce_add_256(sums[i]);
    return j;
}
#else
static inline int64_t dot_planes_vector(const int8_t *codes, const uint8_t *row, int64_t columns, int bits, int32_t *dots) {
    (void)codes, (void)row, (void)columns;
    for (int i = 0; i < 8 / bits; i++)
        dots[i] = 0;
    return 0;
}
#endif

static inline void dot_planes(const int8_t *codes, const uint8_t *row, int64_t columns, int bits, int32_t *dots) {
    int planes = 8 / bits;
    uint32_t mask = (1u << bits) - 1u;
    for (int64_t j = dot_planes_vector(codes, row, columns, bits, dots); j < columns; j++) {
        int32_t c = codes[j];
        uint32_t b = row[j];
        for (int i = 0; i < planes; i++)
            dots[i] += c * (int32_t)((b >> (bits * i)) & mask);
    }
}

/*
 * y[m, n] = s[m] * a[n] * sum_k c[m, k] w[n, k] + s[m] * mu[n] * S[m] + bias[n], from
 * D'[m, n] = sum_k c'[m, k] u[n, k] (codes c' = c - z, unsigned weight codes u):
 *
 *     sum c w = D' + z U[n] - S          (ternary, w = u - 1)
 *     sum c w = 2 (D' + z U[n]) - S      (binary,  w = 2u - 1)
 *
 * exact in int32, then the float operations of PackedLinear's torch path, in the same order.
 */
static inline float rescale_output(const tbq_layer *layer, int32_t product, int64_t n, float s, float code_sum) {
    int32_t d = product + layer->shift * layer->weight_sums[n];
    int32_t dot = (layer->bits == 1 ? 2 * d : d) - (int32_t)code_sum;
    float y = (float)dot * s;
    y *= layer->row_scale[n];
    if (layer->row_offset)
        y += (s * code_sum) * layer->row_offset[n];
    if (layer->bias)
        y += layer->bias[n];
    return y;
}

/* Quantize `tokens` rows of x to codes c' ([tokens, columns]), code sums S and scales s. */
void tbq_quantize_rows(const tbq_layer *layer, const float *x, int64_t tokens, float alpha, int8_t *codes,
                       float *code_sums, float *scales) {
    for (int64_t m = 0; m < tokens; m++)
        quantize_token(x + m * layer->in_features, layer->in_features, layer->columns, layer->mode, layer->levels,
                       layer->is_signed, alpha, layer->shift, codes + m * layer->columns, code_sums + m, scales + m);
}

/*
 * Decoding: quantize x ([tokens, in_features] float32; alpha is the learned scale, ignored by
 * TBQ_DYNAMIC) and compute out ([tokens, out_features] float32) from the planar codes in one pass
 * over them per token. Returns 0, or -1 if the workspace cannot be allocated.
 */
int tbq_linear_int(const tbq_layer *layer, const float *x, int64_t tokens, float alpha, float *out) {
    int64_t height = layer->height, columns = layer->columns, out_features = layer->out_features;
    int planes_per_byte = 8 / layer->bits;
    int8_t *codes = malloc((size_t)(tokens * columns));
    float *code_sums = malloc((size_t)tokens * sizeof(float));
    float *scales = malloc((size_t)tokens * sizeof(float));
    if (!codes || !code_sums || !scales) {
        free(codes), free(code_sums), free(scales);
        return -1;
    }
    tbq_quantize_rows(layer, x, tokens, alpha, codes, code_sums, scales);

    for (int64_t r = 0; r < height; r++) {
        const uint8_t *row = layer->planes + r * columns;
        for (int64_t m = 0; m < tokens; m++) {
            int32_t dots[8];
            dot_planes(codes + m * columns, row, columns, layer->bits, dots);
            for (int i = 0; i < planes_per_byte; i++) {
                int64_t n = i * height + r;
                if (n >= out_features)
                    break;
                out[m * out_features + n] = rescale_output(layer, dots[i], n, scales[m], code_sums[m]);
            }
        }
    }
    free(codes), free(code_sums), free(scales);
    return 0;
}

/*
 * Prefill: after tbq_quantize_rows and torch._int_mm (which uses every core) computed the int32
 * products D' ([tokens, rows]), turn them into the layer's float32 output.
 */
void tbq_rescale(const tbq_layer *layer, const int32_t *products, int64_t tokens, int64_t rows, const float *code_sums,
                 const float *scales, float *out) {
    for (int64_t m = 0; m < tokens; m++)
        for (int64_t n = 0; n < layer->out_features; n++)
            out[m * layer->out_features + n] = rescale_output(layer, products[m * rows + n], n, scales[m], code_sums[m]);
}

/*
 * Float dot product in TBQ_LANES independent partial sums, which the compiler vectorizes
 * without reordering float additions (no -ffast-math needed).
 */
#define TBQ_LANES 16

static inline float dot_lanes(const float *a, const float *b, int64_t length) {
    float partial[TBQ_LANES] = {0};
    int64_t j = 0;
    for (; j + TBQ_LANES <= length; j += TBQ_LANES)
        for (int l = 0; l < TBQ_LANES; l++)
            partial[l] += a[j + l] * b[j + l];
    float total = 0.0f;
    for (int l = 0; l < TBQ_LANES; l++)
        total += partial[l];
    for (; j < length; j++)
        total += a[j] * b[j];
    return total;
}

/*
 * Full-precision inputs: y[m, n] = a[n] * sum_k x[m, k] w[n, k] + mu[n] * sum_k x[m, k] + bias[n],
 * summed in float32. x is [tokens, columns], zero beyond in_features (the caller pads it).
 */
int tbq_linear_float(const tbq_layer *layer, const float *x, int64_t tokens, float *out) {
    const uint8_t *planes = layer->planes;
    int64_t height = layer->height, columns = layer->columns, out_features = layer->out_features;
    const float *row_scale = layer->row_scale, *row_offset = layer->row_offset, *bias = layer->bias;
    int bits = layer->bits;
    float *weights = malloc((size_t)columns * sizeof(float));
    float *input_sums = malloc((size_t)tokens * sizeof(float));
    if (!weights || !input_sums) {
        free(weights), free(input_sums);
        return -1;
    }
    for (int64_t m = 0; m < tokens; m++) {
        float total = 0.0f;
        for (int64_t j = 0; j < columns; j++)
            total += x[m * columns + j];
        input_sums[m] = total;
    }

    int planes_per_byte = 8 / bits;
    uint32_t mask = (1u << bits) - 1u;
    float factor = bits == 1 ? 2.0f : 1.0f;
    for (int64_t r = 0; r < height; r++) {
        const uint8_t *row = planes + r * columns;
        for (int i = 0; i < planes_per_byte; i++) {
            int64_t n = i * height + r;
            if (n >= out_features)
                break;
            int shift = bits * i;
            for (int64_t j = 0; j < columns; j++)
                weights[j] = factor * (float)((row[j] >> shift) & mask) - 1.0f;
            for (int64_t m = 0; m < tokens; m++) {
                float y = dot_lanes(x + m * columns, weights, columns) * row_scale[n];
                if (row_offset)
                    y += input_sums[m] * row_offset[n];
                if (bias)
                    y += bias[n];
                out[m * out_features + n] = y;
            }
        }
    }
    free(weights), free(input_sums);
    return 0;
}

/*
 * y[m, n] = sum_k x[m, k] W[n, k] + bias[n] with a 16-bit weight (float16 or bfloat16) and
 * float32 inputs and outputs, for full-precision tensors kept in their stored 16-bit dtype (an
 * output head).
 */
static inline float half_to_float(uint16_t bits) {
    uint32_t sign = (uint32_t)(bits & 0x8000u) << 16;
    uint32_t exponent = (bits >> 10) & 0x1fu;
    uint32_t mantissa = bits & 0x3ffu;
    uint32_t word;
    if (exponent == 0x1fu) {
        word = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent == 0) {
        float value = ldexpf((float)mantissa, -24);
        memcpy(&word, &value, sizeof(word));
        word |= sign;
    } else {
        word = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    float result;
    memcpy(&result, &word, sizeof(result));
    return result;
}

static void half_row_to_float(const uint16_t *source, float *row, int64_t length) {
    int64_t k = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; k + 8 <= length; k += 8)
        _mm256_storeu_ps(row + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(source + k))));
#endif
    for (; k < length; k++)
        row[k] = half_to_float(source[k]);
}

static void bfloat_row_to_float(const uint16_t *source, float *row, int64_t length) {
    for (int64_t k = 0; k < length; k++) {
        uint32_t word = (uint32_t)source[k] << 16;
        memcpy(row + k, &word, sizeof(word)); /* not a uint32_t store, which would break strict aliasing */
    }
}

/* Dot product of float32 x with a float16 row, converting eight values at a time (F16C). */
#if defined(__F16C__) && defined(__FMA__) && defined(__AVX2__)
#define TBQ_HALF_VECTOR 1
static inline float dot_half(const float *x, const uint16_t *row, int64_t length) {
    __m256 sums[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t k = 0;
    for (; k + 32 <= length; k += 32)
        for (int part = 0; part < 4; part++) {
            __m256 weights = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + k + 8 * part)));
            sums[part] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8 * part), weights, sums[part]);
        }
    for (; k + 8 <= length; k += 8)
        sums[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + k))), sums[0]);
    __m256 total = _mm256_add_ps(_mm256_add_ps(sums[0], sums[1]), _mm256_add_ps(sums[2], sums[3]));
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_shuffle_ps(half, half, 0x55));
    float result = _mm_cvtss_f32(half);
    for (; k < length; k++)
        result += x[k] * half_to_float(row[k]);
    return result;
}
#endif

int tbq_half_linear(const float *x, int64_t tokens, int64_t in_features, const uint16_t *weight, int bfloat,
                    int64_t out_features, const float *bias, float *out) {
#ifdef TBQ_HALF_VECTOR
    if (!bfloat) {
        for (int64_t n = 0; n < out_features; n++)
            for (int64_t m = 0; m < tokens; m++) {
                float acc = dot_half(x + m * in_features, weight + n * in_features, in_features);
                out[m * out_features + n] = bias ? acc + bias[n] : acc;
            }
        return 0;
    }
#endif
    float *row = malloc((size_t)in_features * sizeof(float));
    if (!row)
        return -1;
    for (int64_t n = 0; n < out_features; n++) {
        const uint16_t *source = weight + n * in_features;
        if (bfloat)
            bfloat_row_to_float(source, row, in_features);
        else
            half_row_to_float(source, row, in_features);
        for (int64_t m = 0; m < tokens; m++) {
            float acc = dot_lanes(x + m * in_features, row, in_features);
            out[m * out_features + n] = bias ? acc + bias[n] : acc;
        }
    }
    free(row);
    return 0;
}
