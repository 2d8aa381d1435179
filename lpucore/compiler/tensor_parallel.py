"""``lpucore.compile(graph, system=...)``: one graph over the chips of a system.

The graph is split over a group of chips wired pairwise (:mod:`.shard`), every chip's
graph is compiled side by side with the others so that the all-gathers and all-reduces
between them are scheduled to the cycle (:mod:`.collective`), and the result,
:class:`SystemCompiled`, loads into a :class:`~lpucore.System` and runs there.  Its
``expected_cycles`` (the longest chip's program) is exactly what the run takes.

Pipeline stages (layers on consecutive chips, a tensor handed over one link) are the
other way to spread a model; :mod:`lpucore.llm.pipeline` builds them for language
models with :func:`lpucore.compiler.pipeline.hand_over`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CompileError
from ..graph import Graph, GraphError
from .collective import compile_group, group_links
from .lower import Compiled
from .shard import Partition, Spec, partition


class MultiChipCompiled:
    """What :class:`SystemCompiled` and :class:`~lpucore.compiler.stages.PipelineCompiled` share:
    ``parts[k]`` (a :class:`~lpucore.compiler.lower.Compiled`) runs on chip ``chips[k]`` of a
    system wired by ``wires``; subclasses say how inputs and outputs map to the chips."""

    parts: List[Compiled]
    chips: List[int]
    wires: List[Tuple[int, int, int, int]]

    @property
    def config(self):
        return self.parts[0].config

    def dump(self, stage: str) -> str:
        """Every chip's program after compiler stage ``stage`` (:meth:`Compiled.dump
        <lpucore.compiler.lower.Compiled.dump>`), one section a chip; a pipeline stage's cycles are
        those of its own schedule, before it is shifted to start when its input has landed."""
        return "".join(f"=== chip {c} (part {k} of {len(self.parts)})\n{p.dump(stage)}"
                       for k, (c, p) in enumerate(zip(self.chips, self.parts)))

    @property
    def memory_bytes(self) -> List[int]:
        """SRAM each chip's program uses (bytes)."""
        return [c.memory_bytes for c in self.parts]

    def system(self, engine: str = "fast", comm=None):
        """A new :class:`~lpucore.System` wired as this was compiled for, with the programs loaded."""
        from ..system import System
        n = max(max(self.chips) + 1, max((max(w[0], w[2]) + 1 for w in self.wires), default=1))
        s = System(n, topology=self.wires, config=self.config, engine=engine, comm=comm)
        self.load(s)
        return s

    def load(self, system) -> None:
        """Load every chip's program and constants (the chips this process simulates)."""
        if system.config != self.config:
            raise CompileError("load: the system's chip configuration differs from the compiled one")
        system.load({chip: part.program for chip, part in zip(self.chips, self.parts)})
        for chip, part in zip(self.chips, self.parts):
            if system.chips[chip] is not None:
                for name, arr in part.constants.items():
                    part.write_constant(system.chips[chip], name, arr)

    def write_inputs(self, system, inputs: Dict[str, np.ndarray]) -> None:
        """Write the inputs into the chips that read them (as the subclass says)."""
        raise NotImplementedError

    def read_outputs(self, system) -> Dict[str, np.ndarray]:
        """The outputs, from the chips that hold them (as the subclass says)."""
        raise NotImplementedError

    def loaded_in(self, system) -> bool:
        """Whether every chip this process simulates holds this compile's program."""
        return all(system.chips[c] is None or getattr(system.chips[c], "program", None) is part.program
                   for c, part in zip(self.chips, self.parts))

    def run(self, inputs: Dict[str, np.ndarray], system=None, engine: str = "fast"):
        """Run once: ({output: array}, SystemStats).  Without a system, a new one is made; a
        system that does not hold these programs yet is loaded first (weights, state initial
        values); one that does keeps its SRAM (states carry over from run to run)."""
        if system is None:
            system = self.system(engine=engine)
        elif not self.loaded_in(system):
            self.load(system)
        else:
            system.reset(clear_memory=False)
        self.write_inputs(system, inputs)
        stats = system.run()
        return self.read_outputs(system), stats


@dataclass
class SystemCompiled(MultiChipCompiled):
    """A graph compiled for a group of chips of a system: ``parts[r]`` runs on chip
    ``chips[r]``.  Inputs go to every chip of the group; outputs are read from the first."""

    parts: List[Compiled]
    chips: List[int]
    wires: List[Tuple[int, int, int, int]]
    state_axes: Dict[str, Spec]
    link_bytes: int                       # bytes each chip sends over its links per run
    partition: Partition

    @property
    def expected_cycles(self) -> int:
        """Cycles until the last chip of the group finishes (predicted statically, exact)."""
        return max(c.expected_cycles for c in self.parts)

    @property
    def inputs(self):
        return self.parts[0].inputs

    @property
    def outputs(self):
        return self.parts[0].outputs

    def write_inputs(self, system, inputs: Dict[str, np.ndarray]) -> None:
        for chip, part in zip(self.chips, self.parts):
            if system.chips[chip] is not None:
                part.write_inputs(system.chips[chip], inputs)

    def read_outputs(self, system) -> Dict[str, np.ndarray]:
        """The outputs, from the first chip of the group (under MPI: on the process that has it)."""
        chip = system.chips[self.chips[0]]
        if chip is None:
            raise GraphError("read_outputs: this process does not simulate the group's first chip")
        return self.parts[0].read_outputs(chip)

    def read_state(self, system, name: str) -> np.ndarray:
        """A state's whole value, assembled from the chips' parts."""
        if name not in self.state_axes:
            raise GraphError(f"read_state: no state named {name!r}")
        k = self.state_axes[name]
        parts = [part.read_state(system.chips[chip], name) for chip, part in zip(self.chips, self.parts)]
        return parts[0] if k is None else np.concatenate(parts, axis=k)


def tensor_parallel_fits(graph: Graph, system, chips: Optional[Sequence[int]] = None, fill: float = 0.8) -> bool:
    """Whether ``chips`` (default: all) are wired pairwise, and the graph's constants and states
    split over them would fill at most ``fill`` of each chip (an estimate: the split is
    assumed even; the compile itself says if it does not fit)."""
    chips = list(range(system.n_chips)) if chips is None else list(chips)
    if len(chips) < 2:
        return False
    try:
        group_links(len(chips), system.wires, chips)
    except CompileError:
        return False
    held = sum(a.nbytes for a in graph.constants.values()) + sum(a.nbytes for a in graph.state_init.values())
    return held / len(chips) <= fill * system.config.sram_bytes


def compile_system(graph: Graph, system, chips: Optional[Sequence[int]] = None,
                   state_axes: Optional[Dict[str, Spec]] = None, min_cols: Optional[int] = None) -> SystemCompiled:
    """Split ``graph`` over ``chips`` of ``system`` (default: all; they must be wired
    pairwise, as a GroqNode's 8 are) and compile it (see the module doc).
    ``min_cols``: a weight is split by columns if each part is at least this wide; by default
    ``lanes`` (one vector), or narrower when the weight has at least one 320 x 320 tile's
    bytes per chip (P x lanes^2: repeating it would cost each chip more MXM time than the
    gather of its product).  ``state_axes``: split axis of named states (default: chosen)."""
    cfg = system.config
    chips = list(range(system.n_chips)) if chips is None else [int(c) for c in chips]
    if len(set(chips)) != len(chips) or any(not 0 <= c < system.n_chips for c in chips):
        raise CompileError(f"chips {chips} are not distinct chips of a {system.n_chips}-chip system")
    P = len(chips)
    if P < 2:
        raise CompileError("a system compile needs at least 2 chips (use lpucore.compile(graph) for one)")
    links = group_links(P, system.wires, chips)
    if min_cols is None:
        part = partition(graph, P, state_axes, min_cols=cfg.lanes, min_bytes=P * cfg.lanes * cfg.lanes)
    else:
        part = partition(graph, P, state_axes, min_cols=min_cols)
    compiled = compile_group(part.graphs, cfg, links)
    return SystemCompiled(compiled, chips, list(system.wires), part.state_axes, part.link_bytes, part)
