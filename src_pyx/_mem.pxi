# MEM slices.  Reads access their bank in the issue cycle; writes sample their
# stream in the issue cycle and reach the bank d_write cycles later.  Pending
# writes wait in a small ring per slice and are applied lazily, just before the
# slice is next accessed (or when the run stops), in landing order.

cdef extern from *:
    void __builtin_prefetch(const void* p) noexcept nogil


cdef inline void prefetch_next_read(State* s, int q, int g, int32_t addr) noexcept nogil:
    """Start fetching the SRAM row queue q's next Read will copy: weight streaming
    reads each row once per run, so without this every Read waits on host DRAM."""
    cdef int64_t* qp = s.qs + q * QW
    cdef int32_t* row
    cdef int64_t na = -1
    cdef int i
    cdef uint8_t* ptr
    if qp[Q_REPLEFT] > 0:
        na = addr + qp[Q_REPSTRIDE]
    elif qp[Q_PC] < qp[Q_END]:
        row = s.code + qp[Q_PC] * (1 + NFIELDS)
        if row[0] == OP_READ:
            na = row[1 + F_READ_ADDR]
        elif row[0] == OP_REPEAT:
            na = addr + row[1 + F_REPEAT_STRIDE]
    if na < 0 or na >= s.A:
        return
    ptr = s.sram + (<int64_t>g * s.A + na) * s.L
    i = 0
    while i < s.L:
        __builtin_prefetch(ptr + i)
        i += 64


cdef inline int bank_of(State* s, int64_t a) noexcept nogil:
    if s.bank_msb:
        return <int>(a // s.bank_div)
    return <int>(a % s.nbanks)


cdef inline void mem_sync(State* s, int g, int64_t c) noexcept nogil:
    """Apply slice g's pending writes that land in or before cycle c, oldest first."""
    cdef int r, best, k
    cdef int64_t bt, tag, e
    cdef int32_t* ad
    cdef uint8_t* row
    while True:
        best = -1
        bt = INF
        for r in range(s.RW):
            tag = s.wr_tag[g * s.RW + r]
            if tag >= 0 and tag <= c and tag < bt:
                best = r
                bt = tag
        if best < 0:
            return
        e = g * s.RW + best
        ad = s.wr_addr + e * s.SL
        row = s.wr_data + e * s.L
        if s.wr_uniform[e]:
            memcpy(s.sram + (<int64_t>g * s.A + ad[0]) * s.L, row, s.L)
        else:
            for k in range(s.SL):
                memcpy(s.sram + (<int64_t>g * s.A + ad[k]) * s.L + k * s.LPS, row + k * s.LPS, s.LPS)
        s.wr_tag[e] = -1


cdef inline void mem_flush(State* s, int64_t c) noexcept nogil:
    cdef int g
    for g in range(s.NSL):
        mem_sync(s, g, c)


cdef inline int map_addresses(State* s, int q, int mp, int pos, int64_t c) noexcept nogil:
    """Read a Gather/Scatter map (int16 in lane 0 of each superlane) into s.gaddr."""
    cdef uint8_t* lo = stream_read(s, mp, pos, c)
    if lo == NULL:
        set_error(s, ERR_EMPTY_READ, c, q, mp, pos)
        return 1
    cdef uint8_t* hi = stream_read(s, mp + 1, pos, c)
    if hi == NULL:
        set_error(s, ERR_EMPTY_READ, c, q, mp + 1, pos)
        return 1
    cdef int k
    cdef int a
    for k in range(s.SL):
        a = lo[k * s.LPS] | (hi[k * s.LPS] << 8)
        if a >= 32768:
            a -= 65536
        if a < 0 or a >= s.A:
            set_error(s, ERR_ADDRESS, c, q, k, a)
            return 1
        s.gaddr[k] = a
    return 0


cdef inline int mem_exec(State* s, int q, int op, int32_t* f, int64_t c) noexcept nogil:
    cdef int g = s.q_slice[q]
    cdef int pos = s.q_pos[q]
    cdef int k, j, b, dst, src, nr, nw
    cdef int64_t e, slot, T
    cdef int32_t* wa
    cdef uint8_t* out
    cdef uint8_t* vec
    if op == OP_READ or op == OP_GATHER:
        # a Read's superlanes share one address: gaddr[0] (and the pending write's
        # wr_addr[0] when wr_uniform) stands for all of them
        if op == OP_READ:
            dst = f[F_READ_DST]
            s.gaddr[0] = f[F_READ_ADDR]
            nr = 1
        else:
            dst = f[F_GATHER_DST]
            if map_addresses(s, q, f[F_GATHER_MAP], pos, c):
                return 1
            nr = s.SL
        # a write landing in this cycle must be in the other bank
        e = g * s.RW + (c % s.RW)
        if s.wr_tag[e] == c:
            wa = s.wr_addr + e * s.SL
            nw = 1 if s.wr_uniform[e] else s.SL
            for k in range(nr):
                b = bank_of(s, s.gaddr[k])
                for j in range(nw):
                    if bank_of(s, wa[j]) == b:
                        set_error(s, ERR_BANK_CONFLICT, c, q, g, s.gaddr[k])
                        return 1
        mem_sync(s, g, c)
        T = c + s.d_read
        slot = pool_index(s, q, 0, c)
        if s.bulk_rec:
            rec_pool(s, q, slot, op, <int64_t>g * s.A + s.gaddr[0], c)
        out = s.pool + slot * s.L
        if op == OP_READ:
            memcpy(out, s.sram + (<int64_t>g * s.A + s.gaddr[0]) * s.L, s.L)
            prefetch_next_read(s, q, g, s.gaddr[0])
        else:
            for k in range(s.SL):
                memcpy(out + k * s.LPS, s.sram + (<int64_t>g * s.A + s.gaddr[k]) * s.L + k * s.LPS, s.LPS)
        stream_write(s, dst, pos, T, q, slot)
        effect(s, T)
        s.st_bread[g] += s.L
        return 0
    # Write / Scatter
    src = f[F_WRITE_SRC] if op == OP_WRITE else f[F_SCATTER_SRC]
    vec = stream_read(s, src, pos, c)
    if vec == NULL:
        set_error(s, ERR_EMPTY_READ, c, q, src, pos)
        return 1
    if op == OP_SCATTER and map_addresses(s, q, f[F_SCATTER_MAP], pos, c):
        return 1
    mem_sync(s, g, c)
    T = c + s.d_write
    if s.bulk_rec and T > s.bk_lastw[g]:
        s.bk_lastw[g] = T
    e = g * s.RW + (T % s.RW)
    s.wr_tag[e] = T
    if op == OP_WRITE:
        s.wr_addr[e * s.SL] = f[F_WRITE_ADDR]
        s.wr_uniform[e] = 1
    else:
        memcpy(s.wr_addr + e * s.SL, s.gaddr, s.SL * sizeof(int32_t))
        s.wr_uniform[e] = 0
    # copied: the pool slot may be reused before this write is applied (lazily)
    memcpy(s.wr_data + e * s.L, vec, s.L)
    effect(s, T)
    s.st_bwrite[g] += s.L
    return 0


cdef class MemUnit(Unit):
    """MEM slices: SRAM (bytes), the pending-write ring of each slice, bytes read and written."""

    def __init__(self):
        Unit.__init__(self, "MEM", saved=("sram", "wr_tag", "wr_addr", "wr_data", "wr_uniform",
                                          "st_bread", "st_bwrite"))

    cdef int alloc(self, State* s, object cfg, dict a) except -1:
        Unit.alloc(self, s, cfg, a)
        s.bank_msb = 1 if cfg.bank_select == "msb" else 0
        s.bank_div = cfg.addresses_per_slice // cfg.banks_per_slice
        s.nbanks = cfg.banks_per_slice
        s.d_read = cfg.mem_read_delay
        s.d_write = cfg.mem_write_delay
        # a write lands d_write cycles after its issue: one ring entry per cycle in flight
        s.RW = cfg.mem_write_delay + 1
        a["sram"] = np.zeros(s.NSL * s.A * s.L, dtype=np.uint8)
        a["wr_tag"] = np.empty(s.NSL * s.RW, dtype=np.int64)
        a["wr_addr"] = np.zeros(s.NSL * s.RW * s.SL, dtype=np.int32)
        a["wr_data"] = np.zeros(s.NSL * s.RW * s.L, dtype=np.uint8)
        a["wr_uniform"] = np.zeros(s.NSL * s.RW, dtype=np.uint8)
        a["gaddr"] = np.zeros(s.SL, dtype=np.int32)
        for k in ("st_bread", "st_bwrite"):
            a[k] = np.zeros(s.NSL, dtype=np.int64)
        return 0

    cdef int bind(self, State* s) except -1:
        a = self.a
        s.sram = _p_u8(a["sram"])
        s.wr_tag = _p_i64(a["wr_tag"])
        s.wr_addr = _p_i32(a["wr_addr"])
        s.wr_data = _p_u8(a["wr_data"])
        s.wr_uniform = _p_u8(a["wr_uniform"])
        s.gaddr = _p_i32(a["gaddr"])
        s.st_bread = _p_i64(a["st_bread"])
        s.st_bwrite = _p_i64(a["st_bwrite"])
        return 0

    cdef int restart(self, State* s, object lowered) except -1:
        a = self.a
        a["wr_tag"][:] = -1
        a["st_bread"][:] = 0
        a["st_bwrite"][:] = 0
        return 0

    cdef int validate(self, State* s, dict sc, dict arrays, object lowered) except -1:
        # pending writes land at valid addresses (a uniform write keeps one, in superlane 0)
        SL = s.SL
        tag = arrays["wr_tag"]
        check_range("array 'wr_tag' (landing cycle, -1: free)", tag, -1, LIM)
        uni = arrays["wr_uniform"]
        check_range("array 'wr_uniform'", uni, 0, 1)
        live = (tag >= 0)[:, None] & ((uni == 0)[:, None] | (np.arange(SL) == 0)[None, :])
        check_range("array 'wr_addr' (pending write address)", arrays["wr_addr"].reshape(-1, SL), 0, s.A - 1,
                    where=live)
        for k in ("st_bread", "st_bwrite"):
            check_range(f"array {k!r}", arrays[k], 0, LIM)
        return 0

    def counters(self):
        return {"bytes_read": self.a["st_bread"].copy(), "bytes_written": self.a["st_bwrite"].copy()}
