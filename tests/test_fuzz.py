"""Fuzzing hostile files: mutated program files, snapshot files and assembler text.

Every mutated input must either raise an :class:`~lpucore.LpuError` (and no other exception)
or load and run identically on both engines (the same error text, or the same memory, stats,
counters and cycle; runs are capped at ``MAX_CYCLES``).  A snapshot belongs to one engine, so a
mutated snapshot must restore and run on its own engine or raise an LpuError.

The engine part of every case runs in a forked child process: a child killed by a signal (a
crash in the C core) or running past ``TIMEOUT`` seconds fails the test, and the input is saved
to ``$LPUCORE_FUZZ_DIR`` (default: ``<tmp>/lpucore-fuzz``) as ``<kind>-<hash>.<ext>``.  Replay a
saved input in this process (e.g. under gdb) with ``python tests/test_fuzz.py FILE``.

By default each test tries a few examples (seconds in all).  Long mode, e.g. overnight::

    LPUCORE_FUZZ_EXAMPLES=100000 python -m pytest -q -n 0 tests/test_fuzz.py

Hypothesis keeps no example database here (``database=None``), so long runs leave nothing
behind but the saved failing inputs; failing inputs are not shrunk (a hang would cost
``TIMEOUT`` per shrink step), they are saved as found.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import signal
import struct
import sys
import tempfile
import traceback
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import lpucore
from lpucore import Chip, ChipConfig, LpuError, Program, isa
from lpucore.snapshot import Snapshot
from lpucore.testing.programs import busy_program
from lpucore.testing.strategies import legal_programs, raw_programs

CFG = ChipConfig.tiny()
MAX_CYCLES = 500                       # per run: mutated NOP counts and Repeats must not make runs long
TIMEOUT = 10.0                         # seconds per case, in the child
LONG = int(os.environ.get("LPUCORE_FUZZ_EXAMPLES", "0"))
EXAMPLES = {"program": 25, "asm": 25, "snapshot": 10}     # per test, by default: a few seconds in all
OUT_DIR = os.environ.get("LPUCORE_FUZZ_DIR") or os.path.join(tempfile.gettempdir(), "lpucore-fuzz")
EXT = {"program": ".lpup", "asm": ".lpuasm", "snapshot": ".lpusnap"}

# Values that break things: boundaries of the tiny chip's ranges and of the integer types.
INTERESTING = [0, 1, -1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 127, 128, 255, 256, 1023, 1024,
               4095, 4096, 65535, 65536, 10 ** 6, isa.LATCH_BASE, isa.NONE, 2 ** 31 - 1, -2 ** 31, 2 ** 62,
               -2 ** 62, 2 ** 63 - 1, -2 ** 63]


def fuzz_settings(kind: str):
    return settings(max_examples=LONG or EXAMPLES[kind], deadline=None, database=None,
                    phases=[Phase.explicit, Phase.generate], derandomize=not LONG,
                    suppress_health_check=list(HealthCheck))


# ---- the checks (run in the child) ---------------------------------------------------------------
def _outcome(engine: str, program: Program):
    """What ``engine`` does with ``program`` from a fixed SRAM pattern: (error, cycle, stats,
    counters, memory, C2C outbox)."""
    chip = Chip(program.config, engine=engine)
    chip.load(program)
    cfg = program.config
    rng = np.random.default_rng(1)
    for g in range(cfg.mem_slices):
        chip.engine.write_mem(g, 0, rng.integers(0, 256, (cfg.addresses_per_slice, cfg.lanes), dtype=np.uint8))
    try:
        chip.run(max_cycles=MAX_CYCLES)
        err = None
    except LpuError as e:
        err = (type(e).__name__, str(e))
    mem = chip.memory()
    ctr = {k: np.asarray(v).tolist() for k, v in chip.counters().items()}
    out = [(link, c, a, v.tobytes()) for link, c, a, v in chip.c2c_take_outbox()]
    return {"error": err, "cycle": chip.cycle, "stats": chip.stats().to_dict(), "counters": ctr,
            "memory": mem, "outbox": out}


def _run_both(program: Program) -> list:
    """The differences between the engines on ``program`` (empty: identical)."""
    a, b = _outcome("reference", program), _outcome("fast", program)
    diffs = []
    for k in ("error", "cycle", "stats", "counters", "outbox"):
        if a[k] != b[k]:
            diffs.append(f"{k}: reference {a[k]!r:.400} vs fast {b[k]!r:.400}")
    if not np.array_equal(a["memory"], b["memory"]):
        g, addr, lane = np.argwhere(a["memory"] != b["memory"])[0]
        diffs.append(f"memory: first difference at slice {g} address {addr} lane {lane}")
    return diffs


def check_program_file(data: bytes) -> list:
    try:
        program = Program.from_bytes(data)
    except LpuError:
        return []
    return _run_both(program)


def check_asm(data: bytes) -> list:
    try:
        program = lpucore.assemble(data.decode("utf-8"), CFG)
    except LpuError:
        return []
    return _run_both(program)


def check_snapshot_file(data: bytes) -> list:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.lpusnap")
        with open(path, "wb") as f:
            f.write(data)
        try:
            snap = Snapshot.load(path, config=CFG)
            chip = Chip(CFG, engine=snap.engine)
            chip.restore(snap)
        except LpuError:
            return []
    try:
        chip.run(max_cycles=MAX_CYCLES)
        chip.snapshot()
    except LpuError:
        pass
    chip.stats()
    return []


CHECKS = {"program": check_program_file, "asm": check_asm, "snapshot": check_snapshot_file}


# ---- the forked child --------------------------------------------------------------------------
def _child(conn, kind: str, data: bytes) -> None:
    try:
        res = ("diff", CHECKS[kind](data))
    except BaseException:                  # any exception but an LpuError is a bug
        res = ("exception", traceback.format_exc())
    conn.send(res)
    conn.close()


def save_input(kind: str, data: bytes) -> str:
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, f"{kind}-{hashlib.sha256(data).hexdigest()[:16]}{EXT[kind]}")
    with open(path, "wb") as f:
        f.write(data)
    return path


def isolated(kind: str, data: bytes) -> None:
    """Run CHECKS[kind](data) in a forked child; fail (saving the input) on a crash, a hang,
    an exception other than LpuError, or a difference between the engines."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, kind, data))
    proc.start()
    send.close()
    res = None
    hung = False
    try:
        if recv.poll(TIMEOUT):
            try:
                res = recv.recv()
            except EOFError:                    # the child died before answering
                pass
    finally:
        proc.join(1.0 if res is None else TIMEOUT)
        if proc.is_alive():
            hung = True
            proc.kill()
            proc.join()
        recv.close()
    if res is None:
        how = (f"ran past {TIMEOUT} s" if hung
               else f"was killed by signal {-proc.exitcode}" if proc.exitcode is not None and proc.exitcode < 0
               else f"exited with status {proc.exitcode}")
        pytest.fail(f"{kind} case {how}; input saved to {save_input(kind, data)}")
    what, detail = res
    if what == "exception":
        pytest.fail(f"{kind} case raised a non-LpuError (input saved to {save_input(kind, data)}):\n{detail}")
    if detail:
        pytest.fail(f"engines disagree on a {kind} case (input saved to {save_input(kind, data)}):\n"
                    + "\n".join(detail))


# ---- inputs and mutations (in the parent: pure Python, no engine) ------------------------------
@st.composite
def valid_programs(draw) -> Program:
    """Valid programs for ChipConfig.tiny() from lpucore.testing."""
    which = draw(st.sampled_from(["raw", "legal", "busy"]))
    if which == "raw":
        return draw(raw_programs(CFG))
    if which == "legal":
        return draw(legal_programs(CFG, max_transactions=4)).program
    return busy_program(CFG, seed=draw(st.integers(0, 10 ** 6)), length=draw(st.integers(10, 40)))


def _int32(draw) -> int:
    v = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(-2 ** 31, 2 ** 31 - 1), st.integers(-40, 40)))
    return (v + 2 ** 31) % 2 ** 32 - 2 ** 31


def mutate_bytes(draw, blob: bytearray, lo: int = 0, hi: int = -1) -> bytearray:
    """Byte-level mutations, at positions mostly in blob[lo:hi]."""
    hi = len(blob) if hi < 0 else hi
    for _ in range(draw(st.integers(1, 6))):
        if not blob:
            break
        top = min(hi, len(blob))                      # a cut may have shortened the blob
        if lo < top and draw(st.integers(0, 3)):
            i = draw(st.integers(lo, top - 1))
        else:
            i = draw(st.integers(0, len(blob) - 1))
        how = draw(st.sampled_from(["flip", "set", "cut", "dup"]))
        if how == "flip":
            blob[i] ^= 1 << draw(st.integers(0, 7))
        elif how == "set":
            blob[i] = draw(st.integers(0, 255))
        elif how == "cut":
            del blob[i:i + draw(st.integers(1, 16))]
        else:
            blob[i:i] = blob[i:i + draw(st.integers(1, 16))]
    return blob


@st.composite
def mutated_program_files(draw) -> bytes:
    """A valid program file with operands, opcodes and bytes changed, and its CRC made right
    again so that the mutations reach the parser and the validator."""
    body = bytearray(draw(valid_programs()).to_bytes()[:-4])
    (mlen,) = struct.unpack_from("<I", body, 8)
    code = 12 + mlen + 4                              # the instruction table
    row = 4 * (1 + isa.NFIELDS)
    for _ in range(draw(st.integers(1, 4))):
        n = max(0, (len(body) - code) // row)         # rows left (a byte cut may have shortened the table)
        if n and draw(st.integers(0, 3)):             # mostly: one int32 operand or opcode
            r, c = draw(st.integers(0, n - 1)), draw(st.integers(0, isa.NFIELDS))
            struct.pack_into("<i", body, code + r * row + 4 * c, _int32(draw))
        else:
            body = mutate_bytes(draw, body, code, len(body))
    if draw(st.integers(0, 9)) == 0:                  # and sometimes a wrong checksum
        return bytes(body) + struct.pack("<I", draw(st.integers(0, 2 ** 32 - 1)))
    return bytes(body) + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


_MNEMONICS = sorted({op.mnemonic for op in isa.TABLE})
_NUMBER = re.compile(r"-?\b\d+\b")


@st.composite
def mutated_asm(draw) -> bytes:
    """Assembler text of a valid program with numbers, mnemonics, characters and lines changed."""
    lines = lpucore.disassemble(draw(valid_programs())).splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["number", "number", "mnemonic", "char", "line"]))
        line = lines[i]
        if how == "number":
            nums = list(_NUMBER.finditer(line))
            if nums:
                m = nums[draw(st.integers(0, len(nums) - 1))]
                line = line[:m.start()] + str(draw(st.sampled_from(INTERESTING))) + line[m.end():]
        elif how == "mnemonic":
            words = line.split(None, 1)
            if words:
                line = " ".join([draw(st.sampled_from(_MNEMONICS))] + words[1:])
        elif how == "char":
            j = draw(st.integers(0, len(line)))
            c = draw(st.sampled_from(list(" ,;#-+.:=0123456789EWAxe\t\u00e9\u0663") + [""]))
            line = line[:j] + c + line[j + draw(st.integers(0, 1)):]
        else:
            act = draw(st.sampled_from(["drop", "dup", "swap"]))
            if act == "drop":
                del lines[i]
                continue
            j = draw(st.integers(0, len(lines) - 1))
            if act == "dup":
                lines.insert(j, line)
                continue
            lines[i], lines[j] = lines[j], lines[i]
            continue
        lines[i] = line
    return "\n".join(lines).encode("utf-8")


def _snapshot_file(engine: str, gen, cycles: int) -> bytes:
    """A snapshot file of a legal program's run on ``engine``, taken after ``cycles`` cycles."""
    chip = Chip(CFG, engine=engine)
    chip.load(gen.program)
    gen.load_inputs(chip)
    chip.run(max_cycles=cycles)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.lpusnap")
        chip.snapshot().save(path)
        with open(path, "rb") as f:
            return f.read()


@st.composite
def mutated_snapshots(draw, engine: str) -> bytes:
    """A snapshot file with array elements, scalars, array shapes/dtypes or file bytes changed.
    The base snapshot comes from a legal program (trusted input: run here, in the parent)."""
    gen = draw(legal_programs(CFG, max_transactions=3))
    data = _snapshot_file(engine, gen, draw(st.integers(0, 30)))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.lpusnap")
        with open(path, "wb") as f:
            f.write(data)
        snap = Snapshot.load(path)
        names = sorted(snap.arrays)
        for _ in range(draw(st.integers(1, 4))):
            how = draw(st.sampled_from(["element", "element", "element", "scalar", "shape"]))
            if how == "scalar":
                key = draw(st.sampled_from(sorted(snap.scalars)))
                snap.scalars[key] = draw(st.one_of(st.sampled_from(INTERESTING),
                                                   st.integers(-3, 3).map(lambda d, k=key: snap.scalars[k] + d)))
                continue
            name = draw(st.sampled_from(names))
            arr = np.array(snap.arrays[name])
            if how == "shape":
                act = draw(st.sampled_from(["truncate", "extend", "axis", "dtype"]))
                flat = arr.reshape(-1)
                snap.arrays[name] = (flat[:-1] if act == "truncate" else
                                     np.concatenate([flat, flat[:1]]) if act == "extend" else
                                     arr[None] if act == "axis" else
                                     arr.astype(np.float64 if arr.dtype.kind in "iub" else np.int64))
                continue
            if arr.size == 0:
                continue
            i = draw(st.integers(0, arr.size - 1))
            if arr.dtype.kind == "f":
                arr.reshape(-1)[i] = draw(st.sampled_from([0.0, -0.0, np.inf, -np.inf, np.nan, 1e38, 65504.0, 1.5]))
            else:
                near = int(arr.flat[i]) + draw(st.integers(-3, 3))
                v = draw(st.sampled_from(INTERESTING)) if draw(st.booleans()) else near
                v = (v + 2 ** 63) % 2 ** 64 - 2 ** 63                  # an int64, wrapped
                arr.reshape(-1)[i] = np.asarray(v, dtype=np.int64).astype(arr.dtype)
            snap.arrays[name] = arr
        snap.save(path)
        with open(path, "rb") as f:
            blob = bytearray(f.read())
    if draw(st.integers(0, 4)) == 0:                  # zip / .npy / header bytes
        blob = mutate_bytes(draw, blob)
    return bytes(blob)


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
    monkeypatch.setitem(CHECKS, "program", lambda data: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(pytest.fail.Exception, match=f"killed by signal {int(signal.SIGKILL)}"):
        isolated("program", b"crash")
    monkeypatch.setitem(CHECKS, "program", lambda data: __import__("time").sleep(30))
    with pytest.raises(pytest.fail.Exception, match="ran past"):
        isolated("program", b"hang")
    monkeypatch.setitem(CHECKS, "program", lambda data: int("x"))
    with pytest.raises(pytest.fail.Exception, match="non-LpuError"):
        isolated("program", b"raise")
    assert len(os.listdir(tmp_path)) == 3


if __name__ == "__main__":               # replay saved inputs in this process: python tests/test_fuzz.py FILE...
    for arg in sys.argv[1:]:
        kind = next(k for k, e in EXT.items() if arg.endswith(e))
        with open(arg, "rb") as fh:
            print(arg, CHECKS[kind](fh.read()) or "ok")
