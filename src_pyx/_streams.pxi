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
    for i in range(s.dg_n[idx] - 1, -1, -1):
        if s.sg_start[base + i] <= x:
            return s.pool + <int64_t>s.sg_pool[base + i] * s.L
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
