"""Pipeline stages: one graph cut into consecutive parts, one chip each, the part's result
handed to the next chip over a C2C link (:func:`lpucore.compiler.pipeline.hand_over`).

``lpucore.compile(graph, system=s, strategy="pipeline")`` (and ``"auto"`` when the graph does
not fit the chips split by tensor parallelism, or they are not wired pairwise) uses it.

*Cut points.*  The graph's operations are taken in order; a cut before operation i is allowed
when exactly one computed tensor is still needed from i on (it becomes the next stage's input,
``_stage_in``, and the previous stage's output, ``_stage_out``) and no state (``Graph.state``)
is read or updated on both sides (its reads and its new value stay on one chip).  Besides that
one tensor, tensors computed from inputs and constants alone (position masks, say) may be live:
a later stage that needs one computes it again.  Inputs are
written by the host to every stage that reads them; constants go to the stages that use them;
a graph output is read from the chip that computes it.

*Stages.*  As few as hold at most ``fill`` (80 %) of a chip's SRAM in constants and states each,
cut greedily at the last allowed point; a part between two allowed points that alone exceeds that
raises :class:`~lpucore.CompileError`.  Consecutive stages need a direct link between their chips
(the chips are taken in the order given, or along :func:`lpucore.compiler.c2c.chip_path`).

The whole run takes the predicted cycles: each stage's program is shifted to start when its input
has landed, so its own schedule is unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from ..errors import CompileError
from ..graph import Graph, GraphError, Tensor
from .lower import Compiled, check_input_names
from .tensor_parallel import MultiChipCompiled

STAGE_IN, STAGE_OUT = "_stage_in", "_stage_out"


def _pure(g: Graph) -> Set[int]:
    """Computed tensors that depend on inputs and constants only (no state): a later stage
    recomputes them instead of receiving them (position masks, say)."""
    pure: Set[int] = set(g.inputs[n].id for n in g.inputs) | set(g.constants)
    for node in g.nodes:
        if all(i in pure for i in node.inputs):
            pure.add(node.output)
    return pure


def cut_points(g: Graph) -> Dict[int, int]:
    """{i: the one tensor id live across a cut before operation i} for every allowed cut."""
    nodes = g.nodes
    n = len(nodes)
    pure = _pure(g)
    pos = {node.output: i for i, node in enumerate(nodes)}
    last_use: Dict[int, int] = {}
    for i, node in enumerate(nodes):
        for tid in node.inputs:
            last_use[tid] = i
    for out in g.outputs.values():
        if out.id in pos:
            last_use[out.id] = max(last_use.get(out.id, -1), pos[out.id])     # read from its own chip
    # a state's reads and the making of its new value stay on one chip
    blocked = np.zeros(n + 1, dtype=bool)
    for st in g.states.values():
        idx = [i for i, node in enumerate(nodes) if st.id in node.inputs]
        v = g.assigns.get(st.id)
        if v is not None and v.id in pos:
            idx.append(pos[v.id])
        if idx:
            blocked[min(idx) + 1:max(idx) + 1] = True
    cuts = {}
    live: Set[int] = set()
    for i in range(1, n):
        o = nodes[i - 1].output
        if last_use.get(o, -1) >= i:
            live.add(o)
        live = {t for t in live if last_use.get(t, -1) >= i}
        if blocked[i]:
            continue
        if len(live) == 1:
            cuts[i] = next(iter(live))
        else:
            rest = [t for t in live if t not in pure]
            if len(rest) == 1:
                cuts[i] = rest[0]
    return cuts


def stage_graph(g: Graph, a: int, b: int, t_in: Optional[int], t_out: Optional[int], k: int) -> Graph:
    """Operations [a, b) of g as a graph of their own (see the module doc)."""
    out = Graph(f"{g.name}[stage {k}]")
    m: Dict[int, Tensor] = {}
    inputs = {t.id: name for name, t in g.inputs.items()}
    states = {t.id: name for name, t in g.states.items()}
    if t_in is not None:
        src = g.tensors[t_in]
        m[t_in] = out.input(STAGE_IN, src.shape, src.dtype.name)

    pure = _pure(g)

    def get(tid: int) -> Tensor:
        if tid not in m:
            t = g.tensors[tid]
            if tid in pure and tid in g.producer:        # made from inputs and constants: again
                node = g.producer[tid]
                m[tid] = out._node(node.op, [get(i) for i in node.inputs], t.shape, t.dtype, **node.attrs)
            elif tid in inputs:
                m[tid] = out.input(inputs[tid], t.shape, t.dtype.name)
            elif tid in g.constants:
                m[tid] = out.constant(g.constant_names.get(tid), g.constants[tid])
            elif tid in states:
                m[tid] = out.state(states[tid], t.shape, t.dtype.name, init=g.state_init[tid])
            else:
                raise CompileError(f"internal: stage {k} reads tensor {tid} from another stage")
        return m[tid]
    for node in g.nodes[a:b]:
        t = g.tensors[node.output]
        if t.id not in m:
            m[t.id] = out._node(node.op, [get(i) for i in node.inputs], t.shape, t.dtype, **node.attrs)
    produced = {node.output for node in g.nodes[a:b]}
    for name, t in g.outputs.items():
        if t.id in produced or (k == 0 and g.producer.get(t.id) is None):
            out.output(name, get(t.id) if t.id not in produced else m[t.id])
    for sid, v in g.assigns.items():
        if sid in m or v.id in produced:
            out.assign(get(sid), get(v.id) if v.id not in produced else m[v.id])
    if t_out is not None:
        out.output(STAGE_OUT, m[t_out])
    return out


def plan_cuts(g: Graph, cap: float) -> List[int]:
    """Cut positions (operation indices) of the fewest stages of at most ``cap`` bytes each."""
    cuts = cut_points(g)
    nodes = g.nodes
    seen_at: Dict[int, int] = {}
    weight = np.zeros(len(nodes))
    for i, node in enumerate(nodes):
        for t in node.inputs:
            if (t in g.constants or t in g.state_init) and t not in seen_at:
                seen_at[t] = i
                arr = g.constants[t] if t in g.constants else g.state_init[t]
                weight[i] += arr.nbytes
    points = [0] + sorted(cuts) + [len(nodes)]
    out, start = [], 0
    for p, q in zip(points, points[1:]):
        part = weight[p:q].sum()
        if part > cap:
            raise CompileError(f"operations {p}..{q - 1} hold {part:,.0f} bytes of constants and states with no "
                               f"allowed cut between them, more than {cap:,.0f} (a stage's share of a chip)")
        if weight[start:q].sum() > cap:
            out.append(p)
            start = p
    return out


@dataclass
class PipelineCompiled(MultiChipCompiled):
    """A graph compiled as pipeline stages: ``parts[k]`` (its program extended with the hand-overs)
    runs on chip ``chips[k]``.  Inputs go to the stages that read them; each output is read from
    the chip that computes it."""

    parts: List[Compiled]
    chips: List[int]
    wires: List[Tuple[int, int, int, int]]
    stage_cycles: List[int]               # cycle each stage's program ends
    cuts: List[int]

    @property
    def expected_cycles(self) -> int:
        return max(self.stage_cycles)

    @property
    def inputs(self):
        out = {}
        for c in self.parts:
            out.update({k: v for k, v in c.inputs.items() if k != STAGE_IN})
        return out

    @property
    def outputs(self):
        out = {}
        for c in self.parts:
            out.update({k: v for k, v in c.outputs.items() if k != STAGE_OUT})
        return out

    def write_inputs(self, system, inputs: Dict[str, np.ndarray]) -> None:
        check_input_names(self.inputs, inputs)
        for chip, part in zip(self.chips, self.parts):
            if system.chips[chip] is not None:
                part.write_inputs(system.chips[chip], {k: v for k, v in inputs.items() if k in part.inputs},
                                  provided=(STAGE_IN,))

    def read_outputs(self, system) -> Dict[str, np.ndarray]:
        out = {}
        for chip, part in zip(self.chips, self.parts):
            for name, (shape, _d) in part.outputs.items():
                if name != STAGE_OUT and system.chips[chip] is not None:
                    out[name] = system.chips[chip].read_tensor(name).reshape(shape)
        return out

    def read_state(self, system, name: str) -> np.ndarray:
        for chip, part in zip(self.chips, self.parts):
            if name in part.states:
                return part.read_state(system.chips[chip], name)
        raise GraphError(f"read_state: no state named {name!r}")


def compile_pipeline(graph: Graph, system, chips: Optional[Sequence[int]] = None,
                     fill: float = 0.8) -> PipelineCompiled:
    """Cut ``graph`` into pipeline stages over ``chips`` of ``system`` (see the module doc)."""
    import lpucore

    from .c2c import chip_path
    from .pipeline import hand_over
    cfg = system.config
    link: Dict[Tuple[int, int], Tuple[int, int]] = {}
    for a, la, b, lb in system.wires:
        link.setdefault((a, b), (la, lb))
        link.setdefault((b, a), (lb, la))
    if chips is None:
        path = chip_path(system.n_chips, system.wires) if system.n_chips > 1 else []
        chips = [0] + [b for _, _, b, _ in path]
    chips = [int(c) for c in chips]
    cuts = plan_cuts(graph, fill * cfg.sram_bytes)
    n = len(cuts) + 1
    if n > len(chips):
        raise CompileError(f"the graph needs {n} pipeline stages of at most {fill:.0%} of a chip; "
                           f"{len(chips)} chips were given")
    chips = chips[:n]
    for a, b in zip(chips, chips[1:]):
        if (a, b) not in link:
            raise CompileError(f"pipeline stages on chips {a} and {b} need a direct link between them")
    live = cut_points(graph)
    bounds = [0] + cuts + [len(graph.nodes)]
    compiled = []
    for k in range(n):
        t_in = live[bounds[k]] if k > 0 else None
        t_out = live[bounds[k + 1]] if k + 1 < n else None
        compiled.append(lpucore.compile(stage_graph(graph, bounds[k], bounds[k + 1], t_in, t_out, k), cfg))
    parts, ends = [], []
    cur = compiled[0]
    for k in range(n):
        if k + 1 < n:
            la, lb = link[(chips[k], chips[k + 1])]
            prog, pb, end = hand_over(cur, STAGE_OUT, compiled[k + 1], STAGE_IN, la, lb)
            parts.append(dataclasses.replace(cur, program=prog))
            ends.append(cur.expected_cycles)
            cur = dataclasses.replace(compiled[k + 1], program=pb, expected_cycles=end)
        else:
            parts.append(cur)
            ends.append(cur.expected_cycles)
    return PipelineCompiled(parts, chips, list(system.wires), ends, cuts)
