"""The MXM: four planes, each a weight buffer, an installed weight array and accumulators.

``LW`` copies stream vectors into weight-buffer byte-rows; ``IW`` snapshots the
buffer, and ABCs issued ``mxm_install_delay`` cycles later use it; ``ABC``
multiplies the activation passing the plane by the installed weights and the
product lands in an accumulator ``mxm_delay`` cycles later; ``ACC`` puts an
accumulator on four streams.  Arithmetic: :mod:`lpucore.matmul`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Protocol, Tuple, Union

import numpy as np
import numpy.typing as npt

from .. import dtypes as dt
from .. import errors, matmul, numerics
from ._streams import Core

if TYPE_CHECKING:
    from ..config import ChipConfig, QueueInfo
    from ..program import Instruction


class Plane:
    def __init__(self, cfg: ChipConfig) -> None:
        R, L = cfg.mxm_size, cfg.lanes
        self.buffer = np.zeros((R, L), dtype=np.uint8)
        self.array: Optional[npt.NDArray[np.uint8]] = None      # installed weight bytes [R, L]
        self.dtype: Optional[dt.DType] = None                  # their dtype (INT8 or FLOAT16)
        # pending (cycle, bytes, dtype), in issue order
        self.installs: List[Tuple[int, npt.NDArray[np.uint8], dt.DType]] = []
        self.acc = np.zeros((cfg.mxm_accumulators, L), dtype=np.uint32)
        self.busy_until = 0


class Mxm:
    def __init__(self, cfg: ChipConfig) -> None:
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        self.planes = [Plane(self.cfg) for _ in range(self.cfg.mxm_planes)]
        # cycle -> [(plane, acc, add, dtype, result bits)]
        self.pending: Dict[int, List[Tuple[int, int, int, dt.DType, npt.NDArray[np.uint32]]]] = {}
        self.macs = np.zeros(self.cfg.mxm_planes, dtype=np.int64)
        self.busy = np.zeros(self.cfg.mxm_planes, dtype=np.int64)
        self.macs_in_cycle: Dict[int, int] = {}      # issue cycle -> MACs started in it
        self.peak = 0

    def land(self, cycle: int) -> None:
        for p, acc, add, d, res in self.pending.pop(cycle, ()):
            pl = self.planes[p]
            if not add:
                pl.acc[acc] = res
            elif d == dt.INT8:
                pl.acc[acc] = (pl.acc[acc].astype(np.int64) + res.view(np.int32)).astype(np.uint32)
            else:
                s = pl.acc[acc].view(np.float32) + res.view(np.float32)
                pl.acc[acc] = numerics.from_float(s, dt.FLOAT32)

    def next_event(self) -> Optional[int]:
        return min(self.pending) if self.pending else None

    def weights_at(self, pl: Plane, c: int) -> None:
        """Make the last install effective by cycle c the plane's array."""
        while pl.installs and pl.installs[0][0] <= c:
            _, pl.array, pl.dtype = pl.installs.pop(0)


def execute(eng: Machine, q: QueueInfo, ins: Instruction, args: Tuple[int, ...], c: int) -> None:
    cfg, st, mx = eng.cfg, eng.streams, eng.mxm
    pl = mx.planes[q.slot]
    name = ins.op.mnemonic
    if name == "LW":
        src, n, row = args
        vecs = [st.read(c, src + i, q.position, q.index) for i in range(n)]
        for i, v in enumerate(vecs):
            pl.buffer[row + i] = v
    elif name == "IW":
        (dcode,) = args
        pl.installs.append((c + cfg.mxm_install_delay, pl.buffer.copy(), dt.get(dcode)))
        eng.effect(c + cfg.mxm_install_delay)
    elif name == "ABC":
        dcode, src, acc, add = args
        d = dt.get(dcode)
        if d == dt.FLOAT16 and c < pl.busy_until:
            raise errors.mxm_error(cfg, c, q.index, "busy")
        mx.weights_at(pl, c)
        if pl.array is None:
            raise errors.mxm_error(cfg, c, q.index, "empty")
        if pl.dtype != d:
            raise errors.mxm_error(cfg, c, q.index, "dtype")
        planes = [st.read(c, src + i, q.position, q.index) for i in range(d.nbytes)]
        L = cfg.lanes
        x: npt.NDArray[Union[np.int8, np.float16]]        # the activation row in d's NumPy type
        if d == dt.INT8:
            x = planes[0].view(np.int8)[None, :]
            w = pl.array.view(np.int8)
            res = matmul.int8_dot(x, w)[0].view(np.uint32)
            macs, busy = L * L, 1
        else:
            K = L // 2
            x = (planes[0].astype(np.uint16) | (planes[1].astype(np.uint16) << 8))[:K].view(np.float16)[None, :]
            w = (pl.array[0::2].astype(np.uint16) | (pl.array[1::2].astype(np.uint16) << 8)).view(np.float16)
            res = numerics.from_float(matmul.fp16_dot_exact(x, w)[0], dt.FLOAT32)
            macs, busy = K * L, cfg.mxm_fp16_interval
            pl.busy_until = c + cfg.mxm_fp16_interval
        T = c + cfg.mxm_delay
        mx.pending.setdefault(T, []).append((q.slot, acc, add, d, res.astype(np.uint32)))
        eng.effect(T)
        mx.macs[q.slot] += macs
        mx.busy[q.slot] += busy
        mx.macs_in_cycle[c] = mx.macs_in_cycle.get(c, 0) + macs
        mx.peak = max(mx.peak, mx.macs_in_cycle[c])
    else:  # ACC
        acc, dst = args
        bits = pl.acc[acc]
        T = c + cfg.mxm_acc_delay
        for i, plane in enumerate(numerics.bits_to_planes(bits, dt.INT32)):
            st.schedule(T, dst + i, q.position, q.index, plane)
        eng.effect(T)


class Machine(Core, Protocol):
    """What the MXM uses of the engine: the common part and its own state."""

    @property
    def mxm(self) -> Mxm: ...
