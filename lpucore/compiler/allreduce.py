"""Lane all-reduce: the sum or max over the lanes of each row, left in every lane.

A reduction is a few *trips* through the SXMs.  Before trip ``m`` every lane holds the
reduction of a window of ``n`` consecutive lanes ending at it (``S_n``; ``n = 1`` at the start);
a trip of radix ``k`` sends ``S_n`` to both hemispheres' SXMs, rotates it by ``n, 2n, ...,
(k - 1) n`` lanes (a rotation is two SXM shifts merged by a VXM ``or``) and combines the
``k`` values in a tree of VXM operations into ``S_kn``.  The radices multiply to exactly the
lane count, so the windows tile the circle once and sums are exact sums of every lane.

Why radices above 2: a trip's latency is dominated by the round trip to the SXM (two hops
of the chip's width from the VXM plus the shift), the same for any radix, while a hemisphere
rotates a ``w``-byte value with ``2 w`` shifters at once: ``shifters // 2w`` rotations a cycle
per hemisphere, both hemispheres together, for as many cycles as the radix needs.  Sending
one value to several SXM slots needs one VXM instance of its producing operation per slot
(an ALU writes one stream group), so the radix is bounded by the ALUs.  :func:`radix_plan`
picks the radices with the lowest estimated latency (:func:`_tree` for the combine) under
that bound; on the GroqChip, float32, 320 lanes: radices 5, 8, 8 (three trips, about 115
cycles, where binary doubling took nine).
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .. import dtypes as dt
from .. import isa
from ..errors import CompileError
from . import kernels
from .kernels import SEARCH, Ctx, E, Expr, Used, _collides, _layout, _staged, _topo, _vxm_args, earliest
from .memory import VT
from .schedule import Plan

# ALUs issuing the sends of a trip: one per hemisphere
FIN = 2
# a value in an ALU latch: (alu, landing cycle)
_Latch = Tuple[int, int]


def _tree(ready: Sequence[int], d_alu: int) -> Tuple[List[Tuple[int, int, int]], int]:
    """Combine values ready at the given cycles pairwise, always the two ready first (the order
    that finishes soonest).  Returns the combines as (index a, index b, issue cycle), the
    result of combine ``i`` taking index ``len(ready) + i``, and the cycle the last one
    issues."""
    pool = sorted((t, i) for i, t in enumerate(ready))
    steps: List[Tuple[int, int, int]] = []
    nxt = len(ready)
    t_issue = pool[0][0] if pool else 0
    while len(pool) > 1:
        (ta, a), (tb, b) = pool[0], pool[1]
        t_issue = max(ta, tb)
        steps.append((a, b, t_issue))
        pool = sorted(pool[2:] + [(t_issue + d_alu, nxt)])
        nxt += 1
    return steps, t_issue


class _Geometry:
    """Per-chip constants of a trip: hops, delays and rotations a cycle (all cycles)."""

    def __init__(self, ctx: Ctx, w: int):
        cfg = ctx.cfg
        self.d_alu, self.d_sxm = cfg.vxm_alu_delay, cfg.sxm_delay
        self.hop = [abs(ctx.vx - cfg.sxm_position(h)) for h in (0, 1)]
        # rotations one hemisphere starts in one cycle: two shifts of each byte plane, each on
        # its own SXM queue
        self.per_slot = min(cfg.sxm_shifters, cfg.sxm_queues_per_hemisphere) // (2 * w)

    def slots(self, k: int) -> List[Tuple[int, int, List[int]]]:
        """The send slots of a radix-k trip: (hemisphere, cycle offset, rotations j in 1..k-1)."""
        out: List[Tuple[int, int, List[int]]] = []
        js = list(range(1, k))
        c = 0
        while js:
            for h in (0, 1):
                if js:
                    out.append((h, c, js[:self.per_slot]))
                    js = js[self.per_slot:]
            c += 1
        return out

    def arrivals(self, k: int) -> List[int]:
        """When each rotation's ``or`` result lands, relative to the first send leaving the VXM."""
        out = []
        for h, c, js in self.slots(k):
            out += [c + 2 * self.hop[h] + self.d_sxm + self.d_alu] * len(js)
        return out

    def latency(self, k: int) -> int:
        """Cycles from a trip's first send to its result landing."""
        steps, t_last = _tree([0] + self.arrivals(k), self.d_alu)
        return t_last + self.d_alu

    def alus(self, k: int) -> int:
        """ALUs a radix-k trip holds: one per hemisphere for the instances of the producer (an ALU
        issues one instance a cycle; each lands the same value) and one per rotation (its
        ``or``, then the combines that land there)."""
        return FIN + (k - 1)


def radix_plan(L: int, geo: _Geometry, alu_cap: int) -> List[int]:
    """Radices (each >= 2, product exactly L) minimising the estimated latency, every trip using
    at most alu_cap ALUs.  A prime factor too big for the cap raises CompileError."""
    @functools.lru_cache(maxsize=None)
    def best(n: int) -> Tuple[int, Tuple[int, ...]]:
        if n == 1:
            return 0, ()
        options = []
        for k in range(2, n + 1):
            if n % k == 0 and geo.alus(k) <= alu_cap:
                cost, rest = best(n // k)
                options.append((cost + geo.latency(k), geo.alus(k), (k,) + rest))
        if not options:
            raise CompileError(f"a lane reduction over {L} lanes needs a radix the {alu_cap} ALUs "
                               f"available cannot hold")
        cost, _, plan = min(options)
        return cost, plan
    radices = list(best(L)[1])
    # the first trip shares its ALUs with the row's own expression: the smallest radix first
    return sorted(radices)


class _Producer:
    """A VXM operation whose result a trip sends out: issued once per send slot (the same
    operands, one cycle apart per slot cycle), each instance on its own ALU and stream group."""

    def __init__(self, mn: str, srcs: Tuple[int, ...], t_issue: int, operands: Sequence[_Latch]):
        self.mn, self.srcs, self.t_issue, self.operands = mn, srcs, t_issue, list(operands)


class _RowPlan:
    """One row's reduction as a scheduler plan from a start cycle; each step returns False when
    something is taken (the caller tries a later start)."""

    def __init__(self, ctx: Ctx, geo: _Geometry, radices: Sequence[int], op: str, d: dt.DType,
                 fin: Sequence[int], ors: Sequence[int]):
        self.ctx, self.geo, self.radices, self.d = ctx, geo, list(radices), d
        self.combine = "add" if op == "add" else "max"
        self.fin, self.ors = list(fin), list(ors)
        self.plan = Plan()
        self.used: Used = {}
        self.taken = False          # an issue met the committed schedule: the plan cannot fit
        cfg = ctx.cfg
        self.L = cfg.lanes
        self.sxq = [[q.name for q in cfg.queues if q.unit == "SXM" and q.hemisphere == h] for h in (0, 1)]

    # ---- bookkeeping ----------------------------------------------------------------------------
    def _issue(self, alu: int, t: int, mn: str, args: tuple) -> None:
        q, land = f"VXM.{alu}", t + self.geo.d_alu
        self.plan.issues.append((q, t, mn, args))
        self.plan.lands.append((alu, land))
        # what the scheduler's fits() would refuse, known now: the caller stops building (a row's
        # full plan is built thousands of times while earlier rows hold the ALUs)
        sched = self.ctx.sched
        lb, hb = sched.landed.get(alu), sched.held.get(alu)
        if (not sched.queue_free(q, t) or (lb is not None and lb.get(land)) or (hb is not None and hb.get(land))):
            self.taken = True

    def _hold(self, latch: _Latch, until: int) -> None:
        if until > latch[1]:
            self.plan.holds.append((latch[0], latch[1], until))
            lb = self.ctx.sched.landed.get(latch[0])
            if lb is not None and lb.any_in(latch[1] + 1, until + 1):
                self.taken = True

    def _group(self, direction: int, k: int, x0: int, x1: int) -> Optional[int]:
        """A free stream group (w streams) in direction on diagonal k over [x0, x1], reserved."""
        w = self.d.nbytes
        b = self.ctx.free_group(direction, w, k, [(x0, x1)] * w, self.used)
        if b is not None:
            for p in range(w):
                self.used[(b + p, k)] = 1
                self.plan.spans.append((b + p, k, x0, x1))
        return b

    # ---- a trip ----------------------------------------------------------------------------------
    def _send(self, prod: _Producer, k: int) -> Optional[Tuple[List[Tuple[int, int, int, List[int]]], int]]:
        """Instances of prod, one per send slot of a radix-k trip (slot (h, c) on ALU fin[h] at
        prod's cycle + c); returns (hemisphere, group, cycle the value leaves the VXM, rotations)
        per slot and the cycle the trip's input last lands in fin[0]."""
        ctx, d_alu = self.ctx, self.geo.d_alu
        sends = []
        last_issue = y_land = prod.t_issue
        for h, c, js in self.geo.slots(k):
            t = prod.t_issue + c
            to_sx = 1 if h == 0 else 0
            b = self._group(to_sx, t + d_alu - ctx.xloc(to_sx, ctx.vx), ctx.xloc(to_sx, ctx.vx),
                            ctx.xloc(to_sx, ctx.cfg.sxm_position(h)))
            if b is None:
                return None
            self._issue(self.fin[h], t, prod.mn, (self.d.code, b) + prod.srcs)
            sends.append((h, b, t + d_alu, js))
            last_issue = t
            if h == 0:
                y_land = t + d_alu
        for latch in prod.operands:
            self._hold(latch, last_issue)
        return sends, y_land

    def _rotate(self, h: int, b_send: int, send_t: int, j: int, ri: int, n: int) -> Optional[_Latch]:
        """Rotation of the value on group b_send by j * n lanes at hemisphere h's SXM (two shifts
        per byte plane, ``ri``-th rotation of its slot), merged by an ``or`` on ALU ors[j - 1]."""
        ctx, geo, w = self.ctx, self.geo, self.d.nbytes
        sx = ctx.cfg.sxm_position(h)
        back = 0 if h == 0 else 1
        ts = send_t + geo.hop[h]
        x_s, x_v = ctx.xloc(back, sx), ctx.xloc(back, ctx.vx)
        k_back = ts + geo.d_sxm - x_s
        bA = self._group(back, k_back, x_s, x_v)
        if bA is None:
            return None
        bB = self._group(back, k_back, x_s, x_v)
        if bB is None:
            return None
        rot = (j * n) % self.L
        qs = self.sxq[h]
        for p in range(w):
            base = ri * 2 * w + 2 * p
            self.plan.issues.append((qs[base % len(qs)], ts, "Shift", (bA + p, b_send + p, rot)))
            self.plan.issues.append((qs[(base + 1) % len(qs)], ts, "Shift", (bB + p, b_send + p, rot - self.L)))
            self.plan.sxm += [(ts, h, "shifters"), (ts, h, "shifters")]
        t_or = ts + geo.d_sxm + geo.hop[h]
        alu = self.ors[j - 1]
        self._issue(alu, t_or, "or", (self.d.code, isa.NONE, bA, bB))
        return alu, t_or + geo.d_alu

    def trip(self, prod: _Producer, k: int, n: int) -> Optional[_Producer]:
        """A radix-k trip from the window-n value prod makes; returns the producer of the window
        k * n value (its final combine, not yet issued) or None."""
        sent = self._send(prod, k)
        if sent is None:
            return None
        sends, y_land = sent
        vals: List[_Latch] = [(self.fin[0], y_land)]
        for h, b, send_t, js in sends:
            for ri, j in enumerate(js):
                v = self._rotate(h, b, send_t, j, ri, n)
                if v is None:
                    return None
                vals.append(v)
        steps, _ = _tree([t for _, t in vals], self.geo.d_alu)
        for a, b, t in steps[:-1]:
            # the result lands in the latch of an operand that is not the trip's input (that
            # one sits in fin[0], which the next trip's first instance overwrites)
            alu = vals[a][0] if a != 0 else vals[b][0]
            self._hold(vals[a], t)
            self._hold(vals[b], t)
            self._issue(alu, t, self.combine, (self.d.code, isa.NONE, isa.LATCH_BASE + vals[a][0],
                                               isa.LATCH_BASE + vals[b][0]))
            vals.append((alu, t + self.geo.d_alu))
        a, b, t = steps[-1]
        if self.taken:
            return None
        return _Producer(self.combine, (isa.LATCH_BASE + vals[a][0], isa.LATCH_BASE + vals[b][0]), t,
                         [vals[a], vals[b]])

    def finish(self, prod: _Producer, out: VT, r: int) -> Optional[int]:
        """prod's result written to vector r of out; returns the landing cycle or None."""
        wr = self.ctx.write_group(self.plan, out, r, self.ctx.vx, prod.t_issue + self.geo.d_alu, self.used)
        if wr is None:
            return None
        dst, landing = wr
        self._issue(self.fin[0], prod.t_issue, prod.mn, (self.d.code, dst) + prod.srcs)
        for latch in prod.operands:
            self._hold(latch, prod.t_issue)
        return landing


def _row_chain(ctx: Ctx, root: Expr, r: int, alus: Sequence[int]):
    """The row's own expression laid out on alus (staged when two operand reads collide)."""
    if root.op == "in":
        root = E("mov", root.dtype, root)
    ch = _layout(root, ctx.cfg, alus)
    if _collides(ch, r):
        root = _staged(root)
        ch = _layout(root, ctx.cfg, alus)
    return root, ch


def _chain_plan(ctx: Ctx, rp: _RowPlan, root: Expr, ch, r: int, a: int) -> Optional[_Producer]:
    """Reads and VXM issues of the row's expression from cycle a into rp's plan; returns the
    producer (a mov of the root's latch) the first trip sends, or None."""
    srcs: Dict[Tuple[int, int], int] = {}
    for tc, node in ch.reads:
        vt, idx = node.source()
        b = ctx.read_group(rp.plan, vt, idx(r), ctx.vx, a + tc, rp.used)
        if b is None:
            return None
        srcs[(tc, id(node))] = b
    for n in ch.nodes:
        rp.plan.issues.append((f"VXM.{ch.alu[id(n)]}", a + ch.t[id(n)], n.op,
                               _vxm_args(n, srcs, isa.NONE, ch.alu, ch.t)))
        rp.plan.lands.append((ch.alu[id(n)], a + ch.land[id(n)]))
        if ch.last_use[id(n)] > ch.land[id(n)]:
            rp.plan.holds.append((ch.alu[id(n)], a + ch.land[id(n)], a + ch.last_use[id(n)]))
    x = (ch.alu[id(root)], a + ch.land[id(root)])
    return _Producer("mov", (isa.LATCH_BASE + x[0],), x[1], [x])


def _sets(ctx: Ctx, geo: _Geometry, alus: Sequence[int], rows: int, n_stage: int):
    """ALU sets (rows take them in turn, so consecutive rows overlap) and the radix plan. The plan is
    the whole set's for any number of rows: each lane adds in an order set by the radices (every lane
    holds its own float sum), so a row reduced alone and the same row among others must take the same
    radices for a batch's or a prompt chunk's rows to give a single row's bits. Several rows alternate
    between the set taken from either end (a trip holds only some of the ALUs, so two rows from
    opposite ends overlap)."""
    if n_stage > len(alus) - FIN:
        raise CompileError(f"a lane reduction's row expression of {n_stage} operations needs more than the "
                           f"{len(alus) - FIN} ALUs left to it")
    radices = radix_plan(ctx.cfg.lanes, geo, len(alus))
    sets = [list(alus), list(reversed(alus))] if rows > 1 else [list(alus)]
    return sets, radices


def _first_fit(ctx: Ctx, geo: _Geometry, radices: Sequence[int], op: str, out: VT, r: int, s: Sequence[int],
               root: Expr, ch, lo: int) -> Optional[Tuple[int, "_RowPlan", int]]:
    """The first start cycle from ``lo`` (within SEARCH) at which row r's reduction on ALU set s fits the
    reservation table: (landing cycle, its plan, start cycle), not committed; None if none fits.

    A try that fails leaves no trace (the stream groups' rotation it advanced is put back). Every issue,
    landing and hold of the plan is at a fixed offset from the start (only its streams depend on what
    is free), so with :data:`~lpucore.compiler.kernels.FAST_SEARCH` the queues and latches the furthest
    try so far has met are checked first at each later start, and a start they refuse is passed
    without building the plan (compile time; the same start and streams are found)."""
    fin, rest = s[:FIN], s[FIN:]
    d = out.dtype
    need: _Need = ([], [], [])
    built = 0                              # issues of the furthest try (need holds its offsets)
    rot = list(ctx.rot)
    a = lo
    while a < lo + SEARCH:
        if kernels.FAST_SEARCH:
            nxt = _next_free(ctx, need, a)
            if nxt != a:
                a = nxt
                continue
        ctx.rot[:] = rot
        rp = _RowPlan(ctx, geo, radices, op, d, fin, rest)
        prod = _chain_plan(ctx, rp, root, ch, r, a)
        n = 1
        for k in radices:
            if prod is None:
                break
            prod = rp.trip(prod, k, n)
            n *= k
        landing = rp.finish(prod, out, r) if prod is not None else None
        if landing is not None and ctx.sched.fits(rp.plan):
            return landing, rp, a
        if len(rp.plan.issues) > built:
            built = len(rp.plan.issues)
            need = ([(q, t - a) for q, t, _, _ in rp.plan.issues if not q.startswith("MEM")],
                    [(alu, t - a) for alu, t in rp.plan.lands],
                    [(alu, t0 - a, t1 - a) for alu, t0, t1 in rp.plan.holds])
        a += 1
    ctx.rot[:] = rot
    return None


# what a reduction's plan from a start cycle needs whatever streams it takes, as offsets from the start:
# VXM and SXM queues' issue cycles, ALU latches' landings, ALU latches held (from, to]
_Need = Tuple[List[Tuple[str, int]], List[Tuple[int, int]], List[Tuple[int, int, int]]]


def _next_free(ctx: Ctx, need: _Need, a: int) -> int:
    """The first start from a at which what ``need`` holds is free: its queues free at start + offset,
    no result landing or held in its latches' landing cycles, none landing in its held latches. Every
    start skipped fails on one of them (:func:`_first_fit`)."""
    sched = ctx.sched
    busy, landed, held = sched.busy, sched.landed, sched.held
    moved = True
    while moved:
        moved = False
        for q, off in need[0]:
            b = busy.get(q)
            if b is not None and b.get(a + off):
                a = _clear_from(b.bits, a + off) - off
                moved = True
        for alu, off in need[1]:
            for b in (landed.get(alu), held.get(alu)):
                if b is not None and b.get(a + off):
                    a = _clear_from(b.bits, a + off) - off
                    moved = True
        for alu, lo, hi in need[2]:
            b = landed.get(alu)
            while b is not None and b.any_in(a + lo + 1, a + hi + 1):
                a += 1
                moved = True
    return a


def _clear_from(bits: bytearray, c: int) -> int:
    """The first cycle from c that is not in the set ``bits``."""
    got = bits.find(0, c)
    return got if got >= 0 else len(bits)


def _commit(ctx: Ctx, found: Tuple[int, "_RowPlan", int], out: VT, r: int, ch) -> int:
    """Commit a :func:`_first_fit` result for row r; returns its landing cycle."""
    landing, rp, a = found
    ctx.sched.commit(rp.plan)
    out.ready[r] = max(out.ready[r], landing)
    for tc, node in ch.reads:
        vt, idx = node.source()
        vt.last_read[idx(r)] = max(vt.last_read[idx(r)], a + tc)
    return landing


def _one_row(ctx: Ctx, geo: _Geometry, expr: Expr, out: VT, op: str,
             whole: Tuple[Sequence[int], List[int]], start: int) -> int:
    """One row's reduction on the ALU set taken from either end, whichever lands first: a trip holds
    only some of the ALUs, so a reduction taking them from the other end can run beside another one
    (a norm's max beside its sum). The radices stay those of the whole set: a row's lanes add in the
    same order whichever end it takes (each lane holds its own float sum, :func:`radix_plan`; a
    program's results must not depend on what ran beside a reduction)."""
    alus, radices = whole
    best = None
    for s in (list(alus), list(reversed(alus))):
        root, ch = _row_chain(ctx, expr, 0, s[FIN:])
        found = _first_fit(ctx, geo, radices, op, out, 0, s, root, ch, earliest(ctx, ch, 0, start))
        if found is not None and (best is None or found[0] < best[0][0]):
            best = (found, ch)
    if best is None:
        raise CompileError(f"no room found to schedule a lane reduction writing {out.name}")
    landing = _commit(ctx, best[0], out, 0, best[1])
    out.bcast = True
    return landing


def allreduce_kernel(ctx: Ctx, row_expr: Callable[[int], Expr], out: VT, op: str, alus: Sequence[int],
                     start: int = 0) -> int:
    """For each row r: y = row_expr(r) (an expression combining the row's chunks into one vector,
    dtype = out.dtype), then the lane reduction ``op`` ("add" or "max") of y, left in every lane
    of out's vector r (out.bcast).  Returns the last landing cycle."""
    cfg, d = ctx.cfg, out.dtype
    w = d.nbytes
    if min(cfg.sxm_queues_per_hemisphere, cfg.sxm_shifters) < 2 * w:
        raise CompileError(f"a lane reduction of {d.name} rotates {w} byte planes with two shifts each in one "
                           f"cycle: it needs {2 * w} SXM queues and shifters per hemisphere, this chip has "
                           f"{cfg.sxm_queues_per_hemisphere} queues and {cfg.sxm_shifters} shifters")
    geo = _Geometry(ctx, w)

    def stage_size(r: int) -> int:
        root = row_expr(r)
        return len([n for n in _topo(_staged(root)) if n.op != "in"]) if root.op != "in" else 1
    n_stage = max(stage_size(0), stage_size(out.rows - 1))
    sets, radices = _sets(ctx, geo, alus, out.rows, n_stage)
    if out.rows == 1:
        return _one_row(ctx, geo, row_expr(0), out, op, (sets[0], radices), start)
    last = 0
    # the cycle the last row on each ALU set started: a row taking the set after it starts later (its
    # trips would meet the earlier row's at every cycle before; searching them again costs O(rows^2))
    began = [start - 1] * len(sets)
    for r in range(out.rows):
        s = sets[r % len(sets)]
        root, ch = _row_chain(ctx, row_expr(r), r, s[FIN:])
        lo = max(earliest(ctx, ch, r, start), began[r % len(sets)] + 1)
        found = _first_fit(ctx, geo, radices, op, out, r, s, root, ch, lo)
        if found is None:
            raise CompileError(f"no room found to schedule a lane reduction writing {out.name}")
        last = max(last, _commit(ctx, found, out, r, ch))
        began[r % len(sets)] = found[2]
    out.bcast = True
    return last
