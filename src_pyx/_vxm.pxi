# The VXM: one ALU per queue.  Operands are read in the issue cycle (streams at
# the VXM's position, or ALU latches); the result lands in the ALU's latch and
# on its destination stream group after the op's delay.  Latch results wait in a
# small ring per ALU and are applied lazily, in landing order.  The semantic
# classes of VXM opcodes (VC_ARITH, ..., the vx_cls table) are generated
# (_isa_gen.pxi) from lpucore.isa.VXM_CLASSES.


cdef inline void latch_sync(State* s, int k, int64_t c) noexcept nogil:
    cdef int r, best
    cdef int64_t bt, tag
    while True:
        best = -1
        bt = INF
        for r in range(s.RL):
            tag = s.lt_tag[k * s.RL + r]
            if tag >= 0 and tag <= c and tag < bt:
                best = r
                bt = tag
        if best < 0:
            return
        memcpy(s.latch + <int64_t>k * s.L, s.lt_bits + (<int64_t>k * s.RL + best) * s.L, s.L * sizeof(uint32_t))
        s.latch_valid[k] = 1
        s.lt_tag[k * s.RL + best] = -1


# byte plane shift / 8 of n 32-bit lanes, and back (first: set the lanes, else or into them)
cdef extern from "lpu_kernels.h" nogil:
    void lpu_to_plane(int n, const uint32_t* bits, uint8_t* out, int shift)
    void lpu_from_plane(int n, const uint8_t* p, uint32_t* out, int shift, int first)


cdef inline int vxm_operand(State* s, int q, int v, int dtc, int64_t c, uint32_t* out) noexcept nogil:
    """Raw bits of one source operand into out[L]; 1 (error set) if it holds no value."""
    cdef int pos = s.q_pos[q]
    cdef int k, i, ln
    cdef uint32_t m
    cdef uint8_t* p
    cdef const uint32_t* lat
    cdef int n = s.L
    if v >= LATCH_BASE:
        k = v - LATCH_BASE
        latch_sync(s, k, c)
        if not s.latch_valid[k]:
            set_error(s, ERR_EMPTY_READ, c, q, v, pos)
            return 1
        m = dt_mask(dtc)
        lat = s.latch + <int64_t>k * n      # a local pointer and count, so the loop vectorises
        for ln in range(n):
            out[ln] = lat[ln] & m
        return 0
    for i in range(dt_bytes(dtc)):
        p = stream_read(s, v + i, pos, c)
        if p == NULL:
            set_error(s, ERR_EMPTY_READ, c, q, v + i, pos)
            return 1
        lpu_from_plane(s.L, p, out, 8 * i, i == 0)
    return 0


cdef inline void vxm_float_binary(State* s, int op, int n) noexcept nogil:
    cdef int ln
    cdef float* a = s.fa
    cdef float* b = s.fb
    cdef float* r = s.fr
    if op == OP_ADD:
        for ln in range(n):
            r[ln] = a[ln] + b[ln]
    elif op == OP_SUB:
        for ln in range(n):
            r[ln] = a[ln] - b[ln]
    elif op == OP_MUL:
        for ln in range(n):
            r[ln] = a[ln] * b[ln]
    elif op == OP_DIV:
        for ln in range(n):
            r[ln] = lpu_div(a[ln], b[ln])
    elif op == OP_MIN:
        for ln in range(n):
            r[ln] = lpu_fmin(a[ln], b[ln])
    elif op == OP_MAX:
        for ln in range(n):
            r[ln] = lpu_fmax(a[ln], b[ln])


cdef inline void vxm_bits(int op, int n, uint32_t* a, uint32_t* b, uint32_t* r, uint32_t m) noexcept nogil:
    cdef int ln
    if op == OP_AND:
        for ln in range(n):
            r[ln] = (a[ln] & b[ln]) & m
    elif op == OP_OR:
        for ln in range(n):
            r[ln] = (a[ln] | b[ln]) & m
    elif op == OP_XOR:
        for ln in range(n):
            r[ln] = (a[ln] ^ b[ln]) & m
    elif op == OP_NOT:
        for ln in range(n):
            r[ln] = (~a[ln]) & m
    else:
        for ln in range(n):
            r[ln] = a[ln] & m


cdef inline void vxm_wrap_binary(int op, int n, uint32_t* a, uint32_t* b, uint32_t* r, uint32_t m) noexcept nogil:
    cdef int ln
    if op == OP_ADD:
        for ln in range(n):
            r[ln] = (a[ln] + b[ln]) & m
    elif op == OP_SUB:
        for ln in range(n):
            r[ln] = (a[ln] - b[ln]) & m
    else:
        for ln in range(n):
            r[ln] = (a[ln] * b[ln]) & m


cdef inline void vxm_int_binary(State* s, int op, int n, int bits) noexcept nogil:
    cdef int ln
    cdef int64_t* a = s.ia
    cdef int64_t* b = s.ib
    cdef int64_t* r = s.ir
    if op == OP_ADD:
        for ln in range(n):
            r[ln] = a[ln] + b[ln]
    elif op == OP_SUB:
        for ln in range(n):
            r[ln] = a[ln] - b[ln]
    elif op == OP_MUL:
        for ln in range(n):
            r[ln] = a[ln] * b[ln]
    elif op == OP_MIN:
        for ln in range(n):
            r[ln] = a[ln] if a[ln] < b[ln] else b[ln]
    elif op == OP_MAX:
        for ln in range(n):
            r[ln] = a[ln] if a[ln] > b[ln] else b[ln]
    elif op == OP_SHL:
        for ln in range(n):
            r[ln] = <int64_t>((<uint64_t>a[ln]) << (s.tb[ln] & (bits - 1)))
    elif op == OP_SHR:
        for ln in range(n):
            r[ln] = a[ln] >> (s.tb[ln] & (bits - 1))


cdef inline void vxm_compare(State* s, int op, int dtc) noexcept nogil:
    cdef int ln, t
    cdef int n = s.L
    cdef uint32_t m = dt_mask(dtc)
    if dt_float(dtc):
        load_f(n, s.ta, s.fa, dtc)
        load_f(n, s.tb, s.fb, dtc)
        for ln in range(n):
            if op == OP_EQ:
                t = s.fa[ln] == s.fb[ln]
            elif op == OP_NE:
                t = s.fa[ln] != s.fb[ln]
            elif op == OP_LT:
                t = s.fa[ln] < s.fb[ln]
            elif op == OP_LE:
                t = s.fa[ln] <= s.fb[ln]
            elif op == OP_GT:
                t = s.fa[ln] > s.fb[ln]
            else:
                t = s.fa[ln] >= s.fb[ln]
            s.tr[ln] = m if t else 0
    else:
        load_i(n, s.ta, s.ia, dtc)
        load_i(n, s.tb, s.ib, dtc)
        for ln in range(n):
            if op == OP_EQ:
                t = s.ia[ln] == s.ib[ln]
            elif op == OP_NE:
                t = s.ia[ln] != s.ib[ln]
            elif op == OP_LT:
                t = s.ia[ln] < s.ib[ln]
            elif op == OP_LE:
                t = s.ia[ln] <= s.ib[ln]
            elif op == OP_GT:
                t = s.ia[ln] > s.ib[ln]
            else:
                t = s.ia[ln] >= s.ib[ln]
            s.tr[ln] = m if t else 0


cdef inline void vxm_unary(State* s, int op, int dtc) noexcept nogil:
    cdef int ln
    cdef int n = s.L
    cdef float x
    if dt_float(dtc):
        load_f(n, s.ta, s.fa, dtc)
        for ln in range(n):
            x = s.fa[ln]
            if op == OP_NEG:
                s.fr[ln] = -x
            elif op == OP_ABS:
                s.fr[ln] = fabsf(x)
            elif op == OP_RELU:
                s.fr[ln] = lpu_relu(x)
            elif op == OP_EXP:
                s.fr[ln] = lpu_exp(x)
            elif op == OP_TANH:
                s.fr[ln] = lpu_tanh(x)
            elif op == OP_SIGMOID:
                s.fr[ln] = lpu_sigmoid(x)
            elif op == OP_RSQRT:
                s.fr[ln] = lpu_rsqrt(x)
            elif op == OP_RECIP:
                s.fr[ln] = lpu_recip(x)
            else:
                s.fr[ln] = sqrtf(x)
        store_f(n, s.fr, s.tr, dtc)
    else:
        load_i(n, s.ta, s.ia, dtc)
        for ln in range(n):
            if op == OP_NEG:
                s.ir[ln] = -s.ia[ln]
            elif op == OP_ABS:
                s.ir[ln] = -s.ia[ln] if s.ia[ln] < 0 else s.ia[ln]
            else:
                s.ir[ln] = s.ia[ln] if s.ia[ln] > 0 else 0
        store_i(n, s.ir, s.tr, dtc)


cdef inline void vxm_convert(State* s, int src, int to) noexcept nogil:
    cdef int ln
    cdef int n = s.L
    cdef int64_t lo, hi, v
    cdef int bits
    if src == to:
        for ln in range(n):
            s.tr[ln] = s.ta[ln] & dt_mask(to)
    elif not dt_float(src) and not dt_float(to):
        load_i(n, s.ta, s.ia, src)
        bits = 8 * dt_bytes(to)
        hi = (<int64_t>1 << (bits - 1)) - 1
        lo = -hi - 1
        for ln in range(n):
            v = s.ia[ln]
            s.ir[ln] = lo if v < lo else (hi if v > hi else v)
        store_i(n, s.ir, s.tr, to)
    elif dt_float(src) and dt_float(to):
        load_f(n, s.ta, s.fa, src)
        store_f(n, s.fa, s.tr, to)
    elif not dt_float(src):
        load_i(n, s.ta, s.ia, src)
        for ln in range(n):
            s.fr[ln] = <float>s.ia[ln]
        store_f(n, s.fr, s.tr, to)
    else:
        load_f(n, s.ta, s.fa, src)
        bits = 8 * dt_bytes(to)
        for ln in range(n):
            s.ir[ln] = lpu_f2i(s.fa[ln], bits)
        store_i(n, s.ir, s.tr, to)


cdef inline int vxm_compute(State* s, int q, int op, int cls, int nsrc, int32_t* f, int64_t c,
                            int* dst_out, int* dt_out) noexcept nogil:
    """Read the operands and compute the result bits into s.tr; 1 on error."""
    cdef int n = s.L
    cdef int dtc, out_dt, dst, ln
    cdef uint32_t m
    # ---- operands, in table field order ----
    if cls == VC_SELECT:
        dtc = f[F_VXM_SELECT_DTYPE]
        out_dt = dtc
        dst = f[F_VXM_SELECT_DST]
        if vxm_operand(s, q, f[F_VXM_SELECT_M], dtc, c, s.tm) or vxm_operand(s, q, f[F_VXM_SELECT_A], dtc, c, s.ta) \
                or vxm_operand(s, q, f[F_VXM_SELECT_B], dtc, c, s.tb):
            return 1
        m = dt_mask(dtc)
        for ln in range(n):
            s.tr[ln] = (s.ta[ln] if (s.tm[ln] & m) != 0 else s.tb[ln]) & m
    elif cls == VC_CVT:
        dtc = f[F_CVT_DTYPE]
        out_dt = f[F_CVT_TO]
        dst = f[F_CVT_DST]
        if vxm_operand(s, q, f[F_CVT_A], dtc, c, s.ta):
            return 1
        vxm_convert(s, dtc, out_dt)
    elif cls == VC_REQUANT:
        dtc = DT_INT32
        out_dt = DT_INT8
        dst = f[F_REQUANT_DST]
        if vxm_operand(s, q, f[F_REQUANT_A], dtc, c, s.ta):
            return 1
        load_i(n, s.ta, s.ia, DT_INT32)
        for ln in range(n):
            s.ir[ln] = lpu_requant(s.ia[ln], f[F_REQUANT_MULT], f[F_REQUANT_SHIFT], f[F_REQUANT_ZP])
        store_i(n, s.ir, s.tr, DT_INT8)
    elif cls == VC_CONST:
        dtc = f[F_CONST_DTYPE]
        out_dt = dtc
        dst = f[F_CONST_DST]
        m = dt_mask(dtc) & <uint32_t>f[F_CONST_VALUE]
        for ln in range(n):
            s.tr[ln] = m
    else:
        # (dtype, dst, a[, b]) layouts
        dtc = f[F_ADD_DTYPE]
        out_dt = dtc
        dst = f[F_ADD_DST]
        if vxm_operand(s, q, f[F_ADD_A], dtc, c, s.ta):
            return 1
        if nsrc == 2 and vxm_operand(s, q, f[F_ADD_B], dtc, c, s.tb):
            return 1
        m = dt_mask(dtc)
        if cls == VC_BITS:
            vxm_bits(op, n, s.ta, s.tb, s.tr, m)
        elif cls == VC_CMP:
            vxm_compare(s, op, dtc)
        elif cls == VC_UNARY or cls == VC_TRANS:
            vxm_unary(s, op, dtc)
        elif dt_float(dtc):
            load_f(n, s.ta, s.fa, dtc)
            load_f(n, s.tb, s.fb, dtc)
            vxm_float_binary(s, op, n)
            store_f(n, s.fr, s.tr, dtc)
        elif op == OP_ADD or op == OP_SUB or op == OP_MUL:
            # two's-complement wrap-around needs no sign extension
            vxm_wrap_binary(op, n, s.ta, s.tb, s.tr, m)
        else:
            load_i(n, s.ta, s.ia, dtc)
            load_i(n, s.tb, s.ib, dtc)
            vxm_int_binary(s, op, n, 8 * dt_bytes(dtc))
            store_i(n, s.ir, s.tr, dtc)
    dst_out[0] = dst
    dt_out[0] = out_dt
    return 0


cdef inline int vxm_exec(State* s, int q, int op, int cls, int nsrc, int32_t* f, int64_t c) noexcept nogil:
    cdef int alu = s.q_slot[q]
    cdef int pos = s.q_pos[q]
    cdef int n = s.L
    cdef int out_dt, dst, i, rc, conflict
    cdef int64_t T = c + s.lat[op]
    cdef int64_t e, slot
    # The result is computed straight into its slot of the ALU's pending-result
    # ring (or into scratch if that slot already holds a result for cycle T).
    latch_sync(s, alu, c)
    e = alu * s.RL + (T % s.RL)
    conflict = s.lt_tag[e] == T
    if not conflict:
        s.tr = s.lt_bits + e * s.L
    rc = vxm_compute(s, q, op, cls, nsrc, f, c, &dst, &out_dt)
    s.tr = s.tr0
    if rc:
        return 1
    if conflict:
        pend_error(s, T, 1, alu, 0, 0, 0, ERR_LATCH_CONFLICT)
    else:
        s.lt_tag[e] = T
    if dst != SRC_NONE:
        for i in range(dt_bytes(out_dt)):
            slot = pool_index(s, q, i, c)
            lpu_to_plane(n, s.tr0 if conflict else s.lt_bits + e * s.L, s.pool + slot * s.L, 8 * i)
            stream_write(s, dst + i, pos, T, q, slot)
    effect(s, T)
    return 0


cdef class VxmUnit(Unit):
    """The VXM: ALU latches and their pending results, the opcode class tables, scratch vectors."""

    def __init__(self):
        Unit.__init__(self, "VXM", saved=("latch", "latch_valid", "lt_tag", "lt_bits"))

    cdef int alloc(self, State* s, object cfg, dict a) except -1:
        Unit.alloc(self, s, cfg, a)
        L = s.L
        # a result lands at most the longest VXM delay after its issue: one ring entry per cycle
        s.RL = max(op.delay(cfg) for op in _isa.TABLE if op.unit == "VXM") + 1
        a["latch"] = np.zeros(s.NALU * L, dtype=np.uint32)
        a["latch_valid"] = np.zeros(s.NALU, dtype=np.uint8)
        a["lt_tag"] = np.empty(s.NALU * s.RL, dtype=np.int64)
        a["lt_bits"] = np.zeros(s.NALU * s.RL * L, dtype=np.uint32)
        for k in ("ta", "tb", "tm", "tr"):
            a[k] = np.zeros(L, dtype=np.uint32)
        for k in ("fa", "fb", "fr"):
            a[k] = np.zeros(L, dtype=np.float32)
        for k in ("ia", "ib", "ir"):
            a[k] = np.zeros(L, dtype=np.int64)
        vx_cls = np.zeros(256, dtype=np.int32)
        vx_nsrc = np.zeros(256, dtype=np.int32)
        for op in _isa.TABLE:
            if op.unit == "VXM":
                vx_cls[op.opcode] = _isa.VXM_CLASS_CODE[op.cls]     # VC_* (generated from the same table)
                vx_nsrc[op.opcode] = sum(1 for f in op.fields if f.kind == "src")
        a["vx_cls"], a["vx_nsrc"] = vx_cls, vx_nsrc
        return 0

    cdef int bind(self, State* s) except -1:
        a = self.a
        s.latch = _p_u32(a["latch"])
        s.latch_valid = _p_u8(a["latch_valid"])
        s.lt_tag = _p_i64(a["lt_tag"])
        s.lt_bits = _p_u32(a["lt_bits"])
        s.vx_cls = _p_i32(a["vx_cls"])
        s.vx_nsrc = _p_i32(a["vx_nsrc"])
        s.ta = _p_u32(a["ta"])
        s.tb = _p_u32(a["tb"])
        s.tm = _p_u32(a["tm"])
        s.tr0 = _p_u32(a["tr"])
        s.tr = s.tr0
        s.fa = _p_f32(a["fa"])
        s.fb = _p_f32(a["fb"])
        s.fr = _p_f32(a["fr"])
        s.ia = _p_i64(a["ia"])
        s.ib = _p_i64(a["ib"])
        s.ir = _p_i64(a["ir"])
        return 0

    cdef int restart(self, State* s, object lowered) except -1:
        self.a["latch_valid"][:] = 0
        self.a["lt_tag"][:] = -1
        return 0

    cdef int validate(self, State* s, dict sc, dict arrays, object lowered) except -1:
        check_range("array 'latch_valid'", arrays["latch_valid"], 0, 1)
        check_range("array 'lt_tag' (landing cycle, -1: free)", arrays["lt_tag"], -1, LIM)
        return 0
