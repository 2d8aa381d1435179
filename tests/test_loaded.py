"""execute() keeps a loaded chip per compiled program (lpucore.compiler.loaded): a repeated call
gives the same results, cycles and statistics as a fresh chip, states restart at their initial
values, the cache is bounded and can be switched off, and threads never share a chip."""

import threading

import numpy as np
import pytest

import lpucore
from lpucore import ChipConfig, Graph, LpuError
from lpucore.compiler import loaded

CFG = ChipConfig.tiny()


def _program():
    g = Graph("acc")
    s = g.state("s", (2, 16), "int32")
    x = g.input("x", (2, 16), "int32")
    total = g.add(s, x)
    g.assign(s, total)
    g.output("y", g.mul(total, 3))
    return lpucore.compile(g, CFG)


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch):
    monkeypatch.delenv("LPUCORE_CHIP_CACHE", raising=False)
    loaded.clear()
    yield
    loaded.clear()


def test_a_repeated_execute_reuses_the_chip_and_matches_a_fresh_one(engine):
    c = _program()
    x = np.arange(32, dtype=np.int32).reshape(2, 16)
    first, st1 = lpucore.execute(c, {"x": x}, engine=engine)
    assert loaded.cached() == 1
    chip = loaded.take(c, engine, "exact")                      # the cached chip itself
    loaded.give_back(c, engine, "exact", chip)
    second, st2 = lpucore.execute(c, {"x": x}, engine=engine)
    assert loaded.take(c, engine, "exact") is chip               # the same chip ran the second call
    # states start from their initial value (zeros) on every call, as on a fresh chip
    assert np.array_equal(first["y"], x * 3) and np.array_equal(second["y"], x * 3)
    assert st1.to_dict() == st2.to_dict()


def test_the_cache_is_bounded_and_can_be_switched_off(monkeypatch):
    programs = [_program() for _ in range(3)]
    x = np.ones((2, 16), np.int32)
    monkeypatch.setenv("LPUCORE_CHIP_CACHE", "2")
    for c in programs:
        lpucore.execute(c, {"x": x}, engine="reference")
    assert loaded.cached() == 2
    loaded.clear()
    monkeypatch.setenv("LPUCORE_CHIP_CACHE", "0")
    lpucore.execute(programs[0], {"x": x}, engine="reference")
    assert loaded.cached() == 0
    monkeypatch.setenv("LPUCORE_CHIP_CACHE", "many")
    with pytest.raises(LpuError, match="LPUCORE_CHIP_CACHE"):
        lpucore.execute(programs[0], {"x": x}, engine="reference")


def test_threads_running_one_program_get_their_own_chips():
    c = _program()
    results, errors = [], []

    def work(k):
        try:
            x = np.full((2, 16), k, np.int32)
            for _ in range(5):
                out, _ = lpucore.execute(c, {"x": x})
                results.append(bool(np.array_equal(out["y"], x * 3)))
        except Exception as e:               # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 20 and all(results)
    assert 1 <= loaded.cached() <= loaded.DEFAULT_SIZE
