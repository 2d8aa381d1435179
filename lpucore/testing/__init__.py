"""Tools for testing programs on lpucore, and lpucore itself.

* :func:`run_both` runs a program on both engines and reports where they differ.
* :func:`first_divergence` finds the first cycle at which two engines' states differ,
  and the units (queues, MEM slices, MXM planes) that differ there.
* :mod:`lpucore.testing.programs` builds random legal programs with expected
  results, without hypothesis.
* :mod:`lpucore.testing.strategies` has hypothesis strategies (needs the
  ``test`` extra).
"""

from __future__ import annotations

from typing import Callable, List, Optional

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
        self.memory = chip.memory()
        self.counters = chip.counters()
        self.outbox = [(link, c, a, v.tobytes()) for link, c, a, v in chip.c2c_take_outbox()]

    def error_text(self):
        return None if self.error is None else (self.error.key(), str(self.error))


def run_on(engine: str, program, setup: Optional[Callable[[Chip], None]] = None, until: Optional[int] = None,
           factory: Optional[Callable[[str, object], Chip]] = None) -> Outcome:
    """Run ``program`` on a fresh chip of ``engine`` (made by ``factory(engine, config)`` if given), after
    ``setup(chip)``, to its end or to cycle ``until``; a ScheduleError is caught into the outcome."""
    chip = factory(engine, program.config) if factory is not None else Chip(program.config, engine=engine)
    chip.load(program)
    if setup is not None:
        setup(chip)
    try:
        chip.run(until=until)
        err = None
    except ScheduleError as e:
        err = e
    return Outcome(chip, err)


class Divergence:
    """Where two engines first disagree: ``cycle`` (the earliest cycle after which their states differ),
    ``units`` (queue names, MEM slices as ``MEM.W3``, ``MXM`` / counters) and ``details`` (one line each)."""

    def __init__(self, cycle: int, units: List[str], details: List[str], engines):
        self.cycle, self.units, self.details, self.engines = cycle, units, details, tuple(engines)

    def __repr__(self):
        return f"Divergence(cycle={self.cycle}, units={self.units})"

    def __str__(self):
        a, b = self.engines
        return (f"{a} and {b} diverge at cycle {self.cycle} in {', '.join(self.units) or '?'}:\n  "
                + "\n  ".join(self.details))


def _compare(a: Outcome, b: Outcome, cfg, names=("reference", "fast")):
    """(units, details) in which two outcomes differ (empty lists: identical)."""
    units, details = [], []
    na, nb = names
    if a.error_text() != b.error_text():
        e = a.error or b.error
        units.append(getattr(e, "unit", None) or "ICU")
        details.append(f"error: {na} {a.error_text()} vs {nb} {b.error_text()}")
    if a.cycle != b.cycle:
        units.append("ICU")
        details.append(f"cycle: {na} {a.cycle} vs {nb} {b.cycle}")
    for key in ("issued", "busy_cycles", "icu_instructions", "mxm_macs", "mxm_busy_cycles"):
        da, db = a.stats.get(key, {}), b.stats.get(key, {})
        for q in sorted(set(da) | set(db)):
            if da.get(q) != db.get(q):
                unit = q if "." in q else (f"MXM.{q}" if key.startswith("mxm") else q)
                if unit not in units:
                    units.append(unit)
                details.append(f"{key}[{q}]: {na} {da.get(q)} vs {nb} {db.get(q)}")
    if a.outbox != b.outbox:
        units.append("C2C")
        details.append(f"C2C outbox: {na} {[x[:3] for x in a.outbox]} vs {nb} {[x[:3] for x in b.outbox]}")
    diff = np.argwhere(a.memory != b.memory)
    seen = set()
    for g, addr, lane in diff:
        name = f"MEM.{cfg.slice_name(int(g))}"
        if name in seen:
            continue
        seen.add(name)
        units.append(name)
        details.append(f"{name} address {int(addr)} lane {int(lane)}: {na} {a.memory[g, addr, lane]} vs "
                       f"{nb} {b.memory[g, addr, lane]}")
    for k in a.counters:
        if not np.array_equal(a.counters[k], b.counters[k]):
            if "counters" not in units:
                units.append(f"counters.{k}")
            details.append(f"counter {k}: {na} {a.counters[k]} vs {nb} {b.counters[k]}")
    return units, details


def first_divergence(program, setup: Optional[Callable[[Chip], None]] = None,
                     engines=("reference", "fast"),
                     factory: Optional[Callable[[str, object], Chip]] = None) -> Optional[Divergence]:
    """The first cycle at which ``program`` (after ``setup``) leaves two engines in different states, or None.

    States compared: all of MEM, the per-queue and per-plane statistics, the engines' counters, the cycle and
    any schedule error. The search runs each engine from the start to a cycle (``Chip.run(until=...)``) and
    bisects, so it costs about ``2 log2(cycles)`` runs; use a small configuration. ``factory(engine, config)``
    makes the chips (default ``Chip(config, engine=engine)``), for example to test a modified engine.
    """
    cfg = program.config

    def at(eng: str, c: Optional[int]) -> Outcome:
        return run_on(eng, program, setup, c, factory)

    a, b = at(engines[0], None), at(engines[1], None)
    units, _ = _compare(a, b, cfg, engines)
    if not units:
        return None
    lo, hi = 0, max(a.cycle, b.cycle)          # states agree up to lo (checked below), differ at hi
    if _compare(at(engines[0], 0), at(engines[1], 0), cfg, engines)[0]:
        hi = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if _compare(at(engines[0], mid), at(engines[1], mid), cfg, engines)[0]:
            hi = mid
        else:
            lo = mid + 1
    units, details = _compare(at(engines[0], hi), at(engines[1], hi), cfg, engines)
    if not units:                                   # only the end states differ (e.g. one engine stops early)
        units, details = _compare(a, b, cfg, engines)
    return Divergence(hi, units, details, engines)


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
    if a.outbox != b.outbox:
        diffs.append(f"C2C outbox: reference {[x[:3] for x in a.outbox]} vs fast {[x[:3] for x in b.outbox]}")
    if not np.array_equal(a.memory, b.memory):
        g, addr, lane = np.argwhere(a.memory != b.memory)[0]
        diffs.append(f"memory: first difference at {program.config.slice_name(int(g))}:{int(addr)} lane {int(lane)}: "
                     f"reference {a.memory[g, addr, lane]} vs fast {b.memory[g, addr, lane]}")
    return diffs


__all__ = ["run_both", "run_on", "first_divergence", "Divergence", "Outcome", "GeneratedProgram", "ProgramBuilder",
           "RandomChooser", "generate"]
