# C2C: chip-to-chip links (the rules are lpucore/reference/_c2c.py's docstring).
# Sent vectors go to an outbox and arrive in per-link inbox rings; both live in
# NumPy arrays that the Python side grows (run_until returns 4 when the outbox is
# full before a C2C queue issues) and that lpucore.System (or a host simulator)
# empties and fills between runs.  The reasons LINK_SKEW, LINK_BUSY, LINK_EMPTY
# are generated (_isa_gen.pxi) from lpucore.errors.LINK_WHY.


cdef inline int link_error(State* s, int64_t c, int q, int link, int why, int64_t extra) noexcept nogil:
    set_error(s, ERR_LINK, c, q, link, why)
    s.err[E_Q2] = extra
    return 1


cdef inline int c2c_exec(State* s, int q, int op, int32_t* f, int64_t c) noexcept nogil:
    cdef int link = f[0]
    cdef int pos = s.q_pos[q]
    cdef int64_t r, n, e, T, slot
    cdef uint8_t* v
    if op == OP_DESKEW:
        s.lk_ready[link] = c + s.c2c_deskew_delay
        effect(s, c + s.c2c_deskew_delay)
        return 0
    r = s.lk_ready[link]
    if r < 0 or c < r:
        return link_error(s, c, q, link, LINK_SKEW, r)
    if op == OP_SEND:
        if c < s.lk_busy[link]:
            return link_error(s, c, q, link, LINK_BUSY, s.lk_busy[link])
        v = stream_read(s, f[1], pos, c)
        if v == NULL:
            set_error(s, ERR_EMPTY_READ, c, q, f[1], pos)
            return 1
        s.lk_busy[link] = c + s.c2c_interval
        n = s.ob_n[0]               # room checked by run_until before the issue
        memcpy(s.ob_data + n * s.L, v, s.L)
        s.ob_meta[3 * n] = link
        s.ob_meta[3 * n + 1] = c
        s.ob_meta[3 * n + 2] = c + s.c2c_latency
        s.ob_n[0] = n + 1
        s.lk_sent[link] += 1
        return 0
    # Receive
    e = <int64_t>link * s.IBC + s.ib_head[link]
    if s.ib_n[link] == 0:
        return link_error(s, c, q, link, LINK_EMPTY, -1)
    if s.ib_arr[e] > c:
        return link_error(s, c, q, link, LINK_EMPTY, s.ib_arr[e])
    T = c + s.c2c_receive_delay
    slot = pool_index(s, q, 0, c)
    memcpy(s.pool + slot * s.L, s.ib_data + e * s.L, s.L)
    stream_write(s, f[1], pos, T, q, slot)
    s.ib_head[link] = (s.ib_head[link] + 1) % s.IBC
    s.ib_n[link] -= 1
    s.lk_recv[link] += 1
    effect(s, T)
    return 0


cdef class C2cUnit(Unit):
    """C2C links: their timing state and counters, the inbox ring of each link and the outbox.
    The rings grow as traffic needs (resize), so a snapshot may hold other sizes."""

    def __init__(self):
        Unit.__init__(self, "C2C", saved=("lk_busy", "lk_ready", "lk_sent", "lk_recv", "ib_head", "ib_n", "ob_n",
                                          "ib_data", "ib_arr", "ob_data", "ob_meta"),
                      growable=("ib_data", "ib_arr", "ob_data", "ob_meta"))

    cdef int alloc(self, State* s, object cfg, dict a) except -1:
        Unit.alloc(self, s, cfg, a)
        s.NL = cfg.c2c_links
        s.c2c_interval = cfg.c2c_send_interval
        s.c2c_latency = cfg.c2c_latency
        s.c2c_receive_delay = cfg.c2c_receive_delay
        s.c2c_deskew_delay = cfg.c2c_deskew_delay
        for k in ("lk_busy", "lk_ready", "lk_sent", "lk_recv", "ib_head", "ib_n"):
            a[k] = np.zeros(s.NL, dtype=np.int64)
        a["ob_n"] = np.zeros(1, dtype=np.int64)
        self.resize(s, 16, 64)
        return 0

    cdef int resize(self, State* s, int64_t ibc, int64_t obc) except -1:
        """(Re)size the inbox rings to ibc vectors per link and the outbox to obc vectors,
        keeping their contents (inbox entries move to the front of their rings); bind after."""
        a = self.a
        NL, L = s.NL, s.L
        ib_data = np.zeros((NL, ibc, L), dtype=np.uint8)
        ib_arr = np.zeros((NL, ibc), dtype=np.int64)
        if "ib_data" in a:
            old_d = a["ib_data"].reshape(NL, -1, L)
            old_a = a["ib_arr"].reshape(NL, -1)
            cap = old_a.shape[1]
            for k in range(NL):
                idx = (a["ib_head"][k] + np.arange(a["ib_n"][k])) % cap
                ib_data[k, :idx.shape[0]] = old_d[k, idx]
                ib_arr[k, :idx.shape[0]] = old_a[k, idx]
            a["ib_head"][:] = 0
        ob_data = np.zeros((obc, L), dtype=np.uint8)
        ob_meta = np.zeros((obc, 3), dtype=np.int64)
        if "ob_data" in a:
            n = int(a["ob_n"][0])
            ob_data[:n] = a["ob_data"].reshape(-1, L)[:n]
            ob_meta[:n] = a["ob_meta"].reshape(-1, 3)[:n]
        a["ib_data"], a["ib_arr"] = ib_data.reshape(-1), ib_arr.reshape(-1)
        a["ob_data"], a["ob_meta"] = ob_data.reshape(-1), ob_meta.reshape(-1)
        s.IBC = ibc
        s.OBC = obc
        return 0

    cdef int bind(self, State* s) except -1:
        a = self.a
        s.lk_busy = _p_i64(a["lk_busy"])
        s.lk_ready = _p_i64(a["lk_ready"])
        s.lk_sent = _p_i64(a["lk_sent"])
        s.lk_recv = _p_i64(a["lk_recv"])
        s.ib_head = _p_i64(a["ib_head"])
        s.ib_n = _p_i64(a["ib_n"])
        s.ib_data = _p_u8(a["ib_data"])
        s.ib_arr = _p_i64(a["ib_arr"])
        s.ob_data = _p_u8(a["ob_data"])
        s.ob_meta = _p_i64(a["ob_meta"])
        s.ob_n = _p_i64(a["ob_n"])
        s.IBC = a["ib_arr"].size // s.NL
        s.OBC = a["ob_meta"].size // 3
        return 0

    cdef int restart(self, State* s, object lowered) except -1:
        a = self.a
        a["lk_ready"][:] = -1
        for k in ("lk_busy", "lk_sent", "lk_recv", "ib_head", "ib_n", "ob_n"):
            a[k][:] = 0
        return 0

    cdef int check_shapes(self, State* s, dict arrays) except -1:
        Unit.check_shapes(self, s, arrays)
        if (arrays["ib_data"].size != arrays["ib_arr"].size * s.L or arrays["ib_arr"].size % s.NL
                or arrays["ib_arr"].size == 0
                or arrays["ob_data"].size * 3 != arrays["ob_meta"].size * s.L or arrays["ob_meta"].size < 3):
            raise _errors.SnapshotError("snapshot C2C buffers have inconsistent sizes")
        return 0

    cdef int validate(self, State* s, dict sc, dict arrays, object lowered) except -1:
        for k in ("lk_busy", "lk_sent", "lk_recv"):
            check_range(f"array {k!r}", arrays[k], 0, LIM)
        check_range("array 'lk_ready' (-1: never deskewed)", arrays["lk_ready"], -1, LIM)
        ibc = arrays["ib_arr"].size // s.NL
        obc = arrays["ob_meta"].size // 3
        check_range(f"array 'ib_head' (inbox ring of {ibc})", arrays["ib_head"], 0, ibc - 1)
        check_range(f"array 'ib_n' (inbox ring of {ibc})", arrays["ib_n"], 0, ibc)
        check_range("array 'ib_arr' (arrival cycle)", arrays["ib_arr"], 0, LIM)
        check_range(f"array 'ob_n' (outbox of {obc})", arrays["ob_n"], 0, obc)
        om = arrays["ob_meta"].reshape(-1, 3)[:int(arrays["ob_n"][0])]
        check_range("array 'ob_meta' link", om[:, 0], 0, s.NL - 1)
        check_range("array 'ob_meta' cycles", om[:, 1:], 0, LIM)
        return 0

    def counters(self):
        return {"c2c_sent": self.a["lk_sent"].copy(), "c2c_received": self.a["lk_recv"].copy()}

    cdef list take_outbox(self, State* s):
        """The vectors sent since the last call: a list of (link, send cycle, arrival cycle, bytes)."""
        a = self.a
        n = int(a["ob_n"][0])
        meta = a["ob_meta"].reshape(-1, 3)[:n]
        data = a["ob_data"].reshape(-1, s.L)[:n].copy()
        out = [(int(m[0]), int(m[1]), int(m[2]), data[i]) for i, m in enumerate(meta)]
        a["ob_n"][0] = 0
        return out

    cdef int deliver(self, State* s, link, arrival, vec) except -1:
        """``vec`` reaches ``link``'s inbox in cycle ``arrival`` (the same checks as the reference)."""
        link, arrival = int(link), int(arrival)
        if not 0 <= link < s.NL:
            raise _errors.LpuError(f"no link {link}: the chip has links 0..{s.NL - 1}")
        vec = np.asarray(vec, dtype=np.uint8).reshape(-1)
        if vec.shape[0] != s.L:
            raise _errors.LpuError(f"a link carries {s.L}-byte vectors, got {vec.shape[0]} bytes")
        if arrival < s.cycle:
            raise _errors.LpuError(f"a vector arriving in cycle {arrival} on link {link} comes too late: the chip is "
                                   f"already at cycle {s.cycle}")
        a = self.a
        n = int(a["ib_n"][link])
        if n:
            last = int(a["ib_arr"][link * s.IBC + (a["ib_head"][link] + n - 1) % s.IBC])
            if arrival < last:
                raise _errors.LpuError(f"link {link} delivers in order: arrival {arrival} is before the "
                                       f"previous {last}")
        if n == s.IBC:
            # a full ring doubles: a host may deliver any number of vectors ahead
            self.resize(s, 2 * s.IBC, s.OBC)
            self.bind(s)
        e = link * s.IBC + (a["ib_head"][link] + n) % s.IBC
        a["ib_data"].reshape(-1, s.L)[e] = vec
        a["ib_arr"][e] = arrival
        a["ib_n"][link] = n + 1
        return 0
