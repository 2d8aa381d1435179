# cython: language_level=3
"""lpucore's fast engine: the same machine as lpucore.reference, in C.

One extension module assembled from one include file per functional unit
(_streams, _mem, _vxm, _mxm, _sxm, _c2c, _icu), as the reference engine is split
into one Python module per unit.  Each include also defines its unit's Unit
subclass (_state.pxi has the base class and the State struct they share), which
allocates, binds, restarts, snapshots, validates and restores that unit's NumPy
arrays; FastEngine keeps a list of units and loops over it.  The per-cycle loop
(run_until) reaches the arrays through the State struct's pointers only and runs
without the GIL.
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
include "_bulk.pxi"
include "_streams.pxi"
include "_mem.pxi"
include "_vxm.pxi"
include "_mxm.pxi"
include "_sxm.pxi"
include "_c2c.pxi"
include "_icu.pxi"

fill_h2f()

_UNIT = {u: i for i, u in enumerate(_isa.UNITS)}

# the host tuning options (Chip.set_engine_options): they move host time, never a result or a cycle
OPTIONS = ("mxm_kernel", "helper_threads", "small_rows", "helper_delay_us", "bulk_reads")


cdef class FastEngine:
    """The Cython engine (``engine="fast"``).  Same interface as ReferenceEngine
    (lpucore.engine.Engine).

    The state is split among one Unit per functional unit (IcuUnit, MemUnit, StreamsUnit,
    VxmUnit, MxmUnit, SxmUnit, C2cUnit: each in its own include), which allocate, bind,
    restart, save, check and restore their own arrays; the engine loops over them.  The cycle
    loop reads the State only."""

    cdef State s
    cdef public object cfg
    cdef public object program
    cdef dict a          # name -> NumPy array holding part of the state (filled by the units)
    cdef readonly list units
    cdef MxmUnit _mxm
    cdef C2cUnit _c2c
    cdef BulkUnit _bulk
    cdef public object _lowered
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
        cdef Unit u
        if fp16_mxm not in ("exact", "fp32"):
            raise _errors.LpuError(f"fp16_mxm must be 'exact' or 'fp32', got {fp16_mxm!r}")
        self.cfg = cfg
        self.fp16_mxm = fp16_mxm
        self._wcache = {}
        self.host_time = {"loop_s": 0.0, "mxm_products_s": 0.0, "mxm_batches": 0, "mxm_small_batches": 0,
                          "mxm_helper_batches": 0, "bulk_reads": 0, "bulk_shared": 0}
        self.program = None
        self._mxm = MxmUnit()
        self._c2c = C2cUnit()
        self._bulk = BulkUnit()
        # counters() keeps this order: ICU, MEM, MXM, C2C statistics; the bulk plan is sized
        # by the streams' pool and the MXM's planes, so it comes last
        self.units = [IcuUnit(), MemUnit(), StreamsUnit(), VxmUnit(), self._mxm, SxmUnit(), self._c2c, self._bulk]
        set_geometry(&self.s, cfg)
        self.s.fp16_exact = 1 if fp16_mxm == "exact" else 0
        self.a = {}
        for u in self.units:
            u.alloc(&self.s, cfg, self.a)
        self._bind()
        self._restart()

    def c2c_take_outbox(self):
        """The vectors sent since the last call: a list of (link, send cycle, arrival cycle, bytes)."""
        return self._c2c.take_outbox(&self.s)

    def c2c_deliver(self, link, arrival, vec):
        """``vec`` reaches ``link``'s inbox in cycle ``arrival`` (the same checks as the reference)."""
        self._c2c.deliver(&self.s, link, arrival, vec)

    cdef _bind(self):
        cdef Unit u
        for u in self.units:
            u.bind(&self.s)

    def _restart(self):
        """Back to cycle 0 of the loaded program; SRAM untouched."""
        cdef Unit u
        for u in self.units:
            u.restart(&self.s, self._lowered if self.program is not None else None)
        self._wcache = {}

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
        br0 = self.s.bulk_reads
        bs0 = self.s.bulk_shared
        rc = 1
        self._bulk.begin(&self.s, u)
        # The loop's Python-side allocations are short-lived and acyclic; a collection
        # pass over a large loaded program's objects would cost more than the run.
        gc_on = _gc.isenabled()
        _gc.disable()
        try:
            rc = self._run_loop(u, idl, h)
        finally:
            self._bulk.end(&self.s, rc)
            if gc_on:
                _gc.enable()
            h["mxm_small_batches"] += self.s.mx_cbatches - c0
            h["mxm_helper_batches"] += self.s.mx_hbatches - hb0
            h["bulk_reads"] += self.s.bulk_reads - br0
            h["bulk_shared"] += self.s.bulk_shared - bs0
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
                # the outbox filled up before a C2C queue issued: double it and go on
                self._c2c.resize(&self.s, self.s.IBC, 2 * self.s.OBC)
                self._c2c.bind(&self.s)
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
        v = self._mxm.views
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
        arr = self._mxm.views["slots"][p, s.mx_arr_slot[p]]
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
        """How MXM batches are multiplied (:data:`MXM_KERNELS`): ``"avx512"`` (the default where
        the host has AVX-512 with VNNI and VBMI: int8 batches and, with ``fp16_mxm="fp32"``,
        float16 batches of any size inside the cycle loop, by the kernels of lpu_kernels.h),
        ``"avx2"`` (the default where the host has AVX2 but not those: int8 batches of any size
        by the AVX2 kernel, float16 as ``"portable"``) or ``"portable"`` (batches of at most
        ``small_rows`` rows by plain C kernels, the rest by NumPy's BLAS).  The environment
        variable ``LPUCORE_MXM_KERNEL`` sets a new engine's kernel.  int8 and exact float16
        give the same bits either way; ``fp16_mxm="fp32"`` sums are within the same bound but
        may differ in their last bits."""
        return MXM_KERNELS[self.s.simd]

    @mxm_kernel.setter
    def mxm_kernel(self, kind):
        k = check_kernel(kind, "mxm_kernel")
        if k != self.s.simd:
            self._mxm.drop_caches()          # the packed weights' layout is the kernel's
        self.s.simd = k

    @property
    def helper_threads(self):
        """Threads beside the cycle loop that multiply big MXM batches (``mxm_kernel="avx512"``
        or ``"avx2"`` batches of at least 16 rows) while the loop goes on: 1 (the default on a host with
        more than one core) or 0.  Results, cycles and statistics do not depend on it."""
        return self.s.helper

    @helper_threads.setter
    def helper_threads(self, n):
        if n not in (0, 1):
            raise _errors.LpuError(f"helper_threads must be 0 or 1, got {n!r}")
        self.s.helper = int(n)

    @property
    def bulk_reads(self):
        """1 (the default, unless ``$LPUCORE_BULK_READS`` is ``"0"``): MEM Reads whose vector only
        one LW takes copy their row straight into that weight-buffer row (recorded by the first
        whole run of a program; see _bulk.pxi); 0: every Read goes through its stream.  Results,
        cycles and statistics do not depend on it."""
        return self.s.bulk_on

    @bulk_reads.setter
    def bulk_reads(self, on):
        if on not in (0, 1):
            raise _errors.LpuError(f"bulk_reads must be 0 or 1 (or a bool), got {on!r}")
        self.s.bulk_on = int(on)

    def bulk_report(self):
        """The last plan recording's Reads by outcome: all, delivered in bulk, read by another
        instruction, unsafe (an IW or LW comes between Read and LW), read by no LW."""
        return dict(self._bulk.report)

    def bulk_planned(self):
        """Reads per run of the loaded program that the bulk plan delivers (0 before the first
        whole run of it records the plan, or if none qualifies)."""
        return self._bulk.planned() if self.s.bulk_plan else 0

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

    @staticmethod
    def mxm_kernels_available():
        """The MXM kernels this host can run, fastest first."""
        return available_kernels()

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

    def options(self):
        """The host tuning options (:data:`OPTIONS`) and their values."""
        return {k: getattr(self, k) for k in OPTIONS}

    def set_options(self, **options):
        """Set host tuning options (names from :data:`OPTIONS`); LpuError for an unknown one."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise _errors.LpuError(f"unknown engine option(s) {', '.join(unknown)}; options: {', '.join(OPTIONS)}")
        for k, v in options.items():
            setattr(self, k, v)

    # ---- host access ---------------------------------------------------------------------------
    def sram(self):
        """SRAM as a uint8 [slices, addresses, lanes] view (shared with the engine: writes land)."""
        return self.a["sram"].reshape(self.s.NSL, self.s.A, self.s.L)

    def read_mem(self, gslice, addr, count=1):
        return self.sram()[gslice, addr:addr + count].copy()

    def write_mem(self, gslice, addr, data):
        data = np.asarray(data, dtype=np.uint8)
        self.sram()[gslice, addr:addr + data.shape[0]] = data

    # ---- snapshots --------------------------------------------------------------------------
    def get_state(self):
        """(scalars, arrays): every part of the state that changes while a program runs, each
        unit's saved arrays and scalars (copies)."""
        cdef Unit u
        if self.s.err[E_KIND] != ERR_NONE:
            raise _errors.SnapshotError("cannot snapshot a chip stopped by a schedule error")
        scalars, arrays = {}, {}
        for u in self.units:
            arrays.update(u.snapshot(&self.s))
            scalars.update(u.get_scalars(&self.s))
        return scalars, arrays

    def set_state(self, scalars, arrays):
        """Replace the state with one from get_state (same configuration and program).  Every
        unit checks the shapes and then every index, counter, pointer and flag it would take
        (SnapshotError) before any unit copies anything in."""
        cdef Unit u
        lowered = self._lowered if self.program is not None else None
        try:
            for u in self.units:
                u.check_shapes(&self.s, arrays)
            sc = {k: int(scalars[k]) for u in self.units for k in u.scalars}
            for u in self.units:
                u.validate(&self.s, sc, arrays, lowered)
        except KeyError as e:
            raise _errors.SnapshotError(f"snapshot state is incomplete: no {e}") from None
        for u in self.units:
            u.restore(&self.s, sc, arrays)
        self._bind()
        self._wcache = {}

    def counters(self):
        """Statistics, name -> int64 array: instructions issued and ICU instructions per queue,
        bytes read and written per MEM slice, MACs and busy cycles per MXM plane, the most MACs
        started in one cycle, vectors sent and received per C2C link."""
        cdef Unit u
        out = {}
        for u in self.units:
            out.update(u.counters())
        return out


# ---- C-level API (declared in _engine.pxd, for Cython code that embeds the engine) -------------
cdef lpu_handle lpu_state(object engine) except NULL:
    if not isinstance(engine, FastEngine):
        raise TypeError(f"expected lpucore._engine.FastEngine (Chip.engine of a fast chip), "
                        f"got {type(engine).__name__}")
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


# ---- test hooks: the ICU's scan for due queues (tests/test_icu_scan.py) ---------------------
def _next_due(qn, int q0, int64_t c, int64_t nmin, int variant):
    """(the first queue q >= q0 whose next issue is c, len(qn) if none; nmin lowered to the least
    next issue passed over) by scan variant 0 (scalar), 1 (AVX2) or 2 (AVX-512); None if this
    host cannot run the variant."""
    cdef int64_t[::1] v = np.ascontiguousarray(qn, dtype=np.int64)
    if v.shape[0] == 0 or not 0 <= q0 <= v.shape[0]:
        raise ValueError("qn must be a non-empty array and 0 <= q0 <= len(qn)")
    cdef int q = lpu_next_due_variant(variant, &v[0], q0, v.shape[0], c, &nmin)
    return None if q < 0 else (q, nmin)


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
