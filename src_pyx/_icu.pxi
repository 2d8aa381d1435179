# The ICU: in-order queues, NOP / Repeat / Sync / Notify, and the cycle loop.
# The loop jumps from one cycle with an issue to the next, so idle cycles cost
# nothing; within a cycle queues issue in queue-number order, as in the
# reference engine.

cdef extern from *:
    int __builtin_ctz(unsigned int x) noexcept nogil

cdef extern from "lpu_icu.h" nogil:
    int lpu_next_due(const int64_t* qn, int q0, int nq, int64_t c, int64_t* nmin)
    int lpu_next_due_variant(int variant, const int64_t* qn, int q0, int nq, int64_t c, int64_t* nmin)

cdef inline void set_next(State* s, int q, int64_t T) noexcept nogil:
    cdef int64_t* qp = s.qs + q * QW
    effect(s, T - 1)
    if qp[Q_REPLEFT] > 0 or qp[Q_PC] < qp[Q_END]:
        s.qn[q] = T
    else:
        s.qn[q] = INF


cdef inline int execute(State* s, int q, int op, int32_t* f, int64_t c) noexcept nogil:
    s.st_issued[q] += 1
    if s.bulk_rec:
        s.rec_op = op
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


cdef inline int bulk_run(State* s, int q, int32_t* row, int64_t c) noexcept nogil:
    """MEM queue q is at a Read row in cycle c: if the plan (_bulk.pxi) starts a run here whose
    LWs all come before the call's stop, issue the run's m Reads at once (their counts, the
    last one's fields and effect, the queue's next issue m cycles on), tell each LW row its
    SRAM row, and return 1; else 0 (the Read issues exactly)."""
    cdef int64_t e = s.rd_off[q] + s.st_issued[q]
    cdef int64_t src, own, step
    cdef int32_t* mem
    cdef int k
    cdef int m, i
    cdef int g = s.q_slice[q]
    cdef bint group
    cdef uint8_t* ptr
    if e >= s.rd_off[q + 1]:
        return 0
    mem = s.rd_gomem + e * GM_W
    # the queue's next Read looks here next: fetch its entry meanwhile
    __builtin_prefetch(s.rd_run + e + 1)
    __builtin_prefetch(s.rd_cycle + e + 1)
    m = s.rd_run[e]
    if m <= 0 or s.rd_cycle[e] != c or s.rd_runlw[e] >= s.bulk_until:
        return 0
    __builtin_prefetch(s.rd_run + e + m)
    __builtin_prefetch(s.rd_cycle + e + m)
    __builtin_prefetch(s.rd_runlw + e + m)
    # the queue's next row, m rows on (issue() fetches a few rows ahead of the ones it issues)
    __builtin_prefetch(row + (m + 1) * (1 + NFIELDS))
    # the Reads' own cycles: a Repeat's d apart, a run of Read rows one apart (as planned)
    group = s.qs[q * QW + Q_PC] + 1 < s.qs[q * QW + Q_END] and row[1 + NFIELDS] == OP_REPEAT
    step = row[1 + NFIELDS + 1 + F_REPEAT_D] if group else 1
    own = c
    for k in range(m):
        src = mem[GM_SRC]
        bulk_name(s, mem[GM_ROW], own + mem[GM_DLW], src)
        if mem[GM_DLW2] >= 0:
            bulk_name(s, mem[GM_ROW2], own + mem[GM_DLW2], src)
        # the LW copies the row a few cycles on: start fetching it (a step's host time
        # is 10% longer without)
        ptr = s.sram + src * s.L
        i = 0
        while i < s.L:
            __builtin_prefetch(ptr + i)
            i += 64
        mem += GM_W
        own += step
    s.st_issued[q] += m
    s.st_bread[g] += <int64_t>m * s.L
    s.bulk_reads += m
    s.bk_fly[q] = e
    if group:
        bulk_repeat(s, q, row, c)
        return 1
    effect(s, c + m - 1 + s.d_read)
    memcpy(s.qf + q * NFIELDS, row + (m - 1) * (1 + NFIELDS) + 1, NFIELDS * sizeof(int32_t))
    s.qs[q * QW + Q_PC] += m
    set_next(s, q, c + m)
    return 1


cdef inline void bulk_repeat(State* s, int q, int32_t* row, int64_t c) noexcept nogil:
    """The queue state after a Read and its Repeat (n repetitions, d cycles apart) issued in
    bulk from cycle c, as issue() leaves it after the last repetition."""
    cdef int64_t* qp = s.qs + q * QW
    cdef int32_t* rep = row + 1 + NFIELDS
    cdef int64_t n = rep[1 + F_REPEAT_N]
    cdef int64_t d = rep[1 + F_REPEAT_D]
    cdef int64_t stride = rep[1 + F_REPEAT_STRIDE]
    cdef int32_t* f = s.qf + q * NFIELDS
    cdef int32_t m = s.strided[OP_READ]
    cdef int i
    memcpy(f, row + 1, NFIELDS * sizeof(int32_t))
    for i in range(NFIELDS):
        if (m >> i) & 1:
            f[i] = <int32_t>(<uint32_t>f[i] + <uint32_t>(n * stride))     # n int32 additions, wrapping
    s.st_icu[q] += 1
    qp[Q_REPROW] = qp[Q_PC]
    qp[Q_PC] += 2
    qp[Q_REPLEFT] = 0
    qp[Q_REPK] = n
    qp[Q_REPD] = d
    qp[Q_REPSTRIDE] = stride
    effect(s, c + n * d + s.d_read)
    set_next(s, q, c + n * d + 1 if n > 0 else c + d)


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
    if s.bulk_go and row[0] == OP_READ and s.q_unit[q] == UNIT_MEM and bulk_run(s, q, row, c):
        return 0
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
            if s.bulk_go:
                bulk_unwind(s, c, -1)
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
                if s.bulk_go:
                    bulk_unwind(s, c, q)
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


def _flat_i64(x):
    return np.ascontiguousarray(x, dtype=np.int64).reshape(-1)


cdef class IcuUnit(Unit):
    """The ICU: the loaded code, each queue's position, Repeat, Sync and next-issue state, the
    Notify history, time, the pending landing error, and instructions issued per queue."""

    def __init__(self):
        Unit.__init__(self, "ICU", saved=("qs", "qn", "qf", "st_issued", "st_icu"),
                      scalars=("t", "cycle", "last_effect", "done"))

    cdef int alloc(self, State* s, object cfg, dict a) except -1:
        Unit.alloc(self, s, cfg, a)
        NQ = s.NQ
        a["qs"] = np.zeros(NQ * QW, dtype=np.int64)
        a["qn"] = np.full(NQ, INF, dtype=np.int64)
        a["qf"] = np.zeros(NQ * NFIELDS, dtype=np.int32)
        a["q_unit"] = np.array([_UNIT[q.unit] for q in cfg.queues], dtype=np.int32)
        a["q_pos"] = np.array([q.position for q in cfg.queues], dtype=np.int32)
        a["q_slice"] = np.array([cfg.slice_id(q.hemisphere, q.slot) if q.unit == "MEM" else -1
                                 for q in cfg.queues], dtype=np.int32)
        a["q_slot"] = np.array([q.slot for q in cfg.queues], dtype=np.int32)
        a["q_hem"] = np.array([max(q.hemisphere, 0) for q in cfg.queues], dtype=np.int32)
        for k in ("st_issued", "st_icu"):
            a[k] = np.zeros(NQ, dtype=np.int64)
        lat = np.zeros(256, dtype=np.int32)
        strided = np.zeros(256, dtype=np.int32)
        for op in _isa.TABLE:
            lat[op.opcode] = op.delay(cfg)
            strided[op.opcode] = sum(1 << i for i, f in enumerate(op.fields) if f.strided)
        a["lat"], a["strided"] = lat, strided
        a["code"] = np.zeros((1, 1 + NFIELDS), dtype=np.int32)     # no program: one row, never fetched
        return 0

    cdef int bind(self, State* s) except -1:
        a = self.a
        s.code = _p_i32(a["code"])
        s.lat = _p_i32(a["lat"])
        s.strided = _p_i32(a["strided"])
        s.qs = _p_i64(a["qs"])
        s.qn = _p_i64(a["qn"])
        s.qf = _p_i32(a["qf"])
        s.q_unit = _p_i32(a["q_unit"])
        s.q_pos = _p_i32(a["q_pos"])
        s.q_slice = _p_i32(a["q_slice"])
        s.q_slot = _p_i32(a["q_slot"])
        s.q_hem = _p_i32(a["q_hem"])
        s.st_issued = _p_i64(a["st_issued"])
        s.st_icu = _p_i64(a["st_icu"])
        return 0

    cdef int restart(self, State* s, object lowered) except -1:
        a = self.a
        a["st_issued"][:] = 0
        a["st_icu"][:] = 0
        qs = a["qs"].reshape(s.NQ, QW)
        qs[:] = 0
        qn = a["qn"]
        if lowered is not None:
            _, qstart = lowered
            for q in range(s.NQ):
                qs[q, Q_PC] = qstart[q]
                qs[q, Q_END] = qstart[q + 1]
                qn[q] = 0 if qstart[q + 1] > qstart[q] else INF
        else:
            qn[:] = INF
        s.n_notify = 0
        s.t = -1
        s.cycle = 0
        s.last_effect = -1
        s.done = 0
        for i in range(8):
            s.err[i] = 0
            s.perr[i] = 0
        return 0

    cdef dict get_scalars(self, State* s):
        return {"t": s.t, "cycle": s.cycle, "last_effect": s.last_effect, "done": s.done}

    cdef int set_scalars(self, State* s, dict sc) except -1:
        s.t, s.cycle, s.last_effect, s.done = sc["t"], sc["cycle"], sc["last_effect"], sc["done"]
        return 0

    cdef dict snapshot(self, State* s):
        arrays = Unit.snapshot(self, s)
        arrays["notifies"] = np.array([s.notifies[i] for i in range(s.n_notify)], dtype=np.int64)
        arrays["perr"] = np.array([s.perr[i] for i in range(8)], dtype=np.int64)
        return arrays

    cdef int check_shapes(self, State* s, dict arrays) except -1:
        Unit.check_shapes(self, s, arrays)
        if _flat_i64(arrays["perr"]).shape[0] != 8:
            raise _errors.SnapshotError("snapshot array 'perr' must have 8 entries")
        return 0

    cdef int validate(self, State* s, dict sc, dict arrays, object lowered) except -1:
        notifies = _flat_i64(arrays["notifies"])
        check_range("scalar cycle", sc["cycle"], 0, LIM)
        check_range("scalar t", sc["t"], -1, sc["cycle"] - 1)
        check_range("scalar last_effect", sc["last_effect"], -1, LIM)
        check_range("scalar done", sc["done"], 0, 1)
        check_range("array 'notifies'", notifies, 0, LIM)
        self.validate_queues(s, arrays, lowered, notifies.shape[0])
        for k in ("st_issued", "st_icu"):
            check_range(f"array {k!r}", arrays[k], 0, LIM)
        self.validate_pending_error(s, _flat_i64(arrays["perr"]))
        return 0

    cdef int validate_queues(self, State* s, dict arrays, object lowered, int64_t n_notify) except -1:
        """Each queue's pc, Repeat, Sync and wait state against the loaded program (none loaded:
        every queue is empty)."""
        NQ = s.NQ
        if lowered is not None:
            code, qstart = lowered
            code = np.asarray(code)
        else:
            code, qstart = np.zeros((0, 1 + NFIELDS), dtype=np.int32), [0] * (NQ + 1)
        qs = arrays["qs"].reshape(NQ, QW)
        qn = arrays["qn"]
        for q in range(NQ):
            lo, hi = int(qstart[q]), int(qstart[q + 1])
            nm = f"array 'qs'[{q}, %d] (queue {q}'s %s)"
            check_range(nm % (Q_PC, f"pc; its code is rows {lo}..{hi - 1}"), qs[q, Q_PC], lo, hi)
            check_equal(nm % (Q_END, "end"), qs[q, Q_END], hi, "one past the queue's last row")
            pc = int(qs[q, Q_PC])
            check_range(nm % (Q_REPLEFT, "repetitions left"), qs[q, Q_REPLEFT], 0, 2 ** 31 - 1)
            rl = int(qs[q, Q_REPLEFT])
            if rl > 0:
                self.validate_repeat(s, arrays, code, q, lo)
            nsync = int(np.count_nonzero(code[lo:pc, 0] == OP_SYNC))
            check_equal(nm % (Q_SYNCS, "Syncs issued"), qs[q, Q_SYNCS], nsync, "Sync rows before pc")
            check_range(nm % (Q_SYNCC, "last Sync cycle"), qs[q, Q_SYNCC], 0, LIM)
            w = int(qs[q, Q_WAIT])
            if w:
                check_equal(nm % (Q_WAIT, "Notify waited for, 0: none"), w, nsync, "the queue's last Sync")
                check_range(nm % (Q_WAIT, "Notify waited for, not yet issued"), w, n_notify + 1, LIM)
                check_equal(f"array 'qn'[{q}] (parked queue {q})", qn[q], INF, "INF: parked")
            if rl == 0 and pc == hi:
                check_equal(f"array 'qn'[{q}] (queue {q} has nothing left to issue)", qn[q], INF, "INF")
            check_range(f"array 'qn'[{q}] (next issue cycle of queue {q})", qn[q], 0, LIM, also=(INF,))
        return 0

    cdef int validate_repeat(self, State* s, dict arrays, object code, int q, int64_t lo) except -1:
        """Queue q is repeating: the row before pc is the Repeat, the one before it the repeated
        op, and the counters and current fields agree with them."""
        qs = arrays["qs"].reshape(s.NQ, QW)
        qf = arrays["qf"].reshape(s.NQ, NFIELDS)
        nm = f"array 'qs'[{q}, %d] (queue {q}'s %s)"
        pc, rl, rr = int(qs[q, Q_PC]), int(qs[q, Q_REPLEFT]), int(qs[q, Q_REPROW])
        if not (pc - 2 >= lo and code[pc - 1, 0] == OP_REPEAT):
            raise _errors.SnapshotError(f"snapshot array 'qs'[{q}] is repeating (rep_left {rl}) but "
                                        f"row {pc - 1} of queue {q} is no Repeat")
        check_equal(nm % (Q_REPROW, "repeated row"), rr, pc - 2, "the row before the Repeat")
        rep = code[pc - 1]
        check_range(nm % (Q_REPK, "repetitions issued"), qs[q, Q_REPK], 0, rep[1 + F_REPEAT_N] - rl)
        check_equal(nm % (Q_REPK, "repetitions issued + left"), int(qs[q, Q_REPK]) + rl,
                    rep[1 + F_REPEAT_N], "the Repeat's count")
        check_equal(nm % (Q_REPD, "repetition delay"), qs[q, Q_REPD], rep[1 + F_REPEAT_D], "the Repeat's delay")
        check_equal(nm % (Q_REPSTRIDE, "repetition stride"), qs[q, Q_REPSTRIDE], rep[1 + F_REPEAT_STRIDE],
                    "the Repeat's stride")
        op = int(code[rr, 0])
        m = int(self.a["strided"][op])
        k, st = int(qs[q, Q_REPK]), int(rep[1 + F_REPEAT_STRIDE])
        for i in range(NFIELDS):
            want = int(code[rr, 1 + i])
            if (m >> i) & 1:
                want = (want + k * st + 2 ** 31) % 2 ** 32 - 2 ** 31
            check_equal(f"array 'qf'[{q}, {i}] (field {i} of queue {q}'s repeated instruction)",
                        qf[q, i], want, "its row's field plus rep_k strides")
        return 0

    cdef int validate_pending_error(self, State* s, object perr) except -1:
        """The pending landing error: none, a stream conflict or a latch conflict."""
        if perr[E_KIND] == ERR_NONE:
            return 0
        check_range(f"array 'perr'[{E_KIND}] (error kind)", perr[E_KIND], ERR_STREAM_CONFLICT, ERR_STREAM_CONFLICT,
                    also=(ERR_LATCH_CONFLICT,))
        check_range(f"array 'perr'[{E_CYCLE}] (cycle)", perr[E_CYCLE], 0, LIM)
        if perr[E_KIND] == ERR_STREAM_CONFLICT:
            check_range(f"array 'perr'[{E_CLASS}] (class)", perr[E_CLASS], 0, 0)
            check_range(f"array 'perr'[{E_A}] (stream)", perr[E_A], 0, 2 * s.S - 1)
            check_range(f"array 'perr'[{E_B}] (position)", perr[E_B], 0, s.P - 1)
            check_range(f"array 'perr'[{E_Q}] (queue)", perr[E_Q], 0, s.NQ - 1)
            check_range(f"array 'perr'[{E_Q2}] (queue)", perr[E_Q2], 0, s.NQ - 1)
        else:
            check_range(f"array 'perr'[{E_CLASS}] (class)", perr[E_CLASS], 1, 1)
            check_range(f"array 'perr'[{E_A}] (ALU)", perr[E_A], 0, s.NALU - 1)
        return 0

    cdef int restore(self, State* s, dict sc, dict arrays) except -1:
        cdef int64_t n, i
        cdef int64_t* p
        notifies = _flat_i64(arrays["notifies"])
        perr = _flat_i64(arrays["perr"])
        # the Notify history first: out of memory here leaves the engine as it was
        n = notifies.shape[0]
        if n > s.cap_notify:
            p = <int64_t*>realloc(s.notifies, n * sizeof(int64_t))
            if p == NULL:
                raise MemoryError("out of memory restoring Notify history")
            s.notifies = p
            s.cap_notify = n
        for i in range(n):
            s.notifies[i] = notifies[i]
        s.n_notify = n
        Unit.restore(self, s, sc, arrays)
        for i in range(8):
            s.perr[i] = perr[i]
            s.err[i] = 0
        s.woke = 0
        return 0

    def counters(self):
        return {"issued": self.a["st_issued"].copy(), "icu": self.a["st_icu"].copy()}
