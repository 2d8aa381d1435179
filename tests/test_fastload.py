"""The compiled loader (lpucore.fastload / lpucore._loader) agrees with the Python validator.

Its verdict on every program here must be the Python validator's: it passes exactly the programs
that the Python path passes, and on a faulty program it names the same first faulty instruction
(queue by queue in queue-number order, as the Python path walks a program whose queues were added
in that order). Programs: the fuzz campaign's generated and raw programs, and those with one field,
opcode or neighbour mutated towards the edges of its range (a few thousand cases, seconds).
"""

from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import numpy as np
import pytest

from lpucore import ChipConfig, Program, ProgramError, fastload, isa
from lpucore.program import Instruction
from lpucore.testing import fuzz
from lpucore.testing.programs import busy_program

pytestmark = pytest.mark.skipif(fastload._loader() is None, reason="the compiled loader is not built")

CFG = ChipConfig.tiny()


def _program(cfg: ChipConfig, code: np.ndarray, qstart: np.ndarray) -> Program:
    """A Program holding the code table's rows (opcodes known), queues in queue-number order."""
    p = Program(cfg)
    for q in range(len(qstart) - 1):
        rows = code[qstart[q]:qstart[q + 1]]
        if len(rows):
            ops = [isa.BY_OPCODE[int(r[0])] for r in rows]
            p.queues[cfg.queues[q].name] = [Instruction(op, tuple(int(x) for x in r[1:1 + len(op.fields)]))
                                            for op, r in zip(ops, rows)]
    return p


def _slow_verdict(p: Program, qstart: np.ndarray) -> int:
    """The Python validator's first faulty row (-1 if none), as a row of the code table."""
    try:
        p._slow_check()
    except ProgramError as e:
        assert e.queue is not None and e.index is not None
        return int(qstart[p.config.queue_index[e.queue]]) + e.index
    return -1


def _fast_verdict(p: Program) -> Tuple[int, np.ndarray]:
    packed = fastload.pack(p.queue_lists(), Instruction)
    assert packed is not None
    code, qstart = packed
    r = fastload.first_bad(p.config, code, qstart)
    assert r is not None
    return r, qstart


def _base_programs() -> List[Program]:
    progs = [busy_program(CFG, seed=s, length=30) for s in range(6)]
    progs += fuzz._raw_programs(5, 30)
    return [p for p in progs if len(p)]


def _values(kind: isa.Kind, cfg: ChipConfig, r: np.random.Generator) -> List[int]:
    """Values at and around the edges of a kind's range (and the special encodings)."""
    lo, hi = kind.lo(cfg), kind.hi(cfg)
    picks = [lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, -1, 0, 1, 2, 3, 4, isa.LATCH_BASE - 1, isa.LATCH_BASE,
             isa.LATCH_BASE + cfg.vxm_alus_per_lane - 1, isa.LATCH_BASE + cfg.vxm_alus_per_lane,
             cfg.streams_per_direction - 1, cfg.streams_per_direction, cfg.streams - 1, cfg.streams,
             int(r.integers(-2 ** 31, 2 ** 31))]
    return [v for v in picks if -2 ** 31 <= v < 2 ** 31]


def test_valid_programs_pass_both():
    for p in _base_programs():
        p._slow_check()
        r, _ = _fast_verdict(p)
        assert r == -1
        assert p._fast_check()


def test_mutated_fields_give_the_same_first_fault():
    r = np.random.default_rng(1)
    cases = faults = 0
    for p in _base_programs():
        code, qstart = p.lower()
        for _ in range(60):
            c = code.copy()
            row = int(r.integers(0, len(c)))
            op = isa.BY_OPCODE[int(c[row, 0])]
            what = r.integers(0, 3)
            if what == 0 and op.fields:            # one field to an edge value
                j = int(r.integers(0, len(op.fields)))
                c[row, 1 + j] = r.choice(_values(op.fields[j].k, CFG, r))
            elif what == 1:                          # another op with the same field count, same fields
                same = [o for o in isa.TABLE if len(o.fields) == len(op.fields)]
                c[row, 0] = same[int(r.integers(0, len(same)))].opcode
            else:                                    # a Repeat put after this row (or at a queue's start)
                c[row, 0] = isa.lookup("Repeat").opcode
                c[row, 1:] = 0
                c[row, 1:4] = [int(r.integers(1, 4)), int(r.integers(1, 3)),
                               int(r.choice([0, 1, -1, 7, CFG.addresses_per_slice - 1]))]
            q = _program(CFG, c, qstart)
            slow = _slow_verdict(q, qstart)
            fast, _ = _fast_verdict(q)
            assert fast == slow, (p, row, c[row])
            cases += 1
            faults += slow >= 0
    assert cases > 1000 and 0.2 < faults / cases < 0.95      # both verdicts are exercised


@pytest.mark.parametrize("cfg", [ChipConfig.tiny(), ChipConfig.groqchip1()], ids=["tiny", "groqchip"])
def test_every_op_at_its_edges(cfg):
    """Every op of the table, each field at each edge value, alone in the first queue of its kind."""
    r = np.random.default_rng(2)
    for op in isa.TABLE:
        if op.unit == "ICU":
            continue
        qi = next(q.index for q in cfg.queues if q.kind == op.queue_kind)
        base = [f.default if f.default is not None else max(f.k.lo(cfg), 0) for f in op.fields]
        for j, f in enumerate(op.fields):
            for v in _values(f.k, cfg, r):
                args = list(base)
                args[j] = v
                p = Program(cfg)
                p.queues[cfg.queues[qi].name] = [Instruction(op, tuple(args))]
                qstart = np.zeros(len(cfg.queues) + 1, dtype=np.int64)
                qstart[qi + 1:] = 1
                assert _fast_verdict(p)[0] == _slow_verdict(p, qstart), (op.mnemonic, args)


class _SubInstruction(Instruction):
    """An Instruction subclass: its layout is not the one the packer reads."""

    __slots__ = ()


def test_odd_entries_take_the_python_path():
    """Anything but a plain Instruction with plain int operands: the compiled loader declines
    (None), and validate gives the Python validator's verdict."""
    p = Program(CFG)
    p.add("MEM.W0", "Read", 3, "E0")
    read = p.queues["MEM.W0"][0]
    odd: List[Optional[object]] = [Instruction(read.op, (np.int64(3), 0)), Instruction(read.op, (True, 0)),
                                   Instruction(read.op, (3,)), Instruction(read.op, (2 ** 40, 0)), "Read 3, E0",
                                   Instruction(read.op, (2 ** 70, 0)), Instruction(read.op, (-2 ** 70, 0)),
                                   Instruction(copy.deepcopy(read.op), (3, 0)), _SubInstruction(read.op, (3, 0))]
    for entry in odd:
        q = Program(CFG)
        q.queues["MEM.W0"] = [entry]
        assert fastload.pack(q.queue_lists(), Instruction) is None
    assert fastload.pack(p.queue_lists(), Instruction) is not None     # a plain one stays on the fast path
    ok = Program(CFG)
    ok.queues["MEM.W0"] = [Instruction(read.op, (np.int64(3), 0))]
    ok.validate()                                   # a NumPy integer is legal: the Python path says so
    bad = Program(CFG)
    bad.queues["MEM.W0"] = [Instruction(read.op, (2 ** 40, 0))]
    with pytest.raises(ProgramError, match="out of range"):
        bad.validate()


def test_from_bytes_fast_and_slow_paths_agree(monkeypatch):
    for p in _base_programs()[:10]:
        data = p.to_bytes()
        fast = Program.from_bytes(data)
        monkeypatch.setenv("LPUCORE_FAST_LOAD", "0")
        slow = Program.from_bytes(data)
        monkeypatch.delenv("LPUCORE_FAST_LOAD")
        assert fast == slow == p and fast.to_bytes() == data
        assert np.array_equal(fast.lower()[0], slow.lower()[0])


def _tensor_program(cfg: ChipConfig) -> Program:
    """Tensors of every dtype, in extents and in stripes, with and without padded vectors (each
    byte plane in its own 8-address slot of a slice)."""
    p = Program(cfg)
    L, slot = cfg.lanes, [0]

    def where() -> Tuple[int, int]:
        g, a = slot[0] % cfg.mem_slices, 8 * (slot[0] // cfg.mem_slices)
        slot[0] += 1
        return g, a

    for name in ("int8", "int16", "int32", "float16", "float32"):
        for striped in (False, True):
            shape = (2, 2, L + 3) if striped else (3, 2 * L)        # 8 and 6 vectors a plane
            planes = []
            for _ in range(np.dtype(name).itemsize):
                (g0, a0), (g1, a1) = where(), where()
                planes.append({"stripes": [[g0, a0], [g1, a1]]} if striped else [[g0, a0 + 1, 3], [g1, a1, 3]])
            p.add_tensor(f"{name}_{'s' if striped else 'e'}", name, shape, planes)
    return p


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_bulk_tensor_copies_match_the_plane_by_plane_path(engine, monkeypatch):
    """write_tensor / read_tensor with the compiled bulk copies leave the same SRAM (padding lanes
    zeroed) and read the same arrays as the NumPy plane-by-plane path."""
    from lpucore import Chip
    cfg = ChipConfig.tiny()
    prog = _tensor_program(cfg)
    r = np.random.default_rng(3)
    arrays = {}
    for name, t in prog.tensors.items():
        bits = r.integers(0, 256, int(np.prod(t.shape)) * t.dtype.nbytes, dtype=np.uint8)
        arrays[name] = bits.view(t.dtype.numpy).reshape(t.shape)         # any bit pattern, NaNs too
    mems = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setenv("LPUCORE_FAST_LOAD", "0")
        chip = Chip(cfg, engine=engine)
        chip.load(prog)
        chip.engine.sram()[:] = 0xA5                 # padding lanes must be written as zeros
        for name, a in arrays.items():
            chip.write_tensor(name, a)
        for name, a in arrays.items():
            got = chip.read_tensor(name)
            assert got.dtype == a.dtype and got.shape == a.shape
            assert got.view(np.uint8).tobytes() == a.view(np.uint8).tobytes(), name
        mems.append(chip.memory())
    assert np.array_equal(mems[0], mems[1])


@pytest.mark.parametrize("fast", [True, False])
def test_write_tensor_columns_match_a_copy(fast, monkeypatch):
    """write_tensor(name, wide, columns) leaves the SRAM that writing the copy wide[:, columns] does:
    lane chunks of consecutive columns (a tiled weight's member, read in place), scattered columns
    (copied first) and a strided view of rows; bad columns raise TensorError."""
    from lpucore import Chip, TensorError
    if not fast:
        monkeypatch.setenv("LPUCORE_FAST_LOAD", "0")
    cfg = ChipConfig.tiny()
    L = cfg.lanes
    prog = _tensor_program(cfg)
    r = np.random.default_rng(5)
    for name, t in prog.tensors.items():
        if len(t.shape) != 2:
            continue
        rows, cols = t.shape
        width = 4 * cols + 7
        bits = r.integers(0, 256, rows * width * t.dtype.nbytes, dtype=np.uint8)
        wide = bits.view(t.dtype.numpy).reshape(rows, width)
        starts = r.permutation(width - L)[:-(-cols // L)]
        tiled = np.concatenate([np.arange(s, s + min(L, cols - i * L)) for i, s in enumerate(starts)])
        for columns in (tiled, r.permutation(width)[:cols], np.arange(cols)):
            for src in (wide, wide[:, ::-1][:, ::-1], np.asfortranarray(wide)):
                a, b = Chip(cfg), Chip(cfg)
                a.load(prog)
                b.load(prog)
                a.write_tensor(name, src, columns=columns)
                b.write_tensor(name, np.ascontiguousarray(wide[:, columns]))
                assert np.array_equal(a.memory(), b.memory()), name
        a, b = Chip(cfg), Chip(cfg)           # rows with a stride: a slice of columns, read in place
        a.load(prog)
        b.load(prog)
        a.write_tensor(name, wide[:, 5:5 + cols])
        b.write_tensor(name, np.ascontiguousarray(wide[:, 5:5 + cols]))
        assert np.array_equal(a.memory(), b.memory()), name
        chip = Chip(cfg)
        chip.load(prog)
        for bad in (np.arange(cols) + width, np.arange(cols - 1), np.arange(cols, dtype=float)):
            with pytest.raises(TensorError):
                chip.write_tensor(name, wide, columns=bad)
        with pytest.raises(TensorError):
            chip.write_tensor(name, wide.astype(np.float64), columns=np.arange(cols))
        with pytest.raises(TensorError):
            chip.write_tensor(name, wide[:-1], columns=np.arange(cols))


def test_scatter_planes_refuses_columns_past_the_rows():
    """The compiled scatter checks each chunk's first column against the rows' bytes without a product
    that could overflow (a chunk starting at 2**62 - 1 of 4-byte elements wrapped to a negative size)."""
    from lpucore import _loader
    sram = np.zeros((10, 320), np.uint8)
    src = np.zeros((1, 1280), np.uint8)
    idx = np.zeros((4, 1), np.int64)
    for bad in (2 ** 62 - 1, 2 ** 63 - 1, 1, -1):
        with pytest.raises(ValueError, match="outside the rows"):
            _loader.scatter_planes(sram, idx, src, 320, np.array([bad], np.int64))
    assert _loader.scatter_planes(sram, idx, src, 320, np.array([0], np.int64))
