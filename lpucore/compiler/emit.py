"""Placing instructions at exact cycles, and predicting a program's length statically.

The TSP has no dynamic hazards, so a compiler decides every instruction's issue
cycle.  :class:`Emitter` collects ``(cycle, instruction)`` per queue, checks that
each queue issues at most once per cycle, and emits the queue with ``NOP`` gaps
and ``Repeat`` for runs.  :func:`expected_cycles` computes, without running it,
the cycle count the engines will report for a program without Sync/Notify.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ..config import ChipConfig
from ..errors import CompileError
from ..program import Program


class Emitter:
    """Instructions at fixed cycles, per queue."""

    def __init__(self, cfg: ChipConfig):
        self.cfg = cfg
        # queue -> [(first cycle, mnemonic, args, repeat (n, d, stride) or None)]
        self.runs: Dict[str, List[Tuple[int, str, tuple, Optional[Tuple[int, int, int]]]]] = {}

    def at(self, queue: str, cycle: int, mnemonic: str, *args, repeat: Optional[Tuple[int, int, int]] = None):
        """Issue ``mnemonic args`` on ``queue`` at ``cycle``; ``repeat=(n, d, stride)`` adds
        n more copies d cycles apart (strided fields + k * stride)."""
        if cycle < 0:
            raise CompileError(f"{queue}: {mnemonic} scheduled at negative cycle {cycle}")
        if repeat is not None and repeat[0] == 0:
            repeat = None
        self.runs.setdefault(queue, []).append((int(cycle), mnemonic, tuple(args), repeat))

    def program(self, program: Optional[Program] = None) -> Program:
        p = program if program is not None else Program(self.cfg)
        for queue, runs in self.runs.items():
            t = 0                                         # next free issue cycle
            for c, mn, args, rep in sorted(runs, key=lambda r: r[0]):
                if c < t:
                    raise CompileError(f"{queue}: {mn} at cycle {c} collides with the previous instruction "
                                       f"(queue busy until {t - 1})")
                if c > t:
                    p.add(queue, "NOP", c - t)
                p.add(queue, mn, *args)
                if rep is not None:
                    n, d, stride = rep
                    p.add(queue, "Repeat", n, d, stride)
                    t = c + n * d + 1
                else:
                    t = c + 1
        return p


def expected_cycles(program: Program) -> int:
    """The cycle count both engines will report for this program (without Sync/Notify):
    the last issue, landing value or bank write, plus the stagger."""
    cfg = program.config
    last = -1
    delay: Dict[int, int] = {}          # id(op) -> its result delay: a program has few distinct ops
    for lst in program.queues.values():
        t = 0
        prev = None
        for ins in lst:
            name = ins.op.mnemonic
            if name in ("Sync", "Notify"):
                raise CompileError("expected_cycles does not model Sync/Notify")
            if name == "NOP":
                t += ins["n"]
                last = max(last, t - 1)
                prev = None
                continue
            if name == "Repeat":
                if prev is None:            # Program.validate refuses it too
                    raise CompileError("expected_cycles: a Repeat must follow a functional-unit instruction")
                n, d = ins["n"], ins["d"]
                issue = t - 1 + n * d                    # the last repetition
                last = max(last, issue + delay[id(prev.op)])
                t = issue + 1
                continue
            dl = delay.get(id(ins.op))
            if dl is None:
                dl = delay[id(ins.op)] = ins.op.delay(cfg)
            if t + dl > last:
                last = t + dl
            prev = ins
            t += 1
        last = max(last, t - 1)
    return last + cfg.stagger if last >= 0 else 0
