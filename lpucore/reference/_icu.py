"""The ICU: one in-order instruction queue per functional slice.

A queue issues at most one instruction per cycle.  ``NOP n`` makes the next
instruction issue n cycles later.  ``X; Repeat n, d, s`` issues X, then n more
copies of X d cycles apart (address + k*s), and the next instruction the cycle
after the last copy.  The k-th ``Sync`` of a queue parks it until
``notify_delay`` cycles after the k-th ``Notify`` issued anywhere on the chip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Protocol, Tuple

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from ..config import ChipConfig, QueueInfo
    from ..program import Instruction

INF = float("inf")


class QueueState:
    __slots__ = ("info", "prog", "pc", "next", "rep_ins", "rep_left", "rep_k", "rep_d", "rep_stride",
                 "syncs", "wait_for", "sync_cycle")

    def __init__(self, info: QueueInfo, prog: List[Instruction]) -> None:
        self.info = info
        self.prog = prog              # list of Instruction
        self.pc = 0
        self.next: float = 0 if prog else INF     # next issue cycle (an int), INF: none scheduled
        self.rep_ins: Optional[Instruction] = None
        self.rep_left = 0
        self.rep_k = 0
        self.rep_d = 0
        self.rep_stride = 0
        self.syncs = 0
        self.wait_for: Optional[int] = None   # parked on this Notify number (1-based)
        self.sync_cycle = 0

    @property
    def done(self) -> bool:
        return self.rep_left == 0 and self.pc >= len(self.prog) and self.wait_for is None


def strided_args(ins: Instruction, k: int, stride: int) -> Tuple[int, ...]:
    if not k or not stride:
        return tuple(ins.args)
    return tuple(v + k * stride if f.strided else v for f, v in zip(ins.op.fields, ins.args))


def issue(eng: Machine, qs: QueueState, c: int) -> None:
    """Issue the queue's next instruction (or repetition) in cycle c."""
    if qs.rep_left:
        assert qs.rep_ins is not None     # a Repeat sets rep_ins with rep_left
        qs.rep_k += 1
        qs.rep_left -= 1
        eng.execute(qs.info, qs.rep_ins, strided_args(qs.rep_ins, qs.rep_k, qs.rep_stride), c)
        eng.set_next(qs, c + qs.rep_d if qs.rep_left else c + 1)
        return
    ins = qs.prog[qs.pc]
    qs.pc += 1
    name = ins.op.mnemonic
    if ins.op.unit == "ICU":
        eng.stats_icu[qs.info.index] += 1
        if name == "NOP":
            eng.set_next(qs, c + ins["n"])
        elif name == "Sync":
            qs.syncs += 1
            qs.sync_cycle = c
            if len(eng.notifies) >= qs.syncs:
                eng.set_next(qs, max(c + 1, eng.notifies[qs.syncs - 1] + eng.cfg.notify_delay))
            else:
                qs.wait_for = qs.syncs
                qs.next = INF
        elif name == "Notify":
            eng.notifies.append(c)
            n = len(eng.notifies)
            for other in eng.queues:
                if other.wait_for == n:
                    other.wait_for = None
                    eng.set_next(other, c + eng.cfg.notify_delay)
            eng.set_next(qs, c + 1)
        return
    eng.execute(qs.info, ins, tuple(ins.args), c)
    if qs.pc < len(qs.prog) and qs.prog[qs.pc].op.mnemonic == "Repeat":
        rep = qs.prog[qs.pc]
        qs.pc += 1
        eng.stats_icu[qs.info.index] += 1
        qs.rep_ins, qs.rep_left, qs.rep_k = ins, rep["n"], 0
        qs.rep_d, qs.rep_stride = rep["d"], rep["stride"]
        eng.set_next(qs, c + qs.rep_d)
    else:
        eng.set_next(qs, c + 1)


class Machine(Protocol):
    """What the instruction queues use of the engine: their states, the Notify log, the issue
    counters, and the engine's execute (which hands an instruction to its unit)."""

    @property
    def cfg(self) -> ChipConfig: ...
    @property
    def queues(self) -> List[QueueState]: ...
    @property
    def notifies(self) -> List[int]: ...
    @property
    def stats_icu(self) -> npt.NDArray[np.int64]: ...

    def execute(self, q: QueueInfo, ins: Instruction, args: Tuple[int, ...], c: int) -> None: ...
    def set_next(self, qs: QueueState, t: int) -> None: ...
