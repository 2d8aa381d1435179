"""The reference engine: plain NumPy, one simulated cycle at a time.

This is the executable specification of lpucore's timing model; the Cython
engine must match it bit for bit and cycle for cycle.  One cycle ``c``:

1. delayed MEM writes reach their banks, values produced for ``c`` land in
   their stream registers (a register written by two producers is a
   ``stream-conflict``) and results land in ALU latches;
2. every queue whose next issue is ``c`` issues, in queue-number order; operands
   are read from the registers at the unit's position in this cycle;
3. stream values move one position in their direction.

Cycles in which nothing is scheduled are skipped (the registers move by the
number of skipped hops).  A run ends when no queue has work left and every
scheduled effect has happened; its length is the last busy cycle + 1 plus the
``stagger - 1`` cycles the last superlane's wavefront trails superlane 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, SupportsInt, Tuple

import numpy as np
import numpy.typing as npt

from .. import errors
from ..errors import LpuError, ScheduleError, SnapshotError
from . import _c2c, _icu, _mem, _mxm, _sxm, _vxm
from ._icu import INF, QueueState
from ._streams import StreamFile

if TYPE_CHECKING:
    from ..config import ChipConfig, QueueInfo
    from ..program import Instruction, Program


class ReferenceEngine:
    """The reference engine (``engine="reference"``); satisfies lpucore.engine.Engine.  Each unit
    (streams, mem, latches, mxm, sxm, links) is an object that owns its state."""

    name = "reference"
    fp16_mxm = "exact"          # float16 MXM products are always exact here

    def __init__(self, cfg: ChipConfig) -> None:
        self.cfg = cfg
        self.streams = StreamFile(cfg)
        self.mem = _mem.Mem(cfg)
        self.latches = _vxm.Latches(cfg)
        self.mxm = _mxm.Mxm(cfg)
        self.sxm = _sxm.Sxm(cfg)
        self.links = _c2c.Links(cfg)
        self.program: Optional[Program] = None
        self._lists: List[List[Instruction]] = [[] for _ in cfg.queues]
        self._restart()

    # ---- state -----------------------------------------------------------------------
    def _restart(self) -> None:
        cfg = self.cfg
        self.streams.reset()
        self.latches.reset()
        self.mxm.reset()
        self.sxm.reset()
        self.links.reset()
        self.mem.reset(clear_memory=False)
        self.queues = [QueueState(q, self._lists[q.index]) for q in cfg.queues]
        self.notifies: List[int] = []       # issue cycle of each Notify, in order
        self.t = -1                 # last processed cycle
        self.cycle = 0              # cycles simulated
        self.last_effect = -1
        self.done = False
        self.error: Optional[ScheduleError] = None
        nq, ns = len(cfg.queues), cfg.mem_slices
        self.stats_issued = np.zeros(nq, dtype=np.int64)
        self.stats_icu = np.zeros(nq, dtype=np.int64)
        self.stats_bytes_read = np.zeros(ns, dtype=np.int64)
        self.stats_bytes_written = np.zeros(ns, dtype=np.int64)

    def load(self, program: Program) -> None:
        if program.config != self.cfg:
            raise LpuError("program was built for a different chip configuration")
        self.program = program
        self._lists = program.queue_lists()
        self._restart()

    def reset(self, clear_memory: bool = True) -> None:
        self._restart()
        if clear_memory:
            self.mem.sram[:] = 0

    # ---- bookkeeping used by the unit modules ---------------------------------------------
    def effect(self, cycle: int) -> None:
        if cycle > self.last_effect:
            self.last_effect = cycle

    def set_next(self, qs: QueueState, t: int) -> None:
        self.effect(t - 1)
        qs.next = t if (qs.rep_left or qs.pc < len(qs.prog)) else INF

    def execute(self, q: QueueInfo, ins: Instruction, args: Tuple[int, ...], c: int) -> None:
        self.stats_issued[q.index] += 1
        if ins.op.unit == "MEM":
            _mem.execute(self, q, ins, args, c)
        elif ins.op.unit == "VXM":
            _vxm.execute(self, q, ins, args, c)
        elif ins.op.unit == "MXM":
            _mxm.execute(self, q, ins, args, c)
        elif ins.op.unit == "SXM":
            _sxm.execute(self, q, ins, args, c)
        elif ins.op.unit == "C2C":
            _c2c.execute(self, q, ins, args, c)
        else:  # pragma: no cover - the validator rejects this
            raise LpuError(f"no unit executes {ins.op.mnemonic}")

    @property
    def finish_cycle(self) -> int:
        return self.last_effect + self.cfg.stagger if self.last_effect >= 0 else 0

    @property
    def finished(self) -> bool:
        return self.done and self.cycle >= self.finish_cycle

    # ---- running ------------------------------------------------------------------------
    def _next_event(self) -> Optional[float]:
        cands = [q.next for q in self.queues if q.next != INF]
        for e in (self.streams.next_event(), self.latches.next_event(), self.mem.next_event(),
                  self.mxm.next_event()):
            if e is not None:
                cands.append(e)
        return min(cands) if cands else None

    def run(self, until: Optional[int] = None, idle: bool = True) -> None:
        """Simulate up to (not including) cycle ``until``, or to the end of the program.
        With ``idle=False`` a run that reaches the end of the program stops at its
        finish cycle even when ``until`` lies beyond it."""
        if self.error is not None:
            raise self.error
        try:
            self._run(until, idle)
        except ScheduleError as e:
            self.error = e
            raise

    def _run(self, until: Optional[int], idle: bool = True) -> None:
        while True:
            c = self._next_event()
            if c is None:
                parked = [q for q in self.queues if q.wait_for is not None]
                if parked:
                    q = parked[0]
                    assert q.wait_for is not None     # parked: kept by the filter above
                    self.cycle = max(self.cycle, self.last_effect + 1)
                    raise errors.deadlock(self.cfg, q.sync_cycle, q.info.index, q.wait_for, len(self.notifies))
                self.done = True
                target = self.finish_cycle if until is None else (until if idle else min(until, self.finish_cycle))
                self.cycle = max(self.cycle, target)
                return
            if until is not None and c >= until:
                self.cycle = max(self.cycle, until)
                return
            c = int(c)
            self.streams.advance(c - self.t)
            self.t = c
            self.cycle = c + 1
            self.mem.commit(c)
            self.streams.land(c)
            self.latches.land(c)
            self.mxm.land(c)
            for qs in self.queues:
                if qs.next == c:
                    _icu.issue(self, qs, c)

    # ---- host access -------------------------------------------------------------------------
    def sram(self) -> npt.NDArray[np.uint8]:
        """SRAM as a uint8 [slices, addresses, lanes] array (the engine's own: writes land)."""
        return self.mem.sram

    @property
    def host_time(self) -> Dict[str, float]:
        """No host counters: the reference engine has no fast paths to account for."""
        return {}

    def options(self) -> Dict[str, Any]:
        """No host tuning options."""
        return {}

    def set_options(self, **options: Any) -> None:
        if options:
            raise LpuError(f"the {self.name} engine has no host options")

    def get_state(self) -> Tuple[Dict[str, int], Dict[str, npt.NDArray[Any]]]:
        """(scalars, arrays): the whole state, copied (lpucore.reference._snapshot)."""
        if self.error is not None:
            raise SnapshotError("cannot snapshot a chip stopped by a schedule error")
        from ._snapshot import get_state
        return get_state(self)

    def set_state(self, scalars: Mapping[str, int], arrays: Mapping[str, npt.NDArray[Any]]) -> None:
        """Replace the state with one from get_state, every value checked first."""
        from ._snapshot import set_state
        set_state(self, scalars, arrays)

    def read_mem(self, gslice: int, addr: int, count: int = 1) -> npt.NDArray[np.uint8]:
        out: npt.NDArray[np.uint8] = self.mem.sram[gslice, addr:addr + count].copy()
        return out

    def write_mem(self, gslice: int, addr: int, data: npt.ArrayLike) -> None:
        data = np.asarray(data, dtype=np.uint8)
        self.mem.sram[gslice, addr:addr + data.shape[0]] = data

    # ---- links (the host or lpucore.System holds the other ends) ------------------------------
    def c2c_take_outbox(self) -> List[_c2c.Sent]:
        """The vectors sent since the last call: a list of (link, send cycle, arrival cycle, bytes)."""
        return self.links.take_outbox()

    def c2c_deliver(self, link: SupportsInt, arrival: SupportsInt, vec: npt.ArrayLike) -> None:
        self.links.deliver(int(link), int(arrival), vec, self.cycle)

    def counters(self) -> Dict[str, npt.NDArray[np.int64]]:
        return {"issued": self.stats_issued.copy(), "icu": self.stats_icu.copy(),
                "bytes_read": self.stats_bytes_read.copy(), "bytes_written": self.stats_bytes_written.copy(),
                "mxm_macs": self.mxm.macs.copy(), "mxm_busy": self.mxm.busy.copy(),
                "mxm_peak_macs": np.array([self.mxm.peak], dtype=np.int64),
                "c2c_sent": self.links.sent.copy(), "c2c_received": self.links.received.copy()}
