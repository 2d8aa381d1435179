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
finishes: the first program's cycles + the transfer + the second program's cycles.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

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


def _with(program: Program, head: Dict[str, List[Tuple[int, str, tuple]]], shift: int,
          tail: Dict[str, List[Tuple[int, str, tuple]]]) -> Program:
    """program with, on each queue, ``head`` events (absolute cycles) before cycle ``shift``,
    the original instructions from ``shift`` on, then ``tail`` events (absolute cycles)."""
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
        if orig:
            scratch.queues.setdefault(name, []).extend(orig)
        t = (shift + queue_end(orig)) if orig else t
        for c, mn, args in sorted(tail.get(name, [])):
            if c < t:
                raise CompileError(f"hand_over: {name} event at cycle {c} comes before the queue is free ({t})")
            if c > t:
                scratch.add(name, "NOP", c - t)
            scratch.add(name, mn, *args)
            t = c + 1
        out.queues[name] = scratch.queues.get(name, [])
    out._mark_checked()
    return out


def hand_over(first, out_name: str, second, in_name: str, link_first: int, link_second: int
              ) -> Tuple[Program, Program, int]:
    """(program for chip A, program for chip B, the cycle chip B's program ends) for
    ``first`` on chip A, whose output ``out_name`` goes over link ``link_first`` of chip A,
    wired to link ``link_second`` of chip B, into the input ``in_name`` of ``second``."""
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
    s0 = T0 + cfg.c2c_deskew_delay + to_sxm
    tail: Dict[str, list] = {"SXM.W0": [(T0, "Deskew", (link_first,))]}
    head: Dict[str, list] = {"SXM.W0": [(0, "Deskew", (link_second,))]}
    end_writes = 0
    for k, ((ga, aa), (gb, ab)) in enumerate(pairs):
        s = s0 + k * iv
        h, q, hops = side(ga)
        tail.setdefault(q, []).append((s - cfg.mem_read_delay - hops, "Read", (aa, "W1" if h == 0 else "E1")))
        tail.setdefault(f"SXM.{'WE'[h]}1", []).append((s, "Send", (link_first, "W1" if h == 0 else "E1")))
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
