"""Compiled programs on disk (lpucore.compiler.store): save / load_compiled, hostile files, the
compile cache (on here in a temporary directory; tests/conftest.py turns it off for the rest)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

import lpucore
from lpucore import ChipConfig, CompiledFileError, Graph, LpuError
from lpucore.compiler import store
from lpucore.compiler.api import compiled_from_bytes
from lpucore.compiler.lower import Compiler

CFG = ChipConfig.groqchip1()


def _graph(seed: int = 0) -> Graph:
    """A matmul with a tiled weight, a gathered table, a state and two outputs."""
    r = np.random.default_rng(seed)
    g = Graph("store")
    x = g.input("x", (4, 320), "float16")
    ids = g.input("ids", (3,), "int32")
    w = g.constant("w", r.standard_normal((320, 1280)).astype(np.float16))
    table = g.constant("table", r.standard_normal((40, 20)).astype(np.float16))
    acc = g.state("acc", (4, 1280), "float16")
    y = g.add(g.matmul(x, w), acc)
    g.assign(acc, y)
    g.output("y", y)
    g.output("rows", g.gather(table, ids))
    return g


def _inputs():
    return {"x": np.linspace(-1, 1, 1280, dtype=np.float16).reshape(4, 320), "ids": np.array([3, 0, 39], np.int32)}


def _same(a, b) -> None:
    assert a.program.to_bytes() == b.program.to_bytes()
    assert a.constants.keys() == b.constants.keys()
    for k in a.constants:
        assert a.constants[k].dtype == b.constants[k].dtype and np.array_equal(a.constants[k], b.constants[k])
    for f in ("graph_name", "inputs", "outputs", "states", "expected_cycles", "memory_bytes", "kernels",
              "graph_bounds", "row_parts"):
        assert getattr(a, f) == getattr(b, f), f
    assert {k: [(m, list(c)) for m, c in v] for k, v in a.tiles.items()} == \
        {k: [(m, list(c)) for m, c in v] for k, v in b.tiles.items()}


def test_save_and_load_give_the_same_program_and_results(tmp_path, engine):
    c = lpucore.compile(_graph(), CFG)
    assert c.tiles and c.row_parts and c.states            # every part of the format is exercised
    c.save(tmp_path / "c.lpuc")
    d = lpucore.load_compiled(tmp_path / "c.lpuc")
    _same(c, d)
    assert d.record is None                                  # the compiler's record is not kept
    out1, st1 = lpucore.execute(c, _inputs(), engine=engine)
    out2, st2 = lpucore.execute(d, _inputs(), engine=engine)
    assert st1 == st2
    assert all(np.array_equal(out1[k], out2[k]) for k in out1)
    assert store.to_bytes(d) == store.to_bytes(c)


def _fix_crc(b: bytearray) -> bytes:
    b[-4:] = struct.pack("<I", zlib.crc32(bytes(b[:-4])) & 0xFFFFFFFF)
    return bytes(b)


def test_hostile_files_raise_compiled_file_error(tmp_path):
    """Mutated files (checksum fixed up, so the parser sees them), truncations and other files:
    CompiledFileError, or a program that loads and runs; never another exception."""
    data = store.to_bytes(lpucore.compile(_graph(), CFG))
    mlen = struct.unpack_from("<I", data, 8)[0]
    r = np.random.default_rng(0)
    loaded = 0
    for i in range(400):
        b = bytearray(data)
        where = int(r.integers(0, 12 + mlen + 8 + 200)) if i % 2 else int(r.integers(0, len(b) - 4))
        for _ in range(int(r.integers(1, 4))):
            b[min(where, len(b) - 5)] = int(r.integers(0, 256))
            where += int(r.integers(1, 9))
        try:
            c = compiled_from_bytes(_fix_crc(b))
        except CompiledFileError:
            continue
        loaded += 1
        if loaded <= 3:                                      # what loads runs (a chip a run: a few)
            try:
                lpucore.execute(c, _inputs(), engine="fast")
            except LpuError:
                pass
    assert loaded < 400
    for bad in (b"", b"LPUC", data[:-1], data[:100] + data[101:], b"LPUP" + data[4:], data + b"\0"):
        with pytest.raises(CompiledFileError):
            compiled_from_bytes(bad)
    with pytest.raises(CompiledFileError, match="cannot read"):
        lpucore.load_compiled(tmp_path / "missing.lpuc")


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(inputs={"x": [[4, 20], "float32"]}), "not a float32 tensor"),
    (lambda m: m.update(outputs={"nope": [[4], "float16"]}), "not a float16 tensor"),
    (lambda m: m["tiles"]["w"][0][1].append(10 ** 6), "outside the constant"),
    (lambda m: m.update(kernels=[["matmul", 3, None]]), "kernels"),
    (lambda m: m.update(graph_bounds={"sram": 1}), "graph_bounds"),
    (lambda m: m.update(expected_cycles=-1), "expected_cycles"),
    (lambda m: m["constants"][0].__setitem__(2, [1, 10 ** 9]), "past the end|do not fit|not a"),
    (lambda m: m.update(constants=[]), "length does not match"),
])
def test_hostile_metadata_is_named(edit, match):
    import json
    data = store.to_bytes(lpucore.compile(_graph(), CFG))
    mlen = struct.unpack_from("<I", data, 8)[0]
    meta = json.loads(data[12:12 + mlen])
    edit(meta)
    mj = json.dumps(meta).encode()
    b = bytearray(data[:8] + struct.pack("<I", len(mj)) + mj + data[12 + mlen:])
    with pytest.raises(CompiledFileError, match=match):
        compiled_from_bytes(_fix_crc(b))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The compile cache on, in a temporary directory; counts the compiles that really ran."""
    monkeypatch.setenv("LPUCORE_CACHE", "1")
    monkeypatch.setenv("LPUCORE_CACHE_DIR", str(tmp_path / "cache"))
    runs = []
    real = Compiler.run

    def counting(self):
        runs.append(1)
        return real(self)

    monkeypatch.setattr(Compiler, "run", counting)
    return tmp_path / "cache", runs


def test_the_cache_skips_the_second_compile(cache, engine):
    where, runs = cache
    a = lpucore.compile(_graph(), CFG)
    b = lpucore.compile(_graph(), CFG)
    assert len(runs) == 1 and len(list(where.glob("*.lpuc"))) == 1
    _same(a, b)
    assert b.record is None
    out1, st1 = lpucore.execute(a, _inputs(), engine=engine)
    out2, st2 = lpucore.execute(b, _inputs(), engine=engine)
    assert st1 == st2 and all(np.array_equal(out1[k], out2[k]) for k in out1)
    lpucore.compile(_graph(seed=1), CFG)                     # other weights: another entry
    other = ChipConfig.from_dict({**CFG.to_dict(), "name": "other", "mem_read_delay": CFG.mem_read_delay + 1})
    lpucore.compile(_graph(), other)                         # another configuration: another entry
    assert len(runs) == 3 and len(list(where.glob("*.lpuc"))) == 3


def test_graphs_differing_only_in_an_outputs_shape_or_dtype_or_a_states_init_are_other_entries(cache):
    """A reshape's target shape and a cast's dtype live on the output tensor only, a state's initial value
    beside the graph's constants: two graphs differing there once shared a cache entry, and the second got
    the first one's program (wrong shapes, values, initial state)."""
    where, runs = cache
    xv = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    for shape, dtype in [((3, 1, 64), "float32"), ((1, 3, 64), "float32"), ((1, 3, 64), "float16")]:
        g = Graph("reshaped")
        e = g.mul(g.input("x", (3, 64), "float32"), 2.0)
        g.output("o", g.cast(g.add(g.reshape(e, shape), 1.0), dtype))
        out, _ = lpucore.execute(lpucore.compile(g, CFG), {"x": xv})
        np.testing.assert_array_equal(out["o"], (xv * np.float32(2) + np.float32(1)).reshape(shape).astype(dtype))
    assert len(runs) == 3 and len(list(where.glob("*.lpuc"))) == 3
    for init in (0, 7):                                   # a state's initial value: another entry too
        g = Graph("counter")
        s = g.state("n", (1, 64), "float32", init=np.full((1, 64), init, np.float32))
        g.assign(s, g.add(s, 1.0))
        g.output("o", g.add(s, 0.0))
        out, _ = lpucore.execute(lpucore.compile(g, CFG), {})
        assert (out["o"] == init).all()
    assert len(runs) == 5


def test_graphs_differing_in_which_tensor_an_id_is_or_a_constants_name_are_other_entries(cache):
    """An input made before a state or after it takes the other's id (operations refer to ids), and a
    program's constants are kept by name: graphs differing only there shared an entry too."""
    where, runs = cache
    one = np.ones((4, 32), np.float16)
    zeros = np.zeros((4, 32), np.float16)
    g1 = Graph("a")
    x = g1.input("x", (4, 32))
    s = g1.state("s", (4, 32), init=one)
    g1.output("y", g1.sub(x, s))
    g2 = Graph("a")
    s = g2.state("s", (4, 32), init=one)
    x = g2.input("x", (4, 32))
    g2.output("y", g2.sub(s, x))
    assert g1.signature() != g2.signature()
    assert (lpucore.execute(lpucore.compile(g1, CFG), {"x": zeros})[0]["y"] == -1).all()
    assert (lpucore.execute(lpucore.compile(g2, CFG), {"x": zeros})[0]["y"] == 1).all()
    names = []
    for name in ("w", "v", None):
        g = Graph("b")
        g.output("y", g.add(g.input("x", (4, 32)), g.constant(name, one)))
        c = lpucore.compile(g, CFG)
        names.append(sorted(c.constants))
    assert names[0] == ["w"] and names[1] == ["v"] and names[2] not in (["w"], ["v"])
    assert len(runs) == 5 and len(list(where.glob("*.lpuc"))) == 5


def test_corrupted_and_stale_entries_are_rebuilt(cache, monkeypatch):
    where, runs = cache
    lpucore.compile(_graph(), CFG)
    (entry,) = where.glob("*.lpuc")
    good = entry.read_bytes()
    for bad in (good[:-10], good[:50] + bytes([good[50] ^ 1]) + good[51:], b"junk"):
        entry.write_bytes(bad)
        c = lpucore.compile(_graph(), CFG)
        assert c.record is not None and entry.read_bytes() == good     # compiled again and rewritten
    n = len(runs)
    monkeypatch.setattr(store, "_SOURCES", "other sources")            # lpucore's sources changed
    lpucore.compile(_graph(), CFG)
    assert len(runs) == n + 1 and len(list(where.glob("*.lpuc"))) == 2  # a new key; the old entry unused
    old = next(p for p in where.glob("*.lpuc") if p.read_bytes() == good)
    with pytest.raises(CompiledFileError, match="stale"):
        compiled_from_bytes(old.read_bytes(), sources="other sources")


def test_the_cache_can_be_turned_off_and_moved(tmp_path, monkeypatch):
    monkeypatch.setenv("LPUCORE_CACHE", "0")
    assert store.cache_dir() is None
    monkeypatch.setenv("LPUCORE_CACHE", "1")
    monkeypatch.delenv("LPUCORE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert store.cache_dir() == tmp_path / "xdg" / "lpucore"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert store.cache_dir() == tmp_path / "home" / ".cache" / "lpucore"
    monkeypatch.setenv("LPUCORE_CACHE_DIR", str(tmp_path / "mine"))
    assert store.cache_dir() == tmp_path / "mine"


def test_an_unwritable_cache_only_loses_the_entry(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    monkeypatch.setenv("LPUCORE_CACHE", "1")
    monkeypatch.setenv("LPUCORE_CACHE_DIR", str(blocker / "cache"))   # a directory under a file
    c = lpucore.compile(_graph(), CFG)
    assert c.record is not None


def test_ops_use_the_cache(cache):
    where, runs = cache
    a = np.arange(12, dtype=np.float16).reshape(3, 4)
    b = np.ones((4, 5), np.float16)
    lpucore.ops.clear_cache()
    r1 = lpucore.ops.matmul(a, b, config=CFG)
    assert len(runs) == 1 and len(list(where.glob("*.lpuc"))) == 1
    lpucore.ops.clear_cache()                                # a new process, as far as ops knows
    assert np.array_equal(r1, lpucore.ops.matmul(a, b, config=CFG))
    assert len(runs) == 1
