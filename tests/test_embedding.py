"""Embedding lpucore in a host simulator: runs in pieces, snapshots, several chips, the C API."""

import ast
import os
import pathlib
import tempfile
import threading
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lpucore
from lpucore import Chip, ChipConfig, LpuError, Snapshot, SnapshotError
from lpucore.compiler import gemm_program
from lpucore.testing import generate
from lpucore.testing.strategies import configs, legal_programs

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = ChipConfig.small()
ENGINES = ["reference", "fast"]
EXAMPLES = int(os.environ.get("LPUCORE_EMBED_EXAMPLES", "12"))


def fingerprint(chip):
    """Everything a run leaves behind: statistics (cycles included), counters and memory."""
    return chip.stats().to_dict(), {k: v.tolist() for k, v in chip.counters().items()}, chip.memory()


def assert_same(a, b):
    assert a[0] == b[0]
    assert a[1] == b[1]
    assert np.array_equal(a[2], b[2])


@st.composite
def programs_on_small_chips(draw):
    cfg = draw(configs(max_slices=4))
    return draw(legal_programs(cfg, max_transactions=8, horizon=30))


def fresh(gen, engine):
    chip = Chip(gen.program.config, engine=engine)
    chip.load(gen.program)
    gen.load_inputs(chip)
    return chip


# ---- 1. running in pieces -------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=EXAMPLES, deadline=None)
@given(gen=programs_on_small_chips(), pieces=st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=8))
def test_run_in_pieces_equals_one_run(engine, gen, pieces):
    whole = fresh(gen, engine)
    whole.run()
    ref = fingerprint(whole)
    chip = fresh(gen, engine)
    for is_until, k in pieces:
        before = chip.cycle
        if is_until:
            chip.run(until=k)
            # until is absolute; a run stops at the program's end and never goes back
            assert chip.cycle == max(before, min(k, whole.cycle))
        else:
            chip.step(k)
            assert chip.cycle == before + k
    chip.run()
    assert_same(fingerprint(chip), ref)
    assert chip.cycle == max(whole.cycle, chip.cycle)
    assert gen.check(chip) == []


def test_run_until_and_max_cycles(engine):
    gen = generate(ChipConfig.tiny(), seed=3, n_transactions=10)
    total = fresh(gen, engine).run().cycles
    chip = fresh(gen, engine)
    assert chip.run(until=5).cycles == 5 and not chip.stats().finished
    chip.run(until=3)                                  # in the past: nothing happens
    assert chip.cycle == 5
    chip.run(max_cycles=10, until=8)                   # whichever comes first
    assert chip.cycle == 8
    st_ = chip.run(until=total + 100)                  # stops at the end, does not idle
    assert st_.finished and chip.cycle == total
    chip.step(4)                                       # step idles
    assert chip.cycle == total + 4 and chip.stats().cycles == total
    with pytest.raises(LpuError):
        chip.run(until=-1)


# ---- 2. snapshots ------------------------------------------------------------------------------------
def continue_three_ways(gen_or_setup, engine, at, ref, program):
    """Snapshot at cycle `at`, then finish in the same chip, a fresh chip and after save/load."""
    chip = gen_or_setup()
    chip.run(until=at)
    snap = chip.snapshot()
    chip.run()
    assert_same(fingerprint(chip), ref)
    chip.restore(snap)
    assert chip.cycle == snap.cycle
    chip.run()
    assert_same(fingerprint(chip), ref)
    other = Chip(program.config, engine=engine)
    other.load(program)
    other.restore(snap)
    other.run()
    assert_same(fingerprint(other), ref)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.lpusnap")
        snap.save(path)
        loaded = Snapshot.load(path, config=program.config)
    assert loaded.cycle == snap.cycle and loaded.engine == engine
    blank = Chip(program.config, engine=engine)       # no program loaded: the snapshot's is
    blank.restore(loaded)
    blank.run()
    assert_same(fingerprint(blank), ref)
    return snap


@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=EXAMPLES, deadline=None)
@given(gen=programs_on_small_chips(), frac=st.floats(0, 1))
def test_snapshot_restore_continues_identically(engine, gen, frac):
    whole = fresh(gen, engine)
    whole.run()
    ref = fingerprint(whole)
    continue_three_ways(lambda: fresh(gen, engine), engine, int(frac * whole.cycle), ref, gen.program)


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_snapshot_mid_mxm_and_mid_repeat(engine, dtype):
    g = gemm_program(20, 100, 70, dtype, config=SMALL)
    r = np.random.default_rng(1)
    if dtype == "int8":
        A, B = r.integers(-128, 128, (20, 100)).astype(np.int8), r.integers(-128, 128, (100, 70)).astype(np.int8)
    else:
        A, B = r.standard_normal((20, 100)).astype(np.float16), r.standard_normal((100, 70)).astype(np.float16)

    def setup():
        chip = Chip(SMALL, engine=engine)
        chip.load(g.program)
        for name, arr in g.pack(A, B).items():
            chip.write_tensor(name, arr)
        return chip

    whole = setup()
    whole.run()
    ref = fingerprint(whole)
    mid_mxm = mid_repeat = 0
    nq = len(SMALL.queues)
    for at in range(0, whole.cycle, max(1, whole.cycle // 9)):
        snap = continue_three_ways(setup, engine, at, ref, g.program)
        a = snap.arrays
        if engine == "reference":
            mid_mxm += len(a["mx_pmeta"]) > 0
            mid_repeat += bool((a["queues"][:, 3] > 0).any())
        else:
            mid_mxm += bool(a["mx_an"].any() or a["mx_bn"].any())
            mid_repeat += bool((a["qs"].reshape(nq, -1)[:, 3] > 0).any())
    # the points really were inside MXM operations (products in flight) and Repeats
    assert mid_mxm >= 3 and mid_repeat >= 3
    C = g.unpack(whole)
    if dtype == "int8":
        assert np.array_equal(C, A.astype(np.int32) @ B.astype(np.int32))


def test_snapshot_is_independent_of_the_chip(engine):
    gen = generate(ChipConfig.tiny(), seed=7, n_transactions=12)
    chip = fresh(gen, engine)
    chip.run(until=10)
    snap = chip.snapshot()
    saved = {k: v.copy() for k, v in snap.arrays.items()}
    chip.run()
    chip.write_mem("W", 0, 0, np.full((1, chip.config.lanes), 7, np.uint8))
    assert all(np.array_equal(saved[k], snap.arrays[k]) for k in saved)
    chip.restore(snap)
    chip.write_mem("W", 0, 0, np.full((1, chip.config.lanes), 9, np.uint8))   # restore copied
    assert all(np.array_equal(saved[k], snap.arrays[k]) for k in saved)


def test_snapshot_with_sync_and_notify(engine):
    gen = generate(ChipConfig.tiny(), seed=11, n_transactions=10, sync=True)
    whole = fresh(gen, engine)
    whole.run()
    ref = fingerprint(whole)
    for at in (1, 3, whole.cycle // 2):
        continue_three_ways(lambda: fresh(gen, engine), engine, at, ref, gen.program)


def test_snapshot_errors(tmp_path):
    tiny = ChipConfig.tiny()
    gen = generate(tiny, seed=2, n_transactions=6)
    fast, ref = fresh(gen, "fast"), fresh(gen, "reference")
    fast.run(until=4)
    snap = fast.snapshot()
    with pytest.raises(SnapshotError, match="fast engine and cannot be restored .* reference engine"):
        ref.restore(snap)
    with pytest.raises(SnapshotError, match="configuration 'tiny'"):
        Chip(SMALL, engine="fast").restore(snap)
    other = Chip(tiny, engine="fast")
    other.load(generate(tiny, seed=3, n_transactions=6).program)
    with pytest.raises(SnapshotError, match="different program"):
        other.restore(snap)
    with pytest.raises(SnapshotError, match="fp16_mxm"):
        Chip(tiny, engine="fast", fp16_mxm="fp32").restore(snap)
    with pytest.raises(SnapshotError):
        fast.restore("not a snapshot")
    path = tmp_path / "s.lpusnap"
    snap.save(path)
    assert Snapshot.load(path).cycle == 4
    with pytest.raises(SnapshotError, match="configuration 'tiny'"):
        Snapshot.load(path, config=SMALL)
    data = path.read_bytes()
    for name, bad in [("trunc", data[: len(data) // 2]), ("garbage", b"hello" * 100), ("empty", b""),
                      ("flipped", data[:3000] + bytes([data[3000] ^ 0xFF]) + data[3001:])]:
        p = tmp_path / name
        p.write_bytes(bad)
        with pytest.raises(SnapshotError):
            Snapshot.load(p)
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(SnapshotError, match="not an lpucore snapshot"):
        Snapshot.load(tmp_path / "plain.npy")
    with pytest.raises(SnapshotError, match="cannot read"):
        Snapshot.load(tmp_path / "missing.lpusnap")
    # a future format version is refused
    import json
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    newer = tmp_path / "newer.lpusnap"
    with zipfile.ZipFile(newer, "w") as z:
        for n, b in members.items():
            if n == "__meta__.npy":
                meta = json.loads(np.load(path)["__meta__"].tobytes())
                meta["version"] = 99
                import io
                buf = io.BytesIO()
                np.save(buf, np.frombuffer(json.dumps(meta).encode(), np.uint8))
                b = buf.getvalue()
            z.writestr(n, b)
    with pytest.raises(SnapshotError, match="version 99"):
        Snapshot.load(newer)
    assert issubclass(SnapshotError, LpuError)


def test_no_snapshot_after_a_schedule_error(engine):
    prog = lpucore.assemble(".config tiny\nMEM.W0: Write 0, E3")       # reads an empty stream
    chip = Chip(ChipConfig.tiny(), engine=engine)
    chip.load(prog)
    with pytest.raises(lpucore.ScheduleError):
        chip.run()
    with pytest.raises(SnapshotError, match="schedule error"):
        chip.snapshot()


# ---- 3. several chips ------------------------------------------------------------------------------
def test_chips_are_independent(engine):
    cfg = ChipConfig.tiny()
    ga, gb = generate(cfg, seed=21, n_transactions=12), generate(cfg, seed=22, n_transactions=12, sync=True)
    alone = {}
    for name, g in (("a", ga), ("b", gb)):
        c = fresh(g, engine)
        c.run()
        alone[name] = fingerprint(c)
    a, b = fresh(ga, engine), fresh(gb, engine)
    for k in range(0, 80, 3):
        a.run(until=k)
        b.step(2)
        b.run(until=k + 1)
    a.run()
    b.run()
    assert_same(fingerprint(a), alone["a"])
    assert_same(fingerprint(b), alone["b"])
    assert ga.check(a) == [] and gb.check(b) == []


def test_chips_in_threads():
    g = gemm_program(20, 100, 70, "float16", config=SMALL)
    r = np.random.default_rng(5)
    A, B = r.standard_normal((20, 100)).astype(np.float16), r.standard_normal((100, 70)).astype(np.float16)
    C0, st0 = g.run(A, B)
    out = [None] * 4

    def work(i):
        out[i] = g.run(A, B)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for C, st_ in out:
        assert np.array_equal(C.view(np.uint32), C0.view(np.uint32)) and st_.to_dict() == st0.to_dict()


# ---- 4. the C-level API and the type stubs ----------------------------------------------------------
def test_engine_pxd_is_shipped_and_matches_the_engine():
    import tomllib
    pxd = ROOT / "lpucore" / "_engine.pxd"
    assert pxd.read_bytes() == (ROOT / "src_pyx" / "_engine.pxd").read_bytes()
    import fnmatch
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lpucore"]
    assert any(fnmatch.fnmatch("_engine.pxd", pat) for pat in data)
    assert any(fnmatch.fnmatch("py.typed", pat) for pat in data) and (ROOT / "lpucore" / "py.typed").exists()
    # every function the .pxd declares is exported by the compiled engine, and nothing else
    import re

    from lpucore import _engine
    declared = set(re.findall(r"^cdef \w+ (lpu_\w+)\(", pxd.read_text(), re.M))
    assert declared and declared == set(_engine.__pyx_capi__)


def _public(cls):
    return {n for n, v in vars(cls).items() if not n.startswith("_")}


def test_driver_api_is_annotated_inline_and_the_package_stub_names_it():
    """The driver carries its own annotations (mypy checks them strictly); the only stub is the
    package's, whose lazy attributes the code cannot annotate."""
    import inspect
    assert sorted(p.name for p in (ROOT / "lpucore").glob("*.pyi")) == ["__init__.pyi"]
    for cls in (lpucore.Chip, lpucore.RunStats, Snapshot):
        for name in _public(cls):
            member = inspect.getattr_static(cls, name)
            fn = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
            if inspect.isfunction(fn):
                ann = fn.__annotations__
                assert "return" in ann, f"{cls.__name__}.{name} has no return annotation"
                params = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]
                assert all(p in ann for p in params), f"{cls.__name__}.{name}: unannotated parameters"
    init = ast.parse((ROOT / "lpucore" / "__init__.pyi").read_text())
    exported = {a.asname for n in init.body if isinstance(n, ast.ImportFrom) for a in n.names}
    exported |= {n.name for n in init.body if isinstance(n, ast.FunctionDef)}
    assert set(lpucore.__all__) - {"__version__"} <= exported


HOST_PYX = '''
# cython: language_level=3
from libc.stdint cimport int64_t, uint8_t
from lpucore._engine cimport (lpu_handle, lpu_state, lpu_run_until, lpu_flush_mxm, lpu_run, lpu_cycle,
                              lpu_finished, lpu_lanes, lpu_read_mem)

def run_in_quanta(chip, int64_t quantum):
    cdef object eng = chip.engine
    cdef lpu_handle h = lpu_state(eng)
    cdef int rc
    cdef int n = 0
    cdef int64_t target
    while not lpu_finished(h):
        target = lpu_cycle(h) + quantum
        while True:
            with nogil:
                rc = lpu_run_until(h, target, 0)
            if rc != 3:
                break
            lpu_flush_mxm(eng)
        if rc != 0:
            lpu_run(eng, target, 0)
        n += 1
    return n

def peek(chip, int sl, int64_t addr):
    cdef lpu_handle h = lpu_state(chip.engine)
    out = bytearray(lpu_lanes(h))
    cdef uint8_t* p = <uint8_t*><char*>out
    if lpu_read_mem(h, sl, addr, 1, p) != 0:
        raise IndexError(addr)
    return bytes(out)
'''

HOST_CHECK = '''
import numpy as np, lpucore, host_step
from lpucore.compiler import gemm_program
cfg = lpucore.ChipConfig.small()
g = gemm_program(20, 100, 70, "float16", config=cfg)
r = np.random.default_rng(0)
A = r.standard_normal((20, 100)).astype(np.float16)
B = r.standard_normal((100, 70)).astype(np.float16)
C0, st0 = g.run(A, B)
chip = lpucore.Chip(cfg)
chip.load(g.program)
for n, a in g.pack(A, B).items():
    chip.write_tensor(n, a)
assert host_step.run_in_quanta(chip, 10) > 5
assert chip.stats().to_dict() == st0.to_dict()
assert np.array_equal(g.unpack(chip).view(np.uint32), C0.view(np.uint32))
assert host_step.peek(chip, 3, 0) == chip.read_mem("W", 3, 0).tobytes()
print("ok")
'''


def test_cython_code_can_cimport_the_engine(tmp_path):
    """A small Cython module cimports lpucore._engine and steps a chip without the GIL."""
    pytest.importorskip("Cython")
    import subprocess
    import sys
    (tmp_path / "host_step.pyx").write_text(HOST_PYX)
    (tmp_path / "setup.py").write_text(
        "import lpucore\nfrom setuptools import Extension, setup\nfrom Cython.Build import cythonize\n"
        "setup(ext_modules=cythonize([Extension('host_step', ['host_step.pyx'])], language_level=3,\n"
        "                            include_path=[lpucore.get_include()]))\n")
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=tmp_path,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (tmp_path / "check.py").write_text(HOST_CHECK)
    run = subprocess.run([sys.executable, "check.py"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
