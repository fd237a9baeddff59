/* NVFP4 quantization and amax of one weight on the CPU: one fused pass instead of ~25 torch passes.
 *
 * The same numerics as nvfp4.py's reference (float32 arithmetic, IEEE division, round half to even);
 * built without -ffast-math and with -ffp-contract=off so that no operation is fused or reordered.
 * dtype: 0 float32, 1 bfloat16, 2 float16.  Rows are `stride` elements apart; K is a multiple of the block.
 * The format constants come from formats.py as -D flags (native.py), so they live in one place.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const float E2M1_BOUNDS[7] = E2M1_BOUNDS_INIT;
#define E4M3_MIN_NORMAL (8.0f * E4M3_MIN_SUBNORMAL) /* 3 mantissa bits: 2^3 subnormal steps below it */

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp == 0) {
        float v = (float)man * (1.0f / 16777216.0f); /* exact: man * 2^-24 */
        memcpy(&bits, &v, 4);
        bits |= sign;
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Nearest float8_e4m3fn of v in [E4M3_MIN_SUBNORMAL, E4M3_MAX] or NaN: its byte, and its value in *value. */
static uint8_t e4m3(float v, float *value) {
    if (v != v) { /* keeps the NaN's sign, as torch's cast does (x86's 0/0 is a negative NaN) */
        uint32_t nan_bits;
        memcpy(&nan_bits, &v, 4);
        *value = v;
        return (uint8_t)(0x7F | ((nan_bits >> 24) & 0x80));
    }
    if (v < E4M3_MIN_NORMAL) { /* subnormal: k * E4M3_MIN_SUBNORMAL, k rounded half to even */
        float t = v / E4M3_MIN_SUBNORMAL;  /* exact: a power of two */
        float k = floorf(t), frac = t - k;
        if (frac > 0.5f || (frac == 0.5f && fmodf(k, 2.0f) == 1.0f)) k += 1.0f;
        *value = k * E4M3_MIN_SUBNORMAL;
        return (uint8_t)k;
    }
    uint32_t bits;
    memcpy(&bits, &v, 4);
    bits = (bits + 0x7FFFFu + ((bits >> 20) & 1u)) & ~0xFFFFFu;
    memcpy(value, &bits, 4);
    return (uint8_t)(((((bits >> 23) & 0xFF) - 120) << 3) | ((bits >> 20) & 7u));
}

static inline uint8_t e2m1(float x) {
    float m = fabsf(x);
    uint8_t code = (m > E2M1_BOUNDS[0]) + (m >= E2M1_BOUNDS[1]) + (m > E2M1_BOUNDS[2]) + (m >= E2M1_BOUNDS[3]) +
                   (m > E2M1_BOUNDS[4]) + (m >= E2M1_BOUNDS[5]) + (m > E2M1_BOUNDS[6]);
    code |= (uint8_t)(7 & -(m != m)); /* NaN: every comparison is false, code 7 (as searchsorted gives) */
    return (uint8_t)(code | ((x < 0.0f) << 3));
}

/* max |w| on the raw bits: with the sign cleared, float order is integer order (and NaN's bits lie above
 * inf's), so an integer max, which vectorizes, gives exactly max |w| and reveals any NaN. */
#define DEFINE_AMAX(NAME, BITS, MAGNITUDE, TO_FLOAT)                                                         \
    static float amax_##NAME(const BITS *w, int64_t rows, int64_t k, int64_t stride) {                       \
        BITS best = 0;                                                                                        \
        for (int64_t r = 0; r < rows; r++) {                                                                  \
            const BITS *p = w + r * stride;                                                                   \
            for (int64_t c = 0; c < k; c++) {                                                                 \
                BITS a = p[c] & MAGNITUDE;                                                                    \
                best = a > best ? a : best;                                                                   \
            }                                                                                                 \
        }                                                                                                     \
        float result = TO_FLOAT(best);                                                                        \
        return result != result ? NAN : result;                                                               \
    }

static inline float bits_to_float(uint32_t bits) {
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

DEFINE_AMAX(f32, uint32_t, 0x7FFFFFFFu, bits_to_float)
DEFINE_AMAX(bf16, uint16_t, 0x7FFF, bf16_to_float)
DEFINE_AMAX(f16, uint16_t, 0x7FFF, half_to_float)

/* One NVFP4 function per input dtype (LOAD turns element i of row p into float32). */
#define DEFINE_KERNELS(NAME, TYPE, LOAD)                                                                      \
    static int nvfp4_##NAME(const TYPE *w, int64_t rows, int64_t k, int64_t stride, float scale_2,          \
                            uint8_t *packed, uint8_t *scales, float *x, float *denom, uint8_t *code) {        \
        const float unit = E2M1_MAX * scale_2;                                                                    \
        int nonfinite = 0;                                                                                    \
        for (int64_t r = 0; r < rows; r++) {                                                                  \
            const TYPE *p = w + r * stride;                                                                   \
            for (int64_t c = 0; c < k; c++) x[c] = LOAD(p, c);                                                \
            for (int64_t b = 0; b < k / BLOCK; b++) {                                                            \
                float bmax = 0.0f;                                                                            \
                int nan = 0;                                                                                  \
                for (int j = 0; j < BLOCK; j++) {                                                             \
                    float a = fabsf(x[b * BLOCK + j]);                                                           \
                    nan |= a != a;                                                                            \
                    bmax = a > bmax ? a : bmax;                                                               \
                }                                                                                             \
                if (nan) bmax = NAN;                                                                          \
                nonfinite |= !isfinite(bmax);                                                                 \
                float s = bmax / unit;                                                                        \
                if (s == 0.0f) s = 1.0f;                                                                      \
                if (s == s) s = s < E4M3_MIN_SUBNORMAL ? E4M3_MIN_SUBNORMAL : (s > E4M3_MAX ? E4M3_MAX : s);  \
                float rounded;                                                                                \
                scales[r * (k / BLOCK) + b] = e4m3(s, &rounded);                                                 \
                denom[b] = rounded * scale_2;                                                                 \
            }                                                                                                 \
            for (int64_t c = 0; c < k; c++) code[c] = e2m1(x[c] / denom[c / BLOCK]);                          \
            uint8_t *out = packed + r * (k / 2);                                                              \
            for (int64_t j = 0; j < k / 2; j++) out[j] = (uint8_t)(code[2 * j] | (code[2 * j + 1] << 4));     \
        }                                                                                                     \
        return nonfinite;                                                                                     \
    }

#define LOAD_F32(p, i) ((p)[i])
#define LOAD_BF16(p, i) bf16_to_float((p)[i])
#define LOAD_F16(p, i) half_to_float((p)[i])
DEFINE_KERNELS(f32, float, LOAD_F32)
DEFINE_KERNELS(bf16, uint16_t, LOAD_BF16)
DEFINE_KERNELS(f16, uint16_t, LOAD_F16)

/* max |w| as float32; NaN if any element is NaN (as torch's amax propagates it).
 * dtype: 0 float32, 1 bfloat16, 2 float16; rows are `stride` elements apart. */
float moeq_amax(const void *w, int dtype, int64_t rows, int64_t k, int64_t stride) {
    if (dtype == 0) return amax_f32(w, rows, k, stride);
    return dtype == 1 ? amax_bf16(w, rows, k, stride) : amax_f16(w, rows, k, stride);
}

/* NVFP4 of one weight with the given tensor amax: packed codes, E4M3 block scales, weight_scale_2.
 * Returns 1 when the weight holds NaN or Inf (the caller names it), -1 when out of memory, else 0. */
int moeq_nvfp4(const void *w, int dtype, int64_t rows, int64_t k, int64_t stride, float amax, uint8_t *packed,
               uint8_t *scales, float *scale_2_out) {
    const float scale_2 = amax / NVFP4_SCALE_2_DIVISOR;
    *scale_2_out = scale_2;
    float *x = malloc(sizeof(float) * (size_t)(k + k / BLOCK));
    uint8_t *code = malloc((size_t)k);
    if (x == NULL || code == NULL) {
        free(x);
        free(code);
        return -1;
    }
    int result;
    if (dtype == 0) {
        result = nvfp4_f32(w, rows, k, stride, scale_2, packed, scales, x, x + k, code);
    } else if (dtype == 1) {
        result = nvfp4_bf16(w, rows, k, stride, scale_2, packed, scales, x, x + k, code);
    } else {
        result = nvfp4_f16(w, rows, k, stride, scale_2, packed, scales, x, x + k, code);
    }
    free(x);
    free(code);
    return result;
}
