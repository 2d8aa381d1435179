"""C2C: the chip-to-chip links, as seen from one chip.

Each hemisphere has one C2C queue at the SXM position, driving links
``0 .. n/2 - 1`` (West) and ``n/2 .. n - 1`` (East), though either queue may
name any link.  Timing rules, the same in both engines:

* ``Deskew link`` in cycle c makes the link usable from ``c + c2c_deskew_delay``;
  Send or Receive on a link before that (or never deskewed since the last
  reset) is a ``link-skew`` error.
* ``Send link, src`` in cycle c reads stream src at the queue's position (an
  empty register is an ``empty-read``), occupies the link until
  ``c + c2c_send_interval`` (a Send before then is ``link-busy``) and puts the
  vector in the chip's *outbox* with arrival cycle ``c + c2c_latency``.  Whoever
  holds the other end (an :class:`lpucore.System`, or a host simulator) takes
  the outbox and delivers each vector to the receiving chip's *inbox*.
* ``Receive link, dst`` in cycle c takes the oldest vector in the link's inbox
  whose arrival cycle is <= c (none: ``link-empty``) and writes it to stream
  dst at the queue's position ``c2c_receive_delay`` cycles later.

Checks run in the order skew, busy, stream read (Send) and skew, arrival
(Receive).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Deque, List, Protocol, Tuple

import numpy as np
import numpy.typing as npt

from .. import errors
from ..errors import LpuError
from ._streams import Core

if TYPE_CHECKING:
    from ..config import ChipConfig, QueueInfo
    from ..program import Instruction

# a vector sent: (link, send cycle, arrival cycle, bytes)
Sent = Tuple[int, int, int, npt.NDArray[np.uint8]]


class Links:
    def __init__(self, cfg: ChipConfig) -> None:
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        n = self.cfg.c2c_links
        self.busy_until = [0] * n          # first cycle each link takes a new Send
        self.ready = [-1] * n              # first cycle after the last Deskew, -1: never deskewed
        # (arrival cycle, vector), in arrival order
        self.inbox: List[Deque[Tuple[int, npt.NDArray[np.uint8]]]] = [deque() for _ in range(n)]
        self.outbox: List[Sent] = []       # (link, send cycle, arrival cycle, vector)
        self.sent = np.zeros(n, dtype=np.int64)
        self.received = np.zeros(n, dtype=np.int64)

    def deliver(self, link: int, arrival: int, vec: npt.ArrayLike, now: int) -> None:
        """Host side: ``vec`` reaches ``link``'s inbox in cycle ``arrival``."""
        cfg = self.cfg
        if not 0 <= link < cfg.c2c_links:
            raise LpuError(f"no link {link}: the chip has links 0..{cfg.c2c_links - 1}")
        vec = np.asarray(vec, dtype=np.uint8).reshape(-1)
        if vec.shape[0] != cfg.lanes:
            raise LpuError(f"a link carries {cfg.lanes}-byte vectors, got {vec.shape[0]} bytes")
        if arrival < now:
            raise LpuError(f"a vector arriving in cycle {arrival} on link {link} comes too late: the chip is "
                           f"already at cycle {now}")
        ib = self.inbox[link]
        if ib and arrival < ib[-1][0]:
            raise LpuError(f"link {link} delivers in order: arrival {arrival} is before the previous {ib[-1][0]}")
        ib.append((int(arrival), vec.copy()))

    def take_outbox(self) -> List[Sent]:
        out, self.outbox = self.outbox, []
        return out


def _check_ready(eng: Machine, q: QueueInfo, link: int, c: int) -> None:
    r = eng.links.ready[link]
    if r < 0 or c < r:
        raise errors.link_error(eng.cfg, c, q.index, link, "skew", r)


def execute(eng: Machine, q: QueueInfo, ins: Instruction, args: Tuple[int, ...], c: int) -> None:
    cfg, lk = eng.cfg, eng.links
    name = ins.op.mnemonic
    link = args[0]
    if name == "Deskew":
        lk.ready[link] = c + cfg.c2c_deskew_delay
        eng.effect(c + cfg.c2c_deskew_delay)
        return
    _check_ready(eng, q, link, c)
    if name == "Send":
        if c < lk.busy_until[link]:
            raise errors.link_error(cfg, c, q.index, link, "busy", lk.busy_until[link])
        vec = eng.streams.read(c, args[1], q.position, q.index)
        lk.busy_until[link] = c + cfg.c2c_send_interval
        lk.outbox.append((link, c, c + cfg.c2c_latency, vec))
        lk.sent[link] += 1
        return
    # Receive
    ib = lk.inbox[link]
    if not ib or ib[0][0] > c:
        raise errors.link_error(cfg, c, q.index, link, "empty", ib[0][0] if ib else -1)
    _, vec = ib.popleft()
    T = c + cfg.c2c_receive_delay
    eng.streams.schedule(T, args[1], q.position, q.index, vec)
    eng.effect(T)
    lk.received[link] += 1


class Machine(Core, Protocol):
    """What C2C uses of the engine: the common part and its own state."""

    @property
    def links(self) -> Links: ...
