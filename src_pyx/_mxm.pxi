# The MXM, batched.  An ABC does not multiply anything when it issues: it copies
# its activation vector into the plane's batch ("stage A") with the accumulator,
# mode and landing cycle of its product.  The batch is multiplied in one matrix
# product (NumPy BLAS, in FastEngine._mxm_flush, outside this loop) only when it
# must be: before the plane's installed weights change, before an ACC reads an
# accumulator that a batched product lands in by then, when the batch is full, and
# at the end of the run.  Products wait in a FIFO ("stage B") and are added into
# the accumulators in landing order when an ACC (or the end) needs them.  So a
# weight set meeting a run of activations costs one BLAS call, while issue times,
# cycle counts and statistics stay those of the cycle-level model.

cdef inline int mxm_needs_flush(State* s, int q, int op, int64_t c) noexcept nogil:
    """1 if plane q's batch must be multiplied before this instruction can issue."""
    cdef int p = s.q_slot[q]
    cdef int n = s.mx_an[p]
    cdef int r
    if n == 0:
        return 0
    for r in range(s.RI):
        if s.mx_inst_T[p * s.RI + r] >= 0 and s.mx_inst_T[p * s.RI + r] <= c:
            return 1          # the weights the batch was computed with are about to change
    if op == OP_ABC and n == s.BMAX:
        return 1
    if op == OP_ACC and s.mx_aland[p * s.BMAX] <= c:
        return 1
    return 0


cdef inline void mxm_install(State* s, int p, int64_t c) noexcept nogil:
    """Make the installs effective by cycle c the plane's weights (oldest first)."""
    cdef int r, best
    cdef int64_t bt, T
    cdef int64_t RL2 = <int64_t>s.L * s.L
    while True:
        best = -1
        bt = INF
        for r in range(s.RI):
            T = s.mx_inst_T[p * s.RI + r]
            if T >= 0 and T <= c and T < bt:
                best = r
                bt = T
        if best < 0:
            return
        memcpy(s.mx_arr + p * RL2, s.mx_inst + (p * s.RI + best) * RL2, RL2)
        s.mx_arr_dt[p] = s.mx_inst_dt[p * s.RI + best]
        s.mx_ver[p] += 1
        s.mx_inst_T[p * s.RI + best] = -1


cdef inline void mxm_apply(State* s, int p, int64_t c) noexcept nogil:
    """Add the products landing by cycle c into the accumulators, in landing order."""
    cdef int64_t e, i
    cdef int l
    cdef uint32_t* acc
    cdef float* res
    cdef float r
    while s.mx_bn[p] > 0:
        e = p * s.BB + s.mx_bhead[p]
        if s.mx_bland[e] > c:
            return
        acc = s.mx_acc + (<int64_t>p * s.NACC + s.mx_bacc[e]) * s.L
        res = s.mx_bres + e * s.L
        if s.mx_bdt[e] == DT_INT8:
            # products are exact integers held in floats (below 2**24)
            if not s.mx_badd[e]:
                for l in range(s.L):
                    acc[l] = <uint32_t>(<int32_t>res[l])
            else:
                for l in range(s.L):
                    acc[l] = acc[l] + <uint32_t>(<int32_t>res[l])      # int32 wrap-around
        elif not s.mx_badd[e]:
            for l in range(s.L):
                r = res[l]
                acc[l] = 0 if r == 0.0 else lpu_f32_out(r)           # an exact zero is +0
        else:
            for l in range(s.L):
                r = res[l]
                acc[l] = lpu_f32_out(lpu_f32(acc[l]) + (0.0 if r == 0.0 else r))
        s.mx_bhead[p] = (s.mx_bhead[p] + 1) % s.BB
        s.mx_bn[p] -= 1


cdef inline int mxm_exec(State* s, int q, int op, int32_t* f, int64_t c) noexcept nogil:
    cdef int p = s.q_slot[q]
    cdef int pos = s.q_pos[q]
    cdef int i, dtc, n
    cdef int64_t RL2 = <int64_t>s.L * s.L
    cdef int64_t e, T, slot, macs
    cdef uint8_t* v
    cdef uint8_t* lo
    cdef uint8_t* hi
    cdef uint32_t* acc
    cdef float* xa
    mxm_install(s, p, c)
    if op == OP_LW:
        n = f[F_LW_N]
        for i in range(n):
            if stream_read(s, f[F_LW_SRC] + i, pos, c) == NULL:
                set_error(s, ERR_EMPTY, c, q, f[F_LW_SRC] + i, pos)
                return 1
        for i in range(n):
            v = stream_read(s, f[F_LW_SRC] + i, pos, c)
            memcpy(s.mx_buf + p * RL2 + <int64_t>(f[F_LW_ROW] + i) * s.L, v, s.L)
        return 0
    if op == OP_IW:
        T = c + s.mx_install_delay
        e = p * s.RI + (T % s.RI)
        s.mx_inst_T[e] = T
        s.mx_inst_dt[e] = f[F_IW_DTYPE]
        memcpy(s.mx_inst + e * RL2, s.mx_buf + p * RL2, RL2)
        effect(s, T)
        return 0
    if op == OP_ABC:
        dtc = f[F_ABC_DTYPE]
        if dtc == DT_FLOAT16 and c < s.mx_busy_until[p]:
            set_error(s, ERR_MXM, c, q, MXE_BUSY, 0)
            return 1
        if s.mx_arr_dt[p] < 0:
            set_error(s, ERR_MXM, c, q, MXE_EMPTY, 0)
            return 1
        if s.mx_arr_dt[p] != dtc:
            set_error(s, ERR_MXM, c, q, MXE_DTYPE, 0)
            return 1
        lo = stream_read(s, f[F_ABC_SRC], pos, c)
        if lo == NULL:
            set_error(s, ERR_EMPTY, c, q, f[F_ABC_SRC], pos)
            return 1
        hi = NULL
        if dtc == DT_FLOAT16:
            hi = stream_read(s, f[F_ABC_SRC] + 1, pos, c)
            if hi == NULL:
                set_error(s, ERR_EMPTY, c, q, f[F_ABC_SRC] + 1, pos)
                return 1
        e = p * s.BMAX + s.mx_an[p]
        # stage the activation as floats: the batch goes to BLAS without conversion
        xa = s.mx_ax + e * s.L
        if hi == NULL:
            for i in range(s.L):
                xa[i] = <float>(<int8_t>lo[i])
        else:
            for i in range(s.L // 2):
                xa[i] = lpu_h2f(<uint32_t>lo[i] | (<uint32_t>hi[i] << 8))
            for i in range(s.L // 2, s.L):
                xa[i] = 0.0
        T = c + s.mx_delay
        s.mx_aacc[e] = f[F_ABC_ACC]
        s.mx_aadd[e] = <uint8_t>f[F_ABC_ADD]
        s.mx_aland[e] = T
        s.mx_an[p] += 1
        effect(s, T)
        if dtc == DT_FLOAT16:
            macs = <int64_t>(s.L // 2) * s.L
            s.mx_busy[p] += s.mx_fp16_interval
            s.mx_busy_until[p] = c + s.mx_fp16_interval
        else:
            macs = <int64_t>s.L * s.L
            s.mx_busy[p] += 1
        s.mx_macs[p] += macs
        if c != s.mx_cycle:
            s.mx_cycle = c
            s.mx_cycle_macs = 0
        s.mx_cycle_macs += macs
        if s.mx_cycle_macs > s.mx_peak[0]:
            s.mx_peak[0] = s.mx_cycle_macs
        return 0
    # ACC: every product landing by c is in the accumulators (the loop made sure
    # the batch holding them was multiplied)
    mxm_apply(s, p, c)
    acc = s.mx_acc + (<int64_t>p * s.NACC + f[F_ACC_ACC]) * s.L
    T = c + s.mx_acc_delay
    for i in range(4):
        slot = pool_index(s, q, i, c)
        to_plane(s.L, acc, s.pool + slot * s.L, 8 * i)
        stream_write(s, f[F_ACC_DST] + i, pos, T, q, slot)
    effect(s, T)
    return 0
