"""The SXM: lane movement.  Each instruction reads its streams at the SXM's position
and writes its result there ``sxm_delay`` cycles later; in one cycle a hemisphere
can use at most ``sxm_<resource>`` units of each kind."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Protocol, Tuple

import numpy as np
import numpy.typing as npt

from .. import errors
from ._streams import Core

if TYPE_CHECKING:
    from ..config import ChipConfig, QueueInfo
    from ..program import Instruction


class Sxm:
    def __init__(self, cfg: ChipConfig) -> None:
        self.cfg = cfg
        self.use: Dict[Tuple[int, int, str], int] = {}     # (cycle, hemisphere, resource) -> units in use

    def reset(self) -> None:
        self.use = {}


def execute(eng: Machine, q: QueueInfo, ins: Instruction, args: Tuple[int, ...], c: int) -> None:
    cfg, st = eng.cfg, eng.streams
    op = ins.op
    key = (c, q.hemisphere, op.resource)
    if eng.sxm.use.get(key, 0) >= getattr(cfg, "sxm_" + op.resource):
        raise errors.resource_error(cfg, c, q.index, op.resource)
    eng.sxm.use = {k: v for k, v in eng.sxm.use.items() if k[0] == c}
    eng.sxm.use[key] = eng.sxm.use.get(key, 0) + 1
    L, n_sl = cfg.lanes, cfg.lanes_per_superlane

    def rd(v: int) -> npt.NDArray[np.uint8]:
        return st.read(c, v, q.position, q.index)

    name = op.mnemonic
    a = dict(zip((f.name for f in op.fields), args))
    outs: List[Tuple[int, npt.NDArray[np.uint8]]] = []     # (stream, vector)
    if name == "Shift":
        x, n = rd(a["src"]), a["n"]
        y = np.zeros(L, dtype=np.uint8)
        if n >= 0:
            y[n:] = x[:L - n]
        else:
            y[:L + n] = x[-n:]
        outs.append((a["dst"], y))
    elif name == "Permute":
        x = rd(a["src"])
        m = rd(a["map"]).astype(np.int64) | (rd(a["map"] + 1).astype(np.int64) << 8)
        m = np.where(m >= 32768, m - 65536, m)
        ok = (m >= 0) & (m < L)
        outs.append((a["dst"], np.where(ok, x[np.where(ok, m, 0)], 0).astype(np.uint8)))
    elif name == "Distribute":
        x, m = rd(a["src"]), rd(a["map"]).astype(np.int64)
        base = (np.arange(L) // n_sl) * n_sl
        ok = m < n_sl
        outs.append((a["dst"], np.where(ok, x[base + np.where(ok, m, 0)], 0).astype(np.uint8)))
    elif name == "Rotate":
        n = a["n"]
        xs = [rd(a["src"] + i) for i in range(n)]
        for i in range(n):
            for j in range(n):
                outs.append((a["dst"] + i * n + j, np.roll(xs[i], j)))
    elif name == "Transpose":
        xm = np.stack([rd(a["src"] + i) for i in range(n_sl)])          # [stream, lane]
        blocks = xm.reshape(n_sl, L // n_sl, n_sl)                       # [stream i, superlane, lane j]
        ys = blocks.transpose(2, 1, 0).reshape(n_sl, L)                  # [stream j, superlane, lane i]
        outs += [(a["dst"] + j, ys[j].copy()) for j in range(n_sl)]
    else:  # Select
        x, y, sel = rd(a["a"]), rd(a["b"]), rd(a["m"])
        outs.append((a["dst"], np.where(sel != 0, x, y).astype(np.uint8)))
    T = c + cfg.sxm_delay
    for v, vec in outs:
        st.schedule(T, v, q.position, q.index, vec)
    eng.effect(T)


class Machine(Core, Protocol):
    """What the SXM uses of the engine: the common part and its own state."""

    @property
    def sxm(self) -> Sxm: ...
