"""Lower bounds on a graph's cycles on one chip, from the graph and the ChipConfig alone.

A compiled program is measured against these: they are computed from the *graph* (what must be
multiplied, read, written and computed, and in which order), never from the lowered program, so a
worse lowering cannot raise its own bound. ``Compiled.bounds()`` returns them with the program's
cycles; the schedule efficiency is the largest bound over the achieved cycles (1.0: the program is
as fast as the chip allows for this graph, by this measure).

The four bounds (cycles; docs/guide/compiler.md, "Schedule bounds", has the same formulas, generated from here):

* weight streams: bytes of every matmul's second operand (the one a plane installs as weights) and conv2d's weights
  over ``mxm_planes x mxm_lw_streams x lanes`` bytes a cycle (the engine's LW rate);
* SRAM: bytes the graph must read (inputs, constants, states) and write (outputs, state updates)
  over ``mem_slices x lanes`` bytes a cycle (each slice's queue issues one Read or Write a cycle);
* compute: matmul and conv2d MACs over the MXM's peak (int8: ``mxm_planes x mxm_size^2`` a cycle; float16:
  ``mxm_planes x (mxm_size / 2) x mxm_size / mxm_fp16_interval``), and elementwise work (ALU
  operations per element, table ``VXM_OPS``) over ``vxm_alus_per_lane x lanes`` a cycle;
* critical path: the longest chain of dependent operations, each costed by ``LATENCY`` (written in
  ChipConfig delays only), plus one MEM read and one write at the ends and the superlane stagger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from ..config import ChipConfig
from ..graph import Graph, Tensor

# Latency of one graph operation on a dependent chain, as a sum of ChipConfig delays (names of its
# fields). Operations that only re-address data (reshape, slice, concat, transpose) may be folded
# into addressing by a lowering and cost 0. A cross-lane step (a reduction's combine across lanes)
# needs at least one SXM move and one ALU combine. Composite operations are their steps in order.
_A, _T, _C = "vxm_alu_delay", "vxm_transcendental_delay", "vxm_convert_delay"
_S, _M, _ACC = "sxm_delay", "mxm_delay", "mxm_acc_delay"
_REDUCE = (_S, _A)
LATENCY: Dict[str, Tuple[str, ...]] = {
    "add": (_A,), "sub": (_A,), "mul": (_A,), "maximum": (_A,), "minimum": (_A,), "neg": (_A,),
    "abs": (_A,), "relu": (_A,), "div": (_T,),
    "exp": (_T,), "tanh": (_T,), "sigmoid": (_T,), "sqrt": (_T,), "rsqrt": (_T,),
    "silu": (_T, _A), "gelu": (_A, _T, _A),
    "cast": (_C,), "quantize": (_A, _C), "dequantize": (_C, _A),
    "sum": _REDUCE, "max": _REDUCE, "mean": _REDUCE + (_A,),
    # across rows (axis -2): elementwise over vectors, no lane move
    "sum@rows": (_A,), "max@rows": (_A,), "mean@rows": (_A, _A),
    "softmax": _REDUCE + (_A, _T) + _REDUCE + (_T,),
    "layernorm": _REDUCE + (_A, _A) + _REDUCE + (_T, _A, _A),
    "rmsnorm": (_A,) + _REDUCE + (_T, _A),
    "matmul": (_M, _ACC),
    "rope": (_A, _A),
    "gather": ("mem_read_delay",), "scatter": ("mem_write_delay",),
    "gather_blocks": ("mem_read_delay",), "scatter_blocks": ("mem_write_delay",),
    "reshape": (), "transpose": (), "concat": (), "slice": (),
    "allgather": ("c2c_latency",), "allreduce": ("c2c_latency",),
    # images (lpucore.compiler.conv): a convolution is a product; a pool a reduction across rows; a
    # batch normalisation may be folded into its convolution, a flatten or a window into addressing
    "conv2d": (_M, _ACC), "max_pool2d": (_A,), "avg_pool2d": (_A, _A), "global_avg_pool2d": (_A, _A),
    "batch_norm": (), "flatten": (), "window": (), "depth_to_space": (), "d2s": (),
    "conv_taps": (_M, _ACC),
}

# VXM ALU operations per output element (per input element for reductions and row operations): the
# least any lowering must do on the ALUs. A matmul's products are the MXM's, a gather the MEM's.
VXM_OPS: Dict[str, int] = {
    "add": 1, "sub": 1, "mul": 1, "div": 1, "maximum": 1, "minimum": 1, "neg": 1, "abs": 1, "relu": 1,
    "exp": 1, "tanh": 1, "sigmoid": 1, "sqrt": 1, "rsqrt": 1, "silu": 2, "gelu": 3,
    "cast": 1, "quantize": 2, "dequantize": 2, "sum": 1, "max": 1, "mean": 1,
    "sum@rows": 1, "max@rows": 1, "mean@rows": 1, "softmax": 4, "layernorm": 5, "rmsnorm": 3, "rope": 2,
    "matmul": 0, "gather": 0, "scatter": 0, "gather_blocks": 0, "scatter_blocks": 0,
    "reshape": 0, "transpose": 0, "concat": 0, "slice": 0,
    "allgather": 0, "allreduce": 1,
    "conv2d": 0, "max_pool2d": 1, "avg_pool2d": 1, "global_avg_pool2d": 1, "batch_norm": 0, "flatten": 0,
    "window": 0, "depth_to_space": 0, "d2s": 0, "conv_taps": 0,
}
# counted per input element
_PER_INPUT = ("sum", "max", "mean", "sum@rows", "max@rows", "mean@rows", "global_avg_pool2d")


def op_key(n) -> str:
    """A node's entry in ``LATENCY`` / ``VXM_OPS``: its op, with ``@rows`` for a reduction across rows."""
    return n.op + "@rows" if n.op in ("sum", "max", "mean") and n.attrs.get("axis") == -2 else n.op


@dataclass(frozen=True)
class Bounds:
    """Lower bounds (cycles) on a graph's run on one chip, and the cycles a program achieved."""

    weight_stream: float
    sram: float
    mxm: float
    vxm: float
    critical_path: int
    cycles: int

    def as_dict(self) -> Dict[str, float]:
        """The bounds by name (cycles)."""
        return {"weight streams": self.weight_stream, "SRAM": self.sram, "MXM compute": self.mxm,
                "VXM compute": self.vxm, "critical path": float(self.critical_path)}

    @property
    def bound(self) -> float:
        """The largest bound (cycles)."""
        return max(self.as_dict().values())

    @property
    def binding(self) -> str:
        """Which bound is the largest."""
        d = self.as_dict()
        return max(d, key=lambda k: d[k])

    @property
    def efficiency(self) -> float:
        """Schedule efficiency: the largest bound over the achieved cycles."""
        return self.bound / self.cycles if self.cycles else 0.0

    def table(self) -> str:
        """One line per bound, then the efficiency."""
        rows = [f"{k:<15} {v:>12,.0f} cycles" for k, v in self.as_dict().items()]
        rows.append(f"{'achieved':<15} {self.cycles:>12,} cycles; schedule efficiency "
                    f"{100 * self.efficiency:.1f} % ({self.binding} bound)")
        return "\n".join(rows)


def _bytes(t: Tensor) -> int:
    return int(math.prod(t.shape)) * t.dtype.nbytes


def latency(op: str, cfg: ChipConfig) -> int:
    """Cycles one operation adds to a dependent chain (``LATENCY``)."""
    if op not in LATENCY:
        raise KeyError(f"bounds: no latency for graph operation {op!r}")
    return sum(int(getattr(cfg, name)) for name in LATENCY[op])


def _mxm_peak(cfg: ChipConfig, fp16: bool) -> float:
    """MACs a cycle on all planes: int8 at full rate; float16 on half the rows, every interval."""
    if not fp16:
        return float(cfg.mxm_planes * cfg.mxm_size * cfg.mxm_size)
    return cfg.mxm_planes * (cfg.mxm_size // 2) * cfg.mxm_size / cfg.mxm_fp16_interval


def _critical_path(g: Graph, cfg: ChipConfig) -> int:
    """Longest dependent chain (graph order is topological), plus a read, a write and the stagger."""
    ready: Dict[int, int] = {}
    for n in g.nodes:
        start = max((ready.get(i, 0) for i in n.inputs), default=0)
        ready[n.output] = start + latency(op_key(n), cfg)
    ends = [ready.get(t.id, 0) for t in g.outputs.values()] + [ready.get(v.id, 0) for v in g.assigns.values()]
    return cfg.mem_read_delay + max(ends, default=0) + cfg.mem_write_delay + cfg.stagger


def graph_bounds(g: Graph, cfg: ChipConfig, cycles: int) -> Bounds:
    """The bounds of graph ``g`` on a chip of configuration ``cfg``; ``cycles``: what a program for
    it achieved."""
    weight_bytes, macs8, macs16, alu_ops = 0, 0, 0, 0
    for n in g.nodes:
        out = g.tensors[n.output]
        ins: Sequence[Tensor] = [g.tensors[i] for i in n.inputs]
        if n.op in ("matmul", "conv2d"):
            a, b = ins[:2]
            weight_bytes += _bytes(b)
            # a convolution's output element takes C_in / groups x kH x kW products
            macs = int(math.prod(out.shape)) * (int(math.prod(b.shape[1:])) if n.op == "conv2d" else a.shape[-1])
            if a.dtype.name == "int8":
                macs8 += macs
            else:
                macs16 += macs
        key = op_key(n)
        per = ins[0] if key in _PER_INPUT else out
        alu_ops += VXM_OPS[key] * int(math.prod(per.shape))
    read: List[Tensor] = list(g.inputs.values()) + list(g.states.values())
    read += [g.tensors[tid] for tid in g.constants]
    written: List[Tensor] = list(g.outputs.values()) + list(g.assigns.values())
    sram_bytes = sum(_bytes(t) for t in read) + sum(_bytes(t) for t in written)
    return Bounds(
        weight_stream=weight_bytes / (cfg.mxm_planes * cfg.mxm_lw_streams * cfg.lanes),
        sram=sram_bytes / (cfg.mem_slices * cfg.lanes),
        mxm=macs8 / _mxm_peak(cfg, False) + macs16 / _mxm_peak(cfg, True),
        vxm=alu_ops / (cfg.vxm_alus_per_lane * cfg.lanes),
        critical_path=_critical_path(g, cfg),
        cycles=int(cycles))


def latency_markdown() -> str:
    """The latency table of docs/guide/compiler.md (generated: tests fail when the page differs)."""
    rows = ["| graph operation | latency on a dependent chain (ChipConfig delays) | VXM ops per element |",
            "| --- | --- | --- |"]
    for op, names in LATENCY.items():
        cost = " + ".join(f"`{n}`" for n in names) if names else "0"
        rows.append(f"| `{op}` | {cost} | {VXM_OPS[op]} |")
    return "\n".join(rows)
