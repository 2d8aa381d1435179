"""Stream registers, modelled literally: a register file at every position, shifted
one position per cycle (east-flowing ones eastward, west-flowing ones westward).

Within a cycle: first the values produced for this cycle land in their registers
(two producers on one register is a schedule error), then instructions issuing
this cycle read the registers at their positions, then everything moves one hop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Protocol, Tuple

import numpy as np
import numpy.typing as npt

from .. import errors

if TYPE_CHECKING:
    from ..config import ChipConfig

# a write waiting to land: (direction, position, stream, writer queue, bytes)
PendingWrite = Tuple[int, int, int, int, npt.NDArray[np.uint8]]


class StreamFile:
    def __init__(self, cfg: ChipConfig) -> None:
        self.cfg = cfg
        P, S, L = cfg.positions, cfg.streams_per_direction, cfg.lanes
        self.data = np.zeros((2, P, S, L), dtype=np.uint8)   # [direction, position, stream, lane]
        self.valid = np.zeros((2, P, S), dtype=bool)
        # writes that land in a later cycle: cycle -> list of (dir, pos, stream, writer queue, bytes)
        self.pending: Dict[int, List[PendingWrite]] = {}

    def reset(self) -> None:
        self.data[:] = 0
        self.valid[:] = False
        self.pending.clear()

    def schedule(self, cycle: int, v: int, pos: int, writer: int, vec: npt.ArrayLike) -> None:
        S = self.cfg.streams_per_direction
        self.pending.setdefault(cycle, []).append((v // S, pos, v % S, writer, np.array(vec, dtype=np.uint8)))

    def land(self, cycle: int) -> None:
        """Put this cycle's produced values into their registers."""
        writes = self.pending.pop(cycle, ())
        by_reg: Dict[Tuple[int, int, int], List[Tuple[int, npt.NDArray[np.uint8]]]] = {}
        for d, pos, s, q, vec in writes:
            by_reg.setdefault((d, s, pos), []).append((q, vec))
        for (d, s, pos), lst in sorted(by_reg.items()):
            if len(lst) > 1:
                a, b = sorted(q for q, _ in lst)[:2]
                raise errors.stream_conflict(self.cfg, cycle, a, b, d * self.cfg.streams_per_direction + s, pos)
            self.data[d, pos, s] = lst[0][1]
            self.valid[d, pos, s] = True

    def read(self, cycle: int, v: int, pos: int, q: int) -> npt.NDArray[np.uint8]:
        S = self.cfg.streams_per_direction
        d, s = v // S, v % S
        if not self.valid[d, pos, s]:
            raise errors.empty_read(self.cfg, cycle, q, v, pos)
        vec: npt.NDArray[np.uint8] = self.data[d, pos, s].copy()
        return vec

    def advance(self, k: int) -> None:
        """Move every value k hops in its direction; values leaving the die are gone."""
        if k <= 0:
            return
        P = self.cfg.positions
        if k >= P:
            self.valid[:] = False
            return
        self.data[0, k:] = self.data[0, :-k].copy()
        self.valid[0, k:] = self.valid[0, :-k].copy()
        self.valid[0, :k] = False
        self.data[1, :-k] = self.data[1, k:].copy()
        self.valid[1, :-k] = self.valid[1, k:].copy()
        self.valid[1, -k:] = False

    def next_event(self) -> Optional[int]:
        return min(self.pending) if self.pending else None


class Core(Protocol):
    """What every unit uses of the engine that drives it: the chip's configuration, the stream
    file, and the last cycle with an effect. Each unit module extends it with its own state (a
    protocol, so that the units never import the engine that imports them)."""

    @property
    def cfg(self) -> ChipConfig: ...
    @property
    def streams(self) -> StreamFile: ...

    def effect(self, cycle: int) -> None:
        """Note that something happens at ``cycle`` (the run is not over before it)."""
