"""Tensor parallelism: one graph becomes P graphs, one per chip of a group, that meet at
all-gather and all-reduce nodes (lowered by :mod:`lpucore.compiler.collective`).

Every value of the graph gets a *sharding*: replicated (``None``: every chip holds all
of it) or an axis k (chip r holds the r-th of P equal, contiguous parts along axis k).
Inputs and outputs are replicated: the host writes each input to every chip and reads
the outputs from the first.  The rules, applied node by node in graph order, are
Megatron-LM's, derived from the shapes alone (so all P graphs have the same structure):

* ``matmul`` of a replicated activation by a constant weight [K, N] splits the weight
  by columns (each chip computes N / P outputs) when N divides by P and each part is
  at least ``min_cols`` wide.  An activation split along K meets the weight split by
  rows; the partial products are summed by an all-reduce (in chip order).  A split
  batch or row axis stays split (attention over split heads).
* Elementwise operations keep a common split; a replicated operand that is not
  broadcast along the split axis is sliced (a constant at compile time, free; any
  other value by a local ``slice``).  Operands split along different axes are gathered.
* ``reshape`` keeps a split when the parts stay contiguous (``[1, H * d]`` split along
  its last axis is ``[1, H, d]`` split by heads); ``transpose`` moves it; reductions,
  ``softmax``, the norms and ``rope`` keep splits of axes they do not work along.
* Anything else gathers its operands first.
* A state (``Graph.state``, for example a KV cache) is split along the axis that makes
  the fewest bytes cross the links, found by trying each candidate axis.

An all-gather leaves [P, *part]; a transpose and a reshape put the parts in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CompileError
from ..graph import BINARY, UNARY_ANY, UNARY_FLOAT, Graph, Tensor

Spec = Optional[int]           # None: replicated; k: split along axis k


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


class _Builder:
    """Builds rank ``rank``'s graph."""

    def __init__(self, g: Graph, P: int, rank: int, state_axes: Dict[str, Spec], min_cols: int):
        self.g, self.P, self.rank, self.min_cols = g, P, rank, min_cols
        self.state_axes = state_axes
        self.out = Graph(g.name)
        self.val: Dict[int, Tuple[Tensor, Spec]] = {}
        self.cache: Dict[Tuple[int, Spec], Tensor] = {}
        self.names: set = set()
        self.collectives: List[Tuple[str, str, int]] = []

    # ---- values in the wanted sharding --------------------------------------------------------------
    def is_const(self, tid: int) -> bool:
        return tid in self.g.constants

    def part(self, n: int) -> Tuple[int, int]:
        k = n // self.P
        return self.rank * k, (self.rank + 1) * k

    def const(self, tid: int, spec: Spec) -> Tensor:
        key = (tid, spec)
        if key not in self.cache:
            arr = self.g.constants[tid]
            if spec is not None:
                a, b = self.part(arr.shape[spec])
                arr = np.ascontiguousarray(np.take(arr, np.arange(a, b), axis=spec))
            name = self.g.constant_names.get(tid)
            if name is not None and name in self.names:
                name = f"{name}@{'full' if spec is None else 'part%d' % spec}"
            if name is not None:
                self.names.add(name)
            self.cache[key] = self.out.constant(name, arr)
        return self.cache[key]

    def spec(self, tid: int) -> Spec:
        return None if self.is_const(tid) else self.val[tid][1]

    def full(self, tid: int) -> Tensor:
        if self.is_const(tid):
            return self.const(tid, None)
        t, s = self.val[tid]
        if s is None:
            return t
        key = (tid, None)
        if key not in self.cache:
            P, src = self.P, self.g.tensors[tid]
            self.collectives.append(("allgather", src.name or f"%{tid}", _bytes(t)))
            st = self.out.allgather(t, P)                       # [P, *part]
            if s > 0:
                axes = list(range(1, s + 1)) + [0] + list(range(s + 1, t.ndim + 1))
                st = self.out.transpose(st, axes)               # [..., P, part_s, ...]
            self.cache[key] = self.out.reshape(st, src.shape)
        return self.cache[key]

    def split(self, tid: int, k: int) -> Tensor:
        if self.is_const(tid):
            return self.const(tid, k)
        t, s = self.val[tid]
        if s == k:
            return t
        key = (tid, k)
        if key not in self.cache:
            f = self.full(tid)
            a, b = self.part(f.shape[k])
            self.cache[key] = self.out.slice(f, tuple(slice(None) for _ in range(k)) + (slice(a, b),))
        return self.cache[key]

    def splittable(self, shape, k: int) -> bool:
        return 0 <= k < len(shape) and shape[k] % self.P == 0 and shape[k] >= self.P

    # ---- the graph ------------------------------------------------------------------------------------------
    def build(self) -> Graph:
        g, out = self.g, self.out
        for name, t in g.inputs.items():
            self.val[t.id] = (out.input(name, t.shape, t.dtype.name), None)
            self.names.add(name)
        for name, t in g.states.items():
            k = self.state_axes.get(name)
            init = g.state_init[t.id]
            shape = list(t.shape)
            if k is not None:
                a, b = self.part(shape[k])
                init = np.take(init, np.arange(a, b), axis=k)
                shape[k] //= self.P
            self.val[t.id] = (out.state(name, shape, t.dtype.name, init=init), k)
            self.names.add(name)
        for n in g.nodes:
            t = g.tensors[n.output]
            try:
                self.val[t.id] = self.node(n, t)
            except CompileError:
                raise
            except Exception as e:          # a rule produced a local graph the Graph API refuses
                raise CompileError(f"tensor parallelism: cannot split {n.op} -> {t}: {e}") from e
        for sid, v in g.assigns.items():
            st = g.tensors[sid]
            k = self.state_axes.get(st.name)
            local = self.val[sid][0]
            out.assign(local, self.full(v.id) if k is None else self.split(v.id, k))
        for name, t in g.outputs.items():
            out.output(name, self.full(t.id))
        return out

    def node(self, n, t: Tensor) -> Tuple[Tensor, Spec]:
        g, out, op = self.g, self.out, n.op
        ins = [g.tensors[i] for i in n.inputs]
        if op in ("allgather", "allreduce"):
            raise CompileError(f"{op}: the graph given to a system compile must not have collectives already")
        if op in UNARY_FLOAT + UNARY_ANY or op == "cast":
            s = self.spec(ins[0].id)
            x = self.split(ins[0].id, s) if s is not None else self.full(ins[0].id)
            if op == "cast":
                return out.cast(x, t.dtype.name), s
            if op == "gelu":
                return out.gelu(x, approximate=n.attrs["approximate"]), s
            return getattr(out, op)(x), s
        if op in BINARY:
            return self.elementwise(op, ins, t)
        if op == "matmul":
            return self.matmul(ins[0], ins[1], t)
        if op in ("sum", "max", "mean", "softmax", "layernorm", "rmsnorm"):
            s = self.spec(ins[0].id)
            x = self.full(ins[0].id) if s in (None, ins[0].ndim - 1) else self.split(ins[0].id, s)
            s = None if s == ins[0].ndim - 1 else s
            if op == "softmax":
                return out.softmax(x), s
            if op == "layernorm":
                return out.layernorm(x, self.full(ins[1].id), self.full(ins[2].id), eps=n.attrs["eps"]), s
            if op == "rmsnorm":
                return out.rmsnorm(x, self.full(ins[1].id), eps=n.attrs["eps"]), s
            return getattr(out, op)(x, keepdims=n.attrs["keepdims"]), s
        if op in ("quantize", "dequantize"):
            s = self.spec(ins[0].id)
            x = self.split(ins[0].id, s) if s is not None else self.full(ins[0].id)
            axis = n.attrs["axis"]
            scale = g.constants[ins[1].id]
            if axis is not None and s == ins[0].ndim - 1:
                a, b = self.part(scale.shape[-1])
                scale = scale[a:b]
            if axis is None:
                scale = float(scale.reshape(()))
            if op == "quantize":
                return out.quantize(x, scale, n.attrs["zero_point"], axis=axis), s
            return out.dequantize(x, scale, n.attrs["zero_point"], axis=axis, dtype=t.dtype.name), s
        if op == "reshape":
            return self.reshape(ins[0], t)
        if op == "transpose":
            s = self.spec(ins[0].id)
            axes = n.attrs["axes"]
            x = self.split(ins[0].id, s) if s is not None else self.full(ins[0].id)
            return out.transpose(x, axes), (None if s is None else list(axes).index(s))
        if op == "concat":
            ax = n.attrs["axis"]
            specs = {self.spec(x.id) for x in ins}
            if len(specs) == 1 and None not in specs and ax not in specs:
                s = specs.pop()
                return out.concat([self.split(x.id, s) for x in ins], axis=ax), s
            return out.concat([self.full(x.id) for x in ins], axis=ax), None
        if op == "slice":
            return self.slice(ins[0], n, t)
        if op == "gather":
            s = self.spec(ins[1].id)
            idx = self.split(ins[1].id, s) if s is not None else self.full(ins[1].id)
            return out.gather(self.full(ins[0].id), idx), s
        if op == "rope":
            s = self.spec(ins[0].id)
            if s is not None and s < ins[0].ndim - 2:
                return out.rope(self.split(ins[0].id, s), self.full(ins[1].id), base=n.attrs["base"]), s
            return out.rope(self.full(ins[0].id), self.full(ins[1].id), base=n.attrs["base"]), None
        raise CompileError(f"tensor parallelism: no rule for {op}")

    def elementwise(self, op, ins, t):
        no = t.ndim
        axes = set()
        for x in ins:
            s = self.spec(x.id)
            if s is not None:
                axes.add(s + no - x.ndim)
        if len(axes) != 1:
            return getattr(self.out, op)(*[self.full(x.id) for x in ins]), None
        K = axes.pop()
        args = []
        for x in ins:
            a = K - (no - x.ndim)
            if self.spec(x.id) is not None:
                args.append(self.split(x.id, a))
            elif a < 0 or x.shape[a] == 1:
                args.append(self.full(x.id))           # broadcast along the split axis: whole
            else:
                args.append(self.split(x.id, a))
        return getattr(self.out, op)(*args), K

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
            if (self.is_const(b.id) and b.ndim == 2 and N % P == 0 and N // P >= self.min_cols):
                return out.matmul(self.full(a.id), self.const(b.id, 1), out_dtype=od), no - 1
            return out.matmul(self.full(a.id), self.full(b.id), out_dtype=od), None
        if "K" in (ra, rb) and (ra in ("K", None) and rb in ("K", None)) and a.shape[-1] % P == 0:
            part = out.matmul(self.split(a.id, a.ndim - 1), self.split(b.id, b.ndim - 2), out_dtype=od)
            self.collectives.append(("allreduce", t.name or f"%{t.id}", _bytes(part)))
            return out.allreduce(part, P), None
        if isinstance(ra, int) or isinstance(rb, int):
            K = ra if isinstance(ra, int) else rb
            if (ra is None or ra == K) and (rb is None or rb == K):
                args = []
                for x, r in ((a, ra), (b, rb)):
                    ax = K - (no - x.ndim)
                    if r is not None:
                        args.append(self.split(x.id, ax))
                    elif ax < 0 or x.shape[ax] == 1:
                        args.append(self.full(x.id))
                    else:
                        args.append(self.split(x.id, ax))
                return out.matmul(*args, out_dtype=od), K
        if ra == "M" and rb is None:
            return out.matmul(self.split(a.id, a.ndim - 2), self.full(b.id), out_dtype=od), no - 2
        if rb == "N" and ra is None:
            return out.matmul(self.full(a.id), self.split(b.id, b.ndim - 1), out_dtype=od), no - 1
        return out.matmul(self.full(a.id), self.full(b.id), out_dtype=od), None

    def reshape(self, x: Tensor, t: Tensor):
        s = self.spec(x.id)
        si, so = x.shape, t.shape
        if s is not None:
            pre = _prod(si[:s])
            for j in range(len(so)):
                if _prod(so[:j]) == pre and so[j] > 1 and so[j] % self.P == 0 \
                        and so[j] * _prod(so[j + 1:]) == si[s] * _prod(si[s + 1:]):
                    shape = list(so)
                    shape[j] //= self.P
                    return self.out.reshape(self.split(x.id, s), shape), j
        return self.out.reshape(self.full(x.id), so), None

    def slice(self, x: Tensor, n, t: Tensor):
        s = self.spec(x.id)
        starts, stops, keep = n.attrs["starts"], n.attrs["stops"], n.attrs["keep"]
        if s is not None and keep[s] and starts[s] == 0 and stops[s] == x.shape[s]:
            key = tuple(slice(None) if i == s else (slice(a, b) if k else a)
                        for i, (a, b, k) in enumerate(zip(starts, stops, keep)))
            return self.out.slice(self.split(x.id, s), key), s - sum(1 for k in keep[:s] if not k)
        key = tuple(slice(a, b) if k else a for a, b, k in zip(starts, stops, keep))
        return self.out.slice(self.full(x.id), key), None


def _bytes(t: Tensor) -> int:
    return t.size * t.dtype.nbytes


def _state_candidates(g: Graph, P: int) -> Dict[str, List[Spec]]:
    return {name: [None] + [k for k in range(t.ndim) if t.shape[k] % P == 0 and t.shape[k] >= P]
            for name, t in g.states.items()}


def partition(graph: Graph, P: int, state_axes: Optional[Dict[str, Spec]] = None,
              min_cols: int = 1) -> Partition:
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
        b = _Builder(graph, P, 0, ax, min_cols)
        b.build()
        return sum(x for _, _, x in b.collectives)
    # each free state in turn: the axis with the least link traffic (ties: split, to save SRAM)
    for name in graph.states:
        if name in fixed:
            continue
        best = None
        for k in cands[name]:
            trial = dict(axes, **{name: k})
            c = cost(trial)
            if best is None or c < best[0] or (c == best[0] and best[1] is None):
                best = (c, k)
        axes[name] = best[1]
    builders = [_Builder(graph, P, r, axes, min_cols) for r in range(P)]
    graphs = [b.build() for b in builders]
    return Partition(graphs, axes, builders[0].collectives)
