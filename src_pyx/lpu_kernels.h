/* The fast engine's in-loop MXM kernels (see mxm_multiply_small in _mxm.pxi).
 *
 * Plain C loops that the compiler vectorises.  On x86-64 Linux with GCC each is
 * built twice (baseline x86-64 and AVX2) and the loader picks the one the host
 * runs (target_clones), so the extension stays portable while using the host's
 * vector width.  Results do not depend on which clone runs: int8 sums are exact
 * integers, and float64 sums run in the same order with the same (unfused,
 * -ffp-contract=off) operations in both.
 */
#ifndef LPU_KERNELS_H
#define LPU_KERNELS_H

#include <stdint.h>
#include <math.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#  define LPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#  define LPU_CLONES
#endif

/* acc[c] += sum over k < K of x[k] * w[k * L + c] (c < L): int8 activations held as
 * floats, int8 weights, exact in int32 (|sum| <= 320 * 128 * 128 < 2^31). */
LPU_CLONES static void lpu_mxm_i8_row(const float *x, const int8_t *w, int K, int L, int32_t *acc)
{
    for (int k = 0; k < K; k++) {
        int32_t xk = (int32_t)x[k];
        if (xk == 0)
            continue;
        const int8_t *wr = w + (int64_t)k * L;
        for (int c = 0; c < L; c++)
            acc[c] += xk * (int32_t)wr[c];
    }
}

/* wd[k * L + c] = fp16 weight (k, c) as float64, for k < K = L / 2: the array holds
 * byte planes, low bytes in row 2k and high bytes in row 2k + 1.  h2f: every binary16
 * value as float32 (exact).  Returns 1 if any weight is an infinity or a NaN. */
LPU_CLONES static int lpu_mxm_f16_weights(const uint8_t *arr, int L, const float *h2f, double *wd)
{
    int K = L / 2, bad = 0;
    for (int k = 0; k < K; k++) {
        const uint8_t *lo = arr + (int64_t)(2 * k) * L, *hi = lo + L;
        double *out = wd + (int64_t)k * L;
        for (int c = 0; c < L; c++) {
            bad |= (hi[c] & 0x7C) == 0x7C;
            out[c] = (double)h2f[(uint32_t)lo[c] | ((uint32_t)hi[c] << 8)];
        }
    }
    return bad;
}

/* s[c] += sum over k < K of x[k] * wd[k * L + c], and ab[c] += the same sum of absolute
 * values, in float64 (each product of two binary16 values is exact there), k ascending. */
LPU_CLONES static void lpu_mxm_f64_row(const float *x, const double *wd, int K, int L, double *s, double *ab)
{
    for (int k = 0; k < K; k++) {
        double xk = (double)x[k];
        if (xk == 0.0)
            continue;
        const double *wr = wd + (int64_t)k * L;
        for (int c = 0; c < L; c++) {
            double p = xk * wr[c];
            s[c] += p;
            ab[c] += fabs(p);
        }
    }
}

/* lpu_mxm_f64_row with the weights read from the byte planes through h2f: for sparse
 * activations (a one-hot row touches one weight row), where converting all the weights
 * first would cost more than the products. */
LPU_CLONES static void lpu_mxm_f16_row(const float *x, const uint8_t *arr, int L, const float *h2f,
                                       double *s, double *ab)
{
    int K = L / 2;
    for (int k = 0; k < K; k++) {
        double xk = (double)x[k];
        if (xk == 0.0)
            continue;
        const uint8_t *lo = arr + (int64_t)(2 * k) * L, *hi = lo + L;
        for (int c = 0; c < L; c++) {
            double p = xk * (double)h2f[(uint32_t)lo[c] | ((uint32_t)hi[c] << 8)];
            s[c] += p;
            ab[c] += fabs(p);
        }
    }
}

/* 1 if any fp16 weight in the byte planes (high bytes in the odd rows) is an infinity or a NaN. */
LPU_CLONES static int lpu_mxm_f16_special(const uint8_t *arr, int L)
{
    int K = L / 2, bad = 0;
    for (int k = 0; k < K; k++) {
        const uint8_t *hi = arr + (int64_t)(2 * k + 1) * L;
        for (int c = 0; c < L; c++)
            bad |= (hi[c] & 0x7C) == 0x7C;
    }
    return bad;
}

/* The unit in the last place of a binary16 value held as a float (0 for zero). */
static inline double lpu_ulp16f(float v)
{
    int e;
    if (v == 0.0f)
        return 0.0;
    frexp((double)v, &e);                  /* |v| = m 2^e, m in [0.5, 1) */
    e -= 1;
    return ldexp(1.0, (e < -14 ? -14 : e) - 10);
}

/* The same from binary16 bits. */
static inline double lpu_ulp16h(uint32_t h)
{
    int ex = (h >> 10) & 0x1F;
    if ((h & 0x7FFF) == 0)
        return 0.0;
    return ldexp(1.0, (ex == 0 ? 1 : ex) - 25);
}

/* Dot product column c when the interval test could not settle it (ties, exact zeros
 * after cancellation): every product x[k] w[k, c] is a multiple of g = min ulp(x) *
 * min ulp(w[., c]) over the nonzero activations, so when the float64 sum s is within
 * b < g / 2 of the exact sum, rounding s to a multiple of g gives the exact sum, which
 * then rounds once to float32.  Returns 0 with *out set, or 1 if that fails too. */
static int lpu_mxm_f16_snap(const float *x, const uint8_t *arr, int L, int c, double s, double b, float *out)
{
    int K = L / 2;
    double gx = INFINITY, gw = INFINITY, u, g, e;
    for (int k = 0; k < K; k++) {
        if (x[k] == 0.0f)
            continue;
        u = lpu_ulp16f(x[k]);
        if (u < gx)
            gx = u;
        u = lpu_ulp16h((uint32_t)arr[(int64_t)(2 * k) * L + c] | ((uint32_t)arr[(int64_t)(2 * k + 1) * L + c] << 8));
        if (u > 0.0 && u < gw)
            gw = u;
    }
    if (!(gx < INFINITY) || !(gw < INFINITY))
        return 1;
    g = gx * gw;
    if (!(b < 0.5 * g) || !(fabs(s) < g * 4503599627370496.0))
        return 1;
    e = rint(s / g) * g;
    *out = (float)e;
    return 0;
}

#endif
