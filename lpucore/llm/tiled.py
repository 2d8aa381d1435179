"""Attention over a long KV cache whose keys are kept with their positions on the lanes.

For a cache of ``S > TILE`` positions the step program (:mod:`lpucore.llm.program`) keeps the keys of layer
``l`` as ``T = ceil(S / TILE)`` tiles of ``[D, TILE]`` float16 (``D = Hkv * hd``): the state ``k<l> [T * D,
TILE]``, tile ``t`` rows ``t * D .. t * D + D - 1``, ``K[t * D + d, c] = key of position t * TILE + c, lane d``.
The values stay one row per position, ``v<l> [T * TILE, D]`` (rows past ``S`` are never written). Both are
then MXM weights in the orientation the two products need, and the host never sees the difference:

* scores: ``Q' @ K_t`` for every tile ``t`` (one batched product, the keys streamed through the MXM once),
  where ``Q' [G * Hkv, D]`` holds query row ``j`` on head ``h``'s lanes in row ``j * Hkv + h`` (the query
  times the 0/1 lane-to-head matrix: exact) -> ``[T, G * Hkv, TILE]``, every head's score at every
  position, float32 sums of exact float16 products;
* softmax across the positions (rows of tiles, then lanes), weights ``p = e / sum e`` rounded to float16;
* output: ``P @ V`` (the values as weights) -> ``[G * Hkv, D]``, of which row ``j * Hkv + h`` is kept on
  head ``h``'s lanes (a 0/1 mask and a sum over rows: exact).

Writing a new key is writing one lane (its position's) of ``D`` vectors: the tile's rows are read by
:meth:`Graph.gather_blocks` at the run-time tile index, blended with the new column and written back by
:meth:`Graph.scatter_blocks` (one MEM ``Gather`` and ``Scatter`` per vector, no other vector moves). The
column ``C[d, c] = k[d]`` at the position's lane is built with no lane move: per block of ``w`` key lanes,
the key row times a repeated identity is ``diag(k)`` (B of them side by side for a prompt chunk's B rows),
and its product with the position's one-hot row repeated over ``w`` rows puts ``k[d]`` on row ``d`` at its
lane (exact: one non-zero product per output). A prompt chunk's B positions span at most two tiles, so a
chunk reads and writes two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

import numpy as np

from ..graph import Graph, Tensor

F16, F32 = np.float16, np.float32
TILE = 320           # cache positions per key tile (the GroqChip's lanes)
MASK = -1e9          # additive attention mask of future cache columns: exp(MASK - max) == 0 exactly


def tiles_of(capacity: int) -> int:
    """Key tiles of a cache of ``capacity`` positions."""
    return -(-int(capacity) // TILE)


@dataclass
class Tiles:
    """Per-step values shared by every layer (module docstring): ``Sq`` sequences of ``Br`` rows each, one of
    them with ``Br`` consecutive positions (``Br = 1``: a decode step; more: a prompt chunk), or ``Sq`` of one
    row each whose caches are stacked in one state (sequence ``s``'s tiles ``s * T ..``)."""

    pos: Tensor                 # int32 [Sq * Br] the rows' value-cache rows (positions, plus s * T * TILE stacked)
    blocks: Tensor              # int32 [m] the key tiles written (one per stacked sequence; one or two for a chunk)
    keep: Tensor                # float16 [m, 1, TILE]: 0 on the lanes the step writes in block j, else 1
    spread: Dict[int, Tensor]   # w -> float16: one-hot rows repeated over w rows ([m, Br * w, TILE])
    mask: Tensor                # float32 [Sq, T, Br, 1, TILE]: MASK after each row's position, else 0
    seqs: int = 1


def _const(g: Graph, consts: Dict[str, Tensor], name: str, arr: np.ndarray) -> Tensor:
    if name not in consts:
        consts[name] = g.constant(name, arr)
    return consts[name]


def _tile_of(g: Graph, posf: Tensor) -> Tensor:
    """float32: the tile of each position: rint((p - 159.5) / 320) is exact for integer p (the fraction stays
    within 0.4985 of the tile), float32 holding every position below 2^24."""
    return g.cast(g.cast(g.mul(g.sub(posf, (TILE - 1) / 2), 1.0 / TILE), "int32"), "float32")


def _last_of_equal(g: Graph, consts: Dict[str, Tensor], posf: Tensor, rows_pos: Tensor) -> Tensor:
    """float32 ``[B, 1]``: 0 for a row whose position a later row repeats (the later row wins, as
    Graph.scatter's), else 1."""
    B = posf.shape[0]
    same = g.sub(1.0, g.minimum(g.abs(g.sub(g.reshape(posf, (1, B)), rows_pos)), 1.0))              # [B, B]
    later = g.sum(g.mul(same, _const(g, consts, f"tile_later_{B}", np.triu(np.ones((B, B), F32), 1))),
                  axis=-1, keepdims=True)
    return g.sub(1.0, g.minimum(later, 1.0))


def tile_values(g: Graph, consts: Dict[str, Tensor], pos: Tensor, posf: Tensor, capacity: int, D: int,
                stacked: bool = False) -> Tiles:
    """:class:`Tiles` for the rows at positions ``pos`` (int32 ``[B]``; ``posf`` the same in float32): ``B``
    consecutive positions of one sequence, or (``stacked``) one position of each of ``B`` sequences whose
    caches are stacked, with keys of ``D`` lanes; ``consts`` caches the graph's constants by name."""
    B, T = pos.shape[0], tiles_of(capacity)
    widths = key_widths(D)
    lanes = _const(g, consts, "tile_lanes", np.arange(TILE, dtype=F32).reshape(1, TILE))
    rows_pos = g.reshape(posf, (B, 1))
    Sq, Br = (B, 1) if stacked else (1, B)
    if stacked:
        tile_f = _tile_of(g, posf)                                                                  # [B]
        offs = _const(g, consts, f"tile_seqs_{B}", np.arange(B, dtype=F32) * T)
        blocks = g.cast(g.add(tile_f, offs), "int32")
        starts = [g.reshape(tile_f, (B, 1))]                                     # each row's tile, [B, 1]
        rows = g.cast(g.add(posf, g.mul(offs, float(TILE))), "int32")          # value rows s * T * TILE + p
    else:
        first = _tile_of(g, g.slice(posf, (slice(0, 1),)) if B > 1 else posf)                       # [1]
        m = 1 if B == 1 else 2
        blocks = g.cast(g.add(first, _const(g, consts, "tile_steps_2", np.arange(2, dtype=F32))), "int32") \
            if m > 1 else g.cast(first, "int32")
        starts = [g.add(first, float(j)) for j in range(m)]
        rows = pos
    last = _last_of_equal(g, consts, posf, rows_pos) if Br > 1 else None
    hits = []
    for start in starts:
        # one-hot [B, TILE]: 1 where the tile's lane holds row i's position (integers: exact)
        hit = g.sub(1.0, g.minimum(g.abs(g.sub(g.add(g.mul(start, float(TILE)), lanes), rows_pos)), 1.0))
        hits.append(hit if last is None else g.mul(hit, last))
    oh = g.cast(hits[0] if len(hits) == 1 else g.concat(hits, axis=0), "float16")                  # [m Br, TILE]
    m = len(starts) * (B if stacked else 1)
    if Br > 1:
        keep = g.sub(1.0, g.concat([g.sum(h, axis=-2, keepdims=True) for h in hits], axis=0))     # [m, TILE]
    else:
        keep = g.sub(1.0, hits[0])
    keep16 = g.reshape(g.cast(keep, "float16"), (m, 1, TILE))
    spread = {}
    for w in widths:
        ones = _const(g, consts, f"tile_rows_{w}", np.ones((1, w, TILE), F16))
        spread[w] = g.reshape(g.mul(g.reshape(oh, (m * Br, 1, TILE)), ones), (m, Br * w, TILE))
    iota = _const(g, consts, "tile_positions", np.arange(T * TILE, dtype=F32).reshape(1, T, 1, 1, TILE))
    after = g.minimum(g.maximum(g.sub(iota, g.reshape(posf, (Sq, 1, Br, 1, 1))), 0.0), 1.0)
    return Tiles(rows, blocks, keep16, spread, g.mul(after, MASK), Sq)


def key_widths(D: int) -> List[int]:
    """The widths of the blocks of ``TILE`` key lanes the new key columns are built in."""
    return sorted({min(TILE, D - c0) for c0 in range(0, D, TILE)})


def _key_columns(g: Graph, consts: Dict[str, Tensor], k16: Tensor, tl: Tiles) -> Tensor:
    """float16 ``[m, D, TILE]``: the new keys ``k16 [B, D]`` as columns of each written tile ``j`` (row ``d``
    holds ``k_i[d]`` at the lane of row i's position when it lies in that tile, else 0; exact). Per block
    of ``w`` key lanes, ``diag`` holds the rows' keys side by side (``[w, Br * w]``: the keys times a
    repeated identity) and its product with the one-hot rows repeated over ``w`` rows places them. (One
    product of all blocks' rows, ``[D, TILE]`` against one weight tile, measured slower on the 7B
    attention chip: 42,119 cycles against 37,581; the blocks' products run on several MXM planes.)"""
    B, D = k16.shape
    Br = B // tl.seqs
    parts = []
    for c0 in range(0, D, TILE):
        w = min(TILE, D - c0)
        kc = g.slice(k16, (slice(None), slice(c0, c0 + w))) if w < D else k16
        eye = _const(g, consts, f"tile_eye_{Br}_{w}", np.tile(np.eye(w, dtype=F16), (1, Br)))
        if tl.seqs > 1:                  # stacked: sequence s writes its own tile only
            diag = g.mul(g.reshape(kc, (B, 1, w)), eye)                                            # [B, w, w]
        else:
            diag = g.mul(g.reshape(kc, (1, B * w)) if B > 1 else kc, eye)                           # [w, B w]
        parts.append(g.matmul(diag, tl.spread[w], out_dtype="float16"))                             # [m, w, TILE]
    return parts[0] if len(parts) == 1 else g.concat(parts, axis=1)


def write_keys(g: Graph, consts: Dict[str, Tensor], K: Tensor, k16: Tensor, tl: Tiles) -> Tensor:
    """The key tiles ``K [T * D, TILE]`` with the new keys ``k16 [B, D]`` written at their positions: the
    tiles read, the new columns blended in (exact: ``old * keep + new``, one of the two 0), written back."""
    D = k16.shape[1]
    old = g.gather_blocks(K, tl.blocks, D)                                                         # [m, D, TILE]
    return g.scatter_blocks(K, tl.blocks, g.add(g.mul(old, tl.keep), _key_columns(g, consts, k16, tl)))


def scores_and_mix(g: Graph, consts: Dict[str, Tensor], q16: Tensor, K: Tensor, V: Tensor, seg_t: Tensor, tl: Tiles,
                   hd: int) -> Tensor:
    """Attention output float32 ``[R, 1, D]`` for the query rows ``q16 [R, 1, D]`` (float16; ``R = Sq * Br * G``,
    row ``(s * Br + b) * G + j``) over the key tiles ``K [Sq * T * D, TILE]`` and values ``V [Sq * T * TILE, D]``
    (module docstring); ``seg_t`` float16 ``[Hkv, D]`` the head-to-lanes matrix."""
    R, D = q16.shape[0], q16.shape[-1]
    Hkv = seg_t.shape[0]
    Sq, T, Br = tl.seqs, tl.mask.shape[1], tl.mask.shape[2]
    N = R // (Sq * Br) * Hkv
    rows = [g.mul(g.reshape(g.slice(q16, (slice(r, r + 1), slice(None), slice(None))), (1, D)), seg_t)
            for r in range(R)] if R > 1 else [g.mul(g.reshape(q16, (1, D)), seg_t)]
    Qp = rows[0] if R == 1 else g.concat(rows, axis=0)                                              # [R Hkv, D]
    if Sq > 1:
        Qp = g.reshape(Qp, (Sq, 1, Br * N, D))
    sc = g.matmul(Qp, g.reshape(K, (Sq, T, D, TILE)), out_dtype="float32")                    # [Sq, T, Br N, TILE]
    sc = g.add(g.mul(g.reshape(sc, (Sq, T, Br, N, TILE)), float(1.0 / math.sqrt(hd))), tl.mask)
    st = g.transpose(sc, (0, 2, 3, 1, 4))                                                     # [Sq, Br, N, T, TILE]
    mx = g.max(g.max(st, axis=-2, keepdims=True), axis=-1, keepdims=True)
    e = g.exp(g.sub(st, mx))
    total = g.sum(g.sum(e, axis=-2, keepdims=True), axis=-1, keepdims=True)
    P = g.reshape(g.cast(g.div(e, total), "float16"), (Sq, Br * N, T * TILE))
    out = g.matmul(P, g.reshape(V, (Sq, T * TILE, D)), out_dtype="float32")                        # [Sq, Br N, D]
    if "tile_heads" not in consts:
        consts["tile_heads"] = g.cast(seg_t, "float32")
    return g.sum(g.mul(g.reshape(out, (R, Hkv, D)), consts["tile_heads"]), axis=-2, keepdims=True)   # [R, 1, D]
