"""All-gather and all-reduce between the chips of a group, scheduled at compile time.

A tensor-parallel group is P chips wired pairwise (a GroqNode): each runs its own
program, compiled from its own graph (:mod:`lpucore.compiler.shard` makes them), and
the graphs meet at ``allgather`` / ``allreduce`` nodes.  :func:`compile_group` runs
the P compilers side by side (:meth:`Compiler.steps`) and lowers each collective node
on all of them at once, because a vector one chip sends must be received by another
at a cycle that chip's program names: nothing waits at run time.

Schedule of one collective (all cycles absolute; ``iv = c2c_send_interval``,
``lat = c2c_latency``):

* The links are deskewed once, at each chip's first collective (a ``Deskew`` per link
  on any free SXM queue).
* Sends, agreed by every chip: the source tensor's byte planes go one after another
  (item m = vector v, plane p).  Item m leaves every chip in the same cycle s_m: one
  MEM ``Read`` brings the plane to the SXM position of its hemisphere, where P - 1
  ``Send`` instructions (one per peer, on P - 1 SXM queues) put it on the P - 1 links.
  s_m is the first cycle >= s_{m-1} + iv (a link takes one vector per iv cycles) at
  which the read and the sends fit on *every* chip.
* Receives, chosen by each chip alone: the copy of item m that chip ``i - 1 - o`` sent
  on slot o arrives at s_m + lat; chip i receives it at the first cycle from then on
  (and after its previous receive on that link: a link's inbox is first in, first out)
  at which the ``Receive`` and the MEM ``Write`` into block ``i - 1 - o`` fit.
* All-gather: the result is [P, *x.shape], block r = chip r's x (its own block is a
  VXM copy).  All-reduce: the blocks are added in chip order 0, 1, ..., P - 1 on the
  VXM, so every chip computes the same bits.

Slot o of chip i sends to chip ``(i + 1 + o) mod P`` and receives from chip
``(i - 1 - o) mod P``, so every link carries one vector per item in each direction.
The predicted cycle count of every chip's program is exact, as for one chip.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..config import ChipConfig
from ..errors import CompileError
from . import kernels
from .kernels import SEARCH, E, Expr, Used, map_kernel
from .memory import release
from .schedule import Plan, paced_gc


def _plus(o: int) -> Callable[[int], int]:
    """u -> o + u."""
    return lambda u: o + u


def group_links(P: int, wires: Sequence[Tuple[int, int, int, int]], chips: Sequence[int]) -> List[Tuple[list, list]]:
    """For each rank of the group (chips[rank] in the system): (send link of slot o,
    receive link of slot o) for o in 0..P-2.  Every pair of the group needs a direct link."""
    link: Dict[Tuple[int, int], int] = {}
    for a, la, b, lb in wires:
        link.setdefault((a, b), la)
        link.setdefault((b, a), lb)
    out = []
    for i in range(P):
        send, recv = [], []
        for o in range(P - 1):
            to, frm = chips[(i + 1 + o) % P], chips[(i - 1 - o) % P]
            for peer in (to, frm):
                if (chips[i], peer) not in link:
                    raise CompileError(f"chips {chips[i]} and {peer} have no direct link: a tensor-parallel "
                                       "group needs its chips wired pairwise (a GroqNode is)")
            send.append(link[(chips[i], to)])
            recv.append(link[(chips[i], frm)])
        out.append((send, recv))
    return out


def _sxm_queue(c, h: int, cycle: int, plan: Plan) -> Optional[str]:
    """A free SXM queue of hemisphere h in the cycle (not yet taken by the plan)."""
    taken = {q for q, cc, _, _ in plan.issues if cc == cycle}
    for k in range(c.cfg.sxm_queues_per_hemisphere):
        q = f"SXM.{'WE'[h]}{k}"
        if q not in taken and c.sched.queue_free(q, cycle):
            return q
    return None


def _deskew(c) -> int:
    """Reserve one Deskew per link the chip uses; returns the first cycle they are usable."""
    cfg = c.cfg
    links = sorted(set(c.send_links) | set(c.recv_links))
    last = 0
    for link in links:
        for cyc in range(SEARCH):
            plan = Plan()
            q = _sxm_queue(c, 0, cyc, plan) or _sxm_queue(c, 1, cyc, plan)
            if q is not None:
                plan.issues.append((q, cyc, "Deskew", (link,)))
                c.sched.commit(plan)
                last = max(last, cyc)
                break
        else:
            raise CompileError("no free SXM queue for a Deskew")
    return last + cfg.c2c_deskew_delay


def _read_plane(c, plan: Plan, vt, v: int, p: int, pos: int, T: int, used: Used) -> Optional[int]:
    """Plan a MEM read of plane p of vector v so that it passes position pos in cycle T
    on one stream; returns the stream or None."""
    ctx, cfg = c.ctx, c.cfg
    g, a = vt.loc(v, p)
    sp = ctx.slice_pos[g]
    d = ctx.dir_to(sp, pos)
    t = T - cfg.mem_read_delay - abs(pos - sp)
    if t < int(vt.ready[v]) or t < 0 or not ctx._queues_free([(g, a)], [t], used):
        return None
    k = T - ctx.xloc(d, pos)
    x0, x1 = ctx.xloc(d, sp), ctx.xloc(d, pos)
    b = ctx.free_group(d, 1, k, [(x0, x1)], used)
    if b is not None:
        plan.issues.append((ctx.mem_q[g], t, "Read", (a, b)))
        plan.reads.append((g, t, ctx.bank(a)))
        plan.spans.append((b, k, x0, x1))
        used[(b, k)] = 1
        used[("q", g, t)] = 1
    return b


def _send_plan(c, src, v: int, p: int, s: int) -> Optional[Plan]:
    cfg = c.cfg
    g, _ = src.loc(v, p)
    h = g // cfg.mem_slices_per_hemisphere
    plan = Plan()
    b = _read_plane(c, plan, src, v, p, cfg.sxm_position(h), s, {})
    if b is None:
        return None
    for link in c.send_links:
        q = _sxm_queue(c, h, s, plan)
        if q is None:
            return None
        plan.issues.append((q, s, "Send", (link, b)))
    return plan if c.sched.fits(plan) else None


def _receive(c, stack, u: int, p: int, link: int, r: int) -> Tuple[int, int]:
    """Receive plane p of stack vector u from the link at the first cycle >= r that fits;
    returns (receive cycle, landing cycle)."""
    cfg = c.cfg
    g, _ = stack.loc(u, p)
    h = g // cfg.mem_slices_per_hemisphere
    pos = cfg.sxm_position(h)
    end = r + SEARCH
    while r < end:
        if kernels.FAST_SEARCH:     # the cycles at which the write fails at committed work: no plan (kernels._find)
            got = c.ctx.write_free_from(stack, u, pos, r + cfg.c2c_receive_delay, [p])
            if got is None:
                break
            r = max(r, got - cfg.c2c_receive_delay)
        plan = Plan()
        wr = c.ctx.write_group(plan, stack, u, pos, r + cfg.c2c_receive_delay, {}, planes=[p])
        if wr is not None:
            q = _sxm_queue(c, h, r, plan)
            if q is not None:
                plan.issues.append((q, r, "Receive", (link, wr[0])))
                if c.sched.fits(plan):
                    c.sched.commit(plan)
                    return r, wr[1]
        r += 1
    raise CompileError(f"no room found to receive into {stack.name}")


def lower_collective(comps, reqs) -> List[int]:
    """Lower one allgather / allreduce node on every compiler of the group; returns each
    chip's last landing cycle."""
    P = len(comps)
    cfg: ChipConfig = comps[0].cfg
    op = reqs[0][0].op
    if P - 1 > cfg.sxm_queues_per_hemisphere:
        raise CompileError(f"{op}: a group of {P} chips sends on {P - 1} links at once, but a hemisphere "
                           f"has {cfg.sxm_queues_per_hemisphere} SXM queues")
    srcs, stacks = _collective_operands(comps, reqs)
    last = _exchange(comps, srcs, stacks, op)
    for i, (c, (_n, t, name, kind), src, stack) in enumerate(zip(comps, reqs, srcs, stacks)):
        last[i] = max(last[i], _combine(c, i, P, op, t, name, kind, src, stack))
    return last


def _collective_operands(comps, reqs):
    """Each chip's operand (plain in MEM) and the stack of P blocks it receives into (the
    allgather's result itself, or an all-reduce's scratch)."""
    P = len(comps)
    op = reqs[0][0].op
    srcs, stacks = [], []
    for c, (n, t, name, kind) in zip(comps, reqs):
        if n.attrs["group"] != P:
            raise CompileError(f"{op}: the node is for a group of {n.attrs['group']} chips, the group has {P}")
        x = c.g.tensors[n.inputs[0]]
        src = c.plain(x)
        shape = (P,) + (tuple(x.shape) or (1,))
        if op == "allgather":
            stack = c.new_vt(name, x.dtype, shape, kind=kind)
            c.vts[t.id] = stack
        else:
            stack = c.new_vt(f"_ar{t.id}", x.dtype, shape)
        srcs.append(src)
        stacks.append(stack)
        if c.link_ready is None:
            c.link_ready = _deskew(c)
    return srcs, stacks


def _exchange(comps, srcs, stacks, op: str) -> List[int]:
    """Every chip sends each byte plane of each vector to its P - 1 peers in the same cycle
    (one send per c2c_send_interval) and receives theirs into its stack; returns each chip's
    last landing cycle."""
    P = len(comps)
    cfg: ChipConfig = comps[0].cfg
    nvec, w = srcs[0].nvec, srcs[0].planes
    s = max(max(c.link_ready, c.link_free) for c in comps)
    last = [0] * P
    for v in range(nvec):
        for p in range(w):
            for c, src in zip(comps, srcs):
                g, _ = src.loc(v, p)
                hops = abs(cfg.sxm_position(g // cfg.mem_slices_per_hemisphere) - c.ctx.slice_pos[g])
                s = max(s, int(src.ready[v]) + cfg.mem_read_delay + hops)
            s, plans = _send_cycle(comps, srcs, v, p, s, op)
            for c, src, pl in zip(comps, srcs, plans):
                c.sched.commit(pl)
                src.last_read[v] = max(int(src.last_read[v]), s)
            for i, (c, stack) in enumerate(zip(comps, stacks)):
                for o in range(P - 1):
                    u = ((i - 1 - o) % P) * nvec + v          # the block of peer (i - 1 - o) mod P
                    r, land = _receive(c, stack, u, p, c.recv_links[o],
                                       max(s + cfg.c2c_latency, c.recv_after[o] + 1))
                    c.recv_after[o] = r
                    stack.ready[u] = max(int(stack.ready[u]), land)
                    last[i] = max(last[i], land)
            s += cfg.c2c_send_interval
    for c in comps:
        c.link_free = s
    return last


def _send_cycle(comps, srcs, v: int, p: int, s: int, op: str):
    """The first cycle from s in which every chip can send plane p of vector v, with the plans."""
    for _ in range(SEARCH):
        plans = []
        for c, src in zip(comps, srcs):
            pl = _send_plan(c, src, v, p, s)
            if pl is None:
                break
            plans.append(pl)
        if len(plans) == len(comps):
            return s, plans
        s += 1
    raise CompileError(f"{op}: no cycle found in which every chip of the group can send")


def _combine(c, i: int, P: int, op: str, t, name: str, kind: str, src, stack) -> int:
    """Chip i's result: for an allgather its own block copied into the stack; for an allreduce
    the sum of its operand and the P - 1 received blocks (the stack is then freed)."""
    nvec, d = src.nvec, src.dtype
    if op == "allgather":
        return map_kernel(c.ctx, E("mov", d, Expr.input(src, _plus(-i * nvec))), stack,
                          vectors=range(i * nvec, (i + 1) * nvec))

    def build():
        terms = [Expr.input(src, lambda u: u) if r == i else Expr.input(stack, _plus(r * nvec)) for r in range(P)]
        acc = terms[0]
        for term in terms[1:]:
            acc = E("add", d, acc, term)
        return acc
    landed = c.map_op(t, name, kind, build)
    release(c.mem, stack)
    return landed


def compile_group(graphs, cfg: ChipConfig, links: List[Tuple[list, list]]):
    """Compile one graph per chip of a group together; returns their
    :class:`~lpucore.compiler.lower.Compiled` programs, rank by rank."""
    with paced_gc():
        return _compile_group(graphs, cfg, links)


def _compile_group(graphs, cfg: ChipConfig, links: List[Tuple[list, list]]):
    from .lower import Compiler
    P = len(graphs)
    comps = []
    for i, g in enumerate(graphs):
        c = Compiler(g, cfg)
        c.rank, c.group = i, P
        c.send_links, c.recv_links = links[i]
        c.link_ready, c.link_free, c.recv_after = None, 0, [-1] * (P - 1)
        comps.append(c)
    gens = [c.steps() for c in comps]
    reqs = [next(gen, None) for gen in gens]
    while any(r is not None for r in reqs):
        got = [r for r in reqs if r is not None]
        if len(got) != len(reqs) or len({(r[0].op, r[1].shape) for r in got}) != 1:
            raise CompileError("internal: the graphs of a group reach different collective operations")
        lasts = lower_collective(comps, got)
        reqs = []
        for gen, last in zip(gens, lasts):
            try:
                reqs.append(gen.send(last))
            except StopIteration:
                reqs.append(None)
    return [c.result for c in comps]
