/* amax, NVFP4, FP8 (per tensor, per channel) and FP8-block quantization of one weight on the CPU: one fused
 * pass each instead of many torch passes over float32 temporaries.
 *
 * The same numerics as the torch references (float32 arithmetic, IEEE division, round half to even);
 * built without -ffast-math and with -ffp-contract=off so that no operation is fused or reordered.
 * Sources (dtype): 0 float32, 1 bfloat16, 2 float16, 3 an FP8-block source: e4m3 codes with one float32
 * multiplier per FP8_BLOCK x FP8_BLOCK block, whose values are bf16(float32(code) * scale) (DeepSeek's
 * weight_dequant), read through a per-strip table of those 256 values per block column (no bf16 copy).
 * Rows are `stride` elements apart.  Every kernel turns a row into float32 x[] (load_row), then works on x.
 * The format constants come from formats.py as -D flags (native.py), so they live in one place.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const float E2M1_BOUNDS[7] = E2M1_BOUNDS_INIT;
#define E4M3_MIN_NORMAL (8.0f * E4M3_MIN_SUBNORMAL) /* 3 mantissa bits: 2^3 subnormal steps below it */
#define F16_MIN_NORMAL 0x1p-14f
#define SOURCE_FP8_BLOCK 3

static inline uint32_t float_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return bits;
}

static inline float bits_to_float(uint32_t bits) {
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp == 0) {
        float v = (float)man * (1.0f / 16777216.0f); /* exact: man * 2^-24 */
        bits = float_bits(v) | sign;
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    return bits_to_float(bits);
}

static inline float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

/* The per-element helpers below are integer selects (min / compare on the bits), not branches, so that
 * gcc vectorizes the loops that call them (a NaN magnitude's bits lie above inf's 0x7F800000). */
#define INF_BITS 0x7F800000u

/* a where cond, else b: a mask select (gcc gives up on loops with several chained ?: of this kind). */
static inline uint32_t pick(int cond, uint32_t a, uint32_t b) {
    uint32_t mask = -(uint32_t)cond;
    return (a & mask) | (b & ~mask);
}

/* float32 -> the nearest bfloat16 (half to even) as float32; NaN stays NaN, overflow becomes inf. */
static inline float round_bf16(float v) {
    uint32_t b = float_bits(v);
    uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
    return bits_to_float(pick((b & 0x7FFFFFFFu) > INF_BITS, b, r));
}

/* float32 -> the nearest float16 value (half to even, subnormals included) as float32.  Above float16's
 * range the result is 65536 instead of inf: only used before an E4M3 cast, which saturates both to 448. */
static inline float round_f16(float v) {
    const uint32_t min_normal = 0x38800000u; /* 2^-14 */
    uint32_t b = float_bits(v), sign = b & 0x80000000u, mag = b & 0x7FFFFFFFu;
    uint32_t normal = (mag + 0xFFFu + ((mag >> 13) & 1u)) & ~0x1FFFu;
    uint32_t small = mag < min_normal ? mag : min_normal;
    float sub = (bits_to_float(small) + 0.5f) - 0.5f; /* exact: the sum's ulp is 2^-24, float16's subnormal step */
    uint32_t r = pick(mag < min_normal, float_bits(sub), normal);
    r = pick(mag > INF_BITS, mag, r);
    return bits_to_float(r | sign);
}

/* Nearest float8_e4m3fn of v in [E4M3_MIN_SUBNORMAL, E4M3_MAX] or NaN: its byte, and its value in *value. */
static uint8_t e4m3(float v, float *value) {
    if (v != v) { /* keeps the NaN's sign, as torch's cast does (x86's 0/0 is a negative NaN) */
        *value = v;
        return (uint8_t)(0x7F | ((float_bits(v) >> 24) & 0x80));
    }
    if (v < E4M3_MIN_NORMAL) { /* subnormal: k * E4M3_MIN_SUBNORMAL, k rounded half to even */
        float t = v / E4M3_MIN_SUBNORMAL;  /* exact: a power of two */
        float k = floorf(t), frac = t - k;
        if (frac > 0.5f || (frac == 0.5f && fmodf(k, 2.0f) == 1.0f)) k += 1.0f;
        *value = k * E4M3_MIN_SUBNORMAL;
        return (uint8_t)k;
    }
    uint32_t bits = float_bits(v);
    bits = (bits + 0x7FFFFu + ((bits >> 20) & 1u)) & ~0xFFFFFu;
    *value = bits_to_float(bits);
    return (uint8_t)(((((bits >> 23) & 0xFF) - 120) << 3) | ((bits >> 20) & 7u));
}

/* float8_e4m3fn byte of any float32 q, as torch's CPU cast: half to even, saturating at E4M3_MAX (inf
 * included), sign kept (-0.0 -> 0x80), NaN -> 0x7F | sign. */
static inline uint8_t e4m3_code(float q) {
    const uint32_t min_normal = float_bits(E4M3_MIN_NORMAL), top = float_bits(E4M3_MAX), magic = 0x46800000u;
    uint32_t b = float_bits(q), sign = (b >> 24) & 0x80u, mag = b & 0x7FFFFFFFu;
    uint32_t r = (mag + 0x7FFFFu + ((mag >> 20) & 1u)) & ~0xFFFFFu;
    r = r < top ? r : top;
    uint32_t normal = (r >> 20) - (120u << 3); /* exponent rebiased 127 -> 7, 3 mantissa bits */
    uint32_t small = mag < min_normal ? mag : min_normal;
    /* exact: at 2^14 (magic's value) the float32 ulp is 2^-9, E4M3's subnormal step, so the add rounds
     * k = |q| / 2^-9 half to even into the sum's low mantissa bits */
    uint32_t sub = float_bits(bits_to_float(small) + bits_to_float(magic)) - magic;
    uint32_t m = pick(mag < min_normal, sub, normal);
    m = pick(mag > INF_BITS, 0x7Fu, m);
    return (uint8_t)(m | sign);
}

static inline uint8_t e2m1(float x) {
    float m = fabsf(x);
    uint8_t code = (m > E2M1_BOUNDS[0]) + (m >= E2M1_BOUNDS[1]) + (m > E2M1_BOUNDS[2]) + (m >= E2M1_BOUNDS[3]) +
                   (m > E2M1_BOUNDS[4]) + (m >= E2M1_BOUNDS[5]) + (m > E2M1_BOUNDS[6]);
    code |= (uint8_t)(7 & -(m != m)); /* NaN: every comparison is false, code 7 (as searchsorted gives) */
    return (uint8_t)(code | ((x < 0.0f) << 3));
}

/* e2m1() in a 32-bit lane (the same code). */
static inline uint32_t e2m1_lane(float x) {
    float m = fabsf(x);
    uint32_t code = (uint32_t)(m > E2M1_BOUNDS[0]) + (m >= E2M1_BOUNDS[1]) + (m > E2M1_BOUNDS[2]) +
                    (m >= E2M1_BOUNDS[3]) + (m > E2M1_BOUNDS[4]) + (m >= E2M1_BOUNDS[5]) + (m > E2M1_BOUNDS[6]);
    code |= 7u & -(uint32_t)(m != m);
    return code | ((uint32_t)(x < 0.0f) << 3);
}

/* ------------------------------------------------------------------------------------------- sources */

static float E4M3_VALUES[256]; /* float32 value of each float8_e4m3fn byte */

__attribute__((constructor)) static void init_e4m3_values(void) { /* at load, before any call */
    for (int c = 0; c < 256; c++) {
        uint32_t sign = (uint32_t)(c & 0x80) << 24, e = (c >> 3) & 15, m = c & 7;
        float v;
        if ((c & 0x7F) == 0x7F) {
            v = NAN;
        } else if (e == 0) {
            v = (float)m * E4M3_MIN_SUBNORMAL;
        } else {
            v = bits_to_float(((e + 120) << 23) | (m << 20));
        }
        E4M3_VALUES[c] = bits_to_float(float_bits(v) | sign);
    }
}

typedef struct {
    const void *w;
    int dtype;
    int64_t rows, k, stride;
    const float *scale_inv; /* dtype 3: [ceil(rows / FP8_BLOCK), blocks_k] */
    int64_t blocks_k;
    float *table;  /* dtype 3: for each block column of the current strip, the value of each of 256 codes */
    int64_t strip; /* strip the table holds; -1: none yet */
} source;

static int open_source(source *s, const void *w, int dtype, int64_t rows, int64_t k, int64_t stride,
                       const float *scale_inv) {
    s->w = w;
    s->dtype = dtype;
    s->rows = rows;
    s->k = k;
    s->stride = stride;
    s->scale_inv = scale_inv;
    s->blocks_k = (k + FP8_BLOCK - 1) / FP8_BLOCK;
    s->strip = -1;
    s->table = NULL;
    if (dtype == SOURCE_FP8_BLOCK) {
        s->table = malloc(sizeof(float) * 256 * (size_t)(s->blocks_k ? s->blocks_k : 1));
        if (s->table == NULL) return -1;
    }
    return 0;
}

static void close_source(source *s) { free(s->table); }

/* The table of the strip holding row r: bf16(float32(code) * scale) for every code of every block column. */
static const float *strip_table(source *s, int64_t r) {
    int64_t strip = r / FP8_BLOCK;
    if (strip != s->strip) {
        const float *scale = s->scale_inv + strip * s->blocks_k;
        for (int64_t b = 0; b < s->blocks_k; b++) {
            for (int c = 0; c < 256; c++) s->table[b * 256 + c] = round_bf16(E4M3_VALUES[c] * scale[b]);
        }
        s->strip = strip;
    }
    return s->table;
}

/* Row r of the source as float32 values, exactly (an FP8-block source: a lookup in its strip's table, scalar
 * loads that beat the vectorized decode-multiply-round per element by 20% on AVX-512). */
static void load_row(source *s, int64_t r, float *x) {
    const int64_t k = s->k;
    if (s->dtype == 0) {
        memcpy(x, (const float *)s->w + r * s->stride, sizeof(float) * (size_t)k);
    } else if (s->dtype == 1) {
        const uint16_t *p = (const uint16_t *)s->w + r * s->stride;
        for (int64_t c = 0; c < k; c++) x[c] = bf16_to_float(p[c]);
    } else if (s->dtype == 2) {
        const uint16_t *p = (const uint16_t *)s->w + r * s->stride;
        for (int64_t c = 0; c < k; c++) x[c] = half_to_float(p[c]);
    } else {
        const uint8_t *p = (const uint8_t *)s->w + r * s->stride;
        const float *table = strip_table(s, r);
        for (int64_t b = 0; b < s->blocks_k; b++) {
            const float *t = table + b * 256;
            int64_t end = (b + 1) * FP8_BLOCK < k ? (b + 1) * FP8_BLOCK : k;
            for (int64_t c = b * FP8_BLOCK; c < end; c++) x[c] = t[p[c]];
        }
    }
}

/* ------------------------------------------------------------------------------------------------ amax */

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

DEFINE_AMAX(f32, uint32_t, 0x7FFFFFFFu, bits_to_float)
DEFINE_AMAX(bf16, uint16_t, 0x7FFF, bf16_to_float)
DEFINE_AMAX(f16, uint16_t, 0x7FFF, half_to_float)

/* Largest code magnitude (byte & 0x7F: E4M3 order is integer order, NaN's 0x7F on top) of each block column
 * over the strip's rows; the block's max |value| is then |bf16(value of that code * scale)|, since the
 * product and the rounding are monotonic in |code| (an exact shortcut: one byte max per element). */
static void strip_code_max(const source *s, int64_t strip, uint8_t *best) {
    memset(best, 0, (size_t)s->blocks_k);
    int64_t end = (strip + 1) * FP8_BLOCK < s->rows ? (strip + 1) * FP8_BLOCK : s->rows;
    for (int64_t r = strip * FP8_BLOCK; r < end; r++) {
        const uint8_t *p = (const uint8_t *)s->w + r * s->stride;
        for (int64_t b = 0; b < s->blocks_k; b++) {
            int64_t stop = (b + 1) * FP8_BLOCK < s->k ? (b + 1) * FP8_BLOCK : s->k;
            uint8_t m = best[b];
            for (int64_t c = b * FP8_BLOCK; c < stop; c++) {
                uint8_t a = p[c] & 0x7F;
                m = a > m ? a : m;
            }
            best[b] = m;
        }
    }
}

static inline float block_source_max(source *s, int64_t strip, int64_t b, uint8_t code) {
    return fabsf(strip_table(s, strip * FP8_BLOCK)[b * 256 + code]);
}

static float amax_fp8_block_source(source *s) {
    uint8_t *best = malloc((size_t)(s->blocks_k ? s->blocks_k : 1));
    if (best == NULL) return NAN;
    float result = 0.0f;
    int nan = 0;
    for (int64_t strip = 0; strip * FP8_BLOCK < s->rows; strip++) {
        strip_code_max(s, strip, best);
        for (int64_t b = 0; b < s->blocks_k; b++) {
            float a = block_source_max(s, strip, b, best[b]);
            nan |= a != a;
            result = a > result ? a : result;
        }
    }
    free(best);
    return nan ? NAN : result;
}

/* max |w| as float32; NaN if any element is NaN (as torch's amax propagates it), or if out of memory. */
float moeq_amax(const void *w, int dtype, int64_t rows, int64_t k, int64_t stride, const float *scale_inv) {
    if (dtype == 0) return amax_f32(w, rows, k, stride);
    if (dtype == 1) return amax_bf16(w, rows, k, stride);
    if (dtype == 2) return amax_f16(w, rows, k, stride);
    source s;
    if (open_source(&s, w, dtype, rows, k, stride, scale_inv)) return NAN;
    float result = amax_fp8_block_source(&s);
    close_source(&s);
    return result;
}

/* ----------------------------------------------------------------------------------------------- NVFP4 */

/* max |x[c]| over x[0..n) as bits (an integer max, which vectorizes; NaN's bits lie above inf's). */
static inline uint32_t max_magnitude_bits(const float *x, int64_t n) {
    uint32_t worst = 0;
    for (int64_t c = 0; c < n; c++) {
        uint32_t a = float_bits(x[c]) & 0x7FFFFFFFu;
        worst = a > worst ? a : worst;
    }
    return worst;
}

/* float32 value of an E4M3 byte in [0, 0x7F] (the scale codes: never negative), branch-free so that the loop
 * over a row's blocks vectorizes; 0x7F (NaN) gives NaN. */
static inline float e4m3_positive_value(uint32_t code) {
    float subnormal = (float)(int32_t)code * E4M3_MIN_SUBNORMAL; /* exponent 0: code = mantissa */
    uint32_t bits = pick(code < 8, float_bits(subnormal), (code << 20) + (120u << 23));
    return bits_to_float(pick(code == 0x7F, float_bits(NAN), bits));
}

/* NVFP4 of one row x[0..k): block scales (E4M3 bytes) and packed E2M1 codes.  Three passes over the row, each
 * a loop gcc vectorizes: block max |x| (on the bits, as amax), the block scales of the whole row (e4m3_code is
 * e4m3()'s rounding, branch-free: half to even, clamped input, NaN -> 0x7F), then the codes, one block of
 * BLOCK at a time.  Returns whether the row holds NaN or Inf.  `work`: 2 * (k / BLOCK) floats. */
static int nvfp4_row(const float *x, int64_t k, float scale_2, float unit, uint8_t *scales, uint8_t *out,
                     float *work) {
    const int64_t blocks = k / BLOCK;
    uint32_t *bmax = (uint32_t *)work;
    float *denom = work + blocks;
    for (int64_t b = 0; b < blocks; b++) bmax[b] = max_magnitude_bits(x + b * BLOCK, BLOCK);
    uint32_t worst = 0;
    for (int64_t b = 0; b < blocks; b++) {
        uint32_t m = bmax[b];
        worst = m > worst ? m : worst;
        float sc = bits_to_float(pick(m > INF_BITS, float_bits(NAN), m)) / unit;
        sc = bits_to_float(pick(sc == 0.0f, float_bits(1.0f), float_bits(sc)));
        sc = bits_to_float(pick(sc < E4M3_MIN_SUBNORMAL, float_bits(E4M3_MIN_SUBNORMAL), float_bits(sc)));
        sc = bits_to_float(pick(sc > E4M3_MAX, float_bits(E4M3_MAX), float_bits(sc)));
        uint8_t code = e4m3_code(sc);
        scales[b] = code;
        denom[b] = e4m3_positive_value(code & 0x7Fu) * scale_2; /* 0xFF: x86's 0/0 is a negative NaN */
    }
    for (int64_t b = 0; b < blocks; b++) {
        const float d = denom[b];
        const float *xb = x + b * BLOCK;
        uint32_t code[BLOCK]; /* 32-bit lanes: the compares and sums stay in float-wide vectors */
        for (int j = 0; j < BLOCK; j++) code[j] = e2m1_lane(xb[j] / d);
        uint8_t *o = out + b * (BLOCK / 2);
        for (int j = 0; j < BLOCK / 2; j++) o[j] = (uint8_t)(code[2 * j] | (code[2 * j + 1] << 4));
    }
    return worst >= INF_BITS;
}

/* NVFP4 of one weight with the given tensor amax: packed codes, E4M3 block scales, weight_scale_2.
 * Returns 1 when the weight holds NaN or Inf (the caller names it), -1 when out of memory, else 0. */
int moeq_nvfp4(const void *w, int dtype, int64_t rows, int64_t k, int64_t stride, const float *scale_inv,
               float amax, uint8_t *packed, uint8_t *scales, float *scale_2_out) {
    const float scale_2 = amax / NVFP4_SCALE_2_DIVISOR;
    const float unit = E2M1_MAX * scale_2;
    *scale_2_out = scale_2;
    source s;
    float *x = malloc(sizeof(float) * (size_t)(k + 2 * (k / BLOCK) + 1));
    if (x == NULL || open_source(&s, w, dtype, rows, k, stride, scale_inv)) {
        free(x);
        return -1;
    }
    int nonfinite = 0;
    for (int64_t r = 0; r < rows; r++) {
        load_row(&s, r, x);
        nonfinite |= nvfp4_row(x, k, scale_2, unit, scales + r * (k / BLOCK), packed + r * (k / 2), x + k);
    }
    close_source(&s);
    free(x);
    return nonfinite;
}

/* ------------------------------------------------------------------------------------------------- FP8 */

/* ModelOpt's export scale of an amax: 0 -> E4M3_MAX (scale 1), clamped up to the dtype's smallest normal
 * `tiny`, divided by E4M3_MAX (IEEE float32 division, as torch on CPU); NaN stays NaN. */
static inline float export_scale(float amax, float tiny) {
    float a = amax == 0.0f ? E4M3_MAX : (amax < tiny ? tiny : amax);
    return a / E4M3_MAX;
}

/* The dtype torch keeps a per-tensor quotient in (w / 0-dim scale stays in w's dtype on CPU): 0 float32,
 * 1 bfloat16 (an FP8-block source's values are bf16), 2 float16. */
static inline float round_quotient(float q, int kind) {
    return kind == 1 ? round_bf16(q) : (kind == 2 ? round_f16(q) : q);
}

#define DEFINE_FP8_ROW(KIND)                                                                                   \
    static void fp8_row_##KIND(const float *x, int64_t k, float scale, uint8_t *out) {                       \
        for (int64_t c = 0; c < k; c++) out[c] = e4m3_code(round_quotient(x[c] / scale, KIND));              \
    }
DEFINE_FP8_ROW(0)
DEFINE_FP8_ROW(1)
DEFINE_FP8_ROW(2)

/* FP8 of one weight, per tensor (amax[0], the quotient kept in the weight's dtype) or per channel (amax[r]
 * per row, or each row's own max when amax is NULL; float32 quotient).  `tiny`: the weight dtype's smallest
 * normal.  Writes codes [rows, k] and scales (1 or rows).  Returns 1 when the weight holds NaN or Inf,
 * -1 when out of memory, else 0. */
int moeq_fp8(const void *w, int dtype, int64_t rows, int64_t k, int64_t stride, const float *scale_inv,
             const float *amax, int per_channel, float tiny, uint8_t *codes, float *scales) {
    source s;
    float *x = malloc(sizeof(float) * (size_t)(k ? k : 1));
    if (x == NULL || open_source(&s, w, dtype, rows, k, stride, scale_inv)) {
        free(x);
        return -1;
    }
    const int kind = per_channel ? 0 : (dtype == 0 ? 0 : (dtype == 2 ? 2 : 1));
    float scale = per_channel ? 0.0f : export_scale(amax[0], tiny);
    if (!per_channel) scales[0] = scale;
    int nonfinite = 0;
    for (int64_t r = 0; r < rows; r++) {
        load_row(&s, r, x);
        uint32_t worst = max_magnitude_bits(x, k);
        nonfinite |= worst >= INF_BITS;
        if (per_channel) scale = scales[r] = export_scale(amax != NULL ? amax[r] : bits_to_float(worst), tiny);
        uint8_t *out = codes + r * k;
        if (kind == 1) {
            fp8_row_1(x, k, scale, out);
        } else if (kind == 2) {
            fp8_row_2(x, k, scale, out);
        } else {
            fp8_row_0(x, k, scale, out);
        }
    }
    close_source(&s);
    free(x);
    return nonfinite;
}

/* ------------------------------------------------------------------------------------------- FP8-block */

/* Block amaxes of one strip of a 16/32-bit weight, on the raw bits as in DEFINE_AMAX. */
#define DEFINE_STRIP_MAX(NAME, BITS, MAGNITUDE)                                                              \
    static void strip_max_##NAME(const source *s, int64_t strip, uint32_t *best) {                           \
        memset(best, 0, sizeof(uint32_t) * (size_t)s->blocks_k);                                             \
        int64_t end = (strip + 1) * FP8_BLOCK < s->rows ? (strip + 1) * FP8_BLOCK : s->rows;                 \
        for (int64_t r = strip * FP8_BLOCK; r < end; r++) {                                                   \
            const BITS *p = (const BITS *)s->w + r * s->stride;                                               \
            for (int64_t b = 0; b < s->blocks_k; b++) {                                                       \
                int64_t stop = (b + 1) * FP8_BLOCK < s->k ? (b + 1) * FP8_BLOCK : s->k;                       \
                BITS m = (BITS)best[b];                                                                       \
                for (int64_t c = b * FP8_BLOCK; c < stop; c++) {                                              \
                    BITS a = p[c] & MAGNITUDE;                                                                \
                    m = a > m ? a : m;                                                                        \
                }                                                                                             \
                best[b] = m;                                                                                  \
            }                                                                                                 \
        }                                                                                                     \
    }
DEFINE_STRIP_MAX(f32, uint32_t, 0x7FFFFFFFu)
DEFINE_STRIP_MAX(b16, uint16_t, 0x7FFF)

/* FP8 with one float32 scale per FP8_BLOCK x FP8_BLOCK block (ModelOpt's FP8_PB_WO): block amax (exact in
 * the dtype), export_scale with the dtype's `tiny`, codes of the float32 quotient.  Writes codes [rows, k]
 * and scales [ceil(rows / FP8_BLOCK), blocks_k].  Returns 1 on NaN/Inf in the weight, -1 out of memory. */
int moeq_fp8_block(const void *w, int dtype, int64_t rows, int64_t k, int64_t stride, const float *scale_inv,
                   float tiny, uint8_t *codes, float *scales) {
    source s;
    const int64_t blocks_k = (k + FP8_BLOCK - 1) / FP8_BLOCK;
    float *x = malloc(sizeof(float) * (size_t)(k ? k : 1));
    uint32_t *best = malloc(sizeof(uint32_t) * (size_t)(blocks_k ? blocks_k : 1));
    uint8_t *code_max = malloc((size_t)(blocks_k ? blocks_k : 1));
    if (x == NULL || best == NULL || code_max == NULL || open_source(&s, w, dtype, rows, k, stride, scale_inv)) {
        free(x);
        free(best);
        free(code_max);
        return -1;
    }
    int nonfinite = 0;
    for (int64_t strip = 0; strip * FP8_BLOCK < rows; strip++) {
        float *scale = scales + strip * blocks_k;
        if (dtype == 0) {
            strip_max_f32(&s, strip, best);
        } else if (dtype != SOURCE_FP8_BLOCK) {
            strip_max_b16(&s, strip, best);
        } else {
            strip_code_max(&s, strip, code_max);
        }
        for (int64_t b = 0; b < blocks_k; b++) {
            float a;
            if (dtype == 0) {
                a = bits_to_float(best[b]);
            } else if (dtype == 1) {
                a = bf16_to_float((uint16_t)best[b]);
            } else if (dtype == 2) {
                a = half_to_float((uint16_t)best[b]);
            } else {
                a = block_source_max(&s, strip, b, code_max[b]);
            }
            nonfinite |= !isfinite(a);
            scale[b] = export_scale(a, tiny);
        }
        int64_t end = (strip + 1) * FP8_BLOCK < rows ? (strip + 1) * FP8_BLOCK : rows;
        for (int64_t r = strip * FP8_BLOCK; r < end; r++) {
            load_row(&s, r, x);
            uint8_t *out = codes + r * k;
            for (int64_t b = 0; b < blocks_k; b++) {
                int64_t stop = (b + 1) * FP8_BLOCK < k ? (b + 1) * FP8_BLOCK : k;
                const float sb = scale[b];
                for (int64_t c = b * FP8_BLOCK; c < stop; c++) out[c] = e4m3_code(x[c] / sb);
            }
        }
    }
    close_source(&s);
    free(x);
    free(best);
    free(code_max);
    return nonfinite;
}
