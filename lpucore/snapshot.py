"""Chip snapshots: the whole simulated state, bit for bit, in memory or in a file.

::

    snap = chip.snapshot()          # at any cycle between runs / steps
    ...
    chip.restore(snap)              # back to exactly that state
    snap.save("s.lpusnap")          # NumPy .npz: arrays + a JSON header
    snap = Snapshot.load("s.lpusnap", config=cfg)

A snapshot holds SRAM, stream registers, VXM latches, MXM buffers, weights,
accumulators and in-flight products, ICU queue positions (Repeat and Sync state
included), every pending effect, counters and statistics, the cycle, and the
program itself.  It belongs to one engine: the engines keep the same machine in
different data structures, so a snapshot taken on the fast engine restores only
into a fast-engine chip (and likewise for the reference engine).

Snapshot files are untrusted input: :meth:`Chip.restore` checks every index, counter,
pointer and flag (queue positions and Repeat/Sync state against the program, ring heads
and counts against their rings, slot numbers, dtype codes, batch counts, cycles) before
any of it reaches an engine, and raises :class:`~lpucore.SnapshotError` naming the field,
its index and the allowed range.
"""

from __future__ import annotations

import json
import os
import tokenize
import zipfile
import zlib
from typing import Any, Dict, Optional, Tuple, Type, Union

import numpy as np
import numpy.typing as npt

from .config import ChipConfig
from .errors import LpuError, ProgramError, SnapshotError
from .program import Program

# What reading a damaged .npz raises besides OSError: zipfile's errors; NotImplementedError for a zip
# version, compression method or flag zipfile cannot read; RuntimeError for an "encrypted" member; zlib
# and lzma errors for a "compressed" member's bytes; ValueError and the rest (tokenize's TokenError for
# a garbled header) from NumPy's .npy reader.
_FILE_ERRORS: Tuple[Type[BaseException], ...] = (
    zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, KeyError, TypeError, EOFError, NotImplementedError,
    RuntimeError, OverflowError, zlib.error, SyntaxError, tokenize.TokenError)
try:
    import lzma
    _FILE_ERRORS += (lzma.LZMAError,)
except ImportError:          # pragma: no cover - Python built without lzma (zipfile then refuses LZMA members)
    pass

FORMAT = "lpucore-snapshot"
VERSION = 4          # 4: fast-engine queues keep their next-issue cycles apart (qn), MXM batches are staged
                     # in a ring of buffers (mx_xbuf); 3: the fast engine stages int8 activations as offset
                     # bytes (mx_xb); 2: MXM weights in slots
_META = "__meta__"
_PROGRAM = "__program__"
_PREFIX = "a__"


class Snapshot:
    """The state of one :class:`~lpucore.Chip` at one cycle (see :meth:`Chip.snapshot`)."""

    def __init__(self, engine: str, config: ChipConfig, fp16_mxm: str, program: Optional[bytes],
                 scalars: Dict[str, int], arrays: Dict[str, npt.NDArray[Any]]) -> None:
        self.engine: str = engine
        self.config: ChipConfig = config
        self.fp16_mxm: str = fp16_mxm
        self.program_bytes: Optional[bytes] = program
        self.scalars: Dict[str, int] = dict(scalars)
        self.arrays: Dict[str, npt.NDArray[Any]] = arrays

    @property
    def cycle(self) -> int:
        """The chip's cycle counter when the snapshot was taken."""
        return int(self.scalars["cycle"])

    @property
    def program(self) -> Optional[Program]:
        """The program that was loaded (None if none was)."""
        return None if self.program_bytes is None else Program.from_bytes(self.program_bytes)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def __repr__(self) -> str:
        return (f"<Snapshot {self.engine} engine, config {self.config.name!r}, cycle {self.cycle}, "
                f"{self.nbytes / 2 ** 20:.1f} MiB>")

    # ---- files ------------------------------------------------------------------------------
    def _meta(self) -> Dict[str, Any]:
        from . import __version__
        return {"format": FORMAT, "version": VERSION, "lpucore": __version__, "engine": self.engine,
                "config": self.config.to_dict(), "fp16_mxm": self.fp16_mxm,
                "has_program": self.program_bytes is not None, "scalars": self.scalars,
                "arrays": sorted(self.arrays)}

    def save(self, path: Union[str, os.PathLike[str]]) -> None:
        """Write the snapshot to ``path`` (an uncompressed NumPy .npz file; the name is used as given)."""
        meta = np.frombuffer(json.dumps(self._meta(), sort_keys=True).encode(), dtype=np.uint8)
        prog = np.frombuffer(self.program_bytes or b"", dtype=np.uint8)
        payload = {_PREFIX + k: v for k, v in self.arrays.items()}
        try:
            with open(path, "wb") as f:
                np.savez(f, **{_META: meta, _PROGRAM: prog}, **payload)  # type: ignore[arg-type]  # no allow_pickle key
        except OSError as e:
            raise SnapshotError(f"cannot write snapshot file {path}: {e.strerror}") from None

    @classmethod
    def load(cls, path: Union[str, os.PathLike[str]], config: Optional[ChipConfig] = None) -> "Snapshot":
        """Read a snapshot file.  Raises :class:`~lpucore.SnapshotError` if the file is not
        a snapshot, is corrupted or truncated, has an unsupported format version, or (when
        ``config`` is given) was taken on a chip of another configuration."""
        try:
            with open(path, "rb") as f:
                data = np.load(f, allow_pickle=False)
                if not isinstance(data, np.lib.npyio.NpzFile):
                    raise SnapshotError(f"{path} is not an lpucore snapshot (not an .npz archive)")
                with data:
                    names = set(data.files)
                    if _META not in names:
                        raise SnapshotError(f"{path} is not an lpucore snapshot (no header)")
                    meta = json.loads(data[_META].tobytes().decode("utf-8"))
                    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                        raise SnapshotError(f"{path} is not an lpucore snapshot")
                    if meta.get("version") != VERSION:
                        raise SnapshotError(f"snapshot format version {meta.get('version')} is not supported "
                                            f"(this lpucore reads version {VERSION})")
                    want = {_PREFIX + k for k in meta["arrays"]}
                    missing = want - names
                    if missing:
                        raise SnapshotError(f"snapshot file {path} is truncated: arrays "
                                            f"{', '.join(sorted(m[len(_PREFIX):] for m in missing))} are missing")
                    arrays = {k: data[_PREFIX + k] for k in meta["arrays"]}
                    if not isinstance(meta.get("has_program"), bool):
                        raise SnapshotError(f"snapshot file {path} has a bad header: has_program is "
                                            f"{meta.get('has_program')!r}, must be true or false")
                    prog = data[_PROGRAM].tobytes() if meta["has_program"] else None
                    if prog is None and data[_PROGRAM].size:
                        raise SnapshotError(f"snapshot file {path} has a bad header: has_program is false "
                                            f"but the file holds a program")
        except SnapshotError:
            raise
        except OSError as e:
            if isinstance(e, FileNotFoundError) or getattr(e, "strerror", None):
                raise SnapshotError(f"cannot read snapshot file {path}: {e.strerror}") from None
            raise SnapshotError(f"snapshot file {path} is corrupted or truncated: {e}") from None
        except _FILE_ERRORS as e:
            raise SnapshotError(f"snapshot file {path} is corrupted or truncated: {type(e).__name__}: {e}") from None
        except MemoryError:
            raise SnapshotError(f"snapshot file {path} is corrupted: an array's header asks for more memory "
                                f"than this host has") from None
        try:
            cfg = ChipConfig.from_dict(meta["config"])
            engine = str(meta["engine"])
            scalars = {str(k): int(v) for k, v in meta["scalars"].items()}
            fp16 = str(meta["fp16_mxm"])
        except LpuError as e:
            raise SnapshotError(f"snapshot file {path} has a bad configuration: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise SnapshotError(f"snapshot file {path} has a bad header: {type(e).__name__}: {e}") from None
        if engine not in ("fast", "reference"):
            raise SnapshotError(f"snapshot file {path} names an unknown engine {engine!r}")
        if prog is not None:
            try:
                p = Program.from_bytes(prog)
            except ProgramError as e:
                raise SnapshotError(f"snapshot file {path} holds a bad program: {e}") from None
            if p.config != cfg:
                raise SnapshotError(f"snapshot file {path}: its program is for another configuration")
        snap = cls(engine, cfg, fp16, prog, scalars, arrays)
        if config is not None:
            check_config(snap, config)
        return snap


# Cycle-like values a snapshot may hold: far beyond any run, far below int64 overflow when the
# engines add delays to them.
CYCLE_LIMIT = 2 ** 62


def check_range(name: str, values: "npt.ArrayLike", lo: int, hi: int, where: Optional["npt.ArrayLike"] = None,
                also: Tuple[int, ...] = ()) -> None:
    """Raise SnapshotError unless every value of ``values`` (where ``where`` is true) is in
    lo..hi or one of ``also``.  The message names the array, the first bad index and value
    and the allowed range."""
    if np.ndim(values) == 0 and where is None:       # a scalar: a Python int of any size
        if "%s" in name:
            name = name % ""
        try:
            x = int(values)  # type: ignore[arg-type]  # a 0-d array or a number
        except (TypeError, ValueError, OverflowError):
            raise SnapshotError(f"snapshot {name} is {values!r}, not an integer") from None
        if not (lo <= x <= hi or x in also):
            _out_of_range(name, x, lo, hi, also)
        return
    v = np.asarray(values).astype(np.int64)
    ok = (v >= lo) & (v <= hi)
    for x in also:
        ok |= v == x
    if where is not None:
        ok |= ~np.asarray(where, dtype=bool)
    if not np.all(ok):
        bad = np.argwhere(~ok)[0] if v.ndim else np.zeros(0, dtype=np.int64)
        idx = ", ".join(str(int(i)) for i in bad)
        if "%s" in name:
            name = name % idx
        elif v.ndim:
            head, sep, tail = name.partition(" (")
            name = f"{head}[{idx}]{sep}{tail}"
        _out_of_range(name, int(v[tuple(bad)]) if v.ndim else int(v), lo, hi, also)


def _out_of_range(name: str, val: int, lo: int, hi: int, also: Tuple[int, ...]) -> None:
    allowed = [str(x) for x in also]
    if not (lo == hi and lo in also):
        allowed.insert(0, f"{lo}..{hi}" if lo != hi else str(lo))
    raise SnapshotError(f"snapshot {name} is {val}, allowed {' or '.join(allowed)}")


def check_equal(name: str, value: int, want: int, why: str) -> None:
    """Raise SnapshotError unless ``value == want`` (``why`` says what it must agree with)."""
    if int(value) != int(want):
        raise SnapshotError(f"snapshot {name} is {int(value)}, must be {int(want)} ({why})")


def check_config(snap: Snapshot, config: ChipConfig) -> None:
    if snap.config != config:
        diff = [k for k, v in config.to_dict().items() if snap.config.to_dict().get(k) != v]
        raise SnapshotError(f"snapshot was taken on chip configuration {snap.config.name!r}, this chip is "
                            f"{config.name!r} (differs in {', '.join(diff) or 'its parameters'})")
