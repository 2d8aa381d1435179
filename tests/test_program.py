"""Programs: validation, the binary format and its fuzzing."""

import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lpucore
from lpucore import ChipConfig, LpuError, Program, ProgramError, isa
from lpucore.program import Instruction
from lpucore.testing.strategies import raw_programs


def sample_program(cfg=None):
    cfg = cfg or ChipConfig.tiny()
    p = Program(cfg)
    p.add_tensor("x", "float16", (3, 20), [[("W0", 0, 4), ("W1", 0)], [("W2", 0)]])
    p.add_tensor("k", "int8", (2,), [[("E3", 5)]])
    p.add("MEM.W0", "Read", 3, "E0")
    p.add("MEM.W0", "Repeat", 4, 2, 1)
    p.add("MEM.E1", "NOP", 9)
    p.add("MEM.E1", "Write", 7, "E0")
    p.add("VXM.2", "select", "float32", "W4", "A1", "E4", "W0")
    p.add("VXM.3", "const", "float16", "-", "1.5")
    p.add("VXM.0", "Sync")
    p.add("VXM.1", "Notify")
    return p


def test_binary_round_trip(tmp_path):
    p = sample_program()
    f = tmp_path / "p.lpu"
    p.save(f)
    q = Program.load(f)
    assert q == p and q.tensors == p.tensors
    assert q.queues["VXM.3"][0]["value"] == 0x3E00
    assert f.read_bytes()[:4] == b"LPUP"


def test_groqchip_round_trip():
    p = Program()
    p.add("MEM.E43", "Read", 8191, "W31")
    p.add("VXM.15", "cvt", "int32", "float16", "E30", "W4")
    assert Program.from_bytes(p.to_bytes()) == p


@pytest.mark.parametrize("queue,mn,args,field", [
    ("MEM.W0", "Read", (64, "E0"), "addr"),          # tiny has 64 addresses
    ("MEM.W0", "Read", (-1, "E0"), "addr"),
    ("MEM.W0", "Read", (0, 99), "dst"),
    ("VXM.0", "add", ("int16", "E1", "E0", "E2"), "dst"),       # 2-byte group at an odd stream
    ("VXM.0", "add", ("float32", "E4", "E2", "E4"), "a"),       # 4-byte group at E2
    ("VXM.0", "shl", ("float32", "E4", "E4", "E4"), "dtype"),   # shifts are integer-only
    ("VXM.0", "requant", ("E1", "E2", 3, 70, 0), "shift"),
    ("MEM.W0", "Gather", ("E0", "E1"), "map"),
    ("VXM.0", "add", ("int8", "E1", "A9", "E0"), "a"),          # tiny has 4 ALUs
    ("MEM.W0", "NOP", (0,), "n"),
])
def test_field_validation_names_the_field(queue, mn, args, field):
    p = Program(ChipConfig.tiny())
    with pytest.raises(ProgramError) as e:
        p.add(queue, mn, *args)
    assert e.value.field == field and e.value.queue == queue and e.value.index == 0


def test_unit_and_repeat_rules():
    p = Program(ChipConfig.tiny())
    with pytest.raises(ProgramError, match="unknown instruction 'add' for the MEM"):
        p.add("MEM.W0", "add", "int8", "E0", "E0", "E0")
    with pytest.raises(ProgramError, match="MXM.ABC instruction"):
        p.queues["MXM.W0.LW"] = [Instruction(isa.lookup("ABC"), (0, 0, 0, 0))]
        p.validate()
    del p.queues["MXM.W0.LW"]
    with pytest.raises(ProgramError, match="must follow"):
        p.add("MEM.W0", "Repeat", 3, 1, 0)
    p.add("MEM.W0", "Read", 60, "E0")
    with pytest.raises(ProgramError, match="repetition 5 of Read: addr 65 is out of range"):
        p.add("MEM.W0", "Repeat", 5, 1, 1)
    p.add("VXM.0", "neg", "int8", "E0", "E1")
    with pytest.raises(ProgramError, match="no address"):
        p.add("VXM.0", "Repeat", 2, 1, 1)
    with pytest.raises(ProgramError):
        p.add("VXM.9", "neg", "int8", "E0", "E1")
    with pytest.raises(ProgramError, match="unknown instruction"):
        p.add("VXM.0", "frobnicate")


def test_tensor_table_validation():
    p = Program(ChipConfig.tiny())
    with pytest.raises(ProgramError, match="byte plane"):
        p.add_tensor("a", "float16", (2, 3), [[("W0", 0)]])
    with pytest.raises(ProgramError, match="does not fit"):
        p.add_tensor("b", "int8", (70, 3), [[("W0", 0)]])
    with pytest.raises(ProgramError, match="share"):
        p.add_tensor("c", "int16", (1, 3), [[("W0", 0)], [("W0", 0)]])
    with pytest.raises(ProgramError, match="shape"):
        p.add_tensor("d", "int8", (0, 3), [[("W0", 0)]])
    p.add_tensor("e", "int8", (4, 20), [[("W0", 0, 3), ("E0", 9)]])   # 20 cols = 2 vectors per row
    assert p.tensors["e"].nvectors(16) == 8
    with pytest.raises(ProgramError, match="twice"):
        p.add_tensor("e", "int8", (1,), [[("W1", 0)]])


def test_tensor_disjointness_runs_and_vectors():
    """Runs of addresses that overlap only where no vector lies pass (the run check is a fast
    path; the vector-by-vector check decides); vectors that meet fail, naming the address."""
    cfg = ChipConfig.tiny()
    p = Program(cfg)
    # 3 rows over 2 stripes: the second stripe of each plane spans 2 addresses but uses 1, so
    # W1's runs [0, 2) and [1, 3) overlap while its vectors (W1:0 and W1:1) do not
    p.add_tensor("ok", "int16", (3, cfg.lanes), [{"stripes": [("W0", 0), ("W1", 0)]},
                                                 {"stripes": [("W0", 2), ("W1", 1)]}])
    assert p.tensors["ok"].nvectors(cfg.lanes) == 3
    with pytest.raises(ProgramError, match="share W0:0x1"):
        p.add_tensor("bad", "int16", (3, cfg.lanes), [{"stripes": [("W0", 0), ("W1", 0)]},
                                                      {"stripes": [("W0", 1), ("W1", 2)]}])
    with pytest.raises(ProgramError, match="share E0:0x5"):
        p.add_tensor("ext", "int8", (2, 3 * cfg.lanes), [[("E0", 0, 3), ("E0", 5, 2), ("E0", 5)]])


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def test_corrupted_and_truncated_files():
    data = sample_program().to_bytes()
    for bad in (b"", b"LPUP", data[:-1], data[:20], b"XXXX" + data[4:], data[:-4] + b"\0\0\0\0"):
        with pytest.raises(ProgramError):
            Program.from_bytes(bad)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x40
    with pytest.raises(ProgramError, match="checksum"):
        Program.from_bytes(bytes(flipped))
    # a bad opcode with a valid checksum is named precisely
    body = bytearray(data[:-4])
    n = len(sample_program())
    first = len(body) - n * 4 * (1 + isa.NFIELDS)
    body[first:first + 4] = struct.pack("<i", 0x7F)
    with pytest.raises(ProgramError, match="unknown opcode"):
        Program.from_bytes(_with_crc(bytes(body)))
    # a wrong version
    v2 = bytearray(data[:-4])
    v2[4:6] = struct.pack("<H", 9)
    with pytest.raises(ProgramError, match="version"):
        Program.from_bytes(_with_crc(bytes(v2)))


def test_load_missing_file(tmp_path):
    with pytest.raises(ProgramError, match="cannot read"):
        Program.load(tmp_path / "nope.lpu")


@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data):
    try:
        Program.from_bytes(data)
    except ProgramError:
        pass


@given(st.data())
def test_fuzz_mutated_files_only_raise_program_error(data):
    """Mutate a valid file (and fix its checksum, to reach the field validators)."""
    blob = bytearray(sample_program().to_bytes()[:-4])
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(blob) - 1))
        how = data.draw(st.sampled_from(["flip", "set", "cut", "dup"]))
        if how == "flip":
            blob[i] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "set":
            blob[i] = data.draw(st.integers(0, 255))
        elif how == "cut":
            del blob[i:i + data.draw(st.integers(1, 16))]
        else:
            blob[i:i] = blob[i:i + data.draw(st.integers(1, 16))]
        if not blob:
            break
    try:
        p = Program.from_bytes(_with_crc(bytes(blob)))
    except ProgramError:
        return
    # whatever loads is valid and runs without crashing on both engines
    p.validate()


@given(raw_programs())
def test_random_programs_round_trip_through_binary_and_text(p):
    assert Program.from_bytes(p.to_bytes()) == p
    assert lpucore.assemble(lpucore.disassemble(p)) == p


def test_instruction_objects_must_be_valid():
    p = Program(ChipConfig.tiny())
    p.queues["MEM.W0"] = [Instruction(isa.lookup("Read"), (999, 0))]
    with pytest.raises(ProgramError, match="addr"):
        p.validate()
    with pytest.raises(LpuError):
        lpucore.Chip(ChipConfig.tiny(), engine="reference").load(p)


@pytest.mark.parametrize("queue, ins", [
    ("MEM.W0", ("Read", (1000000, 0))),                 # the address that used to crash the fast engine
    ("MEM.W0", ("Write", (0, 10 ** 6))),                # a stream
    ("MXM.W0.ACC", ("ACC", (99, 0))),                   # an accumulator
    ("SXM.W0", ("Send", (77, 0))),                      # a chip-to-chip link
    ("VXM.0", ("add", (2, 0, 0, 1000))),                # a stream or latch
])
def test_every_load_validates_on_both_engines(engine, queue, ins):
    """No program reaches an engine unvalidated (Chip.load has no validate=False): a bad operand
    is the same ProgramError on both engines, before anything runs."""
    cfg = ChipConfig.tiny()
    mn, args = ins
    op = isa.lookup(mn, cfg.queue(queue).unit)
    assert op is not None and len(op.fields) == len(args)
    p = Program(cfg)
    p.queues[queue] = [Instruction(op, args)]
    chip = lpucore.Chip(cfg, engine=engine)
    with pytest.raises(ProgramError) as e:
        chip.load(p)
    assert e.value.queue == queue and e.value.index == 0
    with pytest.raises(TypeError):
        chip.load(p, validate=False)      # type: ignore[call-arg]  # the option is gone: TypeError


def test_validation_is_remembered_until_the_program_changes(engine):
    cfg = ChipConfig.tiny()
    p = Program(cfg)
    p.add("MEM.W0", "Read", 3, "E0")
    p.add("MEM.E0", "NOP", 3)
    p.add("MEM.E0", "Write", 5, "E0")
    checked = []
    real = Program._fast_check, Program._slow_check

    def counting(which):
        def check(self):
            checked.append(which)
            return real[which](self)
        return check

    chip = lpucore.Chip(cfg, engine=engine)
    try:
        Program._fast_check, Program._slow_check = counting(0), counting(1)
        chip.load(p)
        n = len(checked)
        assert n == 1                      # one full check (the compiled loader's, or the Python one)
        chip.load(p)                       # unchanged: not checked again
        assert len(checked) == n
        # changed after validation, in place: checked in full again, and refused
        p.queues["MEM.W0"][0] = Instruction(isa.lookup("Read"), (1000000, 0))
        with pytest.raises(ProgramError, match="addr"):
            chip.load(p)
        p.queues["MEM.W0"][0] = Instruction(isa.lookup("Read"), (3, 0))
        p.tensors["t"] = "not a tensor"    # type: ignore[assignment]
        with pytest.raises(ProgramError, match="malformed"):
            chip.load(p)
    finally:
        Program._fast_check, Program._slow_check = real
    del p.tensors["t"]
    chip.load(p)
