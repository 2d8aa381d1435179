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
#include <string.h>
#include "lpu_numerics.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#  define LPU_CLONES __attribute__((target_clones("avx2", "default")))
/* also an AVX-512 build, where 512-bit vectors pay: the byte-plane narrowing is one
 * instruction per 16 lanes there, against about one per lane in AVX2 */
#  define LPU_CLONES_512 __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#  define LPU_CLONES
#  define LPU_CLONES_512
#endif

/* The portable int8 kernel: out[c] = sum over k < K of x[k] * w[k * L + c] (c < L) with
 * int8 activations staged as offset bytes (xb[k] = x[k] + 128, i.e. x ^ 0x80) and the
 * weights transposed to int16 once per install (wt[c * K + k] = w[k * L + c]), exact in
 * int32 (|sum| <= K 2^14 < 2^31), as floats like the other kernels.  Plain C written as dot
 * products of int16 over k, two columns at a time, the form compilers vectorise best:
 * GCC turns it into pmaddwd with SSE2 (and vpmaddwd in the AVX2 clone), as it would into
 * widening multiply-adds on other architectures (measured on one Zen 4 core: 28 GMAC/s
 * with SSE2, 38 with AVX2, against 10 and 21 for the column-by-column form). */
static void lpu_mxm_i8_transpose(const int8_t *w, int K, int L, int16_t *wt)
{
    for (int k = 0; k < K; k++)
        for (int c = 0; c < L; c++)
            wt[(int64_t)c * K + k] = w[(int64_t)k * L + c];
}

/* x16: K int16 of scratch. */
LPU_CLONES static void lpu_mxm_i8_dot(const uint8_t *restrict xb, const int16_t *restrict wt, int K, int L,
                                      int16_t *restrict x16, float *restrict out)
{
    for (int k = 0; k < K; k++)
        x16[k] = (int16_t)((int)xb[k] - 128);
    int c = 0;
    for (; c + 1 < L; c += 2) {
        const int16_t *restrict w0 = wt + (int64_t)c * K, *restrict w1 = w0 + K;
        int32_t s0 = 0, s1 = 0;
        for (int k = 0; k < K; k++) {
            s0 += (int32_t)x16[k] * (int32_t)w0[k];
            s1 += (int32_t)x16[k] * (int32_t)w1[k];
        }
        out[c] = (float)s0;
        out[c + 1] = (float)s1;
    }
    if (c < L) {
        const int16_t *restrict w0 = wt + (int64_t)c * K;
        int32_t s0 = 0;
        for (int k = 0; k < K; k++)
            s0 += (int32_t)x16[k] * (int32_t)w0[k];
        out[c] = (float)s0;
    }
}

/* ---- byte planes -------------------------------------------------------------------------
 * A 32-bit lane travels as up to four 8-bit stream vectors (plane i carries bits 8i..8i+7).
 * Every VXM operand and result and every ACC crosses between the two forms, L lanes at a
 * time: as separate functions the compiler vectorises them for the host's width. */
LPU_CLONES_512 static void lpu_to_plane(int n, const uint32_t *bits, uint8_t *out, int shift)
{
    for (int l = 0; l < n; l++)
        out[l] = (uint8_t)(bits[l] >> shift);
}

LPU_CLONES_512 static void lpu_from_plane(int n, const uint8_t *p, uint32_t *out, int shift, int first)
{
    if (first)
        for (int l = 0; l < n; l++)
            out[l] = p[l];
    else
        for (int l = 0; l < n; l++)
            out[l] |= (uint32_t)p[l] << shift;
}

/* ---- VXM float conversions, n lanes at a time ------------------------------------------------
 * Branch-free forms of lpu_h2f and lpu_f32_out (lpu_numerics.h), bit for bit the same (checked
 * over every binary16 and every float32 input), so that the compiler vectorises them: the VXM
 * converts every float operand and result, 320 lanes at a time.  lpu_f2h_n is further down. */
static inline uint32_t lpu_sel(uint32_t c, uint32_t a, uint32_t b)   /* c ? a : b, as a mask */
{
    uint32_t m = 0u - c;
    return (a & m) | (b & ~m);
}

LPU_CLONES_512 static void lpu_h2f_n(int n, const uint32_t *src, uint32_t *dst)
{
    for (int l = 0; l < n; l++) {
        uint32_t h = src[l] & 0xFFFFu, sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
        uint32_t normal = sign | ((e + 112u) << 23) | (m << 13);
        uint32_t special = sign | 0x7F800000u | (m << 13);
        union { float f; uint32_t u; } sub;
        sub.f = (float)(int32_t)m * 5.9604644775390625e-08f;      /* m * 2^-24, exact; m = 0 gives +0 */
        dst[l] = lpu_sel(e == 0x1Fu, special, lpu_sel(e == 0u, sub.u | sign, normal));
    }
}

LPU_CLONES_512 static void lpu_f32_out_n(int n, const uint32_t *src, uint32_t *dst)
{
    for (int l = 0; l < n; l++)
        dst[l] = lpu_sel((src[l] & 0x7FFFFFFFu) > 0x7F800000u, LPU_QNAN32, src[l]);
}

/* ---- products into accumulators (mxm_apply) ------------------------------------------------
 * int8: products are exact integers held in floats; accumulators add in int32 with
 * two's-complement wrap-around.  float: a product replaces the accumulator (an exact zero
 * as +0) or is added in float32; NaN results are canonical.  Branch-free, so that the
 * compiler vectorises them. */
LPU_CLONES static void lpu_acc_i32(uint32_t *acc, const float *res, int L, int add)
{
    if (add)
        for (int l = 0; l < L; l++)
            acc[l] = acc[l] + (uint32_t)(int32_t)res[l];
    else
        for (int l = 0; l < L; l++)
            acc[l] = (uint32_t)(int32_t)res[l];
}

LPU_CLONES static void lpu_acc_f32(uint32_t *acc, const float *res, int L, int add)
{
    for (int l = 0; l < L; l++) {
        float r = res[l], a, v;
        uint32_t ab = acc[l], vb;
        r = r == 0.0f ? 0.0f : r;
        memcpy(&a, &ab, 4);
        v = add ? a + r : r;
        memcpy(&vb, &v, 4);
        acc[l] = v != v ? LPU_QNAN32 : vb;
    }
}

/* ---- int8 batches with AVX-512 VNNI ------------------------------------------------------
 * vpdpbusd multiplies 4 unsigned bytes by 4 signed bytes and adds the 4 products to an
 * int32 lane without saturation: with activations as offset bytes xb = x + 128 (0..255),
 * sum_k xb_k w_k = sum_k x_k w_k + 128 sum_k w_k, so subtracting the weights' column sums
 * times 128 gives the exact int8 dot product (every partial sum is below 2^31).  Integer
 * arithmetic: the bits do not depend on the kernel, only the host time does.
 *
 * Packed weights: for each block of 64 columns, for each group g of 4 rows, 256 bytes:
 * four 64-byte vectors of 16 columns x 4 rows (w[4g..4g+3][c] in consecutive bytes).
 * Rows past K and columns past L are zero.  lpu_vnni_packed_bytes gives the size. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#  define LPU_HAVE_VNNI 1
#  include <immintrin.h>
#  define LPU_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))
#else
#  define LPU_HAVE_VNNI 0
#endif

/* float32 bits -> binary16 bits (lpu_f2h: round to nearest even, NaN canonical), n lanes.
 * With F16C, vcvtps2ph rounds to nearest even exactly as lpu_f2h does (subnormal halves
 * included, checked over every float32 input) and only NaNs need the canonical pattern;
 * GCC 12 does not vectorise the integer form, so other hosts run lpu_f2h lane by lane. */
#if LPU_HAVE_VNNI                  /* x86-64 GCC on Linux: target attributes and cpu checks */
__attribute__((target("avx2,f16c"))) static void lpu_f2h_n_f16c(int n, const uint32_t *src, uint32_t *dst)
{
    int l = 0;
    const __m256i qnan = _mm256_set1_epi32((int)LPU_QNAN16);
    for (; l + 8 <= n; l += 8) {
        __m256 x = _mm256_loadu_ps((const float *)(src + l));
        __m256i h = _mm256_cvtepu16_epi32(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        _mm256_storeu_si256((__m256i *)(dst + l), _mm256_blendv_epi8(h, qnan, nan));
    }
    for (; l < n; l++)
        dst[l] = lpu_f2h(lpu_f32(src[l]));
}
#endif

static int lpu_f16c = -1;          /* host has AVX2 and F16C: 1, not: 0, not asked yet: -1 */

static void lpu_f2h_n(int n, const uint32_t *src, uint32_t *dst)
{
#if LPU_HAVE_VNNI
    if (lpu_f16c < 0) {
        __builtin_cpu_init();
        lpu_f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    }
    if (lpu_f16c) {
        lpu_f2h_n_f16c(n, src, dst);
        return;
    }
#endif
    for (int l = 0; l < n; l++)
        dst[l] = lpu_f2h(lpu_f32(src[l]));
}

static inline int lpu_vnni_groups(int K) { return (K + 3) / 4; }
static inline int lpu_vnni_blocks(int L) { return (L + 63) / 64; }
static inline int64_t lpu_vnni_packed_bytes(int K, int L)
{
    return (int64_t)lpu_vnni_blocks(L) * lpu_vnni_groups(K) * 256;
}

/* 1 if this host runs the VNNI kernels (CPU and operating system). */
static int lpu_vnni_available(void)
{
#if LPU_HAVE_VNNI
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")
        && __builtin_cpu_supports("avx512vbmi");
#else
    return 0;
#endif
}

#if LPU_HAVE_VNNI
/* Pack int8 weights w [K x L] (row-major) into wp; corr[c] = 128 * sum_k w[k][c] for the
 * 64 * blocks columns (zero past L). */
LPU_VNNI static void lpu_vnni_pack(const int8_t *w, int K, int L, int8_t *wp, int32_t *corr)
{
    int G = lpu_vnni_groups(K), NB = lpu_vnni_blocks(L);
    /* byte 4c + t of a 16-column vector comes from row t, column c: in the gathered vector
     * [row0 c0..15 | row1 c0..15 | row2 ... | row3 ...] that is byte 16t + c */
    uint8_t idx_b[64];
    for (int c = 0; c < 16; c++)
        for (int t = 0; t < 4; t++)
            idx_b[4 * c + t] = (uint8_t)(16 * t + c);
    __m512i idx = _mm512_loadu_si512((const void *)idx_b);
    for (int b = 0; b < NB; b++) {
        for (int g = 0; g < G; g++) {
            int8_t *out = wp + ((int64_t)b * G + g) * 256;
            for (int j = 0; j < 4; j++) {
                int c0 = b * 64 + j * 16;
                int ncol = L - c0;
                ncol = ncol < 0 ? 0 : (ncol > 16 ? 16 : ncol);
                __mmask16 cm = (__mmask16)((1u << ncol) - 1u);
                __m128i r[4];
                for (int t = 0; t < 4; t++) {
                    int k = 4 * g + t;
                    r[t] = (k < K && ncol > 0) ? _mm_maskz_loadu_epi8(cm, w + (int64_t)k * L + c0)
                                               : _mm_setzero_si128();
                }
                __m512i v = _mm512_castsi128_si512(r[0]);
                v = _mm512_inserti32x4(v, r[1], 1);
                v = _mm512_inserti32x4(v, r[2], 2);
                v = _mm512_inserti32x4(v, r[3], 3);
                _mm512_storeu_si512((void *)(out + 64 * j), _mm512_permutexvar_epi8(idx, v));
            }
        }
    }
    /* column sums through the kernel itself: an activation of all 128s */
    __m512i x128 = _mm512_set1_epi8((char)0x80);
    for (int b = 0; b < NB; b++) {
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        const int8_t *wb = wp + (int64_t)b * G * 256;
        for (int g = 0; g < G; g++) {
            a0 = _mm512_dpbusd_epi32(a0, x128, _mm512_loadu_si512((const void *)(wb + g * 256)));
            a1 = _mm512_dpbusd_epi32(a1, x128, _mm512_loadu_si512((const void *)(wb + g * 256 + 64)));
            a2 = _mm512_dpbusd_epi32(a2, x128, _mm512_loadu_si512((const void *)(wb + g * 256 + 128)));
            a3 = _mm512_dpbusd_epi32(a3, x128, _mm512_loadu_si512((const void *)(wb + g * 256 + 192)));
        }
        _mm512_storeu_si512((void *)(corr + b * 64), a0);
        _mm512_storeu_si512((void *)(corr + b * 64 + 16), a1);
        _mm512_storeu_si512((void *)(corr + b * 64 + 32), a2);
        _mm512_storeu_si512((void *)(corr + b * 64 + 48), a3);
    }
}

/* One row r of the 4 x 64 tile: its 4 accumulators take the row's next 4 bytes. */
#define LPU_VNNI_ROW(r)                                                              \
    do {                                                                             \
        int32_t q_;                                                                  \
        __builtin_memcpy(&q_, xb + (r) * xs + 4 * g, 4);                             \
        __m512i x_ = _mm512_set1_epi32(q_);                                          \
        a##r##0 = _mm512_dpbusd_epi32(a##r##0, x_, w0);                              \
        a##r##1 = _mm512_dpbusd_epi32(a##r##1, x_, w1);                              \
        a##r##2 = _mm512_dpbusd_epi32(a##r##2, x_, w2);                              \
        a##r##3 = _mm512_dpbusd_epi32(a##r##3, x_, w3);                              \
    } while (0)

/* Row r's 16 columns j: minus the column sums, as floats, to orow[r] (masked at L). */
#define LPU_VNNI_STORE(r, j)                                                         \
    do {                                                                             \
        if ((r) < nrows && ncol##j > 0)                                              \
            _mm512_mask_storeu_ps(orow[r] + b * 64 + 16 * (j), m##j,                 \
                                  _mm512_cvtepi32_ps(_mm512_sub_epi32(a##r##j, c##j))); \
    } while (0)

#define LPU_VNNI_STORE_ROW(r)                                                        \
    do { LPU_VNNI_STORE(r, 0); LPU_VNNI_STORE(r, 1); LPU_VNNI_STORE(r, 2); LPU_VNNI_STORE(r, 3); } while (0)

/* Rows [0, nrows) (nrows <= LPU_VNNI_ROWS = 4) of a batch times packed weights: out[r][c]
 * for c < L as floats (exact: |value| <= K * 2^14 < 2^24, as K <= 1024).  xb: the rows'
 * offset bytes, xs bytes apart; rows nrows..3 must be readable (their results are
 * dropped).  orow[r]: where row r's L results go.  The 16 accumulators are named
 * variables, so that they stay in registers: GCC 12 spills an indexed array of them, and
 * 6 rows (24 accumulators) every iteration (measured: 4 rows 195-210 GMAC/s on one Zen 4
 * core, 5 rows 130, 6 rows 90). */
#define LPU_VNNI_ROWS 4
LPU_VNNI static void lpu_vnni_rows(const uint8_t *xb, int64_t xs, int nrows, const int8_t *wp,
                                   const int32_t *corr, int K, int L, float *const *orow)
{
    int G = lpu_vnni_groups(K), NB = lpu_vnni_blocks(L);
    for (int b = 0; b < NB; b++) {
        const int8_t *wb = wp + (int64_t)b * G * 256;
        __m512i z = _mm512_setzero_si512();
        __m512i a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z;
        __m512i a20 = z, a21 = z, a22 = z, a23 = z, a30 = z, a31 = z, a32 = z, a33 = z;
        for (int g = 0; g < G; g++) {
            __m512i w0 = _mm512_loadu_si512((const void *)(wb + g * 256));
            __m512i w1 = _mm512_loadu_si512((const void *)(wb + g * 256 + 64));
            __m512i w2 = _mm512_loadu_si512((const void *)(wb + g * 256 + 128));
            __m512i w3 = _mm512_loadu_si512((const void *)(wb + g * 256 + 192));
            LPU_VNNI_ROW(0); LPU_VNNI_ROW(1); LPU_VNNI_ROW(2); LPU_VNNI_ROW(3);
        }
        int ncol0 = L - b * 64, ncol1 = ncol0 - 16, ncol2 = ncol0 - 32, ncol3 = ncol0 - 48;
#define LPU_VNNI_MASK(j) (ncol##j >= 16 ? (__mmask16)0xFFFF : ncol##j <= 0 ? (__mmask16)0 : (__mmask16)((1u << ncol##j) - 1u))
        __mmask16 m0 = LPU_VNNI_MASK(0), m1 = LPU_VNNI_MASK(1), m2 = LPU_VNNI_MASK(2), m3 = LPU_VNNI_MASK(3);
#undef LPU_VNNI_MASK
        __m512i c0 = _mm512_loadu_si512((const void *)(corr + b * 64));
        __m512i c1 = _mm512_loadu_si512((const void *)(corr + b * 64 + 16));
        __m512i c2 = _mm512_loadu_si512((const void *)(corr + b * 64 + 32));
        __m512i c3 = _mm512_loadu_si512((const void *)(corr + b * 64 + 48));
        LPU_VNNI_STORE_ROW(0); LPU_VNNI_STORE_ROW(1); LPU_VNNI_STORE_ROW(2); LPU_VNNI_STORE_ROW(3);
    }
}
#undef LPU_VNNI_ROW
#undef LPU_VNNI_STORE
#undef LPU_VNNI_STORE_ROW

/* A float16 activation in byte planes (low bytes lo, high bytes hi; L / 2 values) ->
 * floats x[0, L) (upper half zero), exactly as the table lpu_h2f fills (F16C conversion;
 * a signalling NaN comes out quiet, which no result can tell: NaN results are canonical). */
LPU_VNNI static void lpu_stage_f16(const uint8_t *lo, const uint8_t *hi, int L, float *x)
{
    int K = L / 2;
    for (int k = 0; k < K; k += 16) {
        int nk = K - k;
        __mmask16 m = nk >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nk) - 1u);
        __m256i l16 = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(m, lo + k));
        __m256i h16 = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(m, hi + k));
        _mm512_mask_storeu_ps(x + k, m, _mm512_cvtph_ps(_mm256_or_si256(l16, _mm256_slli_epi16(h16, 8))));
    }
    memset(x + K, 0, (size_t)(L - K) * sizeof(float));
}

/* Exact-mode float16 products of up to four activation rows (row r at x + r * xs), reading
 * the weights straight from the byte planes (low bytes in row 2k, high bytes in row 2k + 1,
 * K = L / 2 rows): out[2 r L + c] = the sum over k < K of x_r[k] w(k, c) and
 * out[2 r L + L + c] = the sum of |x_r[k] w(k, c)|, in float64, k ascending from zero: the
 * sums lpu_mxm_f64_row forms, bit for bit.  Each product of two binary16 values is exact in
 * float64, so a fused multiply-add rounds as its add alone; a zero product (a zero weight or
 * activation) leaves a sum as it was, since a sum that starts at +0 is never -0 (so skipping
 * zero weights or rows changes nothing).  Sixteen columns at a time with the rows' sums in
 * registers; each weight is converted once for the rows, never stored as float64.  Returns 1
 * if any weight is an infinity or a NaN (out is then unspecified). */
LPU_VNNI static int lpu_mxm_f16_fused(const float *x, int64_t xs, int nrows, const uint8_t *arr, int L,
                                      double *out)
{
    int K = L / 2;
    const __m256i expo = _mm256_set1_epi16(0x7C00);
    __m256i bad = _mm256_setzero_si256();
    for (int c = 0; c < L; c += 16) {
        int nc = L - c;
        __mmask16 m = nc >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nc) - 1u);
        __m512d acc[16];
        for (int i = 0; i < 16; i++)
            acc[i] = _mm512_setzero_pd();
        for (int k = 0; k < K; k++) {
            const uint8_t *lo = arr + (int64_t)(2 * k) * L + c;
            __m256i w16 = _mm256_or_si256(_mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(m, lo + L)), 8),
                                          _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(m, lo)));
            bad = _mm256_or_si256(bad, _mm256_cmpeq_epi16(_mm256_and_si256(w16, expo), expo));
            if (_mm256_testz_si256(w16, w16))
                continue;                   /* sixteen +0 weights (a -0 is not skipped: harmless) */
            __m512 w = _mm512_cvtph_ps(w16);
            __m512d w0 = _mm512_cvtps_pd(_mm512_castps512_ps256(w));
            __m512d w1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1)));
            __m512d aw0 = _mm512_abs_pd(w0), aw1 = _mm512_abs_pd(w1);
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                if (r >= nrows)
                    break;
                float xk = x[r * xs + k];
                if (xk == 0.0f)
                    continue;
                __m512d xv = _mm512_set1_pd((double)xk), xa = _mm512_set1_pd(fabs((double)xk));
                acc[4 * r] = _mm512_fmadd_pd(xv, w0, acc[4 * r]);
                acc[4 * r + 1] = _mm512_fmadd_pd(xv, w1, acc[4 * r + 1]);
                acc[4 * r + 2] = _mm512_fmadd_pd(xa, aw0, acc[4 * r + 2]);
                acc[4 * r + 3] = _mm512_fmadd_pd(xa, aw1, acc[4 * r + 3]);
            }
        }
        for (int r = 0; r < nrows && r < 4; r++) {
            double *sd = out + (int64_t)(2 * r) * L + c, *ab = sd + L;
            _mm512_mask_storeu_pd(sd, (__mmask8)(m & 0xFF), acc[4 * r]);
            _mm512_mask_storeu_pd(sd + 8, (__mmask8)(m >> 8), acc[4 * r + 1]);
            _mm512_mask_storeu_pd(ab, (__mmask8)(m & 0xFF), acc[4 * r + 2]);
            _mm512_mask_storeu_pd(ab + 8, (__mmask8)(m >> 8), acc[4 * r + 3]);
        }
    }
    return !_mm256_testz_si256(bad, bad);
}

/* ---- float16 batches in fp16_mxm="fp32" mode -----------------------------------------------
 * Products of two binary16 values are exact in float32, so a fused multiply-add rounds
 * exactly as a multiply then an add would: out = the products summed in float32, k
 * ascending, within the mode's documented bound (K - 1) 2^-24 sum|x_k w_k|. */

/* fp16 weights in byte planes (low bytes in row 2k, high bytes in row 2k + 1, K = L / 2
 * rows) -> float32 wf [K x 64 * blocks] (zero past L).  *kmax: 1 + the last row holding a
 * nonzero weight (0: none); *cmax: 1 + the last such column.  Returns 1 if a weight is an
 * infinity or a NaN. */
LPU_VNNI static int lpu_f16w_to_f32(const uint8_t *arr, int L, float *wf, int *kmax, int *cmax)
{
    int K = L / 2, Lp = 64 * lpu_vnni_blocks(L), bad = 0, km = 0;
    uint32_t colnz[64];                      /* per 16 columns: which were seen nonzero */
    for (int j = 0; j < Lp / 16; j++)
        colnz[j] = 0;
    for (int k = 0; k < K; k++) {
        const uint8_t *lo = arr + (int64_t)(2 * k) * L, *hi = lo + L;
        float *out = wf + (int64_t)k * Lp;
        int rownz = 0;
        for (int c0 = 0; c0 < Lp; c0 += 16) {
            int nc = L - c0;
            __mmask16 m = nc >= 16 ? (__mmask16)0xFFFF : nc <= 0 ? (__mmask16)0 : (__mmask16)((1u << nc) - 1u);
            __m256i l16 = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(m, lo + c0));
            __m256i h16 = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(m, hi + c0));
            __m256i b = _mm256_or_si256(l16, _mm256_slli_epi16(h16, 8));
            /* nonzero: any bit but the sign; special: exponent all ones */
            __mmask16 nz = _mm256_test_epi16_mask(b, _mm256_set1_epi16(0x7FFF));
            __mmask16 sp = _mm256_cmpeq_epi16_mask(_mm256_and_si256(b, _mm256_set1_epi16(0x7C00)),
                                                   _mm256_set1_epi16(0x7C00));
            bad |= sp != 0;
            rownz |= nz != 0;
            colnz[c0 / 16] |= nz;
            _mm512_storeu_ps(out + c0, _mm512_cvtph_ps(b));
        }
        if (rownz)
            km = k + 1;
    }
    int cm = 0;
    for (int j = 0; j < Lp / 16; j++)
        if (colnz[j])
            cm = 16 * j + 32 - __builtin_clz(colnz[j]);
    *kmax = km;
    *cmax = cm;
    return bad;
}

/* 1 if any of the n x K floats (rows xs floats apart) is an infinity or a NaN. */
LPU_VNNI static int lpu_f32_special(const float *x, int64_t xs, int n, int K)
{
    __m512 big = _mm512_set1_ps(3.4028234663852886e38f);
    for (int r = 0; r < n; r++)
        for (int k = 0; k < K; k += 16) {
            __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
            __m512 v = _mm512_maskz_loadu_ps(m, x + r * xs + k);
            /* not (|v| <= max) is true for infinities and NaNs */
            if (_mm512_mask_cmp_ps_mask(m, _mm512_abs_ps(v), big, _CMP_NLE_UQ))
                return 1;
        }
    return 0;
}

#define LPU_F32_ROW(r)                                                               \
    do {                                                                             \
        __m512 x_ = _mm512_set1_ps(x[(r) * xs + k]);                                 \
        a##r##0 = _mm512_fmadd_ps(x_, w0, a##r##0);                                  \
        a##r##1 = _mm512_fmadd_ps(x_, w1, a##r##1);                                  \
        a##r##2 = _mm512_fmadd_ps(x_, w2, a##r##2);                                  \
        a##r##3 = _mm512_fmadd_ps(x_, w3, a##r##3);                                  \
    } while (0)

#define LPU_F32_STORE(r, j)                                                          \
    do {                                                                             \
        if ((r) < nrows && ncol##j > 0)                                              \
            _mm512_mask_storeu_ps(orow[r] + b * 64 + 16 * (j), m##j, a##r##j);       \
    } while (0)

#define LPU_F32_STORE_ROW(r)                                                         \
    do { LPU_F32_STORE(r, 0); LPU_F32_STORE(r, 1); LPU_F32_STORE(r, 2); LPU_F32_STORE(r, 3); } while (0)

/* Rows [0, nrows) (nrows <= 4) of a float batch x (rows xs floats apart; rows nrows..3
 * readable) times float32 weights wf [K x Lp]: orow[r][c] = sum over k < K of
 * x[r][k] wf[k][c] for c < ncols, in float32, k ascending; columns ncols..L-1 get 0 (the
 * caller passes ncols < L only where those weights are zero and x is finite). */
LPU_VNNI static void lpu_f32_rows(const float *x, int64_t xs, int nrows, const float *wf, int K, int L,
                                  int ncols, float *const *orow)
{
    int Lp = 64 * lpu_vnni_blocks(L);
    for (int r = 0; r < nrows; r++)
        for (int c = ncols; c < L; c++)
            orow[r][c] = 0.0f;
    for (int b = 0; b * 64 < ncols; b++) {
        const float *wb = wf + b * 64;
        __m512 z = _mm512_setzero_ps();
        __m512 a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z;
        __m512 a20 = z, a21 = z, a22 = z, a23 = z, a30 = z, a31 = z, a32 = z, a33 = z;
        for (int k = 0; k < K; k++) {
            const float *wr = wb + (int64_t)k * Lp;
            __m512 w0 = _mm512_loadu_ps(wr), w1 = _mm512_loadu_ps(wr + 16);
            __m512 w2 = _mm512_loadu_ps(wr + 32), w3 = _mm512_loadu_ps(wr + 48);
            LPU_F32_ROW(0); LPU_F32_ROW(1); LPU_F32_ROW(2); LPU_F32_ROW(3);
        }
        int lim = ncols < L ? ncols : L;
        int ncol0 = lim - b * 64, ncol1 = ncol0 - 16, ncol2 = ncol0 - 32, ncol3 = ncol0 - 48;
#define LPU_F32_MASK(j) (ncol##j >= 16 ? (__mmask16)0xFFFF : ncol##j <= 0 ? (__mmask16)0 : (__mmask16)((1u << ncol##j) - 1u))
        __mmask16 m0 = LPU_F32_MASK(0), m1 = LPU_F32_MASK(1), m2 = LPU_F32_MASK(2), m3 = LPU_F32_MASK(3);
#undef LPU_F32_MASK
        LPU_F32_STORE_ROW(0); LPU_F32_STORE_ROW(1); LPU_F32_STORE_ROW(2); LPU_F32_STORE_ROW(3);
    }
}
#undef LPU_F32_ROW
#undef LPU_F32_STORE
#undef LPU_F32_STORE_ROW
#else
static void lpu_vnni_pack(const int8_t *w, int K, int L, int8_t *wp, int32_t *corr) { (void)w; (void)K; (void)L; (void)wp; (void)corr; }
static void lpu_vnni_rows(const uint8_t *xb, int64_t xs, int nrows, const int8_t *wp, const int32_t *corr,
                          int K, int L, float *const *orow)
{ (void)xb; (void)xs; (void)nrows; (void)wp; (void)corr; (void)K; (void)L; (void)orow; }
static int lpu_f16w_to_f32(const uint8_t *arr, int L, float *wf, int *kmax, int *cmax)
{ (void)arr; (void)L; (void)wf; *kmax = 0; *cmax = 0; return 1; }
static int lpu_f32_special(const float *x, int64_t xs, int n, int K) { (void)x; (void)xs; (void)n; (void)K; return 1; }
static void lpu_stage_f16(const uint8_t *lo, const uint8_t *hi, int L, float *x) { (void)lo; (void)hi; (void)L; (void)x; }
static int lpu_mxm_f16_fused(const float *x, int64_t xs, int nrows, const uint8_t *arr, int L, double *out)
{ (void)x; (void)xs; (void)nrows; (void)arr; (void)L; (void)out; return 1; }
static void lpu_f32_rows(const float *x, int64_t xs, int nrows, const float *wf, int K, int L, int ncols,
                         float *const *orow)
{ (void)x; (void)xs; (void)nrows; (void)wf; (void)K; (void)L; (void)ncols; (void)orow; }
#endif

/* ---- int8 batches with AVX2 -----------------------------------------------------------
 * For hosts without AVX-512 VNNI.  vpmaddwd multiplies 16 pairs of int16 and adds each
 * pair's two products into an int32 lane: with weights and activations sign-extended from
 * int8, every product (|p| <= 2^14), pair sum (<= 2^15) and int32 accumulation
 * (|sum| <= K 2^14 < 2^31 for K <= 4096) is exact, so the bits are those of every other
 * kernel.  (vpmaddubsw, unsigned bytes times signed bytes into saturating int16 pairs,
 * would do twice the products an instruction, but an offset activation of 255 against
 * weights of -128 gives -65,280: it saturates, and splitting the operands to avoid that
 * costs the gain.)
 *
 * Packed weights: for each block of 16 columns, for each pair g of rows, 64 bytes: two
 * 32-byte vectors of 8 columns x 2 rows (w[2g][c], w[2g+1][c] as int16, in that order).
 * Rows past K and columns past L are zero.  lpu_avx2_packed_bytes gives the size.
 * Activations: each group of up to LPU_AVX2_ROWS rows is widened first into a scratch of
 * LPU_AVX2_ROWS x pairs int32 (the pair x[2g], x[2g + 1] as two int16), one broadcast per
 * pair and row. */
#define LPU_AVX2_ROWS 6
static inline int lpu_avx2_pairs(int K) { return (K + 1) / 2; }
static inline int lpu_avx2_blocks(int L) { return (L + 15) / 16; }
static inline int64_t lpu_avx2_packed_bytes(int K, int L)
{
    return (int64_t)lpu_avx2_blocks(L) * lpu_avx2_pairs(K) * 64;
}
/* int32 scratch lpu_avx2_rows needs */
static inline int64_t lpu_avx2_scratch_ints(int K) { return (int64_t)LPU_AVX2_ROWS * lpu_avx2_pairs(K); }

/* 1 if this host runs the AVX2 kernels (CPU and operating system: GCC's check reads XCR0). */
static int lpu_avx2_available(void)
{
#if LPU_HAVE_VNNI
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
#else
    return 0;
#endif
}

#if LPU_HAVE_VNNI
#  define LPU_AVX2 __attribute__((target("avx2")))

/* Pack int8 weights w [K x L] (row-major) into wp: per block and pair, the two rows'
 * 16 bytes sign-extended and interleaved (every batch of a helper job packs, so this is
 * vectorised: in scalar C it took three times the products of a 230-row batch). */
LPU_AVX2 static void lpu_avx2_pack(const int8_t *w, int K, int L, int16_t *wp)
{
    int P = lpu_avx2_pairs(K), NB = lpu_avx2_blocks(L);
    for (int b = 0; b < NB; b++) {
        int c0 = 16 * b, ncol = L - c0 < 16 ? L - c0 : 16;
        for (int g = 0; g < P; g++) {
            __m128i r[2];
            for (int t = 0; t < 2; t++) {
                int k = 2 * g + t;
                if (k < K && ncol == 16)
                    r[t] = _mm_loadu_si128((const __m128i *)(w + (int64_t)k * L + c0));
                else {
                    int8_t tmp[16] = {0};
                    if (k < K)
                        memcpy(tmp, w + (int64_t)k * L + c0, (size_t)ncol);
                    r[t] = _mm_loadu_si128((const __m128i *)tmp);
                }
            }
            /* a: row 2g's 16 columns as int16, b: row 2g + 1's; unpack interleaves within
             * 128-bit lanes: lo = columns 0-3 | 8-11, hi = 4-7 | 12-15 */
            __m256i a = _mm256_cvtepi8_epi16(r[0]), bb = _mm256_cvtepi8_epi16(r[1]);
            __m256i lo = _mm256_unpacklo_epi16(a, bb), hi = _mm256_unpackhi_epi16(a, bb);
            int16_t *out = wp + ((int64_t)b * P + g) * 32;
            _mm256_storeu_si256((__m256i *)out, _mm256_permute2x128_si256(lo, hi, 0x20));
            _mm256_storeu_si256((__m256i *)(out + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
        }
    }
}

/* Row r of the 6 x 16 tile: its 2 accumulators take the row's pair g. */
#define LPU_AVX2_ROW(r)                                                              \
    do {                                                                             \
        __m256i x_ = _mm256_set1_epi32(xp[(r) * P + g]);                             \
        a##r##0 = _mm256_add_epi32(a##r##0, _mm256_madd_epi16(x_, w0));              \
        a##r##1 = _mm256_add_epi32(a##r##1, _mm256_madd_epi16(x_, w1));              \
    } while (0)

/* Row r's 8 columns j as floats to orow[r] (the last block masked at L). */
#define LPU_AVX2_STORE(r, j)                                                         \
    do {                                                                             \
        if ((r) < nrows) {                                                           \
            float *o_ = orow[r] + 16 * b + 8 * (j);                                  \
            __m256 v_ = _mm256_cvtepi32_ps(a##r##j);                                 \
            if (ncol >= 8 * (j) + 8)                                                 \
                _mm256_storeu_ps(o_, v_);                                            \
            else if (ncol > 8 * (j))                                                 \
                _mm256_maskstore_ps(o_, _mm256_cmpgt_epi32(_mm256_set1_epi32(ncol - 8 * (j)), lane), v_); \
        }                                                                            \
    } while (0)

#define LPU_AVX2_STORE_ROW(r) do { LPU_AVX2_STORE(r, 0); LPU_AVX2_STORE(r, 1); } while (0)

/* Rows [0, nrows) (nrows <= LPU_AVX2_ROWS) of a batch of offset bytes (xb, rows xs bytes
 * apart) times packed weights: out[r][c] = sum over k < K of (xb[r][k] - 128) w[k][c] for
 * c < L, as floats (the int32 sum converted as the other kernels convert it: exact for
 * K <= 1024, |value| < 2^24).  orow[r]: where row r's L
 * results go.  xp: lpu_avx2_scratch_ints(K) int32 of scratch.  12 accumulators, 2 weight
 * vectors and a broadcast: 15 of the 16 ymm registers. */
LPU_AVX2 static void lpu_avx2_rows(const uint8_t *xb, int64_t xs, int nrows, const int16_t *wp, int K, int L,
                                   float *const *orow, int32_t *xp)
{
    int P = lpu_avx2_pairs(K), NB = lpu_avx2_blocks(L);
    for (int r = 0; r < LPU_AVX2_ROWS; r++) {
        int32_t *d = xp + (int64_t)r * P;
        if (r >= nrows) {
            memset(d, 0, (size_t)P * sizeof(int32_t));
            continue;
        }
        const uint8_t *x = xb + r * xs;
        for (int g = 0; g < K / 2; g++) {
            uint32_t lo = (uint16_t)(int16_t)((int)x[2 * g] - 128), hi = (uint16_t)(int16_t)((int)x[2 * g + 1] - 128);
            d[g] = (int32_t)(lo | (hi << 16));
        }
        if (K & 1)
            d[P - 1] = (int32_t)(uint32_t)(uint16_t)(int16_t)((int)x[K - 1] - 128);
    }
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int b = 0; b < NB; b++) {
        const int16_t *wb = wp + (int64_t)b * P * 32;
        __m256i z = _mm256_setzero_si256();
        __m256i a00 = z, a01 = z, a10 = z, a11 = z, a20 = z, a21 = z;
        __m256i a30 = z, a31 = z, a40 = z, a41 = z, a50 = z, a51 = z;
        for (int g = 0; g < P; g++) {
            __m256i w0 = _mm256_loadu_si256((const __m256i *)(wb + 32 * g));
            __m256i w1 = _mm256_loadu_si256((const __m256i *)(wb + 32 * g + 16));
            LPU_AVX2_ROW(0); LPU_AVX2_ROW(1); LPU_AVX2_ROW(2);
            LPU_AVX2_ROW(3); LPU_AVX2_ROW(4); LPU_AVX2_ROW(5);
        }
        int ncol = L - 16 * b;
        LPU_AVX2_STORE_ROW(0); LPU_AVX2_STORE_ROW(1); LPU_AVX2_STORE_ROW(2);
        LPU_AVX2_STORE_ROW(3); LPU_AVX2_STORE_ROW(4); LPU_AVX2_STORE_ROW(5);
    }
}
#undef LPU_AVX2_ROW
#undef LPU_AVX2_STORE
#undef LPU_AVX2_STORE_ROW
#else
static void lpu_avx2_pack(const int8_t *w, int K, int L, int16_t *wp) { (void)w; (void)K; (void)L; (void)wp; }
static void lpu_avx2_rows(const uint8_t *xb, int64_t xs, int nrows, const int16_t *wp, int K, int L,
                          float *const *orow, int32_t *xp)
{ (void)xb; (void)xs; (void)nrows; (void)wp; (void)K; (void)L; (void)orow; (void)xp; }
#endif

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
