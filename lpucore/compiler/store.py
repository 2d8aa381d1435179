"""Compiled programs on disk: :meth:`Compiled.save` / :func:`load_compiled`, and the compile cache.

File format (little-endian), version 1::

    offset  size  what
    0       4     magic b"LPUC"
    4       2     format version (1)
    6       2     0
    8       4     length M of the metadata JSON
    12      M     metadata: graph name, inputs, outputs, states ({name: [shape, dtype]}), expected
                  cycles, memory bytes, kernels, bounds, tiles, row parts, the constants' names,
                  dtypes and shapes, the hash of the lpucore sources that compiled it
    12+M    8     length P of the program file
    20+M    P     the program, in lpucore's program file format (lpucore.program)
    ...           each constant's bytes (C order), in the order the metadata lists them
    end-4   4     CRC-32 of every byte before it

A file is untrusted: :func:`fields` (:func:`lpucore.load_compiled`) checks the checksum, every metadata field, the
program (validated in full like any program file: no "validated" mark is stored) and that every
name the metadata uses is a tensor of the program of the right size; anything off raises
:class:`~lpucore.errors.CompiledFileError`.

The compile cache (:func:`lpucore.compiler.api.cached_compile`, used by :func:`lpucore.compile` for one chip, hence by
``lpucore.ops``, :class:`~lpucore.llm.Decoder` and the command line) keeps one such file per graph
signature (its operations, shapes, dtypes and a hash of its constants' values), chip
configuration and lpucore sources (every ``.py`` of the package and the engine's source hash, so
an edited checkout never reuses an old program). Directory: ``$LPUCORE_CACHE_DIR``, else
``$XDG_CACHE_HOME/lpucore``, else ``~/.cache/lpucore``; ``LPUCORE_CACHE=0`` turns it off. An
entry that fails to load (stale, truncated, corrupted, hostile) is removed and compiled again;
entries are written to a temporary file and renamed, so concurrent processes never read a half
written one. A cached program has no compiler record: ``Compiled.dump`` needs a fresh compile.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Tuple, Union

import numpy as np

from .. import dtypes as dt
from ..errors import CompiledFileError, LpuError
from ..program import Program
from .bounds import Bounds

IoMap = Dict[str, Tuple[Tuple[int, ...], dt.DType]]


class Compiled(Protocol):
    """What this module reads of a :class:`~lpucore.compiler.Compiled` to save it (a protocol, so
    that this module, which ``Compiled.save`` imports, does not import the compiler back)."""

    @property
    def program(self) -> Program: ...
    @property
    def graph_name(self) -> str: ...
    @property
    def inputs(self) -> IoMap: ...
    @property
    def outputs(self) -> IoMap: ...
    @property
    def states(self) -> IoMap: ...
    @property
    def constants(self) -> Dict[str, np.ndarray]: ...
    @property
    def expected_cycles(self) -> int: ...
    @property
    def memory_bytes(self) -> int: ...
    @property
    def kernels(self) -> List[Tuple[str, str, Optional[int]]]: ...
    @property
    def graph_bounds(self) -> Optional[Bounds]: ...
    @property
    def tiles(self) -> Dict[str, List[Tuple[str, np.ndarray]]]: ...
    @property
    def row_parts(self) -> Dict[str, List[Tuple[str, int, int, int, int]]]: ...
    @property
    def input_axes(self) -> Dict[str, Tuple[int, ...]]: ...

MAGIC = b"LPUC"
VERSION = 1
_HDR = struct.Struct("<4sHHI")
_BOUNDS = ("weight_stream", "sram", "mxm", "vxm", "critical_path", "cycles")
PathLike = Union[str, "os.PathLike[str]"]


# ---- sources hash ---------------------------------------------------------------------------------
_SOURCES: Optional[str] = None


def sources_hash() -> str:
    """SHA-256 (hex) of lpucore's Python sources and its engine's source hash: part of every cache
    key, so that changed sources never reuse a program compiled by the old ones (computed once per
    process, a few milliseconds)."""
    global _SOURCES
    if _SOURCES is None:
        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for p in sorted(root.rglob("*.py")):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
        try:
            h.update(str(importlib.import_module("lpucore._engine").SOURCE_HASH).encode())
        except (ImportError, AttributeError):                          # pragma: no cover - reference only
            h.update(b"no engine")
        _SOURCES = h.hexdigest()
    return _SOURCES


# ---- writing --------------------------------------------------------------------------------------------
def _io_map(m: Dict[str, Tuple[Tuple[int, ...], dt.DType]]) -> Dict[str, Any]:
    return {name: [list(shape), d.name] for name, (shape, d) in m.items()}


def to_bytes(c: Compiled) -> bytes:
    """A compiled program as one file's bytes (see the module docstring)."""
    consts = [(name, np.ascontiguousarray(a)) for name, a in c.constants.items()]
    gb = c.graph_bounds
    meta = {"graph_name": c.graph_name, "inputs": _io_map(c.inputs), "outputs": _io_map(c.outputs),
            "states": _io_map(c.states), "expected_cycles": int(c.expected_cycles),
            "memory_bytes": int(c.memory_bytes),
            "kernels": [[op, out, None if cyc is None else int(cyc)] for op, out, cyc in c.kernels],
            "graph_bounds": None if gb is None else {k: getattr(gb, k) for k in _BOUNDS},
            "tiles": {n: [[m, [int(x) for x in cols]] for m, cols in members] for n, members in c.tiles.items()},
            "row_parts": {n: [[m, *map(int, rc)] for m, *rc in parts] for n, parts in c.row_parts.items()},
            "constants": [[name, dt.get(a.dtype).name, list(a.shape)] for name, a in consts],
            "input_axes": {n: list(axes) for n, axes in c.input_axes.items()},
            "lpucore_sources": sources_hash()}
    mj = json.dumps(meta, sort_keys=True).encode()
    prog = c.program.to_bytes()
    parts = [_HDR.pack(MAGIC, VERSION, 0, len(mj)), mj, struct.pack("<Q", len(prog)), prog]
    parts += [a.tobytes() for _, a in consts]
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    return b"".join(parts) + struct.pack("<I", crc & 0xFFFFFFFF)


def save(c: Compiled, path: PathLike) -> None:
    """Write a compiled program to ``path`` (atomically: a temporary file renamed into place)."""
    data = to_bytes(c)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ---- reading ----------------------------------------------------------------------------------------------
def _bad(msg: str) -> CompiledFileError:
    return CompiledFileError(f"compiled program file: {msg}")


def _int(v: Any, what: str, lo: int = 0) -> int:
    if type(v) is not int or v < lo:
        raise _bad(f"{what} must be an integer >= {lo}, got {v!r:.60}")
    return v


def _shape(v: Any, what: str) -> Tuple[int, ...]:
    if not isinstance(v, list) or len(v) > 8:
        raise _bad(f"{what}: a shape is a list of at most 8 sizes")
    return tuple(_int(x, what, 1) for x in v)


def _io(meta: Dict[str, Any], key: str, prog: Program) -> Dict[str, Tuple[Tuple[int, ...], dt.DType]]:
    """inputs / outputs / states: each a tensor of the program of that dtype and size."""
    m = meta.get(key)
    if not isinstance(m, dict):
        raise _bad(f"{key} must be an object")
    out: Dict[str, Tuple[Tuple[int, ...], dt.DType]] = {}
    for name, v in m.items():
        if not isinstance(v, list) or len(v) != 2 or not isinstance(v[1], str):
            raise _bad(f"{key}[{name!r:.40}] must be [shape, dtype]")
        shape, d = _shape(v[0], f"{key}[{name!r:.40}]"), _dtype(v[1])
        t = prog.tensors.get(name)
        if t is None or t.dtype != d or int(np.prod(t.shape)) != int(np.prod(shape)):
            raise _bad(f"{key}[{name!r:.40}] is not a {d.name} tensor of {int(np.prod(shape))} elements "
                       "in the program's tensor table")
        out[name] = (shape, d)
    return out


def _dtype(name: Any) -> dt.DType:
    try:
        return dt.get(name)
    except Exception:
        raise _bad(f"unknown dtype {name!r:.40}") from None


def _member(prog: Program, name: Any, d: dt.DType, shape: Tuple[int, int], what: str) -> str:
    """A member tensor of a tiled or row-split constant: a program tensor of that dtype and size."""
    t = prog.tensors.get(name) if isinstance(name, str) else None
    if t is None or t.dtype != d or int(np.prod(t.shape)) != shape[0] * shape[1]:
        raise _bad(f"{what}: member {name!r:.40} is not a {d.name} tensor of {shape[0]} x {shape[1]} elements")
    return name


def _constants(meta: Dict[str, Any], prog: Program, blob: memoryview) -> Dict[str, np.ndarray]:
    """The constants' arrays (copies), each checked against the tensors it is written to."""
    lst = meta.get("constants")
    if not isinstance(lst, list):
        raise _bad("constants must be a list")
    out: Dict[str, np.ndarray] = {}
    off = 0
    for e in lst:
        if not isinstance(e, list) or len(e) != 3 or not isinstance(e[0], str) or e[0] in out:
            raise _bad("a constant is [unique name, dtype, shape]")
        name, d, shape = e[0], _dtype(e[1]), _shape(e[2], f"constant {e[0]!r:.40}")
        if len(shape) != 2:
            raise _bad(f"constant {name!r:.40} must be 2-d")
        n = shape[0] * shape[1] * d.nbytes
        if off + n > len(blob):
            raise _bad("the constants run past the end of the file")
        out[name] = np.frombuffer(blob[off:off + n], dtype=d.numpy).reshape(shape).copy()
        off += n
        if name not in meta["tiles"] and name not in meta["row_parts"]:
            _member(prog, name, d, (shape[0], shape[1]), f"constant {name!r:.40}")
    if off != len(blob):
        raise _bad("the file's length does not match its constants")
    return out


def _tiles(meta: Dict[str, Any], prog: Program, consts: Dict[str, np.ndarray]) -> Dict[str, Any]:
    tiles: Dict[str, List[Tuple[str, np.ndarray]]] = {}
    for name, members in meta["tiles"].items():
        if name not in consts or not isinstance(members, list):
            raise _bad(f"tiles[{name!r:.40}] names no constant")
        rows, ncols = consts[name].shape
        lst = []
        for m in members:
            if not isinstance(m, list) or len(m) != 2 or not isinstance(m[1], list) or not m[1]:
                raise _bad(f"tiles[{name!r:.40}]: a member is [name, [columns]]")
            cols = [_int(x, f"tiles[{name!r:.40}] column") for x in m[1]]
            if max(cols) >= ncols:
                raise _bad(f"tiles[{name!r:.40}]: column {max(cols)} is outside the constant's {ncols}")
            lst.append((_member(prog, m[0], dt.get(consts[name].dtype), (rows, len(cols)), f"tiles[{name!r:.40}]"),
                        np.asarray(cols, dtype=np.int64)))
        tiles[name] = lst
    parts: Dict[str, List[Tuple[str, int, int, int, int]]] = {}
    for name, members in meta["row_parts"].items():
        if name not in consts or not isinstance(members, list):
            raise _bad(f"row_parts[{name!r:.40}] names no constant")
        rows, ncols = consts[name].shape
        plst = []
        for m in members:
            if not isinstance(m, list) or len(m) != 5:
                raise _bad(f"row_parts[{name!r:.40}]: a member is [name, r0, r1, c0, c1]")
            r0, r1, c0, c1 = (_int(x, f"row_parts[{name!r:.40}] bound") for x in m[1:])
            if not (r0 < r1 <= rows and c0 < c1 <= ncols):
                raise _bad(f"row_parts[{name!r:.40}]: rows {r0}..{r1} / columns {c0}..{c1} do not fit {rows} x {ncols}")
            d = dt.get(consts[name].dtype)
            plst.append((_member(prog, m[0], d, (r1 - r0, c1 - c0), f"row_parts[{name!r:.40}]"), r0, r1, c0, c1))
        parts[name] = plst
    return {"tiles": tiles, "row_parts": parts}


def _misc(meta: Dict[str, Any]) -> Dict[str, Any]:
    """Graph name, cycles, memory, kernels and bounds."""
    if not isinstance(meta.get("graph_name"), str):
        raise _bad("graph_name must be a string")
    kernels = meta.get("kernels")
    if not isinstance(kernels, list) or not all(
            isinstance(k, list) and len(k) == 3 and isinstance(k[0], str) and isinstance(k[1], str)
            and (k[2] is None or type(k[2]) is int) for k in kernels):
        raise _bad("kernels must be [op, output, cycle or null] triples")
    gb = meta.get("graph_bounds")
    bounds = None
    if gb is not None:
        if not isinstance(gb, dict) or set(gb) != set(_BOUNDS) or not all(
                type(gb[k]) in (int, float) for k in _BOUNDS) or not all(type(gb[k]) is int for k in _BOUNDS[4:]):
            raise _bad("graph_bounds must hold the six bounds as numbers")
        bounds = Bounds(**{k: gb[k] for k in _BOUNDS})
    if not isinstance(meta.get("tiles"), dict) or not isinstance(meta.get("row_parts"), dict):
        raise _bad("tiles and row_parts must be objects")
    return {"graph_name": meta["graph_name"], "expected_cycles": _int(meta.get("expected_cycles"), "expected_cycles"),
            "memory_bytes": _int(meta.get("memory_bytes"), "memory_bytes"),
            "kernels": [(k[0], k[1], k[2]) for k in kernels], "graph_bounds": bounds}


def _split(data: bytes) -> Tuple[Dict[str, Any], bytes, memoryview]:
    """(metadata, program bytes, constants' bytes) of a file, its framing and checksum checked."""
    if len(data) < _HDR.size + 12:
        raise _bad(f"too short ({len(data)} bytes)")
    magic, version, _, mlen = _HDR.unpack_from(data, 0)
    if magic != MAGIC:
        raise _bad(f"not a compiled lpucore program (magic {magic!r})")
    if version != VERSION:
        raise _bad(f"format version {version} is not supported (this lpucore reads {VERSION})")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(memoryview(data)[:-4]) & 0xFFFFFFFF != crc:
        raise _bad("corrupted or truncated (checksum mismatch)")
    end = _HDR.size + mlen
    if end + 8 > len(data) - 4:
        raise _bad("the metadata runs past the end")
    try:
        meta = json.loads(bytes(data[_HDR.size:end]).decode("utf-8"))
    except Exception as e:                                   # ValueError, RecursionError, ...
        raise _bad(f"bad metadata: {type(e).__name__}") from None
    if not isinstance(meta, dict):
        raise _bad("the metadata is not an object")
    (plen,) = struct.unpack_from("<Q", data, end)
    if end + 8 + plen > len(data) - 4:
        raise _bad("the program runs past the end")
    return meta, data[end + 8:end + 8 + plen], memoryview(data)[end + 8 + plen:len(data) - 4]


def fields(data: bytes, sources: Optional[str] = None) -> Dict[str, Any]:
    """The fields of a :class:`~lpucore.compiler.Compiled` read from a file's bytes, every part
    checked (CompiledFileError). With ``sources``, a file compiled by other lpucore sources is
    refused too (the cache's check). (:func:`lpucore.compiler.api.compiled_from_bytes` makes the
    Compiled: this module does not import the compiler, whose Compiled.save imports it.)"""
    if not isinstance(data, (bytes, bytearray)):
        raise _bad("data must be bytes")
    meta, prog_bytes, blob = _split(bytes(data))
    if sources is not None and meta.get("lpucore_sources") != sources:
        raise _bad("compiled by other lpucore sources (stale)")
    try:
        prog = Program.from_bytes(prog_bytes)
    except LpuError as e:
        raise _bad(f"its program: {e}") from None
    misc = _misc(meta)
    consts = _constants(meta, prog, blob)
    inputs = _io(meta, "inputs", prog)
    return dict(program=prog, inputs=inputs, outputs=_io(meta, "outputs", prog),
                states=_io(meta, "states", prog), constants=consts, **misc, **_tiles(meta, prog, consts),
                input_axes=_input_axes(meta, inputs, prog))


def _input_axes(meta: Dict[str, Any], inputs, prog: Program) -> Dict[str, Tuple[int, ...]]:
    """Inputs written permuted: each a permutation of an input's axes, the program tensor's columns a
    whole number of runs of its last axis (one pixel's channels, or several: pixels packed a row) and
    its elements the input's."""
    m = meta.get("input_axes", {})
    if not isinstance(m, dict):
        raise _bad("input_axes must be an object")
    out: Dict[str, Tuple[int, ...]] = {}
    for name, axes in m.items():
        if name not in inputs or not isinstance(axes, list) or not all(type(a) is int for a in axes):
            raise _bad(f"input_axes[{name!r:.40}] must be a list of axes of an input")
        shape = inputs[name][0]
        rows, cols = prog.tensors[name].shape
        # the program's columns: the last permuted axis, or several of its runs (pixels packed a row)
        if (sorted(axes) != list(range(len(shape))) or shape[axes[-1]] == 0 or cols % shape[axes[-1]]
                or rows * cols != int(np.prod(shape))):
            raise _bad(f"input_axes[{name!r:.40}] is not a permutation of the input's axes ending in its columns")
        out[name] = tuple(axes)
    return out


def read_fields(path: PathLike) -> Dict[str, Any]:
    """:func:`fields` of a file (CompiledFileError if it cannot be read)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CompiledFileError(f"cannot read compiled program file {path}: {e.strerror}") from None
    return fields(data)


# ---- the cache -------------------------------------------------------------------------------------------
def cache_dir() -> Optional[Path]:
    """The compile cache's directory, or None when ``LPUCORE_CACHE=0`` turns it off."""
    if os.environ.get("LPUCORE_CACHE", "1").strip() in ("0", "off", "no", "false"):
        return None
    d = os.environ.get("LPUCORE_CACHE_DIR")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lpucore"


def cache_key(graph: Any, config: Any) -> str:
    """The cache entry's name: a hash of the format, the lpucore sources, the chip configuration
    and the graph's signature (:meth:`Graph.signature <lpucore.graph.Graph.signature>`: names, ids,
    operations with their outputs' shapes and dtypes, attributes, constants' and states' values' hashes)."""
    h = hashlib.sha256()
    h.update(repr((VERSION, sources_hash(), json.dumps(config.to_dict(), sort_keys=True))).encode())
    h.update(repr(graph.signature()).encode())
    return h.hexdigest()[:40]


def cache_path(graph: Any, config: Any) -> Optional[Path]:
    """Where the cache keeps (graph, config)'s entry, or None when the cache is off."""
    d = cache_dir()
    return None if d is None else d / f"{cache_key(graph, config)}.lpuc"


def read_entry(path: Path) -> Optional[Dict[str, Any]]:
    """The fields of a cache entry, or None if there is none or it does not load (stale, truncated,
    corrupted, hostile: then it is removed, to be compiled again)."""
    if not path.exists():
        return None
    try:
        return fields(path.read_bytes(), sources=sources_hash())
    except (LpuError, OSError):
        try:
            path.unlink()
        except OSError:
            pass
        return None


def write_entry(c: Compiled, path: Path) -> None:
    """Keep a compiled program in the cache (a failed write only loses the entry)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save(c, path)
    except OSError:
        pass


__all__ = ["save", "to_bytes", "fields", "read_fields", "cache_dir", "cache_key", "cache_path", "read_entry",
           "write_entry", "sources_hash"]
