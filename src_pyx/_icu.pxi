# The ICU: in-order queues, NOP / Repeat / Sync / Notify, and the cycle loop.
# The loop jumps from one cycle with an issue to the next, so idle cycles cost
# nothing; within a cycle queues issue in queue-number order, as in the
# reference engine.

cdef extern from *:
    int __builtin_ctz(unsigned int x) noexcept nogil

cdef extern from "lpu_icu.h" nogil:
    int lpu_next_due(const int64_t* qn, int q0, int nq, int64_t c, int64_t* nmin)

cdef inline void set_next(State* s, int q, int64_t T) noexcept nogil:
    cdef int64_t* qp = s.qs + q * QW
    effect(s, T - 1)
    if qp[Q_REPLEFT] > 0 or qp[Q_PC] < qp[Q_END]:
        s.qn[q] = T
    else:
        s.qn[q] = INF


cdef inline int execute(State* s, int q, int op, int32_t* f, int64_t c) noexcept nogil:
    s.st_issued[q] += 1
    cdef int u = s.q_unit[q]
    if u == UNIT_MEM:
        return mem_exec(s, q, op, f, c)
    if u == UNIT_VXM:
        return vxm_exec(s, q, op, s.vx_cls[op], s.vx_nsrc[op], f, c)
    if u == UNIT_MXM:
        return mxm_exec(s, q, op, f, c)
    if op == OP_SEND or op == OP_RECEIVE or op == OP_DESKEW:
        return c2c_exec(s, q, op, f, c)
    return sxm_exec(s, q, op, f, c)


cdef inline int next_op(State* s, int q) noexcept nogil:
    """Opcode of the instruction queue q issues next."""
    cdef int64_t* qp = s.qs + q * QW
    if qp[Q_REPLEFT] > 0:
        return s.code[qp[Q_REPROW] * (1 + NFIELDS)]
    return s.code[qp[Q_PC] * (1 + NFIELDS)]


cdef int push_notify(State* s, int64_t c) noexcept nogil:
    cdef int64_t* p
    if s.n_notify == s.cap_notify:
        p = <int64_t*>realloc(s.notifies, (2 * s.cap_notify + 16) * sizeof(int64_t))
        if p == NULL:
            return 1
        s.notifies = p
        s.cap_notify = 2 * s.cap_notify + 16
    s.notifies[s.n_notify] = c
    s.n_notify += 1
    return 0


cdef inline int issue(State* s, int q, int64_t c) noexcept nogil:
    cdef int64_t* qp = s.qs + q * QW
    # the operand fields of the queue's current instruction; a repetition only
    # adds the stride to the strided ones
    cdef int32_t* f = s.qf + q * NFIELDS
    cdef int32_t* row
    cdef int op, i, r
    cdef int32_t m
    if qp[Q_REPLEFT] > 0:
        qp[Q_REPK] += 1
        qp[Q_REPLEFT] -= 1
        op = s.code[qp[Q_REPROW] * (1 + NFIELDS)]
        m = s.strided[op]
        if m and qp[Q_REPSTRIDE]:
            if m & (m - 1) == 0:        # one strided field, as in every op but a few
                f[__builtin_ctz(<unsigned int>m)] += <int32_t>qp[Q_REPSTRIDE]
            else:
                for i in range(NFIELDS):
                    if (m >> i) & 1:
                        f[i] += <int32_t>qp[Q_REPSTRIDE]
        if execute(s, q, op, f, c):
            return 1
        set_next(s, q, c + qp[Q_REPD] if qp[Q_REPLEFT] > 0 else c + 1)
        return 0
    row = s.code + qp[Q_PC] * (1 + NFIELDS)
    qp[Q_PC] += 1
    # 144 queues walk their own stretches of a code array far larger than the host's
    # caches: fetch a few rows ahead, or every issue waits on DRAM
    __builtin_prefetch(row + 4 * (1 + NFIELDS))
    op = row[0]
    if op == OP_NOP:
        s.st_icu[q] += 1
        set_next(s, q, c + row[1])
        return 0
    if op == OP_SYNC:
        s.st_icu[q] += 1
        qp[Q_SYNCS] += 1
        qp[Q_SYNCC] = c
        if s.n_notify >= qp[Q_SYNCS]:
            k = s.notifies[qp[Q_SYNCS] - 1] + s.notify_delay
            set_next(s, q, k if k > c + 1 else c + 1)
        else:
            qp[Q_WAIT] = qp[Q_SYNCS]
            s.qn[q] = INF
        return 0
    if op == OP_NOTIFY:
        s.st_icu[q] += 1
        if push_notify(s, c):
            return 2
        for r in range(s.NQ):
            if s.qs[r * QW + Q_WAIT] == s.n_notify:
                s.qs[r * QW + Q_WAIT] = 0
                set_next(s, r, c + s.notify_delay)
                s.woke = 1
        set_next(s, q, c + 1)
        return 0
    memcpy(f, row + 1, NFIELDS * sizeof(int32_t))
    if execute(s, q, op, f, c):
        return 1
    if qp[Q_PC] < qp[Q_END] and s.code[qp[Q_PC] * (1 + NFIELDS)] == OP_REPEAT:
        row = s.code + qp[Q_PC] * (1 + NFIELDS)
        qp[Q_PC] += 1
        s.st_icu[q] += 1
        qp[Q_REPROW] = qp[Q_PC] - 2
        qp[Q_REPLEFT] = row[1 + F_REPEAT_N]
        qp[Q_REPK] = 0
        qp[Q_REPD] = row[1 + F_REPEAT_D]
        qp[Q_REPSTRIDE] = row[1 + F_REPEAT_STRIDE]
        set_next(s, q, c + qp[Q_REPD])
    else:
        set_next(s, q, c + 1)
    return 0


cdef inline int64_t next_event(State* s) noexcept nogil:
    cdef int64_t c = s.perr[E_CYCLE] if s.perr[E_KIND] != ERR_NONE else INF
    cdef int64_t nx
    cdef int q
    for q in range(s.NQ):
        nx = s.qn[q]
        if nx < c:
            c = nx
    return c


cdef int run_until(State* s, int64_t until, int idle) noexcept nogil:
    """run_loop, then every helper job done: outside the loop no FIFO row is pending."""
    cdef int rc = run_loop(s, until, idle)
    cdef int64_t e
    if s.jobs != NULL:
        lpu_pool_drain(<lpu_pool*>s.jobs)
        for e in range(s.NP * s.BB):
            s.mx_bjob[e] = -1
        for e in range(s.NP * NR):
            s.mx_rseq[e] = -1
        for e in range(s.NP * s.NS):
            s.mx_sseq[e] = -1
    return rc


cdef int run_loop(State* s, int64_t until, int idle) noexcept nogil:
    """Simulate cycles up to (not including) until (-1: to the end; idle = 0: stop at
    the program's finish cycle if that comes first, 1: idle on up to until).  0 = stopped
    normally, 1 = schedule error in s.err, 2 = out of memory, 3 = the MXM batch of
    plane s.flush_plane must be multiplied first (the caller does it and calls again:
    the loop resumes at the same cycle, with the queues that already issued in it done).
    Small batches are multiplied here (mxm_multiply_small) without returning.
    4 = the C2C outbox is full: the caller grows it and calls again (same resumption)."""
    cdef int q, rc
    cdef int64_t c, nx, nmin, target, finish
    c = next_event(s)
    while True:
        if c == INF:
            for q in range(s.NP):
                if s.mx_an[q] > 0 and mxm_multiply_small(s, q):
                    s.flush_plane = q
                    return 3
            for q in range(s.NP):
                mxm_apply(s, q, INF)
            for q in range(s.NQ):
                if s.qs[q * QW + Q_WAIT] > 0:
                    set_error(s, ERR_DEADLOCK, s.qs[q * QW + Q_SYNCC], q, s.qs[q * QW + Q_WAIT], s.n_notify)
                    mem_flush(s, INF - 1)
                    if s.last_effect + 1 > s.cycle:
                        s.cycle = s.last_effect + 1
                    return 1
            s.done = 1
            finish = s.last_effect + s.stagger if s.last_effect >= 0 else 0
            target = finish if until < 0 else (until if idle or until < finish else finish)
            if target > s.cycle:
                s.cycle = target
            mem_flush(s, s.cycle - 1)
            return 0
        if until >= 0 and c >= until:
            if until > s.cycle:
                s.cycle = until
            mem_flush(s, s.cycle - 1)
            return 0
        s.t = c
        s.cycle = c + 1
        if s.perr[E_KIND] != ERR_NONE and s.perr[E_CYCLE] == c:
            for q in range(8):
                s.err[q] = s.perr[q]
            mem_flush(s, c)
            return 1
        # issue, and find the next cycle with work in the same pass
        nmin = INF
        s.woke = 0
        q = lpu_next_due(s.qn, 0, s.NQ, c, &nmin)
        while q < s.NQ:
            if (s.q_unit[q] == UNIT_MXM and mxm_needs_flush(s, q, next_op(s, q), c)
                    and mxm_multiply_small(s, s.q_slot[q])):
                s.flush_plane = s.q_slot[q]
                return 3
            if s.q_unit[q] == UNIT_SXM and s.ob_n[0] >= s.OBC:
                return 4
            rc = issue(s, q, c)
            if rc:
                # leave SRAM as the reference engine does: writes landing by c applied
                mem_flush(s, c)
                return rc
            if s.qn[q] < nmin:
                nmin = s.qn[q]
            q = lpu_next_due(s.qn, q + 1, s.NQ, c, &nmin)
        if s.woke:
            # a Notify released queues that this pass may already have looked at
            nmin = next_event(s)
        elif s.perr[E_KIND] != ERR_NONE and s.perr[E_CYCLE] < nmin:
            nmin = s.perr[E_CYCLE]
        c = nmin
