"""The VXM: one ALU per queue, each with a latch holding its last result.

An instruction reads its operands in its issue cycle (streams passing the VXM's
position, or latches), computes with :mod:`lpucore.numerics`, and after its
delay the result lands in its ALU's latch and, if it has a destination, on that
stream group at the VXM's position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Protocol, Set, Tuple

import numpy as np
import numpy.typing as npt

from .. import dtypes as dt
from .. import errors, isa, numerics
from ._streams import Core

if TYPE_CHECKING:
    from ..config import ChipConfig, QueueInfo
    from ..program import Instruction


class Latches:
    def __init__(self, cfg: ChipConfig) -> None:
        self.cfg = cfg
        n = cfg.vxm_alus_per_lane
        self.bits = np.zeros((n, cfg.lanes), dtype=np.uint32)
        self.valid = np.zeros(n, dtype=bool)
        self.pending: Dict[int, List[Tuple[int, npt.NDArray[np.uint32]]]] = {}     # cycle -> list of (alu, bits)

    def reset(self) -> None:
        self.bits[:] = 0
        self.valid[:] = False
        self.pending.clear()

    def land(self, cycle: int) -> None:
        writes = self.pending.pop(cycle, ())
        seen: Set[int] = set()
        for alu, bits in sorted(writes, key=lambda w: w[0]):
            if alu in seen:
                raise errors.latch_conflict(self.cfg, cycle, alu)
            seen.add(alu)
            self.bits[alu] = bits
            self.valid[alu] = True

    def next_event(self) -> Optional[int]:
        return min(self.pending) if self.pending else None


def _operand(eng: Machine, q: QueueInfo, c: int, v: int, d: dt.DType) -> npt.NDArray[np.uint32]:
    """Raw bits of one src operand (a stream group of d's width, or a latch)."""
    if v >= isa.LATCH_BASE:
        k = v - isa.LATCH_BASE
        if not eng.latches.valid[k]:
            raise errors.empty_read(eng.cfg, c, q.index, v, q.position)
        bits: npt.NDArray[np.uint32] = eng.latches.bits[k] & numerics.mask_of(d)
        return bits
    planes = [eng.streams.read(c, v + i, q.position, q.index) for i in range(d.nbytes)]
    return numerics.planes_to_bits(planes, d)


def execute(eng: Machine, q: QueueInfo, ins: Instruction, args: Tuple[int, ...], c: int) -> None:
    cfg = eng.cfg
    op = ins.op
    a = dict(zip((f.name for f in op.fields), args))
    d = dt.get(a.get("dtype", dt.INT32.code))
    srcs: Dict[str, npt.NDArray[np.uint32]] = {}
    for f in op.fields:
        if f.kind == "src":
            srcs[f.name] = _operand(eng, q, c, a[f.name], d)
    out_d = d
    if op.cls == "const":
        res = numerics.vxm("const", d, imm=a["value"], lanes=cfg.lanes)
    elif op.cls == "cvt":
        out_d = dt.get(a["to"])
        res = numerics.vxm("cvt", d, srcs["a"], to=out_d)
    elif op.cls == "requant":
        out_d = dt.INT8
        res = numerics.vxm("requant", dt.INT32, srcs["a"], imm=a["mult"], shift=a["shift"], zp=a["zp"])
    elif op.cls == "select":
        res = numerics.vxm("select", d, srcs["a"], srcs["b"], srcs["m"])
    else:
        res = numerics.vxm(op.mnemonic, d, srcs["a"], srcs.get("b"))
    t = c + op.delay(cfg)
    eng.latches.pending.setdefault(t, []).append((q.slot, res.astype(np.uint32)))
    dst = a["dst"]
    if dst != isa.NONE:
        for i, plane in enumerate(numerics.bits_to_planes(res, out_d)):
            eng.streams.schedule(t, dst + i, q.position, q.index, plane)
    eng.effect(t)


class Machine(Core, Protocol):
    """What the VXM uses of the engine: the common part and its own state."""

    @property
    def latches(self) -> Latches: ...
