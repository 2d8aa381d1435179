"""MEM for the compiler: where each tensor's vectors live, and reuse of dead tensors' space.

A tensor is ``rows x chunks`` vectors (a row of ``cols`` elements is cut into
320-lane chunks), each made of ``dtype.nbytes`` byte planes.  Vectors are striped
over a few slices per byte plane (vector (r, c) in stripe ``(r + c) % n``, see
:class:`lpucore.layout.Stripes`), so that consecutive rows, and the chunks of a
row, can be read in the same cycle; all planes of a tensor sit in
one hemisphere, because a multi-byte value travels as one stream group, in one
direction.  Address 0 of every slice holds a zero vector (padding for MXM
weight loads).

Space freed by a dead tensor is handed out again with the cycle after its last
read: a new tensor's writes there must land no earlier (the scheduler enforces it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import dtypes as dt
from ..config import ChipConfig
from ..errors import CompileError


class Memory:
    def __init__(self, cfg: ChipConfig):
        self.cfg = cfg
        A = cfg.addresses_per_slice
        # per slice: free ranges [start, end) with the cycle from which they may be written
        self.free: List[List[Tuple[int, int, int]]] = [[(1, A, 0)] for _ in range(cfg.mem_slices)]
        self.used = np.zeros(cfg.mem_slices, dtype=np.int64)
        # tensors alive in each slice (placed, not yet released): a new tensor goes to the slices
        # holding the fewest, so that tensors read together seldom share a slice's one read a cycle
        self.live = np.zeros(cfg.mem_slices, dtype=np.int64)
        self.peak = 0
        self.rr = [0, 0]          # round-robin start per hemisphere
        # (slice, fresh) -> longest(): placement asks every slice for it for every tensor, the free
        # lists change only by take and give (which drop the slice's entries)
        self._longest: Dict[Tuple[int, bool], int] = {}

    def available(self, g: int) -> int:
        return sum(e - s for s, e, _ in self.free[g])

    def available_fresh(self, g: int) -> int:
        return sum(e - s for s, e, t in self.free[g] if t == 0)

    def longest(self, g: int, fresh: bool = False) -> int:
        """The longest run of consecutive free addresses of slice g (``fresh``: never used in the run)."""
        got = self._longest.get((g, fresh))
        if got is None:
            got = self._longest[(g, fresh)] = self._find_longest(g, fresh)
        return got

    def _find_longest(self, g: int, fresh: bool) -> int:
        best = run = 0
        end = -1
        for s, e, t in self.free[g]:
            if fresh and t:
                end = -1
                continue
            run = run + (e - s) if s == end else e - s
            end = e
            best = max(best, run)
        return best

    def take(self, g: int, n: int, fresh: bool = False) -> Optional[Tuple[int, int]]:
        """n consecutive addresses of slice g: (address, write-after cycle), or None.

        The addresses may span adjacent free ranges freed at different cycles (they are
        kept apart by their write-after cycles); the span is writable from the latest.
        ``fresh``: only space no tensor uses during the run (write-after 0), for tensors
        the host writes before the run starts (constants, inputs, states)."""
        fr = self.free[g]
        best = None
        for i in range(len(fr)):
            s, end, t = fr[i]
            if fresh and t:
                continue
            j = i
            while end - s < n and j + 1 < len(fr) and fr[j + 1][0] == end and not (fresh and fr[j + 1][2]):
                j += 1
                end, t = fr[j][1], max(t, fr[j][2])
            if end - s >= n and (best is None or t < best[0]):
                best = (t, i, j)
                if t == 0:
                    break
        if best is None:
            return None
        t, i, j = best
        s = fr[i][0]
        rest = [(s + n, fr[j][1], fr[j][2])] if s + n < fr[j][1] else []
        self.free[g] = fr[:i] + rest + fr[j + 1:]
        self._forget(g)
        self.used[g] += n
        self.peak = max(self.peak, int(self.used.sum()))
        return s, t

    def reserve(self, g: int, addr: int, n: int) -> None:
        """Take addresses ``[addr, addr + n)`` of slice g, which must be free and never used (a tensor
        another program keeps there: :meth:`Compiler.share <lpucore.compiler.lower.Compiler.share>`)."""
        fr = self.free[g]
        for i, (s, e, t) in enumerate(fr):
            if s <= addr and addr + n <= e and t == 0:
                self.free[g] = fr[:i] + [r for r in ((s, addr, 0), (addr + n, e, 0)) if r[1] > r[0]] + fr[i + 1:]
                self._forget(g)
                self.used[g] += n
                self.peak = max(self.peak, int(self.used.sum()))
                return
        raise CompileError(f"internal: addresses {addr}..{addr + n - 1} of slice {g} are not free to reserve")

    def give(self, g: int, addr: int, n: int, after: int) -> None:
        """Return addresses, writable again from cycle `after` on."""
        self.free[g].append((addr, addr + n, after))
        self.free[g].sort()
        merged: List[Tuple[int, int, int]] = []
        for s, e, t in self.free[g]:
            if merged and merged[-1][1] == s and merged[-1][2] == t:
                merged[-1] = (merged[-1][0], e, t)
            else:
                merged.append((s, e, t))
        self.free[g] = merged
        self._forget(g)
        self.used[g] -= n

    def _forget(self, g: int) -> None:
        """Slice g's free list changed: its longest runs are found again when asked."""
        self._longest.pop((g, False), None)
        self._longest.pop((g, True), None)

    def peak_bytes(self) -> int:
        return self.peak * self.cfg.lanes


@dataclass
class VT:
    """A tensor's vectors in MEM."""

    name: str
    dtype: dt.DType
    rows: int
    cols: int
    chunks: int
    hem: int
    slices: List[List[int]]          # [plane][stripe] -> global slice
    bases: List[List[int]]           # [plane][stripe] -> first address
    after: List[List[int]]           # [plane][stripe] -> writes must land at or after this cycle
    kind: str = "temp"               # input, const, temp, output
    bcast: bool = False              # cols == 1 and the value is in every lane
    ready: np.ndarray = field(init=False)        # per vector: cycle from which reads see it
    last_read: np.ndarray = field(init=False)    # per vector: last cycle it is read
    consumers: int = 0               # kernels still to read it
    spare: int = 0                   # addresses kept after each stripe's vectors (a scatter's sink)

    def __post_init__(self) -> None:
        n = self.rows * self.chunks
        self.ready = np.zeros(n, dtype=np.int64)
        self.last_read = np.full(n, -1, dtype=np.int64)
        self._ns = len(self.slices[0])   # stripes, read millions of times by loc()

    @property
    def planes(self) -> int:
        return self.dtype.nbytes

    @property
    def nvec(self) -> int:
        return self.rows * self.chunks

    @property
    def stripes(self) -> int:
        return self._ns

    def loc(self, v: int, p: int) -> Tuple[int, int]:
        """(global slice, address) of vector v's byte plane p."""
        ch, ns = self.chunks, self._ns
        r, c = divmod(v, ch)
        i = (r + c) % ns
        return self.slices[p][i], self.bases[p][i] + (r // ns) * ch + c

    def write_after(self, v: int, p: int) -> int:
        r, c = divmod(v, self.chunks)
        return self.after[p][(r + c) % self._ns]

    def extents(self):
        """The tensor-table form: one Stripes per plane."""
        from ..layout import Stripes
        return [Stripes(tuple(zip(self.slices[p], self.bases[p]))) for p in range(self.planes)]


class TiledVT(VT):
    """A matmul weight constant kept as ``groups`` member tensors, member ``g`` holding the 320-lane
    column tiles ``c`` with ``c % groups == g`` on its own slices. The MXM planes take a product's tiles
    in turn, so each plane loads weights from its own slices and all planes load in the same cycles
    (one tensor's slices give one weight row each a cycle, shared by every plane reading them).
    A GEMV's last tiles, fewer than the planes, may instead be kept as ``parts`` (column tile, first row,
    end row, tensor, plane slot j: beside member j): runs of rows each plane loads for its share of K
    (``lower_more._split_matmul``); the members then hold the tiles before them. Reads go through
    :meth:`loc` as for any tensor; the program's tensor table has the members and parts."""

    def __init__(self, name: str, members: List[VT], cols: int, lanes: int,
                 parts: Sequence[Tuple[int, int, int, VT, int]] = ()):
        m0 = members[0]
        planes = range(m0.dtype.nbytes)
        held = list(members) + [pv for _, _, _, pv, _ in parts]
        super().__init__(name, m0.dtype, m0.rows, cols, -(-cols // lanes), m0.hem,
                         [[g for m in held for g in m.slices[p]] for p in planes],
                         [[b for m in held for b in m.bases[p]] for p in planes],
                         [[a for m in held for a in m.after[p]] for p in planes], kind="const")
        self.members = members
        self.parts = list(parts)
        self.whole = self.chunks - len({nt for nt, _, _, _, _ in self.parts})    # tiles the members hold
        # rows a plane loads in one cycle for the whole tiles come from one member: on distinct slices only
        # as many as the fewest stripes of them (a part is loaded as a tensor of its own)
        self._ns = min(m.stripes for m in members)

    def _member(self, v: int) -> Tuple[VT, int]:
        r, c = divmod(v, self.chunks)
        if c >= self.whole:
            for nt, r0, r1, pv, _ in self.parts:
                if nt == c and r0 <= r < r1:
                    return pv, r - r0
            raise CompileError(f"internal: row {r} of tile {c} of {self.name!r} is in no part")
        m = self.members[c % len(self.members)]
        return m, r * m.chunks + c // len(self.members)

    def loc(self, v: int, p: int) -> Tuple[int, int]:
        m, w = self._member(v)
        return m.loc(w, p)

    def write_after(self, v: int, p: int) -> int:
        m, w = self._member(v)
        return m.write_after(w, p)

    def extents(self):
        raise CompileError(f"internal: tiled weight {self.name!r} is in the tensor table as its members")


class RowView(VT):
    """Rows [first, first + rows) of ``parent`` as a tensor of their own (a concatenation's part its
    producer writes in place): same slices, vector v is the parent's vector v + first * chunks, and
    readiness is the parent's (NumPy views of its arrays). Never released: the parent is."""

    def __init__(self, parent: VT, first: int, rows: int):
        super().__init__(f"{parent.name}[{first}:{first + rows}]", parent.dtype, rows, parent.cols, parent.chunks,
                         parent.hem, parent.slices, parent.bases, parent.after, kind="view")
        self.parent, self.off = parent, first * parent.chunks
        self.ready = parent.ready[self.off:self.off + rows * parent.chunks]
        self.last_read = parent.last_read[self.off:self.off + rows * parent.chunks]
        self._ns = parent.stripes

    def loc(self, v: int, p: int) -> Tuple[int, int]:
        return self.parent.loc(v + self.off, p)

    def write_after(self, v: int, p: int) -> int:
        return self.parent.write_after(v + self.off, p)

    def extents(self):
        raise CompileError(f"internal: {self.name!r} is part of another tensor")


def _stripe_counts(want: int, most: int, pow2: bool, divides: int, least: int = 1) -> List[int]:
    """The stripe counts :func:`place` tries, in order: ``want`` and fewer down to ``least``, then more up to
    ``most``; powers of two only with ``pow2``, divisors of ``divides`` only when it is given."""
    return [n for n in list(range(want, max(1, least) - 1, -1)) + list(range(want + 1, most + 1))
            if not (pow2 and n & (n - 1)) and not (divides and divides % n)]


def stripe_length(rows: int, stripes: int, chunks: int, spare: int = 0) -> int:
    """Addresses one stripe of a tensor takes: its share of the rows, each ``chunks`` vectors, and
    ``spare`` more (a scatter's sink)."""
    return -(-rows // stripes) * chunks + spare


def place(mem: Memory, name: str, dtype: dt.DType, rows: int, cols: int, lanes: int, hem: int,
          stripes: int = 8, kind: str = "temp", avoid: Tuple[int, ...] = (), strict: bool = False,
          pow2: bool = False, spare: int = 0, stripe_divides: int = 0, min_stripes: int = 1) -> VT:
    """Allocate a tensor: rows striped over up to `stripes` slices per plane, all planes
    in hemisphere `hem` (the other one if this one is full, unless ``strict``); ``pow2``: a
    power of two of stripes (a row's stripe and address are then a mask and a shift of its
    index, which the VXM computes for a MEM ``Scatter``); ``spare`` addresses more after each
    stripe's vectors (a scatter's sink: :mod:`lpucore.compiler.scatter`); ``stripe_divides``: a
    number of stripes dividing it (blocks of that many rows: :mod:`lpucore.compiler.blocks`);
    ``min_stripes``: never fewer stripes than that (an MXM weight load's rows of one cycle on distinct
    slices).

    Tensors the host writes before the run (constants, inputs, states) only get space no
    temporary ever uses: a constant placed during lowering (a mask, a ones matrix) in the
    space of a temporary that died earlier in the schedule would be overwritten by it."""
    cfg = mem.cfg
    fresh = kind in ("const", "input", "state")

    def avail(g: int) -> int:
        return mem.longest(g, fresh)
    chunks = -(-cols // lanes)
    planes = dtype.nbytes
    n_sl = cfg.mem_slices_per_hemisphere
    want = max(1, min(stripes, rows * chunks, n_sl // planes))

    def room(h: int) -> int:
        """Stripes this hemisphere can give (slices with room that are not to be avoided)."""
        per = stripe_length(rows, want, chunks, spare)
        ok = [g for g in (cfg.slice_id(h, s) for s in range(n_sl)) if g not in avoid and avail(g) >= per]
        return min(want, len(ok) // planes)
    # the asked hemisphere, unless the other gives more stripes (slices the tensor's operands do not hold)
    for h in (hem,) if strict else sorted((hem, 1 - hem), key=lambda h: -room(h)):
        # fewer stripes first (as asked, or fewer if the slices are crowded); a tensor too
        # big for that many slices' addresses is spread over more
        most = max(want, min(rows * chunks, n_sl // planes))
        for n in _stripe_counts(want, most, pow2, stripe_divides, min(want, min_stripes)):
            per = stripe_length(rows, n, chunks, spare)
            # slices of this hemisphere with room, least used first, round robin
            cands = [cfg.slice_id(h, s) for s in range(n_sl)]
            cands = [g for g in cands if g not in avoid and avail(g) >= per]
            if len(cands) < planes * n:
                continue
            start = mem.rr[h] % len(cands)
            cands = cands[start:] + cands[:start]
            cands.sort(key=lambda g: (mem.live[g], mem.used[g]))
            chosen = cands[: planes * n]
            slices, bases, after = [], [], []
            ok = True
            taken = []
            for p in range(planes):
                sl, bs, af = [], [], []
                for i in range(n):
                    g = chosen[p * n + i]
                    got = mem.take(g, per, fresh)
                    if got is None:
                        ok = False
                        break
                    taken.append((g, got[0], per, got[1]))
                    sl.append(g)
                    bs.append(got[0])
                    af.append(got[1])
                if not ok:
                    break
                slices.append(sl)
                bases.append(bs)
                after.append(af)
            if not ok:
                # hand back what was taken with its write-after cycle: space freed by a dead
                # tensor must not become writable before that tensor's last read
                for g, a, k, t in taken:
                    mem.give(g, a, k, t)
                continue
            mem.rr[h] += planes * n
            for g in chosen:
                mem.live[g] += 1
            return VT(name, dtype, rows, cols, chunks, h, slices, bases, after, kind, spare=spare)
    raise _no_room(mem, name, dtype, rows, cols, lanes, spare, fresh, avoid, (hem,) if strict else (0, 1))


def _no_room(mem: Memory, name: str, dtype: dt.DType, rows: int, cols: int, lanes: int, spare: int,
             fresh: bool, avoid: Tuple[int, ...], hems: Tuple[int, ...]) -> CompileError:
    """The error of a tensor :func:`place` found no room for in hemispheres ``hems``: what it needs, what
    is free, and why when more is free than it needs: more than a hemisphere's free space, or (a stripe
    needs consecutive addresses in one slice) too few slices with a long enough run."""
    cfg = mem.cfg
    chunks, planes = -(-cols // lanes), dtype.nbytes
    need = rows * chunks * planes * lanes
    avail = mem.available_fresh if fresh else mem.available
    free = sum(avail(g) for g in range(cfg.mem_slices)) * lanes
    msg = (f"tensor {name!r} ({dtype.name}, {rows} x {cols}) needs {need:,} bytes of MEM in "
           f"{planes} x stripes of consecutive addresses; {free:,} bytes are free (of {cfg.sram_bytes:,})")
    n_sl = cfg.mem_slices_per_hemisphere
    hem_free = max(sum(avail(cfg.slice_id(h, i)) for i in range(n_sl)) for h in hems) * lanes
    if free >= need and hem_free < need:
        which = "its" if len(hems) == 1 else "either"
        msg += f", but a tensor lives in one hemisphere and {which} has at most {hem_free:,}"
    elif free >= need:
        n = max(1, min(rows * chunks, n_sl // planes))
        per = stripe_length(rows, n, chunks, spare)
        most = max(sum(1 for i in range(n_sl) if cfg.slice_id(h, i) not in avoid
                       and mem.longest(cfg.slice_id(h, i), fresh) >= per) for h in hems)
        if most < planes * n:
            msg += (f", but in pieces: spread over the most stripes it needs {per:,} consecutive free addresses "
                    f"in each of {planes * n} slices of one hemisphere{' other than its operands' if avoid else ''}, "
                    f"and {most} have that many")
    return CompileError(msg + ": the graph does not fit on this chip")


def release(mem: Memory, vt: VT) -> None:
    """Hand a dead tensor's space back, writable after its last read."""
    n = vt.stripes
    per = stripe_length(vt.rows, n, vt.chunks, vt.spare)
    last = max(int(vt.last_read.max()) if len(vt.last_read) else -1, int(vt.ready.max()) if len(vt.ready) else 0)
    for p in range(vt.planes):
        for i in range(n):
            mem.give(vt.slices[p][i], vt.bases[p][i], per, last + 1)
            mem.live[vt.slices[p][i]] -= 1
