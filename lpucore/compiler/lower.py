"""Graph -> kernels -> scheduled program.

The compiler walks the graph in order, places every tensor in MEM (inputs and
constants first, each later tensor when its producer is scheduled, reusing the
space of tensors nobody will read again), and schedules each operation's
kernels on the shared reservation table, each vector as early as its operands
and free resources allow: independent operations overlap on their own.

Conventions the kernels keep: a tensor of shape [..., C] is ``rows x chunks``
vectors of 320 lanes; lanes past C in a row's last chunk are zero; a reduction's
result is *broadcast* (its value in every lane of its vector) until something
needs it plain.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

from .. import dtypes as dt
from ..config import ChipConfig
from ..errors import CompileError
from ..graph import Graph, GraphError, Node, Tensor
from ..program import Program
from . import conv, dump, elementwise, fuse, loaded, lower_more, registry, scatter
from .allreduce import allreduce_kernel
from .bounds import Bounds, graph_bounds
from .emit import expected_cycles
from .kernels import (
    Ctx,
    E,
    Expr,
    NeedsSplit,
    Piece,
    _chains,
    _PlaneState,
    cvt,
    lanemove_kernel,
    map_kernel,
)
from .memory import VT, Memory, RowView, TiledVT, place, release, stripe_length
from .schedule import Scheduler, paced_gc

F32, F16, I8, I16, I32 = dt.FLOAT32, dt.FLOAT16, dt.INT8, dt.INT16, dt.INT32
SQRT_2_OVER_PI = 0.7978845608028654

# Compiler.vts keys: a tensor's id, or a tuple naming a derived placement ("bcast", id), ("onehot", ...)
VTKey = Union[int, Tuple[Union[int, str], ...]]
# what a reduction applies to each chunk of a row first: (chunk's expression, row, chunk) -> expression
PreFn = Callable[[Expr, int, int], Expr]


@dataclass
class Compiled:
    """A compiled graph: the program, and how its inputs and outputs map to MEM."""

    program: Program
    graph_name: str
    inputs: Dict[str, Tuple[Tuple[int, ...], dt.DType]]
    outputs: Dict[str, Tuple[Tuple[int, ...], dt.DType]]
    constants: Dict[str, np.ndarray]                 # tensor-table name -> 2-d array written at load
    expected_cycles: int
    memory_bytes: int
    # (op, output, last landing cycle; None: fused into its consumer, never written to MEM)
    kernels: List[Tuple[str, str, Optional[int]]] = field(default_factory=list)
    states: Dict[str, Tuple[Tuple[int, ...], dt.DType]] = field(default_factory=dict)
    graph_bounds: Optional[Bounds] = None            # from the graph, at compile time
    # a weight constant kept as member tensors, one per MXM plane (TiledVT): its members' names and the
    # columns each holds; the tensor table has the members, ``constants`` the whole array
    tiles: Dict[str, List[Tuple[str, np.ndarray]]] = field(default_factory=dict)
    # a table kept for MEM Gather (compiler.gather): its members' names and the rows [r0, r1) and
    # columns [c0, c1) each holds; the tensor table has the members, ``constants`` the whole array
    row_parts: Dict[str, List[Tuple[str, int, int, int, int]]] = field(default_factory=dict)
    # what each compiler stage decided, for dump() (None: not made by the compiler)
    record: Optional[dump.Record] = field(default=None, repr=False, compare=False)
    # an input the host writes permuted: its axes in the order the program holds them (an NCHW image
    # read only by image operations is written channel-last, NHWC: lpucore.compiler.conv)
    input_axes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    # where each constant and state lives (tensor-table name -> VT), for a program compiled to share them
    # (compile_sharing); not saved with the program
    layout: Dict[str, VT] = field(default_factory=dict, repr=False, compare=False)
    # tensor-table entries at another program's addresses, holding its values (compile_sharing)
    shared: FrozenSet[str] = field(default_factory=frozenset, compare=False)

    def members(self, name: str) -> List[str]:
        """The tensor-table names constant ``name`` is held as (its tiles and row parts, else itself)."""
        held = [m for m, _ in self.tiles.get(name, ())] + [m[0] for m in self.row_parts.get(name, ())]
        return held or [name]

    def private_constants(self) -> List[str]:
        """The constants (names of :attr:`constants`) this program does not share with the one it was
        compiled against (``lpucore.compiler.api.compile_sharing``): what the host writes when it loads
        this program into a chip that holds the other's; every constant for a program sharing nothing."""
        return [n for n in self.constants if not all(m in self.shared for m in self.members(n))]

    @property
    def config(self) -> ChipConfig:
        return self.program.config

    def dump(self, stage: str) -> str:
        """The program after compiler stage ``stage``, as text: ``"graph"`` (operations, shapes,
        dtypes), ``"fused"`` (which operations run as one kernel), ``"placed"`` (each tensor's MEM
        slices, addresses, hemisphere, bytes and live cycles), ``"scheduled"`` (each kernel's first
        and last cycle, instructions and units), ``"emitted"`` (instructions per queue, the first of
        each in assembler syntax), or ``"all"``; CompileError for another stage
        (:mod:`lpucore.compiler.dump`)."""
        return dump.dump(self, stage)

    def save(self, path) -> None:
        """Write this compiled program (program, constants, tensor maps) to one file; read it back
        with :func:`lpucore.load_compiled` (:mod:`lpucore.compiler.store`)."""
        from .store import save
        save(self, path)

    def bounds(self) -> Bounds:
        """Lower bounds on this graph's cycles (weight streams, SRAM, compute, critical path;
        :mod:`lpucore.compiler.bounds`) and the schedule efficiency of this program against them."""
        if self.graph_bounds is None:
            raise CompileError("this Compiled was made without its graph: no bounds")
        return self.graph_bounds

    def load(self, chip) -> None:
        """Load the program and its constants into a chip."""
        chip.load(self.program)
        for name, arr in self.constants.items():
            self.write_constant(chip, name, arr)

    def write_constant(self, chip, name: str, arr: np.ndarray) -> None:
        """Write constant ``name`` (2-d, as in :attr:`constants`) into a chip running this program: a
        tiled weight goes to its member tensors; a column the program holds in every lane (one value
        per row) may be given as the graph's column."""
        shape = self.constants[name].shape
        arr = np.asarray(arr)
        if arr.size != int(np.prod(shape)) and arr.size == shape[0]:
            arr = np.repeat(arr.reshape(-1, 1), shape[1], axis=1)
        arr = arr.reshape(shape)
        for member, r0, r1, c0, c1 in self.row_parts.get(name, ()):
            chip.write_tensor(member, arr[r0:r1, c0:c1])           # a strided view: read in place
        for member, cols in self.tiles.get(name, ()):
            chip.write_tensor(member, arr, columns=cols)       # its tiles read in place
        if name not in self.tiles and name not in self.row_parts:
            chip.write_tensor(name, arr)

    def write_inputs(self, chip, inputs: Dict[str, np.ndarray], provided=()) -> None:
        """Write the inputs into the chip; ``provided``: inputs something else writes (a
        pipeline stage's input, handed over from the chip before)."""
        check_input_names({k: v for k, v in self.inputs.items() if k not in provided}, inputs)
        for name, (shape, d) in self.inputs.items():
            if name in provided:
                continue
            a = np.asarray(inputs[name])
            if a.shape != shape or a.dtype != d.numpy:
                raise GraphError(f"execute: input {name!r} must be {d.name}{list(shape)}, got {a.dtype}{list(a.shape)}")
            axes = self.input_axes.get(name)
            if axes is not None:
                # the program's rows: one pixel's channels, or several pixels' (packed a row)
                cols = self.program.tensors[name].shape[1]
                chip.write_tensor(name, np.ascontiguousarray(np.transpose(a, axes)).reshape(-1, cols))
                continue
            chip.write_tensor(name, a.reshape(_rows(shape), _cols(shape)))

    def read_state(self, chip, name: str) -> np.ndarray:
        """The current value of a state tensor (Graph.state) in a chip running this program."""
        if name not in self.states:
            raise GraphError(f"read_state: no state named {name!r}")
        shape, _ = self.states[name]
        return chip.read_tensor(name).reshape(shape)

    def read_outputs(self, chip) -> Dict[str, np.ndarray]:
        out = {}
        for name, (shape, _d) in self.outputs.items():
            out[name] = chip.read_tensor(name).reshape(shape)
        return out


def check_input_names(expected, inputs) -> None:
    """GraphError unless ``inputs`` names exactly the ``expected`` inputs."""
    missing = set(expected) - set(inputs)
    if missing:
        raise GraphError(f"execute: missing input(s) {', '.join(sorted(missing))}")
    extra = set(inputs) - set(expected)
    if extra:
        raise GraphError(f"execute: unknown input(s) {', '.join(sorted(extra))}")


def _remap(root: Expr, f: Callable[[int], int]) -> Expr:
    """A copy of root whose reads, for output vector v, take what they took for vector f(v)."""
    memo: Dict[int, Expr] = {}

    def rec(n: Expr) -> Expr:
        if id(n) not in memo:
            if n.op == "in":
                vt, idx = n.source()
                def composed(v: int, idx: Callable[[int], int] = idx) -> int:
                    return idx(f(v))
                memo[id(n)] = Expr.input(vt, composed)
            else:
                memo[id(n)] = Expr(n.op, n.dtype, tuple(rec(a) for a in n.args), dict(n.imm), n.src, n.min_t)
        return memo[id(n)]
    return rec(root)


def _const_index(k: int) -> Callable[[int], int]:
    """An index function reading vector k for every output vector."""
    return lambda v: k


def _rows(shape):
    return int(np.prod(shape[:-1])) if len(shape) > 1 else 1


def _cols(shape):
    return shape[-1] if shape else 1


def execute(compiled: Compiled, inputs: Dict[str, np.ndarray], engine: str = "fast", chip=None,
            fp16_mxm: str = "exact"):
    """Run a compiled graph: returns ({output name: array}, RunStats).

    Without ``chip``, the chip comes loaded from :mod:`lpucore.compiler.loaded`'s cache (the same
    program ran before: only the inputs are written) or is made and loaded, and goes back to the
    cache after the run; every call starts with the graph's states at their initial values. With
    ``chip`` (one this program is loaded on), that chip restarts at cycle 0, states as they are."""
    if chip is not None:
        chip.reset(clear_memory=False)
        compiled.write_inputs(chip, inputs)
        stats = chip.run()
        return compiled.read_outputs(chip), stats
    chip = loaded.take(compiled, engine, fp16_mxm)
    compiled.write_inputs(chip, inputs)
    stats = chip.run()
    outputs = compiled.read_outputs(chip)
    loaded.give_back(compiled, engine, fp16_mxm, chip)
    return outputs, stats


def _weight_of(n) -> Optional[int]:
    """The tensor node n has the MXM load as weights (its registry entry's ``weight_input``), or None."""
    w = registry.spec(n.op).weight_input
    return n.inputs[w] if w is not None and len(n.inputs) > 1 else None


def _placed_as(vt) -> List[VT]:
    """The tensors placed in MEM (by :meth:`Compiler.new_vt`) that hold vt: a RowView's parent, a
    tiled weight's or gathered table's members, else vt itself."""
    if getattr(vt, "parent", None) is not None:
        return [vt.parent]
    members = getattr(vt, "members", None)
    return [getattr(m, "vt", m) for m in members] if members else [vt]


def _f32(value: float) -> Expr:
    """A float32 constant operand."""
    return Expr.const(F32, value)


def _same(e: Expr) -> Expr:
    return e


def _replaced(n: Expr, sub: Expr, rep: Expr, memo: Dict[int, Expr]) -> Expr:
    """Expression n with the subexpression ``sub`` replaced by ``rep`` (shared nodes stay shared:
    ``memo`` maps a node's id to its copy)."""
    if n is sub:
        return rep
    if id(n) in memo:
        return memo[id(n)]
    c = Expr(n.op, n.dtype, tuple(_replaced(a, sub, rep, memo) for a in n.args), dict(n.imm), n.src, n.min_t)
    memo[id(n)] = c
    return c


class Compiler:
    # a chip of a tensor-parallel group (set by lpucore.compiler.collective.compile_group)
    rank: int
    group: int
    send_links: List[int]                   # the link of each send slot
    recv_links: List[int]                   # the link of each receive slot
    link_ready: Optional[int]               # first cycle the links are deskewed (None: not yet)
    link_free: int                          # first cycle the next collective may send
    recv_after: List[int]                   # last receive cycle of each slot

    def __init__(self, graph: Graph, cfg: ChipConfig):
        self.source = graph                       # as given (its bounds); self.g: images rewritten
        graph, self.input_axes = conv.rewrite(graph, cfg.lanes)
        self.g = graph
        self.cfg = cfg
        self.sched = Scheduler(cfg)
        self.ctx = Ctx(cfg, self.sched)
        self.mem = Memory(cfg)
        self.vts: Dict[VTKey, VT] = {}
        self.scalars: Dict[int, float] = {}
        self.tables: List[Tuple[str, VT]] = []
        self.out_vts: Dict[str, VT] = {}          # graph outputs placed, their producers still to come
        self.constants: Dict[str, np.ndarray] = {}
        self.tiles: Dict[str, List[Tuple[str, np.ndarray]]] = {}    # tiled weight -> its members' columns
        self.row_parts: Dict[str, List[Tuple[str, int, int, int, int]]] = {}     # gathered table -> members
        self.masks: Dict[Tuple[Union[int, str], ...], VT] = {}
        self.replicas: Dict[Tuple[str, int], VT] = {}      # (one-row constant, ALU set) -> its copy (elementwise)
        self.span_masks: Dict[Tuple[int, int, int], List[VT]] = {}
        self.rope_tables: Dict[Tuple[int, int, float], Tuple[Tensor, Tensor]] = {}   # cos, sin by (rows, d, base)
        self.pinned: Dict[str, VT] = {}            # another program's constants and states (share)
        self.shared: Set[str] = set()              # ... this program placed at their addresses
        self.uses: Dict[int, int] = {}
        self.aliases: Dict[int, int] = {}     # tensor -> the tensor whose placement it shares (alias)
        # fusion (lpucore.compiler.fuse): tensors not written to MEM, and the builders of
        # those whose consumer is still to be lowered
        self.fuse = fuse.ENABLED
        self.defer: Set[int] = set()
        self.deferred: Dict[int, Callable[[], Expr]] = {}
        self.stripe_hints: Dict[str, int] = {}     # tensor name -> stripes (image_stripes)
        self.clear_hints: Dict[str, Set[int]] = {}  # tensor name -> slices to keep off (weights_clear)
        self.readers: Dict[int, List[Node]] = {}   # tensor id -> the nodes reading it (count_uses)
        self.kernels: List[Tuple[str, str, Optional[int]]] = []
        self.placed: List[VT] = []                # every tensor placed, in order (for dump)
        self.record = dump.Record(dump.GraphRecord.of(graph))
        self.hem = 0
        self.temps: List[VT] = []
        self.planes: Dict[int, _PlaneState] = {}  # MXM plane -> its scheduling state
        self._scratch = 0                          # ids of compiler-made tensors: -1, -2, ...
        self.reserve_scatter = False               # place scatter constants before lowering (api.compile)
        self.written_in_place: Set[int] = set()    # slices of states written in place (outputs keep off them)
        self.L = cfg.lanes
        self.n_alu = cfg.vxm_alus_per_lane

    # ---- tensors -------------------------------------------------------------------------------
    def scratch_id(self) -> int:
        """A fresh (negative) id for a tensor the compiler makes itself; never a graph tensor's."""
        self._scratch -= 1
        return self._scratch

    def next_hem(self) -> int:
        self.hem ^= 1
        return self.hem

    def new_vt(self, name, d, shape, kind="temp", cols=None, avoid=(), stripes=8, hem=None, strict=False,
               pow2=False, spare=0, stripe_divides=0, min_stripes=1) -> VT:
        """Place a tensor (see memory.place); ``strict``: in hemisphere ``hem`` or nowhere; ``pow2``:
        striped over a power of two of slices with ``spare`` addresses after each stripe (a target of MEM
        ``Scatter``), dividing ``stripe_divides`` when given (blocks of rows: :mod:`.blocks`)."""
        rows = _rows(shape)
        c = _cols(shape) if cols is None else cols
        stripes = self.stripe_hints.get(name, stripes)
        avoid = tuple(avoid) + tuple(sorted(self.clear_hints.get(name, ())))
        if name in self.pinned and kind in ("const", "state"):
            vt = self._pinned_vt(name, d, rows, c, kind, pow2, spare)
            if vt is not None:
                self.placed.append(vt)
                self.tables.append((name, vt))
                return vt
        reserved = self.out_vts.pop(name, None) if kind == "output" else None
        if kind == "output":
            # off the slices of caches written in place: their writes may run after the output is done, and
            # a pipeline stage hands its output over as soon as it is written (compiler.pipeline.hand_over)
            avoid = tuple(avoid) + tuple(self.written_in_place)
        try:
            vt = self._place(name, d, rows, c, kind, avoid, stripes, hem, strict, pow2, spare, stripe_divides,
                             min_stripes)
        except CompileError:
            # no room where the producer would like it: the space reserved for the output
            if reserved is None or (reserved.dtype, reserved.rows, reserved.cols) != (d, rows, c):
                raise
            return reserved
        self.placed.append(vt)
        if reserved is not None:
            self.placed.remove(reserved)
            self.tables = [(n, v) for n, v in self.tables if v is not reserved]
            release(self.mem, reserved)
        if kind in ("input", "const", "output", "state"):
            self.tables.append((name, vt))
        return vt

    def share(self, base: Compiled, exclude: FrozenSet[str] = frozenset()) -> None:
        """Before :meth:`run`: keep every address ``base`` holds a constant or state at out of this program's
        reach, and place this program's constant or state of the same name, dtype and width at the same
        addresses (a state of fewer rows, striped over a power of two of slices, as the first rows of
        ``base``'s: row r of either lies at the same address). Both programs can then be loaded into one
        chip in turn, the shared tensors written once (:func:`compile_sharing`). The names in ``exclude`` are
        kept out of reach but not shared (a constant of the same name holding other values)."""
        for name, vt in base.layout.items():
            per = stripe_length(vt.rows, vt.stripes, vt.chunks, vt.spare)
            for p in range(vt.planes):
                for g, a in zip(vt.slices[p], vt.bases[p]):
                    self.mem.reserve(g, a, per)
            if name not in exclude:
                self.pinned[name] = vt

    def _pinned_vt(self, name, d, rows, c, kind, pow2, spare) -> Optional[VT]:
        """``name`` at the addresses of :attr:`pinned`'s tensor of that name, or None when it differs (then it
        is placed as any tensor is, in space the other program does not hold)."""
        pv = self.pinned[name]
        if (pv.dtype, pv.cols, pv.kind, pv.spare) != (d, c, kind, spare):
            return None
        # fewer rows: only a scatter target's (a power of two of stripes: row r's address does not
        # depend on the row count; its sink then lies in the other's later rows, which are written
        # before they are read)
        if rows != pv.rows and not (pow2 and rows < pv.rows and pv.stripes & (pv.stripes - 1) == 0):
            return None
        self.shared.add(name)
        return VT(name, d, rows, c, pv.chunks, pv.hem, pv.slices, pv.bases,
                  [[0] * len(b) for b in pv.bases], kind, spare=spare)

    def _place(self, name, d, rows, c, kind, avoid, stripes, hem, strict=False, pow2=False, spare=0,
               stripe_divides=0, min_stripes=1) -> VT:
        """Place a tensor away from the slices in avoid if there is room, else anywhere."""
        try:
            return place(self.mem, name, d, rows, c, self.L, self.next_hem() if hem is None else hem, kind=kind,
                         avoid=tuple(avoid), stripes=stripes, strict=strict, pow2=pow2, spare=spare,
                         stripe_divides=stripe_divides, min_stripes=min_stripes)
        except CompileError:
            if not avoid:
                raise
            return place(self.mem, name, d, rows, c, self.L, hem if strict else self.hem, kind=kind,
                         stripes=stripes, strict=strict, pow2=pow2, spare=spare, stripe_divides=stripe_divides,
                         min_stripes=min_stripes)

    def place_gather_tables(self) -> None:
        """Constants read only as gathered tables, by few indices, kept for MEM Gather
        (:mod:`.gather`), placed first: each block of rows wants a slice's addresses to itself."""
        from .gather import MAX_INDICES, place_table
        g = self.g
        for tid, arr in g.constants.items():
            users = [n for n in g.nodes if tid in n.inputs]
            if (arr.ndim != 2 or not users or any(n.op != "gather" or n.inputs[0] != tid or tid in n.inputs[1:]
                                                  or g.tensors[n.inputs[1]].size > MAX_INDICES for n in users)):
                continue
            name = g.constant_names.get(tid) or f"_c{tid}"
            table = place_table(self, name, np.asarray(arr))
            if table is not None:
                self.vts[tid] = table          # type: ignore[assignment]  # read only by gather()

    def place_outputs(self) -> None:
        """Reserve space for every graph output before any temporary is placed, as for the
        inputs: a large output (a model's logits) then never depends on how fragmented the
        space of dead temporaries has become by the time its producer is lowered.  The
        producer still places its output as it would (away from its operands' slices) and
        takes the reserved space only if that finds no room (:meth:`new_vt`)."""
        for name, t in self.g.outputs.items():
            self.out_vts[name] = self.new_vt(name, t.dtype, t.shape, kind="output")

    def const_vt(self, name, arr2d: np.ndarray, stripes=8, hem=None) -> VT:
        vt = self.new_vt(name, dt.get(arr2d.dtype), arr2d.shape, kind="const", stripes=stripes, hem=hem)
        self.constants[name] = np.ascontiguousarray(arr2d)
        return vt

    def _weight_piece(self, name: str, d: dt.DType, shape: Tuple[int, int], stripes: int, hem: int,
                      avoid: Set[int]) -> VT:
        """A piece of a weight one plane loads (a tiled weight's member or a run of rows): in hemisphere
        ``hem`` on all ``stripes`` slices (the rows of one LW cycle), clear of ``avoid`` (the slices the
        other planes load from at the same time: two stripes on one slice share its one read a cycle);
        where that finds no room, on the avoided slices too, and failing that as any tensor is placed."""
        try:
            return self.new_vt(name, d, shape, kind="const", stripes=stripes, hem=hem, strict=True, avoid=avoid,
                               min_stripes=stripes)
        except CompileError:
            return self.new_vt(name, d, shape, kind="const", stripes=stripes, hem=hem)

    def weight_vt(self, name: str, arr2d: np.ndarray, split: Optional[List[Tuple[int, int, int, int]]] = None) -> VT:
        """A constant the MXM loads as weights: one row per slice in each LW cycle (int8: 16 slices;
        float16: 8 slices of two byte planes), and with several column tiles, one member tensor per
        MXM plane (:class:`~lpucore.compiler.memory.TiledVT`: the planes load in parallel). ``split``
        (``lower_more.weight_split``: (plane slot j, column tile, first chunk, end chunk)) keeps the last tiles
        as runs of rows instead, run j beside member j (``row_parts``: the tensor table has them)."""
        d = dt.get(arr2d.dtype)
        lw = self.cfg.mxm_lw_streams
        stripes = max(1, lw // d.nbytes) if d.nbytes <= 2 else lw
        K, N = arr2d.shape
        tiles = -(-N // self.L)
        whole = tiles - len({nt for _, nt, _, _ in split or ()})
        G = min(self.cfg.mxm_planes, whole)
        if G == 1 and not split:
            return self.const_vt(name, arr2d, stripes=stripes)
        members: List[VT] = []
        parts = []
        for j in range(G):
            cols = np.concatenate([np.arange(c * self.L, min((c + 1) * self.L, N)) for c in range(j, whole, G)])
            members.append(self._weight_piece(f"{name}@{j}", d, (K, len(cols)), stripes, self.next_hem(),
                                              self.slices_of(*members)))
            parts.append((f"{name}@{j}", cols))
        self.constants[name] = np.ascontiguousarray(arr2d)
        self.tiles[name] = parts
        runs: List[Tuple[int, int, int, VT, int]] = []
        for j, nt, k0, k1 in split or ():
            r0, r1, c0, c1 = k0 * self.L, min(k1 * self.L, K), nt * self.L, min((nt + 1) * self.L, N)
            # beside member j, clear of the slices the other planes read at the same time
            others = self.slices_of(*[m for i, m in enumerate(members) if i != j % G],
                                    *[pv for _, _, _, pv, i in runs if i != j])
            pv = self._weight_piece(f"{name}@k{nt}.{k0}", d, (r1 - r0, c1 - c0), stripes, members[j % G].hem,
                                    others)
            runs.append((nt, r0, r1, pv, j))
            self.row_parts.setdefault(name, []).append((pv.name, r0, r1, c0, c1))
        return TiledVT(name, members, N, self.L, runs)

    def mask(self, n: int, w: int) -> VT:
        """A constant vector whose first n lanes are all-ones bytes in each of w planes."""
        key = (n, w)
        if key not in self.masks:
            d = {1: I8, 2: I16, 4: I32}[w]
            m = np.zeros((1, self.L), dtype=d.numpy)
            m[0, :n] = -1
            self.masks[key] = self.const_vt(f"_mask{n}x{w}", m)
        return self.masks[key]

    def vt(self, t: Tensor) -> VT:
        if t.id not in self.vts:
            raise CompileError(f"internal: tensor {t} has no placement")
        return self.vts[t.id]

    def is_scalar(self, t: Tensor) -> bool:
        return t.id in self.scalars

    # ---- operands with NumPy broadcasting ----------------------------------------------------------
    def operand(self, t: Tensor, out_shape, as_dtype: Optional[dt.DType] = None) -> Expr:
        """An expression reading t for every vector of a tensor of out_shape."""
        d = as_dtype or t.dtype
        if self.is_scalar(t):
            return cvt(Expr.const(t.dtype, self.scalars[t.id]), d)
        if t.id in self.deferred:
            # a fused producer: its expression, read vector for vector (fuse.deferrable); one
            # row broadcast over the output's rows reads that row's vectors for every row
            e = self.deferred[t.id]()
            C = -(-_cols(out_shape) // self.L) if len(out_shape) else 1
            if _rows(t.shape) == 1 and len(out_shape) and _rows(out_shape) > 1:
                e = _remap(e, lambda v: v % C)
            elif _cols(t.shape) == 1 and C > 1:
                # one value per row, held in every lane (fuse: "lanes"), read by each vector of its row
                e = _remap(e, lambda v: v // C)
            return cvt(e, d)
        vt = self.vt(t)
        in_shape = t.shape
        nd = len(out_shape)
        ish = (1,) * (nd - len(in_shape)) + tuple(in_shape)
        rows_in = _rows(ish) if nd else 1
        lead_in = ish[:-1] if nd else ()
        lead_out = tuple(out_shape[:-1]) if nd else ()
        rowmap = np.broadcast_to(np.arange(rows_in).reshape(lead_in or (1,)), lead_out or (1,)).ravel() \
            if lead_out else np.zeros(1, dtype=np.int64)
        C_out = -(-_cols(out_shape) // self.L)
        c_in, c_out = _cols(ish), _cols(out_shape)
        idx: Callable[[int], int]
        if c_in == c_out:
            def same_cols(v: int, rm=rowmap, C=C_out, Ci=vt.chunks) -> int:
                return int(rm[v // C]) * Ci + v % C
            idx = same_cols
        elif c_in == 1:
            if not vt.bcast:
                vt = self.broadcast_lanes(t)

            def one_col(v: int, rm=rowmap, C=C_out) -> int:
                return int(rm[v // C])
            idx = one_col
        else:
            raise CompileError(f"internal: cannot broadcast {list(t.shape)} to {list(out_shape)}")
        return cvt(Expr.input(vt, idx), d)

    def broadcast_lanes(self, t: Tensor) -> VT:
        """A copy of a [..., 1] tensor with its value in every lane (sum of a one-lane row)."""
        key = ("bcast", t.id)
        if key in self.vts:
            return self.vts[key]
        src = self.vts[t.id]
        out = self.new_vt(f"_bc{t.id}", src.dtype if src.dtype.is_float or src.dtype == I32 else I32, t.shape)
        acc_d = out.dtype
        self.uses[t.id] = self.uses.get(t.id, 0) + 1

        def row(r: int) -> Expr:
            return cvt(Expr.input(src, lambda v: r), acc_d)
        allreduce_kernel(self.ctx, row, out, "add", list(range(self.n_alu)))
        self.vts[key] = out
        if out.dtype != src.dtype:
            back = self.new_vt(f"_bc{t.id}b", src.dtype, t.shape)
            map_kernel(self.ctx, cvt(Expr.input(out, lambda v: v), src.dtype), back)
            back.bcast = True
            self.vts[key] = back
            return back
        return out

    # ---- compile -------------------------------------------------------------------------------------
    def run(self) -> Compiled:
        """Compile the whole graph (one chip: a collective operation is an error)."""
        with paced_gc():
            for n, _t, _name, _kind in self.steps():
                raise CompileError(f"{n.op}: a collective operation needs a system of chips "
                                   "(lpucore.compile(graph, system=...))")
        return self.result

    def steps(self):
        """The compilation as a generator: it yields ``(node, tensor, name, kind)`` at each
        collective operation (all-gather / all-reduce across chips) and expects the
        node's last landing cycle back through ``send`` once the caller has lowered it
        on every chip of the group (:mod:`lpucore.compiler.collective`).  The
        :class:`Compiled` result is left in :attr:`result`."""
        g = self.g
        registry.check_graph(g)
        self.defer = fuse.deferrable(g) if self.fuse else set()
        log = dump.KernelLog(self.sched.events, self.record.kernels, lambda q: self.cfg.queue(q).unit)
        self.count_uses()
        self.row_views = self.concat_parts()
        self.place_inputs_and_states()
        self.place_gather_tables()
        self.place_constants()
        self.place_outputs()
        if self.reserve_scatter:    # constants lowering would make, while no temporary has taken their space
            scatter.reserve(self)
        out_names = {t.id: name for name, t in g.outputs.items()}
        self.stripe_hints = self.image_stripes(out_names)
        self.clear_hints = self.weights_clear(out_names)
        for n in g.nodes:
            t = g.tensors[n.output]
            kind = "output" if n.output in out_names else "temp"
            name = out_names.get(n.output, f"_t{n.output}")
            if n.output in self.defer:
                # inlined where its one consumer reads it; its inputs stay placed until then
                self.deferred[n.output] = self.builder(n, t)
                self.kernels.append((n.op, name, None))
                self.record.kernels.append(dump.KernelRow(n.op, name, None, None, {}))
                continue
            log.start()
            co = self.co_slices(n.output) if self.many_vectors(t) else set()
            # off at most a hemisphere's worth of slices: more crowds the rest (on the small chip a
            # later tensor that must sit in one hemisphere then found no room)
            if 0 < len(co) <= self.cfg.mem_slices_per_hemisphere:
                self.clear_hints[name] = self.clear_hints.get(name, set()) | co
            if registry.spec(n.op).collective:
                last = yield n, t, name, kind
            else:
                last = self.lower(n, t, name, kind)
            log.stop(n.op, name, last)
            self.kernels.append((n.op, name, last))
            self.consume(n)
        self.copy_outputs(log)
        self.assign_states(log)
        self.finish_record()
        self.result = self.finish_program()

    def image_stripes(self, out_names: Dict[int, str]) -> Dict[str, int]:
        """Stripes for the images max pools read all taps of at once (:func:`.conv.window_stripes`),
        by the name :meth:`new_vt` places them under."""
        most = self.cfg.mem_slices_per_hemisphere
        hints: Dict[str, int] = {}
        for n in self.g.nodes:
            if n.op == "window" and n.attrs.get("pads") == "repeat":
                x = self.g.tensors[n.inputs[0]]
                hints[out_names.get(x.id, f"_t{x.id}")] = conv.window_stripes(n, most // x.dtype.nbytes)
        return hints

    def weights_clear(self, out_names: Dict[int, str]) -> Dict[str, Set[int]]:
        """Slices the image a convolution reads its taps from keeps off (by the name :meth:`new_vt` places
        it under): its weights'. A weight load reads a row from each of the weights' slices every cycle
        while the other planes' products read the image's rows; an image on one of those slices makes
        the load wait for a cycle that slice is not read (a gap in the products), so each tap's load came
        after the block's products instead of beside them."""
        hints: Dict[str, Set[int]] = {}
        for n in self.g.nodes:
            x, w = n.inputs[0], n.inputs[-1]
            if n.op != "conv_taps" or w not in self.vts or x not in self.g.producer:
                continue
            hints.setdefault(out_names.get(x, f"_t{x}"), set()).update(self.slices_of(self.vts[w]))
        return hints

    def many_vectors(self, t: Tensor) -> bool:
        """t has at least as many vectors as a hemisphere has slices: a kernel over it runs long enough
        for its operands' slices to matter (:meth:`co_slices`; a collision staggers about a cycle a
        vector), where keeping a few vectors off other tensors' slices gains a few cycles and narrows
        where they can go (on a small chip, crowding a later tensor that must sit in one hemisphere)."""
        return _rows(t.shape) * -(-_cols(t.shape) // self.L) >= self.cfg.mem_slices_per_hemisphere

    def co_slices(self, tid: int) -> Set[int]:
        """Slices of the placed tensors that the elementwise kernels reading tid (through deferred
        results) read beside it: tid kept off them, such a kernel reads its operands' vectors in one
        cycle instead of staggering its chain around a slice that holds two of them (a slice reads one
        vector a cycle); a residual block's requantisation reads the product, the shortcut and the
        per-channel constants of every vector."""
        g = self.g
        roots: List[Node] = []
        stack, seen = [tid], {tid}
        while stack:
            for n in self.readers.get(stack.pop(), ()):
                if n.output in self.defer:
                    if n.output not in seen:
                        seen.add(n.output)
                        stack.append(n.output)
                elif fuse.is_elementwise(n):
                    roots.append(n)
        leaves: Set[int] = set()
        for r in roots:
            for n in [r] + [g.producer[i] for i in fuse.inlined_by(g, r, self.defer)]:
                leaves.update(i for i in n.inputs if i not in self.defer)
        leaves = {i for i in leaves if i != tid and i in self.vts and i not in self.scalars}
        return self.slices_of(*[self.vts[i] for i in sorted(leaves)])

    def count_uses(self) -> None:
        """Readers per tensor; graph outputs and assigned values count as always in use."""
        g = self.g
        for n in g.nodes:
            for i in n.inputs:
                self.uses[i] = self.uses.get(i, 0) + 1
            for i in set(n.inputs):
                self.readers.setdefault(i, []).append(n)
        for t in g.outputs.values():
            self.uses[t.id] = self.uses.get(t.id, 0) + 10 ** 9
        for v in g.assigns.values():
            self.uses[v.id] = self.uses.get(v.id, 0) + 10 ** 9

    def place_inputs_and_states(self) -> None:
        """MEM places for the graph's inputs and states (a state's initial value is written with the
        constants; a state written in place by MEM Scatter is striped over a power of two of slices:
        :mod:`lpucore.compiler.scatter`)."""
        g = self.g
        for name, t in g.inputs.items():
            self.vts[t.id] = self.new_vt(name, t.dtype, t.shape, kind="input")
        for name, t in g.states.items():
            here = scatter.in_place(g, t.id)
            # a cache the MXM loads as weights (lpucore.llm.tiled): a slice per LW stream, as weight_vt's
            stripes = self.cfg.mxm_lw_streams if here and scatter.read_as_weights(g, t.id) else 8
            self.vts[t.id] = self.new_vt(name, t.dtype, t.shape, kind="state", pow2=here, spare=int(here),
                                         stripe_divides=scatter.block_rows(g, t.id) if here else 0, stripes=stripes)
            if here:
                self.written_in_place |= self.slices_of(self.vts[t.id])
            arr = g.state_init[t.id]
            self.constants[name] = np.ascontiguousarray(arr.reshape(_rows(arr.shape), _cols(arr.shape)))

    def place_constants(self) -> None:
        """Constants: VXM immediates (one value read only elementwise), per-row values written in
        every lane, matmul weights striped for LW, the rest as plain vectors."""
        g = self.g
        weight_ids = {_weight_of(n) for n in g.nodes}
        # matmul weights first, the largest first: each plane's share of a product's weights wants slices
        # of its own (two stripes on a slice share its one read a cycle), which the space left by many
        # smaller tensors seldom has for the largest ones (a model's head)
        order = sorted(g.constants.items(),
                       key=lambda kv: (kv[0] not in weight_ids, -kv[1].nbytes if kv[0] in weight_ids else 0))
        for tid, arr in order:
            if tid in self.vts:
                continue
            # a one-element constant read only by elementwise operations becomes an
            # immediate of the VXM instead of a vector in MEM
            if (arr.size == 1 and self.uses.get(tid, 0) < 10 ** 9
                    and all(registry.spec(n.op).scalar_operands for n in g.nodes if tid in n.inputs)):
                self.scalars[tid] = arr.reshape(()).item()
                continue
            name = g.constant_names.get(tid) or f"_c{tid}"
            if (arr.ndim >= 2 and arr.shape[-1] == 1 and arr.size <= self.cfg.addresses_per_slice
                    and all(registry.spec(n.op).scalar_operands for n in g.nodes if tid in n.inputs)):
                # one value per row, read only elementwise: written with the value in every lane
                # (what broadcast_lanes would compute on the chip with a lane reduction per row)
                vt = self.const_vt(name, np.repeat(arr.reshape(-1, 1), self.L, axis=1))
                vt.bcast = True
                self.vts[tid] = vt
                continue
            # weights of a matmul (or a gathered table: weights of a one-hot product) get more stripes: an
            # LW cycle loads one row per stripe
            weights = tid in weight_ids
            arr2 = arr.reshape(_rows(arr.shape), _cols(arr.shape))
            self.vts[tid] = (self.weight_vt(name, arr2, lower_more.weight_split(self, g, tid)) if weights
                             else self.const_vt(name, arr2))

    def copy_outputs(self, log: dump.KernelLog) -> None:
        """Graph outputs that are inputs or constants, and a tensor's second output name: copies."""
        g = self.g
        for name, t in g.outputs.items():
            if t.id in self.vts and self.vts[t.id].kind == "output" and self.vts[t.id].name == name:
                continue
            out = self.new_vt(name, t.dtype, t.shape, kind="output")
            log.start()
            if self.is_scalar(t):
                last = map_kernel(self.ctx, Expr.const(t.dtype, self.scalars[t.id]), out)
            else:
                src = self.vt(t)
                last = map_kernel(self.ctx, E("mov", t.dtype, Expr.input(src, lambda v: v)), out)
            log.stop("copy", name, last)
            if t.id not in self.vts or self.vts[t.id].kind != "output":
                self.vts[t.id] = out

    def assign_states(self, log: dump.KernelLog) -> None:
        """state := value, after every read of the state in this run."""
        g = self.g
        for sid, v in g.assigns.items():
            st = self.vts[sid]
            if v.id == sid or self.vts.get(v.id) is st:       # unchanged, or written in place (scatter)
                continue
            done = int(st.last_read.max()) + 1 if len(st.last_read) else 0
            st.after = [[max(a, done) for a in plane] for plane in st.after]
            log.start()
            if self.is_scalar(v):
                last = map_kernel(self.ctx, Expr.const(st.dtype, self.scalars[v.id]), st)
            else:
                src = self.vt(v)
                if src.bcast:
                    src = self.plain(v)
                last = map_kernel(self.ctx, E("mov", st.dtype, Expr.input(src, lambda i: i)), st)
            log.stop("assign", st.name, last)

    def finish_program(self) -> Compiled:
        """Emit the schedule, describe the tensors and check the program."""
        g = self.g
        prog = Program(self.cfg)
        self.sched.emit(prog)
        for name, vt in self.tables:
            prog.add_tensor(name, vt.dtype, (vt.rows, vt.cols), vt.extents())
        prog.validate()
        cycles = expected_cycles(prog)
        return Compiled(prog, g.name, {n: (self.source.inputs[n].shape, t.dtype) for n, t in g.inputs.items()},
                        {n: (t.shape, t.dtype) for n, t in g.outputs.items()}, self.constants,
                        cycles, self.mem.peak_bytes(), self.kernels,
                        {n: (t.shape, t.dtype) for n, t in g.states.items()},
                        graph_bounds(self.source, self.cfg, cycles), self.tiles, self.row_parts, self.record,
                        dict(self.input_axes),
                        {n: vt for n, vt in self.tables if vt.kind in ("const", "state")}, frozenset(self.shared))

    def finish_record(self) -> None:
        """Note the fusion and placement decisions in :attr:`record` (for :meth:`Compiled.dump`)."""
        rec, n_t = self.record, len(self.g.tensors)
        rec.fused = set(self.defer)
        rec.immediates = dict(self.scalars)
        holds: Dict[int, List[int]] = {}
        for tid, vt in self.vts.items():
            if isinstance(tid, int) and 0 <= tid < n_t:
                for v in _placed_as(vt):
                    holds.setdefault(id(v), []).append(tid)
        rec.placements = [dump.place_row(vt, holds.get(id(vt), ()), self.L) for vt in self.placed]
        self.placed = []

    def concat_parts(self) -> Dict[int, Tuple[Tensor, int]]:
        """Parts of concatenations of whole rows (along an axis every axis before which has size 1, not the
        last: each part is a run of the result's rows) that their producers, elementwise kernels or matmuls,
        write in place, in the concatenation's tensor: part id -> (concatenation, its first row). Only when
        every part qualifies: made so, read by nothing else, not deferred, not an output."""
        g = self.g
        views: Dict[int, Tuple[Tensor, int]] = {}
        for n in g.nodes:
            t = g.tensors[n.output]
            if n.op != "concat" or t.ndim < 2 or len(set(n.inputs)) != len(n.inputs):
                continue
            ax = n.attrs["axis"] % t.ndim
            if ax == t.ndim - 1 or any(d != 1 for d in t.shape[:ax]):
                continue
            if self.uses.get(t.id, 0) >= 10 ** 9 or t.id in self.defer:
                continue
            parts, first = {}, 0
            for i in n.inputs:
                x = g.tensors[i]
                p = g.producer.get(i)
                if (p is None or self.uses.get(i) != 1 or i in self.defer or x.dtype != t.dtype
                        or (p.op != "matmul" and self.builder(p, x) is None)):
                    break
                parts[i] = (t, first)
                first += _rows(x.shape)
            else:
                views.update(parts)
        return views

    def part_vt(self, t: Tensor, avoid=()) -> Optional[VT]:
        """t's rows of the concatenation it is a part of (:meth:`concat_parts`), placed with its first part;
        None when t is not such a part."""
        if t.id not in self.row_views:
            return None
        whole, first = self.row_views[t.id]
        if whole.id not in self.vts:
            self.vts[whole.id] = self.new_vt(f"_t{whole.id}", whole.dtype, whole.shape, avoid=avoid)
        return RowView(self.vts[whole.id], first, _rows(t.shape))

    def alias(self, t: Tensor, x: Tensor) -> int:
        """t is x's placement under another shape (the same rows: a reshape keeping the last axis):
        x's space lives until t's readers are done too. Returns the cycle t is ready."""
        base = self.aliases.get(x.id, x.id)
        self.vts[t.id] = self.vts[x.id]
        self.aliases[t.id] = base
        self.uses[base] = self.uses.get(base, 0) + self.uses.get(t.id, 0)
        return int(self.vts[x.id].ready.max())

    def consume(self, n) -> None:
        """Count n's reads of its inputs done: a temporary nobody will read again gives its
        space back.  A deferred input was read by inlining its expression, so its own inputs
        are read now, by n's kernels: their counts drop here, not when it was deferred. A read of
        an alias (:meth:`alias`) counts as a read of the tensor whose space it shares."""
        for i in set(n.inputs):
            self.uses[i] -= n.inputs.count(i)
            if i in self.aliases:
                i, count = self.aliases[i], n.inputs.count(i)
                self.uses[i] -= count
            if self.uses[i] > 0:
                continue
            if i in self.deferred:
                del self.deferred[i]
                self.consume(self.g.producer[i])
            elif i in self.vts and self.vts[i].kind == "temp":
                release(self.mem, self.vts[i])

    # ---- lowering -----------------------------------------------------------------------------------
    def lower(self, n, t: Tensor, name: str, kind: str) -> int:
        """Lower node n (writing t, named ``name``, of ``kind``) as its registry entry says
        (:mod:`lpucore.compiler.registry`): one map kernel when it has a builder for n, else its
        lowering function; returns the cycle its last result lands."""
        s = registry.spec(n.op)
        ins = [self.g.tensors[i] for i in n.inputs]
        build = s.builder(self, n, ins, t)
        if build is not None:
            return self.map_op(t, name, kind, build)
        if s.lower is None:
            raise CompileError(f"{n.op}: no lowering on one chip (lpucore.compiler.registry)")
        return s.lower(self, n, ins, t, name, kind)

    def builder(self, n, t: Tensor) -> Optional[Callable[[], Expr]]:
        """The expression builder of an elementwise node (one map kernel reading each input
        once through :meth:`operand`), or None for an operation lowered otherwise (its registry
        entry's ``build``).  A deferred node's builder is called where its consumer reads it
        (:mod:`.fuse`)."""
        return registry.spec(n.op).builder(self, n, [self.g.tensors[i] for i in n.inputs], t)

    def inputs_of(self, e: Expr) -> Set[int]:
        """Slices holding the operands of an expression."""
        out: Set[int] = set()
        stack, seen = [e], set()
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.op == "in":
                vt = n.source()[0]
                for p in range(vt.planes):
                    out.update(vt.slices[p])
            stack.extend(n.args)
        return out

    def map_op(self, t: Tensor, name: str, kind: str, build: Callable[[], Expr], out: Optional[VT] = None) -> int:
        """A map kernel writing t; the last chunk of each row is masked to keep padding zero."""
        if out is None and t.id in self.row_views:
            # a part of a concatenation of rows: written in place, in the concatenation's tensor
            out = self.part_vt(t, self.inputs_of(build()))
        if out is None:
            out = self.new_vt(name, t.dtype, t.shape, kind=kind, avoid=self.inputs_of(build()))
            # an elementwise function of values held in every lane is held in every lane
            ins = self.input_vts(build())
            if _cols(t.shape) == 1 and ins and all(v.bcast for v in ins):
                out.bcast = True
        self.vts[t.id] = out
        return self.map_into(out, build)

    def input_vts(self, e: Expr) -> List[VT]:
        """The tensors an expression reads."""
        out: List[VT] = []
        stack = [e]
        while stack:
            n = stack.pop()
            if n.op == "in":
                out.append(n.source()[0])
            stack.extend(n.args)
        return out

    def fit(self, root: Expr, out: VT, budget: int) -> Expr:
        """Split an expression too big for the ALUs: materialise its largest subexpression
        that fits into a temporary tensor (same shape as out), until the rest fits."""
        from .kernels import _topo
        while True:
            nodes = [n for n in _topo(root) if n.op != "in"]
            if len(nodes) <= budget:
                return root
            sizes: Dict[int, int] = {}
            for n in _topo(root):
                sizes[id(n)] = (0 if n.op == "in" else 1) + sum(sizes[id(a)] for a in n.args)
            cand = [n for n in _topo(root) if n.op not in ("in", "const") and n is not root
                    and sizes[id(n)] <= budget]
            if not cand:
                raise CompileError(f"an elementwise expression needs more than {budget} ALUs at one step")
            sub, tmp = self._materialise(sorted(cand, key=lambda n: -sizes[id(n)]), out)
            root = _replaced(root, sub, Expr.input(tmp, lambda v: v), {})

    def _materialise(self, cands: List[Expr], out: VT) -> Tuple[Expr, VT]:
        """Evaluate the first of ``cands`` (largest first) whose operand reads can be staged into a
        temporary of out's shape; NeedsSplit when none can."""
        for sub in cands:
            tmp = self.new_vt(f"_x{len(self.tables)}_{id(sub) % 997}", sub.dtype, (out.rows, out.cols))
            try:
                map_kernel(self.ctx, sub, tmp)
            except NeedsSplit:
                release(self.mem, tmp)
                continue
            self.temps.append(tmp)
            return sub, tmp
        raise NeedsSplit("no part of an elementwise expression can be staged on the ALUs")

    def map_into(self, out: VT, build: Callable[[], Expr], alus: Optional[Sequence[int]] = None) -> int:
        self.temps = []
        budget = (len(alus) if alus is not None else self.n_alu) - 1
        root = build()
        try:
            while True:
                fitted = self.fit(root, out, budget)
                try:
                    return self._map_into(out, functools.partial(_same, fitted), alus)
                except NeedsSplit:
                    # colliding operand reads need ALUs for staging: split further
                    if budget <= 2:
                        raise
                    budget -= 1
                    root = fitted
        finally:
            for tmp in self.temps:
                release(self.mem, tmp)
            self.temps = []

    def _map_into(self, out: VT, build: Callable[[], Expr], alus: Optional[Sequence[int]] = None) -> int:
        C = out.chunks
        rem = out.cols % self.L
        if rem == 0 or out.bcast or elementwise.pads_stay_zero(build(), out.cols, self.L):
            return elementwise.map_sets(self, out, build(), alus)
        full = [v for v in range(out.nvec) if v % C != C - 1]
        tail = [v for v in range(out.nvec) if v % C == C - 1]
        last = 0
        m = self.mask(rem, out.planes)
        masked = E("and", out.dtype, build(), Expr.input(m, lambda v: 0))
        al = list(alus if alus is not None else range(self.n_alu))
        _chains(self.ctx, masked, tail, al)                     # may raise NeedsSplit: before any commit
        if full:
            last = map_kernel(self.ctx, build(), out, vectors=full, alus=alus)
        return max(last, map_kernel(self.ctx, masked, out, vectors=tail, alus=alus))

    # ---- composite operations ------------------------------------------------------------------------------
    def gelu_tanh(self, x: Tensor, t: Tensor) -> Expr:
        """gelu's tanh form of x, as t's dtype."""
        a = self.operand(x, t.shape, F32)
        c = _f32
        # 0.5 (1 + tanh z) = sigmoid(2z): the same function without the cancellation
        # of 1 + tanh z for large negative x, so the result keeps its relative accuracy
        inner = E("mul", F32, c(2 * SQRT_2_OVER_PI),
                  E("add", F32, a, E("mul", F32, c(0.044715), E("mul", F32, E("mul", F32, a, a), a))))
        y = E("mul", F32, a, E("sigmoid", F32, inner))
        return cvt(y, t.dtype)

    def gelu(self, x: Tensor, t: Tensor, name, kind, approximate):
        if approximate == "tanh":
            return self.map_op(t, name, kind, lambda: self.gelu_tanh(x, t))
        # erf form: 0.5 x (1 + erf(x / sqrt 2)); erf by Abramowitz & Stegun 7.1.26 in two kernels
        ev = self.new_vt(f"_erf{t.id}", F32, t.shape)

        def erf_part():
            c = _f32
            z = E("mul", F32, self.operand(x, t.shape, F32), c(0.7071067811865476))
            az = E("abs", F32, z)
            tt = E("recip", F32, E("add", F32, c(1.0), E("mul", F32, c(0.3275911), az)))
            poly = c(1.061405429)
            for coef in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
                poly = E("add", F32, E("mul", F32, poly, tt), c(coef))
            poly = E("mul", F32, poly, tt)
            return E("mul", F32, poly, E("exp", F32, E("neg", F32, E("mul", F32, az, az))))   # 1 - |erf(z)|
        self.map_into(ev, erf_part)

        def combine():
            c = _f32
            a = self.operand(x, t.shape, F32)
            r = Expr.input(ev, lambda v: v)
            # 1 + erf(z) is erfc(|z|) = r for z < 0 and 2 - r otherwise: no cancellation
            onep = E("select", F32, E("lt", F32, a, c(0.0)), r, E("sub", F32, c(2.0), r))
            return cvt(E("mul", F32, E("mul", F32, c(0.5), a), onep), t.dtype)
        last = self.map_op(t, name, kind, combine)
        release(self.mem, ev)
        return last

    def acc_dtype(self, d: dt.DType) -> dt.DType:
        return F32 if d.is_float else I32

    def fold(self, src: VT, d: dt.DType, op: str, pre: Optional[PreFn] = None,
             budget: int = 8) -> Tuple[VT, Optional[PreFn], List[VT]]:
        """Halve a tensor's chunks per row (op over pairs of chunks, pre applied first, the
        padding of max rows masked) until few enough are left; returns (VT, pre left to apply)."""
        made = []
        while src.chunks > 1 and src.chunks * (3 if pre else 2) > budget:
            C, n2 = src.chunks, -(-src.chunks // 2)
            out = self.new_vt(f"_fold{len(self.tables)}_{C}", d, (src.rows, n2 * self.L), avoid=self.slices_of(src))

            def part(v, r, c, src=src, pre=pre):
                e = cvt(Expr.input(src, lambda _v, k=r * src.chunks + c: k), d)
                if pre is not None:
                    e = pre(e, r, c)
                if op == "max" and c == src.chunks - 1 and src.cols % self.L:
                    lo = Expr.const(d, -np.inf if d.is_float else -(2 ** (d.bits - 1)))
                    m = self.mask(src.cols % self.L, d.nbytes)
                    e = E("select", d, Expr.input(m, lambda _v: 0), e, lo)
                return e
            for v in range(out.nvec):
                r, j = divmod(v, n2)
                a = part(v, r, 2 * j)
                if 2 * j + 1 < C:
                    a = E("add" if op == "add" else "max", d, a, part(v, r, 2 * j + 1))
                elif a.op == "in":
                    a = E("mov", d, a)
                map_kernel(self.ctx, a, out, vectors=[v])
            out.cols = n2 * self.L
            made.append(out)
            src = out
            pre = None
        return src, pre, made

    def inlined_rows(self, x: Tensor, d: dt.DType, op: str) -> Optional[Tuple[Callable[[int], Expr], Set[int]]]:
        """For a deferred x (:mod:`.fuse`): the row expression of a lane reduction ``op`` reading
        x's own expression chunk by chunk, and the slices it reads; None when x is placed or the
        expression would not fit the ALUs the all-reduce leaves (:meth:`row_expr`'s budget)."""
        if x.id not in self.deferred:
            return None
        C = -(-_cols(x.shape) // self.L)
        rem = _cols(x.shape) % self.L

        def f(r: int) -> Expr:
            acc = None
            for c in range(C):
                e = cvt(_remap(self.deferred[x.id](), _const_index(r * C + c)), d)
                if op == "max" and c == C - 1 and rem:
                    lo = Expr.const(d, -np.inf if d.is_float else -(2 ** (d.bits - 1)))
                    e = E("select", d, Expr.input(self.mask(rem, d.nbytes), lambda v: 0), e, lo)
                acc = e if acc is None else E(op, d, acc, e)
            assert acc is not None
            return acc
        from .kernels import _staged, _topo
        if len([n for n in _topo(_staged(f(0))) if n.op != "in"]) > self.n_alu - 6:
            return None
        return f, self.inputs_of(f(0))

    def place_deferred(self, x: Tensor) -> None:
        """Write a deferred x to MEM after all (a consumer that cannot inline it); its inputs are
        read now."""
        if x.id not in self.deferred:
            return
        build = self.deferred.pop(x.id)
        self.record.materialised.append(x.id)
        self.map_op(x, f"_t{x.id}", "temp", build)
        self.consume(self.g.producer[x.id])

    def row_expr(self, src: VT, shape, d: dt.DType, op: str, pre: Optional[PreFn] = None) -> Callable[[int], Expr]:
        """Combine a row's chunks: op over chunks of pre(element); returns r -> Expr."""
        budget = self.n_alu - 6
        src, pre, _ = self.fold(src, d, op, pre, budget)
        C = src.chunks

        def f(r):
            parts = []
            for c in range(C):
                e = cvt(Expr.input(src, lambda v, k=r * C + c: k), d)
                if pre is not None:
                    e = pre(e, r, c)
                if op == "max" and c == C - 1 and src.cols % self.L:
                    lo = Expr.const(d, -np.inf if d.is_float else -(2 ** (d.bits - 1)))
                    m = self.mask(src.cols % self.L, d.nbytes)
                    e = E("select", d, Expr.input(m, lambda v: 0), e, lo)
                parts.append(e)
            acc = parts[0]
            for p in parts[1:]:
                acc = E("add" if op == "add" else "max", d, acc, p)
            return acc
        return f

    # ---- row sums on the MXM -------------------------------------------------------------------------
    def _ones(self, K: int, d: dt.DType) -> VT:
        """A constant [K, L] matrix of ones (float16 1.0 or int8 1): x @ ones puts each row's
        sum in every lane."""
        key = ("ones", K, d.name)
        if key not in self.masks:
            arr = np.ones((K, self.L), dtype=d.numpy)
            self.masks[key] = self.const_vt(f"_ones{K}{d.name}", arr, stripes=self.cfg.mxm_lw_streams)
        return self.masks[key]

    def _mxm_sum(self, src: VT, rows_shape, name: str) -> Tuple[VT, int]:
        """Row sums of a float16 or int8 tensor as one MXM product with a ones matrix:
        every row's sum lands in every lane of its vector (a broadcast [..., 1] tensor),
        float32 or int32.  The dot products are exact and rounded once per 160 (float16)
        elements, and the rows stream through at one vector a cycle."""
        from .lower_more import matmul as lower_matmul
        d_out = F32 if src.dtype == F16 else I32
        self._mxm_ids = getattr(self, "_mxm_ids", 0) + 1
        base = -1_000_000 - 10 * self._mxm_ids
        a_t = Tensor(self.g, base, (src.rows, src.cols), src.dtype)
        b_t = Tensor(self.g, base - 1, (src.cols, self.L), src.dtype)
        o_t = Tensor(self.g, base - 2, (src.rows, self.L), d_out)
        self.vts[a_t.id] = src
        self.vts[b_t.id] = self._ones(src.cols, src.dtype)
        last = lower_matmul(self, a_t, b_t, o_t, name, "temp")
        out = self.vts.pop(o_t.id)
        del self.vts[a_t.id], self.vts[b_t.id]
        out.cols, out.bcast = 1, True
        return out, last

    def _split_sum(self, src: VT, rows_shape, name: str) -> Tuple[VT, int]:
        """Row sums of a float32 tensor whose values fit float16's range (softmax's
        exponentials, in [0, 1]) on the MXM: each value is split exactly into float16
        hi = f16(x) and lo = f16(x - hi) (x - hi is exact in float32), both multiplied by
        ones.  The error is below 2^-22 |x| + 2^-25 per element (lo's rounding and float16's
        smallest step) plus the product's float32 roundings."""
        C = src.chunks
        rem = src.cols % self.L
        parts = self.new_vt(f"{name}_hl", F16, (src.rows, 2 * C * self.L), avoid=self.slices_of(src))
        m = self.mask(rem, 2) if rem else None
        for lo_part in (False, True):
            def build(lo_part=lo_part):
                x = Expr.input(src, lambda v, C=C, o=C if lo_part else 0: (v // (2 * C)) * C + v % (2 * C) - o)
                hi = cvt(x, F16)
                e = cvt(E("sub", F32, x, cvt(hi, F32)), F16) if lo_part else hi
                return e
            off = C if lo_part else 0
            full = [r * 2 * C + off + c for r in range(src.rows) for c in range(C) if not (rem and c == C - 1)]
            tail = [r * 2 * C + off + C - 1 for r in range(src.rows)] if rem else []
            if full:
                map_kernel(self.ctx, build(), parts, vectors=full)
            if tail:
                assert m is not None                  # there is a tail only with a partial last chunk
                # padding lanes must be zero: an infinity there would meet a zero weight
                map_kernel(self.ctx, E("and", F16, build(), Expr.input(m, lambda v: 0)), parts, vectors=tail)
        # the lo chunks' valid lanes sit at columns C*L + j: the ones matrix is zero elsewhere
        K2 = 2 * C * self.L
        key = ("ones2", src.cols, C)
        if key not in self.masks:
            arr = np.zeros((K2, self.L), dtype=np.float16)
            for o in (0, C * self.L):
                arr[o:o + src.cols] = 1
            self.masks[key] = self.const_vt(f"_ones2_{src.cols}", arr, stripes=self.cfg.mxm_lw_streams)
        from .lower_more import matmul as lower_matmul
        self._mxm_ids = getattr(self, "_mxm_ids", 0) + 1
        base = -1_000_000 - 10 * self._mxm_ids
        a_t = Tensor(self.g, base, (src.rows, K2), F16)
        b_t = Tensor(self.g, base - 1, (K2, self.L), F16)
        o_t = Tensor(self.g, base - 2, (src.rows, self.L), F32)
        self.vts[a_t.id] = parts
        self.vts[b_t.id] = self.masks[key]
        last = lower_matmul(self, a_t, b_t, o_t, name, "temp")
        out = self.vts.pop(o_t.id)
        del self.vts[a_t.id], self.vts[b_t.id]
        release(self.mem, parts)
        out.cols, out.bcast = 1, True
        return out, last

    def slices_of(self, *vts: VT) -> Set[int]:
        return {g for vt in vts for p in range(vt.planes) for g in vt.slices[p]}

    def plain(self, t: Tensor) -> VT:
        """t's placement, with a broadcast [..., 1] value reduced to lane 0 first."""
        vt = self.vt(t)
        if not vt.bcast:
            return vt
        out = self.new_vt(f"_pl{t.id}", vt.dtype, t.shape)
        m = self.mask(1, vt.planes)
        map_kernel(self.ctx, E("and", vt.dtype, Expr.input(vt, lambda v: v), Expr.input(m, lambda v: 0)), out)
        return out

    def span_mask(self, a: int, b: int, w: int) -> List[VT]:
        """Constant vector with lanes [a, b) all-ones, w bytes wide: one copy per
        hemisphere, so that a lane move can always read the mask from a slice other than
        its source's (a slice reads one vector per cycle)."""
        key = (a, b, w)
        if key not in self.span_masks:
            d = {1: I8, 2: I16, 4: I32}[w]
            m = np.zeros((1, self.L), dtype=d.numpy)
            m[0, a:b] = -1
            self.span_masks[key] = [self.const_vt(f"_span{a}_{b}x{w}h{h}", m, hem=h) for h in (0, 1)]
        return self.span_masks[key]

    def pack(self, src: VT, t: Tensor, name: str, kind: str) -> VT:
        """Rows of a broadcast [..., 1] tensor packed into the lanes of t's layout."""
        out = self.new_vt(name, t.dtype, t.shape, kind=kind, avoid=self.slices_of(src))
        L, cols, C = self.L, out.cols, out.chunks

        def pieces(v):
            r2, c2 = divmod(v, C)
            n = min(L, cols - c2 * L)
            return [Piece(src, r2 * cols + c2 * L + j, j, 1, j) for j in range(n)]
        lanemove_kernel(self.ctx, out, pieces, lambda a, b: self.span_mask(a, b, out.planes))
        return out

    def reduce(self, op, x: Tensor, t: Tensor, name, kind) -> int:
        d = self.acc_dtype(x.dtype) if op != "max" else x.dtype
        mn = "add" if op != "max" else "max"
        inlined = self.inlined_rows(x, d, mn) if (op == "max" or x.dtype not in (F16, I8)) else None
        if inlined is not None:
            row, reads = inlined
            red = self.new_vt(f"_r{t.id}", d, x.shape[:-1] + (1,), avoid=reads)
            last = allreduce_kernel(self.ctx, row, red, mn, list(range(self.n_alu)))
        else:
            self.place_deferred(x)
            src = self.plain(x)
            if op != "max" and src.dtype in (F16, I8):
                red, last = self._mxm_sum(src, x.shape[:-1] + (1,), f"_r{t.id}")
            else:
                red = self.new_vt(f"_r{t.id}", d, x.shape[:-1] + (1,), avoid=self.slices_of(src))
                last = allreduce_kernel(self.ctx, self.row_expr(src, x.shape, d, mn), red, mn,
                                        list(range(self.n_alu)))
        keep_shape = x.shape[:-1] + (1,)
        if op == "mean" or red.dtype != t.dtype:
            k = 1.0 / x.shape[-1]
            fin = self.new_vt(f"_rf{t.id}", t.dtype, keep_shape, avoid=self.slices_of(red))
            e = Expr.input(red, lambda v: v)
            if op == "mean":
                e = E("mul", F32, e, Expr.const(F32, k))
            last = map_kernel(self.ctx, cvt(e, t.dtype), fin)
            fin.bcast = True
            release(self.mem, red)
            red = fin
        if tuple(t.shape) == keep_shape and kind != "output":
            self.vts[t.id] = red
            return last
        if tuple(t.shape) == keep_shape:
            out = self.new_vt(name, t.dtype, t.shape, kind=kind, avoid=self.slices_of(red))
            last = map_kernel(self.ctx, E("mov", t.dtype, Expr.input(red, lambda v: v)), out)
            out.bcast = True
        else:
            out = self.pack(red, t, name, kind)
        self.vts[t.id] = out
        release(self.mem, red)
        return last

    def gathered(self, x: Tensor, vec_of: np.ndarray) -> Expr:
        """An expression whose output vector v is x's vector ``vec_of[v]`` (a deferred x inlined)."""
        def of(v: int) -> int:
            return int(vec_of[v])
        if x.id in self.deferred:
            return _remap(self.deferred[x.id](), of)
        return Expr.input(self.vt(x), of)

    def rows_builder(self, op: str, x: Tensor, t: Tensor) -> Callable[[], Expr]:
        """sum / max / mean across rows (axis -2): each output vector is a balanced tree of VXM
        operations over the vectors of its rows (floats in float32, integer sums in int32), rounded
        once to t's dtype; no lane moves, so it is one map kernel (and fuses as one, :mod:`.fuse`:
        a deferred input is inlined row by row). An expression too big for the ALUs is split by ``fit``."""
        R = x.shape[-2]
        C = -(-_cols(x.shape) // self.L)
        acc = F32 if x.dtype.is_float else (I32 if op != "max" else x.dtype)
        mn = "max" if op == "max" else "add"

        def read(r: int) -> Expr:
            def row_vec(v: int) -> int:
                return ((v // C) * R + r) * C + v % C
            if x.id in self.deferred:
                return _remap(self.deferred[x.id](), row_vec)
            return Expr.input(self.vt(x), row_vec)

        def build() -> Expr:
            level = [cvt(read(r), acc) for r in range(R)]
            while len(level) > 1:
                pairs = [E(mn, acc, level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
                level = pairs + level[len(level) - len(level) % 2:]
            e = level[0]
            if op == "mean":
                e = E("mul", F32, e, Expr.const(F32, 1.0 / R))
            return cvt(e if e.op != "in" else E("mov", acc, e), t.dtype)
        return build

    def softmax(self, x: Tensor, t: Tensor, name, kind) -> int:
        src = self.plain(x)
        rows_shape = x.shape[:-1] + (1,)
        mx = self.new_vt(f"_smax{t.id}", x.dtype, rows_shape, avoid=self.slices_of(src))
        allreduce_kernel(self.ctx, self.row_expr(src, x.shape, x.dtype, "max"), mx, "max", list(range(self.n_alu)))
        e = self.new_vt(f"_sexp{t.id}", F32, x.shape, avoid=self.slices_of(src, mx))
        C = src.chunks

        def ex():
            xe = cvt(Expr.input(src, lambda v: v), F32)
            m = cvt(Expr.input(mx, lambda v, C=C: v // C), F32)
            return E("exp", F32, E("sub", F32, xe, m))
        self.map_into(e, ex)
        release(self.mem, mx)
        # exp(x - max) is in [0, 1]: its float16 hi/lo split is exact enough, so the sum
        # goes to the MXM
        s, _ = self._split_sum(e, rows_shape, f"_ssum{t.id}")

        def quotient() -> Expr:
            return cvt(E("div", F32, Expr.input(e, lambda v: v), Expr.input(s, lambda v: v // C)), t.dtype)
        last = self.map_op(t, name, kind, quotient)
        release(self.mem, e)
        release(self.mem, s)
        return last

    def norm(self, x, gamma, beta, t, name, kind, eps, rms) -> int:
        src = self.plain(x)
        C = src.chunks
        N = x.shape[-1]
        rows_shape = x.shape[:-1] + (1,)
        if not rms:
            if src.dtype == F16:
                s1, _ = self._mxm_sum(src, rows_shape, f"_ln1{t.id}")
            else:
                s1 = self.new_vt(f"_ln1{t.id}", F32, rows_shape, avoid=self.slices_of(src))
                allreduce_kernel(self.ctx, self.row_expr(src, x.shape, F32, "add"), s1, "add",
                                 list(range(self.n_alu)))
            dv = self.new_vt(f"_lnd{t.id}", F32, x.shape, avoid=self.slices_of(src, s1))
            self.map_into(dv, lambda: E("sub", F32, cvt(Expr.input(src, lambda v: v), F32),
                                        E("mul", F32, Expr.input(s1, lambda v: v // C), Expr.const(F32, 1.0 / N))))
            release(self.mem, s1)
            base = dv
        else:
            base = src
        s2 = self.new_vt(f"_ln2{t.id}", F32, rows_shape, avoid=self.slices_of(base))
        allreduce_kernel(self.ctx, self.row_expr(base, x.shape, F32, "add",
                                                 pre=lambda e, r, c: E("mul", F32, e, e)), s2, "add",
                         list(range(self.n_alu)))

        def fin():
            xe = cvt(Expr.input(base, lambda v: v), F32)
            mean_sq = E("mul", F32, Expr.input(s2, lambda v: v // C), Expr.const(F32, 1.0 / N))
            inv = E("rsqrt", F32, E("add", F32, mean_sq, Expr.const(F32, eps)))
            y = E("mul", F32, E("mul", F32, xe, inv), self.operand(gamma, t.shape, F32))
            if beta is not None:
                y = E("add", F32, y, self.operand(beta, t.shape, F32))
            return cvt(y, t.dtype)
        last = self.map_op(t, name, kind, fin)
        if base is not src:
            release(self.mem, base)
        release(self.mem, s2)
        return last

    def quantize(self, x, scale, zp, t) -> Expr:
        """int8 round(x / scale) + zp. Without a zero point one ``cvt`` float32 -> int8 (round half to even,
        NaN to 0, saturate: the bits of going through int32, whose range holds int8's, in one VXM operation
        instead of two; a residual block's requantisation is bound by its VXM operations)."""
        q = self.operand(x, t.shape, F32)
        if self.scalars.get(scale.id) != 1.0:          # x / 1 is x, bit for bit (a requantisation's
            q = E("div", F32, q, self.operand(scale, t.shape, F32))    # scale folded into its multiplier)
        if not zp:
            return cvt(q, I8)
        return cvt(E("add", I32, cvt(q, I32), Expr.const(I32, zp)), I8)

    def dequantize(self, q, scale, zp, t) -> Expr:
        """(q - zp) * scale, as t's dtype (without a zero point, int8 -> float32 in one ``cvt``: exact)."""
        if zp:
            qf = cvt(E("sub", I32, self.operand(q, t.shape, I32), Expr.const(I32, zp)), F32)
        else:
            qf = self.operand(q, t.shape, F32)
        return cvt(E("mul", F32, qf, self.operand(scale, t.shape, F32)), t.dtype)
