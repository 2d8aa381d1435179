# cython: language_level=3
"""lpucore's fast engine: the same machine as lpucore.reference, in C.

One extension module assembled from one include file per functional unit
(_streams, _mem, _vxm, _icu), as the reference engine is split into one Python
module per unit.  All machine state lives in NumPy arrays owned by the
FastEngine object; the per-cycle loop (run_until) reaches them through the
State struct's pointers and runs without the GIL.
"""

from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, realloc, free

from time import perf_counter as _perf_counter

import gc as _gc
import os as _os

import numpy as np

from lpucore import errors as _errors
from lpucore import isa as _isa
from lpucore import matmul as _matmul
from lpucore.snapshot import CYCLE_LIMIT as LIM
from lpucore.snapshot import check_equal, check_range

include "_build_hash.pxi"
include "_isa_gen.pxi"
include "_state.pxi"
include "_numerics.pxi"
include "_streams.pxi"
include "_mem.pxi"
include "_vxm.pxi"
include "_mxm.pxi"
include "_sxm.pxi"
include "_c2c.pxi"
include "_icu.pxi"

fill_h2f()

SMALL_ROWS = 64

_UNIT = {u: i for i, u in enumerate(_isa.UNITS)}


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


cdef class FastEngine:
    """The Cython engine (``engine="fast"``).  Same interface as ReferenceEngine."""

    cdef State s
    cdef public object cfg
    cdef public object program
    cdef dict a          # name -> NumPy array holding part of the state
    cdef public object _lowered
    cdef dict _views     # shaped views of state arrays used by _mxm_flush
    cdef dict _wcache    # plane -> ((install version, dtype), weights as floats)
    cdef public str fp16_mxm
    cdef public dict host_time   # wall seconds in the cycle loop and in MXM products, batches
    name = "fast"

    def __cinit__(self):
        memset(&self.s, 0, sizeof(State))

    def __dealloc__(self):
        free(self.s.notifies)
        self.s.notifies = NULL
        if self.s.jobs != NULL:
            lpu_pool_destroy(<lpu_pool*>self.s.jobs)
            free(self.s.jobs)
            self.s.jobs = NULL

    def __init__(self, cfg, fp16_mxm="exact"):
        if fp16_mxm not in ("exact", "fp32"):
            raise _errors.LpuError(f"fp16_mxm must be 'exact' or 'fp32', got {fp16_mxm!r}")
        self.cfg = cfg
        self.fp16_mxm = fp16_mxm
        self._wcache = {}
        self.host_time = {"loop_s": 0.0, "mxm_products_s": 0.0, "mxm_batches": 0, "mxm_small_batches": 0,
                          "mxm_helper_batches": 0}
        self.program = None
        cdef State* s = &self.s
        s.L = cfg.lanes
        s.SL = cfg.superlanes
        s.LPS = cfg.lanes_per_superlane
        s.S = cfg.streams_per_direction
        s.P = cfg.positions
        s.NQ = len(cfg.queues)
        s.NSL = cfg.mem_slices
        s.A = cfg.addresses_per_slice
        s.NALU = cfg.vxm_alus_per_lane
        s.bank_msb = 1 if cfg.bank_select == "msb" else 0
        s.bank_div = cfg.addresses_per_slice // cfg.banks_per_slice
        s.nbanks = cfg.banks_per_slice
        s.d_read = cfg.mem_read_delay
        s.d_write = cfg.mem_write_delay
        s.notify_delay = cfg.notify_delay
        s.stagger = cfg.stagger
        vx_delays = [op.delay(cfg) for op in _isa.TABLE if op.unit == "VXM"]
        # the longest delay of any instruction that writes a stream
        dmax = max(op.delay(cfg) for op in _isa.TABLE if any(w.startswith(("stream", "dst")) for w in op.writes))
        # A ring slot (diagonal or pool vector) must outlive every use: a value is
        # read at most dmax + P - 1 cycles after its producer issued.
        s.D = _pow2_at_least(s.P + dmax + 1)
        s.Dmask = s.D - 1
        s.RW = cfg.mem_write_delay + 1
        s.RL = max(vx_delays) + 1
        L, NQ, S, D, P = s.L, s.NQ, s.S, s.D, s.P
        a = {}
        a["sram"] = np.zeros(s.NSL * s.A * L, dtype=np.uint8)
        a["wr_tag"] = np.empty(s.NSL * s.RW, dtype=np.int64)
        a["wr_addr"] = np.zeros(s.NSL * s.RW * s.SL, dtype=np.int32)
        a["wr_data"] = np.zeros(s.NSL * s.RW * L, dtype=np.uint8)
        a["wr_uniform"] = np.zeros(s.NSL * s.RW, dtype=np.uint8)
        a["dg_tag"] = np.empty(2 * S * D, dtype=np.int64)
        a["dg_n"] = np.zeros(2 * S * D, dtype=np.int32)
        for k in ("sg_start", "sg_pool", "sg_writer"):
            a[k] = np.zeros(2 * S * D * P, dtype=np.int32)
        # pool vectors per queue and cycle: the most streams one instruction of it writes
        width = {"MEM": 1, "VXM": 4, "MXM": 4, "SXM": max(16, cfg.lanes_per_superlane)}
        q_pool = np.zeros(NQ, dtype=np.int32)
        w = 0
        for q in cfg.queues:
            q_pool[q.index] = w
            w += width[q.unit]
        s.pool_w = w
        a["q_pool"] = q_pool
        a["pool"] = np.zeros(D * w * L, dtype=np.uint8)
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
        a["gaddr"] = np.zeros(s.SL, dtype=np.int32)
        a["qs"] = np.zeros(NQ * QW, dtype=np.int64)
        a["qn"] = np.full(NQ, INF, dtype=np.int64)
        a["qf"] = np.zeros(NQ * NFIELDS, dtype=np.int32)
        a["q_unit"] = np.array([_UNIT[q.unit] for q in cfg.queues], dtype=np.int32)
        a["q_pos"] = np.array([q.position for q in cfg.queues], dtype=np.int32)
        a["q_slice"] = np.array([cfg.slice_id(q.hemisphere, q.slot) if q.unit == "MEM" else -1
                                 for q in cfg.queues], dtype=np.int32)
        a["q_slot"] = np.array([q.slot for q in cfg.queues], dtype=np.int32)
        a["q_hem"] = np.array([max(q.hemisphere, 0) for q in cfg.queues], dtype=np.int32)
        # MXM
        NP = cfg.mxm_planes
        s.NP = NP
        s.NACC = cfg.mxm_accumulators
        s.RI = cfg.mxm_install_delay + 1
        s.BMAX = 512
        s.BB = 2 * s.BMAX + cfg.mxm_delay + 2
        s.mx_install_delay = cfg.mxm_install_delay
        s.mx_delay = cfg.mxm_delay
        s.mx_acc_delay = cfg.mxm_acc_delay
        s.mx_fp16_interval = cfg.mxm_fp16_interval
        LL = L * L
        s.NS = s.RI + 2
        a["mx_slots"] = np.zeros(NP * s.NS * LL, dtype=np.uint8)
        a["mx_buf_slot"] = np.zeros(NP, dtype=np.int32)
        a["mx_row_src"] = np.zeros(NP * L, dtype=np.int32)
        a["mx_arr_slot"] = np.full(NP, -1, dtype=np.int32)
        a["mx_inst_slot"] = np.zeros(NP * s.RI, dtype=np.int32)
        a["mx_arr_dt"] = np.zeros(NP, dtype=np.int32)
        a["mx_ver"] = np.zeros(NP, dtype=np.int64)
        a["mx_inst_T"] = np.zeros(NP * s.RI, dtype=np.int64)
        a["mx_inst_dt"] = np.zeros(NP * s.RI, dtype=np.int32)
        a["mx_acc"] = np.zeros(NP * s.NACC * L, dtype=np.uint32)
        a["mx_ax"] = np.zeros(NP * NR * s.BMAX * L + 4 * L, dtype=np.float32)   # + 4 rows the kernels may read
        # int8 activations as offset bytes; 8 spare rows (and 4 bytes) so the VNNI kernel may
        # read whole groups of rows and of 4 bytes past a batch's end
        a["mx_xb"] = np.zeros(NP * NR * (s.BMAX + 8) * L + 4, dtype=np.uint8)
        a["mx_xbuf"] = np.zeros(NP, dtype=np.int32)
        a["mx_rseq"] = np.full(NP * NR, -1, dtype=np.int64)
        a["mx_sseq"] = np.full(NP * s.NS, -1, dtype=np.int64)
        s.mx_wpstride = lpu_vnni_packed_bytes(L, L)
        a["mx_wp"] = np.zeros(NP * s.mx_wpstride, dtype=np.int8)
        a["mx_wcorr"] = np.zeros(NP * 64 * lpu_vnni_blocks(L), dtype=np.int32)
        a["mx_wpver"] = np.full(NP, -1, dtype=np.int64)
        a["mx_wf"] = np.zeros(NP * (L // 2) * 64 * lpu_vnni_blocks(L), dtype=np.float32)
        a["mx_wfver"] = np.full(NP, -1, dtype=np.int64)
        a["mx_wfext"] = np.zeros(2 * NP, dtype=np.int32)
        s.simd = lpu_vnni_available()
        a["mx_bjob"] = np.full(NP * s.BB, -1, dtype=np.int32)
        a["mx_bseq"] = np.zeros(NP * s.BB, dtype=np.int64)
        s.jobs = malloc(sizeof(lpu_pool))
        if s.jobs == NULL or lpu_pool_init(<lpu_pool*>s.jobs, HELPER_JOBS, s.BMAX):
            raise MemoryError("cannot set up the MXM helper thread's jobs")
        s.helper = 1 if (_os.cpu_count() or 1) > 1 else 0
        a["mx_aacc"] = np.zeros(NP * s.BMAX, dtype=np.int32)
        a["mx_aadd"] = np.zeros(NP * s.BMAX, dtype=np.uint8)
        a["mx_aland"] = np.zeros(NP * s.BMAX, dtype=np.int64)
        a["mx_an"] = np.zeros(NP, dtype=np.int32)
        a["mx_bres"] = np.zeros(NP * s.BB * L, dtype=np.float32)
        a["mx_bacc"] = np.zeros(NP * s.BB, dtype=np.int32)
        a["mx_badd"] = np.zeros(NP * s.BB, dtype=np.uint8)
        a["mx_bland"] = np.zeros(NP * s.BB, dtype=np.int64)
        a["mx_bdt"] = np.zeros(NP * s.BB, dtype=np.int32)
        a["mx_bhead"] = np.zeros(NP, dtype=np.int32)
        a["mx_bn"] = np.zeros(NP, dtype=np.int32)
        for k in ("mx_busy_until", "mx_macs", "mx_busy"):
            a[k] = np.zeros(NP, dtype=np.int64)
        a["mx_peak"] = np.zeros(1, dtype=np.int64)
        a["mx_wchk"] = np.full(NP, -1, dtype=np.int64)
        a["mx_wbad"] = np.zeros(NP, dtype=np.uint8)
        a["mx_wconv"] = np.zeros(NP, dtype=np.uint8)
        a["mx_wd"] = np.zeros(NP * (L // 2) * L, dtype=np.float64)
        a["mx_si"] = np.zeros(L, dtype=np.int32)
        a["mx_sd"] = np.zeros(2 * L, dtype=np.float64)
        # Batches of up to SMALL_ROWS activation rows are multiplied inside the loop
        # (C, no GIL), larger ones by the host's BLAS: below this, a BLAS call's
        # overhead outweighs its arithmetic (bench/bench_decode.py, bench/bench_gemm.py).
        # 64 covers decode attention over caches of up to 63 positions: on GPT-2-small int8
        # with 33 positions, 32 sent 720 batches a step to the host at 0.64 ms each (+25%
        # wall per step); fp16 (b)'s 256-row batches are faster on the host.
        s.small_rows = SMALL_ROWS
        s.fp16_exact = 1 if fp16_mxm == "exact" else 0
        # SXM
        s.sx_delay = cfg.sxm_delay
        sx_res = np.zeros(256, dtype=np.int32)
        for op in _isa.TABLE:
            if op.unit == "SXM":
                sx_res[op.opcode] = _isa.SXM_RESOURCES.index(op.resource)
        a["sx_res"] = sx_res
        a["sx_limit"] = np.array([getattr(cfg, "sxm_" + r) for r in _isa.SXM_RESOURCES], dtype=np.int32)
        a["sx_use"] = np.zeros(2 * N_RESOURCES, dtype=np.int32)
        # C2C
        s.NL = cfg.c2c_links
        s.c2c_interval = cfg.c2c_send_interval
        s.c2c_latency = cfg.c2c_latency
        s.c2c_receive_delay = cfg.c2c_receive_delay
        s.c2c_deskew_delay = cfg.c2c_deskew_delay
        for k in ("lk_busy", "lk_ready", "lk_sent", "lk_recv", "ib_head", "ib_n"):
            a[k] = np.zeros(s.NL, dtype=np.int64)
        a["ob_n"] = np.zeros(1, dtype=np.int64)
        self._c2c_alloc(a, 16, 64)
        for k in ("st_issued", "st_icu"):
            a[k] = np.zeros(NQ, dtype=np.int64)
        for k in ("st_bread", "st_bwrite"):
            a[k] = np.zeros(s.NSL, dtype=np.int64)
        lat = np.zeros(256, dtype=np.int32)
        strided = np.zeros(256, dtype=np.int32)
        vx_cls = np.zeros(256, dtype=np.int32)
        vx_nsrc = np.zeros(256, dtype=np.int32)
        for op in _isa.TABLE:
            lat[op.opcode] = op.delay(cfg)
            strided[op.opcode] = sum(1 << i for i, f in enumerate(op.fields) if f.strided)
            if op.unit == "VXM":
                vx_cls[op.opcode] = _isa.VXM_CLASS_CODE[op.cls]     # VC_* (generated from the same table)
                vx_nsrc[op.opcode] = sum(1 for f in op.fields if f.kind == "src")
        a["lat"], a["strided"], a["vx_cls"], a["vx_nsrc"] = lat, strided, vx_cls, vx_nsrc
        a["code"] = np.zeros((1, 1 + NFIELDS), dtype=np.int32)
        self.a = a
        self._bind()
        self._restart()

    def _c2c_alloc(self, a, ibc, obc):
        """(Re)size the inbox rings to ibc vectors per link and the outbox to obc vectors,
        keeping their contents (inbox entries move to the front of their rings)."""
        cdef State* s = &self.s
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

    def c2c_take_outbox(self):
        """The vectors sent since the last call: a list of (link, send cycle, arrival cycle, bytes)."""
        a = self.a
        n = int(a["ob_n"][0])
        meta = a["ob_meta"].reshape(-1, 3)[:n]
        data = a["ob_data"].reshape(-1, self.s.L)[:n].copy()
        out = [(int(m[0]), int(m[1]), int(m[2]), data[i]) for i, m in enumerate(meta)]
        a["ob_n"][0] = 0
        return out

    def c2c_deliver(self, link, arrival, vec):
        """``vec`` reaches ``link``'s inbox in cycle ``arrival`` (the same checks as the reference)."""
        cdef State* s = &self.s
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
            self._c2c_alloc(a, 2 * s.IBC, s.OBC)
            self._bind()
        e = link * s.IBC + (a["ib_head"][link] + n) % s.IBC
        a["ib_data"].reshape(-1, s.L)[e] = vec
        a["ib_arr"][e] = arrival
        a["ib_n"][link] = n + 1

    cdef _bind(self):
        cdef State* s = &self.s
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
        s.code = _p_i32(a["code"])
        s.lat = _p_i32(a["lat"])
        s.strided = _p_i32(a["strided"])
        s.vx_cls = _p_i32(a["vx_cls"])
        s.vx_nsrc = _p_i32(a["vx_nsrc"])
        s.qs = _p_i64(a["qs"])
        s.qn = _p_i64(a["qn"])
        s.qf = _p_i32(a["qf"])
        s.q_unit = _p_i32(a["q_unit"])
        s.q_pos = _p_i32(a["q_pos"])
        s.q_slice = _p_i32(a["q_slice"])
        s.q_slot = _p_i32(a["q_slot"])
        s.q_hem = _p_i32(a["q_hem"])
        s.q_pool = _p_i32(a["q_pool"])
        s.mx_slots = _p_u8(a["mx_slots"])
        s.mx_buf_slot = _p_i32(a["mx_buf_slot"])
        s.mx_row_src = _p_i32(a["mx_row_src"])
        s.mx_arr_slot = _p_i32(a["mx_arr_slot"])
        s.mx_inst_slot = _p_i32(a["mx_inst_slot"])
        s.mx_arr_dt = _p_i32(a["mx_arr_dt"])
        s.mx_ver = _p_i64(a["mx_ver"])
        self._views = {"ax": a["mx_ax"][:s.NP * NR * s.BMAX * s.L].reshape(s.NP, NR, s.BMAX, s.L),
                       "xb": a["mx_xb"][:s.NP * NR * (s.BMAX + 8) * s.L].reshape(s.NP, NR, s.BMAX + 8, s.L),
                       "slots": a["mx_slots"].reshape(s.NP, s.NS, s.L, s.L),
                       "bres": a["mx_bres"].reshape(s.NP, s.BB, s.L)}
        s.mx_inst_T = _p_i64(a["mx_inst_T"])
        s.mx_inst_dt = _p_i32(a["mx_inst_dt"])
        s.mx_acc = _p_u32(a["mx_acc"])
        s.mx_ax = _p_f32(a["mx_ax"])
        s.mx_xbuf = _p_i32(a["mx_xbuf"])
        s.mx_rseq = _p_i64(a["mx_rseq"])
        s.mx_sseq = _p_i64(a["mx_sseq"])
        s.mx_aacc = _p_i32(a["mx_aacc"])
        s.mx_aadd = _p_u8(a["mx_aadd"])
        s.mx_aland = _p_i64(a["mx_aland"])
        s.mx_an = _p_i32(a["mx_an"])
        s.mx_bres = _p_f32(a["mx_bres"])
        s.mx_bacc = _p_i32(a["mx_bacc"])
        s.mx_badd = _p_u8(a["mx_badd"])
        s.mx_bland = _p_i64(a["mx_bland"])
        s.mx_bdt = _p_i32(a["mx_bdt"])
        s.mx_bhead = _p_i32(a["mx_bhead"])
        s.mx_bn = _p_i32(a["mx_bn"])
        s.mx_busy_until = _p_i64(a["mx_busy_until"])
        s.mx_macs = _p_i64(a["mx_macs"])
        s.mx_busy = _p_i64(a["mx_busy"])
        s.mx_peak = _p_i64(a["mx_peak"])
        s.mx_wchk = _p_i64(a["mx_wchk"])
        s.mx_wbad = _p_u8(a["mx_wbad"])
        s.mx_wconv = _p_u8(a["mx_wconv"])
        s.mx_wd = _p_f64(a["mx_wd"])
        s.mx_si = _p_i32(a["mx_si"])
        s.mx_sd = _p_f64(a["mx_sd"])
        s.mx_xb = _p_u8(a["mx_xb"])
        s.mx_wp = <int8_t*>_p_u8(a["mx_wp"].view(np.uint8))
        s.mx_wcorr = _p_i32(a["mx_wcorr"])
        s.mx_wpver = _p_i64(a["mx_wpver"])
        s.mx_wf = _p_f32(a["mx_wf"])
        s.mx_wfver = _p_i64(a["mx_wfver"])
        s.mx_wfext = _p_i32(a["mx_wfext"])
        s.mx_bjob = _p_i32(a["mx_bjob"])
        s.mx_bseq = _p_i64(a["mx_bseq"])
        s.sx_res = _p_i32(a["sx_res"])
        s.sx_limit = _p_i32(a["sx_limit"])
        s.sx_use = _p_i32(a["sx_use"])
        s.sram = _p_u8(a["sram"])
        s.wr_tag = _p_i64(a["wr_tag"])
        s.wr_addr = _p_i32(a["wr_addr"])
        s.wr_data = _p_u8(a["wr_data"])
        s.wr_uniform = _p_u8(a["wr_uniform"])
        s.dg_tag = _p_i64(a["dg_tag"])
        s.dg_n = _p_i32(a["dg_n"])
        s.sg_start = _p_i32(a["sg_start"])
        s.sg_pool = _p_i32(a["sg_pool"])
        s.sg_writer = _p_i32(a["sg_writer"])
        s.pool = _p_u8(a["pool"])
        s.latch = _p_u32(a["latch"])
        s.latch_valid = _p_u8(a["latch_valid"])
        s.lt_tag = _p_i64(a["lt_tag"])
        s.lt_bits = _p_u32(a["lt_bits"])
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
        s.gaddr = _p_i32(a["gaddr"])
        s.st_issued = _p_i64(a["st_issued"])
        s.st_icu = _p_i64(a["st_icu"])
        s.st_bread = _p_i64(a["st_bread"])
        s.st_bwrite = _p_i64(a["st_bwrite"])

    def _restart(self):
        """Back to cycle 0 of the loaded program; SRAM untouched."""
        cdef State* s = &self.s
        a = self.a
        a["wr_tag"][:] = -1
        a["dg_tag"][:] = np.iinfo(np.int64).min
        a["dg_n"][:] = 0
        a["latch_valid"][:] = 0
        a["lt_tag"][:] = -1
        a["lk_ready"][:] = -1
        for k in ("lk_busy", "lk_sent", "lk_recv", "ib_head", "ib_n", "ob_n"):
            a[k][:] = 0
        for k in ("st_issued", "st_icu", "st_bread", "st_bwrite", "mx_macs", "mx_busy", "mx_peak",
                  "mx_busy_until", "mx_an", "mx_bn", "mx_bhead", "mx_acc", "mx_xbuf", "mx_slots", "mx_buf_slot",
                  "mx_row_src", "mx_inst_slot", "sx_use"):
            a[k][:] = 0
        a["mx_arr_dt"][:] = -1
        a["mx_bjob"][:] = -1
        a["mx_rseq"][:] = -1
        a["mx_sseq"][:] = -1
        a["mx_arr_slot"][:] = -1
        a["mx_wchk"][:] = -1
        a["mx_wpver"][:] = -1
        a["mx_wfver"][:] = -1
        self._wcache = {}
        a["mx_inst_T"][:] = -1
        s.mx_cycle = -1
        s.mx_cycle_macs = 0
        s.sx_cycle = -1
        qs = a["qs"].reshape(s.NQ, QW)
        qs[:] = 0
        qn = a["qn"]
        if self.program is not None:
            _, qstart = self._lowered
            for q in range(s.NQ):
                qs[q, Q_PC] = qstart[q]
                qs[q, Q_END] = qstart[q + 1]
                qn[q] = 0 if qstart[q + 1] > qstart[q] else INF
        else:
            qn[:] = INF
        s.n_notify = 0
        s.t = -1
        s.cycle = 0
        s.last_effect = -1
        s.done = 0
        for i in range(8):
            s.err[i] = 0
            s.perr[i] = 0

    def load(self, program):
        if program.config != self.cfg:
            raise _errors.LpuError("program was built for a different chip configuration")
        code, qstart = program.lower()
        if code.shape[0] == 0:
            code = np.zeros((1, 1 + NFIELDS), dtype=np.int32)
        self.a["code"] = np.ascontiguousarray(code, dtype=np.int32)
        self._lowered = (code, qstart)
        self.program = program
        self._bind()
        self._restart()

    def reset(self, clear_memory=True):
        self._restart()
        if clear_memory:
            self.a["sram"][:] = 0

    # ---- running --------------------------------------------------------------------------
    def run(self, until=None, idle=True):
        """Simulate up to (not including) cycle ``until``, or to the end of the program.
        With ``idle=False`` a run that reaches the end of the program stops at its
        finish cycle even when ``until`` lies beyond it."""
        cdef int64_t u = -1 if until is None else int(until)
        cdef int idl = 1 if idle else 0
        cdef int rc
        if self.s.err[E_KIND] != ERR_NONE:
            raise self._error()
        h = self.host_time
        c0 = self.s.mx_cbatches
        hb0 = self.s.mx_hbatches
        # The loop's Python-side allocations are short-lived and acyclic; a collection
        # pass over a large loaded program's objects would cost more than the run.
        gc_on = _gc.isenabled()
        _gc.disable()
        try:
            rc = self._run_loop(u, idl, h)
        finally:
            if gc_on:
                _gc.enable()
            h["mxm_small_batches"] += self.s.mx_cbatches - c0
            h["mxm_helper_batches"] += self.s.mx_hbatches - hb0
        if rc == 2:
            raise MemoryError("out of memory recording Notify history")
        if rc:
            raise self._error()

    cdef int _run_loop(self, int64_t u, int idl, dict h) except -1:
        cdef int rc
        while True:
            t0 = _perf_counter()
            with nogil:
                rc = run_until(&self.s, u, idl)
            t1 = _perf_counter()
            h["loop_s"] += t1 - t0
            if rc == 4:
                self._c2c_alloc(self.a, self.s.IBC, 2 * self.s.OBC)
                self._bind()
                continue
            if rc != 3:
                break
            self._mxm_flush(self.s.flush_plane)
            h["mxm_products_s"] += _perf_counter() - t1
            h["mxm_batches"] += 1
        return rc

    def _mxm_flush(self, int p):
        """Multiply plane p's batch of activations by its installed weights (one BLAS
        call) and queue the products to land in their accumulators."""
        cdef State* s = &self.s
        cdef int n = s.mx_an[p]
        if n == 0:
            return
        # make room: products that have landed by now go into the accumulators first
        mxm_apply(s, p, s.t)
        v = self._views
        dtc = s.mx_arr_dt[p]
        w = self._weights(p, dtc)
        if dtc == DT_INT8:
            # exact: every partial sum is an integer below 2**24
            xb = v["xb"][p, s.mx_xbuf[p], :n]
            res = (xb ^ 0x80).view(np.int8).astype(np.float32) @ w
        else:
            rows = v["ax"][p, s.mx_xbuf[p], :n]
            K = s.L // 2
            if self.fp16_mxm == "exact":
                res = _matmul.fp16_dot_fast(rows[:, :K].astype(np.float16), w)
            else:
                res = rows[:, :K] @ w
        self._push_products(p, np.ascontiguousarray(res, dtype=np.float32))

    cdef _push_products(self, int p, res):
        """Move plane p's batch (now multiplied: res [n, L] uint32) into its FIFO of
        products waiting to land."""
        cdef State* s = &self.s
        cdef const float[:, ::1] R = res
        cdef int n = s.mx_an[p]
        cdef int i, e, a
        for i in range(n):
            e = p * s.BB + (s.mx_bhead[p] + s.mx_bn[p] + i) % s.BB
            a = p * s.BMAX + i
            memcpy(s.mx_bres + <int64_t>e * s.L, &R[i, 0], s.L * sizeof(float))
            s.mx_bjob[e] = -1
            s.mx_bacc[e] = s.mx_aacc[a]
            s.mx_badd[e] = s.mx_aadd[a]
            s.mx_bland[e] = s.mx_aland[a]
            s.mx_bdt[e] = s.mx_arr_dt[p]
        s.mx_bn[p] += n
        s.mx_an[p] = 0

    def _weights(self, int p, int dtc):
        """Plane p's installed weights as a float matrix, cached until the next install."""
        cdef State* s = &self.s
        key = (s.mx_ver[p], dtc)
        hit = self._wcache.get(p)
        if hit is not None and hit[0] == key:
            return hit[1]
        arr = self._views["slots"][p, s.mx_arr_slot[p]]
        if dtc == DT_INT8:
            w = arr.view(np.int8).astype(np.float32)
        else:
            w = (arr[0::2].astype(np.uint16) | (arr[1::2].astype(np.uint16) << 8)).view(np.float16)
            if self.fp16_mxm != "exact":
                w = w.astype(np.float32)
        self._wcache[p] = (key, w)
        return w

    def _error(self):
        cdef State* s = &self.s
        cfg = self.cfg
        k, c, q, x, y, q2 = (int(s.err[E_KIND]), int(s.err[E_CYCLE]), int(s.err[E_Q]), int(s.err[E_A]),
                             int(s.err[E_B]), int(s.err[E_Q2]))
        if k == ERR_STREAM_CONFLICT:
            return _errors.stream_conflict(cfg, c, q, q2, x, y)
        if k == ERR_EMPTY_READ:
            return _errors.empty_read(cfg, c, q, x, y)
        if k == ERR_BANK_CONFLICT:
            return _errors.bank_conflict(cfg, c, q, x, y)
        if k == ERR_LATCH_CONFLICT:
            return _errors.latch_conflict(cfg, c, x)
        if k == ERR_ADDRESS:
            return _errors.address_error(cfg, c, q, x, y)
        if k == ERR_DEADLOCK:
            return _errors.deadlock(cfg, c, q, x, y)
        if k == ERR_MXM:
            return _errors.mxm_error(cfg, c, q, _errors.MXM_WHY[x])
        if k == ERR_LINK:
            return _errors.link_error(cfg, c, q, x, _errors.LINK_WHY[y], q2)
        if k == ERR_RESOURCE:
            return _errors.resource_error(cfg, c, q, _isa.SXM_RESOURCES[x])
        return _errors.LpuError(f"fast engine: unknown error code {k}")

    @property
    def small_rows(self):
        """MXM batches of at most this many activation rows are multiplied inside the
        cycle loop (C kernels); larger ones by NumPy's BLAS.  0: always BLAS.  Both give
        the same bits; the setting only moves host time."""
        return self.s.small_rows

    @small_rows.setter
    def small_rows(self, n):
        n = int(n)
        if not 0 <= n <= self.s.BMAX:
            raise _errors.LpuError(f"small_rows must be in 0..{self.s.BMAX}, got {n}")
        self.s.small_rows = n

    @property
    def mxm_kernel(self):
        """How MXM batches are multiplied: ``"avx512"`` (the default where the host has
        AVX-512 with VNNI and VBMI: int8 batches and, with ``fp16_mxm="fp32"``, float16
        batches of any size inside the cycle loop, by the kernels of lpu_kernels.h) or
        ``"portable"`` (batches of at most ``small_rows`` rows by plain C kernels, the rest
        by NumPy's BLAS).  int8 and exact float16 give the same bits either way;
        ``fp16_mxm="fp32"`` sums are within the same bound but may differ in their last bits."""
        return "avx512" if self.s.simd else "portable"

    @mxm_kernel.setter
    def mxm_kernel(self, kind):
        if kind not in ("avx512", "portable"):
            raise _errors.LpuError(f"mxm_kernel must be 'avx512' or 'portable', got {kind!r}")
        if kind == "avx512" and not lpu_vnni_available():
            raise _errors.LpuError("mxm_kernel='avx512' needs a host with AVX-512 VNNI and VBMI; this one lacks them")
        self.s.simd = 1 if kind == "avx512" else 0

    @property
    def helper_threads(self):
        """Threads beside the cycle loop that multiply big MXM batches (``mxm_kernel="avx512"``
        batches of at least 16 rows) while the loop goes on: 1 (the default on a host with
        more than one core) or 0.  Results, cycles and statistics do not depend on it."""
        return self.s.helper

    @helper_threads.setter
    def helper_threads(self, n):
        if n not in (0, 1):
            raise _errors.LpuError(f"helper_threads must be 0 or 1, got {n!r}")
        self.s.helper = int(n)

    @property
    def helper_delay_us(self):
        """Tests only: microseconds the helper thread sleeps before each job it takes, so
        that a loop that reads or rewrites a job's data too early gets caught."""
        return (<lpu_pool*>self.s.jobs).delay_us

    @helper_delay_us.setter
    def helper_delay_us(self, us):
        (<lpu_pool*>self.s.jobs).delay_us = int(us)

    @staticmethod
    def avx512_available():
        """True if this host can run the AVX-512 MXM kernels."""
        return bool(lpu_vnni_available())

    @property
    def cycle(self):
        return self.s.cycle

    @property
    def last_effect(self):
        return self.s.last_effect

    @property
    def finish_cycle(self):
        return self.s.last_effect + self.s.stagger if self.s.last_effect >= 0 else 0

    @property
    def finished(self):
        return bool(self.s.done) and self.s.cycle >= self.finish_cycle

    # ---- host access ---------------------------------------------------------------------------
    def _sram(self):
        return self.a["sram"].reshape(self.s.NSL, self.s.A, self.s.L)

    def read_mem(self, gslice, addr, count=1):
        return self._sram()[gslice, addr:addr + count].copy()

    def write_mem(self, gslice, addr, data):
        data = np.asarray(data, dtype=np.uint8)
        self._sram()[gslice, addr:addr + data.shape[0]] = data

    # ---- snapshots --------------------------------------------------------------------------
    def _get_state(self):
        """(scalars, arrays): every part of the state that changes while a program runs."""
        cdef State* s = &self.s
        if s.err[E_KIND] != ERR_NONE:
            raise _errors.SnapshotError("cannot snapshot a chip stopped by a schedule error")
        arrays = {k: v.copy() for k, v in self.a.items() if k not in _CONST_ARRAYS}
        arrays["notifies"] = np.array([s.notifies[i] for i in range(s.n_notify)], dtype=np.int64)
        arrays["perr"] = np.array([s.perr[i] for i in range(8)], dtype=np.int64)
        scalars = {"t": s.t, "cycle": s.cycle, "last_effect": s.last_effect, "done": s.done,
                   "mx_cycle": s.mx_cycle, "mx_cycle_macs": s.mx_cycle_macs, "sx_cycle": s.sx_cycle}
        return scalars, arrays

    def _set_state(self, scalars, arrays):
        """Replace the state with one from _get_state (same configuration and program)."""
        cdef State* s = &self.s
        cdef int64_t n, i
        cdef int64_t* p
        a = self.a
        try:
            for k, v in a.items():
                if k in _CONST_ARRAYS:
                    continue
                x = arrays[k]
                if k in _GROWABLE and x.dtype == v.dtype and x.ndim == 1:
                    continue
                if x.dtype != v.dtype or x.shape != v.shape:
                    raise _errors.SnapshotError(f"snapshot array {k!r} is {x.dtype}{list(x.shape)}, "
                                                f"this chip needs {v.dtype}{list(v.shape)}")
            if (arrays["ib_data"].size != arrays["ib_arr"].size * s.L or arrays["ib_arr"].size % s.NL
                    or arrays["ib_arr"].size == 0
                    or arrays["ob_data"].size * 3 != arrays["ob_meta"].size * s.L or arrays["ob_meta"].size < 3):
                raise _errors.SnapshotError("snapshot C2C buffers have inconsistent sizes")
            notifies = np.ascontiguousarray(arrays["notifies"], dtype=np.int64).reshape(-1)
            perr = np.ascontiguousarray(arrays["perr"], dtype=np.int64).reshape(-1)
            if perr.shape[0] != 8:
                raise _errors.SnapshotError("snapshot array 'perr' must have 8 entries")
            sc = {k: int(scalars[k]) for k in ("t", "cycle", "last_effect", "done", "mx_cycle",
                                               "mx_cycle_macs", "sx_cycle")}
            self._check_state(sc, arrays, notifies, perr)
        except KeyError as e:
            raise _errors.SnapshotError(f"snapshot state is incomplete: no {e}") from None
        n = notifies.shape[0]
        if n > s.cap_notify:
            p = <int64_t*>realloc(s.notifies, n * sizeof(int64_t))
            if p == NULL:
                raise MemoryError("out of memory restoring Notify history")
            s.notifies = p
            s.cap_notify = n
        for i in range(n):
            s.notifies[i] = notifies[i]
        s.n_notify = n
        for k, v in a.items():
            if k in _GROWABLE:
                a[k] = np.array(arrays[k], dtype=v.dtype)
            elif k not in _CONST_ARRAYS:
                v[...] = arrays[k]      # in place: the State's pointers stay valid
        self._bind()
        for i in range(8):
            s.perr[i] = perr[i]
            s.err[i] = 0
        s.t, s.cycle, s.last_effect, s.done = sc["t"], sc["cycle"], sc["last_effect"], sc["done"]
        s.mx_cycle, s.mx_cycle_macs, s.sx_cycle = sc["mx_cycle"], sc["mx_cycle_macs"], sc["sx_cycle"]
        s.woke = 0
        s.tr = s.tr0
        self.a["mx_wchk"][:] = -1
        self.a["mx_wpver"][:] = -1
        self.a["mx_wfver"][:] = -1
        self._wcache = {}

    def _check_state(self, sc, arrays, notifies, perr):
        """Raise SnapshotError unless every index, counter, pointer and flag of a snapshot's
        state is one the C loop can run from (called by _set_state before anything is copied).
        One step per unit; raw data (SRAM, stream and latch values, weights, products) may hold
        any bits and is not checked."""
        self._check_scalars(sc, notifies)
        self._check_queues(arrays, notifies.shape[0])
        self._check_mem_streams_latches(arrays)
        self._check_mxm(arrays)
        self._check_sxm_c2c_stats(arrays)
        self._check_pending_error(perr)

    def _check_scalars(self, sc, notifies):
        """Scalars: -1 <= t < cycle; the others are cycles (-1: none) or counts."""
        check_range("scalar cycle", sc["cycle"], 0, LIM)
        check_range("scalar t", sc["t"], -1, sc["cycle"] - 1)
        check_range("scalar last_effect", sc["last_effect"], -1, LIM)
        check_range("scalar done", sc["done"], 0, 1)
        check_range("scalar mx_cycle", sc["mx_cycle"], -1, LIM)
        check_range("scalar mx_cycle_macs", sc["mx_cycle_macs"], 0, LIM)
        check_range("scalar sx_cycle", sc["sx_cycle"], -1, LIM)
        check_range("array 'notifies'", notifies, 0, LIM)

    def _check_queues(self, arrays, n_notify):
        """Each queue's pc, Repeat, Sync and wait state against the loaded program."""
        cdef State* s = &self.s
        NQ = s.NQ
        # queues against the loaded program (none loaded: every queue is empty)
        if self.program is not None:
            code, qstart = self._lowered
            code = np.asarray(code)
        else:
            code, qstart = np.zeros((0, 1 + NFIELDS), dtype=np.int32), [0] * (NQ + 1)
        qs = arrays["qs"].reshape(NQ, QW)
        qn = arrays["qn"]
        qf = arrays["qf"].reshape(NQ, NFIELDS)
        for q in range(NQ):
            lo, hi = int(qstart[q]), int(qstart[q + 1])
            nm = f"array 'qs'[{q}, %d] (queue {q}'s %s)"
            check_range(nm % (Q_PC, f"pc; its code is rows {lo}..{hi - 1}"), qs[q, Q_PC], lo, hi)
            check_equal(nm % (Q_END, "end"), qs[q, Q_END], hi, "one past the queue's last row")
            pc = int(qs[q, Q_PC])
            check_range(nm % (Q_REPLEFT, "repetitions left"), qs[q, Q_REPLEFT], 0, 2 ** 31 - 1)
            rl = int(qs[q, Q_REPLEFT])
            if rl > 0:
                # repeating: the row before pc is the Repeat, the one before it the repeated op
                rr = int(qs[q, Q_REPROW])
                if not (pc - 2 >= lo and code[pc - 1, 0] == OP_REPEAT):
                    raise _errors.SnapshotError(f"snapshot array 'qs'[{q}] is repeating (rep_left {rl}) but "
                                                f"row {pc - 1} of queue {q} is no Repeat")
                check_equal(nm % (Q_REPROW, "repeated row"), rr, pc - 2, "the row before the Repeat")
                rep = code[pc - 1]
                check_range(nm % (Q_REPK, "repetitions issued"), qs[q, Q_REPK], 0, rep[1 + F_REPEAT_N] - rl)
                check_equal(nm % (Q_REPK, "repetitions issued + left"), int(qs[q, Q_REPK]) + rl,
                            rep[1 + F_REPEAT_N], "the Repeat's count")
                check_equal(nm % (Q_REPD, "repetition delay"), qs[q, Q_REPD], rep[1 + F_REPEAT_D], "the Repeat's delay")
                check_equal(nm % (Q_REPSTRIDE, "repetition stride"), qs[q, Q_REPSTRIDE], rep[1 + F_REPEAT_STRIDE],
                            "the Repeat's stride")
                op = int(code[rr, 0])
                m = int(self.a["strided"][op])
                k, st = int(qs[q, Q_REPK]), int(rep[1 + F_REPEAT_STRIDE])
                for i in range(NFIELDS):
                    want = int(code[rr, 1 + i])
                    if (m >> i) & 1:
                        want = (want + k * st + 2 ** 31) % 2 ** 32 - 2 ** 31
                    check_equal(f"array 'qf'[{q}, {i}] (field {i} of queue {q}'s repeated instruction)",
                                qf[q, i], want, "its row's field plus rep_k strides")
            nsync = int(np.count_nonzero(code[lo:pc, 0] == OP_SYNC))
            check_equal(nm % (Q_SYNCS, "Syncs issued"), qs[q, Q_SYNCS], nsync, "Sync rows before pc")
            check_range(nm % (Q_SYNCC, "last Sync cycle"), qs[q, Q_SYNCC], 0, LIM)
            w = int(qs[q, Q_WAIT])
            if w:
                check_equal(nm % (Q_WAIT, "Notify waited for, 0: none"), w, nsync, "the queue's last Sync")
                check_range(nm % (Q_WAIT, "Notify waited for, not yet issued"), w, n_notify + 1, LIM)
                check_equal(f"array 'qn'[{q}] (parked queue {q})", qn[q], INF, "INF: parked")
            if rl == 0 and pc == hi:
                check_equal(f"array 'qn'[{q}] (queue {q} has nothing left to issue)", qn[q], INF, "INF")
            check_range(f"array 'qn'[{q}] (next issue cycle of queue {q})", qn[q], 0, LIM, also=(INF,))

    def _check_mem_streams_latches(self, arrays):
        """Pending MEM writes, stream segments and VXM latches."""
        cdef State* s = &self.s
        NQ = s.NQ
        # MEM: pending writes land at valid addresses
        SL = s.SL
        tag = arrays["wr_tag"]
        check_range("array 'wr_tag' (landing cycle, -1: free)", tag, -1, LIM)
        uni = arrays["wr_uniform"]
        check_range("array 'wr_uniform'", uni, 0, 1)
        live = (tag >= 0)[:, None] & ((uni == 0)[:, None] | (np.arange(SL) == 0)[None, :])
        check_range("array 'wr_addr' (pending write address)", arrays["wr_addr"].reshape(-1, SL), 0, s.A - 1,
                    where=live)
        # streams: segments of each diagonal sorted by start, pool slots and writers in range
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
        check_range("array 'sg_writer' (queue)", arrays["sg_writer"].reshape(-1, P), 0, NQ - 1, where=segs)
        check_range("array 'dg_tag' (diagonal)", arrays["dg_tag"], -LIM, LIM, also=(np.iinfo(np.int64).min,))
        # VXM latches
        check_range("array 'latch_valid'", arrays["latch_valid"], 0, 1)
        check_range("array 'lt_tag' (landing cycle, -1: free)", arrays["lt_tag"], -1, LIM)

    def _check_mxm(self, arrays):
        """MXM weight slots, dtypes, batch and product-FIFO counters."""
        cdef State* s = &self.s
        NP = s.NP
        # MXM: slot numbers, dtypes, batch and FIFO counters
        NS, BMAX, BB = s.NS, s.BMAX, s.BB
        dts = (DT_INT8, DT_FLOAT16)
        check_range("array 'mx_buf_slot' (weight slot)", arrays["mx_buf_slot"], 0, NS - 1)
        check_range("array 'mx_row_src' (weight slot)", arrays["mx_row_src"], 0, NS - 1)
        aslot, adt = arrays["mx_arr_slot"], arrays["mx_arr_dt"]
        check_range("array 'mx_arr_slot' (installed weight slot, -1: none)", aslot, -1, NS - 1)
        check_range("array 'mx_arr_dt' (installed dtype code, -1: none)", adt, -1, -1, also=dts)
        for p in range(NP):
            if (aslot[p] < 0) != (adt[p] < 0):
                raise _errors.SnapshotError(f"snapshot array 'mx_arr_slot'[{p}] is {aslot[p]} but 'mx_arr_dt'[{p}] "
                                            f"is {adt[p]}: both or neither must be -1")
        it = arrays["mx_inst_T"]
        check_range("array 'mx_inst_T' (install cycle, -1: free)", it, -1, LIM)
        check_range("array 'mx_inst_slot' (weight slot)", arrays["mx_inst_slot"], 0, NS - 1, where=it >= 0)
        check_range("array 'mx_inst_dt' (dtype code)", arrays["mx_inst_dt"], DT_INT8, DT_INT8, where=it >= 0,
                    also=dts)
        an, bn, bh = arrays["mx_an"], arrays["mx_bn"], arrays["mx_bhead"]
        check_range(f"array 'mx_an' (batch rows, the batch holds {BMAX})", an, 0, BMAX)
        check_range(f"array 'mx_bn' (products waiting, the FIFO holds {BB})", bn, 0, BB)
        check_range("array 'mx_bhead' (FIFO head)", bh, 0, BB - 1)
        check_range("array 'mx_xbuf' (staging buffer)", arrays["mx_xbuf"], 0, NR - 1)
        arows = np.arange(BMAX)[None, :] < an[:, None]
        check_range("array 'mx_aacc' (accumulator)", arrays["mx_aacc"].reshape(NP, BMAX), 0, s.NACC - 1,
                    where=arows)
        check_range("array 'mx_aadd'", arrays["mx_aadd"].reshape(NP, BMAX), 0, 1, where=arows)
        check_range("array 'mx_aland' (landing cycle)", arrays["mx_aland"].reshape(NP, BMAX), 0, LIM, where=arows)
        for p in range(NP):
            if an[p] and adt[p] < 0:
                raise _errors.SnapshotError(f"snapshot array 'mx_an'[{p}] is {an[p]} but plane {p} has no "
                                            f"weights installed")
        brows = ((np.arange(BB)[None, :] - bh[:, None]) % BB) < bn[:, None]
        check_range("array 'mx_bacc' (accumulator)", arrays["mx_bacc"].reshape(NP, BB), 0, s.NACC - 1, where=brows)
        check_range("array 'mx_badd'", arrays["mx_badd"].reshape(NP, BB), 0, 1, where=brows)
        check_range("array 'mx_bland' (landing cycle)", arrays["mx_bland"].reshape(NP, BB), 0, LIM, where=brows)
        check_range("array 'mx_bdt' (dtype code)", arrays["mx_bdt"].reshape(NP, BB), DT_INT8, DT_INT8, where=brows,
                    also=dts)
        for k in ("mx_busy_until", "mx_ver", "mx_macs", "mx_busy", "mx_peak"):
            check_range(f"array {k!r}", arrays[k], 0, LIM)

    def _check_sxm_c2c_stats(self, arrays):
        """SXM use, C2C link counters and rings, statistics."""
        cdef State* s = &self.s
        # SXM, C2C, statistics
        check_range("array 'sx_use' (units in use)", arrays["sx_use"], 0, 2 ** 31 - 1)
        for k in ("lk_busy", "lk_sent", "lk_recv", "st_issued", "st_icu", "st_bread", "st_bwrite"):
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

    def _check_pending_error(self, perr):
        """The pending landing error: a stream or latch conflict."""
        cdef State* s = &self.s
        NQ, P = s.NQ, s.P
        # the pending landing error: a stream or latch conflict
        if perr[E_KIND] != ERR_NONE:
            check_range(f"array 'perr'[{E_KIND}] (error kind)", perr[E_KIND], ERR_STREAM_CONFLICT, ERR_STREAM_CONFLICT,
                        also=(ERR_LATCH_CONFLICT,))
            check_range(f"array 'perr'[{E_CYCLE}] (cycle)", perr[E_CYCLE], 0, LIM)
            if perr[E_KIND] == ERR_STREAM_CONFLICT:
                check_range(f"array 'perr'[{E_CLASS}] (class)", perr[E_CLASS], 0, 0)
                check_range(f"array 'perr'[{E_A}] (stream)", perr[E_A], 0, 2 * s.S - 1)
                check_range(f"array 'perr'[{E_B}] (position)", perr[E_B], 0, P - 1)
                check_range(f"array 'perr'[{E_Q}] (queue)", perr[E_Q], 0, NQ - 1)
                check_range(f"array 'perr'[{E_Q2}] (queue)", perr[E_Q2], 0, NQ - 1)
            else:
                check_range(f"array 'perr'[{E_CLASS}] (class)", perr[E_CLASS], 1, 1)
                check_range(f"array 'perr'[{E_A}] (ALU)", perr[E_A], 0, s.NALU - 1)

    def counters(self):
        a = self.a
        return {"issued": a["st_issued"].copy(), "icu": a["st_icu"].copy(),
                "bytes_read": a["st_bread"].copy(), "bytes_written": a["st_bwrite"].copy(),
                "mxm_macs": a["mx_macs"].copy(), "mxm_busy": a["mx_busy"].copy(),
                "mxm_peak_macs": a["mx_peak"].copy(), "c2c_sent": a["lk_sent"].copy(),
                "c2c_received": a["lk_recv"].copy()}


# C2C buffers, resized as traffic needs (a snapshot may hold other sizes)
_GROWABLE = frozenset(("ib_data", "ib_arr", "ob_data", "ob_meta"))

# Arrays fixed by the configuration and the program (or scratch space), not saved in snapshots.
_CONST_ARRAYS = frozenset(("code", "lat", "strided", "vx_cls", "vx_nsrc", "q_unit", "q_pos", "q_slice", "q_slot",
                           "q_hem", "q_pool", "sx_res", "sx_limit", "ta", "tb", "tm", "tr", "fa", "fb", "fr",
                           "ia", "ib", "ir", "gaddr", "mx_wchk", "mx_wbad", "mx_wconv", "mx_wd", "mx_si",
                           "mx_sd", "mx_wp", "mx_wcorr", "mx_wpver", "mx_wf", "mx_wfver", "mx_wfext", "mx_bjob",
                           "mx_bseq", "mx_rseq", "mx_sseq"))


# ---- C-level API (declared in _engine.pxd, for Cython code that embeds the engine) -------------
cdef lpu_handle lpu_state(object engine) except NULL:
    if not isinstance(engine, FastEngine):
        raise TypeError(f"expected lpucore._engine.FastEngine (Chip._eng of a fast chip), got {type(engine).__name__}")
    return <lpu_handle>&(<FastEngine>engine).s


cdef int lpu_run_until(lpu_handle h, int64_t until, int idle) noexcept nogil:
    return run_until(<State*>h, until, idle)


cdef int lpu_flush_mxm(object engine) except -1:
    cdef FastEngine e = <FastEngine?>engine
    e._mxm_flush(e.s.flush_plane)
    return 0


cdef int lpu_run(object engine, int64_t until, int idle) except -1:
    (<FastEngine?>engine).run(None if until < 0 else until, idle != 0)
    return 0


cdef int64_t lpu_cycle(lpu_handle h) noexcept nogil:
    return (<State*>h).cycle


cdef int64_t lpu_finish_cycle(lpu_handle h) noexcept nogil:
    cdef State* s = <State*>h
    return s.last_effect + s.stagger if s.last_effect >= 0 else 0


cdef int lpu_finished(lpu_handle h) noexcept nogil:
    cdef State* s = <State*>h
    return 1 if s.done and s.cycle >= lpu_finish_cycle(h) else 0


cdef int lpu_error(lpu_handle h) noexcept nogil:
    return <int>(<State*>h).err[E_KIND]


cdef int lpu_lanes(lpu_handle h) noexcept nogil:
    return (<State*>h).L


cdef int lpu_mem_slices(lpu_handle h) noexcept nogil:
    return (<State*>h).NSL


cdef int64_t lpu_addresses(lpu_handle h) noexcept nogil:
    return (<State*>h).A


cdef int lpu_read_mem(lpu_handle h, int slice_id, int64_t addr, int64_t count, uint8_t* out) noexcept nogil:
    cdef State* s = <State*>h
    if slice_id < 0 or slice_id >= s.NSL or addr < 0 or count < 0 or addr + count > s.A:
        return -1
    memcpy(out, s.sram + (<int64_t>slice_id * s.A + addr) * s.L, count * s.L)
    return 0


cdef int lpu_write_mem(lpu_handle h, int slice_id, int64_t addr, int64_t count, const uint8_t* data) noexcept nogil:
    cdef State* s = <State*>h
    if slice_id < 0 or slice_id >= s.NSL or addr < 0 or count < 0 or addr + count > s.A:
        return -1
    memcpy(s.sram + (<int64_t>slice_id * s.A + addr) * s.L, data, count * s.L)
    return 0


cdef int64_t lpu_issued(lpu_handle h, int queue) noexcept nogil:
    cdef State* s = <State*>h
    if queue < 0 or queue >= s.NQ:
        return -1
    return s.st_issued[queue]


# ---- test hooks: the C numerics on whole arrays, for tests/test_numerics.py --------------------
def _c_f32_to_f16(x):
    """float32 array -> uint16 binary16 bits, as the fast engine rounds them."""
    cdef float[::1] src = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty(src.shape[0], dtype=np.uint16)
    cdef uint16_t[::1] dst = out
    cdef Py_ssize_t i
    for i in range(src.shape[0]):
        dst[i] = <uint16_t>lpu_f2h(src[i])
    return out


def _c_f16_to_f32(h):
    """uint16 binary16 bits -> float32 array."""
    cdef uint16_t[::1] src = np.ascontiguousarray(h, dtype=np.uint16).reshape(-1)
    out = np.empty(src.shape[0], dtype=np.float32)
    cdef float[::1] dst = out
    cdef Py_ssize_t i
    for i in range(src.shape[0]):
        dst[i] = lpu_h2f(src[i])
    return out


def _c_unary(name, x):
    """float32 array -> float32 array through one of the C float32 sequences."""
    cdef float[::1] src = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty(src.shape[0], dtype=np.float32)
    cdef float[::1] dst = out
    cdef Py_ssize_t i
    cdef int which = ["exp", "tanh", "sigmoid", "rsqrt", "recip", "sqrt", "relu"].index(name)
    for i in range(src.shape[0]):
        if which == 0:
            dst[i] = lpu_exp(src[i])
        elif which == 1:
            dst[i] = lpu_tanh(src[i])
        elif which == 2:
            dst[i] = lpu_sigmoid(src[i])
        elif which == 3:
            dst[i] = lpu_rsqrt(src[i])
        elif which == 4:
            dst[i] = lpu_recip(src[i])
        elif which == 5:
            dst[i] = sqrtf(src[i])
        else:
            dst[i] = lpu_relu(src[i])
    return out


# ---- the fp16 MXM filter (see lpucore.matmul.fp16_dot_fast) ------------------------------------
from libc.math cimport sqrt, rint, fabs

cdef inline double _ulp16(uint16_t h) noexcept nogil:
    cdef int ex = (h >> 10) & 0x1F
    if (h & 0x7FFF) == 0:
        return 0.0
    return ldexp(1.0, (1 if ex == 0 else ex) - 25)

cdef extern from "math.h" nogil:
    double ldexp(double x, int e)


def _fp16_filter(x16, w16, s, out):
    """One pass over a float64 product s = x @ w of float16 operands: where the exact,
    once-rounded float32 result is certain, write it to out; return a uint8 mask of the
    elements left to the exact path.  Same rules as lpucore.matmul.fp16_dot_fast."""
    cdef const uint16_t[:, ::1] X = x16
    cdef const uint16_t[:, ::1] W = w16
    cdef const double[:, ::1] Sm = s
    cdef float[:, ::1] Out = out
    cdef Py_ssize_t n = X.shape[0], K = X.shape[1], N = W.shape[1]
    unsure_arr = np.zeros((n, N), dtype=np.uint8)
    cdef uint8_t[:, ::1] U = unsure_arr
    nx_a = np.zeros(n)
    gx_a = np.zeros(n)
    bx_a = np.zeros(n, dtype=np.uint8)
    nw_a = np.zeros(N)
    gw_a = np.zeros(N)
    bw_a = np.zeros(N, dtype=np.uint8)
    cdef double[::1] nx = nx_a
    cdef double[::1] gx = gx_a
    cdef uint8_t[::1] bx = bx_a
    cdef double[::1] nw = nw_a
    cdef double[::1] gw = gw_a
    cdef uint8_t[::1] bw = bw_a
    cdef Py_ssize_t r, c, k
    cdef double v, u, acc, g, b, sv, e
    cdef float lo, hi
    cdef double coef = (K + 2) * ldexp(1.0, -53) * 1.01
    with nogil:
        for r in range(n):
            acc = 0.0
            g = 1e300
            for k in range(K):
                if (X[r, k] & 0x7C00) == 0x7C00:
                    bx[r] = 1
                v = lpu_h2f(X[r, k])
                acc = acc + v * v
                u = _ulp16(X[r, k])
                if u > 0.0 and u < g:
                    g = u
            nx[r] = sqrt(acc)
            gx[r] = 1.0 if g == 1e300 else g
        for c in range(N):
            acc = 0.0
            g = 1e300
            for k in range(K):
                if (W[k, c] & 0x7C00) == 0x7C00:
                    bw[c] = 1
                v = lpu_h2f(W[k, c])
                acc = acc + v * v
                u = _ulp16(W[k, c])
                if u > 0.0 and u < g:
                    g = u
            nw[c] = sqrt(acc)
            gw[c] = 1.0 if g == 1e300 else g
        for r in range(n):
            for c in range(N):
                if bx[r] or bw[c]:
                    U[r, c] = 1
                    continue
                sv = Sm[r, c]
                b = coef * nx[r] * nw[c]
                g = gx[r] * gw[c]
                if b < 0.5 * g and fabs(sv) < g * 4503599627370496.0:
                    e = rint(sv / g) * g
                    Out[r, c] = <float>e
                else:
                    lo = <float>(sv - b)
                    hi = <float>(sv + b)
                    if lo == hi:
                        Out[r, c] = lo
                    else:
                        U[r, c] = 1
                        continue
                if Out[r, c] == 0.0:
                    Out[r, c] = 0.0
    return unsure_arr
