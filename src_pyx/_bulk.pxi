# Bulk weight loads.  Most of a decode step's instructions are MEM Reads that put one
# weight row on a stream for the MXM's LW to copy into the plane's weight buffer (GPT-2
# small int8: 662,668 Reads of 790,000 issues a step).  Exactly, each Read is one pass of
# the cycle loop, a copy of its row into the stream pool and a stream write, and the LW
# looks the row up on its stream and copies it again.  With the plan below, a queue that
# reaches a run of such Reads (consecutive Read rows, one a cycle) issues the whole run at
# once: it counts them (instructions issued, bytes read, last effect) and tells each LW
# row which SRAM row to take; the LW copies that row from SRAM into its weight buffer.
# The same bytes reach the same rows in the same cycles, with the same statistics.
#
# The plan is recorded by the first whole run of a loaded program (from cycle 0, to its
# end, without error): for every Read, the instructions that read its vector.  A Read
# qualifies when one LW reads its vector (or two: planes at one position may load the same
# rows) and nothing else does (no instruction on any stream position), when no write lands
# in its slice from its cycle to its last LW's (so the SRAM row the LW copies is the one
# the Read saw, and no write can meet the Read in a bank), and when no earlier LW into the
# same weight row comes after it.  A run issued early, at its first cycle c0, names its LW
# rows' SRAM rows then: each weight row holds up to BULK_K such pending names (a row is
# reloaded a few cycles after an install), so at most BULK_K - 1 earlier LWs into its rows
# may come after c0 (of the names pending at any time, the one with the latest LW counts
# all the others among those).  The SRAM condition holds from each Read's own cycle (the row
# its LW copies is the one that Read saw, whenever the run was issued).  Issue times do not depend
# on data (the queues' code fixes them, Sync and Notify included; programs with
# chip-to-chip links are not recorded), so later runs of the program issue every Read and LW in
# the cycles recorded; each run checks its first Read's cycle anyway.  A run is issued in
# bulk only when its LWs come before the running call's stop cycle (a run in pieces stays
# exact across a stop; a trace or a Watcher, which step cycle by cycle, stays exact), and
# never from a restored snapshot until the next restart.  What differs: the stream
# registers and the pool never hold the bulk Reads' vectors, which nothing reads (the raw
# arrays of a snapshot show it; no result, cycle, statistic or later behaviour does).  The
# engine option bulk_reads (and $LPUCORE_BULK_READS=0 for a new engine's default) turns it
# off.

BULK_ENV = "LPUCORE_BULK_READS"
cdef enum:
    BULK_K = 2          # pending SRAM names per weight row (mx_bulk_T)


cdef inline void rec_pool(State* s, int q, int64_t slot, int op, int64_t src, int64_t c) noexcept nogil:
    """Recording: MEM queue q's Read (of row src = slice * A + address) or Gather put its vector
    in pool slot `slot` in cycle c."""
    cdef int64_t e = -1
    if op == OP_READ:
        e = s.rd_off[q] + s.st_issued[q] - 1
        s.rd_cycle[e] = c
        s.rd_src[e] = src
    s.pool_rid[slot] = e


cdef inline void rec_stream_read(State* s, uint8_t* v) noexcept nogil:
    """Recording: an instruction other than LW read the vector at v (a pool slot)."""
    cdef int64_t e
    if s.rec_op == OP_LW:
        return
    e = s.pool_rid[(v - s.pool) // s.L]
    if e >= 0:
        s.rd_nrd[e] += 1


cdef inline void rec_lw(State* s, int p, int row, uint8_t* v, int64_t c) noexcept nogil:
    """Recording: plane p's LW copies the vector at v into weight row `row` in cycle c (the
    first or the second LW to take it: two planes at one position may load the same rows)."""
    cdef int r = p * s.L + row
    cdef int64_t e = s.pool_rid[(v - s.pool) // s.L]
    cdef int64_t w
    cdef int64_t* last = s.bk_lastlw + <int64_t>r * BULK_K
    cdef int j
    if e >= 0:
        if s.rd_lwc[e] == -1:
            s.rd_lwc[e] = c
            s.rd_row[e] = r
        elif s.rd_lwc[e] >= 0 and s.rd_lwc2[e] == -1:
            s.rd_lwc2[e] = c
            s.rd_row2[e] = r
        else:
            s.rd_lwc[e] = -2            # a third LW
        # the last write into the Read's slice by now: after the Read, the row may differ
        w = s.bk_lastw[s.rd_src[e] // s.A]
        if w + 1 > s.rd_safe[e]:
            s.rd_safe[e] = w + 1
        # the BULK_K-th last LW into the row: a run names its SRAM row after it
        if last[BULK_K - 1] + 1 > s.rd_lwsafe[e]:
            s.rd_lwsafe[e] = last[BULK_K - 1] + 1
    for j in range(BULK_K - 1, 0, -1):
        last[j] = last[j - 1]
    last[0] = c


cdef inline void bulk_name(State* s, int r, int64_t T, int64_t src) noexcept nogil:
    """A bulk run: weight row r's LW in cycle T takes SRAM row src (a free name of the row's
    BULK_K; the plan leaves one free)."""
    cdef int64_t i = <int64_t>r * BULK_K
    cdef int j
    cdef int free = BULK_K - 1
    cdef int held = 0
    for j in range(BULK_K - 1, -1, -1):
        if s.mx_bulk_T[i + j] >= 0:
            held += 1
        else:
            free = j
    if held:
        s.bulk_shared += 1
    s.mx_bulk_T[i + free] = T
    s.mx_bulk_src[i + free] = src


cdef inline int64_t bulk_named(State* s, int r, int64_t c) noexcept nogil:
    """The name of weight row r for an LW in cycle c (an index into mx_bulk_T), -1: none (the
    LW reads its stream).  Only in calls that issue bulk runs (mx_bulk_T is full size then)."""
    cdef int64_t i = <int64_t>r * BULK_K
    cdef int j
    if not s.bulk_go:
        return -1
    for j in range(BULK_K):
        if s.mx_bulk_T[i + j] == c:
            return i + j
    return -1


cdef void bulk_unwind(State* s, int64_t ce, int qe) noexcept nogil:
    """An error stopped the run in cycle ce, raised by queue qe's issue (-1: before any queue
    issued in ce): the Reads of bulk runs that the exact path had not issued by then (later
    cycles; in ce, queues after qe) are taken out of the statistics again.  Issue times do not
    depend on data, but errors can (a Gather's or Scatter's addresses come from SRAM), and a
    run counted all its Reads when it started.  Each queue's last run is its plan entry in
    bk_fly; its Reads' cycles are the recorded ones.  (The queue's position stays where the
    run left it: a snapshot of a chip stopped by an error may show it ahead.)"""
    cdef int q, late
    cdef int64_t e, k
    for q in range(s.NQ):
        e = s.bk_fly[q]
        if e < 0:
            continue
        late = 0
        for k in range(e, e + s.rd_run[e]):
            if s.rd_cycle[k] > ce or (s.rd_cycle[k] == ce and q > qe):
                late += 1
        s.st_issued[q] -= late
        s.st_bread[s.q_slice[q]] -= <int64_t>late * s.L
        s.bulk_reads -= late
        s.bk_fly[q] = -1


cdef inline bint read_late(State* s, int64_t e, int64_t c0) noexcept nogil:
    """Recording: Read e cannot be issued in a run starting in cycle c0: a write lands in its
    slice between its own cycle and its LW's, or more than BULK_K - 1 earlier LWs into its
    rows come after c0."""
    return s.rd_safe[e] > s.rd_cycle[e] or s.rd_lwsafe[e] > c0


cdef inline void bulk_row(State* s, int p, int row, int b, int64_t name, int64_t c) noexcept nogil:
    """Plane p's LW in cycle c takes weight row `row` from the SRAM row a bulk Read named
    (`name`, from bulk_named; into buffer slot b): the writes that landed by now first, as the
    Read saw them."""
    cdef int64_t src = s.mx_bulk_src[name]
    mem_sync(s, <int>(src // s.A), c)
    memcpy(s.mx_slots + ((<int64_t>p * s.NS + b) * s.L + row) * s.L, s.sram + src * s.L, s.L)
    s.mx_row_src[p * s.L + row] = b
    s.mx_bulk_T[name] = -1


def bulk_default():
    """A new engine's bulk_reads: 1 unless $LPUCORE_BULK_READS is "0"."""
    return 0 if _os.environ.get(BULK_ENV, "").strip() == "0" else 1


cdef int plan_runs(State* s, const int32_t[:, ::1] code, const int64_t[::1] qstart) except -1 nogil:
    """The bulk runs of each MEM queue from a finished recording: rd_run[e] = Reads of the run
    starting at entry e (each qualifying Read starts the longest qualifying run of Read rows
    from it, found by a backward scan), rd_runlw[e] its last LW cycle."""
    cdef int q, op
    cdef int64_t row, k, e, nxt, ln, lw, safe, nsafe, nlw, nln
    for q in range(s.NQ):
        if s.q_unit[q] != UNIT_MEM or qstart[q + 1] == qstart[q]:
            continue
        # the plan entry of each row's instruction: functional instructions so far
        k = s.rd_off[q]
        for row in range(qstart[q], qstart[q + 1]):
            op = code[row, 0]
            code_ord_store(s, row - qstart[q], k)
            if op == OP_REPEAT:
                k += code[row, 1 + F_REPEAT_N]
            elif op != OP_NOP and op != OP_SYNC and op != OP_NOTIFY:
                k += 1
        nxt = -1
        nln = 0
        nlw = -1
        nsafe = 0
        for row in range(qstart[q + 1] - 1, qstart[q] - 1, -1):
            e = code_ord_load(s, row - qstart[q])
            if code[row, 0] == OP_READ and row + 1 < qstart[q + 1] and code[row + 1, 0] == OP_REPEAT:
                plan_group(s, e, code[row + 1, 1 + F_REPEAT_N], code[row + 1, 1 + F_REPEAT_D])
                nxt = -1            # a Repeat's group stands alone
                continue
            if (code[row, 0] != OP_READ or s.rd_cycle[e] < 0 or s.rd_lwc[e] < 0 or s.rd_nrd[e] != 0
                    or read_late(s, e, s.rd_cycle[e])):
                nxt = -1
                continue
            ln, lw, safe = 1, s.rd_lwc[e], s.rd_lwsafe[e]
            if s.rd_lwc2[e] > lw:
                lw = s.rd_lwc2[e]
            if nxt == e + 1 and s.rd_cycle[nxt] == s.rd_cycle[e] + 1 and nsafe <= s.rd_cycle[e]:
                ln = nln + 1
                if nlw > lw:
                    lw = nlw
                if nsafe > safe:
                    safe = nsafe
            s.rd_run[e] = <int32_t>ln
            s.rd_runlw[e] = lw
            nxt, nln, nlw, nsafe = e, ln, lw, safe
    return 0


cdef void plan_group(State* s, int64_t e, int64_t n, int64_t d) noexcept nogil:
    """A Read repeated n times, d cycles apart (entries e .. e + n): one bulk run if every
    repetition qualifies (its SRAM row unchanged from its own cycle to its LWs) and no earlier
    LW into its rows comes after the first one's cycle, when the run names their SRAM rows."""
    cdef int64_t k, lw = -1
    cdef int64_t c0 = s.rd_cycle[e]
    for k in range(e, e + n + 1):
        if (s.rd_cycle[k] != c0 + (k - e) * d or c0 < 0 or s.rd_lwc[k] < 0 or s.rd_nrd[k] != 0
                or read_late(s, k, c0)):
            return
        if s.rd_lwc[k] > lw:
            lw = s.rd_lwc[k]
        if s.rd_lwc2[k] > lw:
            lw = s.rd_lwc2[k]
    s.rd_run[e] = <int32_t>(n + 1)
    s.rd_runlw[e] = lw
    for k in range(e + 1, e + n + 1):
        s.rd_run[k] = -1            # in the group: issued with it, never a start


REPORT_KEYS = ("reads", "bulk", "read_by_others", "two_lws", "three_lws", "unsafe", "no_lw")
cdef enum:
    REP_N = 7


cdef bint pack_plan(State* s, int64_t n, int64_t* counts) noexcept nogil:
    """The planned Reads as bulk_run reads them (rd_gomem), and the recording's Reads by outcome
    (counts, in REPORT_KEYS order); False if a planned Read's SRAM row or LW distance does not fit
    in 32 bits (then nothing is issued in bulk).  One pass, no temporaries, and no more fresh
    memory than rd_gomem: a first run's end is mostly the host's page faults."""
    cdef int64_t e, dlw, dlw2
    cdef int64_t big = <int64_t>1 << 31
    cdef bint fits = True
    cdef bint rd
    cdef int32_t* mem
    for e in range(REP_N):
        counts[e] = 0
    for e in range(n):
        mem = s.rd_gomem + e * GM_W
        rd = s.rd_cycle[e] >= 0
        counts[0] += rd
        if s.rd_run[e] != 0:
            dlw = s.rd_lwc[e] - s.rd_cycle[e]
            dlw2 = s.rd_lwc2[e] - s.rd_cycle[e] if s.rd_lwc2[e] >= 0 else -1
            if dlw >= big or dlw2 >= big or s.rd_src[e] >= big:
                fits = False
            mem[GM_SRC] = <int32_t>s.rd_src[e]
            mem[GM_ROW] = s.rd_row[e]
            mem[GM_DLW] = <int32_t>dlw
            mem[GM_ROW2] = s.rd_row2[e]
            mem[GM_DLW2] = <int32_t>dlw2
            counts[1] += 1
            counts[3] += s.rd_lwc2[e] >= 0
        if not rd:
            continue
        counts[2] += s.rd_nrd[e] > 0
        counts[4] += s.rd_lwc[e] == -2
        counts[5] += s.rd_lwc[e] >= 0 and s.rd_nrd[e] == 0 and read_late(s, e, s.rd_cycle[e])
        counts[6] += s.rd_lwc[e] == -1 and s.rd_nrd[e] == 0
    return fits


cdef inline void code_ord_store(State* s, int64_t i, int64_t v) noexcept nogil:
    s.rd_runlw[s.rd_off[s.NQ] + i] = v          # scratch past the entries (see BulkUnit.layout)


cdef inline int64_t code_ord_load(State* s, int64_t i) noexcept nogil:
    return s.rd_runlw[s.rd_off[s.NQ] + i]


cdef class BulkUnit(Unit):
    """The bulk weight-load plan of the loaded program (host side, not saved: a restore
    turns bulk runs off until the next restart) and the LW rows that take SRAM rows."""

    cdef object _prog        # the lowered program the plan's entries are laid out for
    cdef public int tries    # recordings that did not finish for this program
    cdef public dict report  # the last recording's Reads by outcome

    def __init__(self):
        Unit.__init__(self, "bulk")
        self._prog = None
        self.tries = 0
        self.report = {}

    cdef int alloc(self, State* s, object cfg, dict a) except -1:
        Unit.alloc(self, s, cfg, a)
        self.recording_arrays(s, False)
        self.layout(s, None)
        s.bulk_on = bulk_default()
        return 0

    cdef int recording_arrays(self, State* s, int on) except -1:
        """The arrays only a recording uses, full size while it runs (and one entry otherwise,
        so that a chip costs no more host memory than ChipConfig.host_memory says)."""
        a = self.a
        a["pool_rid"] = np.full(s.D * s.pool_w if on else 1, -1, dtype=np.int64)
        a["bk_lastlw"] = np.full(s.NP * s.L * BULK_K if on else 1, -1, dtype=np.int64)
        a["bk_lastw"] = np.full(s.NSL if on else 1, -1, dtype=np.int64)
        return 0

    cdef int marker_arrays(self, State* s, int on) except -1:
        """The LW rows' SRAM sources, full size while a plan exists (LW reads them only in calls
        that issue bulk runs)."""
        a = self.a
        a["bk_fly"] = np.full(s.NQ, -1, dtype=np.int64)
        a["mx_bulk_T"] = np.full(s.NP * s.L * BULK_K if on else 1, -1, dtype=np.int64)
        a["mx_bulk_src"] = np.zeros(s.NP * s.L * BULK_K if on else 1, dtype=np.int64)
        return 0

    cdef int layout(self, State* s, object lowered) except -1:
        """One plan entry per functional instruction each MEM queue issues (a Repeat's count
        included); no plan yet."""
        a = self.a
        off = np.zeros(s.NQ + 1, dtype=np.int64)
        longest = 0
        if lowered is not None:
            code, qstart = lowered
            code = np.asarray(code)
            ops = code[:, 0]
            fn = (ops != OP_NOP) & (ops != OP_REPEAT) & (ops != OP_SYNC) & (ops != OP_NOTIFY)
            reps = np.where(ops == OP_REPEAT, code[:, 1 + F_REPEAT_N], 0)
            unit = a["q_unit"]
            for q in range(s.NQ):
                lo, hi = int(qstart[q]), int(qstart[q + 1])
                n = int(fn[lo:hi].sum() + reps[lo:hi].sum()) if unit[q] == UNIT_MEM else 0
                off[q + 1] = off[q] + n
                longest = max(longest, hi - lo)
        a["rd_off"] = off
        n = int(off[s.NQ])
        for k in ("rd_cycle", "rd_lwc", "rd_lwc2", "rd_src", "rd_safe", "rd_lwsafe"):
            a[k] = np.full(n + 1, -1, dtype=np.int64)
        for k in ("rd_row", "rd_row2", "rd_nrd", "rd_run"):
            a[k] = np.zeros(n + 1, dtype=np.int32)
        a["rd_runlw"] = np.zeros(n + 1 + longest, dtype=np.int64)     # + scratch for plan_runs
        a["rd_gomem"] = np.zeros((n + 1) * GM_W, dtype=np.int32)
        self.marker_arrays(s, False)
        s.bulk_plan = 0
        s.bulk_go = 0
        s.bulk_rec = 0
        self._prog = lowered
        self.tries = 0
        return 0

    cdef int bind(self, State* s) except -1:
        a = self.a
        s.rd_off = _p_i64(a["rd_off"])
        s.rd_cycle = _p_i64(a["rd_cycle"])
        s.rd_src = _p_i64(a["rd_src"])
        s.rd_lwc = _p_i64(a["rd_lwc"])
        s.rd_row = _p_i32(a["rd_row"])
        s.rd_lwc2 = _p_i64(a["rd_lwc2"])
        s.rd_row2 = _p_i32(a["rd_row2"])
        s.rd_nrd = _p_i32(a["rd_nrd"])
        s.rd_safe = _p_i64(a["rd_safe"])
        s.rd_lwsafe = _p_i64(a["rd_lwsafe"])
        s.rd_run = _p_i32(a["rd_run"])
        s.rd_runlw = _p_i64(a["rd_runlw"])
        s.rd_gomem = _p_i32(a["rd_gomem"])
        s.pool_rid = _p_i64(a["pool_rid"])
        s.bk_lastlw = _p_i64(a["bk_lastlw"])
        s.bk_lastw = _p_i64(a["bk_lastw"])
        s.mx_bulk_T = _p_i64(a["mx_bulk_T"])
        s.mx_bulk_src = _p_i64(a["mx_bulk_src"])
        s.bk_fly = _p_i64(a["bk_fly"])
        return 0

    cdef int restart(self, State* s, object lowered) except -1:
        if lowered is not self._prog:
            self.layout(s, lowered)
            self.bind(s)
        self.a["mx_bulk_T"][:] = -1
        self.a["bk_fly"][:] = -1
        s.bulk_ok = 1
        s.bulk_rec = 0
        return 0

    cdef int restore(self, State* s, dict sc, dict arrays) except -1:
        self.a["mx_bulk_T"][:] = -1
        self.a["bk_fly"][:] = -1
        s.bulk_ok = 0
        s.bulk_rec = 0
        return 0

    cdef int begin(self, State* s, int64_t until) except -1:
        """Before a call of the cycle loop: the stop cycle bulk runs must respect, whether they
        may run, and whether this run records the plan (a whole run from cycle 0 of a program
        without C2C)."""
        s.bulk_until = INF if until < 0 else until
        s.bulk_go = 1 if s.bulk_on and s.bulk_plan and s.bulk_ok else 0
        if (not s.bulk_on or s.bulk_plan or not s.bulk_ok or until >= 0 or s.cycle != 0 or s.t != -1
                or self._prog is None or self.tries >= 2 or self.a["rd_off"][s.NQ] == 0):
            return 0
        ops = np.asarray(self._prog[0])[:, 0]
        if np.isin(ops, (OP_SEND, OP_RECEIVE, OP_DESKEW)).any():
            return 0
        a = self.a
        for k in ("rd_cycle", "rd_lwc", "rd_lwc2", "rd_safe", "rd_lwsafe"):
            a[k][:] = -1
        for k in ("rd_nrd", "rd_run"):
            a[k][:] = 0
        self.recording_arrays(s, True)
        self.bind(s)
        s.bulk_rec = 1
        return 0

    cdef int end(self, State* s, int rc) except -1:
        """After the run: a finished recording becomes the plan.  No bulk runs until the next
        begin(): a host simulator that calls lpu_run_until itself, in pieces, runs exactly."""
        cdef int64_t counts[REP_N]
        s.bulk_go = 0
        if not s.bulk_rec:
            return 0
        s.bulk_rec = 0
        self.recording_arrays(s, False)
        self.bind(s)
        if rc != 0 or not s.done:
            self.tries += 1
            return 0
        code, qstart = self._prog
        plan_runs(s, np.ascontiguousarray(code, dtype=np.int32), np.asarray(qstart, dtype=np.int64))
        a = self.a
        n = a["rd_run"].shape[0]
        fits = pack_plan(s, n, counts)
        self.report = {k: int(counts[i]) for i, k in enumerate(REPORT_KEYS)}
        s.bulk_plan = 1 if self.report["bulk"] and fits else 0
        if s.bulk_plan:
            self.marker_arrays(s, True)
            self.bind(s)
        else:
            self.tries = 2          # nothing to issue in bulk: do not record again
        return 0

    def planned(self):
        """Reads of the loaded program that can be issued in bulk (0: no plan)."""
        return int(np.count_nonzero(self.a["rd_run"]))
