"""Tests, the README and the docs use the public API only: a Chip's engine is ``chip.engine`` (an
``lpucore.engine.Engine``), its memory ``chip.memory()``, its statistics ``chip.counters()``.
Reaching into private attributes of chips, engines, caches or decoders again fails here, so
that the engines' insides can change without rewriting the tests."""

import re
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY

from lpucore import Chip
from lpucore.engine import ENGINES, Engine, make_engine

ROOT = Path(__file__).resolve().parent.parent

# private attributes of Chip, the engines, KVCache and Decoder that were once reached into
PRIVATE = [
    r"\._eng\b",                                    # Chip._eng: chip.engine
    r"\b(?:\w*chip|eng|engine)\w*\._[a-z]\w*",      # chip._x, other_chip._x, engine._x
    r"\._(?:get|set)_state\b", r"\._sram(?:_view)?\b", r"\._views\b", r"\._lowered\b", r"\._wcache\b",
    r"\.cache\._[kv]\b",                            # KVCache: keys(layer) / values(layer)
    r"\bDecoder\._bytes\b",                         # Decoder.memory_bytes
]


def _sources():
    docs = sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)
    for p in sorted((ROOT / "tests").glob("*.py")) + [ROOT / "README.md"] + docs:
        if p.name != Path(__file__).name:
            yield p


def test_tests_and_readme_do_not_reach_into_private_attributes():
    hits = []
    for p in _sources():
        for n, line in enumerate(p.read_text().splitlines(), 1):
            for pat in PRIVATE:
                m = re.search(pat, line)
                if m:
                    hits.append(f"{p.relative_to(ROOT)}:{n}: {m.group(0)}")
    assert not hits, "private attributes used (use the public API: chip.engine, chip.memory(), " \
                     "chip.counters(), ...):\n" + "\n".join(hits)


def test_chip_never_asks_which_engine_it_has():
    src = (ROOT / "lpucore" / "chip.py").read_text()
    for pat in (r"engine_name\s*[!=]=", r"\.name\s*[!=]=", r"[!=]=\s*[\"'](?:fast|reference)[\"']",
                r"[\"'](?:fast|reference)[\"']\s*[!=]=", r"isinstance\([^)]*Engine", r"hasattr\("):
        assert not re.search(pat, src), f"lpucore/chip.py branches on the engine: {pat}"


@pytest.mark.parametrize("name", ENGINES)
def test_both_engines_satisfy_the_protocol(name):
    """Every Engine member exists on both engines, and Chip's public views agree with them."""
    eng = make_engine(name, TINY)
    members = [k for k in vars(Engine) if not k.startswith("_")]
    assert members and all(hasattr(eng, k) for k in members), [k for k in members if not hasattr(eng, k)]
    assert eng.name == name
    chip = Chip(TINY, engine=name)
    assert chip.engine.name == chip.engine_name == name
    vec = np.arange(TINY.lanes, dtype=np.uint8)
    chip.write_mem("E", 1, 3, vec)
    mem = chip.memory()
    assert mem.shape == (TINY.mem_slices, TINY.addresses_per_slice, TINY.lanes)
    assert np.array_equal(mem[TINY.slice_id(1, 1), 3], vec)
    mem[:] = 0                                      # a copy: the chip keeps its bytes
    assert np.array_equal(chip.read_mem("E", 1, 3)[0], vec)
    assert set(chip.counters()) == {"issued", "icu", "bytes_read", "bytes_written", "mxm_macs", "mxm_busy",
                                    "mxm_peak_macs", "c2c_sent", "c2c_received"}
