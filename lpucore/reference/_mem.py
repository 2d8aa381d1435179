"""MEM slices: SRAM, two banks per slice, Read / Write / Gather / Scatter.

A Read (Gather) accesses its bank in its issue cycle and puts the vector on its
stream ``mem_read_delay`` cycles later.  A Write (Scatter) samples its stream in
its issue cycle and writes the bank ``mem_write_delay`` cycles later.  A read
access and a write access of one slice in one cycle must use different banks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Protocol, Sequence, Set, Tuple

import numpy as np
import numpy.typing as npt

from .. import errors
from ._streams import Core

if TYPE_CHECKING:
    from ..config import ChipConfig, QueueInfo
    from ..program import Instruction


class Mem:
    def __init__(self, cfg: ChipConfig) -> None:
        self.cfg = cfg
        self.sram = np.zeros((cfg.mem_slices, cfg.addresses_per_slice, cfg.lanes), dtype=np.uint8)
        # cycle -> list of (slice, addresses per superlane, data)
        self.pending: Dict[int, List[Tuple[int, List[int], npt.NDArray[np.uint8]]]] = {}
        self.banks_written: Dict[int, Set[int]] = {}    # slice -> banks written in the current cycle

    def reset(self, clear_memory: bool = True) -> None:
        if clear_memory:
            self.sram[:] = 0
        self.pending.clear()
        self.banks_written = {}

    def commit(self, cycle: int) -> None:
        """Apply the bank writes that happen in this cycle."""
        self.banks_written = {}
        for gslice, addrs, data in self.pending.pop(cycle, ()):
            L = self.cfg.lanes_per_superlane
            for k, a in enumerate(addrs):
                self.sram[gslice, a, k * L:(k + 1) * L] = data[k * L:(k + 1) * L]
                self.banks_written.setdefault(gslice, set()).add(self.cfg.bank_of(a))

    def check_bank(self, cycle: int, q: int, gslice: int, addrs: Iterable[int]) -> None:
        written = self.banks_written.get(gslice, ())
        for a in addrs:
            if self.cfg.bank_of(a) in written:
                raise errors.bank_conflict(self.cfg, cycle, q, gslice, a)

    def map_addresses(self, cycle: int, q: int, planes: Sequence[npt.NDArray[np.uint8]]) -> List[int]:
        """Addresses of a Gather/Scatter map: the int16 in lane 0 of each superlane."""
        L = self.cfg.lanes_per_superlane
        lo, hi = planes[0][::L].astype(np.int64), planes[1][::L].astype(np.int64)
        addrs = lo | (hi << 8)
        addrs = np.where(addrs >= 32768, addrs - 65536, addrs)
        for k, a in enumerate(addrs):
            if not 0 <= a < self.cfg.addresses_per_slice:
                raise errors.address_error(self.cfg, cycle, q, k, int(a))
        return [int(a) for a in addrs]

    def read(self, gslice: int, addrs: Iterable[int]) -> npt.NDArray[np.uint8]:
        L = self.cfg.lanes_per_superlane
        out = np.empty(self.cfg.lanes, dtype=np.uint8)
        for k, a in enumerate(addrs):
            out[k * L:(k + 1) * L] = self.sram[gslice, a, k * L:(k + 1) * L]
        return out

    def schedule_write(self, cycle: int, gslice: int, addrs: Iterable[int], data: npt.ArrayLike) -> None:
        self.pending.setdefault(cycle, []).append((gslice, list(addrs), np.array(data, dtype=np.uint8)))

    def next_event(self) -> Optional[int]:
        return min(self.pending) if self.pending else None


def execute(eng: Machine, q: QueueInfo, ins: Instruction, args: Tuple[int, ...], c: int) -> None:
    """Issue one MEM instruction of queue q at cycle c (args: fields after Repeat strides)."""
    cfg, mem, st = eng.cfg, eng.mem, eng.streams
    g = cfg.slice_id(q.hemisphere, q.slot)
    n_sl = cfg.superlanes
    name = ins.op.mnemonic
    if name in ("Read", "Gather"):
        if name == "Read":
            addr, dst = args
            addrs = [addr] * n_sl
        else:
            dst, mp = args
            planes = [st.read(c, mp, q.position, q.index), st.read(c, mp + 1, q.position, q.index)]
            addrs = mem.map_addresses(c, q.index, planes)
        mem.check_bank(c, q.index, g, addrs)
        vec = mem.read(g, addrs)
        st.schedule(c + cfg.mem_read_delay, dst, q.position, q.index, vec)
        eng.effect(c + cfg.mem_read_delay)
        eng.stats_bytes_read[g] += cfg.lanes
    else:
        if name == "Write":
            addr, src = args
            vec = st.read(c, src, q.position, q.index)
            addrs = [addr] * n_sl
        else:
            src, mp = args
            vec = st.read(c, src, q.position, q.index)
            planes = [st.read(c, mp, q.position, q.index), st.read(c, mp + 1, q.position, q.index)]
            addrs = mem.map_addresses(c, q.index, planes)
        mem.schedule_write(c + cfg.mem_write_delay, g, addrs, vec)
        eng.effect(c + cfg.mem_write_delay)
        eng.stats_bytes_written[g] += cfg.lanes


class Machine(Core, Protocol):
    """What MEM uses of the engine: the common part and its own state."""

    @property
    def mem(self) -> Mem: ...
    @property
    def stats_bytes_read(self) -> npt.NDArray[np.int64]: ...
    @property
    def stats_bytes_written(self) -> npt.NDArray[np.int64]: ...
