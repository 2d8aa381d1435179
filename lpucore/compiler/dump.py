"""The program after each compiler stage, as text a person can read: :meth:`Compiled.dump
<lpucore.compiler.lower.Compiled.dump>`.

The compiler notes, as it goes, what each stage decided (:class:`Record`, filled by
:class:`~lpucore.compiler.lower.Compiler`); the text is made only when asked for.  The stages
(:data:`STAGES`):

* ``graph`` - the graph as compiled: inputs, states, constants, one line per operation (output,
  op, operands, shape, dtype, attributes), outputs and state updates.
* ``fused`` - which operations run as one kernel (:mod:`lpucore.compiler.fuse`): each kernel with
  the operations inlined into it, constants that became VXM immediates.
* ``placed`` - where every tensor the program keeps in MEM lives, in the order they were placed
  (graph tensors and the compiler's own temporaries, masks and tables): kind, dtype, rows x
  columns, hemisphere, bytes, the cycles its first and last vectors are ready and its last read (a
  weight's loads into the MXM are not counted as reads), and the {slice:first address} of each
  stripe of each byte plane.
* ``scheduled`` - one line per kernel, in order: op, output, first issue cycle, last landing cycle,
  instructions issued, per unit (and the queues of that unit used).
* ``emitted`` - the program: instructions per queue (NOP and Repeat included), and the first
  instructions of each queue in assembler syntax (:func:`lpucore.asm.disassemble` gives all).

Recording costs the scheduler's queue lengths before each kernel, one read of each instruction's
issue cycle, and a summary of each placed tensor: about 0.15 s of GPT-2-small's 30 s step compile
(0.5 %).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from ..errors import CompileError

STAGES = ("graph", "fused", "placed", "scheduled", "emitted")

# (tensor id, op, input ids, shape, dtype name, attributes)
NodeRow = Tuple[int, str, Tuple[int, ...], Tuple[int, ...], str, Dict[str, Any]]


@dataclass
class GraphRecord:
    """The graph as it was compiled (a copy of what the dump prints, not of the data)."""

    name: str
    inputs: List[Tuple[str, int, Tuple[int, ...], str]]          # (name, id, shape, dtype)
    states: List[Tuple[str, int, Tuple[int, ...], str]]
    constants: List[Tuple[Optional[str], int, Tuple[int, ...], str]]
    nodes: List[NodeRow]
    outputs: List[Tuple[str, int]]                               # (output name, tensor id)
    assigns: List[Tuple[int, int]]                               # (state id, value id)

    @classmethod
    def of(cls, g: Any) -> "GraphRecord":
        T = g.tensors

        def meta(tid: int) -> Tuple[Tuple[int, ...], str]:
            return tuple(T[tid].shape), T[tid].dtype.name
        return cls(g.name, [(n, t.id) + meta(t.id) for n, t in g.inputs.items()],
                   [(n, t.id) + meta(t.id) for n, t in g.states.items()],
                   [(g.constant_names.get(tid), tid) + meta(tid) for tid in g.constants],
                   [(n.output, n.op, tuple(n.inputs)) + meta(n.output) + (dict(n.attrs),) for n in g.nodes],
                   [(n, t.id) for n, t in g.outputs.items()], [(s, v.id) for s, v in g.assigns.items()])

    def labels(self) -> Dict[int, str]:
        """Tensor id -> how the dump names it: an input's, state's or constant's name, else %id."""
        out: Dict[int, str] = {}
        for name, tid, _, _ in self.inputs + self.states:
            out[tid] = name
        for cname, tid, _, _ in self.constants:
            out[tid] = cname or f"%{tid}"
        for row in self.nodes:
            out[row[0]] = f"%{row[0]}"
        return out


@dataclass
class KernelRow:
    """One kernel as scheduled: what it computes and the instructions it issued."""

    op: str
    output: str
    first: Optional[int]                    # first issue cycle (None: no instruction)
    last: Optional[int]                     # the cycle its last result lands (None: fused away)
    units: Dict[str, Tuple[int, int]]       # unit -> (instructions issued, queues used)

    @property
    def instructions(self) -> int:
        return sum(n for n, _ in self.units.values())


@dataclass
class Record:
    """What the compiler decided at each stage, kept for :func:`dump`."""

    graph: GraphRecord
    fused: Set[int] = field(default_factory=set)                  # deferred (fused) tensor ids
    immediates: Dict[int, float] = field(default_factory=dict)     # constant id -> its VXM immediate
    materialised: List[int] = field(default_factory=list)         # deferred, then written to MEM after all
    placements: List[Tuple[Any, ...]] = field(default_factory=list)     # placement rows (place_row)
    kernels: List[KernelRow] = field(default_factory=list)


def place_row(vt: Any, holds: Sequence[int], lanes: int) -> Tuple[Any, ...]:
    """A placed tensor (a :class:`~lpucore.compiler.memory.VT`) as a dump row: (name, kind, dtype
    name, rows, cols, hemisphere, [(slice, first address)] per byte plane, bytes, cycles its first
    and last vectors are ready, last read cycle (-1: no read recorded), graph tensor ids it holds)."""
    per = -(-vt.rows // vt.stripes) * vt.chunks
    stripes = [list(zip(vt.slices[p], vt.bases[p])) for p in range(vt.planes)]
    ready = (int(vt.ready.min()), int(vt.ready.max())) if len(vt.ready) else (0, 0)
    last = int(vt.last_read.max()) if len(vt.last_read) else -1
    return (vt.name, vt.kind, vt.dtype.name, vt.rows, vt.cols, vt.hem, stripes,
            per * vt.stripes * vt.planes * lanes, ready, last, tuple(holds))


class KernelLog:
    """Each kernel's instructions, from a scheduler's per-queue event lists (only appended to until
    emission sorts them): :meth:`start` before a kernel notes each queue's length, :meth:`stop`
    after it records the kernel's first issue cycle and its instructions and queues per unit
    (``unit_of``: a queue's functional unit).  That reads each instruction's issue cycle once."""

    def __init__(self, events: Dict[str, List[Tuple[int, str, tuple]]], rows: List[KernelRow],
                 unit_of: Callable[[str], str]):
        self.events = events
        self.rows = rows
        self.unit_of = unit_of
        self.units: Dict[str, str] = {}
        self.before: List[int] = []           # queue lengths, in the events' (insertion) order

    def start(self) -> None:
        self.before = [len(e) for e in self.events.values()]

    def stop(self, op: str, output: str, last: Optional[int]) -> None:
        """Record the kernel just lowered (``last``: the cycle its last result lands)."""
        before, units = self.before, self.units
        nb = len(before)
        counts: Dict[str, Tuple[int, int]] = {}
        first: Optional[int] = None
        for j, (q, evs) in enumerate(self.events.items()):
            n, k = len(evs), (before[j] if j < nb else 0)
            if n > k:
                u = units.get(q) or units.setdefault(q, self.unit_of(q))
                i, nq = counts.get(u, (0, 0))
                counts[u] = (i + n - k, nq + 1)
                f = min(map(itemgetter(0), evs[k:n]))
                first = f if first is None or f < first else first
        self.rows.append(KernelRow(op, output, first, None if last is None else int(last), counts))


def dump(compiled: Any, stage: str) -> str:
    """The text of ``compiled`` after ``stage`` (one of :data:`STAGES`, or ``"all"``)."""
    if stage == "all":
        return "\n".join(dump(compiled, s) for s in STAGES)
    if stage not in STAGES:
        raise CompileError(f"dump: unknown stage {stage!r}; the stages are {', '.join(STAGES)} (or 'all')")
    rec = compiled.record
    if rec is None and stage != "emitted":
        raise CompileError(f"dump({stage!r}): this program was not made by lpucore.compile (no record "
                           "of its stages); only 'emitted' is available")
    fn = {"graph": _graph, "fused": _fused, "placed": _placed, "scheduled": _scheduled, "emitted": _emitted}[stage]
    return fn(compiled, rec)


def _shape(shape: Sequence[int], d: str) -> str:
    return f"{d}[{', '.join(map(str, shape))}]"


def _attrs(a: Dict[str, Any]) -> str:
    return "".join(f", {k}={v!r}" for k, v in a.items())


def _graph(compiled: Any, rec: Record) -> str:
    """Stage "graph": inputs, states, constants, operations, outputs, state updates."""
    g = rec.graph
    lab = g.labels()
    out = [f"== graph {g.name!r}: {len(g.nodes)} operations"]
    for kind, rows in (("input", g.inputs), ("state", g.states)):
        out += [f"{kind:8s} {name} : {_shape(s, d)}" for name, _, s, d in rows]
    out += [f"const    {lab[tid]} : {_shape(s, d)}" for _, tid, s, d in g.constants]
    outs: Dict[int, List[str]] = {}
    for name, tid in g.outputs:
        outs.setdefault(tid, []).append(name)
    for tid, op, ins, s, d, attrs in g.nodes:
        tail = f"   -> output {', '.join(outs[tid])}" if tid in outs else ""
        out.append(f"{lab[tid]:>6s} = {op}({', '.join(lab[i] for i in ins)}{_attrs(attrs)}) : {_shape(s, d)}{tail}")
    for name, tid in g.outputs:
        out.append(f"output   {name} = {lab[tid]}")
    for sid, vid in g.assigns:
        out.append(f"assign   {lab[sid]} := {lab[vid]}")
    return "\n".join(out) + "\n"


def _fused(compiled: Any, rec: Record) -> str:
    """Stage "fused": each kernel and the operations inlined into it."""
    g = rec.graph
    lab = g.labels()
    ops = {row[0]: row for row in g.nodes}
    readers: Dict[int, int] = {}
    for row in g.nodes:
        for i in set(row[2]):
            readers[i] = readers.get(i, 0) + 1
    mat = set(rec.materialised)

    def inlined(tid: int, seen: set) -> List[int]:
        got: List[int] = []
        for i in ops[tid][2]:
            if i in rec.fused and i not in seen and i not in mat:
                seen.add(i)
                got += inlined(i, seen) + [i]
        return got
    kernels = [row for row in g.nodes if row[0] not in rec.fused or row[0] in mat]
    out = [f"== fused: {len(kernels)} kernels for {len(g.nodes)} operations "
           f"({len(rec.fused)} fused into their consumers)"]
    for tid, op, _ins, _s, _d, _a in kernels:
        parts = [f"{lab[i]} {ops[i][1]}" + (f" (recomputed by each of its {readers[i]} readers)"
                                            if readers.get(i, 0) > 1 else "") for i in inlined(tid, set())]
        note = "   [meant to be fused; written to MEM for a reader that cannot inline it]" if tid in mat else ""
        out.append(f"kernel {lab[tid]:>6s} {op}" + (f"  <- inlines {', '.join(parts)}" if parts else "") + note)
    if rec.immediates:
        out.append("immediates (one-element constants read as VXM operands): "
                   + ", ".join(f"{lab[t]}={v!r}" for t, v in rec.immediates.items()))
    return "\n".join(out) + "\n"


def _stripes(cfg: Any, planes: List[List[Tuple[int, int]]]) -> str:
    return " ".join("{" + ", ".join(f"{cfg.slice_name(s)}:{a:#x}" for s, a in p) + "}" for p in planes)


def _placed(compiled: Any, rec: Record) -> str:
    """Stage "placed": every tensor placed in MEM, in placement order."""
    cfg = compiled.config
    lab = rec.graph.labels()
    out = [f"== placed: {len(rec.placements)} tensors, peak {compiled.memory_bytes:,} bytes of MEM "
           f"({cfg.sram_bytes:,}); per byte plane, {{slice:first address}} of each stripe"]
    for name, kind, d, rows, cols, hem, planes, nbytes, ready, last, holds in rec.placements:
        held = [lab.get(t, f"%{t}") for t in holds]
        held_s = f" = {', '.join(held)}" if held and held != [name] else ""
        live = f"ready {ready[0]}..{ready[1]}, last read {last if last >= 0 else '-'}"
        out.append(f"{name}{held_s} : {kind} {_shape((rows, cols), d)} hem {'WE'[hem]} {nbytes:,} B, {live}  "
                   f"{_stripes(cfg, planes)}")
    deferred = sorted(rec.fused)
    if deferred:
        out.append("not in MEM (fused into their consumers): " + ", ".join(lab.get(t, f"%{t}") for t in deferred))
    return "\n".join(out) + "\n"


def _scheduled(compiled: Any, rec: Record) -> str:
    """Stage "scheduled": one line per kernel with its cycles, instructions and units."""
    out = [f"== scheduled: {len(rec.kernels)} kernels, {compiled.expected_cycles:,} cycles; "
           "per unit: instructions (queues)",
           f"{'#':>4s}  {'op':10s} {'output':14s} {'first':>8s} {'last':>8s} {'instr':>7s}  units"]
    for k, row in enumerate(rec.kernels):
        units = ", ".join(f"{u} {n} ({nq})" for u, (n, nq) in sorted(row.units.items()))
        first = "-" if row.first is None else str(row.first)
        last = "fused" if row.last is None else str(row.last)
        out.append(f"{k:4d}  {row.op:10s} {row.output:14s} {first:>8s} {last:>8s} "
                   f"{row.instructions:7d}  {units}".rstrip())
    return "\n".join(out) + "\n"


def _emitted(compiled: Any, rec: Optional[Record], excerpt: int = 3) -> str:
    """Stage "emitted": instructions per queue, and the first ``excerpt`` of each queue."""
    prog = compiled.program
    cfg = prog.config
    rows = []
    for q in cfg.queues:
        lst = prog.queues.get(q.name)
        if lst:
            mn = np.array([ins.op.mnemonic for ins in lst])
            rows.append((q.name, q.unit, len(lst), int((mn == "NOP").sum()), int((mn == "Repeat").sum()), lst))
    total = sum(r[2] for r in rows)
    out = [f"== emitted: {total:,} instructions on {len(rows)} queues, {compiled.expected_cycles:,} cycles "
           "(lpucore.disassemble(compiled.program) prints them all)",
           f"{'queue':10s} {'unit':4s} {'instr':>8s} {'NOP':>7s} {'Repeat':>7s}  first instructions"]
    for name, unit, n, nops, reps, lst in rows:
        head = "; ".join(ins.text(cfg) for ins in lst[:excerpt]) + ("; ..." if n > excerpt else "")
        out.append(f"{name:10s} {unit:4s} {n:8d} {nops:7d} {reps:7d}  {head}")
    return "\n".join(out) + "\n"


def kernel_cycles(kernels: Sequence[Tuple[str, str, Optional[int]]], total: int, label: Callable[[int], str],
                  tail: Tuple[str, str]) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Cycles of a program (``total``, its expected cycles) attributed to parts (``label(i)`` of kernel i)
    and operations, from ``Compiled.kernels`` ((op, output, last landing cycle or None) in order): a
    kernel's share is how far it pushes the latest landing cycle beyond every earlier kernel's (a kernel
    hidden under earlier ones costs nothing; a fused one, landing None, has no kernel and its consumer
    gets its cycles); what follows the last kernel goes to ``tail`` (part, operation)."""
    by_part: Dict[str, int] = {}
    by_op: Dict[str, int] = {}
    front = 0
    for i, (op, _name, last) in enumerate(kernels):
        if last is None or last <= front:
            continue
        d, front = int(last - front), int(last)
        lab = label(i)
        by_part[lab] = by_part.get(lab, 0) + d
        by_op[op] = by_op.get(op, 0) + d
    rest = int(total - front)
    if rest > 0:
        by_part[tail[0]] = by_part.get(tail[0], 0) + rest
        by_op[tail[1]] = by_op.get(tail[1], 0) + rest
    return by_part, by_op
