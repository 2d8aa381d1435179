"""Hypothesis strategies for lpucore (needs the ``test`` extra: ``pip install lpucore[test]``).

All of them derive from the ISA table and the configuration, never from a
hand-kept list:

* :func:`configs` - small chip configurations (valid by construction);
* :func:`instructions` - single valid instructions of a unit (or any unit);
* :func:`raw_programs` - programs whose every instruction is valid but whose
  schedule may break the rules (for comparing engines, errors included);
* :func:`legal_programs` - programs legal by construction, with expected results;
* :func:`tensors` - NumPy arrays of the chip's dtypes, special values included.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from hypothesis import strategies as st

from .. import dtypes as dt
from .. import isa
from ..config import ChipConfig
from ..program import Instruction, Program, check_instruction
from .programs import GeneratedProgram, ProgramBuilder


def _icu_op(mnemonic: str) -> isa.Op:
    op = isa.lookup(mnemonic, "ICU")
    assert op is not None, mnemonic
    return op


_REPEAT = _icu_op("Repeat")


class DrawChooser:
    """Feeds ProgramBuilder's choices from hypothesis, so failures shrink."""

    def __init__(self, draw):
        self.draw = draw

    def integers(self, lo, hi):
        return self.draw(st.integers(lo, hi))

    def choice(self, seq):
        return seq[self.draw(st.integers(0, len(seq) - 1))]

    def boolean(self):
        return self.draw(st.booleans())


@st.composite
def configs(draw, max_slices: int = 6) -> ChipConfig:
    """Small valid geometries and timings, for properties that must hold on any chip."""
    base = ChipConfig.tiny()
    import dataclasses
    streams = draw(st.sampled_from([4, 8, 16]))
    lps = draw(st.sampled_from([n for n in (4, 8, 16) if n <= streams]))
    superlanes = draw(st.integers(1, 3))
    return dataclasses.replace(
        base,
        name="hypothesis",
        superlanes=superlanes,
        lanes_per_superlane=lps,
        mxm_size=superlanes * lps,
        mxm_lw_streams=draw(st.integers(1, streams)),
        mxm_accumulators=draw(st.integers(2, 16)),
        mxm_delay=draw(st.integers(1, 8)),
        mxm_install_delay=draw(st.integers(1, 4)),
        mxm_acc_delay=draw(st.integers(1, 4)),
        sxm_delay=draw(st.integers(1, 4)),
        sxm_queues_per_hemisphere=draw(st.integers(1, 3)),
        mem_slices_per_hemisphere=draw(st.integers(2, max_slices)),
        addresses_per_slice=draw(st.sampled_from([16, 32, 64])),
        streams_per_direction=streams,
        vxm_alus_per_lane=draw(st.integers(2, 4)),
        mem_slices_per_hop=draw(st.integers(1, 3)),
        stagger=draw(st.integers(1, 4)),
        mem_read_delay=draw(st.integers(1, 3)),
        mem_write_delay=draw(st.integers(1, 3)),
        vxm_alu_delay=draw(st.integers(1, 3)),
        vxm_convert_delay=draw(st.integers(1, 3)),
        vxm_transcendental_delay=draw(st.integers(1, 5)),
        notify_delay=draw(st.integers(1, 5)),
        bank_select=draw(st.sampled_from(["msb", "lsb"])),
    )


def _value(draw, kind, cfg, op, so_far):
    """A valid value for one operand field (stream groups aligned to the dtype)."""
    d_code = so_far.get("dtype", dt.INT32.code)
    if kind in ("stream", "dst", "src"):
        if kind == "src" and draw(st.integers(0, 5)) == 0:
            return isa.LATCH_BASE + draw(st.integers(0, cfg.vxm_alus_per_lane - 1))
        if kind == "dst" and draw(st.integers(0, 5)) == 0:
            return isa.NONE
        w = 1
        if op.unit == "VXM":
            if kind == "dst":
                w = (dt.get(so_far["to"]).nbytes if op.cls == "cvt"
                     else 1 if op.cls == "requant" else dt.get(d_code).nbytes)
            else:
                w = 4 if op.cls == "requant" else dt.get(d_code).nbytes
        elif op.mnemonic in ("Gather", "Scatter") and kind == "stream" and len(so_far) == 1:
            w = 2
        S = cfg.streams_per_direction
        return draw(st.integers(0, 1)) * S + draw(st.integers(0, S // w - 1)) * w
    if kind == "dtype":
        names = op.dtypes if "dtype" not in so_far else [d.name for d in dt.ALL]
        return dt.get(draw(st.sampled_from(list(names)))).code
    k = isa.KINDS[kind]
    lo, hi = k.lo(cfg), k.hi(cfg)
    if kind in ("count", "delay"):
        hi = min(hi, 6)
    return draw(st.integers(lo, hi))


def _possible(op, cfg) -> bool:
    """Whether op has any valid encoding on this configuration."""
    if op.mnemonic == "Rotate":
        return cfg.streams_per_direction >= 9
    return True


def _group_start(draw, cfg, width):
    S = cfg.streams_per_direction
    return draw(st.integers(0, 1)) * S + draw(st.integers(0, S - width))


@st.composite
def instructions(draw, cfg: Optional[ChipConfig] = None, unit: Optional[str] = None,
                 kind: Optional[str] = None) -> Instruction:
    """One valid instruction of a unit (``"MEM"``), a queue kind (``"MXM.ABC"``) or
    any; never Repeat (it only exists after another instruction)."""
    cfg = cfg or ChipConfig.tiny()
    ops = [op for op in isa.TABLE if op.mnemonic != "Repeat" and _possible(op, cfg)
           and (unit is None or op.unit == unit)
           and (kind is None or op.unit == "ICU" or op.queue_kind == kind)]
    op = draw(st.sampled_from(ops))
    vals = {}
    if op.mnemonic == "LW":
        vals["n"] = draw(st.integers(1, cfg.mxm_lw_streams))
        vals["row"] = draw(st.integers(0, cfg.mxm_size - vals["n"]))
        vals["src"] = _group_start(draw, cfg, vals["n"])
    elif op.mnemonic == "Rotate":
        vals["n"] = draw(st.sampled_from([n for n in (3, 4) if n * n <= cfg.streams_per_direction]))
        vals["src"] = _group_start(draw, cfg, vals["n"])
        vals["dst"] = _group_start(draw, cfg, vals["n"] ** 2)
    elif op.mnemonic == "Transpose":
        vals["src"] = _group_start(draw, cfg, cfg.lanes_per_superlane)
        vals["dst"] = _group_start(draw, cfg, cfg.lanes_per_superlane)
    elif op.mnemonic == "ACC":
        vals["dst"] = draw(st.integers(0, 1)) * cfg.streams_per_direction + 4 * draw(
            st.integers(0, cfg.streams_per_direction // 4 - 1))
    elif op.mnemonic == "ABC":
        vals["dtype"] = dt.get(draw(st.sampled_from(op.dtypes))).code
        w = dt.get(vals["dtype"]).nbytes
        vals["src"] = draw(st.integers(0, 1)) * cfg.streams_per_direction + w * draw(
            st.integers(0, cfg.streams_per_direction // w - 1))
    elif op.mnemonic == "Permute":
        vals["map"] = draw(st.integers(0, 1)) * cfg.streams_per_direction + 2 * draw(
            st.integers(0, cfg.streams_per_direction // 2 - 1))
    for f in op.fields:
        if f.name not in vals:
            vals[f.name] = _value(draw, f.kind, cfg, op, vals)
    ins = Instruction(op, tuple(vals[f.name] for f in op.fields))
    assert check_instruction(ins, cfg) is None, (ins, check_instruction(ins, cfg))
    return ins


@st.composite
def raw_programs(draw, cfg: Optional[ChipConfig] = None, max_len: int = 6) -> Program:
    """Valid instructions in random queues: schedule errors likely (engines must agree on them)."""
    cfg = cfg or ChipConfig.tiny()
    p = Program(cfg)
    for q in cfg.queues:
        if not draw(st.booleans()):
            continue
        n = draw(st.integers(1, max_len))
        for _ in range(n):
            ins = draw(instructions(cfg, kind=q.kind) if draw(st.booleans()) else instructions(cfg, unit="ICU"))
            lst = p.queues.setdefault(q.name, [])
            lst.append(ins)
            if ins.op.unit != "ICU" and draw(st.integers(0, 3)) == 0:
                stride = 0
                n_rep = draw(st.integers(1, 4))
                if any(f.strided for f in ins.op.fields):
                    stride = draw(st.integers(-1, 1))
                    last = Instruction(ins.op, tuple(v + n_rep * stride if f.strided else v
                                                     for f, v in zip(ins.op.fields, ins.args)))
                    if check_instruction(last, cfg) is not None:
                        stride = 0
                lst.append(Instruction(_REPEAT, (n_rep, draw(st.integers(1, 3)), stride)))
    return p.validate()


@st.composite
def legal_programs(draw, cfg: Optional[ChipConfig] = None, max_transactions: int = 10,
                   horizon: int = 40) -> GeneratedProgram:
    """A program legal by construction, its input memory and its expected output memory."""
    cfg = cfg or ChipConfig.tiny()
    n = draw(st.integers(1, max_transactions))
    sync = draw(st.booleans())
    return ProgramBuilder(cfg, DrawChooser(draw), horizon).build(n, sync)


_SPECIAL = {
    "float16": [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, -65504.0, 6.1e-05, 6e-08, 1.0, -1.0],
    "float32": [0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38, 1.1754944e-38, 1e-45, 1.0, -1.0],
}


@st.composite
def tensors(draw, dtype="float16", shape=None, max_side: int = 40) -> np.ndarray:
    """Arrays of a chip dtype: any bit pattern, with special values (NaN, inf, +-0,
    subnormals, extremes) mixed in for floats."""
    d = dt.get(dtype)
    if shape is None:
        shape = tuple(draw(st.lists(st.integers(1, max_side), min_size=1, max_size=3)))
    n = int(np.prod(shape))
    raw = draw(st.binary(min_size=n * d.nbytes, max_size=n * d.nbytes))
    arr = np.frombuffer(raw, dtype=d.numpy.newbyteorder("<")).astype(d.numpy).reshape(shape).copy()
    if d.is_float and n:
        flat = arr.reshape(-1)
        for _ in range(draw(st.integers(0, min(n, 6)))):
            flat[draw(st.integers(0, n - 1))] = draw(st.sampled_from(_SPECIAL[d.name]))
    return arr
