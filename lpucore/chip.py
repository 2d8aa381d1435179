"""The driver: one simulated chip, its loaded program, tensors in and out.

::

    chip = lpucore.Chip()                    # GroqChip geometry, fast engine
    chip.load(program)
    chip.write_tensor("x", x)
    stats = chip.run()
    y = chip.read_tensor("y")
    print(stats.cycles, stats.seconds)
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

from .config import ChipConfig
from .engine import ENGINE_OPTIONS, Engine, make_engine
from .engine import ENGINES as ENGINES  # re-exported: lpucore.chip.ENGINES predates lpucore.engine
from .errors import ConfigError, LpuError, TensorError
from .layout import TensorInfo, check_array, plane_locations
from .program import Program

if TYPE_CHECKING:  # pragma: no cover
    from .snapshot import Snapshot
    from .trace import Recorder, Watcher


MAX_CYCLE = 1 << 62
"""The last cycle a chip simulates (about 162 years at 900 MHz): run/step arguments are ints in
0..MAX_CYCLE, and the engines add delays to cycles in 64-bit integers with room to spare."""


def _cycles(what: str, value: Optional[int]) -> Optional[int]:
    """A run/step argument: None, or an int (a NumPy integer too, not a bool) in 0..MAX_CYCLE."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise LpuError(f"{what} takes an int number of cycles, got {type(value).__name__} {value!r:.80}")
    v = int(value)
    if not 0 <= v <= MAX_CYCLE:
        raise LpuError(f"{what} must be in 0..{MAX_CYCLE} (2**62) cycles, got {v}")
    return v

Hemisphere = Union[str, int]    # "W" / "E" (only the first letter counts, in any case) or 0 / 1


@dataclass
class RunStats:
    """What a run did.  Cycles are chip cycles; ``seconds`` uses ``config.clock_hz``."""

    cycles: int
    seconds: float
    finished: bool
    issued: Dict[str, int]            # functional instructions issued, per queue (unit)
    busy_cycles: Dict[str, int]       # cycles in which the queue issued a functional instruction
    icu_instructions: Dict[str, int]  # NOP / Repeat / Sync / Notify, per queue
    mem_bytes_read: Dict[str, int]    # per MEM slice ("W0" ... "E43")
    mem_bytes_written: Dict[str, int]
    by_unit: Dict[str, Dict[str, int]] = field(default_factory=dict)
    mxm_macs: Dict[str, int] = field(default_factory=dict)          # per plane ("W0".."E1"): MACs started
    mxm_busy_cycles: Dict[str, int] = field(default_factory=dict)   # plane-cycles taken by ABCs
    mxm_peak_macs_per_cycle: int = 0                                 # most MACs started in one cycle
    mxm_peak_per_cycle: int = 0                                      # the chip's int8 peak (409,600)
    c2c_vectors_sent: Dict[int, int] = field(default_factory=dict)      # per link, links with traffic only
    c2c_vectors_received: Dict[int, int] = field(default_factory=dict)

    @property
    def macs(self) -> int:
        """MACs performed by the MXM (a plane does a full sub-op per ABC)."""
        return sum(self.mxm_macs.values())

    @property
    def mxm_utilisation(self) -> float:
        """Fraction of plane-cycles the MXM planes were busy (an fp16 ABC keeps its
        plane busy mxm_fp16_interval cycles)."""
        n = len(self.mxm_busy_cycles) or 1
        return sum(self.mxm_busy_cycles.values()) / (n * self.cycles) if self.cycles else 0.0

    @property
    def mxm_mac_utilisation(self) -> float:
        """MACs performed / (cycles x int8 peak MACs per cycle)."""
        return self.macs / (self.cycles * self.mxm_peak_per_cycle) if self.cycles and self.mxm_peak_per_cycle else 0.0

    @property
    def instructions(self) -> int:
        """Functional (vector) instructions issued, all queues."""
        return sum(self.issued.values())

    def to_dict(self) -> Dict[str, Any]:
        return {"cycles": self.cycles, "seconds": self.seconds, "finished": self.finished,
                "macs": self.macs, "mxm_utilisation": self.mxm_utilisation,
                "mxm_mac_utilisation": self.mxm_mac_utilisation, "mxm_macs": dict(self.mxm_macs),
                "mxm_busy_cycles": dict(self.mxm_busy_cycles),
                "mxm_peak_macs_per_cycle": self.mxm_peak_macs_per_cycle,
                "instructions": self.instructions, "issued": dict(self.issued),
                "busy_cycles": dict(self.busy_cycles), "icu_instructions": dict(self.icu_instructions),
                "mem_bytes_read": dict(self.mem_bytes_read), "mem_bytes_written": dict(self.mem_bytes_written),
                "by_unit": {k: dict(v) for k, v in self.by_unit.items()}}


class Chip:
    """One simulated TSP.

    ``config`` defaults to :meth:`ChipConfig.groqchip1`; ``engine`` is ``"fast"``
    (the Cython core, default) or ``"reference"`` (plain NumPy).  Both give
    identical memory, cycles and statistics.

    ``fp16_mxm`` (fast engine): ``"exact"`` (default) computes float16 MXM dot
    products exactly rounded, bit-identical to the reference engine; ``"fp32"`` sums
    them with float32 BLAS, several times faster, within the bound documented in
    :func:`lpucore.matmul.fp16_dot_fp32`.  Cycle counts and statistics are the same.
    """

    def __init__(self, config: Optional[ChipConfig] = None, engine: str = "fast", fp16_mxm: str = "exact",
                 max_memory: Optional[int] = None) -> None:
        self.config: ChipConfig = config if config is not None else ChipConfig.groqchip1()
        if not isinstance(self.config, ChipConfig):
            raise LpuError("config must be a ChipConfig")
        if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, (int, np.integer))
                                       or max_memory < 0):
            raise ConfigError(f"max_memory must be a number of bytes >= 0 (0: no limit), got {max_memory!r:.80}")
        # the host memory the engine commits, checked before anything is allocated
        self.config.check_host_memory(None if max_memory is None else int(max_memory))
        try:
            self._eng: Engine = make_engine(engine, self.config, fp16_mxm)
        except MemoryError:
            raise ConfigError(f"the host cannot allocate a chip of configuration {self.config.name!r} "
                              f"({self.config.sram_bytes / 2**20:,.0f} MiB of SRAM address space and "
                              f"{sum(self.config.host_memory().values()) / 2**20:,.0f} MiB of engine state)") from None
        self.program: Optional[Program] = None

    @property
    def engine(self) -> Engine:
        """The engine simulating this chip (:class:`lpucore.engine.Engine`): for host simulators
        and tools that drive it directly (``lpu_state(chip.engine)`` in Cython, see
        lpucore/_engine.pxd).  Run it only through the chip unless you know why not."""
        return self._eng

    @property
    def engine_name(self) -> str:
        """``"fast"`` or ``"reference"``."""
        return self._eng.name

    # ---- program -----------------------------------------------------------------------
    def load(self, program: Program) -> None:
        """Validate and load a program; the chip restarts at cycle 0 with its SRAM kept.

        Every program is validated (:meth:`Program.validate`), so no engine ever sees an
        operand out of range; a program validated before and unchanged since is not checked
        again (validate remembers it), so loading a compiled program costs little."""
        if not isinstance(program, Program):
            raise LpuError("Chip.load expects an lpucore.Program")
        if program.config != self.config:
            raise LpuError(f"program is for chip configuration {program.config.name!r}, "
                           f"this chip is {self.config.name!r} (or differs in a parameter)")
        program.validate()
        self._eng.load(program)
        self.program = program

    def engine_options(self) -> Dict[str, Any]:
        """The fast engine's host tuning options (:data:`ENGINE_OPTIONS`; ``{}`` on the reference
        engine, which has none). They change how fast the host simulates, never a result or a cycle."""
        return self._eng.options()

    def set_engine_options(self, **options: Any) -> None:
        """Set fast-engine host options: ``mxm_kernel`` (``"avx512"`` or ``"portable"``),
        ``helper_threads`` (0 or 1: a thread beside the cycle loop multiplies big MXM batches),
        ``small_rows`` (MXM batches of at most this many rows are multiplied inside the loop, the
        rest by NumPy), ``helper_delay_us`` (for tests: each helper job waits this long first, to
        exercise interleavings), ``bulk_reads`` (0 or 1: MEM Reads that only feed an LW copy their
        weight row straight into the MXM's buffer, from the second whole run of a program on).
        LpuError for an unknown option, a bad value, or the reference engine."""
        unknown = sorted(set(options) - set(ENGINE_OPTIONS))
        if unknown:
            raise LpuError(f"unknown engine option(s) {', '.join(unknown)}; options: {', '.join(ENGINE_OPTIONS)}")
        self._eng.set_options(**options)

    @property
    def host_time(self) -> Dict[str, float]:
        """The fast engine's host counters: wall seconds in the cycle loop (``loop_s``) and in MXM
        products (``mxm_products_s``), MXM batches by path (``mxm_batches``, ``mxm_small_batches``,
        ``mxm_helper_batches``), MEM Reads issued in bulk (``bulk_reads``) and the weight rows those
        named while an earlier LW into the row was still to come (``bulk_shared``); ``{}`` on the
        reference engine."""
        return dict(self._eng.host_time)

    def reset(self, clear_memory: bool = True) -> None:
        """Restart the loaded program at cycle 0; clears SRAM unless ``clear_memory=False``."""
        self._eng.reset(clear_memory)

    # ---- time ----------------------------------------------------------------------------
    @property
    def cycle(self) -> int:
        """Cycles simulated so far."""
        return int(self._eng.cycle)

    def run(self, max_cycles: Optional[int] = None, until: Optional[int] = None,
            trace: Union[str, os.PathLike[str], Recorder, None] = None,
            trace_window: Tuple[int, Optional[int]] = (0, None), events: Optional[Watcher] = None) -> RunStats:
        """Run until the program ends, or stop earlier: after ``max_cycles`` more cycles,
        or when the cycle counter reaches the absolute cycle ``until`` (whichever comes
        first; ``stats.finished`` tells whether the program ended).  A run never idles
        past the program's end (use :meth:`step` for that), so a host simulator can
        interleave ``run(until=c)`` and ``step(n)``: running in pieces gives the same
        memory, cycles and statistics as one run.  Raises ScheduleError on a schedule
        violation.  ``max_cycles`` and ``until`` are ints (NumPy integers too, not bools)
        in 0..MAX_CYCLE (2**62), else LpuError; so is a run with no program loaded.

        ``trace``: a file path (or a :class:`lpucore.trace.Recorder`) that receives one
        record per instruction issued in ``trace_window = (start, end)`` (absolute cycles;
        ``end`` None: to the end) and the units' counters, streamed (see
        :mod:`lpucore.trace`); the results are the same as without it.  ``events``: a
        :class:`lpucore.trace.Watcher` whose callbacks see issued instructions and MEM writes."""
        max_cycles = _cycles("run(max_cycles=...)", max_cycles)
        until = _cycles("run(until=...)", until)
        self._need_program("run")
        if trace is not None and events is not None:
            raise LpuError("run: trace and events cannot be combined in one run")
        stats: RunStats
        if events is not None:
            stats = events.run(self, max_cycles, until)
            return stats
        if trace is not None:
            from .trace import Recorder
            rec = trace if isinstance(trace, Recorder) else Recorder(trace, trace_window)
            stats = rec.record(self, max_cycles, until)
            return stats
        target: Optional[int] = None
        if max_cycles is not None:
            target = min(self.cycle + max_cycles, MAX_CYCLE)
        if until is not None:
            target = until if target is None else min(target, until)
        self._eng.run(target, idle=False)
        return self.stats()

    def step(self, n: int = 1) -> RunStats:
        """Advance exactly n cycles (past the end of the program, the chip just idles).  ``n`` is
        an int in 0..MAX_CYCLE (2**62) and the chip's cycle after the step may not pass MAX_CYCLE."""
        k = _cycles("step(n)", n)
        if k is None:
            raise LpuError("step(n) takes an int number of cycles, got None")
        self._need_program("step")
        if self.cycle + k > MAX_CYCLE:
            raise LpuError(f"step({k}) would take the chip past cycle {MAX_CYCLE} (2**62), the last one simulated")
        self._eng.run(self.cycle + k)
        return self.stats()

    def _need_program(self, what: str) -> None:
        if self.program is None:
            raise LpuError(f"Chip.{what}: no program is loaded (Chip.load(program) first)")

    # ---- snapshots -----------------------------------------------------------------------
    def snapshot(self) -> "Snapshot":
        """The whole state of the chip, bit for bit (SRAM, stream registers, VXM latches,
        MXM buffers, weights, accumulators and products in flight, ICU queues, pending
        effects, statistics, cycle) and the loaded program, as a :class:`Snapshot`.
        Nothing is shared with the chip: running on does not change the snapshot."""
        from .snapshot import Snapshot
        scalars, arrays = self._eng.get_state()
        prog = self.program.to_bytes() if self.program is not None else None
        return Snapshot(self._eng.name, self.config, self._eng.fp16_mxm, prog,
                        {k: int(v) for k, v in scalars.items()}, arrays)

    def restore(self, snap: "Snapshot") -> None:
        """Put the chip back in the state ``snap`` recorded.  The snapshot must come from
        a chip of the same configuration and engine (and ``fp16_mxm`` mode).  If this chip
        has a program loaded it must be the snapshot's; if it has none, the snapshot's is
        loaded.  Raises :class:`~lpucore.SnapshotError` otherwise, and also when any index,
        counter, pointer or flag in the snapshot is out of range for this configuration and
        program (a corrupted or hand-made snapshot); a chip that had the program loaded is
        then left as it was."""
        from .errors import SnapshotError
        from .snapshot import Snapshot, check_config
        if not isinstance(snap, Snapshot):
            raise SnapshotError("Chip.restore expects an lpucore.Snapshot (from Chip.snapshot or Snapshot.load)")
        check_config(snap, self.config)
        if snap.engine != self.engine_name:
            raise SnapshotError(f"snapshot was taken on the {snap.engine} engine and cannot be restored into a "
                                f"chip running the {self.engine_name} engine (the engines keep the state in "
                                f"different forms); use Chip(config, engine={snap.engine!r})")
        mode = self._eng.fp16_mxm
        if snap.fp16_mxm != mode:
            raise SnapshotError(f"snapshot was taken with fp16_mxm={snap.fp16_mxm!r}, this chip uses {mode!r}")
        if snap.program_bytes is None:
            if self.program is not None:
                raise SnapshotError("snapshot was taken with no program loaded, this chip has one")
        elif self.program is None:
            self.load(Program.from_bytes(snap.program_bytes))      # = snap.program
        elif self.program.to_bytes() != snap.program_bytes:
            raise SnapshotError("snapshot was taken with a different program loaded; load the snapshot's "
                                "program (snap.program) or use a fresh chip")
        arrays = {k: np.asarray(v) for k, v in snap.arrays.items()}
        self._eng.set_state(snap.scalars, arrays)

    def counters(self) -> Dict[str, npt.NDArray[np.int64]]:
        """The engine's raw statistics, name -> int64 array (copies; ``stats()`` summarises them):
        ``issued`` and ``icu`` per queue, ``bytes_read`` and ``bytes_written`` per MEM slice,
        ``mxm_macs`` and ``mxm_busy`` (cycles) per MXM plane, ``mxm_peak_macs`` ([1]: the most MACs
        started in one cycle), ``c2c_sent`` and ``c2c_received`` (vectors) per link."""
        return dict(self._eng.counters())

    def stats(self) -> RunStats:
        cfg = self.config
        ctr = self.counters()
        fin = bool(self._eng.finished)
        cycles = int(self._eng.finish_cycle) if fin else self.cycle
        names = [q.name for q in cfg.queues]
        issued = {n: int(v) for n, v in zip(names, ctr["issued"]) if v}
        icu = {n: int(v) for n, v in zip(names, ctr["icu"]) if v}
        sl = [cfg.slice_name(g) for g in range(cfg.mem_slices)]
        rd = {n: int(v) for n, v in zip(sl, ctr["bytes_read"]) if v}
        wr = {n: int(v) for n, v in zip(sl, ctr["bytes_written"]) if v}
        by_unit: Dict[str, Dict[str, int]] = {}
        for q in cfg.queues:
            u = by_unit.setdefault(q.unit, {"issued": 0, "busy_cycles": 0, "icu_instructions": 0})
            u["issued"] += issued.get(q.name, 0)
            u["busy_cycles"] += issued.get(q.name, 0)
            u["icu_instructions"] += icu.get(q.name, 0)
        by_unit["MEM"]["bytes_read"] = sum(rd.values())
        by_unit["MEM"]["bytes_written"] = sum(wr.values())
        planes = [cfg.plane_name(p) for p in range(cfg.mxm_planes)]
        macs = {n: int(v) for n, v in zip(planes, ctr["mxm_macs"])}
        busy_planes = {n: int(v) for n, v in zip(planes, ctr["mxm_busy"])}
        by_unit["MXM"]["macs"] = sum(macs.values())
        # a queue's busy cycles: one per issue, except fp16 ABCs that hold their plane longer
        busy = dict(issued)
        for n in planes:
            qn = f"MXM.{n}.ABC"
            if qn in busy:
                busy[qn] = busy_planes[n]
        by_unit["MXM"]["busy_cycles"] = sum(v for k, v in busy.items() if k.startswith("MXM."))
        peak = cfg.mxm_planes * cfg.mxm_size * cfg.mxm_size
        sent = {k: int(v) for k, v in enumerate(ctr["c2c_sent"]) if v}
        recv = {k: int(v) for k, v in enumerate(ctr["c2c_received"]) if v}
        # C2C instructions issue from SXM queues (counted there); the links' traffic:
        by_unit["C2C"] = {"vectors_sent": sum(sent.values()), "vectors_received": sum(recv.values()),
                          "bytes_sent": sum(sent.values()) * cfg.lanes,
                          "bytes_received": sum(recv.values()) * cfg.lanes}
        return RunStats(c2c_vectors_sent=sent, c2c_vectors_received=recv, cycles=cycles,
                        seconds=cycles / cfg.clock_hz, finished=fin, issued=issued,
                        busy_cycles=busy, icu_instructions=icu, mem_bytes_read=rd,
                        mem_bytes_written=wr, by_unit=by_unit, mxm_macs=macs, mxm_busy_cycles=busy_planes,
                        mxm_peak_macs_per_cycle=int(ctr["mxm_peak_macs"][0]), mxm_peak_per_cycle=peak)

    # ---- chip-to-chip links ------------------------------------------------------------------
    def c2c_take_outbox(self) -> List[Tuple[int, int, int, npt.NDArray[np.uint8]]]:
        """Take the vectors this chip has sent since the last call: a list of ``(link,
        send_cycle, arrival_cycle, vector)`` in send order (``vector``: ``lanes`` uint8).
        :class:`lpucore.System` does this between lockstep windows; a host simulator that
        holds the other end of a link does the same."""
        return self._eng.c2c_take_outbox()

    def c2c_deliver(self, link: int, arrival_cycle: int, vector: npt.NDArray[np.uint8]) -> None:
        """Put ``vector`` (``lanes`` bytes) in ``link``'s inbox, receivable from
        ``arrival_cycle`` on.  Arrivals on one link must come in order and not before the
        chip's current cycle; the chip keeps any number of them."""
        self._eng.c2c_deliver(link, arrival_cycle, vector)

    # ---- memory --------------------------------------------------------------------------
    def _slice(self, hemisphere: Hemisphere, slice_: int) -> int:
        cfg = self.config
        if isinstance(hemisphere, str):
            h = hemisphere.strip().upper()[:1]
            if h not in ("W", "E"):
                raise LpuError(f"hemisphere must be 'W' or 'E' (or 0/1), got {hemisphere!r}")
            hemisphere = "WE".index(h)
        if hemisphere not in (0, 1):
            raise LpuError(f"hemisphere must be 'W' or 'E' (or 0/1), got {hemisphere!r}")
        if not isinstance(slice_, (int, np.integer)) or not 0 <= slice_ < cfg.mem_slices_per_hemisphere:
            raise LpuError(f"slice must be 0..{cfg.mem_slices_per_hemisphere - 1}, got {slice_!r}")
        return cfg.slice_id(int(hemisphere), int(slice_))

    def _span(self, address: int, count: int) -> None:
        A = self.config.addresses_per_slice
        if not isinstance(address, (int, np.integer)) or not isinstance(count, (int, np.integer)) \
                or count < 1 or not 0 <= address <= A - count:
            raise LpuError(f"addresses {address}..{address}+{count} do not fit a slice of {A} addresses")

    def write_mem(self, hemisphere: Hemisphere, slice_: int, address: int, vectors: npt.NDArray[np.uint8]) -> None:
        """Write whole vectors (uint8 [n, lanes] or [lanes]) from ``address`` on."""
        g = self._slice(hemisphere, slice_)
        v = np.asarray(vectors)
        if v.dtype != np.uint8:
            raise LpuError(f"write_mem takes uint8 vectors, got {v.dtype}")
        if v.ndim == 1:
            v = v[None]
        if v.ndim != 2 or v.shape[1] != self.config.lanes:
            raise LpuError(f"write_mem takes vectors of {self.config.lanes} bytes, "
                           f"got shape {np.asarray(vectors).shape}")
        self._span(address, v.shape[0])
        self._eng.write_mem(g, int(address), np.ascontiguousarray(v))

    def read_mem(self, hemisphere: Hemisphere, slice_: int, address: int, count: int = 1) -> npt.NDArray[np.uint8]:
        """Read ``count`` vectors from ``address`` on, as uint8 [count, lanes]."""
        g = self._slice(hemisphere, slice_)
        self._span(address, count)
        return self._eng.read_mem(g, int(address), int(count))

    # ---- tensors ---------------------------------------------------------------------------
    def _tensor(self, name: str) -> TensorInfo:
        if self.program is None:
            raise TensorError("no program is loaded, so there is no tensor table")
        t = self.program.tensors.get(name)
        if t is None:
            raise TensorError(f"no tensor {name!r} in the program's table "
                              f"(it has {', '.join(self.program.tensors) or 'none'})")
        return t

    def _vector_rows(self, t: TensorInfo) -> Optional[npt.NDArray[np.int64]]:
        """SRAM row (slice * addresses + address) of each vector of each byte plane, int64
        [nbytes, nvectors], kept per tensor-table entry; None without the compiled bulk copies."""
        from . import fastload
        mod = fastload._loader()
        if mod is None or sys.byteorder != "little":
            return None
        cache: Dict[str, Tuple[TensorInfo, npt.NDArray[np.int64]]] = self.__dict__.setdefault("_rows", {})
        hit = cache.get(t.name)
        if hit is not None and hit[0] is t:
            return hit[1]
        lanes, A = self.config.lanes, self.config.addresses_per_slice
        idx = np.empty((t.dtype.nbytes, t.nvectors(lanes)), dtype=np.int64)
        for p in range(t.dtype.nbytes):
            g, a = plane_locations(t, p, lanes)
            idx[p] = g * A + a
        if len(cache) >= 256:
            cache.clear()
        cache[t.name] = (t, idx)
        return idx

    def _sram_rows(self) -> npt.NDArray[np.uint8]:
        """The SRAM as uint8 [slices * addresses, lanes], shared with the engine."""
        sram = self._eng.sram()
        if not sram.flags.c_contiguous:
            raise LpuError("the engine's SRAM is not one contiguous array")  # pragma: no cover
        return sram.reshape(-1, self.config.lanes)

    def write_tensor(self, name: str, array: npt.NDArray[Any], columns: Optional[npt.ArrayLike] = None) -> None:
        """Place a host array into MEM through the tensor table (dtype and shape must match exactly).
        ``columns``: write ``array[:, columns]`` instead (``array`` 2-D, as many rows as the tensor):
        with the compiled copies, read in place when every lane chunk's columns are consecutive (a
        tiled weight's member, a run of 320-column tiles of the whole weight), else copied first.

        With the compiled bulk copies (``lpucore._loader``) every vector of every byte plane is
        split from the host elements and copied into SRAM in one C pass (GB/s); else NumPy does
        it plane by plane."""
        t = self._tensor(name)
        idx = self._vector_rows(t)
        if columns is not None:
            rows, chunk_col = self._column_source(t, array, columns)        # checked on either path
            if rows is None or chunk_col is None or idx is None:
                self.write_tensor(name, np.ascontiguousarray(np.asarray(array)[:, np.asarray(columns)]))
            else:
                self._scatter(t, idx, rows, chunk_col)
            return
        a = check_array(t, array)
        if idx is not None:
            rows = a if a.ndim == 2 and a.shape[1] == t.cols and a.strides[1] == a.itemsize \
                else np.ascontiguousarray(a).reshape(-1, t.cols)
            self._scatter(t, idx, rows, np.arange(0, t.cols, self.config.lanes, dtype=np.int64))
            return
        planes = t.to_planes(a, self.config.lanes)
        for p in range(t.dtype.nbytes):
            where = _stripe_locations(t, p, self.config.lanes)
            if where is not None:
                self._eng.sram()[where] = planes[p]        # every vector at once (striped planes)
                continue
            for start, g, addr, n in _runs(t, p, self.config.lanes):
                self._eng.write_mem(g, addr, planes[p, start:start + n])

    def _scatter(self, t: TensorInfo, idx: npt.NDArray[np.int64], rows: npt.NDArray[Any],
                 chunk_col: npt.NDArray[np.int64]) -> None:
        """The compiled bulk copy of ``rows`` (the tensor's rows, any row stride) into SRAM."""
        from . import fastload
        if not fastload._loader().scatter_planes(self._sram_rows(), idx, rows.view(np.uint8), t.cols, chunk_col):
            raise TensorError(f"tensor {t.name!r} lies outside SRAM")  # pragma: no cover - checked at load

    def _column_source(self, t: TensorInfo, array: npt.ArrayLike, columns: npt.ArrayLike
                       ) -> Tuple[Optional[npt.NDArray[Any]], Optional[npt.NDArray[np.int64]]]:
        """(``array`` as rows to read in place, each lane chunk's first column) for
        ``write_tensor(t, array, columns)``, or (None, None) when it must be copied first (a chunk's
        columns not consecutive, rows not contiguous). Raises TensorError for a dtype or shape the
        tensor cannot take."""
        a = np.asarray(array)
        cols = np.asarray(columns)
        if a.dtype != t.dtype.numpy:
            raise TensorError(f"tensor {t.name!r} is {t.dtype.name}, got an array of {a.dtype}")
        if a.ndim != 2 or len(t.shape) != 2 or a.shape[0] != t.shape[0] or cols.shape != (t.cols,) \
                or cols.dtype.kind not in "iu":
            raise TensorError(f"tensor {t.name!r} has shape {t.shape}: columns must pick {t.cols} integer columns "
                              f"of a 2-D array of {t.shape[0] if t.shape else 0} rows, not {cols.shape} of {a.shape}")
        if cols.size and (cols.min() < 0 or cols.max() >= a.shape[1]):
            raise TensorError(f"tensor {t.name!r}: a column lies outside the array's {a.shape[1]}")
        L = self.config.lanes
        first = cols[::L].astype(np.int64)
        runs = cols.astype(np.int64) - np.repeat(first, L)[:cols.size] == np.arange(cols.size) % L
        if not runs.all() or a.strides[1] != a.itemsize:
            return None, None
        return a, np.ascontiguousarray(first)

    def read_tensor(self, name: str, out: Optional[npt.NDArray[Any]] = None) -> npt.NDArray[Any]:
        """Read a tensor from MEM through the tensor table; into ``out`` (a writable C-contiguous array of
        the tensor's shape and dtype, returned) instead of a new array when given: a caller reading the
        same tensor run after run keeps one buffer (a fresh one costs its pages' first touch, about a
        third of the copy)."""
        t = self._tensor(name)
        if out is not None:
            _check_out(t, out)
        idx = self._vector_rows(t)
        if idx is not None:
            if out is None:
                out = np.empty(t.shape, dtype=t.dtype.numpy)
            from . import fastload
            if not fastload._loader().gather_planes(self._sram_rows(), idx, out.reshape(-1).view(np.uint8), t.cols):
                raise TensorError(f"tensor {name!r} lies outside SRAM")  # pragma: no cover - checked at load
            return out
        nvec = t.nvectors(self.config.lanes)
        planes = np.empty((t.dtype.nbytes, nvec, self.config.lanes), dtype=np.uint8)
        for p in range(t.dtype.nbytes):
            where = _stripe_locations(t, p, self.config.lanes)
            if where is not None:
                planes[p] = self._eng.sram()[where]
                continue
            for start, g, addr, n in _runs(t, p, self.config.lanes):
                planes[p, start:start + n] = self._eng.read_mem(g, addr, n)
        got = t.from_planes(planes, self.config.lanes)
        if out is None:
            return got
        out[...] = got
        return out

    def memory(self) -> npt.NDArray[np.uint8]:
        """A copy of the whole SRAM, uint8 [slices, addresses, lanes] (slices are global ids,
        :meth:`ChipConfig.slice_id`): for comparing chips and engines."""
        out: npt.NDArray[np.uint8] = self._eng.sram().copy()
        return out


def _check_out(t: TensorInfo, out: Any) -> None:
    """``read_tensor``'s ``out``: a writable C-contiguous NumPy array of exactly the tensor's shape and dtype."""
    if not isinstance(out, np.ndarray):
        raise TensorError(f"read_tensor({t.name!r}, out=...) takes a NumPy array, got {type(out).__name__}")
    if out.shape != tuple(t.shape) or out.dtype != t.dtype.numpy:
        raise TensorError(f"read_tensor({t.name!r}, out=...) needs {t.dtype.name}{list(t.shape)}, "
                          f"got {out.dtype}{list(out.shape)}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise TensorError(f"read_tensor({t.name!r}, out=...) needs a writable C-contiguous array")


def _stripe_locations(t: TensorInfo, plane: int,
                      lanes: int) -> Optional[Tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
    """(slice array, address array) of every vector of a striped byte plane, or None for a plane
    of extents (few, long runs: written run by run). The tensor table was checked against the
    configuration when the program was, so every (slice, address) is inside SRAM."""
    from .layout import Stripes
    p = t.planes[plane]
    if not isinstance(p, Stripes):
        return None
    ch = t.chunks(lanes)
    v = np.arange(t.rows * ch, dtype=np.int64)
    r, c = np.divmod(v, ch)
    n = len(p.parts)
    parts = np.asarray(p.parts, dtype=np.int64).reshape(n, 2)
    k = (r + c) % n
    return parts[k, 0], parts[k, 1] + (r // n) * ch + c


def _runs(t: TensorInfo, plane: int, lanes: int) -> Iterator[Tuple[int, int, int, int]]:
    """(first vector, slice, address, count) runs of consecutive vectors at consecutive addresses."""
    from .layout import Stripes
    p = t.planes[plane]
    if not isinstance(p, Stripes):
        v = 0
        for e in p:
            yield v, e.slice, e.address, e.count
            v += e.count
        return
    locs = t.locations(plane, lanes)
    i = 0
    while i < len(locs):
        j = i + 1
        while j < len(locs) and locs[j][0] == locs[i][0] and locs[j][1] == locs[j - 1][1] + 1:
            j += 1
        yield i, locs[i][0], locs[i][1], j - i
        i = j
