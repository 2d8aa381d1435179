"""The driver (lpucore.Chip): tensors, raw memory, running, statistics, engines."""

import builtins

import numpy as np
import pytest
from hypothesis import given

import lpucore
from lpucore import Chip, ChipConfig, EngineUnavailableError, LpuError, Program, TensorError, assemble
from lpucore.testing.strategies import tensors

CFG = ChipConfig.tiny()


def program_with_tensors():
    p = Program(CFG)
    p.add_tensor("i8", "int8", (3, 20), [[("W0", 0, 2), ("E3", 10)]])
    p.add_tensor("f16", "float16", (2, 5), [[("W1", 3)], [("W2", 3)]])
    p.add_tensor("f32", "float32", (17,), [[("E0", 0)], [("E1", 0)], [("E2", 0)], [("W3", 60)]])
    p.add_tensor("i32", "int32", (1, 1, 16), [[("E0", 8)], [("E1", 8)], [("E2", 8)], [("E3", 8)]])
    p.add_tensor("i16", "int16", (4, 16), [[("W0", 20)], [("W1", 20)]])
    return p


@pytest.mark.parametrize("name", ["i8", "f16", "f32", "i32", "i16"])
def test_tensor_round_trip(engine, name):
    p = program_with_tensors()
    chip = Chip(CFG, engine=engine)
    chip.load(p)
    t = p.tensors[name]
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, int(np.prod(t.shape)) * t.dtype.nbytes, dtype=np.uint8)
    a = raw.view(t.dtype.numpy).reshape(t.shape)
    chip.write_tensor(name, a)
    back = chip.read_tensor(name)
    assert back.dtype == a.dtype and back.shape == a.shape
    assert np.array_equal(back.view(np.uint8), a.view(np.uint8))


@given(tensors("float16", shape=(2, 5)))
def test_float16_tensors_with_special_values(a):
    chip = Chip(CFG, engine="fast")
    chip.load(program_with_tensors())
    chip.write_tensor("f16", a)
    assert np.array_equal(chip.read_tensor("f16").view(np.uint16), a.view(np.uint16))


def test_tensor_bytes_are_byte_planes():
    chip = Chip(CFG, engine="reference")
    chip.load(program_with_tensors())
    a = np.arange(17, dtype=np.float32) + np.float32(0.5)
    chip.write_tensor("f32", a)
    bits = a.view(np.uint32)
    lo = chip.read_mem("E", 0, 0)[0]                   # plane 0: least significant bytes, first 16 elements
    assert np.array_equal(lo, (bits[:16] & 0xFF).astype(np.uint8))
    top = chip.read_mem("W", 3, 60, 2)                 # plane 3: 17 columns -> 2 vectors, zero padded
    assert np.array_equal(top[0], (bits[:16] >> 24).astype(np.uint8)) and top[1][0] == bits[16] >> 24
    assert not top[1][1:].any()


def test_wrong_tensor_changes_nothing(engine):
    chip = Chip(CFG, engine=engine)
    chip.load(program_with_tensors())
    good = np.ones((3, 20), np.int8)
    chip.write_tensor("i8", good)
    before = [chip.read_mem(h, s, 0, CFG.addresses_per_slice).copy() for h in "WE" for s in range(4)]
    for bad, err in [(np.ones((3, 20), np.int16), "int8"), (np.ones((3, 21), np.int8), "shape"),
                     (np.ones((60,), np.int8), "shape"), ([[1, 2]], "int8")]:
        with pytest.raises(TensorError, match=err):
            chip.write_tensor("i8", bad)
    with pytest.raises(TensorError, match="no tensor"):
        chip.write_tensor("nope", good)
    after = [chip.read_mem(h, s, 0, CFG.addresses_per_slice) for h in "WE" for s in range(4)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert np.array_equal(chip.read_tensor("i8"), good)


def test_no_program_no_tensor_table():
    with pytest.raises(TensorError, match="no program"):
        Chip(CFG, engine="reference").read_tensor("x")


def test_raw_memory_access_is_validated(engine):
    chip = Chip(CFG, engine=engine)
    v = np.arange(16, dtype=np.uint8)
    chip.write_mem("W", 3, 63, v)
    chip.write_mem(1, 0, 0, np.stack([v, v[::-1]]))
    assert np.array_equal(chip.read_mem("w", 3, 63)[0], v)
    assert np.array_equal(chip.read_mem("E", 0, 0, 2)[1], v[::-1])
    for args in [("X", 0, 0, v), ("W", 4, 0, v), ("W", 0, 64, v), ("W", 0, 63, np.stack([v, v])),
                 ("W", 0, 0, v.astype(np.int16)), ("W", 0, 0, v[:8]), ("W", -1, 0, v)]:
        with pytest.raises(LpuError):
            chip.write_mem(*args)
    with pytest.raises(LpuError):
        chip.read_mem("W", 0, 60, 5)


def test_run_in_pieces_equals_one_run(engine):
    from lpucore.testing import generate
    g = generate(CFG, seed=5, n_transactions=14)
    whole = Chip(CFG, engine=engine)
    whole.load(g.program)
    g.load_inputs(whole)
    st = whole.run()
    parts = Chip(CFG, engine=engine)
    parts.load(g.program)
    g.load_inputs(parts)
    s1 = parts.step(7)
    assert parts.cycle == 7 and not s1.finished
    parts.run(max_cycles=5)
    assert parts.cycle == 12
    while not parts.stats().finished:
        parts.step(3)
    assert parts.stats().to_dict() == st.to_dict()
    assert parts.cycle >= st.cycles
    assert g.check(parts) == []
    # stepping past the end just idles
    parts.step(10)
    assert parts.stats().cycles == st.cycles


def test_reset_and_reload(engine):
    text = (".tensor x int8 (1, 16) W2:5\n.tensor y int8 (1, 16) E0:9\n"
            "MEM.W2: Read 5, E0\nMEM.E0: NOP 5\nMEM.E0: Write 9, E0")
    chip = Chip(CFG, engine=engine)
    chip.load(assemble(".config tiny\n" + text))
    x = np.arange(16, dtype=np.int8).reshape(1, 16)
    chip.write_tensor("x", x)
    st = chip.run()
    assert np.array_equal(chip.read_tensor("y"), x)
    chip.reset(clear_memory=False)
    assert chip.cycle == 0 and chip.stats().instructions == 0
    assert chip.run().to_dict() == st.to_dict()
    chip.reset()
    assert not chip.read_tensor("x").any()


def test_stats_to_dict(engine):
    chip = Chip(CFG, engine=engine)
    chip.load(assemble(".config tiny\nMEM.W2: Read 5, E0\nMEM.E0: NOP 5\nMEM.E0: Write 9, E0\nVXM.1: NOP 2"))
    d = chip.run().to_dict()
    assert d["cycles"] == 9 and d["instructions"] == 2 and d["finished"]
    assert d["seconds"] == pytest.approx(9 / 900e6)
    assert d["by_unit"]["MEM"] == {"issued": 2, "busy_cycles": 2, "icu_instructions": 1, "bytes_read": 16,
                                   "bytes_written": 16}
    assert d["icu_instructions"] == {"MEM.E0": 1, "VXM.1": 1}
    import json
    json.dumps(d)


def test_schedule_error_is_sticky(engine):
    chip = Chip(CFG, engine=engine)
    chip.load(assemble(".config tiny\nMEM.E0: Write 0, E0"))
    with pytest.raises(lpucore.ScheduleError):
        chip.run()
    with pytest.raises(lpucore.ScheduleError):
        chip.run()


def test_program_for_another_chip_is_refused(engine):
    with pytest.raises(LpuError, match="configuration"):
        Chip(CFG, engine=engine).load(Program(ChipConfig.groqchip1()))


def test_unknown_engine():
    with pytest.raises(LpuError, match="unknown engine"):
        Chip(CFG, engine="turbo")


def test_missing_fast_engine_fails_loudly(monkeypatch):
    real_import = builtins.__import__

    def fake(name, globals=None, locals=None, fromlist=(), level=0):
        if fromlist and "_engine" in fromlist:
            raise ImportError("simulated: no compiled engine")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(EngineUnavailableError, match="cannot be imported"):
        Chip(CFG, engine="fast")


def test_default_chip_is_groqchip1_fast():
    chip = Chip()
    assert chip.config == ChipConfig.groqchip1() and chip.engine_name == "fast"
    assert type(chip.engine).__module__ == "lpucore._engine"


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_striped_tensors_are_written_where_their_vectors_live(engine):
    """write_tensor / read_tensor move a striped plane's vectors all at once; each vector lands at
    the (slice, address) the tensor table gives it, as the vector-by-vector path puts it."""
    g = lpucore.Graph("striped")
    w = np.arange(37 * 700, dtype=np.int32).reshape(37, 700).astype(np.int8)
    x = g.input("x", (37, 700), "int8")
    g.output("y", g.add(x, g.constant("w", w)))
    cfg = ChipConfig.small()
    compiled = lpucore.compile(g, cfg)
    t = compiled.program.tensors["w"]
    assert type(t.planes[0]).__name__ == "Stripes" and len(t.planes[0].parts) > 1
    chip = Chip(cfg, engine=engine)
    compiled.load(chip)
    np.testing.assert_array_equal(chip.read_tensor("w"), w)
    planes = t.to_planes(w, cfg.lanes)
    for v, (s, a) in enumerate(t.locations(0, cfg.lanes)):
        np.testing.assert_array_equal(chip.engine.read_mem(s, a, 1)[0], planes[0, v])


def test_engine_options_are_public_and_checked(engine):
    chip = Chip(CFG, engine=engine)
    if engine == "reference":
        assert chip.engine_options() == {} and chip.host_time == {}
        chip.set_engine_options()                                  # nothing to set: fine
        with pytest.raises(LpuError, match="reference engine has no host options"):
            chip.set_engine_options(small_rows=4)
        return
    opts = chip.engine_options()
    assert set(opts) == {"mxm_kernel", "helper_threads", "small_rows", "helper_delay_us", "bulk_reads"}
    chip.set_engine_options(small_rows=7, helper_threads=0, bulk_reads=False)
    assert chip.engine_options()["small_rows"] == 7 and chip.engine_options()["helper_threads"] == 0
    assert chip.engine_options()["bulk_reads"] == 0
    assert {"loop_s", "mxm_batches", "bulk_reads"} <= set(chip.host_time)
    with pytest.raises(LpuError, match="bulk_reads must be 0 or 1"):
        chip.set_engine_options(bulk_reads=2)
    with pytest.raises(LpuError, match="unknown engine option"):
        chip.set_engine_options(turbo=True)
