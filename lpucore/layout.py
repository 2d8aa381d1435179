"""Where a tensor's bytes live in MEM.

A tensor is viewed as a matrix of ``rows = prod(shape[:-1])`` rows and
``cols = shape[-1]`` columns.  Each row is cut into ``chunks = ceil(cols /
lanes)`` vectors of ``lanes`` elements (the last one zero-padded), and vectors
are numbered row-major: vector ``v = row * chunks + chunk``.  A multi-byte
element is split into byte planes, least significant first (TSP.md section 1,
stream groups), and each plane is stored separately, so that an fp16 tensor's
two planes can sit in two slices and be read onto two streams in one cycle.

Each byte plane is either a list of *extents* ``(slice, address, count)``, whose
vectors fill the extents one after another, or *stripes* (:class:`Stripes`):
vector ``(row r, chunk c)`` lives in stripe ``(r + c) % n`` at the stripe's base
address plus ``(r // n) * chunks + c``, so that consecutive rows and the chunks of
one row are all in different slices and can be read in the same cycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import numpy as np

from . import dtypes as dt
from .config import ChipConfig
from .errors import ProgramError, TensorError


@dataclass(frozen=True)
class Extent:
    """``count`` consecutive addresses of one MEM slice, from ``address``."""

    slice: int        # global slice number (W0..W43 = 0..43, E0..E43 = 44..87)
    address: int
    count: int


@dataclass(frozen=True)
class Stripes:
    """A byte plane striped over slices: ``((slice, base address), ...)``."""

    parts: Tuple[Tuple[int, int], ...]

    def loc(self, v: int, chunks: int) -> Tuple[int, int]:
        r, c = divmod(v, chunks)
        n = len(self.parts)
        g, base = self.parts[(r + c) % n]
        return g, base + (r // n) * chunks + c

    def span(self, rows: int, chunks: int) -> int:
        """Addresses used in each stripe's slice."""
        return -(-rows // len(self.parts)) * chunks


# one byte plane of a tensor: runs of vectors (extents) or stripes over slices
Plane = Union[Stripes, Tuple[Extent, ...]]


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a program's tensor table."""

    name: str
    dtype: dt.DType
    shape: Tuple[int, ...]
    planes: Tuple[Plane, ...]

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1] if self.shape else 1

    def chunks(self, lanes: int) -> int:
        return -(-self.cols // lanes)

    def nvectors(self, lanes: int) -> int:
        """Vectors in each byte plane."""
        return self.rows * self.chunks(lanes)

    def locations(self, plane: int, lanes: int = 0) -> List[Tuple[int, int]]:
        """(slice, address) of each vector of one byte plane, in order (``lanes`` is
        needed for striped planes)."""
        p = self.planes[plane]
        if isinstance(p, Stripes):
            ch = self.chunks(lanes)
            return [p.loc(v, ch) for v in range(self.rows * ch)]
        out: List[Tuple[int, int]] = []
        for e in p:
            out.extend((e.slice, e.address + i) for i in range(e.count))
        return out

    # ---- array <-> byte-plane vectors ------------------------------------------------
    def to_planes(self, array: np.ndarray, lanes: int) -> np.ndarray:
        """A NumPy array of this tensor's dtype and shape -> uint8 [nbytes, nvectors, lanes]."""
        a = np.ascontiguousarray(array, dtype=self.dtype.numpy).reshape(self.rows, self.cols)
        ch = self.chunks(lanes)
        padded = np.zeros((self.rows, ch * lanes), dtype=self.dtype.numpy)
        padded[:, : self.cols] = a
        raw = padded.view(np.uint8).reshape(self.rows, ch * lanes, self.dtype.nbytes)
        # little-endian element bytes -> byte planes
        if raw.dtype.byteorder == ">":  # pragma: no cover - big-endian hosts
            raw = raw[..., ::-1]
        return np.ascontiguousarray(raw.transpose(2, 0, 1)).reshape(self.dtype.nbytes, self.rows * ch, lanes)

    def from_planes(self, planes: np.ndarray, lanes: int) -> np.ndarray:
        """uint8 [nbytes, nvectors, lanes] -> a NumPy array of this tensor's dtype and shape."""
        ch = self.chunks(lanes)
        raw = np.ascontiguousarray(planes.reshape(self.dtype.nbytes, self.rows, ch * lanes).transpose(1, 2, 0))
        vals = raw.view(self.dtype.numpy.newbyteorder("<")).reshape(self.rows, ch * lanes)
        return np.ascontiguousarray(vals[:, : self.cols]).astype(self.dtype.numpy).reshape(self.shape)

    # ---- serialisation -----------------------------------------------------------------
    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype.name, "shape": list(self.shape),
                "planes": [{"stripes": [[g, b] for g, b in p.parts]} if isinstance(p, Stripes)
                           else [[e.slice, e.address, e.count] for e in p] for p in self.planes]}

    @classmethod
    def from_json(cls, d) -> "TensorInfo":
        try:
            planes: List[Plane] = []
            for p in d["planes"]:
                if isinstance(p, dict):
                    planes.append(Stripes(tuple((int(g), int(b)) for g, b in p["stripes"])))
                else:
                    planes.append(tuple(Extent(int(s), int(a), int(c)) for s, a, c in p))
            return cls(str(d["name"]), dt.get(d["dtype"]), tuple(int(x) for x in d["shape"]), tuple(planes))
        except ProgramError:
            raise
        except Exception as e:
            raise ProgramError(f"malformed tensor table entry: {e}") from None


def _checked_shape(name: str, shape: Sequence[int]) -> Tuple[int, ...]:
    """The shape as a tuple of ints, checked to be positive integers."""
    shape = tuple(shape)
    if not all(isinstance(s, (int, np.integer)) and int(s) >= 1 for s in shape):
        raise ProgramError(f"tensor {name!r}: shape {shape} must be positive integers")
    return tuple(int(s) for s in shape)


def _slice_number(name: str, s, cfg: ChipConfig):
    """A slice given by name (e.g. ``"W3"``) as its global number; other values unchanged."""
    if isinstance(s, str):
        try:
            return cfg.parse_slice(s)
        except Exception as ex:
            raise ProgramError(f"tensor {name!r}: {ex}") from None
    return s


def _striped_plane(name: str, pi: int, plane, probe: TensorInfo, cfg: ChipConfig) -> Stripes:
    """Check a striped byte plane (``Stripes`` or ``{"stripes": ...}``): its normalised ``Stripes``."""
    st = plane if isinstance(plane, Stripes) else Stripes(tuple(tuple(x) for x in plane["stripes"]))
    if not st.parts:
        raise ProgramError(f"tensor {name!r}: byte plane {pi} has no stripe")
    parts = []
    n_addr = st.span(probe.rows, probe.chunks(cfg.lanes))
    for g, b in st.parts:
        g = _slice_number(name, g, cfg)
        g, b = int(g), int(b)
        if not 0 <= g < cfg.mem_slices:
            raise ProgramError(f"tensor {name!r}: slice {g} out of range 0..{cfg.mem_slices - 1}")
        if b < 0 or b + n_addr > cfg.addresses_per_slice:
            raise ProgramError(f"tensor {name!r}: stripe {cfg.slice_name(g)}:{b}+{n_addr} does not fit "
                               f"a slice of {cfg.addresses_per_slice} addresses")
        parts.append((g, b))
    return Stripes(tuple(parts))


def _extent_fields(name: str, e):
    """(slice, address, count) of one extent given as ``Extent`` or a 2- or 3-tuple (count None if omitted)."""
    if isinstance(e, Extent):
        return e.slice, e.address, e.count
    e = tuple(e)
    if len(e) == 2:
        return e[0], e[1], None
    if len(e) == 3:
        return e
    raise ProgramError(f"tensor {name!r}: extent {e!r} must be (slice, address[, count])")


def _extent_plane(name: str, pi: int, plane, nvec: int, cfg: ChipConfig) -> Tuple[Extent, ...]:
    """Check a byte plane given as a list of extents: its ``Extent`` tuple, holding exactly ``nvec`` vectors."""
    exts, total = [], 0
    plane = list(plane)
    if not plane:
        raise ProgramError(f"tensor {name!r}: byte plane {pi} has no extent")
    for ei, e in enumerate(plane):
        s, a, c = _extent_fields(name, e)
        s = _slice_number(name, s, cfg)
        if c is None:
            if ei != len(plane) - 1:
                raise ProgramError(f"tensor {name!r}: only the last extent of a plane may omit its count")
            c = nvec - total
        s, a, c = int(s), int(a), int(c)
        if not 0 <= s < cfg.mem_slices:
            raise ProgramError(f"tensor {name!r}: slice {s} out of range 0..{cfg.mem_slices - 1}")
        if c < 1 or a < 0 or a + c > cfg.addresses_per_slice:
            raise ProgramError(f"tensor {name!r}: extent {cfg.slice_name(s)}:{a}+{c} does not fit a slice of "
                               f"{cfg.addresses_per_slice} addresses")
        exts.append(Extent(s, a, c))
        total += c
    if total != nvec:
        raise ProgramError(f"tensor {name!r}: byte plane {pi} holds {total} vectors, the shape needs {nvec}")
    return tuple(exts)


def plane_locations(info: TensorInfo, plane: int, lanes: int) -> Tuple[np.ndarray, np.ndarray]:
    """(slice array, address array), int64, of every vector of one byte plane in order: what
    :meth:`TensorInfo.locations` lists, computed with NumPy (for bulk copies and checks)."""
    p = info.planes[plane]
    if isinstance(p, Stripes):
        ch = info.chunks(lanes)
        r, c = np.divmod(np.arange(info.rows * ch, dtype=np.int64), ch)
        parts = np.asarray(p.parts, dtype=np.int64).reshape(len(p.parts), 2)
        k = (r + c) % len(p.parts)
        return parts[k, 0], parts[k, 1] + (r // len(p.parts)) * ch + c
    counts = np.asarray([e.count for e in p], dtype=np.int64)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    step = np.arange(int(counts.sum()), dtype=np.int64) - first
    return (np.repeat(np.asarray([e.slice for e in p], dtype=np.int64), counts),
            np.repeat(np.asarray([e.address for e in p], dtype=np.int64), counts) + step)


def _runs_disjoint(info: TensorInfo, cfg: ChipConfig) -> bool:
    """True if the address runs holding the tensor's vectors do not overlap: each extent is one run,
    each stripe the run of addresses its span covers (every address a stripe uses lies in it).
    A sort of the runs, not of every vector; False means "look vector by vector" (runs of stripes
    may overlap where their vectors do not)."""
    starts: List[int] = []
    ends: List[int] = []
    A = cfg.addresses_per_slice
    rows, chunks = info.rows, info.chunks(cfg.lanes)
    for p in info.planes:
        if isinstance(p, Stripes):
            n = p.span(rows, chunks)
            starts.extend(g * A + b for g, b in p.parts)
            ends.extend(g * A + b + n for g, b in p.parts)
        else:
            starts.extend(e.slice * A + e.address for e in p)
            ends.extend(e.slice * A + e.address + e.count for e in p)
    if len(starts) < 64:                     # few runs (most tensors): a Python sort is quicker
        runs = sorted(zip(starts, ends))
        return all(a[1] <= b[0] for a, b in zip(runs, runs[1:]))
    order = np.argsort(np.asarray(starts, dtype=np.int64), kind="stable")
    lo, hi = np.asarray(starts, dtype=np.int64)[order], np.asarray(ends, dtype=np.int64)[order]
    return bool(np.all(hi[:-1] <= lo[1:]))


def _check_disjoint(info: TensorInfo, cfg: ChipConfig) -> None:
    """Check that no two vectors of a tensor share a MEM address (the error names the first
    vector, plane by plane, whose address an earlier one took)."""
    if _runs_disjoint(info, cfg):
        return
    locs = [plane_locations(info, pi, cfg.lanes) for pi in range(info.dtype.nbytes)]
    key = np.concatenate([g * cfg.addresses_per_slice + a for g, a in locs])
    _, first = np.unique(key, return_index=True)
    if len(first) == len(key):
        return
    seen = np.zeros(len(key), dtype=bool)
    seen[first] = True
    i = int(np.argmin(seen))                 # the first vector that is not its address's first
    g, a = divmod(int(key[i]), cfg.addresses_per_slice)
    raise ProgramError(f"tensor {info.name!r}: two vectors share {cfg.slice_name(g)}:{a:#x}")


def make_tensor(name: str, dtype, shape: Sequence[int], planes, cfg: ChipConfig) -> TensorInfo:
    """Build and validate a tensor-table entry.

    ``planes`` has one item per byte plane; each is a list of extents given as
    ``Extent``, ``(slice, address, count)`` or ``(slice, address)`` (the last
    extent's count may be omitted: it takes the rest of the plane).  ``slice``
    may be a global number or a name such as ``"W3"``.
    """
    try:
        d = dt.get(dtype)
    except Exception as e:
        raise ProgramError(f"tensor {name!r}: {e}") from None
    shape = _checked_shape(name, shape)
    probe = TensorInfo(name, d, shape, ())
    nvec = probe.nvectors(cfg.lanes)
    if len(planes) != d.nbytes:
        raise ProgramError(f"tensor {name!r}: {d.name} needs {d.nbytes} byte plane(s), got {len(planes)}")
    out: List[Plane] = []
    for pi, plane in enumerate(planes):
        if isinstance(plane, Stripes) or (isinstance(plane, dict) and "stripes" in plane):
            out.append(_striped_plane(name, pi, plane, probe, cfg))
        else:
            out.append(_extent_plane(name, pi, plane, nvec, cfg))
    info = TensorInfo(name, d, shape, tuple(out))
    _check_disjoint(info, cfg)
    return info


def check_array(info: TensorInfo, array) -> np.ndarray:
    """Check a host array against a tensor's dtype and shape (no silent casts)."""
    a = np.asarray(array)
    if a.dtype != info.dtype.numpy:
        raise TensorError(f"tensor {info.name!r} is {info.dtype.name}, got an array of {a.dtype}")
    if tuple(a.shape) != info.shape:
        raise TensorError(f"tensor {info.name!r} has shape {info.shape}, got {tuple(a.shape)}")
    return a
