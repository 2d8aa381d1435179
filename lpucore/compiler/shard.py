"""Tensor parallelism: one graph becomes P graphs, one per chip of a group, that meet at
all-gather and all-reduce nodes (lowered by :mod:`lpucore.compiler.collective`).

Every value of the graph gets a *sharding*: replicated (``None``: every chip holds all
of it) or an axis k (chip r holds the r-th of P equal, contiguous parts along axis k).
Inputs and outputs are replicated: the host writes each input to every chip and reads
the outputs from the first.  The rules, applied node by node in graph order, are
Megatron-LM's, derived from the shapes alone (so all P graphs have the same structure):

* ``matmul`` of a replicated activation by a constant weight [K, N] splits the weight
  by columns (each chip computes N / P outputs) when N divides by P and each part is
  at least ``min_cols`` wide or the weight has at least ``min_bytes`` (a small weight is
  cheaper to repeat on every chip than to gather its product).  An activation split along K meets the weight split by
  rows; the partial products are summed by an all-reduce (in chip order).  A split
  batch or row axis stays split (attention over split heads).
* Elementwise operations keep a common split; a replicated operand that is not
  broadcast along the split axis is sliced (a constant at compile time, free; any
  other value by a local ``slice``).  Operands split along different axes are gathered.
* ``reshape`` keeps a split when the parts stay contiguous (``[1, H * d]`` split along
  its last axis is ``[1, H, d]`` split by heads); ``transpose`` moves it; reductions,
  ``softmax``, the norms and ``rope`` keep splits of axes they do not work along.
* ``scatter`` into a tensor split by columns writes each rank's columns of the new rows;
  ``gather_blocks`` and ``scatter_blocks`` work on whole tensors (every rank the same blocks).
* Anything else gathers its operands first.
* A state (``Graph.state``, for example a KV cache) is split along the axis that makes
  the fewest bytes cross the links, found by trying each candidate axis.

An all-gather leaves [P, *part]; a transpose and a reshape put the parts in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple, Union

import numpy as np

from ..errors import CompileError
from ..graph import BINARY, UNARY_ANY, UNARY_FLOAT, Graph, Tensor

Spec = Optional[int]           # None: replicated; k: split along axis k
# per rank, the indices along the split axis it holds (None: equal contiguous parts)
Idx = Optional[Tuple[np.ndarray, ...]]


@dataclass
class Partition:
    """P graphs (``graphs[r]`` runs on chip r of the group) and how they split the work."""

    graphs: List[Graph]
    state_axes: Dict[str, Spec]                   # state name -> its split axis (None: replicated)
    collectives: List[Tuple[str, str, int]] = field(default_factory=list)   # (op, source tensor, bytes per chip)

    @property
    def link_bytes(self) -> int:
        """Bytes each chip sends per run: every collective's part goes to P - 1 peers."""
        P = len(self.graphs)
        return sum(b for _, _, b in self.collectives) * (P - 1)


def _prod(xs) -> int:
    return int(np.prod(xs)) if len(xs) else 1


def _runs(ix: np.ndarray) -> List[Tuple[int, int]]:
    """[(a, b), ...] with ix = concat(range(a, b), ...): its increasing contiguous runs."""
    cut = np.flatnonzero(np.diff(ix) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(ix, cut)]


def _same(i: Idx, j: Idx) -> bool:
    if i is None or j is None:
        return i is j
    return all(np.array_equal(a, b) for a, b in zip(i, j))


def _key(i: Idx):
    return None if i is None else tuple(a.tobytes() for a in i)


class _Builder:
    """Builds rank ``rank``'s graph.  ``dry``: shapes only (constants are not copied), to
    count link traffic while choosing state splits."""

    def __init__(self, g: Graph, P: int, rank: int, state_axes: Dict[str, Spec], min_cols: int,
                 dry: bool = False, min_bytes: float = float("inf")):
        self.g, self.P, self.rank, self.min_cols, self.dry = g, P, rank, min_cols, dry
        self.min_bytes = min_bytes
        self.state_axes = state_axes
        self.out = Graph(g.name)
        self.val: Dict[int, Tuple[Tensor, Spec, Idx]] = {}
        self.cache: Dict[tuple, Tensor] = {}
        self.names: Set[str] = set()
        self.collectives: List[Tuple[str, str, int]] = []

    # ---- values in the wanted sharding --------------------------------------------------------------
    def is_const(self, tid: int) -> bool:
        return tid in self.g.constants

    def mine(self, n: int, idx: Idx) -> np.ndarray:
        """The indices (of n along the split axis) this rank holds."""
        if idx is not None:
            return idx[self.rank]
        k = n // self.P
        return np.arange(self.rank * k, (self.rank + 1) * k)

    def const(self, tid: int, spec: Spec, idx: Idx = None) -> Tensor:
        key = (tid, spec, _key(idx))
        if key not in self.cache:
            arr = self.g.constants[tid]
            if spec is not None:
                ix = self.mine(arr.shape[spec], idx)
                if self.dry:
                    shape = list(arr.shape)
                    shape[spec] = len(ix)
                    arr = np.broadcast_to(np.zeros((), arr.dtype), shape)
                else:
                    arr = np.ascontiguousarray(np.take(arr, ix, axis=spec))
            name = self.g.constant_names.get(tid)
            if name is not None and name in self.names:
                name = f"{name}@{'full' if spec is None else 'part%d' % spec}"
                while name in self.names:
                    name += "'"
            if name is not None:
                self.names.add(name)
            if self.dry:
                t = self.out._new(arr.shape, arr.dtype, name)
                self.out.constants[t.id] = arr
            else:
                t = self.out.constant(name, arr)
            self.cache[key] = t
        return self.cache[key]

    def spec(self, tid: int) -> Spec:
        return None if self.is_const(tid) else self.val[tid][1]

    def idx(self, tid: int) -> Idx:
        return None if self.is_const(tid) else self.val[tid][2]

    def take(self, f: Tensor, k: int, ix: np.ndarray) -> Tensor:
        """f's indices ix along axis k (slices of its contiguous runs, concatenated)."""
        pre = tuple(slice(None) for _ in range(k))
        parts = [self.out.slice(f, pre + (slice(a, b),)) for a, b in _runs(ix)]
        return parts[0] if len(parts) == 1 else self.out.concat(parts, axis=k)

    def full(self, tid: int) -> Tensor:
        if self.is_const(tid):
            return self.const(tid, None)
        t, s, idx = self.val[tid]
        if s is None:
            return t
        key = (tid, None, None)
        if key not in self.cache:
            P, src = self.P, self.g.tensors[tid]
            self.collectives.append(("allgather", src.name or f"%{tid}", _bytes(t)))
            st = self.out.allgather(t, P)                       # [P, *part]
            if s > 0:
                axes = list(range(1, s + 1)) + [0] + list(range(s + 1, t.ndim + 1))
                st = self.out.transpose(st, axes)               # [..., P, part_s, ...]
            full = self.out.reshape(st, src.shape)             # parts in rank order
            if idx is not None:                                 # ... put in place
                full = self.take(full, s, np.argsort(np.concatenate(idx), kind="stable"))
            self.cache[key] = full
        return self.cache[key]

    def split(self, tid: int, k: int, idx: Idx = None) -> Tensor:
        if self.is_const(tid):
            return self.const(tid, k, idx)
        t, s, have = self.val[tid]
        if s == k and _same(have, idx):
            return t
        key = (tid, k, _key(idx))
        if key not in self.cache:
            f = self.full(tid)
            self.cache[key] = self.take(f, k, self.mine(f.shape[k], idx))
        return self.cache[key]

    def local(self, tid: int) -> Tensor:
        """The value as this rank holds it now (split or whole)."""
        return self.full(tid) if self.spec(tid) is None else self.val[tid][0]

    # ---- the graph ------------------------------------------------------------------------------------------
    def build(self) -> Graph:
        g, out = self.g, self.out
        for name, t in g.inputs.items():
            self.val[t.id] = (out.input(name, t.shape, t.dtype.name), None, None)
            self.names.add(name)
        for name, t in g.states.items():
            k = self.state_axes.get(name)
            init = g.state_init[t.id]
            shape = list(t.shape)
            if k is not None:
                init = np.take(init, self.mine(shape[k], None), axis=k)
                shape[k] //= self.P
            self.val[t.id] = (out.state(name, shape, t.dtype.name, init=init), k, None)
            self.names.add(name)
        for n in g.nodes:
            t = g.tensors[n.output]
            try:
                r = self.node(n, t)
            except CompileError:
                raise
            except Exception as e:          # a rule produced a local graph the Graph API refuses
                raise CompileError(f"tensor parallelism: cannot split {n.op} -> {t}: {e}") from e
            self.val[t.id] = r if len(r) == 3 else (r[0], r[1], None)
        state_names = {t.id: name for name, t in g.states.items()}
        for sid, v in g.assigns.items():
            k = self.state_axes.get(state_names[sid])
            local = self.val[sid][0]
            out.assign(local, self.full(v.id) if k is None else self.split(v.id, k))
        for name, t in g.outputs.items():
            out.output(name, self.full(t.id))
        return out

    def node(self, n, t: Tensor):
        g, out, op = self.g, self.out, n.op
        ins = [g.tensors[i] for i in n.inputs]
        if op in ("allgather", "allreduce"):
            raise CompileError(f"{op}: the graph given to a system compile must not have collectives already")
        x0 = ins[0]
        s, ix = self.spec(x0.id), self.idx(x0.id)
        if op in UNARY_FLOAT + UNARY_ANY or op == "cast":
            x = self.local(x0.id)
            if op == "cast":
                return out.cast(x, t.dtype.name), s, ix
            if op == "gelu":
                return out.gelu(x, approximate=n.attrs["approximate"]), s, ix
            return getattr(out, op)(x), s, ix
        if op in BINARY:
            return self.elementwise(op, ins, t)
        if op == "matmul":
            return self.matmul(ins[0], ins[1], t)
        if op in ("sum", "max", "mean", "softmax", "layernorm", "rmsnorm"):
            return self.reduction(n, ins, s, ix)
        if op in ("quantize", "dequantize"):
            return self.quantization(n, ins, t, s, ix)
        if op == "reshape":
            return self.reshape(x0, t)
        if op == "transpose":
            axes = n.attrs["axes"]
            return out.transpose(self.local(x0.id), axes), (None if s is None else list(axes).index(s)), ix
        if op == "concat":
            return self.concat(ins, n.attrs["axis"])
        if op == "slice":
            return self.slice(x0, n, t)
        if op in ("gather", "scatter", "rope"):
            return self.addressed(n, ins, s, ix)
        if op == "gather_blocks":       # blocks at run-time indices: the rows whole on every rank
            return out.gather_blocks(self.full(x0.id), self.full(ins[1].id), t.shape[1]), None
        if op == "scatter_blocks":
            return out.scatter_blocks(self.full(x0.id), self.full(ins[1].id), self.full(ins[2].id)), None
        raise CompileError(f"tensor parallelism: no rule for {op}")

    def reduction(self, n, ins: List[Tensor], s, ix):
        """Reductions and norms along the lanes (or across rows): an operand split along the axis
        worked along is gathered whole first; otherwise each rank reduces its own part."""
        out, op, x0 = self.out, n.op, ins[0]
        rows = n.attrs.get("axis", -1) == -2            # a reduction across rows (sum / max / mean)
        red = x0.ndim - (2 if rows else 1)              # the axis worked along
        if s == red:
            x, s, ix = self.full(x0.id), None, None
        else:
            x = self.local(x0.id)
            if rows and s is not None and s > red and not n.attrs["keepdims"]:
                s -= 1                                  # the lanes axis moves up one
        if op == "softmax":
            return out.softmax(x), s, ix
        if op == "layernorm":
            return out.layernorm(x, self.full(ins[1].id), self.full(ins[2].id), eps=n.attrs["eps"]), s, ix
        if op == "rmsnorm":
            return out.rmsnorm(x, self.full(ins[1].id), eps=n.attrs["eps"]), s, ix
        return getattr(out, op)(x, axis=-2 if rows else -1, keepdims=n.attrs["keepdims"]), s, ix

    def quantization(self, n, ins: List[Tensor], t: Tensor, s, ix):
        """quantize / dequantize: per-channel scales along a split last axis are this rank's part."""
        g, out, op, x0 = self.g, self.out, n.op, ins[0]
        x = self.local(x0.id)
        axis = n.attrs["axis"]
        arr = g.constants[ins[1].id]
        if axis is not None and s == x0.ndim - 1:
            arr = arr[self.mine(arr.shape[-1], ix)]
        scale: Union[np.ndarray, float] = float(arr.reshape(())) if axis is None else arr
        if op == "quantize":
            return out.quantize(x, scale, n.attrs["zero_point"], axis=axis), s, ix
        return out.dequantize(x, scale, n.attrs["zero_point"], axis=axis, dtype=t.dtype.name), s, ix

    def addressed(self, n, ins: List[Tensor], s, ix):
        """gather, scatter and rope: the indices whole; a table or state split by columns keeps its split."""
        out, op, x0 = self.out, n.op, ins[0]
        if op == "gather":
            s1, ix1 = self.spec(ins[1].id), self.idx(ins[1].id)
            return out.gather(self.full(x0.id), self.local(ins[1].id)), s1, ix1
        if op == "scatter":
            if s == 1:          # x split by columns: each rank writes its columns of the rows
                return out.scatter(self.local(x0.id), self.full(ins[1].id), self.split(ins[2].id, 1, ix)), s, ix
            return out.scatter(self.full(x0.id), self.full(ins[1].id), self.full(ins[2].id)), None
        if s is not None and s < x0.ndim - 2:
            return out.rope(self.local(x0.id), self.full(ins[1].id), base=n.attrs["base"],
                            max_positions=n.attrs["max_positions"]), s, ix
        return out.rope(self.full(x0.id), self.full(ins[1].id), base=n.attrs["base"],
                        max_positions=n.attrs["max_positions"]), None

    def aligned(self, xs, K: int, no: int, idx: Idx) -> List[Tensor]:
        """Operands of an op whose output (``no`` axes) is split along K with ``idx``: split
        operands as they are, whole ones sliced unless broadcast along K."""
        args = []
        for x in xs:
            a = K - (no - x.ndim)
            if self.spec(x.id) is None and (a < 0 or x.shape[a] == 1):
                args.append(self.full(x.id))
            else:
                args.append(self.split(x.id, a, idx))
        return args

    def elementwise(self, op, ins, t):
        no = t.ndim
        splits = [(self.spec(x.id) + no - x.ndim, self.idx(x.id)) for x in ins if self.spec(x.id) is not None]
        if not splits or any(k != splits[0][0] or not _same(i, splits[0][1]) for k, i in splits):
            return getattr(self.out, op)(*[self.full(x.id) for x in ins]), None
        K, idx = splits[0]
        return getattr(self.out, op)(*self.aligned(ins, K, no, idx)), K, idx

    def concat(self, ins, ax: int):
        out, P = self.out, self.P
        specs = [self.spec(x.id) for x in ins]
        if any(s == ax for s in specs) and all(s in (ax, None) for s in specs) \
                and all(s == ax or x.shape[ax] % P == 0 for s, x in zip(specs, ins)):
            # parts along the concatenation axis: each chip concatenates its parts
            parts, off = [], 0
            runs: List[List[np.ndarray]] = [[] for _ in range(P)]
            for x, _s in zip(ins, specs):
                xi = self.idx(x.id)
                parts.append(self.split(x.id, ax, xi))
                for r in range(P):
                    runs[r].append(off + (xi[r] if xi is not None else
                                          np.arange(r * x.shape[ax] // P, (r + 1) * x.shape[ax] // P)))
                off += x.shape[ax]
            idx = tuple(np.concatenate(i) for i in runs)
            contiguous = all(np.array_equal(idx[r], np.arange(r * off // P, (r + 1) * off // P)) for r in range(P))
            return out.concat(parts, axis=ax), ax, (None if contiguous else idx)
        if all(s is not None and s != ax for s in specs) and len(set(specs)) == 1 \
                and all(_same(self.idx(x.id), self.idx(ins[0].id)) for x in ins):
            return out.concat([self.local(x.id) for x in ins], axis=ax), specs[0], self.idx(ins[0].id)
        return out.concat([self.full(x.id) for x in ins], axis=ax), None

    def matmul(self, a: Tensor, b: Tensor, t: Tensor):
        out, P = self.out, self.P
        if a.ndim < 2 or b.ndim < 2:
            return out.matmul(self.full(a.id), self.full(b.id), out_dtype=t.dtype.name), None
        no = t.ndim
        sa, sb = self.spec(a.id), self.spec(b.id)

        def role(x, s):
            if s is None:
                return None
            if s == x.ndim - 1:
                return "K" if x is a else "N"
            if s == x.ndim - 2:
                return "M" if x is a else "K"
            return s + no - x.ndim                     # a batch axis, in the output's numbering
        ra, rb = role(a, sa), role(b, sb)
        od = t.dtype.name
        if ra is None and rb is None:
            N = b.shape[-1]
            if self.is_const(b.id) and b.ndim == 2 and N % P == 0 and (
                    N // P >= self.min_cols or b.size * b.dtype.nbytes >= self.min_bytes):
                return out.matmul(self.full(a.id), self.const(b.id, 1), out_dtype=od), no - 1
            return out.matmul(self.full(a.id), self.full(b.id), out_dtype=od), None
        if "K" in (ra, rb) and ra in ("K", None) and rb in ("K", None) and a.shape[-1] % P == 0 \
                and (ra is None or rb is None or _same(self.idx(a.id), self.idx(b.id))):
            idx = self.idx(a.id) if ra == "K" else self.idx(b.id)
            part = out.matmul(self.split(a.id, a.ndim - 1, idx), self.split(b.id, b.ndim - 2, idx), out_dtype=od)
            self.collectives.append(("allreduce", t.name or f"%{t.id}", _bytes(part)))
            return out.allreduce(part, P), None
        if isinstance(ra, int) or isinstance(rb, int):
            K = ra if isinstance(ra, int) else rb
            idx = self.idx(a.id) if isinstance(ra, int) else self.idx(b.id)
            if (ra is None or ra == K) and (rb is None or rb == K) and \
                    (ra is None or rb is None or _same(self.idx(a.id), self.idx(b.id))):
                a_part, b_part = self.aligned((a, b), K, no, idx)
                return out.matmul(a_part, b_part, out_dtype=od), K, idx
        if ra == "M" and rb is None:
            return out.matmul(self.local(a.id), self.full(b.id), out_dtype=od), no - 2, self.idx(a.id)
        if rb == "N" and ra is None:
            return out.matmul(self.full(a.id), self.local(b.id), out_dtype=od), no - 1, self.idx(b.id)
        return out.matmul(self.full(a.id), self.full(b.id), out_dtype=od), None

    def reshape(self, x: Tensor, t: Tensor):
        s = self.spec(x.id)
        si, so = x.shape, t.shape
        if s is not None and self.idx(x.id) is None:
            pre = _prod(si[:s])
            for j in range(len(so)):
                if _prod(so[:j]) == pre and so[j] > 1 and so[j] % self.P == 0 \
                        and so[j] * _prod(so[j + 1:]) == si[s] * _prod(si[s + 1:]):
                    shape = list(so)
                    shape[j] //= self.P
                    return self.out.reshape(self.local(x.id), shape), j
        return self.out.reshape(self.full(x.id), so), None

    def slice(self, x: Tensor, n, t: Tensor):
        s = self.spec(x.id)
        starts, stops, keep = n.attrs["starts"], n.attrs["stops"], n.attrs["keep"]
        if s is not None and keep[s] and starts[s] == 0 and stops[s] == x.shape[s]:
            key = tuple(slice(None) if i == s else (slice(a, b) if k else a)
                        for i, (a, b, k) in enumerate(zip(starts, stops, keep)))
            return self.out.slice(self.local(x.id), key), s - sum(1 for k in keep[:s] if not k), self.idx(x.id)
        key = tuple(slice(a, b) if k else a for a, b, k in zip(starts, stops, keep))
        return self.out.slice(self.full(x.id), key), None


def _bytes(t: Tensor) -> int:
    return t.size * t.dtype.nbytes


def _state_candidates(g: Graph, P: int) -> Dict[str, List[Spec]]:
    return {name: [None] + [k for k in range(t.ndim) if t.shape[k] % P == 0 and t.shape[k] >= P]
            for name, t in g.states.items()}


def partition(graph: Graph, P: int, state_axes: Optional[Dict[str, Spec]] = None,
              min_cols: int = 1, min_bytes: float = float("inf")) -> Partition:
    """Split ``graph`` over a group of P chips (see the module doc).  ``state_axes``
    fixes the split axis of some states (None: replicated); the others are chosen."""
    if P < 2:
        raise CompileError(f"tensor parallelism needs at least 2 chips, got {P}")
    fixed = dict(state_axes or {})
    for name in fixed:
        if name not in graph.states:
            raise CompileError(f"state_axes names {name!r}, which is not a state of the graph")
    cands = _state_candidates(graph, P)
    for name, k in fixed.items():
        if k is not None and k not in cands[name]:
            raise CompileError(f"state {name!r} {list(graph.states[name].shape)} cannot be split into {P} "
                               f"along axis {k}")
    axes = {name: fixed.get(name) for name in graph.states}

    def cost(ax):
        b = _Builder(graph, P, 0, ax, min_cols, dry=True, min_bytes=min_bytes)
        b.build()
        return sum(x for _, _, x in b.collectives)
    # each free state in turn: the axis with the least link traffic (ties: split, to save SRAM)
    for name in graph.states:
        if name in fixed:
            continue
        best: Optional[Tuple[int, Spec]] = None
        for k in cands[name]:
            trial = dict(axes, **{name: k})
            c = cost(trial)
            if best is None or c < best[0] or (c == best[0] and best[1] is None):
                best = (c, k)
        assert best is not None                     # the candidates start with None (replicated)
        axes[name] = best[1]
    builders = [_Builder(graph, P, r, axes, min_cols, min_bytes=min_bytes) for r in range(P)]
    graphs = [b.build() for b in builders]
    return Partition(graphs, axes, builders[0].collectives)
