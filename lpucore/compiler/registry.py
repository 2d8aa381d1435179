"""The compiler's operation registry: one entry per graph operation, saying how it is lowered and
what the other passes need to know about it.

Every operation a :class:`~lpucore.Graph` can record has an :class:`OpSpec` in :data:`OPS`:

* ``build`` - for an operation computed as one *map kernel* (each output vector one VXM expression
  of its inputs' vectors): ``build(compiler, node, inputs, out) -> expression builder``.  Fusion
  (:mod:`lpucore.compiler.fuse`) defers such a node and inlines its expression into its consumer;
  ``map_if`` narrows this to the nodes whose attributes allow it (``gelu``'s tanh form, reductions
  across rows).
* ``lower`` - any other lowering: ``lower(compiler, node, inputs, out, name, kind) -> the cycle its
  last result lands``.
* properties other passes consult: ``reduction`` (sum / max / mean: across rows or over lanes, by
  the node's ``axis``), ``scalar_operands`` (reads its operands through
  :meth:`Compiler.operand <lpucore.compiler.lower.Compiler.operand>`, so a one-element constant
  becomes a VXM immediate), ``weight_input`` (which input the MXM loads as weights: that constant
  is laid out for weight loads), ``collective`` (lowered across a group of chips by
  :mod:`lpucore.compiler.collective`, never on one chip alone).

:func:`spec` looks an operation up; an operation with no entry raises
:class:`~lpucore.CompileError` naming it.  The lowering functions themselves live in
:mod:`lpucore.compiler.lower` (the :class:`~lpucore.compiler.lower.Compiler`'s methods, reached
through the compiler object handed in) and :mod:`lpucore.compiler.lower_more`; only the layout
operations' element maps (which element of which input each output element is) are here.  This
module imports neither :mod:`.lower` nor :mod:`.fuse`, which both import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import dtypes as dt
from ..errors import CompileError
from ..graph import Graph, Node, Tensor
from . import blocks, conv, lower_more, scatter
from .kernels import E, Expr, cvt

F32 = dt.FLOAT32

# (compiler, node, input tensors, output tensor) -> a builder of the node's expression
BuildFn = Callable[[Any, Node, List[Tensor], Tensor], Callable[[], Expr]]
# (compiler, node, input tensors, output tensor, MEM name, tensor kind) -> last landing cycle
LowerFn = Callable[[Any, Node, List[Tensor], Tensor, str, str], int]


@dataclass(frozen=True)
class OpSpec:
    """One graph operation: how the compiler lowers it, and its properties (module docstring)."""

    name: str
    kind: str                                    # family, for people: elementwise, reduction, matmul, ...
    build: Optional[BuildFn] = None
    lower: Optional[LowerFn] = None
    map_if: Optional[Callable[[Node], bool]] = None
    reduction: bool = False
    scalar_operands: bool = False
    weight_input: Optional[int] = None
    collective: bool = False

    def is_map(self, n: Node) -> bool:
        """n is lowered as one map kernel over its output's vectors (so it may be fused)."""
        return self.build is not None and (self.map_if is None or self.map_if(n))

    def builder(self, c: Any, n: Node, ins: List[Tensor], t: Tensor) -> Optional[Callable[[], Expr]]:
        """n's expression builder when it is one map kernel, else None."""
        return self.build(c, n, ins, t) if self.build is not None and self.is_map(n) else None


OPS: Dict[str, OpSpec] = {}


def register(s: OpSpec) -> OpSpec:
    """Add an operation to :data:`OPS` (CompileError if its name is taken)."""
    if s.name in OPS:
        raise CompileError(f"operation {s.name!r} is registered twice")
    OPS[s.name] = s
    return s


def spec(op: str) -> OpSpec:
    """The registry entry of operation ``op``; CompileError naming it when there is none."""
    s = OPS.get(op)
    if s is None:
        raise CompileError(f"operation {op!r} has no entry in the compiler's op registry "
                           f"(lpucore.compiler.registry): no lowering for it; registered operations: "
                           f"{', '.join(sorted(OPS))}")
    return s


def check_graph(g: Graph) -> None:
    """CompileError naming the first operation of g the registry lacks (and the tensor it makes)."""
    for n in g.nodes:
        if n.op not in OPS:
            t = g.tensors[n.output]
            try:
                spec(n.op)
            except CompileError as e:
                raise CompileError(f"{t.dtype.name}{list(t.shape)} tensor %{t.id}: {e}") from None


def across_rows(n: Node) -> bool:
    """A reduction across rows (``axis=-2``): a tree of VXM operations, one map kernel."""
    return spec(n.op).reduction and n.attrs.get("axis") == -2


def across_lanes(n: Node) -> bool:
    """A reduction over the lanes (``axis=-1``): a lane all-reduce (or an MXM product)."""
    return spec(n.op).reduction and n.attrs.get("axis") == -1


# ---- builders of map kernels ------------------------------------------------------------------------
def _binary(c: Any, n: Node, ins: List[Tensor], t: Tensor) -> Callable[[], Expr]:
    mn = {"maximum": "max", "minimum": "min"}.get(n.op, n.op)
    return lambda: E(mn, t.dtype, c.operand(ins[0], t.shape), c.operand(ins[1], t.shape))


def _unary(c: Any, n: Node, ins: List[Tensor], t: Tensor) -> Callable[[], Expr]:
    op = n.op
    return lambda: E(op, t.dtype, c.operand(ins[0], t.shape))


def _silu(c: Any, n: Node, ins: List[Tensor], t: Tensor) -> Callable[[], Expr]:
    def f() -> Expr:
        x = c.operand(ins[0], t.shape, F32)
        return cvt(E("mul", F32, x, E("sigmoid", F32, x)), t.dtype)
    return f


def _cast(c: Any, n: Node, ins: List[Tensor], t: Tensor) -> Callable[[], Expr]:
    return lambda: cvt(c.operand(ins[0], t.shape), t.dtype)


def _rows(c: Any, n: Node, ins: List[Tensor], t: Tensor) -> Callable[[], Expr]:
    return c.rows_builder(n.op, ins[0], t)


def _window_reads(c: Any, n: Node, ins: List[Tensor], t: Tensor) -> Callable[[], Expr]:
    """A max pool's window of a channel-last image as reads of the image's rows
    (:func:`lpucore.compiler.conv.repeat_vectors`): no copy, inlined into the max."""
    vec_of = conv.repeat_vectors(n, c.L)
    return lambda: c.gathered(ins[0], vec_of)


def _gelu_tanh(c: Any, n: Node, ins: List[Tensor], t: Tensor) -> Callable[[], Expr]:
    return lambda: c.gelu_tanh(ins[0], t)


def _quantize(c: Any, n: Node, ins: List[Tensor], t: Tensor) -> Callable[[], Expr]:
    return lambda: c.quantize(ins[0], ins[1], n.attrs["zero_point"], t)


def _dequantize(c: Any, n: Node, ins: List[Tensor], t: Tensor) -> Callable[[], Expr]:
    return lambda: c.dequantize(ins[0], ins[1], n.attrs["zero_point"], t)


# ---- other lowerings --------------------------------------------------------------------------------
def _gelu(c: Any, n: Node, ins: List[Tensor], t: Tensor, name: str, kind: str) -> int:
    return c.gelu(ins[0], t, name, kind, n.attrs["approximate"])


def _reduce(c: Any, n: Node, ins: List[Tensor], t: Tensor, name: str, kind: str) -> int:
    return c.reduce(n.op, ins[0], t, name, kind)


def _softmax(c: Any, n: Node, ins: List[Tensor], t: Tensor, name: str, kind: str) -> int:
    return c.softmax(ins[0], t, name, kind)


def _layernorm(c: Any, n: Node, ins: List[Tensor], t: Tensor, name: str, kind: str) -> int:
    return c.norm(ins[0], ins[1], ins[2], t, name, kind, n.attrs["eps"], rms=False)


def _rmsnorm(c: Any, n: Node, ins: List[Tensor], t: Tensor, name: str, kind: str) -> int:
    return c.norm(ins[0], ins[1], None, t, name, kind, n.attrs["eps"], rms=True)


def _matmul(c: Any, n: Node, ins: List[Tensor], t: Tensor, name: str, kind: str) -> int:
    return lower_more.matmul(c, ins[0], ins[1], t, name, kind)


def _conv_taps(c: Any, n: Node, ins: List[Tensor], t: Tensor, name: str, kind: str) -> int:
    return lower_more.conv_taps(c, ins[0], ins[1], t, name, kind, n)


# a layout operation's element map: (node, inputs, output) -> (which input, flat element of it) for
# every flat element of the output (row-major)
ElementMap = Callable[[Node, List[Tensor], Tensor], Tuple[np.ndarray, np.ndarray]]


def _reshape_map(n: Node, ins: List[Tensor], t: Tensor) -> Tuple[np.ndarray, np.ndarray]:
    return np.zeros(t.size, dtype=np.int64), np.arange(t.size)


def _transpose_map(n: Node, ins: List[Tensor], t: Tensor) -> Tuple[np.ndarray, np.ndarray]:
    grid = np.arange(ins[0].size).reshape(ins[0].shape)
    return (np.zeros(t.size, dtype=np.int64),
            np.ascontiguousarray(np.transpose(grid, n.attrs["axes"])).ravel())


def _slice_map(n: Node, ins: List[Tensor], t: Tensor) -> Tuple[np.ndarray, np.ndarray]:
    grid = np.arange(ins[0].size).reshape(ins[0].shape)
    idx = tuple(slice(a, b) for a, b in zip(n.attrs["starts"], n.attrs["stops"]))
    return np.zeros(t.size, dtype=np.int64), np.ascontiguousarray(grid[idx]).ravel()


def _concat_map(n: Node, ins: List[Tensor], t: Tensor) -> Tuple[np.ndarray, np.ndarray]:
    ax = n.attrs["axis"]
    parts_e = [np.arange(x.size).reshape(x.shape) for x in ins]
    parts_w = [np.full(x.shape, i, dtype=np.int64) for i, x in enumerate(ins)]
    return np.concatenate(parts_w, axis=ax).ravel(), np.concatenate(parts_e, axis=ax).ravel()


def _layout(elements: ElementMap) -> LowerFn:
    """The lowering of a layout operation whose element map is ``elements``: its output is filled
    by moving whole vectors on the VXM or pieces of vectors through the SXM
    (:func:`lpucore.compiler.lower_more.relayout`)."""
    def lower(c: Any, n: Node, ins: List[Tensor], t: Tensor, name: str, kind: str) -> int:
        srcs = [c.plain(x) for x in ins]
        out = c.new_vt(name, t.dtype, t.shape, kind=kind, avoid=c.slices_of(*srcs))
        c.vts[t.id] = out
        return lower_more.relayout(c, out, srcs, elements(n, ins, t))
    return lower


def _reshape(c: Any, n: Node, ins: List[Tensor], t: Tensor, name: str, kind: str) -> int:
    """A reshape that keeps the last axis keeps every row's vectors where they are (a tensor's rows are
    its leading axes flattened, row-major): the output is the input's placement under another shape
    (:meth:`Compiler.alias <lpucore.compiler.lower.Compiler.alias>`), no instruction. Any other reshape
    (or one into a graph output's own placement, or of a value broadcast over the lanes) moves data."""
    x = ins[0]
    # An elementwise kernel's output aliases too (it was once copied after a GPT-2-small miscompile seen
    # with aliasing and never reproduced; a compile-cache entry shared by graphs differing in a reshape's
    # shape would show the same, and that bug was found later). Checked: tests/test_compiler_alias.py,
    # 450 fuzzed graphs of reshaped elementwise outputs, the LLM tests and GPT-2-small's tokens and logits.
    if kind == "temp" and t.id not in c.vts and x.shape[-1:] == t.shape[-1:] and x.dtype == t.dtype:
        c.place_deferred(x)
        if x.id in c.vts and not c.vts[x.id].bcast:
            return c.alias(t, x)
    return _layout(_reshape_map)(c, n, ins, t, name, kind)


def _concat(c: Any, n: Node, ins: List[Tensor], t: Tensor, name: str, kind: str) -> int:
    """A concatenation: nothing to do when its parts' producers wrote it in place
    (:meth:`Compiler.concat_parts <lpucore.compiler.lower.Compiler.concat_parts>`), else a layout move."""
    if t.id in c.vts:
        return int(c.vts[t.id].ready.max())
    return _layout(_concat_map)(c, n, ins, t, name, kind)


def _gather(c: Any, n: Node, ins: List[Tensor], t: Tensor, name: str, kind: str) -> int:
    return lower_more.gather(c, ins[0], ins[1], t, name, kind)


def _scatter(c: Any, n: Node, ins: List[Tensor], t: Tensor, name: str, kind: str) -> int:
    return scatter.scatter(c, ins[0], ins[1], ins[2], t, name, kind)


def _gather_blocks(c: Any, n: Node, ins: List[Tensor], t: Tensor, name: str, kind: str) -> int:
    return blocks.gather_blocks(c, ins[0], ins[1], t, name, kind)


def _scatter_blocks(c: Any, n: Node, ins: List[Tensor], t: Tensor, name: str, kind: str) -> int:
    return blocks.scatter_blocks(c, ins[0], ins[1], ins[2], t, name, kind)


def _rope(c: Any, n: Node, ins: List[Tensor], t: Tensor, name: str, kind: str) -> int:
    return lower_more.rope(c, ins[0], ins[1], t, name, kind, n.attrs["base"], n.attrs["max_positions"])


def _rewritten(c: Any, n: Node, ins: List[Tensor], t: Tensor, name: str, kind: str) -> int:
    raise CompileError(f"internal: {n.op} reached lowering (lpucore.compiler.conv.rewrite replaces it)")


def _register_all(names: Sequence[str], kind: str, **props: Any) -> None:
    for name in names:
        register(OpSpec(name, kind, **props))


_register_all(("add", "sub", "mul", "div", "maximum", "minimum"), "elementwise", build=_binary,
              scalar_operands=True)
_register_all(("neg", "abs", "relu", "exp", "tanh", "sigmoid", "sqrt", "rsqrt"), "elementwise", build=_unary,
              scalar_operands=True)
register(OpSpec("silu", "elementwise", build=_silu, scalar_operands=True))
register(OpSpec("cast", "elementwise", build=_cast, scalar_operands=True))
register(OpSpec("quantize", "elementwise", build=_quantize, scalar_operands=True))
register(OpSpec("dequantize", "elementwise", build=_dequantize, scalar_operands=True))
# gelu's tanh form is one map kernel; its erf form takes two
register(OpSpec("gelu", "elementwise", build=_gelu_tanh, lower=_gelu, scalar_operands=True,
                map_if=lambda n: n.attrs.get("approximate") == "tanh"))
# across rows (axis -2): one map kernel; over the lanes (axis -1): a lane all-reduce or an MXM product
_register_all(("sum", "max", "mean"), "reduction", build=_rows, lower=_reduce, reduction=True,
              map_if=lambda n: n.attrs.get("axis") == -2)
register(OpSpec("softmax", "softmax", lower=_softmax))
register(OpSpec("layernorm", "norm", lower=_layernorm))
register(OpSpec("rmsnorm", "norm", lower=_rmsnorm))
register(OpSpec("matmul", "matmul", lower=_matmul, weight_input=1))
register(OpSpec("reshape", "layout", lower=_reshape))
register(OpSpec("transpose", "layout", lower=_layout(_transpose_map)))
register(OpSpec("slice", "layout", lower=_layout(_slice_map)))
register(OpSpec("concat", "layout", lower=_concat))
# table[indices]: one-hot rows times the table on the MXM, whose weights the table is
register(OpSpec("gather", "gather", lower=_gather, weight_input=0))
# x with rows written at run-time row indices: MEM Scatter (in place into a state assigned the result)
register(OpSpec("scatter", "scatter", lower=_scatter))
# blocks of rows at a run-time block index: one MEM Gather / Scatter per vector (lpucore.compiler.blocks)
register(OpSpec("gather_blocks", "gather", lower=_gather_blocks))
register(OpSpec("scatter_blocks", "scatter", lower=_scatter_blocks))
register(OpSpec("rope", "rope", lower=_rope))
_register_all(("allgather", "allreduce"), "collective", collective=True)
# NCHW images: rewritten before lowering into windows, matmuls and reductions (lpucore.compiler.conv)
_register_all(conv.IMAGE_OPS, "image", lower=_rewritten)
# the windows of an image (taps x channels packed along a row): a layout move
register(OpSpec("window", "layout", lower=_layout(conv.window_map), build=_window_reads,
                map_if=lambda n: n.attrs.get("pads") == "repeat"))
register(OpSpec("d2s", "layout", lower=_layout(conv.d2s_map)))
register(OpSpec("conv_taps", "matmul", lower=_conv_taps, weight_input=1))
