"""The compiler's reservation table: every instruction at an exact cycle, no hazards.

A kernel proposes a *plan* (instructions at cycles, stream-register spans,
bank accesses, ALU-latch lifetimes, SXM units, MEM addresses) relative to a
start cycle; :meth:`Scheduler.fits` checks it against everything already
placed, and :meth:`Scheduler.commit` records it.  The rules are the engines'
own: a queue issues at most once a cycle; a value on a stream register must
not be overwritten between its producer and its last consumer, and two
producers never write one register in one cycle; a read never meets a write
landing in its bank; a latch is not overwritten while a chained op still needs
it; a hemisphere uses at most its SXM units in a cycle.  So a program built
this way passes the engines' schedule checks by construction.
"""

from __future__ import annotations

import contextlib
import gc
import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Set, Tuple

from .. import isa
from ..config import ChipConfig
from ..errors import CompileError, ProgramError
from ..program import Instruction, make_instruction

# The collector's thresholds while a compile runs (young objects, then collections of the younger
# generations between older ones). A compile keeps millions of small objects (the reservation table's
# bitmaps' owners, events, the tensors' plans) alive and makes as many that die young: with Python's
# defaults (700, 10, 10) it spends about a quarter of GPT-2-small's compile rescanning the long-lived ones
# (11.2 s of CPU against 8.2 s with the collector off, 2026-12-06). A larger first threshold still frees
# the cyclic garbage of the compiler's closures while it is young; the older generations are rescanned
# 100 times less often.
GC_PACE = (10_000, 100, 100)


@contextlib.contextmanager
def paced_gc() -> Iterator[None]:
    """Run the body with the collector at :data:`GC_PACE` (unless it is already at least that patient,
    e.g. in a nested compile), then restore its thresholds."""
    old = gc.get_threshold()
    if old[0] >= GC_PACE[0]:
        yield
        return
    gc.set_threshold(*GC_PACE)
    try:
        yield
    finally:
        gc.set_threshold(*old)


def op_of(mnemonic: str, unit: str) -> isa.Op:
    """The instruction ``mnemonic`` of ``unit``: the compiler only names instructions that exist."""
    op = isa.lookup(mnemonic, unit)
    if op is None:
        raise CompileError(f"internal: no {unit} instruction {mnemonic!r}")
    return op


def _picker(idx: List[int]) -> Callable[[tuple], tuple]:
    """A function taking a tuple to the tuple of its items at ``idx``."""
    if not idx:
        return lambda a: ()
    get = operator.itemgetter(*idx)
    return get if len(idx) > 1 else (lambda a: (get(a),))


class _Busy:
    """A set of cycles (a growing bitmap): those in which one queue issues, an ALU's
    results land, or an ALU's latch is held."""

    __slots__ = ("bits",)

    def __init__(self):
        self.bits = bytearray(1024)

    def get(self, c: int) -> bool:
        return 0 <= c < len(self.bits) and self.bits[c] == 1

    def _grow(self, n: int) -> None:
        if n > len(self.bits):
            self.bits.extend(bytearray(max(n - len(self.bits), len(self.bits))))

    def set(self, c: int):
        if c < 0:
            raise CompileError(f"internal: a reservation at negative cycle {c}")
        self._grow(c + 1)
        self.bits[c] = 1

    def fill(self, lo: int, hi: int) -> None:
        """Add the cycles lo..hi-1."""
        lo = max(lo, 0)
        if hi > lo:
            self._grow(hi)
            self.bits[lo:hi] = b"\x01" * (hi - lo)

    def any_in(self, lo: int, hi: int) -> bool:
        """Whether any of the cycles lo..hi-1 is in the set."""
        return self.bits.find(1, max(lo, 0), max(hi, 0)) >= 0


@dataclass
class Plan:
    """Reservations proposed by a kernel (absolute cycles)."""

    issues: List[Tuple[str, int, str, tuple]] = field(default_factory=list)    # (queue, cycle, mnemonic, args)
    spans: List[Tuple[int, int, int, int]] = field(default_factory=list)      # (stream, diagonal, x0, x1)
    reads: List[Tuple[int, int, int]] = field(default_factory=list)           # (slice, cycle, bank)
    writes: List[Tuple[int, int, int]] = field(default_factory=list)          # (slice, landing cycle, bank)
    lands: List[Tuple[int, int]] = field(default_factory=list)                # (alu, cycle a result lands)
    holds: List[Tuple[int, int, int]] = field(default_factory=list)           # (alu, from, to]: latch kept
    sxm: List[Tuple[int, int, str]] = field(default_factory=list)             # (cycle, hemisphere, resource)
    landing: int = 0                                                          # kernels' bookkeeping

    _LISTS = ("issues", "spans", "reads", "writes", "lands", "holds", "sxm")

    def mark(self) -> Tuple[int, ...]:
        """A point to roll back to when a kernel's tentative step does not fit."""
        return tuple(len(getattr(self, n)) for n in self._LISTS)

    def rollback(self, mark: Tuple[int, ...]) -> None:
        for n, k in zip(self._LISTS, mark):
            del getattr(self, n)[k:]


class Scheduler:
    def __init__(self, cfg: ChipConfig):
        self.cfg = cfg
        self.S = cfg.streams_per_direction
        self.P = cfg.positions
        self.busy: Dict[str, _Busy] = {}
        self.diag: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
        self.bank_rd: Dict[Tuple[int, int], int] = {}      # (slice, cycle) -> bank bit mask
        self.bank_wr: Dict[Tuple[int, int], int] = {}
        self.landed: Dict[int, _Busy] = {}                 # alu -> cycles a result lands in its latch
        self.held: Dict[int, _Busy] = {}                   # alu -> cycles T with lo < T <= hi of a hold
        self.sxm_use: Dict[Tuple[int, int, str], int] = {}
        self.events: Dict[str, List[Tuple[int, str, tuple]]] = {}
        self.last = -1                                        # last cycle with any effect
        self._delays: Dict[Tuple[str, str], int] = {}         # (queue, mnemonic) -> result delay, cycles

    # ---- geometry -------------------------------------------------------------------------------
    def x(self, v: int, pos: int) -> int:
        """Direction-local coordinate of a position for stream v (values move to larger x)."""
        return pos if v < self.S else self.P - 1 - pos

    # ---- checks -----------------------------------------------------------------------------------
    def queue_free(self, q: str, c: int) -> bool:
        b = self.busy.get(q)
        return c >= 0 and (b is None or not b.get(c))

    def fits(self, plan: Plan) -> bool:  # noqa: C901 - every rule inlined: called ~10^5 times a compile
        # queue_free and the stream-span check inlined: the compiler calls this hundreds of thousands of times
        busy = self.busy
        seen_q: Set[Tuple[str, int]] = set()
        for q, c, _, _ in plan.issues:
            if c < 0:
                return False
            qkey = (q, c)
            if qkey in seen_q:
                return False
            qb = busy.get(q)
            if qb is not None and c < len(qb.bits) and qb.bits[c] == 1:
                return False
            seen_q.add(qkey)
        diag = self.diag
        mine: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
        for v, k, x0, x1 in plan.spans:
            key = (v, k)
            for a, b in diag.get(key, ()):
                if not (b < x0 or a > x1):
                    return False
            lst = mine.get(key)
            if lst is None:
                mine[key] = [(x0, x1)]
                continue
            for a, b in lst:
                if not (b < x0 or a > x1):
                    return False
            lst.append((x0, x1))
        rd: Dict[Tuple[int, int], int] = {}
        wr: Dict[Tuple[int, int], int] = {}
        for g, c, bank in plan.reads:
            rd[(g, c)] = rd.get((g, c), 0) | (1 << bank)
        for g, c, bank in plan.writes:
            wr[(g, c)] = wr.get((g, c), 0) | (1 << bank)
        for key, m in rd.items():
            if (self.bank_wr.get(key, 0) | wr.get(key, 0)) & m:
                return False
        for key, m in wr.items():
            if self.bank_rd.get(key, 0) & m:
                return False
        lands: Dict[int, Set[int]] = {}
        landed, held = self.landed, self.held
        for alu, T in plan.lands:
            lb, hb = landed.get(alu), held.get(alu)
            if (lb is not None and lb.get(T)) or T in lands.get(alu, ()) or (hb is not None and hb.get(T)):
                return False
            lands.setdefault(alu, set()).add(T)
        for alu, lo, hi in plan.holds:
            lb = landed.get(alu)
            if lb is not None and lb.any_in(lo + 1, hi + 1):
                return False
            for T in lands.get(alu, ()):
                if lo < T <= hi:
                    return False
        use: Dict[Tuple[int, int, str], int] = {}
        for c, hem, res in plan.sxm:
            skey = (c, hem, res)
            use[skey] = use.get(skey, 0) + 1
            if self.sxm_use.get(skey, 0) + use[skey] > getattr(self.cfg, "sxm_" + res):
                return False
        return True

    def commit(self, plan: Plan) -> None:
        cfg = self.cfg
        delays = self._delays
        busy, events = self.busy, self.events
        last = self.last
        # get, then create: setdefault(q, _Busy()) would allocate a bitmap for every issue
        for q, c, mn, args in plan.issues:
            qb = busy.get(q)
            if qb is None:
                qb = busy[q] = _Busy()
                events[q] = []
            if 0 <= c < len(qb.bits):           # _Busy.set without the call (the common case)
                qb.bits[c] = 1
            else:
                qb.set(c)
            events[q].append((c, mn, args))
            dly = delays.get((q, mn))
            if dly is None:
                dly = delays[(q, mn)] = op_of(mn, cfg.queue(q).unit).delay(cfg)
            if c + dly > last:
                last = c + dly
        self.last = last
        diag = self.diag
        for v, k, x0, x1 in plan.spans:
            ivs = diag.get((v, k))
            if ivs is None:
                diag[(v, k)] = [(x0, x1)]
            else:
                ivs.append((x0, x1))
        bank_rd, bank_wr = self.bank_rd, self.bank_wr
        for g, c, bank in plan.reads:
            bank_rd[(g, c)] = bank_rd.get((g, c), 0) | (1 << bank)
        for g, c, bank in plan.writes:
            bank_wr[(g, c)] = bank_wr.get((g, c), 0) | (1 << bank)
        for alu, T in plan.lands:
            self._bitmap(self.landed, alu).set(T)
        for alu, lo, hi in plan.holds:
            self._bitmap(self.held, alu).fill(lo + 1, hi + 1)
        for c, hem, res in plan.sxm:
            self.sxm_use[(c, hem, res)] = self.sxm_use.get((c, hem, res), 0) + 1

    @staticmethod
    def _bitmap(table: Dict[int, _Busy], alu: int) -> _Busy:
        """ALU alu's bitmap in ``table`` (landed or held), created empty when first used."""
        b = table.get(alu)
        if b is None:
            b = table[alu] = _Busy()
        return b

    # ---- emission ------------------------------------------------------------------------------------
    def emit(self, program) -> None:
        """Append every queue's instructions, in cycle order, with NOPs in the gaps and
        runs of equally spaced instructions differing only in strided fields folded into
        Repeat."""
        cfg = self.cfg
        A = cfg.addresses_per_slice
        # (unit, mnemonic, operands) -> instruction: instructions are immutable and a program repeats
        # many (NOPs, a kernel's per-vector ops), so each distinct one is built once
        made: Dict[Tuple[str, str, tuple], Instruction] = {}
        for q, evs in self.events.items():
            evs.sort(key=lambda e: e[0])
            qi = cfg.queue(q)
            lst = program.queues.setdefault(qi.name, [])

            def put(mn, *args, qi=qi, lst=lst):
                # Program.add(check=False) without its per-call queue lookup; the program is
                # validated as a whole afterwards
                key = (qi.unit, mn, args)
                ins = made.get(key)
                if ins is None:
                    try:
                        ins = made[key] = make_instruction(cfg, mn, *args, unit=qi.unit)
                    except ProgramError as e:          # as Program.add words it
                        msg = str(e).split(": ", 1)[1] if e.field is not None else str(e)
                        raise ProgramError(msg, queue=qi.name, index=len(lst), field=e.field) from None
                lst.append(ins)

            t = 0
            i = 0
            n_ev = len(evs)
            strided_of: Dict[str, List[int]] = {}
            fixed_of: Dict[Tuple[str, int], Callable[[tuple], tuple]] = {}
            while i < n_ev:
                c, mn, args = evs[i]
                strided = strided_of.get(mn)
                if strided is None:
                    op = op_of(mn, qi.unit)
                    strided = strided_of[mn] = [j for j, f in enumerate(op.fields) if f.strided]
                j = i + 1
                d = stride = None
                while j < n_ev and evs[j][1] == mn and strided:
                    a0, a1 = evs[j - 1][2], evs[j][2]
                    fixed = fixed_of.get((mn, len(a0)))
                    if fixed is None:       # the operands that must not change within a Repeat
                        fixed = fixed_of[(mn, len(a0))] = _picker([k for k in range(len(a0)) if k not in strided])
                    if fixed(a0) != fixed(a1):
                        break
                    if len(strided) == 1:
                        ds = a1[strided[0]] - a0[strided[0]]
                    else:
                        diffs = {a1[k] - a0[k] for k in strided}
                        if len(diffs) != 1:
                            break
                        ds = diffs.pop()
                    dd = evs[j][0] - evs[j - 1][0]
                    if d is None:
                        d, stride = dd, ds
                    if dd != d or ds != stride or abs(ds) >= A:
                        break
                    j += 1
                if c < t:
                    raise CompileError(f"internal: {q} issues twice at cycle {c}")
                if c > t:
                    put("NOP", c - t)
                put(mn, *args)
                if j - i > 1:
                    put("Repeat", j - i - 1, d, stride)
                    t = evs[j - 1][0] + 1
                else:
                    t = c + 1
                i = j
