# The SXM: lane movement at the SXM's position, sxm_delay cycles from issue to
# result, with a per-hemisphere, per-cycle budget of each kind of unit.

cdef inline int sxm_exec(State* s, int q, int op, int32_t* f, int64_t c) noexcept nogil:
    cdef int pos = s.q_pos[q]
    cdef int hem = s.q_hem[q]
    cdef int res = s.sx_res[op]
    cdef int L = s.L
    cdef int LPS = s.LPS
    cdef int i, j, ln, k, n, m, nin, nout
    cdef int64_t T = c + s.sx_delay
    cdef int64_t slot
    cdef uint8_t* out
    cdef uint8_t* x
    cdef uint8_t* y
    cdef uint8_t* mp
    cdef uint8_t* mp2
    if c != s.sx_cycle:
        s.sx_cycle = c
        for i in range(2 * N_RESOURCES):
            s.sx_use[i] = 0
    if s.sx_use[hem * N_RESOURCES + res] >= s.sx_limit[res]:
        set_error(s, ERR_RESOURCE, c, q, res, 0)
        return 1
    s.sx_use[hem * N_RESOURCES + res] += 1
    # operands, in table field order
    if op == OP_ROTATE:
        nin = f[F_ROTATE_N]
        for i in range(nin):
            s.sx_in[i] = stream_read(s, f[F_ROTATE_SRC] + i, pos, c)
            if s.sx_in[i] == NULL:
                set_error(s, ERR_EMPTY_READ, c, q, f[F_ROTATE_SRC] + i, pos)
                return 1
    elif op == OP_TRANSPOSE:
        for i in range(LPS):
            s.sx_in[i] = stream_read(s, f[F_TRANSPOSE_SRC] + i, pos, c)
            if s.sx_in[i] == NULL:
                set_error(s, ERR_EMPTY_READ, c, q, f[F_TRANSPOSE_SRC] + i, pos)
                return 1
    elif op == OP_SXM_SELECT:
        for i in range(3):
            k = f[1 + i]
            s.sx_in[i] = stream_read(s, k, pos, c)
            if s.sx_in[i] == NULL:
                set_error(s, ERR_EMPTY_READ, c, q, k, pos)
                return 1
    else:
        # Shift (dst, src, n), Permute (dst, src, map), Distribute (dst, src, map)
        s.sx_in[0] = stream_read(s, f[1], pos, c)
        if s.sx_in[0] == NULL:
            set_error(s, ERR_EMPTY_READ, c, q, f[1], pos)
            return 1
        if op == OP_PERMUTE or op == OP_DISTRIBUTE:
            s.sx_in[1] = stream_read(s, f[2], pos, c)
            if s.sx_in[1] == NULL:
                set_error(s, ERR_EMPTY_READ, c, q, f[2], pos)
                return 1
            if op == OP_PERMUTE:
                s.sx_in[2] = stream_read(s, f[2] + 1, pos, c)
                if s.sx_in[2] == NULL:
                    set_error(s, ERR_EMPTY_READ, c, q, f[2] + 1, pos)
                    return 1
    # results
    if op == OP_ROTATE:
        nin = f[F_ROTATE_N]
        for i in range(nin):
            x = s.sx_in[i]
            for j in range(nin):
                slot = pool_index(s, q, i * nin + j, c)
                out = s.pool + slot * L
                # circular rotation by j lanes towards higher lanes
                memcpy(out + j, x, L - j)
                memcpy(out, x + L - j, j)
                stream_write(s, f[F_ROTATE_DST] + i * nin + j, pos, T, q, slot)
    elif op == OP_TRANSPOSE:
        for j in range(LPS):
            slot = pool_index(s, q, j, c)
            out = s.pool + slot * L
            for k in range(L // LPS):
                for i in range(LPS):
                    out[k * LPS + i] = s.sx_in[i][k * LPS + j]
            stream_write(s, f[F_TRANSPOSE_DST] + j, pos, T, q, slot)
    else:
        slot = pool_index(s, q, 0, c)
        out = s.pool + slot * L
        x = s.sx_in[0]
        if op == OP_SHIFT:
            n = f[F_SHIFT_N]
            memset(out, 0, L)
            if n >= 0:
                memcpy(out + n, x, L - n)
            else:
                memcpy(out, x - n, L + n)
        elif op == OP_PERMUTE:
            mp = s.sx_in[1]
            mp2 = s.sx_in[2]
            for ln in range(L):
                m = mp[ln] | (mp2[ln] << 8)
                if m >= 32768:
                    m -= 65536
                out[ln] = x[m] if 0 <= m < L else 0
        elif op == OP_DISTRIBUTE:
            mp = s.sx_in[1]
            for ln in range(L):
                m = mp[ln]
                out[ln] = x[(ln // LPS) * LPS + m] if m < LPS else 0
        else:
            # Select (dst, a, b, m)
            y = s.sx_in[1]
            mp = s.sx_in[2]
            for ln in range(L):
                out[ln] = x[ln] if mp[ln] != 0 else y[ln]
        stream_write(s, f[0], pos, T, q, slot)
    effect(s, T)
    return 0


cdef class SxmUnit(Unit):
    """The SXM: the resource each opcode takes, the units of each resource per hemisphere, and
    how many are in use in the current cycle."""

    def __init__(self):
        Unit.__init__(self, "SXM", saved=("sx_use",), scalars=("sx_cycle",))

    cdef int alloc(self, State* s, object cfg, dict a) except -1:
        Unit.alloc(self, s, cfg, a)
        s.sx_delay = cfg.sxm_delay
        sx_res = np.zeros(256, dtype=np.int32)
        for op in _isa.TABLE:
            if op.unit == "SXM":
                sx_res[op.opcode] = _isa.SXM_RESOURCES.index(op.resource)
        a["sx_res"] = sx_res
        a["sx_limit"] = np.array([getattr(cfg, "sxm_" + r) for r in _isa.SXM_RESOURCES], dtype=np.int32)
        a["sx_use"] = np.zeros(2 * N_RESOURCES, dtype=np.int32)
        return 0

    cdef int bind(self, State* s) except -1:
        s.sx_res = _p_i32(self.a["sx_res"])
        s.sx_limit = _p_i32(self.a["sx_limit"])
        s.sx_use = _p_i32(self.a["sx_use"])
        return 0

    cdef int restart(self, State* s, object lowered) except -1:
        self.a["sx_use"][:] = 0
        s.sx_cycle = -1
        return 0

    cdef dict get_scalars(self, State* s):
        return {"sx_cycle": s.sx_cycle}

    cdef int set_scalars(self, State* s, dict sc) except -1:
        s.sx_cycle = sc["sx_cycle"]
        return 0

    cdef int validate(self, State* s, dict sc, dict arrays, object lowered) except -1:
        check_range("scalar sx_cycle", sc["sx_cycle"], -1, LIM)
        check_range("array 'sx_use' (units in use)", arrays["sx_use"], 0, 2 ** 31 - 1)
        return 0
