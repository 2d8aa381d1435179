# The whole machine state of the fast engine, as one C struct of scalars and
# pointers into NumPy arrays owned by the FastEngine object.  Everything the
# per-cycle loop touches is reachable from here without the GIL.

cdef enum:
    # per-queue state, int64 qs[NQ * QW]
    Q_PC = 0          # next row of code to fetch
    Q_END = 1         # one past the queue's last row
    Q_REPLEFT = 2     # repetitions still to issue
    Q_REPK = 3        # repetitions issued so far
    Q_REPD = 4        # cycles between repetitions
    Q_REPSTRIDE = 5   # address stride per repetition
    Q_REPROW = 6      # row of the repeated instruction
    Q_SYNCS = 7       # Syncs issued by this queue
    Q_WAIT = 8        # Notify number this queue is parked on (0: not parked)
    Q_SYNCC = 9       # cycle of the parked Sync
    QW = 10

cdef enum:
    # NR: activation staging buffers per MXM plane: a helper job reads one while the plane's
    # next batches fill the others
    NR = 3
    HELPER_JOBS = 8   # helper-thread jobs in flight at most

# The error record, int64 err[8] (and the pending landing error perr[8]): its field
# indices E_*, kind codes ERR_* and reasons MXE_* are generated (_isa_gen.pxi) from
# lpucore.errors (ERROR_RECORD, ENGINE_ERRORS, MXM_WHY).

cdef int64_t INF = 0x7FFFFFFFFFFFFFFF

cdef enum:
    # what a bulk run reads of each of its Reads (_bulk.pxi), in rd_gomem (int32, 20 bytes an
    # entry; where a run starts, it reads rd_run, rd_cycle and rd_runlw)
    GM_SRC = 0        # rd_src
    GM_ROW = 1        # rd_row
    GM_DLW = 2        # rd_lwc - rd_cycle: its LW's cycle after its own
    GM_ROW2 = 3       # rd_row2
    GM_DLW2 = 4       # rd_lwc2 - rd_cycle, -1: no second LW
    GM_W = 5


cdef struct State:
    # geometry and timing
    int L            # lanes (bytes per vector)
    int SL           # superlanes
    int LPS          # lanes per superlane
    int S            # streams per direction
    int P            # stream-register positions
    int NQ           # queues
    int NSL          # MEM slices
    int A            # addresses per slice
    int NALU         # VXM ALUs
    int bank_msb
    int bank_div
    int nbanks
    int d_read
    int d_write
    int notify_delay
    int stagger
    int D            # diagonal ring size (power of two)
    int Dmask
    int RW           # pending-write ring entries per slice
    int RL           # pending-result ring entries per ALU
    # program
    int32_t* code    # [rows * (1 + NFIELDS)]
    int32_t* lat     # [256] delay per opcode
    int32_t* strided  # [256] bit mask of fields Repeat strides
    int32_t* vx_cls  # [256] VXM semantic class (VC_* in _vxm.pxi)
    int32_t* vx_nsrc  # [256] source operands of the (dtype, dst, a[, b]) layouts
    # queues
    int64_t* qs      # [NQ * QW]
    # qn: [NQ] cycle of each queue's next issue (INF: parked or done); apart from qs so that the
    # loop's per-cycle scan of all queues reads one short array
    int64_t* qn
    int32_t* qf      # [NQ * NFIELDS] operand fields of each queue's current instruction
    int32_t* q_unit
    int32_t* q_pos
    int32_t* q_slice
    int32_t* q_slot
    int32_t* q_hem
    int32_t* q_pool  # first pool vector of each queue within a cycle's pool row
    int pool_w       # pool vectors per cycle (sum over queues of their widest write)
    # MEM
    uint8_t* sram    # [NSL * A * L]
    int64_t* wr_tag  # [NSL * RW] landing cycle of a pending write, -1 if free
    int32_t* wr_addr  # [NSL * RW * SL]
    uint8_t* wr_data  # [NSL * RW * L] the vectors to write
    uint8_t* wr_uniform  # [NSL * RW] 1 if every superlane writes the same address
    # streams: one ring of diagonals per (direction, stream); see _streams.pxi
    int64_t* dg_tag  # [2 * S * D]
    int32_t* dg_n    # [2 * S * D]
    int32_t* sg_start   # [2 * S * D * P]
    int32_t* sg_pool
    int32_t* sg_writer
    uint8_t* pool    # [D * NQ * 4 * L]
    # VXM latches
    uint32_t* latch  # [NALU * L]
    uint8_t* latch_valid
    int64_t* lt_tag  # [NALU * RL]
    uint32_t* lt_bits   # [NALU * RL * L]
    # MXM (see _mxm.pxi): planes, weight buffers and arrays, accumulators, batches
    int NP           # planes
    int NACC         # accumulators per plane
    int RI           # pending-install ring entries per plane
    int BMAX         # batch (stage A) rows per plane
    int BB           # product FIFO (stage B) rows per plane
    int mx_install_delay
    int mx_delay
    int mx_acc_delay
    int mx_fp16_interval
    # Weight matrices live in NS = RI + 2 slots per plane, and the weight buffer, the
    # pending installs and the installed weights are slot numbers, so that IW and an
    # install move no bytes: a slot is immutable from its IW until no one refers to it.
    # The buffer is copy-on-write per row: row r's current bytes are in slot
    # mx_row_src[r], which is the buffer's slot or the slot last handed to an IW.
    int NS
    uint8_t* mx_slots    # [NP * NS * L * L]
    int32_t* mx_buf_slot  # [NP] slot LW writes into
    int32_t* mx_row_src  # [NP * L]
    int32_t* mx_arr_slot  # [NP] installed weights, -1 if none
    int32_t* mx_arr_dt   # [NP] their dtype, -1 if none
    int64_t* mx_ver      # [NP] installs so far (keys the host's cache of the weights as floats)
    int32_t* mx_inst_slot  # [NP * RI] pending installs
    int64_t* mx_inst_T   # [NP * RI] their effective cycle, -1 if free
    int32_t* mx_inst_dt
    uint32_t* mx_acc     # [NP * NACC * L]
    float* mx_ax         # [NP * NR * BMAX * L] batched activations, as floats (a ring of NR per plane)
    int32_t* mx_aacc
    uint8_t* mx_aadd
    int64_t* mx_aland
    int32_t* mx_an       # [NP] rows in the batch
    float* mx_bres       # [NP * BB * L] products waiting to land
    int32_t* mx_bacc
    uint8_t* mx_badd
    int64_t* mx_bland
    int32_t* mx_bdt
    int32_t* mx_bhead    # [NP]
    int32_t* mx_bn       # [NP]
    int64_t* mx_busy_until
    int64_t* mx_macs
    int64_t* mx_busy
    int64_t* mx_peak     # [1] most MACs started in one cycle
    int64_t mx_cycle
    int64_t mx_cycle_macs
    int flush_plane      # plane whose batch the Python side must multiply (run_until returned 3)
    int small_rows       # batches of at most this many rows are multiplied in the loop (0: never)
    int fp16_exact       # 1: fp16 products exact and rounded once (fp16_mxm="exact"); 0: "fp32" mode
    int64_t mx_cbatches  # batches multiplied in the loop
    int64_t mx_hbatches  # of which handed to the helper thread
    int64_t* mx_wchk     # [NP] install version whose fp16 weights were checked for inf/NaN, -1: none
    uint8_t* mx_wbad     # [NP] 1 if those weights hold an inf or a NaN
    uint8_t* mx_wconv    # [NP] 1 if mx_wd holds them as float64
    double* mx_wd        # [NP * L/2 * L] fp16 weights as float64 (cache)
    int32_t* mx_si       # [max(L, AVX2 scratch)] scratch: int8 dot products, the AVX2 kernel's activations
    double* mx_sd        # [4 * 2 * L] scratch: fp16 dot products and their sums of |products| (four rows)
    uint8_t* mx_xb       # [NP * NR * (BMAX + 8) * L + 4] batched int8 activations as offset bytes (x ^ 0x80)
    int32_t* mx_xbuf     # [NP] the ring buffer (of mx_ax and mx_xb) the plane's batch is staged in
    int64_t* mx_rseq     # [NP * NR] last helper job reading each ring buffer (submission number, -1: none)
    int64_t* mx_sseq     # [NP * NS] last helper job reading each weight slot
    int simd             # the MXM kernel (KERNEL_* in _mxm.pxi): 0 portable, 1 AVX-512, 2 AVX2
    int8_t* mx_wp        # [NP * packed bytes] installed int8 weights in the running kernel's layout (cache)
    int32_t* mx_wcorr    # [NP * 64 * blocks] 128 x their column sums
    int64_t* mx_wpver    # [NP] install version mx_wp holds, -1: none
    int64_t mx_wpstride  # bytes of mx_wp per plane
    float* mx_wf         # [NP * L/2 * 64 * blocks] installed fp16 weights as float32 (fp32 mode, cache)
    int64_t* mx_wfver    # [NP] install version mx_wf holds, -1: none
    int32_t* mx_wfext    # [NP * 2] 1 + last nonzero weight row, 1 + last nonzero column
    void* jobs           # lpu_pool* (lpu_jobs.h): the helper thread's jobs
    int helper           # 1: big batches go to the helper thread
    int32_t* mx_bjob     # [NP * BB] job filling a FIFO row, -1: filled
    int64_t* mx_bseq     # [NP * BB] that job's submission number
    # SXM
    int32_t* sx_res      # [256] resource of each SXM opcode
    int32_t* sx_limit    # [N_RESOURCES] units per hemisphere
    int32_t* sx_use      # [2 * N_RESOURCES] units in use in cycle sx_cycle
    int64_t sx_cycle
    int sx_delay
    uint8_t* sx_in[64]
    # C2C (see _c2c.pxi)
    int NL               # links
    int64_t c2c_interval     # cycles per vector on one link (up to lanes x clock_hz: > 2**31)
    int c2c_latency
    int c2c_receive_delay
    int c2c_deskew_delay
    int64_t* lk_busy     # [NL] first cycle the link takes a new Send
    int64_t* lk_ready    # [NL] first cycle after the last Deskew, -1: never deskewed
    int64_t* lk_sent     # [NL] vectors sent
    int64_t* lk_recv     # [NL] vectors received
    int64_t IBC          # inbox ring entries per link
    uint8_t* ib_data     # [NL * IBC * L]
    int64_t* ib_arr      # [NL * IBC] arrival cycles
    int64_t* ib_head     # [NL]
    int64_t* ib_n        # [NL]
    int64_t OBC          # outbox capacity (vectors)
    uint8_t* ob_data     # [OBC * L]
    int64_t* ob_meta     # [OBC * 3] link, send cycle, arrival cycle
    int64_t* ob_n        # [1] vectors in the outbox
    # scratch, [L] each
    uint32_t* ta
    uint32_t* tb
    uint32_t* tm
    uint32_t* tr     # where the current VXM result goes (tr0 or a latch ring slot)
    uint32_t* tr0
    float* fa
    float* fb
    float* fr
    int64_t* ia
    int64_t* ib
    int64_t* ir
    int32_t* gaddr   # [SL]
    # Notify history (malloc'ed, grows)
    int64_t* notifies
    int64_t n_notify
    int64_t cap_notify
    # time
    int64_t t        # last processed cycle
    int64_t cycle    # cycles simulated
    int64_t last_effect
    int done
    int woke         # a Notify released parked queues in this cycle
    # errors
    int64_t err[8]
    int64_t perr[8]
    # bulk weight loads (_bulk.pxi): the plan of Reads whose vector only an LW row takes
    int bulk_on          # the engine option bulk_reads
    int bulk_rec         # 1 while a run records the plan
    int bulk_plan        # 1 when rd_run holds a recorded plan
    int bulk_ok          # 0 from a restore to the next restart (the plan assumes the recorded timing)
    int bulk_go          # bulk_on and bulk_plan and bulk_ok: the running call issues runs in bulk
    int rec_op           # opcode being executed (recording only)
    int64_t bulk_until   # the running call's stop cycle (INF: none): a run's LWs must come before it
    int64_t bulk_reads   # Reads issued in bulk (host counter)
    int64_t bulk_shared  # LW rows a bulk run named while the row held another name (host counter)
    int64_t* rd_off      # [NQ + 1] each queue's first plan entry (entries: its functional issues, in order)
    int64_t* rd_cycle    # issue cycle of each Read (-1: no Read)
    int64_t* rd_src      # its row: slice * A + address
    int64_t* rd_lwc      # cycle of the first LW taking its vector (-1: none, -2: a third one)
    int32_t* rd_row      # that LW's plane * L + weight row
    int64_t* rd_lwc2     # cycle of a second LW taking it (another plane at the same position), -1: none
    int32_t* rd_row2     # that LW's plane * L + weight row
    int32_t* rd_nrd      # reads of its vector by anything but that LW (recording)
    int64_t* rd_safe     # first cycle its SRAM row stays as read until its LWs (recording)
    int64_t* rd_lwsafe   # first cycle its rows' markers may be set: after all but BULK_K - 1 earlier LWs (recording)
    int32_t* rd_run      # Reads of the bulk run starting here (0: none, -1: a later Read of a Repeat's run)
    int64_t* rd_runlw    # the last LW cycle of that run
    int32_t* rd_gomem    # [entries * GM_W] what a bulk run reads of each of its Reads (GM_*)
    int64_t* pool_rid    # [D * pool_w] plan entry of the Read whose vector a pool slot holds, -1: none
    int64_t* bk_lastlw   # [NP * L * BULK_K] last BULK_K LWs into each weight row, latest first (recording)
    int64_t* bk_lastw    # [NSL] last landing cycle of a write to each slice (recording)
    int64_t* mx_bulk_T   # [NP * L * BULK_K] cycles of the LWs that take a row from SRAM, -1: none
    int64_t* mx_bulk_src  # [NP * L * BULK_K] their rows: slice * A + address
    int64_t* bk_fly      # [NQ] each MEM queue's last bulk run: its first plan entry, -1: none
    # statistics
    int64_t* st_issued
    int64_t* st_icu
    int64_t* st_bread
    int64_t* st_bwrite


cdef inline void effect(State* s, int64_t c) noexcept nogil:
    if c > s.last_effect:
        s.last_effect = c


cdef inline void set_error(State* s, int kind, int64_t cycle, int64_t q, int64_t a, int64_t b) noexcept nogil:
    s.err[E_KIND] = kind
    s.err[E_CYCLE] = cycle
    s.err[E_Q] = q
    s.err[E_A] = a
    s.err[E_B] = b


cdef inline void pend_error(State* s, int64_t cycle, int64_t cls, int64_t a, int64_t b,
                            int64_t q1, int64_t q2, int kind) noexcept nogil:
    # Keep the landing error the reference engine would raise first:
    # the smallest (cycle, class, stream or ALU, position, writers).
    cdef int64_t key[6]
    key[0] = cycle
    key[1] = cls
    key[2] = a
    key[3] = b
    key[4] = q1
    key[5] = q2
    cdef int64_t cur[6]
    cur[0] = s.perr[E_CYCLE]
    cur[1] = s.perr[E_CLASS]
    cur[2] = s.perr[E_A]
    cur[3] = s.perr[E_B]
    cur[4] = s.perr[E_Q]
    cur[5] = s.perr[E_Q2]
    cdef int i
    if s.perr[E_KIND] != ERR_NONE:
        for i in range(6):
            if key[i] < cur[i]:
                break
            if key[i] > cur[i]:
                return
        else:
            return
    s.perr[E_KIND] = kind
    s.perr[E_CYCLE] = cycle
    s.perr[E_CLASS] = cls
    s.perr[E_A] = a
    s.perr[E_B] = b
    s.perr[E_Q] = q1
    s.perr[E_Q2] = q2


# ---- pointers into the NumPy arrays that hold the state ----------------------------------------
cdef uint8_t* _p_u8(a) except NULL:
    cdef uint8_t[::1] v = a.reshape(-1)
    return &v[0]

cdef int32_t* _p_i32(a) except NULL:
    cdef int32_t[::1] v = a.reshape(-1)
    return &v[0]

cdef int64_t* _p_i64(a) except NULL:
    cdef int64_t[::1] v = a.reshape(-1)
    return &v[0]

cdef uint32_t* _p_u32(a) except NULL:
    cdef uint32_t[::1] v = a.reshape(-1)
    return &v[0]

cdef double* _p_f64(a) except NULL:
    cdef double[::1] v = a.reshape(-1)
    return &v[0]

cdef float* _p_f32(a) except NULL:
    cdef float[::1] v = a.reshape(-1)
    return &v[0]


def _pow2_at_least(n):
    d = 1
    while d < n:
        d *= 2
    return d


cdef int set_geometry(State* s, cfg) except -1:
    """The scalars every unit reads: lanes, streams, positions, queues, slices, ring sizes."""
    s.L = cfg.lanes
    s.SL = cfg.superlanes
    s.LPS = cfg.lanes_per_superlane
    s.S = cfg.streams_per_direction
    s.P = cfg.positions
    s.NQ = len(cfg.queues)
    s.NSL = cfg.mem_slices
    s.A = cfg.addresses_per_slice
    s.NALU = cfg.vxm_alus_per_lane
    s.notify_delay = cfg.notify_delay
    s.stagger = cfg.stagger
    # the longest delay (cycles) of any instruction that writes a stream
    dmax = max(op.delay(cfg) for op in _isa.TABLE if any(w.startswith(("stream", "dst")) for w in op.writes))
    # A ring slot (diagonal or pool vector) must outlive every use: a value is
    # read at most dmax + P - 1 cycles after its producer issued.
    s.D = _pow2_at_least(s.P + dmax + 1)
    s.Dmask = s.D - 1
    return 0


# ---- units -----------------------------------------------------------------------------------
cdef class Unit:
    """One functional unit's part of the fast engine's state, as the reference engine keeps
    one object per unit: the NumPy arrays the unit allocates in the engine's shared dict
    ``a`` (name -> array), the State pointers into them, and the State scalars it saves.

    The engine keeps a list of units and loops over it to allocate, bind, restart, snapshot,
    validate and restore; the cycle loop never sees these objects (it reads the State), so
    they cost nothing per cycle.  ``saved``: the arrays a snapshot holds (the rest are fixed
    by the configuration and the program, or scratch); ``scalars``: the State scalars it
    holds; ``growable``: saved arrays a snapshot may hold in another size (C2C buffers)."""

    cdef readonly str name
    cdef readonly tuple saved
    cdef readonly tuple scalars
    cdef readonly tuple growable
    cdef dict a          # the engine's arrays (one dict for the engine's life; entries may be replaced)

    def __init__(self, name, saved=(), scalars=(), growable=()):
        self.name = name
        self.saved = tuple(saved)
        self.scalars = tuple(scalars)
        self.growable = tuple(growable)

    cdef int alloc(self, State* s, object cfg, dict a) except -1:
        """Set the unit's geometry in s and put its arrays in a (zeroed, as before a restart)."""
        self.a = a
        return 0

    cdef int bind(self, State* s) except -1:
        """Point s at the unit's arrays (after alloc, load, restore or a resize)."""
        return 0

    cdef int restart(self, State* s, object lowered) except -1:
        """Back to cycle 0 of the loaded program (lowered: Program.lower(), None if none); SRAM kept."""
        return 0

    cdef dict get_scalars(self, State* s):
        """The unit's saved State scalars."""
        return {}

    cdef int set_scalars(self, State* s, dict sc) except -1:
        return 0

    cdef dict snapshot(self, State* s):
        """The unit's saved arrays, copied (nothing shared with the engine)."""
        return {k: self.a[k].copy() for k in self.saved}

    cdef int check_shapes(self, State* s, dict arrays) except -1:
        """SnapshotError unless the snapshot's arrays have this chip's dtypes and shapes
        (a growable one any 1-D size: check_shapes of its unit relates the sizes)."""
        for k in self.saved:
            v, x = self.a[k], arrays[k]
            if k in self.growable and x.dtype == v.dtype and x.ndim == 1:
                continue
            if x.dtype != v.dtype or x.shape != v.shape:
                raise _errors.SnapshotError(f"snapshot array {k!r} is {x.dtype}{list(x.shape)}, "
                                            f"this chip needs {v.dtype}{list(v.shape)}")
        return 0

    cdef int validate(self, State* s, dict sc, dict arrays, object lowered) except -1:
        """SnapshotError unless every index, counter, pointer and flag the unit would take from
        the snapshot (arrays, scalars sc) is one the C loop can run from.  Raw data (SRAM,
        stream and latch values, weights, products) may hold any bits and is not checked."""
        return 0

    cdef int restore(self, State* s, dict sc, dict arrays) except -1:
        """Copy a validated snapshot's arrays and scalars in (bind comes after)."""
        a = self.a
        for k in self.saved:
            if k in self.growable:
                a[k] = np.array(arrays[k], dtype=a[k].dtype)
            else:
                a[k][...] = arrays[k]      # in place: the State's pointers stay valid
        self.set_scalars(s, sc)
        return 0

    def counters(self):
        """The unit's statistics: name -> int64 array (copies)."""
        return {}
