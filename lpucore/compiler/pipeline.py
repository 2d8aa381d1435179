"""Pipeline stages on two chips: a compiled graph's output handed over a C2C link to the
input of another compiled graph on the next chip.

:func:`hand_over` takes two :class:`~lpucore.Compiled` programs (one per chip) and returns
them extended with the transfer: after the first program's last cycle, every vector of its
output tensor is read, sent over the link (one vector per ``c2c_send_interval`` cycles) and,
on the second chip, received and written where the second program expects its input; the
second program then starts, shifted by whole cycles (a NOP at the head of every queue), so
its own schedule, and therefore its results and its cycle count, are unchanged.  Both
tensors must have the same dtype and shape; their vectors map one to one (a tensor's vector
order depends only on its shape and dtype).  The returned cycle is when the second chip
finishes: the first program's cycles + the transfer + the second program's cycles. With ``early``
the transfer starts as soon as the output is written: each vector is read and sent in idle cycles of
the first program's queues (never in a cycle a write lands in its slice), on a stream register whose
trajectory (the line a value follows, one position a cycle) no other value of the first program
touches, so the first chip's later work overlaps the second chip's.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Dict, List, Optional, Sequence, Set, Tuple

from .. import isa
from ..errors import CompileError
from ..program import Program


def queue_end(lst) -> int:
    """The cycle in which a queue's next instruction would issue, for a list without Sync."""
    t = 0
    for ins in lst:
        m = ins.op.mnemonic
        if m == "NOP":
            t += ins.args[0]
        elif m == "Repeat":
            t += ins.args[0] * ins.args[1]
        elif m in ("Sync", "Notify"):
            raise CompileError("hand_over: programs with Sync/Notify cannot be extended by cycle count")
        else:
            t += 1
    return t


def _written(program: Program, places: Sequence[Tuple[str, int]]) -> Dict[Tuple[str, int], int]:
    """For each (MEM queue, address) of ``places``, the first cycle a Read there sees the last value a Write
    of ``program`` puts there (the cycle after it lands); places no Write names are left out."""
    cfg = program.config
    want: Dict[str, Set[int]] = {}
    for q, a in places:
        want.setdefault(q, set()).add(a)
    out: Dict[Tuple[str, int], int] = {}
    for q, addrs in want.items():
        t, prev = 0, None
        for ins in program.queues.get(q, []):
            m = ins.op.mnemonic
            if m == "NOP":
                t += ins.args[0]
                continue
            if m == "Repeat":
                n, d, stride = ins.args[0], ins.args[1], ins.args[2]
                if prev is not None and prev.op.mnemonic == "Write":
                    for j in range(n):
                        a = prev.args[0] + stride * (j + 1)
                        if a in addrs:
                            out[(q, a)] = t - 1 + d * (j + 1) + prev.op.delay(cfg) + 1
                t += n * d
                continue
            if m == "Write" and ins.args[0] in addrs:
                out[(q, ins.args[0])] = t + ins.op.delay(cfg) + 1
            prev = ins
            t += 1
    return out


def _early(first, out_name: str, vectors, links: Sequence[int], start: int, last_late: int,
           places: Sequence[int]) -> Optional[Tuple[List[int], List[List[int]], List[List[int]], int]]:
    """(each link's Deskew cycle, per link each vector's Send cycle, per link each vector's stream) of a
    hand-over from when ``out_name`` is written (:func:`hand_over`, ``early``; ``vectors``: each vector's
    (hemisphere, MEM queue, hops to the SXM); every vector goes over each of ``links``): vector by vector
    and link by link, the first Send cycle, at least ``c2c_send_interval`` after that link's previous one,
    at which its Read and its Send fall in idle cycles of chip A's queues, on a stream register no value
    of chip A (nor an earlier vector of this hand-over) uses on the vector's trajectory
    (:func:`_trajectories`); each vector once its last Write has landed (``places``: each vector's address,
    for :func:`_written`), so the vectors written first go first. The fourth item is the cycle the whole
    output is written. None when ``first`` has no record of that write, or the last Send would not come
    before ``last_late`` (the hand-over after the program)."""
    landed = [last for _, name, last in first.kernels if name == out_name and last is not None]
    if not landed:
        return None
    cfg = first.config
    done = start + max(landed) + 1
    if done >= last_late:
        return None
    seen = _written(first.program, [(q, a) for (_, q, _), a in zip(vectors, places)])
    ready = [min(done, seen.get((q, a), done)) for (_, q, _), a in zip(vectors, places)]
    uses = _trajectories(first.program, min(ready) - cfg.positions)
    busy: Dict[str, Set[int]] = {}
    best = None
    # each vector once it is written, or all once the whole output is (in their order): the vectors read
    # early meet the program's own traffic, which may delay the last one; keep whichever ends first
    for when in ([done] * len(vectors), ready) if min(ready) < done else ([done] * len(vectors),):
        found = _place(first, vectors, links, when, last_late, {r: list(u) for r, u in uses.items()}, busy)
        if found is not None and (best is None or max(map(max, found[1])) < max(map(max, best[1]))):
            best = found
    return None if best is None else best + (done,)


def _place(first, vectors, links, ready, last_late, uses, busy
           ) -> Optional[Tuple[List[int], List[List[int]], List[List[int]]]]:
    """:func:`_early`'s Deskews, Send cycles and streams with vector ``v`` read no sooner than ``ready[v]``
    (``uses``: :func:`_trajectories`, extended here; ``busy``: each queue's :func:`_busy`, filled here)."""
    cfg = first.config
    queues = first.program.queues
    taken: Dict[str, Set[int]] = {}

    def free(q: str, c: int) -> bool:
        if q not in taken:
            if q not in busy:
                busy[q] = _busy(queues.get(q, []), cfg)
            taken[q] = set(busy[q])
        return c not in taken[q]
    deskews: List[int] = []
    T = min(ready)
    for _ in links:
        while not free("SXM.W0", T):
            T += 1
        deskews.append(T)
        taken["SXM.W0"].add(T)
    to_sxm = cfg.mem_read_delay + max(hops for _, _, hops in vectors)
    nxt = [d + cfg.c2c_deskew_delay + to_sxm for d in deskews]
    times: List[List[int]] = [[0] * len(vectors) for _ in links]
    streams: List[List[int]] = [[0] * len(vectors) for _ in links]
    S = cfg.streams_per_direction
    for v in sorted(range(len(vectors)), key=lambda v: ready[v]):
        h, q, hops = vectors[v]
        send_q = f"SXM.{'WE'[h]}1"
        for j in range(len(links)):
            s = max(nxt[j], ready[v] + cfg.mem_read_delay + hops)
            while True:
                if s >= last_late:
                    return None
                c = s - cfg.mem_read_delay - hops
                i = _clear_stream(cfg, uses, h, s, hops) if free(q, c) and free(send_q, s) else None
                if i is not None:
                    break
                s += 1
            taken[q].add(c)
            taken[send_q].add(s)
            # this vector's own trajectory, for the next ones: touched where it is read, sent and leaves
            r = S + i if h == 0 else i
            traj = cfg.sxm_position(h) + s if r >= S else cfg.sxm_position(h) - s
            for cyc in (c, s, s + cfg.positions):
                bisect.insort(uses.setdefault(r, []), (traj, cyc))
            times[j][v] = s
            streams[j][v] = i
            nxt[j] = s + cfg.c2c_send_interval
    return deskews, times, streams


#: cycles either side of a value's trajectory kept clear of other values on its stream register
CLEAR = 8


def _trajectories(program: Program, t_min: int) -> Dict[int, List[Tuple[int, int]]]:
    """Per stream register (encoded; a named stream counts with the registers of its group, :func:`_widths`),
    the sorted (trajectory, cycle) of every instruction touching it from cycle ``t_min`` on (a result when it
    lands, an operand when it is read): a value moves one position per cycle, so east-flowing values keep
    ``position - cycle`` and west-flowing ``position + cycle`` along their way (a Repeat counts at each
    repetition)."""
    cfg = program.config
    S = cfg.streams_per_direction
    out: Dict[int, List[Tuple[int, int]]] = {}
    for name, lst in program.queues.items():
        pos = cfg.queue(name).position
        for _, times, named in _issues(lst, t_min):
            if named is None or times[-1] < t_min:
                continue
            widths, lag = _widths(named), named.op.delay(cfg)
            for f, v in zip(named.op.fields, named.args):
                if f.kind not in ("stream", "src", "dst") or not 0 <= v < cfg.streams:
                    continue
                # a result lands on its stream the op's delay after the issue; an operand is read at the issue
                result = f.kind == "dst" or f.name == "dst"
                late = lag if result else 0
                # a Gather's or Scatter's addresses are an int16 group: two registers
                width = 2 if f.name == "map" else widths[0 if result else 1]
                for r in range(v, min(v + width, (v // S + 1) * S)):
                    lst_r = out.setdefault(r, [])
                    for c in times:
                        lst_r.append((pos - c - late if r < S else pos + c + late, c + late))
    for traj in out.values():
        traj.sort()
    return out


_NBYTES = (1, 2, 4, 2, 4)          # dtype codes int8, int16, int32, float16, float32 (lpucore.isa)


def _widths(ins) -> Tuple[int, int]:
    """(destination, source) stream registers an instruction's named stream stands for: one for MEM and
    C2C (a byte plane), ``n`` for an LW, its dtype's bytes (a cvt's destination: its target's), else four
    (the widest group)."""
    op = ins.op
    if op.unit in ("MEM", "C2C"):
        return 1, 1
    names = [f.name for f in op.fields]
    if op.mnemonic == "LW":
        return 1, ins.args[names.index("n")]
    if "dtype" in names:
        src = _NBYTES[ins.args[names.index("dtype")]]
        dst = _NBYTES[ins.args[names.index("to")]] if "to" in names else src
        return dst, src
    return 4, 4


def _clear_stream(cfg, uses: Dict[int, List[Tuple[int, int]]], h: int, s: int, hops: int) -> Optional[int]:
    """The first stream register (index i of W<i> from the west hemisphere, E<i> from the east) on which a
    vector read ``hops`` positions before hemisphere h's SXM and sent there at cycle s travels on a
    trajectory no other value of the program touches (within :data:`CLEAR` cycles) from where it is read
    to the chip's edge; None if there is none. (A value touched before, upstream, is only overwritten,
    which matters to its readers downstream, and those are touches of the trajectory after the read.)"""
    S = cfg.streams_per_direction
    pos = cfg.sxm_position(h)
    lo, hi = s - hops - CLEAR, s + cfg.positions + CLEAR
    for i in range(S):
        r = S + i if h == 0 else i
        lst = uses.get(r, [])
        traj = pos + s if r >= S else pos - s
        k = bisect.bisect_left(lst, (traj - CLEAR, -(1 << 62)))
        if not any(lo <= lst[j][1] <= hi for j in range(k, bisect.bisect_right(lst, (traj + CLEAR, 1 << 62)))):
            return i
    return None


def _issues(lst, t_min: int = 0):
    """For each instruction of a queue but NOPs: (the cycles it occupies the queue, the cycles it issues the
    functional instruction at, that instruction). A Repeat occupies its whole span and issues the previous
    instruction at each repetition (None when nothing precedes it). ``t_min``: leave out the instructions
    whose last issue comes before it (counted past cheaply: a 7B stage's queues run to a million)."""
    t, prev, i = 0, None, 0
    while i < len(lst) and t_min > t:
        ins = lst[i]
        m = ins.op.mnemonic
        span = ins.args[0] if m == "NOP" else ins.args[0] * ins.args[1] if m == "Repeat" else 1
        if t + span > t_min:              # its last issue, t + span - 1, may come at t_min or later
            break
        if m != "NOP" and m != "Repeat":
            prev = ins
        t, i = t + span, i + 1
    for ins in itertools.islice(lst, i, None):
        m = ins.op.mnemonic
        if m == "NOP":
            t += ins.args[0]
        elif m == "Repeat":
            n, d = ins.args[0], ins.args[1]
            yield range(t, t + n * d), [t - 1 + d * (j + 1) for j in range(n)], prev
            t += n * d
        else:
            yield range(t, t + 1), [t], ins
            prev = ins
            t += 1


def _busy(lst, cfg) -> Set[int]:
    """The cycles a queue cannot take one more instruction at: the cycles it occupies (:func:`_issues`) and,
    for a MEM queue, the cycles its writes land in its slice (a read then would meet a write in a bank)."""
    busy: Set[int] = set()
    for span, issues, named in _issues(lst):
        busy.update(span)
        if named is not None and named.op.mnemonic in ("Write", "Scatter"):
            busy.update(c + named.op.delay(cfg) for c in issues)
    return busy


def _merge(cfg, name: str, orig: list, events: List[Tuple[int, str, tuple]], start: int) -> Optional[list]:
    """The instruction list ``orig`` (issuing from cycle ``start``) with ``events`` (absolute cycles) put in
    its idle cycles (splitting NOPs) or after its end; None when an event falls on a cycle it issues at."""
    if not events:
        return list(orig)
    scratch = Program(cfg)
    out: list = []
    evs = sorted(events)
    t, k = start, 0
    for ins in orig:
        n = ins.args[0] if ins.op.mnemonic == "NOP" else (
            ins.args[0] * ins.args[1] if ins.op.mnemonic == "Repeat" else 1)
        if k < len(evs) and evs[k][0] < t:
            return None
        if ins.op.mnemonic != "NOP":
            if k < len(evs) and evs[k][0] < t + n:
                return None
            out.append(ins)
            t += n
            continue
        end = t + n
        if k == len(evs) or evs[k][0] >= end:         # no event inside: the NOP as it is (immutable, shared)
            out.append(ins)
            t = end
            continue
        while k < len(evs) and evs[k][0] < end:      # events inside this NOP: split it
            c, mn, args = evs[k]
            if c > t:
                out.append(scratch.add(name, "NOP", c - t))
            out.append(scratch.add(name, mn, *args))
            t, k = c + 1, k + 1
        if end > t:
            out.append(scratch.add(name, "NOP", end - t))
        t = end
    for c, mn, args in evs[k:]:
        if c < t:
            return None
        if c > t:
            out.append(scratch.add(name, "NOP", c - t))
        out.append(scratch.add(name, mn, *args))
        t = c + 1
    return out


def _with(program: Program, head: Dict[str, List[Tuple[int, str, tuple]]], shift: int,
          tail: Dict[str, List[Tuple[int, str, tuple]]]) -> Program:
    """program with, on each queue, ``head`` events (absolute cycles) before cycle ``shift``,
    the original instructions from ``shift`` on, and ``tail`` events (absolute cycles) in their idle
    cycles or after them."""
    cfg = program.config
    # the original instructions are shared, not copied (they are immutable), and the added ones are
    # checked as they are added: a compiled stage of a 7B model has millions of instructions, so the
    # result is marked validated (Chip.load then does not check it again) once the original is
    program.validate()                # remembered: free for an unchanged compiled program
    out = Program(cfg)
    out.tensors = dict(program.tensors)
    out.queues = dict(program.queues)
    scratch = Program(cfg)
    for q in cfg.queues:
        name = q.name
        orig = program.queues.get(name, [])
        if not orig and not head.get(name) and not tail.get(name):
            continue
        t = 0
        for c, mn, args in sorted(head.get(name, [])):
            if c < t or c >= shift:
                raise CompileError(f"hand_over: {name} event at cycle {c} does not fit before {shift}")
            if c > t:
                scratch.add(name, "NOP", c - t)
            scratch.add(name, mn, *args)
            t = c + 1
        if orig and shift > t:
            scratch.add(name, "NOP", shift - t)
            t = shift
        rest = _merge(cfg, name, orig, tail.get(name, []), t)
        if rest is None:
            raise CompileError(f"hand_over: a {name} event falls on a cycle the queue issues at")
        out.queues[name] = scratch.queues.get(name, []) + rest
    out._mark_checked()
    return out


def events_end(cfg, events: Dict[str, List[Tuple[int, str, tuple]]]) -> int:
    """What ``events`` (queue -> (cycle, mnemonic, operands), as ``_with`` takes them) add to
    :func:`~lpucore.compiler.emit.expected_cycles` of a program they are put in: their last result
    (issue cycle plus the op's delay) plus the stagger, 0 for none. The program with them then
    expects ``max(its own expected cycles shifted, events_end(head), events_end(tail))``: their NOPs
    only fill the cycles between (a 7B stage's millions of instructions need not be walked again)."""
    last = -1
    for qname, evs in events.items():
        kind = cfg.queue(qname).kind
        for c, mn, _ in evs:
            op = isa.lookup(mn, kind)
            if op is None:
                raise CompileError(f"hand_over: no {mn} instruction for queue {qname}")
            last = max(last, c + op.delay(cfg))
    return last + cfg.stagger if last >= 0 else 0


def _side(cfg, g: int) -> Tuple[int, str, int]:
    """(hemisphere, MEM queue, hops to that hemisphere's SXM) of MEM slice ``g`` (numbered over both)."""
    n_sl = cfg.mem_slices_per_hemisphere
    h, slot = g // n_sl, g % n_sl
    return h, f"MEM.{'WE'[h]}{slot}", abs(cfg.mem_position(h, slot) - cfg.sxm_position(h))


def _locations(tensor, lanes: int) -> list:
    """(slice, address) of each vector of ``tensor``, byte plane by byte plane: the order vectors go over a link."""
    out = []
    for b in range(len(tensor.planes)):
        out += list(tensor.locations(b, lanes))
    return out


def _tensor(compiled, name: str, which: str):
    t = compiled.program.tensors.get(name)
    if t is None:
        raise CompileError(f"hand_over: no tensor {name!r} in the {which} program")
    return t


def check_pair(first, out_name: str, second, in_name: str) -> None:
    """Raise :class:`~lpucore.CompileError` unless ``out_name`` of ``first`` can go into ``in_name`` of
    ``second``: the same chip configuration, dtype, shape and byte planes (vectors then map one to one)."""
    if second.config != first.config:
        raise CompileError("hand_over: both programs must be for the same chip configuration")
    ta, tb = _tensor(first, out_name, "first"), _tensor(second, in_name, "second")
    if ta.dtype != tb.dtype or tuple(ta.shape) != tuple(tb.shape) or len(ta.planes) != len(tb.planes):
        raise CompileError(f"hand_over: {out_name} is {ta.dtype.name}{list(ta.shape)} but {in_name} is "
                           f"{tb.dtype.name}{list(tb.shape)}")


def plan_sends(first, out_name: str, links: Sequence[int], early: bool = False, start: int = 0
               ) -> Tuple[Dict[str, list], List[List[int]], int]:
    """(events for chip A's queues, per link the cycle each vector of ``out_name`` is sent, the cycle the
    output is complete) of sending ``first``'s output over each of ``links`` (each link its own copy): after
    the program's last cycle, or with ``early`` each vector as soon as it is written (:func:`hand_over`).
    Put the events in with ``_with(program, {}, 0, events)``."""
    cfg = first.config
    if not links or len(set(links)) != len(links):
        raise CompileError(f"hand_over: links must be distinct and at least one, not {list(links)}")
    locs = _locations(_tensor(first, out_name, "first"), cfg.lanes)
    vectors = [_side(cfg, g) for g, _ in locs]
    t_free = max((queue_end(v) for v in first.program.queues.values()), default=0)
    T0 = max(first.expected_cycles, t_free)
    to_sxm = cfg.mem_read_delay + max(hops for _, _, hops in vectors)
    iv = cfg.c2c_send_interval
    if len(links) > iv:
        raise CompileError(f"hand_over: at most {iv} links at once (one Send per cycle), not {len(links)}")
    # after the program: link j's vector v at s0 + v * interval + j, each on stream 1 of its hemisphere
    deskews = [T0 + j for j in range(len(links))]
    s0 = T0 + len(links) - 1 + cfg.c2c_deskew_delay + to_sxm
    times = [[s0 + v * iv + j for v in range(len(vectors))] for j in range(len(links))]
    streams = [[1] * len(vectors) for _ in links]
    written = T0
    if early:
        found = _early(first, out_name, vectors, links, start, max(t[-1] for t in times), [a for _, a in locs])
        if found is not None:
            deskews, times, streams, written = found
    tail: Dict[str, list] = {"SXM.W0": [(d, "Deskew", (link,)) for d, link in zip(deskews, links)]}
    for link, ts, sts in zip(links, times, streams):
        for (h, q, hops), (_, addr), s, i in zip(vectors, locs, ts, sts):
            st = f"{'WE'[h]}{i}"
            tail.setdefault(q, []).append((s - cfg.mem_read_delay - hops, "Read", (addr, st)))
            tail.setdefault(f"SXM.{'WE'[h]}1", []).append((s, "Send", (link, st)))
    return tail, times, written


def plan_receives(second, incoming: Sequence[Tuple[str, int, Sequence[int]]]
                  ) -> Tuple[Dict[str, list], int]:
    """(events for chip B's queues before its program, the cycle its program starts at) of receiving, for
    each ``(in_name, link, send cycles)`` of ``incoming``, the vectors sent at those cycles (by
    :func:`plan_sends`, in :func:`_locations` order) over ``link`` into ``in_name``. Each vector is taken at
    the first cycle after its arrival when its Receive and its Write find their queues free (a link's
    vectors wait in its inbox, in order), so several links may feed one chip."""
    cfg = second.config
    lat = cfg.c2c_latency
    head: Dict[str, list] = {"SXM.W0": [(j, "Deskew", (link,)) for j, (_, link, _) in enumerate(incoming)]}
    arrivals = []
    for j, (in_name, link, times) in enumerate(incoming):
        locs = _locations(_tensor(second, in_name, "second"), cfg.lanes)
        if len(locs) != len(times):
            raise CompileError(f"hand_over: {len(times)} vectors sent for {in_name!r}, which has {len(locs)}")
        ready = j + cfg.c2c_deskew_delay
        arrivals += [(max(t + lat, ready), link, g, a) for t, (g, a) in zip(times, locs)]
    arrivals.sort()
    busy: Dict[str, Set[int]] = {}
    last: Dict[int, int] = {}
    end_writes = 0
    for arrive, link, gb, ab in arrivals:
        h, q, hops = _side(cfg, gb)
        rq = f"SXM.{'WE'[h]}0"
        r = max(arrive, last.get(link, -1) + 1)
        while r in busy.setdefault(rq, set()) or r + cfg.c2c_receive_delay + hops in busy.setdefault(q, set()):
            r += 1
        w = r + cfg.c2c_receive_delay + hops
        busy[rq].add(r)
        busy[q].add(w)
        last[link] = r
        st = "E2" if h == 0 else "W2"
        head.setdefault(rq, []).append((r, "Receive", (link, st)))
        head.setdefault(q, []).append((w, "Write", (ab, st)))
        end_writes = max(end_writes, w + cfg.mem_write_delay)
    return head, end_writes + 1


def hand_over(first, out_name: str, second, in_name: str, link_first: int, link_second: int,
              early: bool = False, info: Optional[Dict[str, int]] = None, start: int = 0
              ) -> Tuple[Program, Program, int]:
    """(program for chip A, program for chip B, the cycle chip B's program ends) for
    ``first`` on chip A, whose output ``out_name`` goes over link ``link_first`` of chip A,
    wired to link ``link_second`` of chip B, into the input ``in_name`` of ``second``.

    ``early``: the output leaves as soon as it is written (its kernel's last landing, in ``first.kernels``)
    rather than after chip A's last cycle, in cycles its queues are idle and on a stream no instruction
    of chip A names from then on, so chip A's later work (a KV cache write nothing waits for) runs
    while chip B works; chip A's program may then end after the returned cycle
    (:func:`lpucore.compiler.emit.expected_cycles` of its program). ``start``: the cycle ``first``'s own
    schedule begins at in its program (a program already shifted by an earlier hand-over; its kernels'
    cycles count from there). ``info`` (a dict) receives ``"send"``, the cycle the output is complete on
    chip A (early: vectors written before then may already have left). Several links out of one chip or
    into one: :func:`plan_sends` and :func:`plan_receives`."""
    check_pair(first, out_name, second, in_name)
    tail, times, t0 = plan_sends(first, out_name, [link_first], early, start)
    head, shift = plan_receives(second, [(in_name, link_second, times[0])])
    if info is not None:
        info["send"] = t0
    prog_a = _with(first.program, {}, 0, tail)
    prog_b = _with(second.program, head, shift, {})
    return prog_a, prog_b, shift + second.expected_cycles
