"""Tools for testing programs on lpucore, and lpucore itself.

* :func:`run_both` runs a program on both engines and reports where they differ.
* :mod:`lpucore.testing.programs` builds random legal programs with expected
  results, without hypothesis.
* :mod:`lpucore.testing.strategies` has hypothesis strategies (needs the
  ``test`` extra).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import numpy as np

from ..chip import Chip
from ..errors import ScheduleError
from .programs import GeneratedProgram, ProgramBuilder, RandomChooser, generate


class Outcome:
    """What one engine did with a program: the error (or None), stats, memory and cycle."""

    def __init__(self, chip: Chip, error: Optional[ScheduleError]):
        self.engine = chip.engine_name
        self.error = error
        self.cycle = chip.cycle
        self.stats = chip.stats().to_dict()
        cfg = chip.config
        self.memory = np.stack([chip._eng.read_mem(g, 0, cfg.addresses_per_slice) for g in range(cfg.mem_slices)])
        self.counters = chip._eng.counters()

    def error_text(self):
        return None if self.error is None else (self.error.key(), str(self.error))


def run_on(engine: str, program, setup: Optional[Callable[[Chip], None]] = None) -> Outcome:
    chip = Chip(program.config, engine=engine)
    chip.load(program)
    if setup is not None:
        setup(chip)
    try:
        chip.run()
        err = None
    except ScheduleError as e:
        err = e
    return Outcome(chip, err)


def run_both(program, setup: Optional[Callable[[Chip], None]] = None) -> List[str]:
    """Run ``program`` on the reference and the fast engine; return the differences
    (empty list: identical errors, cycles, statistics and memory)."""
    a, b = run_on("reference", program, setup), run_on("fast", program, setup)
    diffs = []
    if a.error_text() != b.error_text():
        diffs.append(f"error: reference {a.error_text()} vs fast {b.error_text()}")
    if a.cycle != b.cycle:
        diffs.append(f"cycle: reference {a.cycle} vs fast {b.cycle}")
    if a.stats != b.stats:
        diffs.append(f"stats: reference {a.stats} vs fast {b.stats}")
    for k in a.counters:
        if not np.array_equal(a.counters[k], b.counters[k]):
            diffs.append(f"counter {k}: reference {a.counters[k]} vs fast {b.counters[k]}")
    if not np.array_equal(a.memory, b.memory):
        g, addr, lane = np.argwhere(a.memory != b.memory)[0]
        diffs.append(f"memory: first difference at {program.config.slice_name(int(g))}:{int(addr)} lane {int(lane)}: "
                     f"reference {a.memory[g, addr, lane]} vs fast {b.memory[g, addr, lane]}")
    return diffs


__all__ = ["run_both", "run_on", "Outcome", "GeneratedProgram", "ProgramBuilder", "RandomChooser", "generate"]
