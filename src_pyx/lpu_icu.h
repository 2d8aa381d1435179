/* The ICU's per-cycle scan of the instruction queues, kept apart from the cycle loop.
 *
 * Every simulated cycle with an issue looks at all queues (144 on the GroqChip) to
 * find those due now and the next cycle any is due.  Inside the loop's large body the
 * compiler kept the scan's counters in memory; here they stay in registers.
 */
#ifndef LPU_ICU_H
#define LPU_ICU_H

#include <stdint.h>

/* The first queue q >= q0 whose next issue is cycle c (nq if none); *nmin is lowered to
 * the least next-issue cycle among the queues passed over. */
static inline int lpu_next_due(const int64_t *qn, int q0, int nq, int64_t c, int64_t *nmin)
{
    int64_t m = *nmin;
    int q = q0;
    for (; q < nq; q++) {
        int64_t v = qn[q];
        if (v == c)
            break;
        m = v < m ? v : m;
    }
    *nmin = m;
    return q;
}

#endif
