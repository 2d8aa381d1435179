"""Fuzzing hostile files: mutated program files, snapshot files and assembler text.

Every mutated input must either raise an :class:`~lpucore.LpuError` (and no other exception)
or load and run identically on both engines (the same error text, or the same memory, stats,
counters, cycle and C2C outbox; runs are capped at ``MAX_CYCLES``).  A snapshot belongs to one
engine, so a mutated snapshot must restore and run on its own engine or raise an LpuError.

The mutations and the checks live here, written against a *chooser* (``integers(lo, hi)``,
``choice(seq)``, ``boolean()``: :class:`~lpucore.testing.programs.RandomChooser` or hypothesis'
:class:`~lpucore.testing.strategies.DrawChooser`), so that ``tests/test_fuzz.py`` (hypothesis,
a forked child per case) and the long campaign here share them.  Program files get their
checksum recomputed (mostly) so that mutations reach the parser and the validator; program
files and assembler text sometimes get a mutated embedded configuration.

The long campaign (``python -m lpucore.testing.fuzz --cases 1000000``) draws each case from a
seeded :class:`~lpucore.testing.programs.RandomChooser` (case ``i`` of seed ``s`` is always the
same input) over a pool of valid programs and snapshots built once, and runs the cases in batches
in a persistent forked worker process.  The parent watches it: a worker killed by a signal is a
crash, a case running past ``TIMEOUT`` seconds is a hang (the worker is killed); either way the
case is re-run alone in a fresh child to confirm it, its input is saved (with the inputs of the
batch before it when it does not crash alone), and a new worker carries on with the next case.
Exceptions other than LpuError and engine disagreements are reported by the worker and saved.
Failing inputs go to ``$LPUCORE_FUZZ_DIR`` (default ``<tmp>/lpucore-fuzz``) as
``<kind>-<hash>.<ext>``; ``python -m lpucore.testing.fuzz --replay FILE...`` replays them in
this process (e.g. under gdb).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import isa
from ..asm import assemble, disassemble
from ..chip import Chip
from ..config import ChipConfig
from ..errors import LpuError
from ..program import Program
from ..snapshot import Snapshot
from .programs import GeneratedProgram, RandomChooser, busy_program, generate

CFG = ChipConfig.tiny()
MAX_CYCLES = 500                       # per run: mutated NOP counts and Repeats must not make runs long
TIMEOUT = 10.0                         # seconds per case: a case running longer is a hang
KINDS = ("program", "asm", "snapshot")
EXT = {"program": ".lpup", "asm": ".lpuasm", "snapshot": ".lpusnap"}
OUT_DIR = os.environ.get("LPUCORE_FUZZ_DIR") or os.path.join(tempfile.gettempdir(), "lpucore-fuzz")

# Values that break things: boundaries of the tiny chip's ranges and of the integer types.
INTERESTING = [0, 1, -1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 127, 128, 255, 256, 1023, 1024,
               4095, 4096, 65535, 65536, 10 ** 6, isa.LATCH_BASE, isa.NONE, 2 ** 31 - 1, -2 ** 31, 2 ** 62,
               -2 ** 62, 2 ** 63 - 1, -2 ** 63]
# Configuration values: numbers near the limits, non-numbers, non-finite floats.
_CONFIG_ODD: List[Any] = [0, -1, 1, 2, 3, 2 ** 16, 2 ** 31 - 1, 2 ** 32, 2 ** 63, 10 ** 9, 10 ** 30, 0.5, 1.5,
                          1e300, float("inf"), float("-inf"), float("nan"), True, None, "x", "", [], {}]

# ---- mutations (any chooser: integers(lo, hi), choice(seq), boolean()) ------------------------


def _int32(r: Any, old: int = 0) -> int:
    """An int32 operand: an interesting value, any int32, a small one, or near the old value."""
    how = r.integers(0, 3)
    v = (r.choice(INTERESTING) if how == 0 else r.integers(-2 ** 31, 2 ** 31 - 1) if how == 1
         else r.integers(-40, 40) if how == 2 else old + r.integers(-3, 3))
    return int((v + 2 ** 31) % 2 ** 32 - 2 ** 31)


def mutate_bytes(r: Any, blob: bytearray, lo: int = 0, hi: int = -1) -> bytearray:
    """Byte-level mutations (flip a bit, set, cut or duplicate bytes), mostly in blob[lo:hi]."""
    hi = len(blob) if hi < 0 else hi
    for _ in range(r.integers(1, 6)):
        if not blob:
            break
        top = min(hi, len(blob))                      # a cut may have shortened the blob
        if lo < top and r.integers(0, 3):
            i = r.integers(lo, top - 1)
        else:
            i = r.integers(0, len(blob) - 1)
        how = r.choice(("flip", "set", "cut", "dup"))
        if how == "flip":
            blob[i] ^= 1 << r.integers(0, 7)
        elif how == "set":
            blob[i] = r.integers(0, 255)
        elif how == "cut":
            del blob[i:i + r.integers(1, 16)]
        else:
            blob[i:i] = blob[i:i + r.integers(1, 16)]
    return blob


def mutate_config(r: Any, d: Dict[str, Any]) -> Dict[str, Any]:
    """A configuration dict with one to three fields changed: near the old value, scaled, an
    odd value (zero, huge, non-finite, a string, None, ...), or removed; or an unknown field."""
    d = dict(d)
    for _ in range(r.integers(1, 3)):
        key = r.choice(sorted(d))
        old = d[key]
        how = r.integers(0, 5)
        if how == 0 and isinstance(old, (int, float)) and not isinstance(old, bool):
            d[key] = old + r.integers(-2, 2)
        elif how == 1 and isinstance(old, (int, float)) and not isinstance(old, bool):
            d[key] = old * r.choice((2, 4, 10)) if r.boolean() else old // r.choice((2, 3))
        elif how == 2:
            del d[key]
        elif how == 3 and r.integers(0, 3) == 0:
            d["no_such_field"] = r.choice(_CONFIG_ODD)
        else:
            d[key] = r.choice(_CONFIG_ODD)
    return d


_MNEMONICS = sorted({op.mnemonic for op in isa.TABLE})
_OPCODES = sorted(isa.BY_OPCODE)


def mutate_program_file(r: Any, data: bytes) -> bytes:
    """A valid program file with operands, opcodes, its configuration and bytes changed, and its
    CRC made right again (nine times in ten) so that the mutations reach the parser and the
    validator."""
    body = bytearray(data[:-4])
    (mlen,) = struct.unpack_from("<I", body, 8)
    if r.integers(0, 7) == 0:                         # the embedded configuration
        meta = json.loads(bytes(body[12:12 + mlen]))
        meta["config"] = mutate_config(r, meta["config"])
        mj = json.dumps(meta, sort_keys=True).encode()
        body[8:12] = struct.pack("<I", len(mj))
        body[12:12 + mlen] = mj
        mlen = len(mj)
    code = 12 + mlen + 4                              # the instruction table
    row = 4 * (1 + isa.NFIELDS)
    for _ in range(1 if r.boolean() else r.integers(2, 4)):
        n = max(0, (len(body) - code) // row)         # rows left (a byte cut may have shortened the table)
        if n and r.integers(0, 5):                    # mostly: one int32 operand (of the op's) or opcode
            at = code + r.integers(0, n - 1) * row
            op = isa.BY_OPCODE.get(struct.unpack_from("<i", body, at)[0])
            used = len(op.fields) if op is not None else isa.NFIELDS
            c = 0 if r.integers(0, 4) == 0 else r.integers(1, max(1, used)) if r.integers(0, 3) else \
                r.integers(0, isa.NFIELDS)
            old = struct.unpack_from("<i", body, at + 4 * c)[0]
            v = r.choice(_OPCODES) if c == 0 and r.boolean() else _int32(r, old)
            struct.pack_into("<i", body, at + 4 * c, v)
        else:
            body = mutate_bytes(r, body, code, len(body))
    if r.integers(0, 9) == 0:                         # and sometimes a wrong checksum
        return bytes(body) + struct.pack("<I", r.integers(0, 2 ** 32 - 1))
    return bytes(body) + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


_NUMBER = re.compile(r"-?\b\d+\b")
_CHARS = list(" ,;#-+.:=0123456789EWAxe\t\u00e9\u0663") + [""]


def mutate_asm(r: Any, text: str) -> bytes:
    """Assembler text of a valid program with numbers, mnemonics, characters, lines and (one
    time in ten) its ``.config`` changed."""
    lines = text.splitlines()
    if lines and lines[0].startswith(".config") and r.integers(0, 9) == 0:
        lines[0] = ".config json: " + json.dumps(mutate_config(r, CFG.to_dict()))
    for _ in range(r.integers(1, 4)):
        if not lines:
            break
        i = r.integers(0, len(lines) - 1)
        how = r.choice(("number", "number", "mnemonic", "char", "line"))
        line = lines[i]
        if how == "number":
            nums = list(_NUMBER.finditer(line))
            if nums:
                m = nums[r.integers(0, len(nums) - 1)]
                line = line[:m.start()] + str(r.choice(INTERESTING)) + line[m.end():]
        elif how == "mnemonic":
            words = line.split(None, 1)
            if words:
                line = " ".join([r.choice(_MNEMONICS)] + words[1:])
        elif how == "char":
            j = r.integers(0, len(line))
            line = line[:j] + r.choice(_CHARS) + line[j + r.integers(0, 1):]
        else:
            act = r.choice(("drop", "dup", "swap"))
            if act == "drop":
                del lines[i]
                continue
            j = r.integers(0, len(lines) - 1)
            if act == "dup":
                lines.insert(j, line)
                continue
            lines[i], lines[j] = lines[j], lines[i]
            continue
        lines[i] = line
    return "\n".join(lines).encode("utf-8")


def snapshot_file(engine: str, gen: GeneratedProgram, cycles: int) -> bytes:
    """A snapshot file of a legal program's run on ``engine``, taken after ``cycles`` cycles
    (trusted input: run in the calling process)."""
    chip = Chip(CFG, engine=engine)
    chip.load(gen.program)
    gen.load_inputs(chip)
    chip.run(max_cycles=cycles)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.lpusnap")
        chip.snapshot().save(path)
        with open(path, "rb") as f:
            return f.read()


def read_snapshot(data: bytes) -> Snapshot:
    """A (trusted) snapshot file's contents."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.lpusnap")
        with open(path, "wb") as f:
            f.write(data)
        return Snapshot.load(path)


def mutate_snapshot(r: Any, snap: Snapshot, scratch: Optional[str] = None) -> bytes:
    """A snapshot file with array elements, scalars, array shapes/dtypes or (one time in five)
    file bytes changed.  ``snap`` is left as it was; ``scratch`` is a file to write through
    (default: a temporary one)."""
    snap = Snapshot(snap.engine, snap.config, snap.fp16_mxm, snap.program_bytes, dict(snap.scalars),
                    dict(snap.arrays))
    names = sorted(snap.arrays)
    with np.errstate(all="ignore"):
        for _ in range(r.integers(1, 4)):
            how = r.choice(("element", "element", "element", "scalar", "shape"))
            if how == "scalar":
                key = r.choice(sorted(snap.scalars))
                snap.scalars[key] = r.choice(INTERESTING) if r.boolean() else snap.scalars[key] + r.integers(-3, 3)
                continue
            name = r.choice(names)
            arr = np.array(snap.arrays[name])
            if how == "shape":
                act = r.choice(("truncate", "extend", "axis", "dtype"))
                flat = arr.reshape(-1)
                snap.arrays[name] = (flat[:-1] if act == "truncate" else
                                     np.concatenate([flat, flat[:1]]) if act == "extend" else
                                     arr[None] if act == "axis" else
                                     arr.astype(np.float64 if arr.dtype.kind in "iub" else np.int64))
                continue
            if arr.size == 0:
                continue
            i = r.integers(0, arr.size - 1)
            if arr.dtype.kind == "f":
                arr.reshape(-1)[i] = r.choice((0.0, -0.0, np.inf, -np.inf, np.nan, 1e38, 65504.0, 1.5))
            else:
                near = int(arr.flat[i]) + r.integers(-3, 3)
                v = r.choice(INTERESTING) if r.boolean() else near
                v = (v + 2 ** 63) % 2 ** 64 - 2 ** 63                  # an int64, wrapped
                arr.reshape(-1)[i] = np.asarray(v, dtype=np.int64).astype(arr.dtype)
            snap.arrays[name] = arr
    if scratch is None:
        with tempfile.TemporaryDirectory() as d:
            return _mutated_file(r, snap, os.path.join(d, "s.lpusnap"))
    return _mutated_file(r, snap, scratch)


def _mutated_file(r: Any, snap: Snapshot, path: str) -> bytes:
    snap.save(path)
    with open(path, "rb") as f:
        blob = bytearray(f.read())
    if r.integers(0, 4) == 0:                         # zip / .npy / header bytes
        blob = mutate_bytes(r, blob)
    return bytes(blob)


# ---- the checks ------------------------------------------------------------------------------
# Each returns (outcome, differences): outcome "rejected" (an LpuError on the way in), "ran"
# (loaded and ran on both engines) or "restored" (a snapshot restored and ran); differences
# between the engines (empty: none).  Any other exception propagates: it is a bug.


def outcome(engine: str, program: Program) -> Dict[str, Any]:
    """What ``engine`` does with ``program`` from a fixed SRAM pattern: error, cycle, stats,
    counters, memory and C2C outbox."""
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


def run_both(program: Program) -> List[str]:
    """The differences between the engines on ``program`` (empty: identical)."""
    a, b = outcome("reference", program), outcome("fast", program)
    diffs = []
    for k in ("error", "cycle", "stats", "counters", "outbox"):
        if a[k] != b[k]:
            diffs.append(f"{k}: reference {a[k]!r:.400} vs fast {b[k]!r:.400}")
    if not np.array_equal(a["memory"], b["memory"]):
        g, addr, lane = np.argwhere(a["memory"] != b["memory"])[0]
        diffs.append(f"memory: first difference at slice {g} address {addr} lane {lane}")
    return diffs


def check_program_file(data: bytes) -> Tuple[str, List[str]]:
    try:
        program = Program.from_bytes(data)
    except LpuError:
        return "rejected", []
    return "ran", run_both(program)


def check_asm(data: bytes) -> Tuple[str, List[str]]:
    try:
        program = assemble(data.decode("utf-8"), CFG)
    except LpuError:
        return "rejected", []
    return "ran", run_both(program)


def check_snapshot_file(data: bytes, scratch: Optional[str] = None) -> Tuple[str, List[str]]:
    """Restore and run a snapshot file on its own engine; ``scratch``: a file to read it through."""
    if scratch is None:
        with tempfile.TemporaryDirectory() as d:
            return check_snapshot_file(data, os.path.join(d, "s.lpusnap"))
    with open(scratch, "wb") as f:
        f.write(data)
    try:
        snap = Snapshot.load(scratch, config=CFG)
        chip = Chip(CFG, engine=snap.engine)
        chip.restore(snap)
    except LpuError:
        return "rejected", []
    with np.errstate(all="ignore"):
        try:
            chip.run(max_cycles=MAX_CYCLES)
            chip.snapshot()
        except LpuError:
            pass
        chip.stats()
    return "restored", []


CHECKS: Dict[str, Callable[..., Tuple[str, List[str]]]] = {
    "program": check_program_file, "asm": check_asm, "snapshot": check_snapshot_file}


def save_input(kind: str, data: bytes, out_dir: Optional[str] = None) -> str:
    """Write a failing input to ``out_dir`` (default OUT_DIR) as ``<kind>-<hash>.<ext>``."""
    out_dir = out_dir or OUT_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{kind}-{hashlib.sha256(data).hexdigest()[:16]}{EXT[kind]}")
    with open(path, "wb") as f:
        f.write(data)
    return path


def kind_of(path: str) -> str:
    """The kind of a saved input, from its extension."""
    for k, e in EXT.items():
        if path.endswith(e):
            return k
    raise ValueError(f"{path}: not a saved fuzz input (extension one of {', '.join(EXT.values())})")


# ---- one case in a forked child (tests/test_fuzz.py, and confirming a campaign's crash) -------
def _child(conn: Any, kind: str, data: bytes) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res: Tuple[str, Any] = ("diff", CHECKS[kind](data)[1])
    except BaseException:                  # any exception but an LpuError is a bug
        res = ("exception", traceback.format_exc())
    conn.send(res)
    conn.close()


def isolated(kind: str, data: bytes, timeout: float = TIMEOUT) -> Optional[Tuple[str, str]]:
    """Run CHECKS[kind](data) in a forked child: None if it passed, else (what, detail) with
    what one of "crash", "hang", "exception", "disagreement"."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, kind, data))
    proc.start()
    send.close()
    res = None
    hung = False
    try:
        if recv.poll(timeout):
            try:
                res = recv.recv()
            except EOFError:                    # the child died before answering
                pass
    finally:
        proc.join(1.0 if res is None else timeout)
        if proc.is_alive():
            hung = res is None
            proc.kill()
            proc.join()
        recv.close()
    if res is None:
        if hung:
            return "hang", f"ran past {timeout} s"
        code = proc.exitcode
        return "crash", (f"was killed by signal {-code}" if code is not None and code < 0
                         else f"exited with status {code}")
    what, detail = res
    if what == "exception":
        return "exception", detail
    return ("disagreement", "\n".join(detail)) if detail else None


# ---- the long campaign ---------------------------------------------------------------------
class Pool:
    """The valid inputs a campaign mutates, built once from a seed (before forking workers):
    program files and their assembler text (legal programs, busy programs and, with hypothesis,
    raw programs), and parsed snapshots of legal programs' runs on both engines."""

    def __init__(self, seed: int = 0, programs: int = 60, snapshots: int = 24) -> None:
        r = RandomChooser(f"pool:{seed}")
        progs: List[Program] = []
        for i in range(programs):
            s = r.integers(0, 2 ** 31)
            if i % 2:
                progs.append(busy_program(CFG, seed=s, length=r.integers(10, 40)))
            else:
                progs.append(generate(CFG, seed=s, n_transactions=r.integers(1, 4), sync=r.boolean()).program)
        progs += _raw_programs(seed, programs // 2)
        self.files = [p.to_bytes() for p in progs]
        self.texts = [disassemble(p) for p in progs]
        self.snapshots: List[Snapshot] = []
        for i in range(snapshots):
            gen = generate(CFG, seed=r.integers(0, 2 ** 31), n_transactions=r.integers(1, 3), sync=r.boolean())
            data = snapshot_file(("reference", "fast")[i % 2], gen, r.integers(0, 30))
            self.snapshots.append(read_snapshot(data))


def _raw_programs(seed: int, n: int) -> List[Program]:
    """``n`` raw programs (valid instructions, any schedule) from hypothesis, seeded; none
    without hypothesis."""
    try:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as hseed

        from .strategies import raw_programs
    except ImportError:                       # pragma: no cover - the test extra is not installed
        return []
    out: List[Program] = []

    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hseed(seed)
    @given(raw_programs(CFG))
    def collect(p: Program) -> None:
        out.append(p)

    collect()
    return out


WEIGHTS = {"program": 4, "asm": 3, "snapshot": 1}


def make_case(seed: int, i: int, pool: Pool, weights: Dict[str, int], scratch: Optional[str] = None
              ) -> Tuple[str, bytes]:
    """Case ``i`` of campaign ``seed``: (kind, input bytes), always the same for the same pool."""
    r = RandomChooser(f"{seed}:{i}")
    x = r.integers(1, sum(weights.values()))
    for kind in KINDS:
        x -= weights.get(kind, 0)
        if x <= 0:
            break
    if kind == "program":
        return kind, mutate_program_file(r, r.choice(pool.files))
    if kind == "asm":
        return kind, mutate_asm(r, r.choice(pool.texts))
    return kind, mutate_snapshot(r, r.choice(pool.snapshots), scratch)


OUTCOMES = ("rejected", "ran", "restored", "exception", "disagreement", "crash", "hang")
_START, _CASE = 0, 1                          # the worker's status slots; the counts follow


def _slot(kind: str, what: str) -> int:
    return 2 + KINDS.index(kind) * len(OUTCOMES) + OUTCOMES.index(what)


def _worker(conn: Any, status: Any, seed: int, pool: Pool, weights: Dict[str, int], scratch: str) -> None:
    """Run batches (lo, hi) of cases; counts go to ``status`` as each case ends, exceptions and
    disagreements to ``conn``, and ("done", hi) after each batch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.simplefilter("ignore")
    np.seterr(all="ignore")
    mine = os.path.join(scratch, f"w{os.getpid()}.lpusnap")
    while True:
        job = conn.recv()
        if job is None:
            break
        lo, hi = job
        for i in range(lo, hi):
            status[_CASE] = i
            status[_START] = time.monotonic()
            kind = "program"
            try:
                kind, data = make_case(seed, i, pool, weights, mine)
                what, diffs = CHECKS[kind](data, mine) if kind == "snapshot" else CHECKS[kind](data)
                if diffs:
                    conn.send(("disagreement", i, kind, "\n".join(diffs)))
                    what = "disagreement"
            except BaseException:         # any exception but an LpuError is a bug
                conn.send(("exception", i, kind, traceback.format_exc()))
                what = "exception"
            status[_slot(kind, what)] += 1
        status[_START] = 0.0
        conn.send(("done", hi))


class Campaign:
    """A long fuzz run: ``cases`` cases of ``seed`` in batches of ``batch`` in a worker process
    (restarted every ``recycle`` cases and after a crash or a hang)."""

    def __init__(self, cases: int, seed: int = 0, batch: int = 500, weights: Optional[Dict[str, int]] = None,
                 out_dir: Optional[str] = None, timeout: float = TIMEOUT, recycle: int = 50000,
                 progress: float = 60.0, pool: Optional[Pool] = None, log: Any = sys.stderr, start: int = 0) -> None:
        self.cases, self.seed, self.batch, self.start = cases, seed, batch, start
        self.weights = dict(weights or WEIGHTS)
        self.out_dir = out_dir or OUT_DIR
        self.timeout, self.recycle, self.progress, self.log = timeout, recycle, progress, log
        self.pool = pool
        self.counts = {k: dict.fromkeys(OUTCOMES, 0) for k in KINDS}
        self.failures: List[Tuple[str, int, str, str, str]] = []     # (what, case, kind, detail, saved to)
        self.seconds = 0.0

    # the parent's side
    def _case(self, i: int) -> Tuple[str, bytes]:
        assert self.pool is not None
        return make_case(self.seed, i, self.pool, self.weights, os.path.join(self.scratch, "p.lpusnap"))

    def _start(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self.status = ctx.RawArray("d", 2 + len(KINDS) * len(OUTCOMES))
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, self.status, self.seed, self.pool, self.weights,
                                                      self.scratch), daemon=True)
        self.proc.start()
        child.close()
        self.since_start = 0

    def _stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.proc.join(5.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()
        for k in KINDS:                      # the finished cases' counts
            for w in OUTCOMES:
                self.counts[k][w] += int(self.status[_slot(k, w)])

    def _fail(self, what: str, i: int, kind: str, detail: str, data: Optional[bytes] = None) -> None:
        if data is None:
            kind, data = self._case(i)
        path = save_input(kind, data, self.out_dir)
        self.failures.append((what, i, kind, detail, path))
        print(f"lpucore fuzz: case {i} ({kind}): {what}, input saved to {path}\n{detail}", file=self.log, flush=True)

    def _died(self, i: int, lo: int, hung: bool) -> None:
        """The worker died (or was killed, hung) in case ``i`` of the batch that began at ``lo``:
        re-run the case alone in a fresh child; when it passes alone, save the batch's inputs
        before it too (the crash needs them), numbered in order."""
        kind, data = self._case(i)
        what = "hang" if hung else "crash"
        alone = isolated(kind, data, self.timeout)
        if alone is not None and alone[0] in ("crash", "hang"):
            self._fail(what, i, kind, f"{alone[1]} (alone, in a fresh process)", data)
        else:
            ctx_dir = os.path.join(self.out_dir, f"{what}-seed{self.seed}-case{i}-context")
            os.makedirs(ctx_dir, exist_ok=True)
            for j in range(lo, i):
                k, d = self._case(j)
                with open(os.path.join(ctx_dir, f"{j:09d}{EXT[k]}"), "wb") as f:
                    f.write(d)
            self._fail(what, i, kind, f"the worker {'hung' if hung else 'died'} in this case, which passes alone "
                       f"({alone}); cases {lo}..{i - 1} before it in the same process are in {ctx_dir}", data)
        self.counts[kind][what] += 1

    def _run_batch(self, lo: int, hi: int) -> None:
        while lo < hi:
            self.conn.send((lo, hi))
            dead = None
            while True:
                if self.conn.poll(0.25):
                    try:
                        msg = self.conn.recv()
                    except (EOFError, OSError):
                        dead = False
                        break
                    if msg[0] == "done":
                        break
                    what, i, kind, detail = msg
                    self._fail(what, i, kind, detail)
                    continue
                if not self.proc.is_alive():
                    dead = False
                    break
                start = self.status[_START]
                if start and time.monotonic() - start > self.timeout:
                    dead = True
                    break
            if dead is None:
                self.since_start += hi - lo
                return
            i = int(self.status[_CASE])
            self._stop(kill=True)
            self._died(i, lo, dead)
            self._start()
            lo = i + 1

    def run(self) -> "Campaign":
        t0 = time.monotonic()
        if self.pool is None:
            self.pool = Pool(self.seed)
        self.scratch = tempfile.mkdtemp(prefix="lpucore-fuzz-")
        last = time.monotonic()
        try:
            self._start()
            end = self.start + self.cases
            for lo in range(self.start, end, self.batch):
                if self.since_start >= self.recycle:
                    self._stop()
                    self._start()
                self._run_batch(lo, min(lo + self.batch, end))
                if self.progress and time.monotonic() - last >= self.progress:
                    last = time.monotonic()
                    done = min(lo + self.batch, end) - self.start
                    print(f"lpucore fuzz: {done} of {self.cases} cases, {last - t0:.0f} s, "
                          f"{len(self.failures)} failures", file=self.log, flush=True)
            self._stop()
        finally:
            if getattr(self, "proc", None) is not None and self.proc.is_alive():
                self.proc.kill()
            shutil.rmtree(self.scratch, ignore_errors=True)
        self.seconds = time.monotonic() - t0
        return self

    @property
    def bad(self) -> Dict[str, int]:
        """Crashes, hangs, foreign exceptions and disagreements, over all kinds."""
        return {w: sum(self.counts[k][w] for k in KINDS) for w in ("crash", "hang", "exception", "disagreement")}

    def summary(self) -> str:
        total = sum(sum(c.values()) for c in self.counts.values())
        lines = [f"lpucore fuzz: seed {self.seed}, cases {self.start}..{self.start + self.cases - 1}: "
                 f"{total} cases in {self.seconds:.1f} s "
                 f"({total / max(self.seconds, 1e-9):.0f} cases/s), {MAX_CYCLES} cycles at most per run"]
        for k in KINDS:
            c = self.counts[k]
            n = sum(c.values())
            if not n:
                continue
            ok = c["ran"] + c["restored"]
            what = "restored and ran on their engine" if k == "snapshot" else "loaded and ran on both engines"
            lines.append(f"  {k:9s}{n:9d} cases: {ok:8d} ({100 * ok / n:5.2f}%) {what}, "
                         f"{c['rejected']:8d} ({100 * c['rejected'] / n:5.2f}%) rejected with an LpuError")
        b = self.bad
        lines.append(f"  crashes {b['crash']}, hangs {b['hang']} (over {self.timeout:g} s), foreign exceptions "
                     f"{b['exception']}, engine disagreements {b['disagreement']}")
        for what, i, kind, _detail, path in self.failures:
            lines.append(f"  {what}: case {i} ({kind}), input {path}")
        return "\n".join(lines)


def replay(paths: Sequence[str]) -> int:
    """Run saved inputs in this process, in order; 1 if any fails."""
    status = 0
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        kind = kind_of(p)
        what, diffs = CHECKS[kind](data)
        print(f"{p}: {kind} {what}" + ("".join("\n  " + d for d in diffs) if diffs else ""))
        status |= bool(diffs)
    return status


def _weights(text: str) -> Dict[str, int]:
    out = dict.fromkeys(KINDS, 0)
    for part in text.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in KINDS or not v.strip().isdigit():
            raise argparse.ArgumentTypeError(f"weights are kind=N,... with kinds {', '.join(KINDS)}: {part!r}")
        out[k.strip()] = int(v)
    if not sum(out.values()):
        raise argparse.ArgumentTypeError("some weight must be positive")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lpucore.testing.fuzz",
                                 description="Long fuzz campaign over mutated program files, assembler text and "
                                             "snapshot files (or replay saved failing inputs).")
    ap.add_argument("--cases", type=int, default=10000, help="number of cases (default 10000)")
    ap.add_argument("--seed", type=int, default=0, help="campaign seed: case i of seed s is always the same")
    ap.add_argument("--start", type=int, default=0, help="first case number (to resume or split a campaign)")
    ap.add_argument("--weights", type=_weights, default=WEIGHTS,
                    help="relative frequency of the kinds (default program=4,asm=3,snapshot=1)")
    ap.add_argument("--batch", type=int, default=500, help="cases per batch sent to the worker")
    ap.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds after which a case is a hang")
    ap.add_argument("--out", default=None, help=f"where failing inputs go (default $LPUCORE_FUZZ_DIR or {OUT_DIR})")
    ap.add_argument("--progress", type=float, default=60.0, help="seconds between progress lines (0: none)")
    ap.add_argument("--replay", nargs="+", metavar="FILE", help="replay saved inputs in this process instead")
    args = ap.parse_args(argv)
    if args.replay:
        return replay(args.replay)
    c = Campaign(args.cases, args.seed, args.batch, args.weights, args.out, args.timeout,
                 progress=args.progress, start=args.start)
    c.run()
    print(c.summary(), flush=True)
    return 1 if any(c.bad.values()) else 0


if __name__ == "__main__":      # pragma: no cover
    sys.exit(main())
