"""Tensor graphs: what the compiler turns into scheduled programs.

::

    g = lpucore.Graph()
    x = g.input("x", shape=(128, 384), dtype="float16")
    w = g.constant("w", W)
    y = g.gelu(g.add(g.matmul(x, w), b))
    g.output("y", y)

Shapes broadcast as in NumPy.  Every operation checks its operands when it is
called and raises :class:`GraphError` naming the operation.  dtypes never
promote implicitly (use :meth:`Graph.cast`), except that Python numbers take the
other operand's dtype.  Differences from NumPy, all deliberate: ``matmul`` of
int8 gives int32 (the MXM's accumulators), ``sum`` of integers gives int32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import dtypes as dt
from .errors import LpuError


class GraphError(LpuError, ValueError):
    """An operation was given operands of the wrong shape, dtype or axis."""


@dataclass(eq=False)
class Tensor:
    """A value in a graph (symbolic: no data)."""

    graph: "Graph"
    id: int
    shape: Tuple[int, ...]
    dtype: dt.DType
    name: Optional[str] = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    def __repr__(self):
        return f"<Tensor {self.name or '%' + str(self.id)} {self.dtype.name}{list(self.shape)}>"

    # NumPy-like sugar
    def __add__(self, o): return self.graph.add(self, o)
    def __radd__(self, o): return self.graph.add(o, self)
    def __sub__(self, o): return self.graph.sub(self, o)
    def __rsub__(self, o): return self.graph.sub(o, self)
    def __mul__(self, o): return self.graph.mul(self, o)
    def __rmul__(self, o): return self.graph.mul(o, self)
    def __truediv__(self, o): return self.graph.div(self, o)
    def __neg__(self): return self.graph.neg(self)
    def __matmul__(self, o): return self.graph.matmul(self, o)

    def __getitem__(self, key):
        return self.graph.slice(self, key)


@dataclass
class Node:
    op: str
    inputs: List[int]
    attrs: Dict[str, Any]
    output: int


#: largest rotary table Graph.rope builds (rows): 65,536 rows take two tables of 65,536 MEM vectors
#: (40 MB of a GroqChip's 230 MB at a head of up to 320 values), more than any model here needs
MAX_ROPE_POSITIONS = 65536
UNARY_FLOAT = ("exp", "tanh", "sigmoid", "sqrt", "rsqrt", "silu", "gelu")
UNARY_ANY = ("neg", "relu", "abs")
BINARY = ("add", "sub", "mul", "div", "maximum", "minimum")


def _broadcast(op, a, b):
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        raise GraphError(f"{op}: shapes {list(a)} and {list(b)} do not broadcast") from None


class Graph:
    """A dataflow graph of tensor operations (see the module docstring)."""

    def __init__(self, name: str = "graph"):
        self.name = name
        self.tensors: List[Tensor] = []
        self.nodes: List[Node] = []
        self.producer: Dict[int, Node] = {}
        self.inputs: Dict[str, Tensor] = {}
        self.constants: Dict[int, np.ndarray] = {}
        self.constant_names: Dict[int, str] = {}
        self.outputs: Dict[str, Tensor] = {}
        self.states: Dict[str, Tensor] = {}
        self.state_init: Dict[int, np.ndarray] = {}
        self.assigns: Dict[int, Tensor] = {}

    # ---- building blocks -------------------------------------------------------------------
    def _new(self, shape, dtype, name=None) -> Tensor:
        t = Tensor(self, len(self.tensors), tuple(int(s) for s in shape), dt.get(dtype), name)
        self.tensors.append(t)
        return t

    def _node(self, op, inputs, shape, dtype, **attrs) -> Tensor:
        out = self._new(shape, dtype)
        n = Node(op, [t.id for t in inputs], attrs, out.id)
        self.nodes.append(n)
        self.producer[out.id] = n
        return out

    def _t(self, op, x, like: Optional[Tensor] = None) -> Tensor:
        """A Tensor of this graph from x (a Tensor, or a number / array made a constant)."""
        if isinstance(x, Tensor):
            if x.graph is not self:
                raise GraphError(f"{op}: operand {x} belongs to another graph")
            return x
        if isinstance(x, (bool, np.bool_)):
            raise GraphError(f"{op}: booleans are not tensors")
        if isinstance(x, (int, float, np.integer, np.floating)):
            d = like.dtype if like is not None else (dt.FLOAT32 if isinstance(x, float) else dt.INT32)
            if not d.is_float and (isinstance(x, float) and not float(x).is_integer()):
                raise GraphError(f"{op}: the number {x} is not an integer but the other operand is {d.name}")
            return self.constant(None, np.array(x, dtype=d.numpy).reshape(()))
        if isinstance(x, np.ndarray):
            return self.constant(None, x)
        raise GraphError(f"{op}: cannot use {type(x).__name__} as a tensor")

    def _named(self, op: str, name: str, shape: Sequence[int], dtype):
        """Check a new input's or state's name, shape and dtype; returns (shape tuple, DType)."""
        if not isinstance(name, str) or not name.isidentifier():
            raise GraphError(f"{op}: name {name!r} must be an identifier")
        if name in self.inputs or name in self.outputs or name in self.states:
            raise GraphError(f"{op}: name {name!r} is taken")
        shape = tuple(shape)
        if not all(isinstance(s, (int, np.integer)) and s >= 1 for s in shape):
            raise GraphError(f"{op}: shape {shape} must be positive integers")
        try:
            return shape, dt.get(dtype)
        except LpuError as e:
            raise GraphError(f"{op}: {e}") from None

    def input(self, name: str, shape: Sequence[int], dtype="float16") -> Tensor:
        """A tensor the host supplies at run time."""
        shape, d = self._named("input", name, shape, dtype)
        t = self._new(shape, d, name)
        self.inputs[name] = t
        return t

    def constant(self, name: Optional[str], array) -> Tensor:
        """A tensor whose value is known when compiling (placed in MEM when the program loads)."""
        a = np.asarray(array)
        try:
            d = dt.get(a.dtype)
        except LpuError:
            raise GraphError(f"constant: dtype {a.dtype} is not one the chip handles "
                             f"(int8, int16, int32, float16, float32)") from None
        if a.size == 0:
            raise GraphError("constant: empty arrays are not supported")
        t = self._new(a.shape, d, name)
        self.constants[t.id] = np.ascontiguousarray(a)
        if name:
            self.constant_names[t.id] = name
        return t

    def state(self, name: str, shape: Sequence[int], dtype="float16", init=None) -> Tensor:
        """A tensor that stays in MEM from one run of the program to the next (a KV cache, a
        counter): it starts as `init` (zeros by default) when the program is loaded, every
        run reads its current value, and `assign(state, value)` replaces it at the end of
        the run.  The host can read it by name (`Chip.read_tensor`)."""
        shape, d = self._named("state", name, shape, dtype)
        if init is None:
            init = np.zeros(shape, dtype=d.numpy)
        init = np.asarray(init)
        if init.shape != shape or init.dtype != d.numpy:
            raise GraphError(f"state: init must be {d.name}{list(shape)}, got {init.dtype}{list(init.shape)}")
        t = self._new(shape, d, name)
        self.states[name] = t
        self.state_init[t.id] = np.ascontiguousarray(init)
        return t

    def assign(self, state: Tensor, value) -> None:
        """At the end of each run, state := value (same shape and dtype; once per state)."""
        if not isinstance(state, Tensor) or state.graph is not self or state.id not in self.state_init:
            raise GraphError("assign: the first operand must be a state of this graph (Graph.state)")
        value = self._t("assign", value, like=state)
        if value.shape != state.shape or value.dtype != state.dtype:
            raise GraphError(f"assign: value {value.dtype.name}{list(value.shape)} does not match state "
                             f"{state.name} {state.dtype.name}{list(state.shape)}")
        if state.id in self.assigns:
            raise GraphError(f"assign: state {state.name} is already assigned")
        self.assigns[state.id] = value

    def output(self, name: str, t: Tensor) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise GraphError(f"output: name {name!r} must be an identifier")
        if name in self.outputs or name in self.inputs or name in self.states:
            raise GraphError(f"output: name {name!r} is taken")
        self.outputs[name] = self._t("output", t)

    # ---- elementwise ------------------------------------------------------------------------
    def _binary(self, op, a, b) -> Tensor:
        ta = a if isinstance(a, Tensor) else None
        tb = b if isinstance(b, Tensor) else None
        if ta is None and tb is None:
            raise GraphError(f"{op}: at least one operand must be a tensor")
        a = self._t(op, a, like=tb)
        b = self._t(op, b, like=ta)
        if a.dtype != b.dtype:
            raise GraphError(f"{op}: dtypes {a.dtype.name} and {b.dtype.name} differ (use cast)")
        if op == "div" and not a.dtype.is_float:
            raise GraphError(f"div: integer division is not supported ({a.dtype.name})")
        return self._node(op, [a, b], _broadcast(op, a.shape, b.shape), a.dtype)

    def add(self, a, b): return self._binary("add", a, b)
    def sub(self, a, b): return self._binary("sub", a, b)
    def mul(self, a, b): return self._binary("mul", a, b)
    def div(self, a, b): return self._binary("div", a, b)
    def maximum(self, a, b): return self._binary("maximum", a, b)
    def minimum(self, a, b): return self._binary("minimum", a, b)

    def _unary(self, op, x, **attrs) -> Tensor:
        x = self._t(op, x)
        if op in UNARY_FLOAT and not x.dtype.is_float:
            raise GraphError(f"{op}: needs a float tensor, got {x.dtype.name}")
        return self._node(op, [x], x.shape, x.dtype, **attrs)

    def neg(self, x): return self._unary("neg", x)
    def abs(self, x): return self._unary("abs", x)
    def relu(self, x): return self._unary("relu", x)
    def exp(self, x): return self._unary("exp", x)
    def tanh(self, x): return self._unary("tanh", x)
    def sigmoid(self, x): return self._unary("sigmoid", x)
    def sqrt(self, x): return self._unary("sqrt", x)
    def rsqrt(self, x): return self._unary("rsqrt", x)
    def silu(self, x): return self._unary("silu", x)

    def gelu(self, x, approximate: str = "tanh"):
        """GELU, ``approximate="tanh"`` (GPT-2) or ``"erf"`` (exact form)."""
        if approximate not in ("tanh", "erf", "none"):
            raise GraphError(f"gelu: approximate must be 'tanh' or 'erf', got {approximate!r}")
        return self._unary("gelu", x, approximate="erf" if approximate == "none" else approximate)

    def cast(self, x, dtype) -> Tensor:
        x = self._t("cast", x)
        try:
            d = dt.get(dtype)
        except LpuError as e:
            raise GraphError(f"cast: {e}") from None
        return self._node("cast", [x], x.shape, d)

    # ---- reductions and normalisations ------------------------------------------------------------
    def _axis(self, op, x, axis):
        if axis not in (-1, x.ndim - 1) or x.ndim == 0:
            raise GraphError(f"{op}: only the last axis (-1) is supported, got axis={axis} for {x.ndim}-d {x}")

    def _reduce(self, op, x, axis, keepdims):
        """A reduction over the last axis (across lanes) or, for sum / max / mean of a tensor with at
        least two axes, over the second-to-last (across rows: elementwise over vectors, no lane moves)."""
        x = self._t(op, x)
        rows = x.ndim >= 2 and axis in (-2, x.ndim - 2)
        if not rows:
            self._axis(op, x, axis)
        if op == "mean" and not x.dtype.is_float:
            raise GraphError(f"mean: needs a float tensor, got {x.dtype.name}")
        kept = (1,) if keepdims else ()
        shape = x.shape[:-2] + kept + x.shape[-1:] if rows else x.shape[:-1] + kept
        d = dt.INT32 if (op == "sum" and not x.dtype.is_float) else x.dtype
        return self._node(op, [x], shape, d, keepdims=keepdims, axis=-2 if rows else -1)

    def sum(self, x, axis=-1, keepdims=False):
        """Sum over ``axis`` (-1, or -2 across rows); integers sum in int32, floats in float32."""
        return self._reduce("sum", x, axis, keepdims)

    def max(self, x, axis=-1, keepdims=False):
        """Max over ``axis`` (-1, or -2 across rows)."""
        return self._reduce("max", x, axis, keepdims)

    def mean(self, x, axis=-1, keepdims=False):
        """Mean over ``axis`` (-1, or -2 across rows); float tensors only."""
        return self._reduce("mean", x, axis, keepdims)

    def softmax(self, x, axis=-1):
        x = self._t("softmax", x)
        self._axis("softmax", x, axis)
        if not x.dtype.is_float:
            raise GraphError(f"softmax: needs a float tensor, got {x.dtype.name}")
        return self._node("softmax", [x], x.shape, x.dtype)

    def _vec(self, op, name, v, x):
        v = self._t(op, v, like=x)
        if v.dtype != x.dtype:
            raise GraphError(f"{op}: {name} is {v.dtype.name}, x is {x.dtype.name}")
        if v.shape not in ((x.shape[-1],), (1,), ()):
            raise GraphError(f"{op}: {name} must have shape ({x.shape[-1]},), got {list(v.shape)}")
        return v

    def layernorm(self, x, gamma, beta, eps: float = 1e-5):
        x = self._t("layernorm", x)
        if not x.dtype.is_float:
            raise GraphError(f"layernorm: needs a float tensor, got {x.dtype.name}")
        g = self._vec("layernorm", "gamma", gamma, x)
        b = self._vec("layernorm", "beta", beta, x)
        return self._node("layernorm", [x, g, b], x.shape, x.dtype, eps=float(eps))

    def rmsnorm(self, x, gamma, eps: float = 1e-6):
        x = self._t("rmsnorm", x)
        if not x.dtype.is_float:
            raise GraphError(f"rmsnorm: needs a float tensor, got {x.dtype.name}")
        g = self._vec("rmsnorm", "gamma", gamma, x)
        return self._node("rmsnorm", [x, g], x.shape, x.dtype, eps=float(eps))

    # ---- matmul ----------------------------------------------------------------------------------
    def matmul(self, a, b, out_dtype=None) -> Tensor:
        """a [..., M, K] x b [..., K, N] with NumPy's batch broadcasting.  int8 -> int32
        (or ``out_dtype="int8"`` is not offered: requantise with :meth:`quantize`);
        float16 -> float16 (``out_dtype="float32"`` keeps the accumulators' precision)."""
        a = self._t("matmul", a)
        b = self._t("matmul", b)
        if a.dtype != b.dtype:
            raise GraphError(f"matmul: dtypes {a.dtype.name} and {b.dtype.name} differ")
        if a.dtype.name not in ("int8", "float16"):
            raise GraphError(f"matmul: the MXM multiplies int8 or float16, not {a.dtype.name}")
        if a.ndim < 1 or b.ndim < 1:
            raise GraphError("matmul: operands must have at least one dimension")
        sa = a.shape if a.ndim > 1 else (1,) + a.shape
        sb = b.shape if b.ndim > 1 else b.shape + (1,)
        if sa[-1] != sb[-2]:
            raise GraphError(f"matmul: inner dimensions differ: {list(a.shape)} @ {list(b.shape)}")
        batch = _broadcast("matmul", sa[:-2], sb[:-2])
        shape = batch + (sa[-2], sb[-1])
        if a.ndim == 1:
            shape = shape[:-2] + shape[-1:]
        if b.ndim == 1:
            shape = shape[:-1]
        default = "int32" if a.dtype.name == "int8" else "float16"
        od = dt.get(out_dtype or default)
        if od.name not in ({"int32"} if a.dtype.name == "int8" else {"float16", "float32"}):
            raise GraphError(f"matmul: a {a.dtype.name} product gives {default}, not {od.name}")
        return self._node("matmul", [a, b], shape, od)

    # ---- layout ------------------------------------------------------------------------------------
    def reshape(self, x, shape) -> Tensor:
        x = self._t("reshape", x)
        shape = list(shape)
        if shape.count(-1) > 1:
            raise GraphError("reshape: at most one -1")
        if -1 in shape:
            known = int(np.prod([s for s in shape if s != -1])) or 1
            if x.size % known:
                raise GraphError(f"reshape: cannot reshape {list(x.shape)} to {shape}")
            shape[shape.index(-1)] = x.size // known
        if int(np.prod(shape)) != x.size or any(s < 1 for s in shape):
            raise GraphError(f"reshape: cannot reshape {list(x.shape)} ({x.size} elements) to {shape}")
        return self._node("reshape", [x], tuple(shape), x.dtype)

    def transpose(self, x, axes=None) -> Tensor:
        x = self._t("transpose", x)
        axes = tuple(reversed(range(x.ndim))) if axes is None else tuple(int(a) % max(x.ndim, 1) for a in axes)
        if sorted(axes) != list(range(x.ndim)):
            raise GraphError(f"transpose: axes {axes} are not a permutation of {x.ndim} axes")
        return self._node("transpose", [x], tuple(x.shape[a] for a in axes), x.dtype, axes=axes)

    def concat(self, xs, axis: int = 0) -> Tensor:
        xs = [self._t("concat", x) for x in xs]
        if not xs:
            raise GraphError("concat: nothing to concatenate")
        nd = xs[0].ndim
        if nd == 0:
            raise GraphError("concat: cannot concatenate scalars")
        ax = axis % nd if -nd <= axis < nd else None
        if ax is None:
            raise GraphError(f"concat: axis {axis} out of range for {nd}-d tensors")
        for x in xs:
            if x.dtype != xs[0].dtype:
                raise GraphError(f"concat: dtypes {x.dtype.name} and {xs[0].dtype.name} differ")
            if x.ndim != nd or any(x.shape[i] != xs[0].shape[i] for i in range(nd) if i != ax):
                raise GraphError(f"concat: shapes {[list(t.shape) for t in xs]} differ outside axis {ax}")
        shape = list(xs[0].shape)
        shape[ax] = sum(x.shape[ax] for x in xs)
        return self._node("concat", xs, tuple(shape), xs[0].dtype, axis=ax)

    def slice(self, x, key) -> Tensor:
        """x[key] for integers and slices with step 1 (NumPy basic indexing)."""
        x = self._t("slice", x)
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) > x.ndim:
            raise GraphError(f"slice: {len(key)} indices for a {x.ndim}-d tensor")
        starts, stops, keep = [], [], []
        for i, n in enumerate(x.shape):
            k = key[i] if i < len(key) else slice(None)
            if isinstance(k, (int, np.integer)):
                j = int(k) + (n if k < 0 else 0)
                if not 0 <= j < n:
                    raise GraphError(f"slice: index {k} out of range for axis {i} of size {n}")
                starts.append(j)
                stops.append(j + 1)
                keep.append(False)
            elif isinstance(k, slice):
                a, b, s = k.indices(n)
                if s != 1:
                    raise GraphError("slice: only step 1 is supported")
                if b <= a:
                    raise GraphError(f"slice: empty range on axis {i}")
                starts.append(a)
                stops.append(b)
                keep.append(True)
            else:
                raise GraphError(f"slice: unsupported index {k!r}")
        shape = tuple(b - a for a, b, k in zip(starts, stops, keep) if k)
        return self._node("slice", [x], shape, x.dtype, starts=tuple(starts), stops=tuple(stops), keep=tuple(keep))

    def gather(self, table, indices) -> Tensor:
        """table[indices] along axis 0 (an embedding lookup); indices are int32."""
        table = self._t("gather", table)
        indices = self._t("gather", indices)
        if indices.dtype.name != "int32":
            raise GraphError(f"gather: indices must be int32, got {indices.dtype.name}")
        if table.ndim != 2:
            raise GraphError(f"gather: table must be 2-d [rows, dim], got {list(table.shape)}")
        return self._node("gather", [table, indices], indices.shape + table.shape[1:], table.dtype)

    def scatter(self, x, indices, rows) -> Tensor:
        """x with row ``indices[i]`` replaced by ``rows[i]`` (x ``[R, D]``, indices int32 ``[n]``,
        rows ``[n, D]`` of x's dtype): a write at positions known only at run time (a KV cache's new
        row). An index outside ``0..R-1`` writes nothing; when two indices are equal the later row
        wins. Lowered to MEM ``Scatter``; when x is a state read only here and the result is
        assigned back to it, the rows are written in place (nothing else of x moves)."""
        x = self._t("scatter", x)
        indices = self._t("scatter", indices)
        rows = self._t("scatter", rows)
        if indices.dtype.name != "int32" or indices.ndim != 1:
            raise GraphError(f"scatter: indices must be int32 [n], got {indices.dtype.name}{list(indices.shape)}")
        if x.ndim != 2:
            raise GraphError(f"scatter: x must be 2-d [rows, dim], got {list(x.shape)}")
        if rows.shape != (indices.shape[0], x.shape[1]) or rows.dtype != x.dtype:
            raise GraphError(f"scatter: rows must be {x.dtype.name}{[indices.shape[0], x.shape[1]]}, "
                             f"got {rows.dtype.name}{list(rows.shape)}")
        return self._node("scatter", [x, indices, rows], x.shape, x.dtype)

    def _blocks(self, op: str, x, blocks) -> Tuple[Tensor, Tensor]:
        x = self._t(op, x)
        blocks = self._t(op, blocks)
        if blocks.dtype.name != "int32" or blocks.ndim != 1:
            raise GraphError(f"{op}: blocks must be int32 [m], got {blocks.dtype.name}{list(blocks.shape)}")
        if x.ndim != 2:
            raise GraphError(f"{op}: x must be 2-d [rows, dim], got {list(x.shape)}")
        return x, blocks

    def gather_blocks(self, x, blocks, n: int) -> Tensor:
        """Rows ``k * n .. k * n + n - 1`` of ``x [R, D]`` for every block index ``k`` in ``blocks`` (int32
        ``[m]``, known only at run time), one block per leading index: ``[m, n, D]``. ``R`` must be a multiple
        of ``n``; a block outside ``0 .. R / n - 1`` reads zeros. Lowered to one MEM ``Gather`` per vector and
        byte plane (``lpucore.compiler.blocks``)."""
        x, blocks = self._blocks("gather_blocks", x, blocks)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 or x.shape[0] % n:
            raise GraphError(f"gather_blocks: n must be a positive divisor of {x.shape[0]} rows, got {n!r}")
        return self._node("gather_blocks", [x, blocks], (blocks.shape[0], int(n), x.shape[1]), x.dtype)

    def scatter_blocks(self, x, blocks, rows) -> Tensor:
        """``x [R, D]`` with block ``blocks[i]`` (rows ``k * n .. k * n + n - 1``) replaced by rows
        ``i * n .. i * n + n - 1`` of ``rows`` (``[m * n, D]``, or ``[m, n, D]``); ``blocks`` int32 ``[m]``
        known only at run time. A block outside ``0 .. R / n - 1`` writes nothing; of equal blocks the later
        wins. Lowered to one MEM ``Scatter`` per vector and byte plane; a state read only here (and by the
        :meth:`gather_blocks` the rows are made from) and assigned the result is written in place."""
        x, blocks = self._blocks("scatter_blocks", x, blocks)
        rows = self._t("scatter_blocks", rows)
        m = blocks.shape[0]
        total = rows.size // rows.shape[-1] if rows.ndim and rows.shape[-1] else 0
        if rows.ndim not in (2, 3) or (rows.ndim == 3 and rows.shape[0] != m) or rows.shape[-1] != x.shape[1] \
                or rows.dtype != x.dtype or m == 0 or total == 0 or total % m or x.shape[0] % (total // m):
            raise GraphError(f"scatter_blocks: rows must be {x.dtype.name}[m * n, {x.shape[1]}] for m = {m} blocks "
                             f"of n rows dividing {x.shape[0]}, got {rows.dtype.name}{list(rows.shape)}")
        return self._node("scatter_blocks", [x, blocks, rows], x.shape, x.dtype)

    def rope(self, x, positions, base: float = 10000.0, max_positions: int = 2048) -> Tensor:
        """Rotary position embedding, Llama form, over the last axis (the head dimension,
        even): pairs (i, i + d/2) rotate by angle positions[t] * base**(-2i/d).  x is
        [..., T, d]; positions is int32 [T], each in ``0..max_positions - 1``: the compiler
        keeps cos and sin tables of ``max_positions`` float16 rows of ``d`` values in SRAM
        (2 x 2 bytes x rows x d rounded up to whole vectors; a position outside the tables
        rotates ``x`` to 0), and a lookup costs one MXM product over those rows, so size it
        to the positions the program needs (a decoder: its cache capacity)."""
        x = self._t("rope", x)
        positions = self._t("rope", positions)
        if isinstance(max_positions, bool) or not isinstance(max_positions, (int, np.integer)) \
                or not 1 <= max_positions <= MAX_ROPE_POSITIONS:
            raise GraphError(f"rope: max_positions must be an integer 1..{MAX_ROPE_POSITIONS}, "
                             f"not {max_positions!r}")
        if not x.dtype.is_float:
            raise GraphError(f"rope: needs a float tensor, got {x.dtype.name}")
        if x.ndim < 2 or x.shape[-1] % 2:
            raise GraphError(f"rope: x must be [..., T, d] with d even, got {list(x.shape)}")
        if positions.dtype.name != "int32" or positions.shape != (x.shape[-2],):
            raise GraphError(f"rope: positions must be int32 [{x.shape[-2]}], got "
                             f"{positions.dtype.name}{list(positions.shape)}")
        return self._node("rope", [x, positions], x.shape, x.dtype, base=float(base),
                          max_positions=int(max_positions))

    # ---- convolution and pooling (NCHW, PyTorch conventions; lowered by compiler.conv) -------------------
    def _image(self, op, x) -> Tensor:
        x = self._t(op, x)
        if x.ndim != 4:
            raise GraphError(f"{op}: x must be a 4-d NCHW tensor [N, C, H, W], got {list(x.shape)}")
        return x

    def conv2d(self, x, w, bias=None, stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
        """2-d convolution (PyTorch ``conv2d``): x [N, C_in, H, W], w [C_out, C_in / groups, kH, kW]
        (a constant: its values are packed at compile time), bias [C_out] or None; stride,
        padding (zeros) and dilation an int or an (h, w) pair.  int8 x int8 gives int32
        (the MXM's accumulators; bias then int32), float16 gives float16.  Lowered as matrix
        products over windows gathered on the chip (:mod:`lpucore.compiler.conv`)."""
        x = self._image("conv2d", x)
        w = self._t("conv2d", w)
        if w.ndim != 4 or w.id not in self.constants:
            raise GraphError(f"conv2d: w must be a 4-d constant [C_out, C_in / groups, kH, kW], got {w}")
        if x.dtype != w.dtype or x.dtype.name not in ("int8", "float16"):
            raise GraphError(f"conv2d: x and w must both be int8 or both float16, got {x.dtype.name} "
                             f"and {w.dtype.name}")
        groups = int(groups)
        N, C, H, W = x.shape
        Co, Cg, kh, kw = w.shape
        if groups < 1 or C % groups or Co % groups or Cg * groups != C:
            raise GraphError(f"conv2d: groups={groups} does not fit C_in={C}, C_out={Co} and w {list(w.shape)}")
        geo = self._geometry("conv2d", x, (kh, kw), stride, padding, dilation)
        od = dt.INT32 if x.dtype.name == "int8" else x.dtype
        ins = [x, w]
        if bias is not None:
            b = self._t("conv2d", bias)
            if b.shape != (Co,) or b.dtype != od:
                raise GraphError(f"conv2d: bias must be {od.name}[{Co}], got {b.dtype.name}{list(b.shape)}")
            ins.append(b)
        return self._node("conv2d", ins, (N, Co) + geo["out"], od, groups=groups, **geo["attrs"])

    def _geometry(self, op, x, kernel, stride, padding, dilation, ceil: bool = False) -> Dict[str, Any]:
        """Check a window's geometry (ints or (h, w) pairs): {"attrs": node attributes, "out": (Ho, Wo)}."""
        def pair(name, v, lo):
            p = (v, v) if isinstance(v, (int, np.integer)) else tuple(v)
            if len(p) != 2 or not all(isinstance(a, (int, np.integer)) and a >= lo for a in p):
                raise GraphError(f"{op}: {name} must be an int >= {lo} or a pair of them, got {v!r}")
            return tuple(int(a) for a in p)
        k, s = pair("kernel_size", kernel, 1), pair("stride", stride, 1)
        p, d = pair("padding", padding, 0), pair("dilation", dilation, 1)
        H, W = x.shape[2:]
        out = tuple((n + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i, n in enumerate((H, W)))
        if min(out) < 1:
            raise GraphError(f"{op}: a {k[0]}x{k[1]} window (dilation {d}, padding {p}) does not fit "
                             f"a {H}x{W} image")
        return {"attrs": {"kernel": k, "stride": s, "padding": p, "dilation": d}, "out": out}

    def max_pool2d(self, x, kernel_size, stride=None, padding=0, dilation=1) -> Tensor:
        """Max pooling (PyTorch ``max_pool2d``, floor mode; stride defaults to the kernel size;
        padding at most half the kernel, pads never win)."""
        x = self._image("max_pool2d", x)
        geo = self._geometry("max_pool2d", x, kernel_size, kernel_size if stride is None else stride,
                             padding, dilation)
        k, p = geo["attrs"]["kernel"], geo["attrs"]["padding"]
        if p[0] > k[0] // 2 or p[1] > k[1] // 2:
            raise GraphError(f"max_pool2d: padding {p} must be at most half the kernel {k}")
        return self._node("max_pool2d", [x], x.shape[:2] + geo["out"], x.dtype, **geo["attrs"])

    def avg_pool2d(self, x, kernel_size, stride=None, padding=0, count_include_pad: bool = True) -> Tensor:
        """Average pooling (PyTorch ``avg_pool2d``, floor mode, float tensors); pads count as zeros
        unless ``count_include_pad=False``."""
        x = self._image("avg_pool2d", x)
        if not x.dtype.is_float:
            raise GraphError(f"avg_pool2d: needs a float tensor, got {x.dtype.name}")
        geo = self._geometry("avg_pool2d", x, kernel_size, kernel_size if stride is None else stride, padding, 1)
        k, p = geo["attrs"]["kernel"], geo["attrs"]["padding"]
        if p[0] > k[0] // 2 or p[1] > k[1] // 2:
            raise GraphError(f"avg_pool2d: padding {p} must be at most half the kernel {k}")
        return self._node("avg_pool2d", [x], x.shape[:2] + geo["out"], x.dtype,
                          count_include_pad=bool(count_include_pad), **geo["attrs"])

    def global_avg_pool2d(self, x) -> Tensor:
        """The mean over H and W of a float NCHW tensor: [N, C, 1, 1] (``adaptive_avg_pool2d(x, 1)``)."""
        x = self._image("global_avg_pool2d", x)
        if not x.dtype.is_float:
            raise GraphError(f"global_avg_pool2d: needs a float tensor, got {x.dtype.name}")
        return self._node("global_avg_pool2d", [x], x.shape[:2] + (1, 1), x.dtype)

    def batch_norm(self, x, mean, var, gamma=None, beta=None, eps: float = 1e-5) -> Tensor:
        """Batch normalisation in inference form over the channels of a float NCHW tensor:
        (x - mean) / sqrt(var + eps) * gamma + beta, each [C].  Folded into the preceding
        convolution when it can be, else applied on the VXM (:mod:`lpucore.compiler.conv`)."""
        x = self._image("batch_norm", x)
        if not x.dtype.is_float:
            raise GraphError(f"batch_norm: needs a float tensor, got {x.dtype.name}")
        C = x.shape[1]
        ones, zeros = np.ones(C, x.dtype.numpy), np.zeros(C, x.dtype.numpy)
        ins = [x]
        for name, v in (("mean", mean), ("var", var), ("gamma", ones if gamma is None else gamma),
                        ("beta", zeros if beta is None else beta)):
            t = self._t("batch_norm", v, like=x)
            if t.shape != (C,) or t.dtype != x.dtype:
                raise GraphError(f"batch_norm: {name} must be {x.dtype.name}[{C}], got {t.dtype.name}{list(t.shape)}")
            ins.append(t)
        if not float(eps) > 0:
            raise GraphError(f"batch_norm: eps must be positive, got {eps}")
        return self._node("batch_norm", ins, x.shape, x.dtype, eps=float(eps))

    def depth_to_space(self, x, block: int) -> Tensor:
        """Blocks of channels to blocks of pixels (ONNX ``DepthToSpace``, mode "DCR"; TensorFlow's
        ``depth_to_space``): NCHW [N, C * r * r, H, W] -> [N, C, H * r, W * r] with
        ``out[n, c, h * r + i, w * r + j] = x[n, (i * r + j) * C + c, h, w]`` (r = ``block``)."""
        x = self._image("depth_to_space", x)
        r = block
        if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1:
            raise GraphError(f"depth_to_space: block must be an int >= 1, got {block!r}")
        N, C, H, W = x.shape
        if C % (r * r):
            raise GraphError(f"depth_to_space: {C} channels are not a multiple of block x block = {r * r}")
        return self._node("depth_to_space", [x], (N, C // (r * r), H * r, W * r), x.dtype, block=int(r))

    def flatten(self, x, start_dim: int = 1, end_dim: int = -1) -> Tensor:
        """x with axes start_dim..end_dim merged into one (PyTorch ``flatten``; default: all but the first)."""
        x = self._t("flatten", x)
        nd = max(x.ndim, 1)
        a, b = int(start_dim) % nd, int(end_dim) % nd
        if not (-nd <= start_dim < nd and -nd <= end_dim < nd) or a > b:
            raise GraphError(f"flatten: dims {start_dim}..{end_dim} are not a range of a {x.ndim}-d tensor")
        shape = x.shape[:a] + (int(np.prod(x.shape[a:b + 1])),) + x.shape[b + 1:]
        return self._node("flatten", [x], shape, x.dtype)

    def _window(self, x, fill, kind: str, apart: bool = False, **attrs) -> Tensor:
        """Internal (made by :mod:`lpucore.compiler.conv`): the windows of a channel-last image x
        [N*H*W, C] (``kind="rows"``) or an NCHW one (``"nchw"``): [positions, taps * C] (tap-major),
        or [positions, taps, C] with ``apart``; pads read from fill [1, C]
        (:func:`lpucore.convref.window_rows`)."""
        N, C, H, W = attrs["image"]
        Ho, Wo = attrs["out"]
        T = attrs["kernel"][0] * attrs["kernel"][1]
        shape = (N * Ho * Wo, T, C) if apart else (N * Ho * Wo, T * C)
        return self._node("window", [x, fill], shape, x.dtype, kind=kind, **attrs)

    def _conv_taps(self, x, w, **attrs) -> Tensor:
        """Internal (made by :mod:`lpucore.compiler.conv`): a convolution of the channel-last image x
        [N*H*W, C] (NCHW shape ``attrs["image"]``) by the weight matrix w [taps * C, C_out] with no
        window: [N*Ho*Wo, C_out], int32 (int8 operands) or float16, each tap's rows read from x. With
        ``pack=(Pi, Po)``, x is [N*H*W / Pi, Pi * C] (Pi pixels a row) and the result [N*Ho*Wo / Po,
        w.shape[1]] (:func:`lpucore.compiler.conv.packed_groups`)."""
        N, C, H, W = attrs["image"]
        Ho, Wo = attrs["out"]
        Po = attrs["pack"][1] if "pack" in attrs else 1
        od = "int32" if x.dtype.name == "int8" else "float16"
        return self._node("conv_taps", [x, w], (N * Ho * Wo // Po, w.shape[1]), dt.get(od), **attrs)

    def _d2s(self, x, image, block: int) -> Tensor:
        """Internal (made by :mod:`lpucore.compiler.conv`): ``depth_to_space`` of a channel-last image x
        [N*H*W, C*r*r] of NCHW shape ``image``: [N*(H*r)*(W*r), C]."""
        N, Cr, H, W = image
        r = int(block)
        return self._node("d2s", [x], (N * H * r * W * r, Cr // (r * r)), x.dtype, image=tuple(image), block=r)

    # ---- quantisation ------------------------------------------------------------------------------------
    def quantize(self, x, scale, zero_point=0, axis: Optional[int] = None) -> Tensor:
        """int8 q = clip(round_half_even(x / scale) + zero_point, -128, 127); per tensor
        (scalar scale) or per channel along the last axis (``axis=-1``, scale [C])."""
        x = self._t("quantize", x)
        if not x.dtype.is_float:
            raise GraphError(f"quantize: needs a float tensor, got {x.dtype.name}")
        scale = self._qparam("quantize", scale, x, axis, x.dtype)
        return self._node("quantize", [x, scale], x.shape, dt.INT8, zero_point=int(zero_point), axis=axis)

    def dequantize(self, q, scale, zero_point=0, axis: Optional[int] = None, dtype="float16") -> Tensor:
        """x = (q - zero_point) * scale, as float16 (default) or float32."""
        q = self._t("dequantize", q)
        if q.dtype.name != "int8":
            raise GraphError(f"dequantize: needs an int8 tensor, got {q.dtype.name}")
        d = dt.get(dtype)
        if not d.is_float:
            raise GraphError(f"dequantize: gives a float dtype, not {d.name}")
        scale = self._qparam("dequantize", scale, q, axis, d)
        return self._node("dequantize", [q, scale], q.shape, d, zero_point=int(zero_point), axis=axis)

    def _qparam(self, op, scale, x, axis, d):
        if not (-128 <= 0 <= 127):
            pass
        if axis is None:
            s = np.asarray(scale, dtype=np.float64)
            if s.size != 1 or not np.isfinite(s).all() or (s <= 0).any():
                raise GraphError(f"{op}: a per-tensor scale is one positive number")
            return self.constant(None, np.array(float(s), dtype=np.float32).reshape(()))
        if axis not in (-1, x.ndim - 1):
            raise GraphError(f"{op}: per-channel scales run along the last axis only")
        s = np.asarray(scale, dtype=np.float64).reshape(-1)
        if s.shape != (x.shape[-1],) or not np.isfinite(s).all() or (s <= 0).any():
            raise GraphError(f"{op}: per-channel scale must be {x.shape[-1]} positive numbers")
        return self.constant(None, s.astype(np.float32))

    # ---- between chips ----------------------------------------------------------------------------------
    def allgather(self, x, group: int) -> Tensor:
        """``[group, *x.shape]``: block r is x as chip r of the group computed it.  For graphs
        that one program per chip of a group runs (as the tensor-parallel partitioner
        makes them); such a graph compiles only for a system."""
        x = self._t("allgather", x)
        if int(group) < 2:
            raise GraphError(f"allgather: a group has at least 2 chips, got {group}")
        return self._node("allgather", [x], (int(group),) + x.shape, x.dtype, group=int(group))

    def allreduce(self, x, group: int) -> Tensor:
        """The sum of x over the chips of the group, added in chip order (so every chip gets
        the same bits).  See :meth:`allgather`."""
        x = self._t("allreduce", x)
        if int(group) < 2:
            raise GraphError(f"allreduce: a group has at least 2 chips, got {group}")
        if x.dtype.name not in ("float16", "float32", "int32"):
            raise GraphError(f"allreduce: sums float16, float32 or int32, not {x.dtype.name}")
        return self._node("allreduce", [x], x.shape, x.dtype, group=int(group))

    # ---- introspection ------------------------------------------------------------------------------------
    def tensor(self, tid: int) -> Tensor:
        return self.tensors[tid]

    def signature(self) -> tuple:
        """A hashable description of everything a compiled program depends on: the graph's name, its
        inputs and states (with their tensor ids, which the operations refer to, and the states' initial
        values' hash), its constants (name, shape, dtype, values' hash), every operation with its output's
        shape and dtype (a reshape's target shape and a product's or cast's dtype are nowhere else) and
        attributes, its outputs and state updates. Two graphs with one signature compile to one program
        (the compile cache's key, ``lpucore.compiler.store.cache_key``)."""
        import hashlib
        parts: List[tuple] = [("graph", self.name)]
        parts += [("in", n, t.id, t.shape, t.dtype.name) for n, t in self.inputs.items()]
        for tid, a in sorted(self.constants.items()):
            parts.append(("const", tid, self.constant_names.get(tid), a.shape, a.dtype.str,
                          hashlib.sha1(a.tobytes()).hexdigest()))
        for n in self.nodes:
            t = self.tensors[n.output]
            parts.append((n.op, tuple(n.inputs), n.output, tuple(t.shape), t.dtype.name,
                          tuple(sorted((k, repr(v)) for k, v in n.attrs.items()))))
        parts += [("out", n, t.id) for n, t in self.outputs.items()]
        parts += [("state", n, t.id, t.shape, t.dtype.name, hashlib.sha1(self.state_init[t.id].tobytes()).hexdigest())
                  for n, t in self.states.items()]
        parts += [("assign", s, v.id) for s, v in self.assigns.items()]
        return tuple(parts)
