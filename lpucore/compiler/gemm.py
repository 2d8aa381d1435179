"""Complete scheduled programs for C = A x B on the MXM.

``gemm_program(M, K, N, dtype)`` lays the operands out in MEM, assigns slices,
streams, MXM planes and VXM ALUs, and decides the issue cycle of every
instruction, so that the program runs with no hazard and its length is known
before it runs (``GemmProgram.expected_cycles``).

How the work is laid out
------------------------
* Each hemisphere's two MXM planes sit at the die's edge and work in lockstep
  on one activation stream: plane 0 and plane 1 multiply the same rows of A by
  two different 320-column tiles of B.  The hemispheres take halves of the rows
  of A (or, when A has few rows, halves of the column tiles of B).
* A plane computes [1 x Kc] x [Kc x 320] per ABC (Kc = 320 for int8, 160 for
  float16), so K is cut into chunks.  For each column tile and block of rows,
  the chunks are streamed one after another, accumulating in the plane's
  accumulators; the block's accumulators are then streamed out (ACC) while the
  next block accumulates in the other half of the accumulators.
* Weights stream into the weight buffer (LW, ``ws`` streams a cycle) during the
  previous chunk's activations and are installed (IW) so that they take effect
  exactly when the next chunk's first activation arrives: weight loading
  overlaps compute.
* Every MEM slice has one role (activation reads, weight reads, result writes),
  so no slice ever reads and writes in the same cycle; each role has its own
  streams, so no two producers meet on a stream register.
* Results are int32 (int8 GEMM) or float32 (float16 GEMM), written as byte
  planes; or requantised to int8 / converted to float16 on the VXM on their way
  past it, and written in the other hemisphere.

Tensors are stored in packed layouts (``GemmProgram.pack`` / ``unpack`` convert).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .. import dtypes as dt
from ..config import HEMISPHERES, ChipConfig
from ..errors import CompileError
from ..layout import Extent
from ..program import Program
from .emit import Emitter, expected_cycles

OUTPUTS = {"int8": ("int32", "int8"), "float16": ("float32", "float16")}


@dataclass
class _Alloc:
    """Bump allocation of vector runs in groups of slices (one slice per byte plane)."""

    free: List[int]                 # free slot numbers of the hemisphere
    width: int                      # slices per group (byte planes)
    cap: int                        # addresses per slice
    groups: List[Tuple[int, ...]] = field(default_factory=list)
    top: int = 0                    # next free address in the last group

    def take(self, count: int):
        if count > self.cap:
            raise CompileError(f"a run of {count} vectors does not fit a MEM slice of {self.cap} addresses")
        if not self.groups or self.top + count > self.cap:
            if len(self.free) < self.width:
                raise _OutOfSlices("no MEM slice left for operands or results")
            self.groups.append(tuple(self.free.pop(0) for _ in range(self.width)))
            self.top = 0
        g, a = self.groups[-1], self.top
        self.top += count
        return g, a


class _OutOfSlices(Exception):
    pass


def _row_index(rows):
    """Host rows as an index: consecutive rows (as the generator assigns them) a slice, so that the copy
    is a plain one; else an array."""
    return slice(rows[0], rows[-1] + 1) if list(rows) == list(range(rows[0], rows[-1] + 1)) else np.asarray(rows)


@dataclass
class GemmProgram:
    """A scheduled GEMM: the program, how to pack its inputs and unpack its output."""

    program: Program
    M: int
    K: int
    N: int
    dtype: str
    out: str
    expected_cycles: int
    plan: Dict[str, Any]
    _tensors: Dict[str, Callable[..., Any]] = field(repr=False, default_factory=dict)
    # host staging buffers of write() and unpack(), by name: packed inputs, padded weight rows, read results
    _staging: Dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    _lock: threading.Lock = field(repr=False, default_factory=threading.Lock)

    @property
    def useful_macs(self) -> int:
        return self.M * self.K * self.N

    def pack(self, A: np.ndarray, B: np.ndarray) -> Dict[str, np.ndarray]:
        """Host arrays A [M, K] and B [K, N] -> {tensor name: packed array} for Chip.write_tensor."""
        return self._tensors["pack"](A, B)

    def unpack(self, chip) -> np.ndarray:
        """Read C [M, N] back from a chip that ran the program (a new array; no buffer kept)."""
        return self._tensors["unpack"](chip, None)

    def write(self, chip, A: np.ndarray, B: np.ndarray) -> None:
        """Pack A [M, K] and B [K, N] and write them to a chip that loaded the program, through host
        staging buffers this program keeps between calls (what :meth:`pack` returns are new arrays; a
        repeated product then touches no new pages: about 20 ms of GEMM (a)'s 26 MB). Calls from
        several threads (chips sharing this program) take turns."""
        with self._lock:
            for name, arr in self._tensors["pack"](A, B, self._staging).items():
                chip.write_tensor(name, arr)

    def read(self, chip) -> np.ndarray:
        """:meth:`unpack` through read buffers this program keeps (C is still a new array); calls from
        several threads take turns."""
        with self._lock:
            return self._tensors["unpack"](chip, self._staging)

    def run(self, A, B, engine: str = "fast", chip=None, fp16_mxm: str = "exact"):
        """Load, write A and B, run, and return (C, RunStats)."""
        from ..chip import Chip
        if chip is None:
            chip = Chip(self.program.config, engine=engine, fp16_mxm=fp16_mxm)
        chip.load(self.program)
        for name, arr in self.pack(A, B).items():
            chip.write_tensor(name, arr)
        stats = chip.run()
        return self.unpack(chip), stats


def matmul(A: np.ndarray, B: np.ndarray, out: Optional[str] = None, requant=(1, 0, 0),
           config: Optional[ChipConfig] = None, engine: str = "fast"):
    """C = A x B on a simulated chip: returns (C, RunStats)."""
    A = np.asarray(A)
    B = np.asarray(B)
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[0]:
        raise CompileError(f"matmul needs A [M, K] and B [K, N], got {A.shape} and {B.shape}")
    if A.dtype != B.dtype or A.dtype not in (np.int8, np.float16):
        raise CompileError(f"matmul takes two int8 or two float16 matrices, got {A.dtype} and {B.dtype}")
    g = gemm_program(A.shape[0], A.shape[1], B.shape[1], dtype=A.dtype.name, out=out, requant=requant, config=config)
    return g.run(A, B, engine=engine)


def gemm_program(M: int, K: int, N: int, dtype: str = "int8", out: Optional[str] = None,
                 requant: Tuple[int, int, int] = (1, 0, 0), config: Optional[ChipConfig] = None) -> GemmProgram:
    """Schedule C[M, N] = A[M, K] x B[K, N].

    ``dtype``: ``"int8"`` (results ``out="int32"``, or ``"int8"`` requantised on the
    VXM with ``requant=(mult, shift, zero_point)`` as the ``requant`` instruction
    defines) or ``"float16"`` (``out="float32"`` or ``"float16"``).
    """
    cfg = config if config is not None else ChipConfig.groqchip1()
    for n, v in (("M", M), ("K", K), ("N", N)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise CompileError(f"gemm: {n} must be a positive integer, got {v!r}")
    if dtype not in OUTPUTS:
        raise CompileError(f"gemm: dtype must be int8 or float16, got {dtype!r}")
    out = out or OUTPUTS[dtype][0]
    if out not in OUTPUTS[dtype]:
        raise CompileError(f"gemm: a {dtype} GEMM gives {' or '.join(OUTPUTS[dtype])}, not {out!r}")
    last_err = None
    for planes in (2, 1):
        for ws in range(min(cfg.mxm_lw_streams, cfg.streams_per_direction), 0, -1):
            try:
                return _Builder(cfg, int(M), int(K), int(N), dtype, out, requant, planes, ws).build()
            except _OutOfSlices as e:
                last_err = str(e) or "MEM slices"
            except _OutOfStreams:
                last_err = last_err or "streams"
    need = M * K * (1 if dtype == "int8" else 2) + K * N * (1 if dtype == "int8" else 2) \
        + M * N * dt.get(out).nbytes
    raise CompileError(f"gemm [{M} x {K}] x [{K} x {N}] {dtype} does not fit this chip: it needs about "
                       f"{need:,} bytes in MEM (the chip has {cfg.sram_bytes:,}) laid out over "
                       f"{cfg.mem_slices_per_hemisphere} slices and {cfg.streams_per_direction} streams per "
                       f"direction per hemisphere ({last_err})")


class _OutOfStreams(Exception):
    pass


@dataclass
class _Half:
    """One hemisphere's share of a GEMM: its rows and column tiles, slices, runs and streams."""

    h: int
    rows: List[int]
    pairs: List[List[int]]                     # column tiles, P at a time (one per plane)
    blocks: List[Tuple[int, int]]              # (first row, rows) per row block
    wsl: List[List[int]]                       # weight slices per plane
    cnt: List[int]                             # byte-rows each weight slice feeds
    per_plane_tiles: List[List[int]]
    act_runs: Dict[Tuple[int, int], Tuple[Tuple[int, ...], int]]        # (chunk, block) -> (slices, address)
    out_runs: Dict[Tuple[int, int, int], Tuple[Tuple[int, ...], int]]   # (plane, tile, block) -> (slices, address)
    s_act: int
    s_w: List[int]
    s_out: List[int]
    s_post: List[int]
    alus: List[int]
    xm: int                                    # the MXM's position (MEM slice units)
    pos: Callable[[int], int]                  # slot -> position of this hemisphere's slices


class _Builder:
    def __init__(self, cfg, M, K, N, dtype, out, requant, planes, ws):
        self.cfg, self.M, self.K, self.N = cfg, M, K, N
        self.dtype, self.out, self.requant = dtype, out, requant
        self.P_used, self.ws = planes, ws
        L = cfg.lanes
        self.L = L
        self.fp16 = dtype == "float16"
        self.Kc = L // 2 if self.fp16 else L                 # weight rows per plane
        self.R = cfg.mxm_size                                 # weight-buffer byte-rows
        self.r = cfg.mxm_fp16_interval if self.fp16 else 1   # cycles between ABCs
        self.a = 2 if self.fp16 else 1                        # activation streams
        self.nK = -(-K // self.Kc)
        self.nT = -(-N // L)
        self.post = out in ("int8", "float16")
        self.pw = dt.get(out).nbytes if self.post else 0     # streams of a VXM result
        self.out_planes = 4                                   # int32 / float32 accumulators
        S = cfg.streams_per_direction
        P = self.P_used
        # streams in one direction: inward of one hemisphere + the other's VXM results
        if self.a + P * ws + P * self.pw > S or P * self.out_planes + P * self.pw > S:
            raise _OutOfStreams()
        if self.post and cfg.vxm_alus_per_lane < 2 * P:
            raise _OutOfStreams()
        self.Lw = -(-self.R // ws)
        self.Mb = max(1, min(cfg.mxm_accumulators // 2, 256))

    # ---- geometry helpers ---------------------------------------------------------------
    def stream(self, direction, idx):
        return direction * self.cfg.streams_per_direction + idx

    def inward(self, h):
        """Direction of values travelling towards hemisphere h's MXM: West planes are fed
        westward (1), East planes eastward (0)."""
        return 1 if h == 0 else 0

    def hop(self, x, y):
        return abs(x - y)

    # ---- work split -------------------------------------------------------------------------
    def split(self):
        """(rows, tiles) per hemisphere: halves of A's rows, or of B's column tiles."""
        M, nT = self.M, self.nT

        def cost(rows, tiles):
            if not rows or not tiles:
                return 0
            pairs = -(-len(tiles) // self.P_used)
            blocks = -(-len(rows) // self.Mb)
            per = [max(min(self.Mb, len(rows) - b * self.Mb) * self.r, self.Lw + 1) for b in range(blocks)]
            return pairs * self.nK * sum(per)

        rows = list(range(M))
        tiles = list(range(nT))
        h = M // 2
        by_rows = ((rows[:M - h], tiles), (rows[M - h:], tiles))
        t = nT // 2
        by_tiles = ((rows, tiles[:nT - t]), (rows, tiles[nT - t:]))
        c1 = max(cost(*by_rows[0]), cost(*by_rows[1]))
        c2 = max(cost(*by_tiles[0]), cost(*by_tiles[1]))
        return by_rows if c1 <= c2 else by_tiles

    # ---- the build ---------------------------------------------------------------------------
    def build(self) -> GemmProgram:
        """Allocate, schedule and emit both hemispheres' halves, then describe the tensors."""
        cfg = self.cfg
        self.em = Emitter(cfg)
        self.tensors: List[Tuple[str, str, tuple, list]] = []      # (name, dtype, shape, planes of runs)
        self.packers: List[Any] = []
        self.unpackers: List[Any] = []
        free = [list(range(cfg.mem_slices_per_hemisphere)) for _ in range(2)]
        post_alloc: List[Optional[List[_Alloc]]] = [None, None]    # results of hemisphere h land in 1 - h
        plan: Dict[str, Any] = {"planes_per_hemisphere": self.P_used, "weight_streams_per_plane": self.ws,
                                "row_block": self.Mb, "k_chunks": self.nK, "column_tiles": self.nT,
                                "hemispheres": []}
        for h, (rows, tiles) in enumerate(self.split()):
            if not rows or not tiles:
                plan["hemispheres"].append({"rows": 0, "tiles": 0})
                continue
            hs = self._layout(h, rows, tiles, free, post_alloc)
            self._schedule(hs)
            self._describe(hs)
            plan["hemispheres"].append({"rows": len(rows), "tiles": len(tiles), "pairs": len(hs.pairs),
                                        "blocks": len(hs.blocks),
                                        "slices_used": cfg.mem_slices_per_hemisphere - len(free[h])})
        prog = self.em.program()
        for name, dname, shape, planes in self.tensors:
            prog.add_tensor(name, dname, shape, [[(e.slice, e.address, e.count) for e in pl] for pl in planes])
        prog.validate()
        g = GemmProgram(prog, self.M, self.K, self.N, self.dtype, self.out, expected_cycles(prog), plan)
        packers, unpackers = self.packers, self.unpackers
        g._tensors["pack"] = lambda A, B, staging=None: self._pack_all(packers, A, B, staging)
        g._tensors["unpack"] = lambda chip, staging: self._unpack_all(unpackers, chip, staging)
        return g

    def _layout(self, h: int, rows: List[int], tiles: List[int], free: List[List[int]],
                post_alloc: List[Optional[List[_Alloc]]]) -> "_Half":
        """Hemisphere h's slices (weights first: P x ws distinct slices read in the same cycles),
        its activation and result runs, and its streams."""
        cfg, P, ws, a = self.cfg, self.P_used, self.ws, self.a
        Rh = len(rows)
        pairs = [tiles[i:i + P] for i in range(0, len(tiles), P)]
        blocks = [(b, min(self.Mb, Rh - b)) for b in range(0, Rh, self.Mb)]
        if len(free[h]) < P * ws:
            raise _OutOfSlices("not enough MEM slices for the weight streams")
        wsl = [[free[h].pop(0) for _ in range(ws)] for _ in range(P)]
        cnt = [len(range(j, self.R, ws)) for j in range(ws)]              # byte-rows slice j feeds
        per_plane_tiles = [[pr[p] for pr in pairs if p < len(pr)] for p in range(P)]
        for p in range(P):
            need = len(per_plane_tiles[p]) * self.nK * cnt[0]
            if need > cfg.addresses_per_slice:
                raise _OutOfSlices(f"the weights of one plane need {need} vectors in each of its weight "
                                   f"slices, which hold {cfg.addresses_per_slice}")
        # activation runs: one per (chunk, block), a slices (byte planes) per group
        act = _Alloc(free[h], a, cfg.addresses_per_slice)
        act_runs = {(kc, b): act.take(nb) for kc in range(self.nK) for b, nb in blocks}
        # result runs: one per (plane, tile, block)
        if self.post:
            outs = post_alloc[1 - h]
            if outs is None:
                outs = post_alloc[1 - h] = [_Alloc(free[1 - h], self.pw, cfg.addresses_per_slice)
                                            for _ in range(P)]
        else:
            outs = [_Alloc(free[h], self.out_planes, cfg.addresses_per_slice) for _ in range(P)]
        out_runs = {(p, t, b): outs[p].take(nb) for p in range(P) for t in per_plane_tiles[p] for b, nb in blocks}
        din = self.inward(h)
        S = cfg.streams_per_direction
        return _Half(h=h, rows=rows, pairs=pairs, blocks=blocks, wsl=wsl, cnt=cnt,
                     per_plane_tiles=per_plane_tiles, act_runs=act_runs, out_runs=out_runs,
                     s_act=self.stream(din, 0), s_w=[self.stream(din, a + p * ws) for p in range(P)],
                     s_out=[self.stream(1 - din, 4 * p) for p in range(P)],
                     s_post=[self.stream(1 - din, S - P * self.pw + p * self.pw) for p in range(P)],
                     alus=[h * P + p for p in range(P)], xm=cfg.mxm_position(h),
                     pos=functools.partial(cfg.mem_position, h))

    def _schedule(self, hs: "_Half") -> None:
        """Emit hemisphere hs's steps (column-tile pair, row block, K chunk) as early as the weight
        buffers, the accumulator halves and the drain queue allow (cycles)."""
        cfg = self.cfg
        d_read, d_iw, d_mxm = cfg.mem_read_delay, cfg.mxm_install_delay, cfg.mxm_delay
        t_min = d_read + max(self.hop(hs.pos(s), hs.xm) for s in range(cfg.mem_slices_per_hemisphere))
        steps = [(j, b, nb, kc) for j in range(len(hs.pairs)) for (b, nb) in hs.blocks for kc in range(self.nK)]
        prev = None
        acc_q_free = 0
        bank_free = [0, 0]         # first cycle an ABC may land in each accumulator half
        gblock = 0
        for j, b, nb, kc in steps:
            if prev is None:
                W = t_min
            else:
                pT, pnb, pI = prev
                W = max(pI + 1, pT + (pnb - 1) * self.r + 1 - d_iw - self.Lw)
            t_iw = W + self.Lw
            T = max(t_iw + d_iw, t_min)
            if prev is not None:
                T = max(T, prev[0] + prev[1] * self.r)
            bank = gblock % 2
            if kc == 0:
                T = max(T, bank_free[bank] - d_mxm)
            self._emit_weights(hs, j, kc, W, t_iw, T, bank, nb)
            # activations: one run per step from the (chunk, block) group
            grp, addr = hs.act_runs[(kc, b)]
            for i, sl in enumerate(grp):
                self.em.at(f"MEM.{HEMISPHERES[hs.h]}{sl}", T - d_read - self.hop(hs.pos(sl), hs.xm), "Read", addr,
                           hs.s_act + i, repeat=(nb - 1, self.r, 1) if nb > 1 else None)
            prev = (T, nb, t_iw)
            if kc == self.nK - 1:
                # the block is complete: stream its accumulators out
                C = max(T + (nb - 1) * self.r + d_mxm, acc_q_free)
                acc_q_free = bank_free[bank] = C + nb
                self._emit_drain(hs, j, b, nb, C, bank)
                gblock += 1

    def _emit_weights(self, hs: "_Half", j: int, kc: int, W: int, t_iw: int, T: int, bank: int, nb: int) -> None:
        """Pair j's K chunk kc: LW from each plane's weight slices from cycle W, IW at t_iw, and the
        block's ABCs from T into accumulator half ``bank``."""
        cfg, em, h, ws = self.cfg, self.em, hs.h, self.ws
        dname = "float16" if self.fp16 else "int8"
        full, rem = divmod(self.R, ws)
        for p, tile in enumerate(hs.pairs[j]):
            q = f"MXM.{cfg.plane_name(h * cfg.mxm_planes_per_hemisphere + p)}"
            em.at(q + ".LW", W, "LW", hs.s_w[p], ws, 0, repeat=(full - 1, 1, ws) if full > 1 else None)
            if rem:
                em.at(q + ".LW", W + full, "LW", hs.s_w[p], rem, full * ws)
            em.at(q + ".LW", t_iw, "IW", dname)
            ti = hs.per_plane_tiles[p].index(tile) * self.nK + kc
            for jj, sl in enumerate(hs.wsl[p]):
                em.at(f"MEM.{HEMISPHERES[h]}{sl}", W - cfg.mem_read_delay - self.hop(hs.pos(sl), hs.xm), "Read",
                      ti * hs.cnt[0], hs.s_w[p] + jj, repeat=(hs.cnt[jj] - 1, 1, 1) if hs.cnt[jj] > 1 else None)
            em.at(q + ".ABC", T, "ABC", dname, hs.s_act, bank * (cfg.mxm_accumulators // 2), 1 if kc else 0,
                  repeat=(nb - 1, self.r, 1) if nb > 1 else None)

    def _emit_drain(self, hs: "_Half", j: int, b: int, nb: int, C: int, bank: int) -> None:
        """Block b of pair j leaves its accumulators from cycle C: written to MEM as int32/float32,
        or requantised / converted on the VXM and written to the other hemisphere."""
        cfg, em, h = self.cfg, self.em, hs.h
        d_acc, xv = cfg.mxm_acc_delay, cfg.vxm_position
        rep = (nb - 1, 1, 1) if nb > 1 else None
        for p, tile in enumerate(hs.pairs[j]):
            q = f"MXM.{cfg.plane_name(h * cfg.mxm_planes_per_hemisphere + p)}"
            em.at(q + ".ACC", C, "ACC", bank * (cfg.mxm_accumulators // 2), hs.s_out[p], repeat=rep)
            grp, addr = hs.out_runs[(p, tile, b)]
            if not self.post:
                for i, sl in enumerate(grp):
                    em.at(f"MEM.{HEMISPHERES[h]}{sl}", C + d_acc + self.hop(hs.pos(sl), hs.xm), "Write",
                          addr, hs.s_out[p] + i, repeat=rep)
                continue
            V = C + d_acc + self.hop(xv, hs.xm)
            alu, vrep = f"VXM.{hs.alus[p]}", (nb - 1, 1, 0) if nb > 1 else None
            if self.out == "int8":
                mult, shift, zp = self.requant
                em.at(alu, V, "requant", hs.s_post[p], hs.s_out[p], mult, shift, zp, repeat=vrep)
            else:
                em.at(alu, V, "cvt", "float32", "float16", hs.s_post[p], hs.s_out[p], repeat=vrep)
            for i, sl in enumerate(grp):
                xs = cfg.mem_position(1 - h, sl)
                em.at(f"MEM.{HEMISPHERES[1 - h]}{sl}", V + cfg.vxm_convert_delay + self.hop(xs, xv), "Write",
                      addr, hs.s_post[p] + i, repeat=rep)

    def _describe(self, hs: "_Half") -> None:
        """The packed tensors of hemisphere hs: A_h [nK, Rh, Kc] (chunk kc of block b at
        act_runs[(kc, b)]), each plane's weights B_hp and results C_hp, with their packers."""
        cfg, h, a = self.cfg, hs.h, self.a
        hem = HEMISPHERES[h]
        a_name = f"A_{hem}"
        a_planes: List[List[Extent]] = [[] for _ in range(a)]
        for kc in range(self.nK):
            for b, nb in hs.blocks:
                grp, addr = hs.act_runs[(kc, b)]
                for i in range(a):
                    a_planes[i].append(Extent(cfg.slice_id(h, grp[i]), addr, nb))
        self.tensors.append((a_name, "float16" if self.fp16 else "int8", (self.nK, len(hs.rows), self.Kc), a_planes))
        self.packers.append(self._pack_a(a_name, hs.rows))
        out_d = dt.get(self.out)
        ohem = 1 - h if self.post else h
        for p in range(self.P_used):
            tiles = hs.per_plane_tiles[p]
            if not tiles:
                continue
            b_name, c_name = f"B_{hem}{p}", f"C_{hem}{p}"
            nt = len(tiles) * self.nK
            planes = [[Extent(cfg.slice_id(h, sl), 0, nt * hs.cnt[0]) for sl in hs.wsl[p]]]
            # one byte plane; vector order (slice j, tile-chunk, row-in-slice)
            self.tensors.append((b_name, "int8", (self.ws, nt, hs.cnt[0], self.L), planes))
            self.packers.append(self._pack_b(b_name, tiles, hs.cnt[0]))
            c_planes: List[List[Extent]] = [[] for _ in range(out_d.nbytes)]
            for t in tiles:
                for b, nb in hs.blocks:
                    grp, addr = hs.out_runs[(p, t, b)]
                    for i in range(out_d.nbytes):
                        c_planes[i].append(Extent(cfg.slice_id(ohem, grp[i]), addr, nb))
            self.tensors.append((c_name, self.out, (len(tiles), len(hs.rows), self.L), c_planes))
            self.unpackers.append((c_name, hs.rows, tiles))

    # ---- host-side layouts ----------------------------------------------------------------------------
    def _check_inputs(self, A, B):
        want = np.int8 if self.dtype == "int8" else np.float16
        A, B = np.asarray(A), np.asarray(B)
        if A.shape != (self.M, self.K) or B.shape != (self.K, self.N):
            raise CompileError(f"gemm was built for A {(self.M, self.K)} and B {(self.K, self.N)}, "
                               f"got {A.shape} and {B.shape}")
        if A.dtype != want or B.dtype != want:
            raise CompileError(f"gemm was built for {self.dtype} operands, got {A.dtype} and {B.dtype}")
        return A, B

    def _pack_all(self, packers, A, B, staging=None):
        """{tensor name: packed array}; into the buffers of ``staging`` (name -> array, filled on first
        use: their padding is written once and stays zero) when given, else new arrays."""
        A, B = self._check_inputs(A, B)
        out = {}
        memo: Dict[Any, np.ndarray] = {}        # B's padded rows, shared by this call's packers
        for f in packers:
            out.update(f(A, B, memo, staging))
        return out

    @staticmethod
    def _buffer(staging, key, shape, dtype, zero: bool = True) -> np.ndarray:
        """A new array (zeroed unless ``zero`` is False: every element is about to be written), or
        ``staging``'s buffer ``key`` (made zeroed on first use)."""
        if staging is None:
            return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
        buf = staging.get(key)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
            buf = staging[key] = np.zeros(shape, dtype)
        return buf

    def _pack_a(self, name, rows):
        at = _row_index(rows)

        def f(A, B, memo, staging=None):
            out = self._buffer(staging, name, (self.nK, len(rows), self.Kc), A.dtype)
            full, rest = divmod(self.K, self.Kc)
            src = A[at]
            # chunk kc of row r is A's columns kc * Kc.. (one strided copy of the whole chunks; the last
            # chunk's columns past K stay zero)
            out[:full] = src[:, : full * self.Kc].reshape(len(rows), full, self.Kc).transpose(1, 0, 2)
            if rest:
                out[full, :, :rest] = src[:, full * self.Kc:]
            return {name: out}
        return f

    def _pack_b(self, name, tiles, per_slice):
        ws = self.ws

        if not self.fp16:                                   # int8: one gather of B's rows, by an index made once
            idx = self._b_rows_index(tiles, per_slice)
            if idx.min() < 0 or idx.max() > self.nK * self.Kc * -(-self.N // self.L):   # taken with mode "clip"
                raise CompileError(f"internal: {name}'s weight rows index past the padded rows")

            def f8(A, B, memo, staging=None):
                ntiles = -(-self.N // self.L)                # every column tile: one padded copy per call
                if ntiles not in memo:
                    memo[ntiles] = self._b_rows(B, ntiles, self._buffer(
                        staging, "_b_rows", (self.nK * self.Kc * ntiles + 1, self.L), np.int8))
                out = self._buffer(staging, name, (ws, len(tiles) * self.nK, per_slice, self.L), np.int8, zero=False)
                # (mode "clip": an out= take with the default "raise" is buffered, twice the copy; the
                # index is built in range)
                np.take(memo[ntiles], idx, axis=0, out=out.reshape(-1, self.L), mode="clip")
                return {name: out}
            return f8

        def f(A, B, memo, staging=None):
            out = np.zeros((ws, len(tiles) * self.nK, per_slice, self.L), dtype=np.uint8)
            rows = self._all_weight_rows(B, tiles)          # [tiles, nK, R, L]
            for j in range(ws):                             # byte-row r goes to slice r % ws, row r // ws
                mine = rows[:, :, j::ws]
                out[j, :, : mine.shape[2]] = mine.reshape(-1, mine.shape[2], self.L)
            return {name: out.view(np.int8)}
        return f

    def _b_rows(self, B, ntiles, rows):
        """int8 B zero-padded to [nK * Kc, ntiles * L], as rows of L bytes, plus one zero row last, in
        ``rows`` (zero past B's part: only B's part is written)."""
        L, Kc, nK = self.L, self.Kc, self.nK
        grid = rows[:-1].reshape(nK * Kc, ntiles * L)
        part = B[:, : ntiles * L]
        grid[: part.shape[0], : part.shape[1]] = part
        return rows

    def _b_rows_index(self, tiles, per_slice):
        """For int8 weights: the row of :meth:`_b_rows` each vector of a B tensor holds, in its order
        [slice j, tile, K-chunk, row i]: weight row j + i * ws of the chunk (the zero row past it)."""
        Kc, nK, ws = self.Kc, self.nK, self.ws
        ntiles = -(-self.N // self.L)
        k_in = np.arange(ws)[:, None] + np.arange(per_slice)[None, :] * ws             # [j, i]
        tile = np.asarray(list(tiles), dtype=np.int64)[None, :, None, None]
        kc = np.arange(nK)[None, None, :, None]
        rows = (kc * Kc + k_in[:, None, None, :]) * ntiles + tile                     # [j, tile, kc, i]
        return np.where(k_in[:, None, None, :] < Kc, rows, nK * Kc * ntiles).reshape(-1)

    def _all_weight_rows(self, B, tiles):
        """The weight-buffer byte-rows of every (column tile, K-chunk), uint8 [len(tiles), nK, R, L]
        (zero padding past K and N): int8 weight row k is byte-row k; float16 weight row k is
        byte-rows 2k (low bytes) and 2k + 1 (high bytes)."""
        L, Kc, nK = self.L, self.Kc, self.nK
        Bp = np.zeros((nK * Kc, (max(tiles) + 1) * L), dtype=B.dtype)
        part = B[:, : Bp.shape[1]]
        Bp[: part.shape[0], : part.shape[1]] = part
        t = list(tiles)
        pick = slice(t[0], t[-1] + 1) if t == list(range(t[0], t[-1] + 1)) else t     # a view when consecutive
        blk = Bp.reshape(nK, Kc, -1, L)[:, :, pick].transpose(2, 0, 1, 3)   # [tiles, nK, Kc, L]
        if not self.fp16:
            return blk.view(np.uint8)                       # a strided view: the caller copies once
        bits = blk.view(np.uint16)
        rows = np.empty((len(tiles), nK, self.R, L), dtype=np.uint8)
        rows[:, :, 0::2] = (bits & 0xFF).astype(np.uint8)
        rows[:, :, 1::2] = (bits >> 8).astype(np.uint8)
        return rows

    def _unpack_all(self, unpackers, chip, staging):
        out_np = dt.get(self.out).numpy
        C = np.zeros((self.M, self.N), dtype=out_np)
        L = self.L
        for name, rows, tiles in unpackers:
            if not tiles:
                continue
            shape = (len(tiles), len(rows), L)
            Cp = chip.read_tensor(name, out=None if staging is None else self._buffer(staging, name, shape, out_np))
            at = _row_index(rows)
            for ti, tile in enumerate(tiles):
                c0 = tile * L
                w = min(L, self.N - c0)
                C[at, c0:c0 + w] = Cp[ti, :, :w]
        return C
