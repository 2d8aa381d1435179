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
