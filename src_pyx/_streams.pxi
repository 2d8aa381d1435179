# Stream registers without moving any bytes.
#
# In direction-local coordinates x (x = position for east-flowing streams,
# x = P - 1 - position for west-flowing ones) a value written at (x0, cycle T)
# is seen at (x, T + x - x0) for x >= x0: it rides the diagonal k = T - x0.
# So each (direction, stream) keeps a ring of D diagonals; a diagonal holds the
# writes made onto it as segments sorted by start x (a later write further
# downstream overwrites the rest of the diagonal).  Reading (x, c) looks up
# diagonal c - x and takes the last segment starting at or before x.  A value
# leaves the die when its diagonal passes x = P - 1; D > P + max delay keeps a
# ring slot from being reused while any of its values can still be read.
# Vectors live in a pool addressed by (issue cycle mod D, queue, output stream),
# which is never reused within D cycles either.

cdef inline int64_t pool_index(State* s, int q, int plane, int64_t c) noexcept nogil:
    return (c & s.Dmask) * s.pool_w + s.q_pool[q] + plane


cdef inline uint8_t* stream_read(State* s, int v, int pos, int64_t c) noexcept nogil:
    """The vector passing position pos on stream v in cycle c, or NULL if none."""
    cdef int d = 0 if v < s.S else 1
    cdef int st = v - d * s.S
    cdef int64_t x = pos if d == 0 else s.P - 1 - pos
    cdef int64_t k = c - x
    cdef int64_t idx = (d * s.S + st) * s.D + (k & s.Dmask)
    if s.dg_tag[idx] != k:
        return NULL
    cdef int64_t base = idx * s.P
    cdef int i
    cdef uint8_t* vec
    for i in range(s.dg_n[idx] - 1, -1, -1):
        if s.sg_start[base + i] <= x:
            vec = s.pool + <int64_t>s.sg_pool[base + i] * s.L
            if s.bulk_rec:
                rec_stream_read(s, vec)
            return vec
    return NULL


cdef inline void stream_write(State* s, int v, int pos, int64_t T, int q, int64_t slot) noexcept nogil:
    """Queue q's vector in pool slot lands on stream v at position pos in cycle T."""
    cdef int d = 0 if v < s.S else 1
    cdef int st = v - d * s.S
    cdef int64_t x = pos if d == 0 else s.P - 1 - pos
    cdef int64_t k = T - x
    cdef int64_t idx = (d * s.S + st) * s.D + (k & s.Dmask)
    if s.dg_tag[idx] != k:
        s.dg_tag[idx] = k
        s.dg_n[idx] = 0
    cdef int64_t base = idx * s.P
    cdef int n = s.dg_n[idx]
    cdef int i = n
    cdef int j
    cdef int w
    while i > 0 and s.sg_start[base + i - 1] > x:
        i -= 1
    if i > 0 and s.sg_start[base + i - 1] == x:
        # two producers, one register, one cycle: raised when cycle T is reached
        w = s.sg_writer[base + i - 1]
        if q < w:
            s.sg_writer[base + i - 1] = q
            pend_error(s, T, 0, v, pos, q, w, ERR_STREAM_CONFLICT)
        else:
            pend_error(s, T, 0, v, pos, w, q, ERR_STREAM_CONFLICT)
        return
    j = n
    while j > i:
        s.sg_start[base + j] = s.sg_start[base + j - 1]
        s.sg_pool[base + j] = s.sg_pool[base + j - 1]
        s.sg_writer[base + j] = s.sg_writer[base + j - 1]
        j -= 1
    s.sg_start[base + i] = <int32_t>x
    s.sg_pool[base + i] = <int32_t>slot
    s.sg_writer[base + i] = q
    s.dg_n[idx] = n + 1


cdef class StreamsUnit(Unit):
    """Stream registers: the rings of diagonals of each (direction, stream) and the pool of
    vectors they point into."""

    def __init__(self):
        Unit.__init__(self, "streams", saved=("dg_tag", "dg_n", "sg_start", "sg_pool", "sg_writer", "pool"))

    cdef int alloc(self, State* s, object cfg, dict a) except -1:
        Unit.alloc(self, s, cfg, a)
        S, D, P = s.S, s.D, s.P
        a["dg_tag"] = np.empty(2 * S * D, dtype=np.int64)
        a["dg_n"] = np.zeros(2 * S * D, dtype=np.int32)
        for k in ("sg_start", "sg_pool", "sg_writer"):
            a[k] = np.zeros(2 * S * D * P, dtype=np.int32)
        # pool vectors per queue and cycle: the most streams one instruction of it writes
        width = {"MEM": 1, "VXM": 4, "MXM": 4, "SXM": max(16, cfg.lanes_per_superlane)}
        q_pool = np.zeros(s.NQ, dtype=np.int32)
        w = 0
        for q in cfg.queues:
            q_pool[q.index] = w
            w += width[q.unit]
        s.pool_w = w
        a["q_pool"] = q_pool
        a["pool"] = np.zeros(D * w * s.L, dtype=np.uint8)
        return 0

    cdef int bind(self, State* s) except -1:
        a = self.a
        s.dg_tag = _p_i64(a["dg_tag"])
        s.dg_n = _p_i32(a["dg_n"])
        s.sg_start = _p_i32(a["sg_start"])
        s.sg_pool = _p_i32(a["sg_pool"])
        s.sg_writer = _p_i32(a["sg_writer"])
        s.q_pool = _p_i32(a["q_pool"])
        s.pool = _p_u8(a["pool"])
        return 0

    cdef int restart(self, State* s, object lowered) except -1:
        self.a["dg_tag"][:] = np.iinfo(np.int64).min     # no diagonal: a tag no cycle matches
        self.a["dg_n"][:] = 0
        return 0

    cdef int validate(self, State* s, dict sc, dict arrays, object lowered) except -1:
        # segments of each diagonal sorted by start, pool slots and writers in range
        P = s.P
        dn = arrays["dg_n"]
        check_range("array 'dg_n' (segments on a diagonal)", dn, 0, P)
        segs = np.arange(P)[None, :] < dn[:, None]
        start = arrays["sg_start"].reshape(-1, P)
        check_range("array 'sg_start' (segment start)", start, 0, P - 1, where=segs)
        if P > 1 and not np.all((np.diff(start, axis=1) > 0) | ~segs[:, 1:]):
            raise _errors.SnapshotError("snapshot array 'sg_start' is not increasing along a diagonal")
        check_range("array 'sg_pool' (pool vector)", arrays["sg_pool"].reshape(-1, P), 0, s.D * s.pool_w - 1,
                    where=segs)
        check_range("array 'sg_writer' (queue)", arrays["sg_writer"].reshape(-1, P), 0, s.NQ - 1, where=segs)
        check_range("array 'dg_tag' (diagonal)", arrays["dg_tag"], -LIM, LIM, also=(np.iinfo(np.int64).min,))
        return 0
