"""Fuzzing hostile files: mutated program files, snapshot files and assembler text.

The mutations and the checks are :mod:`lpucore.testing.fuzz`'s (every mutated input must raise
an :class:`~lpucore.LpuError` and nothing else, or load and run identically on both engines; a
mutated snapshot must restore and run on its own engine or raise an LpuError); here hypothesis
drives them (``DrawChooser``) and each case runs in a forked child: a child killed by a signal
(a crash in the C core) or running past ``TIMEOUT`` seconds fails the test, and the input is
saved to ``$LPUCORE_FUZZ_DIR`` (default: ``<tmp>/lpucore-fuzz``) as ``<kind>-<hash>.<ext>``.
Replay a saved input in this process (e.g. under gdb) with ``python tests/test_fuzz.py FILE``
(or ``python -m lpucore.testing.fuzz --replay FILE``).

By default each test tries a few examples, and the campaign test a few hundred cases (seconds in
all).  Long modes: the campaign (a persistent worker process, about a million cases in half an
hour on one core)::

    python -m lpucore.testing.fuzz --cases 1000000

or these hypothesis tests (a fork per case, about 35 cases a second)::

    LPUCORE_FUZZ_EXAMPLES=100000 python -m pytest -q -n 0 tests/test_fuzz.py

Hypothesis keeps no example database here (``database=None``), so long runs leave nothing
behind but the saved failing inputs; failing inputs are not shrunk (a hang would cost
``TIMEOUT`` per shrink step), they are saved as found.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import lpucore
from lpucore.testing import fuzz
from lpucore.testing.programs import busy_program
from lpucore.testing.strategies import DrawChooser, legal_programs, raw_programs

CFG = fuzz.CFG
TIMEOUT = fuzz.TIMEOUT
LONG = int(os.environ.get("LPUCORE_FUZZ_EXAMPLES", "0"))
EXAMPLES = {"program": 25, "asm": 25, "snapshot": 10}     # per test, by default: a few seconds in all
OUT_DIR = fuzz.OUT_DIR


def fuzz_settings(kind: str):
    return settings(max_examples=LONG or EXAMPLES[kind], deadline=None, database=None,
                    phases=[Phase.explicit, Phase.generate], derandomize=not LONG,
                    suppress_health_check=list(HealthCheck))


def isolated(kind: str, data: bytes) -> None:
    """Run fuzz.CHECKS[kind](data) in a forked child; fail (saving the input) on a crash, a hang,
    an exception other than LpuError, or a difference between the engines."""
    res = fuzz.isolated(kind, data, TIMEOUT)
    if res is None:
        return
    what, detail = res
    saved = fuzz.save_input(kind, data, OUT_DIR)
    if what in ("crash", "hang"):
        pytest.fail(f"{kind} case {detail}; input saved to {saved}")
    if what == "exception":
        pytest.fail(f"{kind} case raised a non-LpuError (input saved to {saved}):\n{detail}")
    pytest.fail(f"engines disagree on a {kind} case (input saved to {saved}):\n{detail}")


# ---- inputs (in the parent: trusted, pure Python or a trusted run) ----------------------------
@st.composite
def valid_programs(draw) -> lpucore.Program:
    """Valid programs for ChipConfig.tiny() from lpucore.testing."""
    which = draw(st.sampled_from(["raw", "legal", "busy"]))
    if which == "raw":
        return draw(raw_programs(CFG))
    if which == "legal":
        return draw(legal_programs(CFG, max_transactions=4)).program
    return busy_program(CFG, seed=draw(st.integers(0, 10 ** 6)), length=draw(st.integers(10, 40)))


@st.composite
def mutated_program_files(draw) -> bytes:
    return fuzz.mutate_program_file(DrawChooser(draw), draw(valid_programs()).to_bytes())


@st.composite
def mutated_asm(draw) -> bytes:
    return fuzz.mutate_asm(DrawChooser(draw), lpucore.disassemble(draw(valid_programs())))


@st.composite
def mutated_snapshots(draw, engine: str) -> bytes:
    gen = draw(legal_programs(CFG, max_transactions=3))
    snap = fuzz.read_snapshot(fuzz.snapshot_file(engine, gen, draw(st.integers(0, 30))))
    return fuzz.mutate_snapshot(DrawChooser(draw), snap)


# ---- the tests --------------------------------------------------------------------------------
@fuzz_settings("program")
@given(mutated_program_files())
def test_fuzz_program_files(data):
    isolated("program", data)


@fuzz_settings("asm")
@given(mutated_asm())
def test_fuzz_assembler_text(data):
    isolated("asm", data)


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_fuzz_snapshot_files(engine):
    @fuzz_settings("snapshot")
    @given(mutated_snapshots(engine))
    def run(data):
        isolated("snapshot", data)

    with np.errstate(all="ignore"):
        run()


def test_the_harness_catches_crashes_and_hangs(monkeypatch, tmp_path):
    """A child that dies by a signal or hangs fails the case and saves the input."""
    monkeypatch.setattr(sys.modules[__name__], "OUT_DIR", str(tmp_path))
    monkeypatch.setattr(sys.modules[__name__], "TIMEOUT", 1.0)
    monkeypatch.setitem(fuzz.CHECKS, "program", lambda data: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(pytest.fail.Exception, match=f"killed by signal {int(signal.SIGKILL)}"):
        isolated("program", b"crash")
    monkeypatch.setitem(fuzz.CHECKS, "program", lambda data: time.sleep(30))
    with pytest.raises(pytest.fail.Exception, match="ran past"):
        isolated("program", b"hang")
    monkeypatch.setitem(fuzz.CHECKS, "program", lambda data: int("x"))
    with pytest.raises(pytest.fail.Exception, match="non-LpuError"):
        isolated("program", b"raise")
    assert len(os.listdir(tmp_path)) == 3


# ---- the campaign (python -m lpucore.testing.fuzz), briefly ------------------------------------
def test_campaign_runs_every_kind_without_failures(tmp_path):
    pool = fuzz.Pool(seed=1, programs=6, snapshots=4)
    c = fuzz.Campaign(240, seed=1, batch=100, out_dir=str(tmp_path), pool=pool, progress=0,
                      weights={"program": 1, "asm": 1, "snapshot": 1}).run()
    assert sum(sum(v.values()) for v in c.counts.values()) == 240
    assert c.bad == {"crash": 0, "hang": 0, "exception": 0, "disagreement": 0}, c.summary()
    assert all(c.counts[k]["rejected"] for k in fuzz.KINDS), c.summary()
    assert c.counts["asm"]["ran"] and c.counts["snapshot"]["restored"], c.summary()
    assert not list(tmp_path.iterdir())
    # a case is a function of (seed, number): the same input every time
    assert fuzz.make_case(1, 17, pool, fuzz.WEIGHTS) == fuzz.make_case(1, 17, pool, fuzz.WEIGHTS)


_EARLIER = []


def _fake_check(data: bytes):
    """Cases whose input says what to do: crash, hang, raise, disagree, or crash only after an
    earlier case in the same process."""
    if data == b"crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if data == b"hang":
        time.sleep(30)
    if data == b"raise":
        int("x")
    if data == b"disagree":
        return "ran", ["cycle: reference 1 vs fast 2"]
    if data == b"arm":
        _EARLIER.append(1)
    if data == b"crash-if-armed" and _EARLIER:
        os.kill(os.getpid(), signal.SIGKILL)
    return "rejected", []


def test_campaign_catches_and_saves_crashes_hangs_exceptions_and_disagreements(monkeypatch, tmp_path, capsys):
    script = {3: b"crash", 5: b"hang", 7: b"raise", 9: b"disagree", 12: b"arm", 14: b"crash-if-armed"}
    monkeypatch.setattr(fuzz, "make_case", lambda seed, i, pool, weights, scratch=None:
                        ("program", script.get(i, b"fine %d" % i)))
    monkeypatch.setitem(fuzz.CHECKS, "program", _fake_check)
    c = fuzz.Campaign(20, batch=10, out_dir=str(tmp_path), timeout=1.0, pool=fuzz.Pool.__new__(fuzz.Pool),
                      progress=0, log=sys.stdout).run()
    assert c.bad == {"crash": 2, "hang": 1, "exception": 1, "disagreement": 1}, c.summary()
    assert sum(c.counts["program"].values()) == 20
    assert [(what, i) for what, i, *_ in c.failures] == [("crash", 3), ("hang", 5), ("exception", 7),
                                                         ("disagreement", 9), ("crash", 14)]
    saved = {f for f in os.listdir(tmp_path)}
    assert "crash-seed0-case14-context" in saved
    assert sorted(os.listdir(tmp_path / "crash-seed0-case14-context")) == [f"{j:09d}.lpup" for j in range(10, 14)]
    assert "alone" in c.failures[0][3] and "passes alone" in c.failures[4][3]
    assert "ValueError" in c.failures[2][3]
    text = c.summary()
    assert "crashes 2, hangs 1 (over 1 s), foreign exceptions 1, engine disagreements 1" in text


def test_replay_of_a_saved_input(tmp_path, capsys):
    path = fuzz.save_input("asm", lpucore.disassemble(busy_program(CFG, seed=3, length=12)).encode(), str(tmp_path))
    assert fuzz.main(["--replay", path]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: asm ran"


if __name__ == "__main__":               # replay saved inputs in this process: python tests/test_fuzz.py FILE...
    sys.exit(fuzz.replay(sys.argv[1:]))
