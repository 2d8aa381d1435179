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
from typing import Dict, List, Optional, Set, Tuple

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


def _early(first, out_name: str, vectors, start: int, last_late: int
           ) -> Optional[Tuple[int, List[int], List[int]]]:
    """(Deskew cycle, each vector's Send cycle, each vector's stream) of a hand-over from when ``out_name`` is
    written (:func:`hand_over`, ``early``; ``vectors``: each vector's (hemisphere, MEM queue, hops to the
    SXM)): vector by vector, the first Send cycle, at least ``c2c_send_interval`` after the previous one,
    at which its Read and its Send fall in idle cycles of chip A's queues, on a stream register no value of
    chip A uses on the vector's trajectory (:func:`_trajectories`). None when ``first`` has no record of
    that write, or the last Send would not come before ``last_late`` (the hand-over after the program)."""
    landed = [last for _, name, last in first.kernels if name == out_name and last is not None]
    if not landed:
        return None
    cfg = first.config
    ready = start + max(landed) + 1
    if ready >= last_late:
        return None
    uses = _trajectories(first.program, ready - cfg.positions)
    queues = first.program.queues
    taken: Dict[str, Set[int]] = {}

    def free(q: str, c: int) -> bool:
        if q not in taken:
            taken[q] = _busy(queues.get(q, []), cfg)
        return c not in taken[q]
    T0 = ready
    while not free("SXM.W0", T0):
        T0 += 1
    s = T0 + cfg.c2c_deskew_delay + cfg.mem_read_delay + max(hops for _, _, hops in vectors)
    times: List[int] = []
    streams: List[int] = []
    for h, q, hops in vectors:
        send_q = f"SXM.{'WE'[h]}1"
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
        times.append(s)
        streams.append(i)
        s += cfg.c2c_send_interval
    taken["SXM.W0"].add(T0)
    return T0, times, streams


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
        for _, times, named in _issues(lst):
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


def _issues(lst):
    """For each instruction of a queue but NOPs: (the cycles it occupies the queue, the cycles it issues the
    functional instruction at, that instruction). A Repeat occupies its whole span and issues the previous
    instruction at each repetition (None when nothing precedes it)."""
    t, prev = 0, None
    for ins in lst:
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
    cycles count from there). ``info`` (a dict) receives ``"send"``, the cycle the hand-over starts on
    chip A."""
    cfg = first.config
    if second.config != cfg:
        raise CompileError("hand_over: both programs must be for the same chip configuration")
    ta, tb = first.program.tensors.get(out_name), second.program.tensors.get(in_name)
    if ta is None or tb is None:
        raise CompileError(f"hand_over: no tensor {out_name!r} in the first program or {in_name!r} in the second")
    if ta.dtype != tb.dtype or tuple(ta.shape) != tuple(tb.shape) or len(ta.planes) != len(tb.planes):
        raise CompileError(f"hand_over: {out_name} is {ta.dtype.name}{list(ta.shape)} but {in_name} is "
                           f"{tb.dtype.name}{list(tb.shape)}")
    L, n_sl = cfg.lanes, cfg.mem_slices_per_hemisphere
    pairs = []
    for b in range(len(ta.planes)):
        pairs += list(zip(ta.locations(b, L), tb.locations(b, L)))
    iv, lat = cfg.c2c_send_interval, cfg.c2c_latency

    def side(g):
        h, slot = g // n_sl, g % n_sl
        return h, f"MEM.{'WE'[h]}{slot}", abs(cfg.mem_position(h, slot) - cfg.sxm_position(h))

    t_free = max((queue_end(v) for v in first.program.queues.values()), default=0)
    T0 = max(first.expected_cycles, t_free)
    to_sxm = cfg.mem_read_delay + max(side(g)[2] for (g, _), _ in pairs)
    vectors = [side(ga) for (ga, _), _ in pairs]
    s0 = T0 + cfg.c2c_deskew_delay + to_sxm
    times, streams = [s0 + k * iv for k in range(len(pairs))], [1] * len(pairs)
    if early:
        found = _early(first, out_name, vectors, start, times[-1])
        if found is not None:
            T0, times, streams = found
    tail: Dict[str, list] = {"SXM.W0": [(T0, "Deskew", (link_first,))]}
    for ((_, aa), _), (h, q, hops), s, i in zip(pairs, vectors, times, streams):
        st = f"{'WE'[h]}{i}"
        tail.setdefault(q, []).append((s - cfg.mem_read_delay - hops, "Read", (aa, st)))
        tail.setdefault(f"SXM.{'WE'[h]}1", []).append((s, "Send", (link_first, st)))
    if info is not None:
        info["send"] = T0
    head: Dict[str, list] = {"SXM.W0": [(0, "Deskew", (link_second,))]}
    end_writes = 0
    for (_, (gb, ab)), s in zip(pairs, times):
        r = s + lat
        h, q, hops = side(gb)
        head.setdefault(f"SXM.{'WE'[h]}0", []).append((r, "Receive", (link_second, "E2" if h == 0 else "W2")))
        w = r + cfg.c2c_receive_delay + hops
        head.setdefault(q, []).append((w, "Write", (ab, "E2" if h == 0 else "W2")))
        end_writes = max(end_writes, w + cfg.mem_write_delay)
    shift = end_writes + 1
    prog_a = _with(first.program, {}, 0, tail)
    prog_b = _with(second.program, head, shift, {})
    return prog_a, prog_b, shift + second.expected_cycles
