"""Kernels: the compiler's ways of turning tensor operations into placed instructions.

Every kernel works vector by vector and hands the scheduler a plan for each
vector (MEM reads timed to reach a unit exactly when it issues, the unit's
instructions, MEM writes timed to catch the results); the scheduler finds the
earliest cycle at which the plan fits.  Because nothing waits on anything at
run time, the program's cycle count follows from the plans.

* :class:`Expr` and :func:`map_kernel` - elementwise expressions (a chain of VXM
  ops per vector, operands from MEM streams, constants and intermediates in ALU
  latches).
* :func:`lpucore.compiler.allreduce.allreduce_kernel` (its own module) - sum or max
  over the lanes of each row, leaving the result in every lane.
* :func:`matmul_kernel` - the MXM: weight tiles loaded by LW while the previous
  tile computes, activations streamed row by row, results out through ACC.
* :func:`lanemove_kernel` - moving lanes between vectors (SXM shifts and
  distributes, VXM merges): slicing, concatenation, reshapes and transposes that
  do not fall on vector boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import dtypes as dt
from .. import isa
from ..config import ChipConfig
from ..errors import CompileError
from .memory import VT
from .schedule import Plan, Scheduler, op_of

SEARCH = 200_000          # cycles a kernel may look ahead for room before giving up
# whether searches skip, without a plan, the cycles at which a try fails at committed work (the same
# programs either way, only sooner: tests compare the two)
FAST_SEARCH = True
# cycles one lane-move piece may slip when it collides inside its plan, per byte plane of its vector
# (at least 4): a w-byte vector's planes are read in w consecutive cycles, and a piece read through an
# SXM and one read straight to the VXM (or a mask) from the same slices collide at up to w consecutive
# slips, the piece before it as many again (the small chip's int32 NCHW output of a convolution, pixels
# and masks on the same four slices, found no room at all with 4; 6 was enough there, 8 is twice w)
PIECE_SLIP = 2

# what a plan being built already takes: (stream, diagonal) and ("q", slice, cycle) -> 1
Used = Dict[tuple, int]


def _overlaps(ivs: Sequence[Tuple[int, int]], x0: int, x1: int) -> bool:
    """Whether any span (a, e) of ivs meets x0..x1 (positions, inclusive)."""
    for a, e in ivs:
        if e >= x0 and a <= x1:
            return True
    return False


class Ctx:
    """Scheduler plus geometry helpers shared by the kernels."""

    def __init__(self, cfg: ChipConfig, sched: Scheduler):
        self.cfg = cfg
        self.sched = sched
        self.S = cfg.streams_per_direction
        self.vx = cfg.vxm_position
        self._last = cfg.positions - 1
        self.rot = [0, 0]
        self.mem_q = {cfg.slice_id(q.hemisphere, q.slot): q.name for q in cfg.queues if q.unit == "MEM"}
        self.slice_pos = {g: cfg.mem_position(*divmod(g, cfg.mem_slices_per_hemisphere)) for g in self.mem_q}
        self._specs: Dict[tuple, tuple] = {}     # see _spec

    def xloc(self, d: int, pos: int) -> int:
        return pos if d == 0 else self._last - pos

    def dir_to(self, src_pos: int, dst_pos: int) -> int:
        """Direction a value takes from src_pos to dst_pos (0 east, 1 west)."""
        return 0 if dst_pos >= src_pos else 1

    def bank(self, addr: int) -> int:
        return self.cfg.bank_of(addr)

    def streams(self, d: int, w: int, avoid: Sequence[int] = ()):
        """Candidate stream-group bases (encoded) in direction d, aligned to w, rotating."""
        S = self.S
        n = S // w
        start = self.rot[d] % n
        self.rot[d] += 1
        for i in range(n):
            b = d * S + ((start + i) % n) * w
            if b not in avoid:
                yield b

    def free_group(self, d: int, w: int, k: int, xs: Sequence[Tuple[int, int]], used: Optional[Used] = None,
                   avoid: Sequence[int] = (), prefer: Sequence[int] = ()) -> Optional[int]:
        """The first of ``prefer`` (bases in direction d), then of :meth:`streams` ``(d, w, avoid)``
        (advancing the rotation as it does), whose streams base + p, p < len(xs), are free on diagonal k
        over ``xs[p] = (x0, x1)`` and not taken by the plan being built (``used``); None if there is none."""
        S = self.S
        for b in prefer:
            if b // S == d and b % S + w <= S and b not in avoid and self._group_free(b, k, xs, used):
                return b
        n = S // w
        start = self.rot[d] % n
        self.rot[d] += 1
        for i in range(n):
            b = d * S + ((start + i) % n) * w
            if b not in avoid and self._group_free(b, k, xs, used):
                return b
        return None

    def _group_free(self, b: int, k: int, xs: Sequence[Tuple[int, int]], used: Optional[Used]) -> bool:
        """Streams b + p are free on diagonal k over ``xs[p]`` and not in ``used``."""
        diag = self.sched.diag
        for p, (x0, x1) in enumerate(xs):
            key = (b + p, k)
            if used is not None and key in used:
                return False
            ivs = diag.get(key)
            if ivs is not None and _overlaps(ivs, x0, x1):
                return False
        return True

    # ---- MEM reads and writes as parts of a plan ---------------------------------------------------
    def _queues_free(self, locs, t_iss, used: Used) -> bool:
        """Every slice's queue can take one more MEM instruction at its cycle, counting
        both committed work and what this plan already holds."""
        seen = set()
        for (g, _), t in zip(locs, t_iss):
            if (g, t) in seen or ("q", g, t) in used or not self.sched.queue_free(self.mem_q[g], t):
                return False
            seen.add((g, t))
        return True

    def _mem_free(self, qs: Sequence[str], gs: Sequence[int], t_iss: Sequence[int], used: Used) -> bool:
        """:meth:`_queues_free` for planes on distinct slices at cycles >= 0 (what a group spec
        guarantees), without building the locations again."""
        busy = self.sched.busy
        for q, g, t in zip(qs, gs, t_iss):
            if ("q", g, t) in used:
                return False
            qb = busy.get(q)
            if qb is not None and t < len(qb.bits) and qb.bits[t]:
                return False
        return True

    def _spec(self, vt: VT, v: int, pos: int, planes: Optional[Sequence[int]], write: bool):
        """What a read (``write``: a write) of vector v's planes (``planes``; None: all) at position pos
        needs that does not depend on the cycle tried: (vt, whether the planes' slices differ, locs,
        queues, slices, cycle offsets from T to each issue, planes, direction, xs = (x0, x1) per plane,
        banks, lowest offset), or (vt, None) if it never fits. Kept per tensor, vector and position,
        because kernels try one group at many cycles in turn (vt in the entry guards against a reused id)."""
        key = (id(vt), v, pos, write, None if planes is None else tuple(planes))
        got = self._specs.get(key)
        if got is not None and got[0] is vt:
            return got
        spec = self._make_spec(vt, v, pos, planes, write)
        if len(self._specs) > 200_000:       # bound the memory; entries are cheap to rebuild
            self._specs.clear()
        self._specs[key] = spec
        return spec

    def _make_spec(self, vt: VT, v: int, pos: int, planes: Optional[Sequence[int]], write: bool):
        cfg = self.cfg
        pl = list(range(vt.planes)) if planes is None else list(planes)
        locs = [vt.loc(v, p) for p in pl]
        gs = [g for g, _ in locs]
        sp = [self.slice_pos[g] for g in gs]
        if write:
            if any(s == pos for s in sp):
                return (vt, None)
            d = self.dir_to(pos, sp[0])
            if any(self.dir_to(pos, s) != d for s in sp):
                return (vt, None)
            offs = [abs(s - pos) for s in sp]                          # issue = T + off
            xs = [(self.xloc(d, pos), self.xloc(d, s)) for s in sp]
        else:
            d = self.dir_to(sp[0], pos)
            if any(self.dir_to(s, pos) != d for s in sp):
                return (vt, None)
            offs = [-(cfg.mem_read_delay + abs(pos - s)) for s in sp]   # issue = T + off
            xs = [(self.xloc(d, s), self.xloc(d, pos)) for s in sp]
        # two planes in one slice issue in one cycle on one queue: never
        never = len(set(gs)) < len(gs)
        # readiness and write-after cycles are read at each try: they change (a state's write-after
        # when it is assigned)
        return (vt, not never, locs, [self.mem_q[g] for g in gs], gs, offs, pl, d, xs,
                [self.bank(a) for _, a in locs], min(offs))

    def ready_at(self, vt: VT, v: int, pos: int) -> int:
        """The first cycle T at which :meth:`read_group` ``(vt, v, pos, T)`` passes its readiness
        check (its reads issue at or after vector v is ready, and at or after cycle 0)."""
        spec = self._spec(vt, v, pos, None, False)
        if spec[1] is None:
            return 0
        return max(int(vt.ready[v]), 0) - spec[10]

    def read_free_from(self, spec: tuple, v: int, T: int) -> Optional[int]:
        """The first cycle T' >= T at which :meth:`read_spec` ``(plan, spec, v, T', {})`` passes its checks
        that need no stream (vector v ready, the issues at or after cycle 0, each plane's slice queue free
        of committed work), or None if the read never fits. A search may start there: every earlier try
        fails at those checks, before anything of the try (the streams' rotation) changes."""
        if spec[1] is None or not spec[1]:
            return None
        vt, qs, offs, omin = spec[0], spec[3], spec[5], spec[10]
        return self._queues_free_from(qs, offs, max(T, max(int(vt.ready[v]), 0) - omin))

    def write_free_from(self, vt: VT, v: int, pos: int, T: int,
                        planes: Optional[Sequence[int]] = None) -> Optional[int]:
        """The first cycle T' >= T at which :meth:`write_group` ``(plan, vt, v, pos, T', {}, planes)`` passes
        its checks that need no stream (the space writable, issues at or after cycle 0, each plane's
        slice queue free of committed work), or None if the write never fits: as
        :meth:`read_free_from`, every earlier try fails before changing anything."""
        spec = self._spec(vt, v, pos, planes, True)
        if spec[1] is None or not spec[1]:
            return None
        _, _, _, qs, _, offs, pl, _, _, _, omin = spec
        wd = self.cfg.mem_write_delay
        T = max([T, -omin] + [vt.write_after(v, p) - wd - o for o, p in zip(offs, pl)])
        return self._queues_free_from(qs, offs, T)

    def _queues_free_from(self, qs: Sequence[str], offs: Sequence[int], T: int) -> int:
        """The first T' >= T at which every queue qs[i] is free of committed work at T' + offs[i]."""
        busy = self.sched.busy
        bitmaps = [(b.bits, o) for b, o in ((busy.get(q), o) for q, o in zip(qs, offs)) if b is not None]
        moved = True
        while moved:           # each plane's next free cycle, until one T suits every plane
            moved = False
            for bits, o in bitmaps:
                t = T + o
                if t < len(bits) and bits[t]:
                    f = bits.find(0, t)
                    T = (len(bits) if f < 0 else f) - o
                    moved = True
        return T

    def read_group(self, plan: Plan, vt: VT, v: int, pos: int, T: int, used: Used,
                   prefer: Sequence[int] = ()) -> Optional[int]:
        """Plan reads of every byte plane of vector v of vt so that they pass position pos
        at cycle T on one stream group (the first of ``prefer`` that is free, if any).  Returns the
        group's base stream, or None."""
        return self.read_spec(plan, self._spec(vt, v, pos, None, False), v, T, used, prefer)

    def read_spec(self, plan: Plan, spec: tuple, v: int, T: int, used: Used,
                  prefer: Sequence[int] = ()) -> Optional[int]:
        """:meth:`read_group` with the group's :meth:`_spec` (vector v of its tensor) found already."""
        if spec[1] is None:
            return None
        vt, ok, locs, qs, gs, offs, _, d, xs, banks, omin = spec
        t0 = T + omin                       # the earliest issue of the planes
        if t0 < vt.ready[v] or t0 < 0 or not ok:
            return None
        t_iss = [T + o for o in offs]
        busy = self.sched.busy
        for q, g, t in zip(qs, gs, t_iss):  # each slice's queue free (see _mem_free)
            if ("q", g, t) in used:
                return None
            qb = busy.get(q)
            if qb is not None and t < len(qb.bits) and qb.bits[t]:
                return None
        k = T - xs[0][1]
        b = self.free_group(d, len(offs), k, xs, used, prefer=prefer)
        if b is None:
            return None
        issues, reads = plan.issues, plan.reads
        for p in range(len(offs)):
            t = t_iss[p]
            issues.append((qs[p], t, "Read", (locs[p][1], b + p)))
            reads.append((gs[p], t, banks[p]))
            used[(b + p, k)] = 1
            used[("q", gs[p], t)] = 1
        plan.spans.extend((b + p, k, x0, x1) for p, (x0, x1) in enumerate(xs))
        return b

    def write_group(self, plan: Plan, vt: VT, v: int, pos: int, T: int, used: Used,
                    planes: Optional[Sequence[int]] = None) -> Optional[Tuple[int, int]]:
        """Plan writes of vector v of vt from a stream group leaving position pos at cycle T.
        Returns (base stream, landing cycle of the last plane) or None."""
        spec = self._spec(vt, v, pos, planes, True)
        if spec[1] is None:
            return None
        _, ok, locs, qs, gs, offs, pl, d, xs, banks, omin = spec
        wd = self.cfg.mem_write_delay
        t_iss = [T + o for o in offs]
        for t, p in zip(t_iss, pl):
            if t + wd < vt.write_after(v, p):
                return None
        if not ok or T + omin < 0 or not self._mem_free(qs, gs, t_iss, used):
            return None
        w = len(offs)
        k = T - xs[0][0]
        b = self.free_group(d, 4 if w == 4 else w, k, xs, used)
        if b is None:
            return None
        issues, writes = plan.issues, plan.writes
        for i in range(w):
            t = t_iss[i]
            issues.append((qs[i], t, "Write", (locs[i][1], b + i)))
            writes.append((gs[i], t + wd, banks[i]))
            used[(b + i, k)] = 1
            used[("q", gs[i], t)] = 1
        plan.spans.extend((b + i, k, xa, xb) for i, (xa, xb) in enumerate(xs))
        return b, max(t_iss) + wd


# ---------------------------------------------------------------------------------------------
# elementwise expressions
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Expr:
    """A node of a per-element expression evaluated on the VXM."""

    op: str                                   # "in", "const" or a VXM mnemonic
    dtype: dt.DType                           # result type
    args: Tuple["Expr", ...] = ()
    imm: Dict[str, int] = field(default_factory=dict)
    src: Optional[Tuple[VT, Callable[[int], int]]] = None   # "in": tensor and output-vector -> its vector
    min_t: int = 0                            # earliest relative issue time (staggers reads)

    # construction helpers
    @staticmethod
    def input(vt: VT, index: Callable[[int], int]) -> "Expr":
        return Expr("in", vt.dtype, src=(vt, index))

    def source(self) -> Tuple[VT, Callable[[int], int]]:
        """An "in" node's tensor and output-vector -> its vector."""
        if self.src is None:
            raise CompileError(f"internal: a {self.op!r} node reads no tensor")
        return self.src

    @staticmethod
    def const(d: dt.DType, value) -> "Expr":
        if d.is_float:
            bits = int(np.array(value, dtype=d.numpy).view({2: np.uint16, 4: np.uint32}[d.nbytes]))
        else:
            bits = int(np.array(value).astype(np.int64)) & ((1 << d.bits) - 1)
        if bits >= 2 ** 31:
            bits -= 2 ** 32
        return Expr("const", d, imm={"value": bits})

    def __call__(self, *a):       # not used
        raise TypeError


def E(op: str, d: dt.DType, *args: Expr, **imm) -> Expr:
    return Expr(op, d, tuple(args), imm)


def cvt(x: Expr, to: dt.DType) -> Expr:
    if x.dtype == to:
        return x
    if x.op == "const":
        # fold: convert the constant on the host with the chip's rules
        from .. import numerics
        bits = numerics.convert(np.array([x.imm["value"] & 0xFFFFFFFF], dtype=np.uint32), x.dtype, to)
        narrow = {1: np.uint8, 2: np.uint16, 4: np.uint32}[to.nbytes]
        return Expr.const(to, np.array(bits, dtype=np.uint32).astype(narrow).view(to.numpy)[0])
    return Expr("cvt", to, (x,), {"from": x.dtype.code})


def _topo(root: Expr) -> Sequence[Expr]:
    """The expression's distinct nodes, each after its arguments (depth first, arguments in order).
    Kept on the root (an expression is not changed once built, and the compiler asks for the order of
    one expression many times), and found without recursion (no closure to leave as cyclic garbage)."""
    got = root.__dict__.get("_order")
    if got is not None and got[-1] is root:          # not a copy's (copy.copy would share the entry)
        return got
    order: List[Expr] = []
    seen = {id(root)}
    stack = [(root, iter(root.args))]
    while stack:
        n, it = stack[-1]
        for a in it:
            if id(a) not in seen:
                seen.add(id(a))
                stack.append((a, iter(a.args)))
                break
        else:
            stack.pop()
            order.append(n)
    root.__dict__["_order"] = got = tuple(order)
    return got


@dataclass
class _Chain:
    """An expression laid out on ALUs with times relative to the first issue."""

    nodes: List[Expr]
    alu: Dict[int, int]                      # id(node) -> ALU
    t: Dict[int, int]                        # id(node) -> issue time
    land: Dict[int, int]                     # id(node) -> result landing time
    last_use: Dict[int, int]                 # id(node) -> last time a consumer issues
    reads: List[Tuple[int, Expr]]            # (consumer issue time, input node)
    root: Optional[Expr] = None              # the staged copy laid out (None: the expression itself)


def _layout(root: Expr, cfg: ChipConfig, alus: Sequence[int], alap: bool = False) -> _Chain:
    """The expression's operations on the ALUs, each as soon as its operands land (``alap``: then each
    but the root as late as its first consumer allows, see below)."""
    nodes = [n for n in _topo(root) if n.op != "in"]
    if len(nodes) > len(alus):
        raise CompileError(f"an elementwise expression of {len(nodes)} VXM operations needs more than the "
                           f"{len(alus)} ALUs available")
    alu = {id(n): alus[i] for i, n in enumerate(nodes)}
    t: Dict[int, int] = {}
    land: Dict[int, int] = {}
    for n in nodes:
        start = n.min_t
        for a in n.args:
            if a.op != "in":
                start = max(start, land[id(a)])
        t[id(n)] = start
        land[id(n)] = start + op_of(_mn(n), "VXM").delay(cfg)
    # constants: issue as late as their first consumer allows
    for n in nodes:
        if n.op == "const":
            users = [t[id(m)] for m in nodes if any(a is n for a in m.args)]
            if users:
                d = land[id(n)] - t[id(n)]
                t[id(n)] = max(0, min(users) - d)
                land[id(n)] = t[id(n)] + d
    # recompute consumers after moving constants (they may start earlier)
    for n in nodes:
        if n.op != "const":
            start = n.min_t
            for a in n.args:
                if a.op != "in":
                    start = max(start, land[id(a)])
            t[id(n)] = start
            land[id(n)] = start + op_of(_mn(n), "VXM").delay(cfg)
    if alap:
        # every operation but the root as late as its first consumer allows: a value that lands
        # early is held in its ALU's latch until used, and a held latch keeps the next vector's
        # value out of that ALU (the kernel's vectors then start cycles apart instead of one)
        for n in reversed(nodes[:-1]):
            users = [t[id(m)] for m in nodes if any(a is n for a in m.args)]
            if users:
                d = land[id(n)] - t[id(n)]
                late = min(users) - d
                if late > t[id(n)]:
                    t[id(n)], land[id(n)] = late, late + d
    last_use = {id(n): land[id(n)] for n in nodes}
    reads, seen_reads = [], set()
    for m in nodes:
        for a in m.args:
            if a.op == "in":
                # one read serves every consumer of the same operand in the same cycle
                if (t[id(m)], id(a)) not in seen_reads:
                    seen_reads.add((t[id(m)], id(a)))
                    reads.append((t[id(m)], a))
            else:
                last_use[id(a)] = max(last_use[id(a)], t[id(m)])
    return _Chain(nodes, alu, t, land, last_use, reads)


def _mn(n: Expr) -> str:
    return n.op


def _vxm_args(n: Expr, srcs: Dict[Tuple[int, int], int], dst: int, alu_of: Dict[int, int],
              t_of: Dict[int, int]) -> tuple:
    """Encode a node as VXM instruction operands; srcs maps (time, id(input node)) -> stream base."""
    op = op_of(n.op, "VXM")

    def src(a: Expr) -> int:
        if a.op == "in":
            return srcs[(t_of[id(n)], id(a))]
        return isa.LATCH_BASE + alu_of[id(a)]

    out = []
    srcnames = [f.name for f in op.fields if f.kind == "src"]
    for f in op.fields:
        if f.name == "dtype":
            out.append(n.args[0].dtype.code if op.cls == "cvt" else n.dtype.code)
        elif f.name == "to":
            out.append(n.dtype.code)
        elif f.kind == "dst":
            out.append(dst)
        elif f.kind == "src":
            out.append(src(n.args[srcnames.index(f.name)]))
        else:
            out.append(n.imm.get(f.name, f.default if f.default is not None else 0))
    return tuple(out)


def _collides(ch: _Chain, v: int) -> bool:
    """Two operand reads of vector v from one slice in one cycle (same relative time)."""
    by_t: Dict[int, set] = {}
    for tc, node in ch.reads:
        vt, idx = node.source()
        vin = idx(v)
        seen = by_t.setdefault(tc, set())
        for p in range(vt.planes):
            g = vt.loc(vin, p)[0]
            if g in seen:
                return True
            seen.add(g)
    return False


def _staged(root: Expr) -> Expr:
    """A copy of the expression in which every operand read goes through its own mov,
    the movs one cycle apart, so that no two reads share a cycle."""
    memo: Dict[int, Expr] = {}
    count = [0]

    def rec(n: Expr) -> Expr:
        if id(n) in memo:
            return memo[id(n)]
        if n.op == "in":
            m = Expr("mov", n.dtype, (n,), {}, min_t=count[0])
            count[0] += 1
            memo[id(n)] = m
            return m
        c = Expr(n.op, n.dtype, tuple(rec(a) for a in n.args), dict(n.imm), n.src, n.min_t)
        memo[id(n)] = c
        return c
    return rec(root)


def _staggered(root: Expr) -> Expr:
    """A copy of the expression in which each operation that reads operands from streams
    issues at its own relative cycle (a second operand read by one operation goes through
    a mov): as collision-free as _staged, usually with no extra ALU."""
    memo: Dict[int, Expr] = {}
    count = [0]

    def rec(n: Expr) -> Expr:
        if id(n) in memo:
            return memo[id(n)]
        if n.op == "in":
            return n
        args, reads = [], 0
        for a in n.args:
            if a.op == "in":
                if reads:
                    a = Expr("mov", a.dtype, (a,), {}, min_t=count[0])
                    count[0] += 1
                reads += 1
            else:
                a = rec(a)
            args.append(a)
        min_t = n.min_t
        if reads:
            min_t = max(min_t, count[0])
            count[0] += 1
        c = Expr(n.op, n.dtype, tuple(args), dict(n.imm), n.src, min_t)
        memo[id(n)] = c
        return c
    return rec(root)


# vectors of one elementwise kernel in flight in one cycle, at most (each needs its own streams)
MAX_ALU_SETS = 4


class NeedsSplit(CompileError):
    """An expression whose operand reads collide in one slice cannot be staged within
    the ALUs it was given: the caller should split it into smaller kernels."""


def _chains(ctx: Ctx, root: Expr, vectors: Sequence[int], alus: Sequence[int]) -> Dict[int, "_Chain"]:
    """The layout each vector uses: the plain one, or, when two of its operand reads come
    from one slice in one cycle, a staggered or fully staged one.  Decided for every
    vector before anything is committed, so that NeedsSplit leaves no trace."""
    cfg = ctx.cfg
    plain = _layout(root, cfg, alus, alap=True)
    alts: Optional[List[_Chain]] = None
    out: Dict[int, _Chain] = {}
    for v in vectors:
        if not _collides(plain, v):
            out[v] = plain
            continue
        if alts is None:
            # the plain expression as soon as possible (its reads where ALAP had not moved them
            # together), then the staggered and staged ones, whose reads are kept apart by their
            # operations' earliest cycles (laid out as soon as possible: ALAP would gather them again)
            alts = [_layout(root, cfg, alus)]
            for make in (_staggered, _staged):
                r = make(root)
                n = len([x for x in _topo(r) if x.op != "in"])
                if n <= len(alus):
                    alt = _layout(r, cfg, alus)
                    alt.root = r
                    alts.append(alt)
        ch = next((c for c in alts if not _collides(c, v)), None)
        if ch is None:
            raise NeedsSplit(f"operand reads of an elementwise kernel collide and cannot be staged on "
                             f"{len(alus)} ALUs")
        out[v] = ch
    return out


def earliest(ctx: Ctx, ch: _Chain, v: int, start: int) -> int:
    """The first start cycle (>= start) at which every operand of the chain for vector v has been
    written, its reads arriving at the VXM."""
    lo = start
    for tc, node in ch.reads:
        vt, idx = node.source()
        vin = idx(v)
        for p in range(vt.planes):
            g, _ = vt.loc(vin, p)
            lo = max(lo, int(vt.ready[vin]) + ctx.cfg.mem_read_delay + abs(ctx.vx - ctx.slice_pos[g]) - tc)
    return lo


def map_kernel(ctx: Ctx, root: Expr, out: VT, vectors: Optional[Sequence[int]] = None,
               alus: Optional[Sequence[int]] = None, start: int = 0) -> int:
    """Evaluate `root` for every vector of `out` (or the given ones).  Returns the last
    landing cycle."""
    cfg = ctx.cfg
    if root.op == "in":
        root = E("mov", root.dtype, root)
    alus = list(alus if alus is not None else range(cfg.vxm_alus_per_lane))
    vectors = range(out.nvec) if vectors is None else vectors
    chains, set_of = _alu_sets(ctx, root, vectors, alus)
    pos = ctx.vx
    anchor = [start] * (max(set_of.values(), default=0) + 1)     # per ALU set: its next anchor cycle
    last = 0
    for v in vectors:
        ch = chains[v]
        a = anchor[set_of[v]]
        root_v = ch.root if ch.root is not None else root
        lo = earliest(ctx, ch, v, start)
        # ... and from the output's space: reused space is writable only after its last reader
        for p in range(out.planes):
            g, _ = out.loc(v, p)
            lo = max(lo, out.write_after(v, p) - ch.land[id(root_v)] - abs(pos - ctx.slice_pos[g])
                     - cfg.mem_write_delay)
        a = max(a, lo)
        # the operands' tensors and vectors do not change from one cycle tried to the next
        reads_v = [(tc, id(node), vt, idx(v)) for tc, node in ch.reads for vt, idx in (node.source(),)]
        specs = [ctx._spec(vt, vin, pos, None, False) for _, _, vt, vin in reads_v]
        a, landing = _map_search(ctx, ch, root_v, reads_v, specs, out, v, a)
        anchor[set_of[v]] = a
        last = max(last, landing)
    return last


def _map_search(ctx: Ctx, ch: _Chain, root_v: Expr, reads_v, specs, out: VT, v: int, a: int) -> Tuple[int, int]:
    """Place map_kernel's vector v at the first anchor cycle >= a at which it fits (:func:`_map_try`),
    looking at most SEARCH cycles ahead; returns that cycle and the write's landing cycle.

    Trying a cycle costs a plan; most tries fail, and only at checks of committed work. So a cycle is
    first looked at through :class:`_MapChecks`: when a check fails, the try's only lasting effect (the
    stream rotation advanced by the stream groups it found before failing) is replayed without a plan,
    and cycles at which the first read's slices are busy, where a try changes nothing, are skipped at
    once (:meth:`Ctx.read_free_from`). The cycle found, and every choice on the way, are those of trying
    each cycle in turn."""
    end = a + SEARCH
    chk = _MapChecks(ctx, ch, root_v, reads_v, specs, out, v) if FAST_SEARCH else None
    tc0 = reads_v[0][0] if reads_v else 0
    while a < end:
        s = chk.first_failing(a) if chk is not None else len(specs) + 2
        if s == 0 and reads_v:
            t = ctx.read_free_from(specs[0], reads_v[0][3], a + tc0)
            if t is None:
                break                           # the first read never fits
            a = max(a + 1, t - tc0)
            continue
        if chk is not None and s < chk.n:
            chk.replay(a, s)
        else:
            landing = _map_try(ctx, ch, root_v, reads_v, specs, out, v, a)
            if landing is not None:
                out.ready[v] = max(out.ready[v], landing)
                for tc, _, vt, vin in reads_v:
                    vt.last_read[vin] = max(vt.last_read[vin], a + tc)
                return a, landing
        a += 1
    raise CompileError(f"no room found to schedule an elementwise kernel writing {out.name}")


class _MapChecks:
    """The checks of committed work a try of :func:`_map_try` makes, as stages in the try's own order:
    each operand read (before it looks for streams: vector ready, issues at cycle >= 0, its slices'
    queues free and not taken by an earlier read of the plan), the write (likewise, and the space
    writable), then a part of the scheduler's final check (VXM queues free, ALU latches free, no read
    meeting a committed write in its bank and the reverse). Built once per vector: nothing is committed
    while its search runs, so every check is a function of the anchor cycle alone."""

    def __init__(self, ctx: Ctx, ch: _Chain, root_v: Expr, reads_v, specs, out: VT, v: int):
        sched = ctx.sched
        self.ctx = ctx
        busy = sched.busy
        taken: Dict[Tuple[int, int], int] = {}     # (slice, cycle relative to the anchor) of earlier reads
        # a stage: (lowest anchor, always fails, [(queue bitmap, issue cycle relative to the anchor)])
        self.stages: List[Tuple[int, bool, list]] = []
        self.groups: List[Tuple[int, int, int, list]] = []    # per read, then the write: (d, w, k offset, xs)
        for (tc, _, _, vin), spec in zip(reads_v, specs):
            if spec[1] is None:
                self.stages.append((0, True, []))
                continue
            vt, ok, _, qs, gs, offs, _, d, xs, _, omin = spec
            rel = [tc + o for o in offs]
            bad = not ok or any((g, r) in taken for g, r in zip(gs, rel))
            taken.update(((g, r), 1) for g, r in zip(gs, rel))
            self.stages.append((max(int(vt.ready[vin]), 0) - omin - tc, bad, self._bitmaps(busy, qs, rel)))
            self.groups.append((d, len(offs), tc - xs[0][1], xs))
        land = ch.land[id(root_v)]
        wspec = ctx._spec(out, v, ctx.vx, None, True)
        if wspec[1] is None:
            self.stages.append((0, True, []))
        else:
            _, ok, _, qs, gs, offs, pl, d, xs, _, omin = wspec
            wd = ctx.cfg.mem_write_delay
            lo = max([-land - omin] + [out.write_after(v, p) - wd - o - land for o, p in zip(offs, pl)])
            rel = [land + o for o in offs]
            bad = not ok or any((g, r) in taken for g, r in zip(gs, rel))
            self.stages.append((lo, bad, self._bitmaps(busy, qs, rel)))
            self.groups.append((d, len(offs), land - xs[0][0], xs))
        self.fin = self._final(ctx, ch, reads_v, specs, wspec, land)
        self.n = len(self.stages) + 1

    @staticmethod
    def _bitmaps(busy, qs, rel) -> list:
        """(bitmap, relative cycle) of each queue that has issued anything (the others are free)."""
        return [(busy[q].bits, r) for q, r in zip(qs, rel) if q in busy]

    @staticmethod
    def _final(ctx: Ctx, ch: _Chain, reads_v, specs, wspec, land: int):
        """What of :meth:`Scheduler.fits` the final stage checks: (lowest anchor, [(bitmap, relative
        cycle)] of issues and landings that need a free cycle, [(bitmap, relative from, to)] of held
        latches that need no landing, [(bank table, slice, relative cycle, bank bit)])."""
        sched = ctx.sched
        lo = 0
        cells, spans, banks = [], [], []
        for n in ch.nodes:
            alu, t, ld = ch.alu[id(n)], ch.t[id(n)], ch.land[id(n)]
            lo = max(lo, -t)
            cells += [(m.bits, r) for m, r in ((sched.busy.get(f"VXM.{alu}"), t), (sched.landed.get(alu), ld),
                                               (sched.held.get(alu), ld)) if m is not None]
            lb = sched.landed.get(alu)
            if ch.last_use[id(n)] > ld and lb is not None:
                spans.append((lb.bits, ld + 1, ch.last_use[id(n)] + 1))
        for (tc, _, _, _), spec in zip(reads_v, specs):
            banks += [(sched.bank_wr, g, tc + o, 1 << bk) for g, o, bk in zip(spec[4], spec[5], spec[9])]
        if wspec[1] is not None:
            wd = ctx.cfg.mem_write_delay
            banks += [(sched.bank_rd, g, land + o + wd, 1 << bk) for g, o, bk in zip(wspec[4], wspec[5], wspec[9])]
        return lo, cells, spans, banks

    def first_failing(self, a: int) -> int:
        """The stage at which a try at anchor a fails (self.n - 1: the final one), or self.n if every
        stage passes (the try may still fail: at streams, or at the scheduler's other checks)."""
        for s, (lo, bad, maps) in enumerate(self.stages):
            if bad or a < lo:
                return s
            for bits, r in maps:
                t = a + r
                if t < len(bits) and bits[t]:
                    return s
        lo, cells, spans, banks = self.fin
        if a < lo:
            return self.n - 1
        for bits, r in cells:
            t = a + r
            if t < len(bits) and bits[t]:
                return self.n - 1
        for bits, r0, r1 in spans:
            if bits.find(1, a + r0, a + r1) >= 0:
                return self.n - 1
        for table, g, r, bit in banks:
            if table.get((g, a + r), 0) & bit:
                return self.n - 1
        return self.n

    def replay(self, a: int, s: int) -> None:
        """What a try at anchor a that fails at stage s leaves behind: the stream groups the reads before
        it (and the write, when it is the final stage) look for, each advancing the rotation, in order,
        until one finds none."""
        used: Used = {}
        for d, w, koff, xs in self.groups[:s]:
            k = a + koff
            b = self.ctx.free_group(d, w, k, xs, used)
            if b is None:
                return
            for p in range(w):
                used[(b + p, k)] = 1


def _map_try(ctx: Ctx, ch: _Chain, root_v: Expr, reads_v, specs, out: VT, v: int, a: int) -> Optional[int]:
    """Place map_kernel's vector v with its chain's first issue at cycle a, if the reads
    ``reads_v`` (relative cycle, id of the input node, tensor, vector; ``specs``: their
    :meth:`Ctx._spec`), the write and the VXM operations all fit then; returns the landing
    cycle of the write, or None."""
    plan = Plan()
    used: Used = {}
    srcs: Dict[Tuple[int, int], int] = {}
    pos = ctx.vx
    for (tc, nid, _, vin), spec in zip(reads_v, specs):
        b = ctx.read_spec(plan, spec, vin, a + tc, used)
        if b is None:
            return None
        srcs[(tc, nid)] = b
    wr = ctx.write_group(plan, out, v, pos, a + ch.land[id(root_v)], used)
    if wr is None:
        return None
    dst, landing = wr
    for n in ch.nodes:
        q = f"VXM.{ch.alu[id(n)]}"
        n_dst = dst if n is root_v else isa.NONE
        plan.issues.append((q, a + ch.t[id(n)], n.op, _vxm_args(n, srcs, n_dst, ch.alu, ch.t)))
        plan.lands.append((ch.alu[id(n)], a + ch.land[id(n)]))
        if ch.last_use[id(n)] > ch.land[id(n)]:
            plan.holds.append((ch.alu[id(n)], a + ch.land[id(n)], a + ch.last_use[id(n)]))
    if not ctx.sched.fits(plan):
        return None
    ctx.sched.commit(plan)
    return landing


def _alu_sets(ctx: Ctx, root: Expr, vectors: Sequence[int], alus: Sequence[int]):
    """Chains for every vector, and the ALU set each uses: an expression of n operations leaves room
    for len(alus) // n disjoint sets, and vectors take them in turn so that several vectors issue in one
    cycle (the reservation table keeps their streams and MEM ports apart). Falls back to fewer, larger
    sets (down to one) when the vectors' operand reads collide and a smaller set cannot stage them."""
    n = max(1, len([x for x in _topo(root) if x.op != "in"]))
    most = min(len(alus) // n, len(vectors), MAX_ALU_SETS) if len(vectors) > 1 else 1
    for k in range(most, 1, -1):
        per = len(alus) // k
        try:
            chains: Dict[int, _Chain] = {}
            set_of: Dict[int, int] = {}
            for j in range(k):
                mine = [v for i, v in enumerate(vectors) if i % k == j]
                chains.update(_chains(ctx, root, mine, alus[j * per:(j + 1) * per]))
                set_of.update((v, j) for v in mine)
            return chains, set_of
        except NeedsSplit:
            continue          # staging colliding reads needs more ALUs a set: fewer sets
    return _chains(ctx, root, vectors, alus), {v: 0 for v in vectors}


# ---------------------------------------------------------------------------------------------
# moving lanes between vectors
# ---------------------------------------------------------------------------------------------
@dataclass
class Piece:
    """Lanes [src_lane, src_lane + n) of vector src_v of src go to lanes
    [dst_lane, dst_lane + n) of an output vector."""

    src: VT
    src_v: int
    src_lane: int
    n: int
    dst_lane: int


def _shift_piece(ctx: Ctx, plan: Plan, used: Used, pc: Piece, t: int, hem: int, sxq: List[str],
                 w: int) -> Optional[int]:
    """Read piece pc to hemisphere hem's SXM and Shift it to its lanes (one Shift per byte plane,
    on any SXM queue free then) so that it reaches the VXM at cycle t; the shifted stream group
    (w byte planes), or None when no read, stream, queue or shifter is free."""
    cfg, sched = ctx.cfg, ctx.sched
    d_sxm = cfg.sxm_delay
    sx = cfg.sxm_position(hem)
    ts = t - d_sxm - abs(ctx.vx - sx)
    b = ctx.read_group(plan, pc.src, pc.src_v, sx, ts, used)
    if b is None:
        return None
    back = ctx.dir_to(sx, ctx.vx)
    kb = ts + d_sxm - ctx.xloc(back, sx)
    bo = ctx.free_group(back, w, kb, [(ctx.xloc(back, sx), ctx.xloc(back, ctx.vx))] * w, used)
    if bo is None:
        return None
    # any SXM queue of the hemisphere free at ts (committed work and this plan)
    free_q = [q for q in sxq if sched.queue_free(q, ts) and ("q", q, ts) not in used][:w]
    if len(free_q) < w or sched.sxm_use.get((ts, hem, "shifters"), 0) + w + sum(
            1 for c_, h_, r_ in plan.sxm if (c_, h_, r_) == (ts, hem, "shifters")) > cfg.sxm_shifters:
        return None
    for p in range(w):
        used[("q", free_q[p], ts)] = 1
        plan.issues.append((free_q[p], ts, "Shift", (bo + p, b + p, pc.dst_lane - pc.src_lane)))
        plan.sxm.append((ts, hem, "shifters"))
        plan.spans.append((bo + p, kb, ctx.xloc(back, sx), ctx.xloc(back, ctx.vx)))
        used[(bo + p, kb)] = 1
    return bo


def _place_piece(ctx: Ctx, plan: Plan, used: Used, pc: Piece, t: int, sxqs: Dict[int, List[str]],
                 mask_of: Callable[[int, int], Union[VT, List[VT]]], w: int) -> Optional[Tuple[int, int]]:
    """Plan one piece's read (and shift) and its mask so that both reach the VXM at cycle t.
    Returns (piece stream, mask stream) or None."""
    if pc.dst_lane == pc.src_lane:
        # straight from MEM to the VXM at cycle t
        b = ctx.read_group(plan, pc.src, pc.src_v, ctx.vx, t, used)
        if b is None:
            return None
        piece_src = b
    else:
        hem = 0 if ctx.slice_pos[pc.src.loc(pc.src_v, 0)[0]] < ctx.vx else 1
        bo = _shift_piece(ctx, plan, used, pc, t, hem, sxqs[hem], w)
        if bo is None:
            return None
        piece_src = bo
    # mask the piece to its lanes (the mask arrives on a stream too)
    masks = mask_of(pc.dst_lane, pc.dst_lane + pc.n)
    for mvt in (masks if isinstance(masks, (list, tuple)) else [masks]):
        bm = ctx.read_group(plan, mvt, 0, ctx.vx, t, used)
        if bm is not None:
            return piece_src, bm
    return None


PlacePiece = Callable[[Plan, Used, Piece, int], Optional[Tuple[int, int]]]


def _chain_pieces(plan: Plan, used: Used, pieces: List[Piece], t: int, alus: Tuple[int, int, int],
                  d: dt.DType, d_alu: int, place: PlacePiece) -> Optional[Tuple[Tuple[int, int], int]]:
    """Mask each piece on ALU alus[2] from cycle t and OR it into the two accumulators alus[0:2]
    in turn.  Returns ((accumulator, landing cycle), pieces) or None when a piece finds no room."""
    m_alu = alus[2]
    acc: Optional[Tuple[int, int]] = None       # (alu, landing)
    k = 0
    for pc in pieces:
        # a piece whose read collides with this plan's own reads slips a cycle or two
        got = None
        for _slip in range(max(4, PIECE_SLIP * d.nbytes)):
            mark, saved = plan.mark(), dict(used)
            got = place(plan, used, pc, t)
            if got is not None:
                break
            plan.rollback(mark)
            used.clear()
            used.update(saved)
            t += 1
        if got is None:
            return None
        piece_src, bm = got
        plan.issues.append((f"VXM.{m_alu}", t, "and", (d.code, isa.NONE, piece_src, bm)))
        plan.lands.append((m_alu, t + d_alu))
        tm = t + d_alu
        t_or = tm
        dst_alu = alus[k % 2]
        if acc is None:
            # the next masked piece would overwrite m_alu: copy into an accumulator
            plan.issues.append((f"VXM.{dst_alu}", tm, "mov", (d.code, isa.NONE, isa.LATCH_BASE + m_alu)))
            plan.lands.append((dst_alu, tm + d_alu))
            acc = (dst_alu, tm + d_alu)
        else:
            t_or = max(tm, acc[1])
            plan.issues.append((f"VXM.{dst_alu}", t_or, "or", (d.code, isa.NONE, isa.LATCH_BASE + acc[0],
                                                            isa.LATCH_BASE + m_alu)))
            plan.lands.append((dst_alu, t_or + d_alu))
            if t_or > acc[1]:
                plan.holds.append((acc[0], acc[1], t_or))
            if t_or > tm:
                plan.holds.append((m_alu, tm, t_or))
            acc = (dst_alu, t_or + d_alu)
        k += 1
        # the next masked piece may land in m_alu only after this one was taken
        t = max(t + 1, (t_or if k > 1 else tm) + 1 - d_alu)
    assert acc is not None              # pieces is not empty
    return acc, k


def _earliest_piece_cycle(ctx: Ctx, pieces: List[Piece], start: int, w: int) -> int:
    """No piece can reach the VXM before its source vector is ready and has travelled there (the
    k-th piece arrives k cycles after the first at the earliest): the first piece's cycle."""
    lo = start
    for k, pc in enumerate(pieces):
        dist = min(abs(ctx.vx - ctx.slice_pos[pc.src.loc(pc.src_v, p)[0]]) for p in range(w))
        extra = 0 if pc.dst_lane == pc.src_lane else ctx.cfg.sxm_delay
        lo = max(lo, int(pc.src.ready[pc.src_v]) + ctx.cfg.mem_read_delay + dist + extra - k)
    return lo


def lanemove_kernel(ctx: Ctx, out: VT, pieces_of: Callable[[int], List[Piece]],
                    mask_of: Callable[[int, int], Union[VT, List[VT]]], start: int = 0) -> int:
    """Build every vector of `out` from pieces: each piece is read from MEM, shifted to
    its lanes on an SXM when needed (two shifts never needed: one Shift moves lanes up
    or down), masked to its lanes on the VXM and or-ed into the vector being built in an
    ALU latch; the finished vector is written to MEM.  mask_of(a, b) is a constant vector
    whose lanes [a, b) are all-ones (out.planes bytes wide), or a list of copies of it
    in different slices, tried in turn.  Returns the cycle the last vector lands."""
    cfg, sched = ctx.cfg, ctx.sched
    d = out.dtype
    nalu = cfg.vxm_alus_per_lane
    last = 0
    sxqs = {h: [q.name for q in cfg.queues if q.unit == "SXM" and q.hemisphere == h] for h in (0, 1)}

    def place(plan: Plan, used: Used, pc: Piece, t: int) -> Optional[Tuple[int, int]]:
        return _place_piece(ctx, plan, used, pc, t, sxqs, mask_of, d.nbytes)

    busy_from: Dict[int, int] = {}
    for v in range(out.nvec):
        pieces = pieces_of(v)
        if not pieces:
            raise CompileError(f"internal: no data for vector {v} of {out.name}")
        # three ALUs per vector (two accumulate alternately, one masks pieces), rotating over
        # disjoint triples so that consecutive vectors can be built at the same time
        base = 3 * (v % max(1, nalu // 3))
        alus = (base, base + 1, (base + 2) % nalu)
        # the triple's ALUs stay busy about one cycle per piece of its previous vector:
        # starting the search there saves compile time (not a correctness bound)
        a = max(_earliest_piece_cycle(ctx, pieces, start, d.nbytes), busy_from.get(base, 0))
        for _tries in range(SEARCH):
            plan = Plan()
            used: Used = {}
            chained = _chain_pieces(plan, used, pieces, a, alus, d, cfg.vxm_alu_delay, place)
            wr = None if chained is None else ctx.write_group(plan, out, v, ctx.vx, chained[0][1] + cfg.vxm_alu_delay,
                                                               used)
            if chained is not None and wr is not None:
                (acc_alu, acc_t), k = chained
                dst, landing = wr
                fin = alus[k % 2]
                plan.issues.append((f"VXM.{fin}", acc_t, "mov", (d.code, dst, isa.LATCH_BASE + acc_alu)))
                plan.lands.append((fin, acc_t + cfg.vxm_alu_delay))
                if sched.fits(plan):
                    sched.commit(plan)
                    out.ready[v] = max(out.ready[v], landing)
                    for pc in pieces:
                        pc.src.last_read[pc.src_v] = max(pc.src.last_read[pc.src_v], acc_t)
                    last = max(last, landing)
                    busy_from[base] = a + len(pieces)
                    break
            a += 1
        else:
            raise CompileError(f"no room found to schedule a lane move writing {out.name}")
    return last


# ---------------------------------------------------------------------------------------------
# the MXM
# ---------------------------------------------------------------------------------------------
@dataclass
class MatMul:
    """One 2-d product C[M, N] = A[M, K] x B[K, N] on tensors in MEM: row m of A is
    A's row a_row(m), row k of B is B's row b_row(k), row m of C is out's row o_row(m)."""

    A: VT
    B: VT
    out: VT
    M: int
    K: int
    N: int
    a_row: Callable[[int], int]
    b_row: Callable[[int], int]
    o_row: Callable[[int], int]
    taps: Optional["Taps"] = None
    # int8: A's last chunk of K with its lanes past K zero, vector m for output row m (lower_more.masked_last):
    # that chunk's products read it, so its weight loads skip the buffer's rows past K, whatever they hold
    # (a stale weight times a zero activation adds nothing to an integer sum)
    A_last: Optional[VT] = None


@dataclass
class Taps:
    """A convolution's product read straight from its image's rows (no window): K is ``T`` taps of
    ``C`` channels each (B's rows tap-major, :func:`lpucore.convref.weight_matrix`), and tap t of
    output row m is A's row ``rows[m, t]``, or a pad (-1) whose products are skipped (zero). Each tap
    takes whole K chunks of its own (a chunk never holds two taps: they sit on the same lanes of
    different rows), the chunk's rows past C loading zeros."""

    rows: np.ndarray       # int64 [M, T]
    C: int


class _PlaneState:
    def __init__(self):
        self.lw_free = 0          # first cycle the LW queue may load the next weights
        self.abc_last = -1        # last ABC issued with the installed weights
        self.abc_next = 0         # first cycle for the next ABC
        self.acc_next = 0         # first cycle for the next ACC
        self.half_free = [0, 0]   # first cycle an ABC product may land in each accumulator half
        self.blocks = 0
        # the weight buffer's byte-rows from this one on hold zeros (None: unknown, as at the program's
        # start, when another program may have left weights there)
        self.zero_from: Optional[int] = None


class _LoadRow:
    """One weight row an LW cycle reads: where it is and what does not change while a load is searched."""

    __slots__ = ("vt", "v", "g", "addr", "ready", "lead", "x0", "bank", "q")

    def __init__(self, ctx: Ctx, vt: VT, v: int, plane: int, xm: int, din: int, zero: bool = False):
        self.vt: Optional[VT] = vt
        self.v = v
        self.g, self.addr = vt.loc(v, plane)
        self.ready = int(vt.ready[v]) if not zero else 0
        if zero:
            # a padding row past the weights' last row: the zero vector at address 0 of the slice the
            # row would be in, which no other row of its LW cycle reads (consecutive rows are on
            # distinct stripes), so padding takes no other tensor's MEM queue cycles
            self.vt, self.addr = None, 0
        self.lead = ctx.cfg.mem_read_delay + abs(ctx.slice_pos[self.g] - xm)    # read issue -> at the plane
        self.x0 = ctx.xloc(din, ctx.slice_pos[self.g])
        self.bank = ctx.bank(self.addr)
        self.q = ctx.mem_q[self.g]


class _LoadRows:
    """The rows of one MXM weight load, and :meth:`plan`, which places them at a start cycle (padding
    rows past the weights' last row read address 0 of their slice). The rows' slices, addresses and
    readiness do not depend on the cycle tried, so they are found once per load. :attr:`rows` groups
    them ``ws`` to an LW cycle, as a load with every stream free takes them."""

    def __init__(self, ctx: Ctx, srcs, xm: int, din: int, ws: int):
        self.ctx, self.din, self.ws = ctx, din, ws
        self.flat = [_LoadRow(ctx, s[0], s[1], s[2], xm, din, zero=len(s) > 3) for s in srcs]
        self.rows = [self.flat[i:i + ws] for i in range(0, len(self.flat), ws)]
        # a row travelling away from the plane never fits
        self.never = any(ctx.dir_to(ctx.slice_pos[r.g], xm) != din for r in self.flat)
        self.x1 = ctx.xloc(din, xm)
        self.slack = len(self.rows)       # cycles a load may lose in all between its LWs
        self.end = 0

    def plan(self, W: int, lw_bases: Sequence[int], q_lws: Sequence[str], code: int,
             iw_from: int = 0) -> Optional[Plan]:
        """The load's plan with its first LW (``ws`` rows) at cycle W and each next one at the next cycle
        some of the following rows can be read and put on streams: as many of them (up to ``ws``, in
        order, on distinct slices) as fit on one run of free streams starting at a base of ``lw_bases``
        (a stream an activation took, or a busy slice, costs the rows it holds up rather than the
        cycle), losing at most ``slack`` cycles in all to waits and short cycles; then the IW (no
        sooner than ``iw_from``: the planes' last product with the weights they have comes first); or
        None. Every queue of ``q_lws`` (planes at one position) takes the same rows from the same
        streams: one read feeds them all. :attr:`end` is the IW's cycle."""
        if self.never or not self._readable(self.rows[0], W):
            return None
        S, din, flat, ws = self.ctx.S, self.din, self.flat, self.ws
        plan = Plan()
        T, pos, i = W, 0, 0
        while pos < len(flat):
            want = min(ws, len(flat) - pos)
            while True:
                # cycles lost so far (waited, or taking fewer rows than a cycle holds), at most slack
                if T - W - -(-pos // ws) > self.slack:
                    return None
                n, cand, got = self._most(flat, pos, want, lw_bases, T, S, din)
                if n == want or (n and i):
                    break
                if i == 0:
                    return None
                T += 1
            plan.issues += got[0]
            plan.reads += got[1]
            plan.spans += got[2]
            plan.issues += [(q, T, "LW", (cand, n, pos)) for q in q_lws]
            pos += n
            i += 1
            T += 1
        T = max(T, iw_from)
        plan.issues += [(q, T, "IW", (code,)) for q in q_lws]
        self.end = T
        return plan

    def _most(self, flat, pos: int, want: int, lw_bases: Sequence[int], T: int, S: int, din: int):
        """(n, base, (issues, reads, spans)): the most of rows pos..pos+want-1 (a prefix, on distinct
        slices, each readable at cycle T) that one run of free streams from a base of ``lw_bases``
        takes at the plane at cycle T; n is 0 if none."""
        rows = self._readable_prefix(flat[pos:pos + want], T)
        best: Tuple[int, int, tuple] = (0, 0, ())
        if not rows:
            return best
        for cand in lw_bases:
            room = S - (cand - din * S)
            if room <= best[0]:
                continue
            got = self._on(rows[:room], cand, T)
            if got[0] > best[0]:
                best = got[0], cand, got[1:]
                if best[0] == len(rows):
                    break
        return best

    def _readable_prefix(self, rows, T: int) -> list:
        """The longest prefix of ``rows`` on distinct slices whose every row can be read for an LW at
        cycle T (see :meth:`_readable`)."""
        seen = set()
        for j, r in enumerate(rows):
            if r.g in seen or not self._readable((r,), T):
                return rows[:j]
            seen.add(r.g)
        return rows

    def first_readable(self, W: int) -> Optional[int]:
        """The first cycle >= W at which :meth:`plan` gets past its first check (the first LW's rows
        readable), or None if it never does; :meth:`plan` changes nothing, so the cycles between are
        skipped (:func:`_find`)."""
        if self.never:
            return None
        rows = self.rows[0]
        lo = max([W] + [max(r.ready, 0) + r.lead for r in rows])
        for t in range(lo, lo + SEARCH):
            if self._readable(rows, t):
                return t
        return None

    def _readable(self, rows, T: int) -> bool:
        """Every row of an LW at cycle T can be read then: ready, its slice's queue free and no write
        landing in its bank in that cycle."""
        sched = self.ctx.sched
        busy, bank_wr = sched.busy, sched.bank_wr
        for r in rows:
            tr = T - r.lead
            if tr < r.ready or tr < 0:
                return False
            qb = busy.get(r.q)
            if qb is not None and tr < len(qb.bits) and qb.bits[tr]:
                return False
            if bank_wr.get((r.g, tr), 0) >> r.bank & 1:
                return False
        return True

    def _on(self, rows, base: int, T: int):
        """(n, issues, reads, spans): the reads putting the first n of ``rows`` on streams base.. at the
        plane at cycle T, n as many as fit (0: none)."""
        diag = self.ctx.sched.diag
        x1 = self.x1
        k = T - x1
        issues: List[Tuple[str, int, str, tuple]] = []
        reads: List[Tuple[int, int, int]] = []
        spans: List[Tuple[int, int, int, int]] = []
        for j, r in enumerate(rows):
            stream = base + j
            x0 = r.x0
            for a, b in diag.get((stream, k), ()):
                if not (b < x0 or a > x1):
                    return j, issues, reads, spans
            tr = T - r.lead
            issues.append((r.q, tr, "Read", (r.addr, stream)))
            reads.append((r.g, tr, r.bank))
            spans.append((stream, k, x0, x1))
        return len(rows), issues, reads, spans


def _find(ctx: Ctx, lo: int, build, what: str, skip: Optional[Callable[[int], Optional[int]]] = None) -> int:
    """Earliest cycle >= lo (looking at most SEARCH cycles ahead) at which build(t) gives a plan that
    fits; commits it. ``skip(t)``: the first cycle >= t at which build may give a plan, every try before
    it failing before it changes anything (None: never), used when :data:`FAST_SEARCH` is on."""
    t, end = lo, lo + SEARCH
    while t < end:
        if skip is not None and FAST_SEARCH:
            nxt = skip(t)
            if nxt is None or nxt >= end:
                break
            t = nxt
        plan = build(t)
        if plan is not None and ctx.sched.fits(plan):
            ctx.sched.commit(plan)
            return t
        t += 1
    raise CompileError(f"no room found to schedule {what}")


def _read_skip(ctx: Ctx, vt: VT, v: int, pos: int, lag: int) -> Callable[[int], Optional[int]]:
    """A :func:`_find` skip for plans whose first step is :meth:`Ctx.read_group` ``(vt, v, pos)`` at
    cycle t - lag: the cycles at which that read fails at committed work pass without a plan."""
    spec = ctx._spec(vt, v, pos, None, False)

    def skip(t: int) -> Optional[int]:
        got = ctx.read_free_from(spec, v, t - lag)
        return None if got is None else got + lag
    return skip


def _write_skip(ctx: Ctx, vt: VT, v: int, pos: int, lag: int) -> Callable[[int], Optional[int]]:
    """A :func:`_find` skip for plans whose first step is :meth:`Ctx.write_group` ``(vt, v, pos)`` at
    cycle t + lag (see :func:`_read_skip`)."""
    def skip(t: int) -> Optional[int]:
        got = ctx.write_free_from(vt, v, pos, t + lag)
        return None if got is None else got - lag
    return skip


SPARE = 1    # streams a plane leaves to activations while both planes of its hemisphere load


class _Geo:
    """What one product's scheduling needs of the chip and the operands (cycles, rows, streams)."""

    def __init__(self, ctx: Ctx, mm: MatMul, planes: Sequence[int]):
        cfg = ctx.cfg
        self.ctx, self.mm, self.cfg = ctx, mm, cfg
        self.fp16 = mm.A.dtype == dt.FLOAT16
        self.Kc = cfg.lanes // 2 if self.fp16 else cfg.lanes
        self.r = cfg.mxm_fp16_interval if self.fp16 else 1          # cycles between a plane's ABCs
        # K chunks of a tap (windowless convolution: each tap its own chunks) and in all
        self.cpt = -(-mm.taps.C // self.Kc) if mm.taps is not None else 0
        self.nK = mm.taps.rows.shape[1] * self.cpt if mm.taps is not None else -(-mm.K // self.Kc)
        self.nT = -(-mm.N // cfg.lanes)
        # rows loaded in one cycle must come from different slices: at most one per stripe; when two
        # planes of a hemisphere load in the same cycles, each keeps to its share of the direction's
        # streams less one, which activations use
        P = len(planes)
        half = ctx.S // cfg.mxm_planes_per_hemisphere
        # a GEMV's few activation rows (fewer than the cycles a spare stream would add to every load)
        # rather take a stream from a load now and then: one cycle each
        spare = SPARE if mm.M > -(-cfg.mxm_size // max(1, half - SPARE)) - -(-cfg.mxm_size // half) else 0
        share = half - spare if min(self.nT, P) > cfg.hemispheres else ctx.S // 2
        # a GEMV's products wait for the plane's next install (_next_install), on its own streams
        self.gemv = not spare and not self.fp16
        self.ws = max(1, min(cfg.mxm_lw_streams, share, mm.B.stripes * (2 if self.fp16 else 1)))
        self.Lw = -(-cfg.mxm_size // self.ws)                       # LW cycles of one weight load
        self.Mb = max(1, min(cfg.mxm_accumulators // 2, 256))       # rows of a block (accumulator half)
        self.half = cfg.mxm_accumulators // 2
        self.code = dt.get("float16" if self.fp16 else "int8").code
        self.size = cfg.mxm_size                                   # byte-rows of a weight buffer
        self.masked = mm.A_last is not None and not self.fp16 and mm.taps is None

    def wrow(self, kc: int, nt: int, j: int):
        """(tensor, vector, plane) holding weight-buffer byte-row j for chunk kc, tile nt; past the
        last row, (tensor, vector, plane, "zero"): the zero row at address 0 of that vector's slice."""
        mm = self.mm
        tap, kc = divmod(kc, self.cpt) if mm.taps is not None else (0, kc)
        if self.fp16:
            k, pl = kc * self.Kc + j // 2, j % 2
        else:
            k, pl = kc * self.Kc + j, 0
        if mm.taps is not None:
            # past the tap's channels: a zero row, in the slice of the row it would be (next tap's
            # or past the end), keeping an LW cycle's rows on distinct stripes
            past = k >= mm.taps.C
            k += tap * mm.taps.C
            if past:
                return mm.B, mm.b_row(k) * mm.B.chunks + nt, pl, "zero"
        if k >= mm.K:
            return mm.B, mm.b_row(k) * mm.B.chunks + nt, pl, "zero"
        return mm.B, mm.b_row(k) * mm.B.chunks + nt, pl

    def valid_rows(self, kc: int) -> int:
        """Weight-buffer byte-rows of chunk kc that hold weights (the rest load zeros)."""
        mm = self.mm
        if mm.taps is not None:
            n = min(self.Kc, mm.taps.C - (kc % self.cpt) * self.Kc)
        else:
            n = min(self.Kc, mm.K - kc * self.Kc)
        return 2 * n if self.fp16 else n

    def a_vec(self, m: int, kc: int) -> Optional[Tuple[VT, int, bool]]:
        """(tensor, its vector, shifted down by half the lanes) feeding output row m's products for chunk
        kc of K, or None when there are none (a windowless convolution's pad tap)."""
        mm = self.mm
        if self.masked and kc == self.nK - 1:
            assert mm.A_last is not None
            return mm.A_last, m, False
        if mm.taps is not None:
            tap, kc = divmod(kc, self.cpt)
            row = int(mm.taps.rows[m, tap])
            if row < 0:
                return None
        else:
            row = mm.a_row(m)
        return mm.A, row * mm.A.chunks + (kc // 2 if self.fp16 else kc), self.fp16 and kc % 2 == 1

    def first_chunk(self, m: int, k0: int) -> int:
        """The first chunk (from k0) with products for output row m: it replaces the accumulator."""
        if self.mm.taps is None:
            return k0
        taps = np.flatnonzero(self.mm.taps.rows[m] >= 0)
        return int(taps[0]) * self.cpt if len(taps) else self.nK


class _Run:
    """One plane's part of a product: its state, queues and positions, and rows [r0, r1) of tiles."""

    def __init__(self, ctx: Ctx, p: int, planes_state: Dict[int, _PlaneState], r0: int, r1: int,
                 blocks: Optional[List[Tuple[int, int]]] = None):
        cfg = ctx.cfg
        self.p, self.r0, self.r1 = p, r0, r1
        self.blocks = blocks          # its row blocks [b0, b1) when not r0.. in blocks of Mb rows
        self.st = planes_state.setdefault(p, _PlaneState())
        name = cfg.plane_name(p)
        self.hem = p // cfg.mxm_planes_per_hemisphere
        self.xm = cfg.mxm_position(self.hem)
        self.din = 1 if self.hem == 0 else 0                   # direction of values towards this plane
        self.dout = 1 - self.din
        self.q_lw, self.q_abc, self.q_acc = f"MXM.{name}.LW", f"MXM.{name}.ABC", f"MXM.{name}.ACC"
        self.sx = cfg.sxm_position(self.hem)
        self.sxq = [q.name for q in cfg.queues if q.unit == "SXM" and q.hemisphere == self.hem]
        # LW stream groups: the planes of a hemisphere start from their own part of the direction's
        # streams (ws < S / planes there leaves streams for activations), so they load in the same cycles
        k_in_hem = p % cfg.mxm_planes_per_hemisphere
        home = self.din * ctx.S + k_in_hem * (ctx.S // cfg.mxm_planes_per_hemisphere)
        self.lw_bases = [home] + [b for b in range(self.din * ctx.S, (self.din + 1) * ctx.S) if b != home]


def _arrivals(geo: _Geo) -> List[int]:
    """Per row of the product, the cycle its first chunk of activations is ready in MEM."""
    mm = geo.mm
    if mm.taps is not None:                  # every tap's row
        rows = mm.taps.rows
        return [max(int(mm.A.ready[r * mm.A.chunks]) for r in rows[m] if r >= 0) for m in range(mm.M)]
    return [int(mm.A.ready[mm.a_row(m) * mm.A.chunks]) for m in range(mm.M)]


def _share(geo: _Geo, planes: Sequence[int], planes_state, hems: List[int], per: int) -> int:
    """Planes sharing each column tile's rows, by an estimate of when the tiles end: 1 (a tile per plane),
    ``per`` (a tile per hemisphere, its planes loading the weights together) or, for a single tile, every
    plane of ``hems`` (each hemisphere's planes loading together). A plane is free from its last product
    or load; then per block of rows (an accumulator half) and chunk of K, the longer of a weight load and
    the block's products (the next load overlaps them: :func:`_tile_cycles`), and no sooner than its rows'
    products can follow their activations as they arrive (a producer faster than one plane's row a cycle
    is what sharing the rows pays for)."""
    arr = _arrivals(geo)

    def run(p_free: int, r0: int, r1: int, hems_loading: int = 1) -> int:
        t = p_free
        for m in range(r0, r1):                  # the first chunk's products, each after its row arrives
            t = max(t, arr[m]) + geo.r
        return max(p_free + _tile_cycles(geo, r1 - r0, hems_loading), t + (geo.nK - 1) * (r1 - r0) * geo.r)

    def plane_set(h: int) -> List[int]:
        return [p for p in planes if p // per == h][:per]
    M = geo.mm.M
    options = [(max(run(_free(planes_state, p), 0, M) for p in list(planes)[:geo.nT]), 1)]
    if len(hems) >= geo.nT:
        options.append((max(run(max(_free(planes_state, p) for p in plane_set(h)), M * j // per, M * (j + 1) // per)
                            for h in hems[:geo.nT] for j in range(per)), per))
    # every plane on one tile only past a pair's accumulator blocks (thousands of rows): below that the
    # rows' producers, not the planes, set the pace, and the hemispheres' loads taking turns cost more;
    # but a windowless convolution's products are its taps' (nine a row for 3x3): the planes' pace
    if geo.nT == 1 and len(hems) > 1 and (M > per * geo.Mb or geo.mm.taps is not None):
        every = [p for h in hems for p in plane_set(h)]
        k, free = len(every), max(_free(planes_state, p) for p in every)
        options.append((max(run(free, M * j // k, M * (j + 1) // k, len(hems)) for j in range(k)), k))
    return min(options)[1]


def _free(planes_state, p: int) -> int:
    """The first cycle plane p is free of products and weight loads (0 if unused yet)."""
    st = planes_state.get(p)
    return max(st.abc_next, st.lw_free) if st is not None else 0


def _units(ctx: Ctx, geo: _Geo, planes: Sequence[int], planes_state,
           tiles: Optional[Sequence[int]] = None) -> List[Tuple[int, List[_Run]]]:
    """The product's work as (column tile, runs): tiles go to the planes in turn, each plane all of a
    tile's rows; with fewer tiles than planes and rows enough (:func:`_share`), a tile goes to both planes
    of a hemisphere, which load its weights together (the same streams in the same cycles: one read
    feeds both) and take half of its rows each (attention's head sums: one tile), or a single tile to
    every plane, a quarter of its rows each (a long cache's head sums: thousands of rows)."""
    cfg, M = ctx.cfg, geo.mm.M
    per = cfg.mxm_planes_per_hemisphere
    if tiles is not None:
        return [(nt, [_Run(ctx, planes[j % len(planes)], planes_state, 0, M)]) for j, nt in enumerate(tiles)]
    if geo.nT <= cfg.hemispheres and M >= 2 and per > 1 and len(planes) >= geo.nT * per:
        hems: List[int] = []
        for p in planes:                     # hemispheres in the order their planes come free
            if p // per not in hems and sum(1 for q in planes if q // per == p // per) >= per:
                hems.append(p // per)
        # the pairs free first, the weights' own hemisphere on a tie (its rows need not cross the chip)
        hems.sort(key=lambda h: (max(_free(planes_state, p) for p in planes if p // per == h), h != geo.mm.B.hem))
        k = _share(geo, planes, planes_state, hems, per) if hems else 1
        if k > 1:
            sets = [[p for p in planes if p // per == h][:per] for h in hems]
            mine = [sets[nt] for nt in range(geo.nT)] if k == per else [[p for s in sets for p in s]]
            if geo.mm.taps is not None:
                # a convolution's rows arrive over its producer's whole run: the planes take the
                # accumulator blocks in turn, so all of them work as the rows come in
                return [(nt, [_Run(ctx, p, planes_state, 0, M, blocks=_dealt(M, min(geo.Mb, DEAL_ROWS), k, j))
                              for j, p in enumerate(ps)]) for nt, ps in enumerate(mine)]
            return [(nt, [_Run(ctx, p, planes_state, M * j // k, M * (j + 1) // k) for j, p in enumerate(ps)])
                    for nt, ps in enumerate(mine)]
    # tile by tile (tile nt on plane nt mod P): the planes take turns at the weights' slices and
    # streams, instead of the first plane taking every early slot and the last one the leftovers
    P = len(planes)
    units = [(nt, [_Run(ctx, planes[nt % P], planes_state, 0, M)]) for nt in range(geo.nT)]
    R = geo.nT % P
    if R and geo.nT > P and P % R == 0 and _rows_split_pays(geo, P // R, per):
        # the last round's R tiles, fewer than the planes: each tile's rows shared by P / R planes
        k = P // R
        units[geo.nT - R:] = [(nt, [_Run(ctx, planes[(i * k + j) % P], planes_state, M * j // k, M * (j + 1) // k)
                                    for j in range(k)]) for i, nt in enumerate(range(geo.nT - R, geo.nT))]
    return units


# rows of a block dealt to a plane (a windowless convolution): a hemisphere's planes load each chunk's
# weights together, so a step of blocks waits for its last block's rows, and a block's products must
# outlast a tap's weight load (its rows of weights only, two hemispheres taking turns: about 25 cycles
# for 64 channels). Measured on ResNet-50 at 224 x 224: 32 rows 152,068 cycles, 48 149,723, 64 147,783,
# 128 148,954, 256 (an accumulator half) 150,102.
DEAL_ROWS = 64


def _dealt(M: int, Mb: int, k: int, j: int) -> List[Tuple[int, int]]:
    """Row blocks [b0, b1) of Mb rows (of M) dealt to the j-th of k planes in turn: blocks j, j + k, ...
    cut so that every plane has rows (M / k rows a block at most when M < k Mb)."""
    Mb = min(Mb, -(-M // k))
    return [(b0, min(M, b0 + Mb)) for b0 in range(j * Mb, M, k * Mb)]


def _tile_cycles(geo: _Geo, rows: int, hems_loading: int = 1) -> int:
    """Estimated cycles of one plane's part of a tile (``rows`` rows): per block of rows (an accumulator
    half) and chunk of K, the longer of a weight load and the block's products. Hemispheres loading one
    tile read the same slices, so their loads take turns (``hems_loading``)."""
    blocks, block = -(-rows // geo.Mb), min(rows, geo.Mb)
    return blocks * geo.nK * max(hems_loading * (geo.Lw + 1), block * geo.r)


def _rows_split_pays(geo: _Geo, k: int, per: int) -> bool:
    """Whether a tile's rows shared by k planes end sooner than on one plane (the estimate of
    :func:`_share`, the planes taken as free together: a GEMM's last round, after whole rounds)."""
    M = geo.mm.M
    return k > 1 and _tile_cycles(geo, -(-M // k), -(-k // per)) < _tile_cycles(geo, M)


def _chunk_order(geo: _Geo, runs: Sequence[_Run], k0: int, k1: int) -> List[int]:
    """The order in which the runs' planes take chunks k0..k1-1 of K: in turn, but a last chunk with fewer
    rows than the buffer first when every plane's buffer is zero past them (the previous load was such a
    chunk): its load then skips the zero rows (:func:`_load`), and the next tile's last chunk, after this
    tile's full ones, loads them. Integer sums do not depend on the order; a convolution's taps keep
    theirs (the first chunk with products replaces the accumulator)."""
    order = list(range(k0, k1))
    last = k1 - 1
    if geo.mm.taps is not None or geo.fp16 or geo.masked or k1 != geo.nK or len(order) < 2:
        return order
    valid = geo.valid_rows(last)
    if valid < geo.size and all(r.st.zero_from is not None and r.st.zero_from <= valid for r in runs):
        return [last] + order[:-1]
    return order


def _load(ctx: Ctx, geo: _Geo, runs: Sequence[_Run], nt: int, kc: int, start: int) -> int:
    """Load chunk kc of tile nt into the weight buffers of the runs' planes (one hemisphere: the same
    reads feed them all) and install it (IW timed to take effect after each plane's last product with
    the weights it has); returns the cycle the new weights take effect."""
    cfg = ctx.cfg
    d_iw, ws = cfg.mxm_install_delay, geo.ws
    valid = geo.valid_rows(kc)
    # the buffer keeps its rows between loads (IW installs a copy), so past the rows the last load left
    # zero only the weights are loaded (a convolution's taps fill the same first rows of every chunk; a
    # product's last, partial chunk of K loaded right after another's)
    # (a masked last chunk: the rows past K meet zero activation lanes, whatever they hold)
    masked = geo.masked and kc == geo.nK - 1
    size = valid if masked else max(valid, max(cfg.mxm_size if r.st.zero_from is None else r.st.zero_from
                                               for r in runs))
    # rows from valid on after the load: zeros loaded, or zero before and not loaded (None: unknown)
    zero_after = [valid if not masked or (r.st.zero_from is not None and r.st.zero_from <= valid) else None
                  for r in runs]
    lead = runs[0]
    # the LWs as soon as the buffer is free; the IW once every plane's last product with the weights it
    # has is issued (d_iw before the new ones take effect)
    lo_w = max([start] + [r.st.lw_free for r in runs])
    iw_from = max(r.st.abc_last + 1 - d_iw for r in runs)
    lw = _LoadRows(ctx, [geo.wrow(kc, nt, j) for j in range(size)], lead.xm, lead.din, ws)
    # no row can be read before it is ready (or before cycle 0)
    for i, rows in enumerate(lw.rows):
        for row in rows:
            lo_w = max(lo_w, max(row.ready, 0) + row.lead - i)
    qs = [r.q_lw for r in runs]
    _find(ctx, lo_w, lambda W: lw.plan(W, lead.lw_bases, qs, geo.code, iw_from),
          f"an MXM weight load for {geo.mm.out.name}", skip=lw.first_readable)
    for rows in lw.rows:
        for row in rows:
            if row.vt is not None:
                row.vt.last_read[row.v] = max(row.vt.last_read[row.v], lw.end)
    for r, z in zip(runs, zero_after):
        r.st.lw_free = lw.end + 1
        r.st.zero_from = z
    return lw.end + d_iw


def _next_install(ctx: Ctx, geo: _Geo, E_: int, rows: Optional[int]) -> int:
    """The earliest cycle the IW of the plane's next load (of ``rows`` rows at least; None: no next load
    in this product) can issue, its LWs following this load's IW (in effect at E_) without a break;
    0 when a product's rows rather go first.

    A GEMV's few activation rows take no spare stream (:class:`_Geo`): issued as soon as their weights
    are in effect, each takes a stream from the plane's next load, which then needs one more LW cycle
    (320 rows are 20 full cycles of 16). At the next load's IW the plane's streams are free, and an ABC
    then still uses the weights in effect (the new ones take effect ``mxm_install_delay`` later); only
    the product's last loads' products end it, and they are not delayed."""
    if rows is None or not geo.gemv:
        return 0
    return E_ - ctx.cfg.mxm_install_delay + 1 + -(-rows // geo.ws)


def _activations(ctx: Ctx, geo: _Geo, run: _Run, kc: int, rows: Sequence[Tuple[int, bool]], b0: int,
                 bank: int, E_: int, fresh: bool, after: int = 0) -> None:
    """One ABC per row (m, first) of ``rows`` (rows of the block starting at b0) for chunk kc on run's
    plane, from cycle E_ (the weights in effect); a row's ``first`` chunk replaces its accumulator, the
    others add to it; a float16 odd chunk is the upper half of a vector, shifted down by the SXM on its
    way. ``fresh``: these are the block's first products, which wait for its accumulator half. ``after``:
    the first row's product not before that cycle (:func:`_next_install`)."""
    cfg, mm, st = ctx.cfg, geo.mm, run.st
    L, xm, din = cfg.lanes, run.xm, run.din
    # at the next install the plane's own streams are free, and the next load's LW cycles (placed
    # after) may then use the others: the last of its home group first (an LW takes a run of streams)
    prefer = range(run.lw_bases[0] + geo.ws - 1, run.lw_bases[0] - 1, -1) if geo.gemv else ()
    for j, (m, first) in enumerate(rows):
        i = m - b0
        got = geo.a_vec(m, kc)
        assert got is not None
        A, av, shift = got
        lo_t = max(E_, st.abc_next, after)
        if j == 0 and fresh:
            lo_t = max(lo_t, st.half_free[bank] - cfg.mxm_delay)
        # a try whose read of the row would issue before the row is ready fails first thing, leaving
        # no trace: start after them (compile time; the same cycle is found)
        lag = cfg.sxm_delay + abs(run.sx - xm) if shift else 0
        lo_t = max(lo_t, ctx.ready_at(A, av, run.sx if shift else xm) + lag)

        def build_a(T, A=A, av=av, shift=shift, i=i, first=first):
            plan, used = Plan(), {}
            if not shift:
                src = ctx.read_group(plan, A, av, xm, T, used, prefer)
                if src is None:
                    return None
            else:
                ts = T - cfg.sxm_delay - abs(run.sx - xm)
                b = ctx.read_group(plan, A, av, run.sx, ts, used)
                if b is None:
                    return None
                kb = ts + cfg.sxm_delay - ctx.xloc(din, run.sx)
                span = (ctx.xloc(din, run.sx), ctx.xloc(din, xm))
                src = ctx.free_group(din, 2, kb, [span] * 2, used)
                if src is None:
                    return None
                for q in range(2):
                    plan.issues.append((run.sxq[q % len(run.sxq)], ts, "Shift", (src + q, b + q, -(L // 2))))
                    plan.sxm.append((ts, run.hem, "shifters"))
                    plan.spans.append((src + q, kb) + span)
            plan.issues.append((run.q_abc, T, "ABC", (geo.code, src, bank * geo.half + i, 0 if first else 1)))
            return plan
        T = _find(ctx, lo_t, build_a, f"an MXM activation for {mm.out.name}",
                  skip=_read_skip(ctx, A, av, run.sx if shift else xm, lag))
        A.last_read[av] = max(A.last_read[av], T)
        st.abc_next = T + geo.r
        st.abc_last = T


def _results(ctx: Ctx, geo: _Geo, run: _Run, nt: int, b0: int, b1: int, bank: int) -> int:
    """ACC each row b0..b1-1 of tile nt from run's plane once its last product has landed: int32 /
    float32 results straight to MEM, float16 ones through a VXM cvt. Returns the last landing."""
    cfg, out, st = ctx.cfg, geo.mm.out, run.st
    xm, dout = run.xm, run.dout
    ready = st.abc_last + cfg.mxm_delay
    last = 0
    for i in range(b1 - b0):
        ov = geo.mm.o_row(b0 + i) * out.chunks + nt
        acc = bank * geo.half + i

        def build_c(C, ov=ov, acc=acc, i=i):
            plan, used = Plan(), {}
            T = C + cfg.mxm_acc_delay
            if out.planes == 4:
                wr = ctx.write_group(plan, out, ov, xm, T, used)
                if wr is None:
                    return None
                plan.issues.append((run.q_acc, C, "ACC", (acc, wr[0])))
                plan.landing = wr[1]
                return plan
            kk = T - ctx.xloc(dout, xm)
            span = (ctx.xloc(dout, xm), ctx.xloc(dout, ctx.vx))
            dst = ctx.free_group(dout, 4, kk, [span] * 4)
            if dst is None:
                return None
            plan.spans += [(dst + q, kk) + span for q in range(4)]
            for q in range(4):
                used[(dst + q, kk)] = 1
            V = T + abs(ctx.vx - xm)
            alu = (run.p * 2 + i) % cfg.vxm_alus_per_lane
            wr = ctx.write_group(plan, out, ov, ctx.vx, V + cfg.vxm_convert_delay, used)
            if wr is None:
                return None
            plan.issues.append((run.q_acc, C, "ACC", (acc, dst)))
            plan.issues.append((f"VXM.{alu}", V, "cvt", (dt.FLOAT32.code, out.dtype.code, wr[0], dst)))
            plan.lands.append((alu, V + cfg.vxm_convert_delay))
            plan.landing = wr[1]
            return plan

        holder: Dict[str, Plan] = {}

        def build_kept(C, holder=holder, build_c=build_c):
            holder["plan"] = build_c(C)
            return holder["plan"]
        # an int32 / float32 result's plan starts with its write (a float16 one's with streams to the VXM)
        skip = _write_skip(ctx, out, ov, xm, cfg.mxm_acc_delay) if out.planes == 4 else None
        C = _find(ctx, max(ready, st.acc_next), build_kept, f"an MXM result for {out.name}", skip=skip)
        out.ready[ov] = max(out.ready[ov], holder["plan"].landing)
        last = max(last, holder["plan"].landing)
        st.acc_next = C + 1
        st.half_free[bank] = C + 1
    return last


def matmul_kernel(ctx: Ctx, mm: MatMul, planes_state: Dict[int, _PlaneState],
                  planes: Sequence[int], start: int = 0, tiles: Optional[Sequence[int]] = None,
                  chunks: Optional[Tuple[int, int]] = None) -> int:
    """Schedule one product on the given MXM planes (see :func:`_units`): per row block (an
    accumulator half), per chunk of K, a weight load then the rows' products; then the results.
    ``tiles`` (column tiles, default all, taking the planes in turn) and ``chunks`` (chunks k0..k1-1 of K,
    default all) restrict it to a part: a partial product over some of K (``lower_more._split_matmul``)."""
    geo = _Geo(ctx, mm, planes)
    k0, k1 = chunks if chunks is not None else (0, geo.nK)
    last = 0
    units = _units(ctx, geo, planes, planes_state, tiles)
    # each plane's last unit (in an earlier one, its next load takes at least a partial chunk's rows)
    last_unit = {r.p: u for u, (_, runs) in enumerate(units) for r in runs}
    least = min(geo.valid_rows(k0), geo.valid_rows(k1 - 1))
    for u, (nt, runs) in enumerate(units):
        dealt = {r.p: r.blocks if r.blocks is not None else
                 [(b0, min(r.r1, b0 + geo.Mb)) for b0 in range(r.r0, r.r1, geo.Mb)] for r in runs}
        for step in range(max(len(d) for d in dealt.values())):
            blocks = [(r, *dealt[r.p][step]) for r in runs if step < len(dealt[r.p])]
            banks = []
            for r, _, _ in blocks:
                banks.append(r.st.blocks % 2)
                r.st.blocks += 1
            # a hemisphere's planes load together (one read feeds them); each hemisphere loads apart
            by_hem: Dict[int, list] = {}
            for item in zip(blocks, banks):
                by_hem.setdefault(item[0][0].hem, []).append(item)
            order = _chunk_order(geo, [r for r, _, _ in blocks], k0, k1)
            firsts = {m: geo.first_chunk(m, order[0]) for r, b0, b1 in blocks for m in range(b0, b1)}
            fresh = {r.p: True for r, _, _ in blocks}
            for i, kc in enumerate(order):
                for group in by_hem.values():
                    rows = {r.p: [(m, firsts[m] == kc) for m in range(b0, b1) if geo.a_vec(m, kc) is not None]
                            for (r, b0, b1), _ in group}
                    if not any(rows.values()):        # every row's tap a pad: no products, no load
                        continue
                    E_ = _load(ctx, geo, [r for (r, _, _), _ in group], nt, kc, start)
                    for (r, b0, _), bank in group:
                        if rows[r.p]:
                            more = step + 1 < len(dealt[r.p]) or last_unit[r.p] > u
                            nxt = geo.valid_rows(order[i + 1]) if i + 1 < len(order) else least if more else None
                            _activations(ctx, geo, r, kc, rows[r.p], b0, bank, E_, fresh[r.p],
                                         _next_install(ctx, geo, E_, nxt))
                            fresh[r.p] = False
            for (r, b0, b1), bank in zip(blocks, banks):
                last = max(last, _results(ctx, geo, r, nt, b0, b1, bank))
    return last
