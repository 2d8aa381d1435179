/* The ICU's per-cycle scan of the instruction queues, kept apart from the cycle loop.
 *
 * Every simulated cycle with an issue looks at all queues (144 on the GroqChip) to
 * find those due now and the next cycle any is due.  Inside the loop's large body the
 * compiler kept the scan's counters in memory; here they stay in registers, and on an
 * AVX2 host four queues are compared at a time (the scan was a fifth of the loop's
 * instructions on a GEMM).  Both versions return the same queue and minimum.
 */
#ifndef LPU_ICU_H
#define LPU_ICU_H

#include <stdint.h>

static inline int lpu_next_due_scalar(const int64_t *qn, int q, int nq, int64_t c, int64_t *nmin)
{
    int64_t m = *nmin;
    for (; q < nq; q++) {
        int64_t v = qn[q];
        if (v == c)
            break;
        m = v < m ? v : m;
    }
    *nmin = m;
    return q;
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define LPU_ICU_AVX2 1

/* Whole groups of four with no queue due lower the minimum four lanes at a time; the
 * group holding a due queue (and the tail) is finished by the scalar scan. */
__attribute__((target("avx2"))) static int lpu_next_due_avx2(const int64_t *qn, int q, int nq, int64_t c,
                                                             int64_t *nmin)
{
    __m256i cv = _mm256_set1_epi64x(c), mv = _mm256_set1_epi64x(*nmin);
    for (; q + 4 <= nq; q += 4) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(qn + q));
        if (_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(v, cv))))
            break;
        mv = _mm256_blendv_epi8(mv, v, _mm256_cmpgt_epi64(mv, v));
    }
    int64_t t[4];
    _mm256_storeu_si256((__m256i *)t, mv);
    int64_t m = t[0];
    for (int i = 1; i < 4; i++)
        m = t[i] < m ? t[i] : m;
    *nmin = m;
    return lpu_next_due_scalar(qn, q, nq, c, nmin);
}

/* The same with eight lanes a group, where AVX-512 runs (a GroqChip has 144 queues: 18
 * groups a pass instead of 36). */
__attribute__((target("avx512f"))) static int lpu_next_due_avx512(const int64_t *qn, int q, int nq, int64_t c,
                                                                 int64_t *nmin)
{
    __m512i cv = _mm512_set1_epi64(c), mv = _mm512_set1_epi64(*nmin);
    for (; q + 8 <= nq; q += 8) {
        __m512i v = _mm512_loadu_si512((const void *)(qn + q));
        if (_mm512_cmpeq_epi64_mask(v, cv))
            break;
        mv = _mm512_min_epi64(mv, v);
    }
    *nmin = _mm512_reduce_min_epi64(mv);
    return lpu_next_due_scalar(qn, q, nq, c, nmin);
}

static int lpu_icu_has_avx2 = -1;      /* 2: AVX-512F, 1: AVX2, 0: neither */
#else
#define LPU_ICU_AVX2 0
#endif

/* The first queue q >= q0 whose next issue is cycle c (nq if none); *nmin is lowered to
 * the least next-issue cycle among the queues passed over. */
static inline int lpu_next_due(const int64_t *qn, int q0, int nq, int64_t c, int64_t *nmin)
{
#if LPU_ICU_AVX2
    if (__builtin_expect(lpu_icu_has_avx2 < 0, 0)) {
        __builtin_cpu_init();
        lpu_icu_has_avx2 = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    if (lpu_icu_has_avx2 == 2)
        return lpu_next_due_avx512(qn, q0, nq, c, nmin);
    if (lpu_icu_has_avx2)
        return lpu_next_due_avx2(qn, q0, nq, c, nmin);
#endif
    return lpu_next_due_scalar(qn, q0, nq, c, nmin);
}


/* The scan by one variant (0 scalar, 1 AVX2, 2 AVX-512), for the tests; -1 if the host or the
 * build cannot run it. */
static inline int lpu_next_due_variant(int variant, const int64_t *qn, int q0, int nq, int64_t c, int64_t *nmin)
{
    if (variant == 0)
        return lpu_next_due_scalar(qn, q0, nq, c, nmin);
#if LPU_ICU_AVX2
    __builtin_cpu_init();
    if (variant == 1 && __builtin_cpu_supports("avx2"))
        return lpu_next_due_avx2(qn, q0, nq, c, nmin);
    if (variant == 2 && __builtin_cpu_supports("avx512f"))
        return lpu_next_due_avx512(qn, q0, nq, c, nmin);
#endif
    return -1;
}

#endif
