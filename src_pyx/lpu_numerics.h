/* lpucore: the VXM's floating-point helpers in C.
 *
 * These repeat lpucore/numerics.py operation for operation so that the fast
 * engine is bit-identical to the reference engine.  Everything is float32
 * arithmetic with round-to-nearest-even; the extension is compiled with
 * -ffp-contract=off (no fused multiply-add) and without -ffast-math, so the
 * compiler may not reassociate, contract or flush subnormals.
 */
#ifndef LPU_NUMERICS_H
#define LPU_NUMERICS_H

#include <stdint.h>
#include <string.h>
#include <math.h>

/* The constants (canonical NaNs, exp and tanh coefficients) are lpucore/numerics.py's,
 * generated: LPU_QNAN32, LPU_QNAN16, LPU_EXP_*, LPU_LOG2E, LPU_TANH_*. */
#include "lpu_numerics_gen.h"

static inline float lpu_f32(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t lpu_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

/* float32 result -> raw bits, NaN canonical */
static inline uint32_t lpu_f32_out(float f) { return f != f ? LPU_QNAN32 : lpu_bits(f); }

/* binary16 bits -> float32 (exact) */
static inline float lpu_h2f(uint32_t h) {
    uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1Fu) return lpu_f32(sign | 0x7F800000u | (m << 13));
    if (e == 0) {
        if (m == 0) return lpu_f32(sign);
        /* subnormal: m * 2^-24, exact in float32 */
        float v = (float)m * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return lpu_f32(sign | ((e + 112u) << 23) | (m << 13));
}

/* float32 -> binary16 bits, round to nearest even, NaN canonical */
static inline uint32_t lpu_f2h(float f) {
    uint32_t x = lpu_bits(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) return LPU_QNAN16;
    if (ax >= 0x477FF000u) return sign | 0x7C00u;           /* >= 65520 rounds to infinity */
    if (ax < 0x38800000u) {                                   /* below 2^-14: subnormal half */
        if (ax <= 0x33000000u) return sign;                   /* <= 2^-25 rounds to zero */
        uint32_t e = ax >> 23, mant = (ax & 0x7FFFFFu) | 0x800000u, s = 126u - e;
        uint32_t h = mant >> s, rem = mant & ((1u << s) - 1u), half = 1u << (s - 1u);
        if (rem > half || (rem == half && (h & 1u))) h++;
        return sign | h;
    }
    uint32_t h = ((((ax >> 23) - 112u) << 10) | ((ax & 0x7FFFFFu) >> 13));
    uint32_t rem = ax & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return sign | h;
}

static inline float lpu_pow2(int k) { return lpu_f32((uint32_t)(k + 127) << 23); }

/* exp: Cody-Waite reduction, Cephes expf polynomial, scaling in two exact halves. */
static inline float lpu_exp(float x) {
    if (x != x) return x;
    float xc = x;
    if (!(xc > LPU_EXP_LO)) xc = LPU_EXP_LO;
    if (!(xc < LPU_EXP_HI)) xc = LPU_EXP_HI;
    float n = rintf(xc * LPU_LOG2E);
    float r = xc - n * LPU_EXP_C1;
    r = r - n * LPU_EXP_C2;
    float z = r * r;
    float p = LPU_EXP_P[0];
    for (int i = 1; i < LPU_EXP_P_LEN; i++) p = p * r + LPU_EXP_P[i];
    p = p * z + r;
    p = p + 1.0f;
    int ni = (int)n, n1 = ni >> 1, n2 = ni - n1;
    return (p * lpu_pow2(n1)) * lpu_pow2(n2);
}

static inline float lpu_tanh(float x) {
    float ax = fabsf(x), z = x * x;
    if (ax < LPU_TANH_SMALL) {
        float p = LPU_TANH_P[0];
        for (int i = 1; i < LPU_TANH_P_LEN; i++) p = p * z + LPU_TANH_P[i];
        return p * z * x + x;
    }
    float e = lpu_exp(ax + ax);
    float big = 1.0f - 2.0f / (e + 1.0f);
    return x < 0.0f ? -big : big;
}

static inline float lpu_sigmoid(float x) {
    float e = lpu_exp(-fabsf(x));
    float d = 1.0f + e;
    return x >= 0.0f ? 1.0f / d : e / d;
}

static inline float lpu_recip(float x) { return 1.0f / x; }
static inline float lpu_rsqrt(float x) { return 1.0f / sqrtf(x); }
static inline float lpu_div(float a, float b) { return a / b; }

static inline float lpu_relu(float x) { return x != x ? x : (x > 0.0f ? x : 0.0f); }

/* min/max: NaN if either is NaN; equal operands combine bits (min(-0,+0) = -0). */
static inline float lpu_fmin(float a, float b) {
    if (a != a || b != b) return lpu_f32(LPU_QNAN32);
    if (a < b) return a;
    if (b < a) return b;
    return lpu_f32(lpu_bits(a) | lpu_bits(b));
}
static inline float lpu_fmax(float a, float b) {
    if (a != a || b != b) return lpu_f32(LPU_QNAN32);
    if (a > b) return a;
    if (b > a) return b;
    return lpu_f32(lpu_bits(a) & lpu_bits(b));
}

/* float -> int: round to nearest even, saturate to [lo, hi], NaN -> 0 */
static inline int64_t lpu_f2i(float x, int bits) {
    float r = rintf(x);
    if (r != r) return 0;
    int64_t hi = ((int64_t)1 << (bits - 1)) - 1, lo = -((int64_t)1 << (bits - 1));
    if (r >= (float)hi) return hi;       /* (float)hi rounds up to 2^31 for int32: still right */
    if (r <= (float)lo) return lo;
    return (int64_t)r;
}

/* int32 -> int8 requantisation, exact in 64 bits */
static inline int64_t lpu_requant(int64_t a, int64_t mult, int shift, int64_t zp) {
    int64_t p = a * mult, q = p;
    if (shift) {
        q = p >> shift;                                     /* arithmetic: floor */
        uint64_t rem = (uint64_t)p & (((uint64_t)1 << shift) - 1u);
        uint64_t half = (uint64_t)1 << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q += 1;
    }
    q += zp;
    return q < -128 ? -128 : (q > 127 ? 127 : q);
}

#endif
