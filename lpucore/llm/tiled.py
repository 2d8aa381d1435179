"""Attention over a long KV cache kept in tiles, with the positions on the lanes.

For a cache of ``S > TILE`` positions the step program (:mod:`lpucore.llm.program`) keeps layer ``l``'s keys
as ``T = ceil(S / TILE)`` tiles of ``[D, TILE]`` float16 (``D = Hkv * hd``): the state ``k<l> [T * D, TILE]``,
``K[t * D + d, c]`` = lane ``d`` of the key of position ``t * TILE + c``; and its values as column tiles:
``v<l> [nC * T * TILE, TILE]``, row ``c * T * TILE + p`` = lanes ``c * TILE ..`` of the value of position
``p`` (``nC = ceil(D / TILE)``; rows past ``S`` are never written). Both products then take the cache as MXM
weights, head by head, and the host never sees the difference:

* scores: each head's query rows against its own ``hd`` rows of every key tile (one batched product
  ``[Hkv, G, hd] @ [T, Hkv, hd, TILE]``): every head's score at every position, float32 sums of exact
  float16 products, masked from the row's own position on;
* the row's own key: the exact float32 products ``q * k`` split into float16 ``hi + lo`` and summed by the
  MXM (a ones matrix), so the step reads the cache *before* it writes the new key and value;
* softmax across the positions (rows of tiles, then lanes) and the own score, weights ``p = e / sum e``
  rounded to float16;
* output: per value column tile, only the rows of the 2-3 heads its lanes hold against the tile (one
  batched product), each row's head's lanes kept (a 0/1 mask and a sum over the heads: exact), plus
  the own value weighted (the weight spread over its head's lanes by a product with the head-to-lanes
  matrix, exact).

Writing a new key is writing one lane (its position's) of ``D`` vectors: the tile's rows are read by
:meth:`Graph.gather_blocks` at the run-time tile index, blended with the new column and written back by
:meth:`Graph.scatter_blocks` (one MEM ``Gather`` and ``Scatter`` per vector, no other vector moves). The
column ``C[d, c] = k[d]`` at the position's lane is built with no lane move: per block of ``w`` key lanes,
the key row times a repeated identity is ``diag(k)`` (B of them side by side for a prompt chunk's B rows),
and its product with the position's one-hot row repeated over ``w`` rows puts ``k[d]`` on row ``d`` at its
lane (exact: one non-zero product per output); of equal positions the later row wins. A value is one row
per column tile, written by :meth:`Graph.scatter`. A prompt chunk's B positions span at most two tiles,
so a chunk reads and writes two, before its attention (its rows see each other's keys); stacked
sequences (a batch's caches in one state) write one tile each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

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

    pos: Tensor                 # int32 [Sq * Br * nC] the value-cache rows of each row's column tiles (write_values)
    blocks: Tensor              # int32 [m] the key tiles written (one per stacked sequence; one or two for a chunk)
    keep: Tensor                # float16 [m, 1, TILE]: 0 on the lanes the step writes in block j, else 1
    spread: Dict[int, Tensor]   # w -> float16: one-hot rows repeated over w rows ([m, Br * w, TILE])
    mask: Tensor                # float32 [Sq, T, Br, 1, TILE]: MASK from each row's position on, else 0
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
        base = g.add(posf, g.mul(offs, float(TILE * value_tiles(D))))         # s * nC * T * TILE + p
    else:
        first = _tile_of(g, g.slice(posf, (slice(0, 1),)) if B > 1 else posf)                       # [1]
        m = 1 if B == 1 else 2
        blocks = g.cast(g.add(first, _const(g, consts, "tile_steps_2", np.arange(2, dtype=F32))), "int32") \
            if m > 1 else g.cast(first, "int32")
        starts = [g.add(first, float(j)) for j in range(m)]
        base = posf
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
    # the row's own position too: its key and value come from the step's rows (scores_and_mix)
    after = g.minimum(g.maximum(g.add(g.sub(iota, g.reshape(posf, (Sq, 1, Br, 1, 1))), 1.0), 0.0), 1.0)
    nC = value_tiles(D)
    cols = _const(g, consts, f"tile_value_rows_{nC}_{T}", (np.arange(nC, dtype=F32) * T * TILE).reshape(1, nC))
    rows = g.reshape(g.cast(g.add(g.reshape(base, (B, 1)), cols), "int32"), (B * nC,))             # (b, c)
    return Tiles(rows, blocks, keep16, spread, g.mul(after, MASK), Sq)


def value_tiles(D: int) -> int:
    """Column tiles of ``TILE`` lanes of a value row of ``D`` lanes (the value cache keeps each apart)."""
    return -(-int(D) // TILE)


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
    tiles read, the new columns blended in (exact: ``old * keep + new``, one of the two 0), written back.
    The compiler schedules in graph order, and this order is the fastest measured on the attention chip of
    Llama-2-7B at 2,048 positions: 28,921 cycles; with the read after the columns 30,564, with every
    block's diagonal made before the first product 30,308."""
    old = g.gather_blocks(K, tl.blocks, k16.shape[1])                                              # [m, D, TILE]
    return g.scatter_blocks(K, tl.blocks, g.add(g.mul(old, tl.keep), _key_columns(g, consts, k16, tl)))


def write_values(g: Graph, consts: Dict[str, Tensor], V: Tensor, v16: Tensor, tl: Tiles) -> Tensor:
    """The value cache ``V [Sq * nC * T * TILE, TILE]`` (column tile ``c`` of position ``p`` of sequence ``s`` at
    row ``(s * nC + c) * T * TILE + p``) with the rows ``v16 [B, D]`` written at their positions: one row per
    column tile, by MEM Scatter."""
    B, D = v16.shape
    nC = value_tiles(D)
    if nC * TILE > D:
        v16 = g.concat([v16, _const(g, consts, f"tile_pad_{B}_{nC * TILE - D}",
                                    np.zeros((B, nC * TILE - D), F16))], axis=-1)
    return g.scatter(V, tl.pos, g.reshape(v16, (B * nC, TILE)))


def _windows(Hkv: int, hd: int, nC: int) -> Tuple[int, List[int]]:
    """(Hc, first heads): each value column tile's lanes lie in the ``Hc`` heads from its first head."""
    spans = [((c * TILE) // hd, min(Hkv - 1, (c * TILE + TILE - 1) // hd)) for c in range(nC)]
    Hc = max(b - a + 1 for a, b in spans)
    return Hc, [min(a, Hkv - Hc) for a, _ in spans]


def scores_and_mix(g: Graph, consts: Dict[str, Tensor], q16: Tensor, k16: Tensor, v16: Tensor, K: Tensor, V: Tensor,
                   Hkv: int, tl: Tiles) -> Tensor:
    """Attention output float32 ``[R, 1, D]`` for the query rows ``q16 [R, 1, D]`` (float16; ``R = Sq * Br * G``,
    row ``(s * Br + b) * G + j``) over the key tiles ``K [Sq * T * D, TILE]`` and the value column tiles ``V``
    (:func:`write_values`) at the positions before each row's own, and the row's own key and value (``k16,
    v16 [Sq * Br, D]``), so that a step reads the cache before it writes the new key and value (module
    docstring); ``Hkv`` heads of ``D / Hkv`` lanes."""
    R, D = q16.shape[0], q16.shape[-1]
    hd = D // Hkv
    Sq, T, Br = tl.seqs, tl.mask.shape[1], tl.mask.shape[2]
    G = R // (Sq * Br)
    st, own = _scores(g, consts, q16, k16, K, Hkv, tl)          # [Sq, Br, Hkv, G, T, TILE], [.., 1, TILE]
    # softmax over the tiles' positions (rows of tiles, then lanes) and the own key (in every lane of own)
    mx = g.max(g.maximum(g.max(st, axis=-2, keepdims=True), own), axis=-1, keepdims=True)
    e, e_own = g.exp(g.sub(st, mx)), g.exp(g.sub(own, mx))
    lane0 = _const(g, consts, "tile_lane0", (np.arange(TILE) == 0).astype(F32).reshape(1, TILE))
    total = g.sum(g.add(g.sum(e, axis=-2, keepdims=True), g.mul(e_own, lane0)), axis=-1, keepdims=True)
    P = g.reshape(g.cast(g.div(e, total), "float16"), (Sq, Br, Hkv, G, T * TILE))
    out = _mix(g, consts, P, V, D, Hkv)                                                             # [R, 1, D]
    # the own value: each head's weight spread over its lanes (a product with the head-to-lanes matrix)
    w_own = g.reshape(g.transpose(g.div(e_own, total), (0, 1, 3, 2, 4, 5)), (Sq, Br, G, Hkv, TILE))
    heads = _const(g, consts, f"tile_head_lanes_{Hkv}", np.eye(Hkv, TILE, dtype=F32))
    at_h = g.slice(g.sum(g.mul(w_own, heads), axis=-2, keepdims=True),
                   (slice(None),) * 4 + (slice(0, Hkv),))                                   # [Sq, Br, G, 1, Hkv]
    seg_t = _const(g, consts, f"tile_spread_{Hkv}_{hd}", np.repeat(np.eye(Hkv, dtype=F16), hd, axis=1))
    spread = g.matmul(g.cast(g.reshape(at_h, (R, 1, Hkv)), "float16"), seg_t, out_dtype="float32")  # [R, 1, D]
    mine = g.mul(g.reshape(spread, (Sq * Br, G, 1, D)), g.cast(g.reshape(v16, (Sq * Br, 1, 1, D)), "float32"))
    return g.add(out, g.reshape(mine, (R, 1, D)))


def _mix(g: Graph, consts: Dict[str, Tensor], P: Tensor, V: Tensor, D: int, Hkv: int) -> Tensor:
    """float32 ``[R, 1, D]``: the weights ``P [Sq, Br, Hkv, G, S']`` times the value column tiles: per column
    tile, only the rows of the ``Hc`` heads its lanes lie in (one batched product, the tiles as weights), each
    row's head's lanes kept (a 0/1 mask and a sum over the heads)."""
    Sq, Br, _, G, Sp = P.shape
    hd, nC = D // Hkv, value_tiles(D)
    Hc, firsts = _windows(Hkv, hd, nC)
    parts = [g.reshape(g.slice(P, (slice(None), slice(None), slice(h0, h0 + Hc))), (Sq, 1, Br * Hc * G, Sp))
             for h0 in firsts]
    A = parts[0] if nC == 1 else g.concat(parts, axis=1)                                 # [Sq, nC, Br Hc G, S']
    out = g.matmul(A, g.reshape(V, (Sq, nC, Sp, TILE)), out_dtype="float32")          # [Sq, nC, Br Hc G, TILE]
    lanes = np.arange(nC * TILE).reshape(nC, 1, TILE)
    sel = (lanes // hd == np.array(firsts).reshape(nC, 1, 1) + np.arange(Hc).reshape(1, Hc, 1)) & (lanes < D)
    mask = _const(g, consts, f"tile_value_heads_{D}_{Hkv}", sel.astype(F32).reshape(1, nC, 1, Hc, 1, TILE))
    picked = g.transpose(g.mul(g.reshape(out, (Sq, nC, Br, Hc, G, TILE)), mask), (0, 2, 4, 1, 3, 5))
    rows = g.reshape(g.sum(picked, axis=-2), (Sq * Br * G, nC * TILE))                             # [Sq Br G, nC TILE]
    if nC * TILE > D:
        rows = g.slice(rows, (slice(None), slice(0, D)))
    return g.reshape(rows, (Sq * Br * G, 1, D))


def _per_head(g: Graph, x: Tensor, Sq: int, n: int, Hkv: int) -> Tensor:
    """``x [Sq * n, D]`` (rows (s, i), lanes (h, d)) as ``[Sq, Hkv, n, hd]`` (each head's lanes a row)."""
    hd = x.shape[-1] // Hkv
    return g.transpose(g.reshape(x, (Sq, n, Hkv, hd)), (0, 2, 1, 3))


def _scores(g: Graph, consts: Dict[str, Tensor], q16: Tensor, k16: Tensor, K: Tensor, Hkv: int, tl: Tiles
            ) -> Tuple[Tensor, Tensor]:
    """The scaled scores of :func:`scores_and_mix`, head by head (each head's query rows against its own
    ``hd`` rows of a key tile: one batched product): over the tiles, masked from each row's own position on
    (``[Sq, Br, Hkv, G, T, TILE]``), and against the row's own key, in every lane (``[Sq, Br, Hkv, G, 1,
    TILE]``): the exact float32 products ``q * k``, split into float16 ``hi + lo`` and summed by the MXM."""
    R, D = q16.shape[0], q16.shape[-1]
    hd = D // Hkv
    Sq, T, Br = tl.seqs, tl.mask.shape[1], tl.mask.shape[2]
    G = R // (Sq * Br)
    scale = float(1.0 / math.sqrt(hd))
    qh = _per_head(g, g.reshape(q16, (R, D)), Sq, Br * G, Hkv)                                    # [Sq, Hkv, Br G, hd]
    sc = g.matmul(g.reshape(qh, (Sq, 1, Hkv, Br * G, hd)), g.reshape(K, (Sq, T, Hkv, hd, TILE)),
                  out_dtype="float32")                                                  # [Sq, T, Hkv, Br G, TILE]
    sc = g.add(g.mul(g.reshape(sc, (Sq, T, Hkv, Br, G, TILE)), scale), g.reshape(tl.mask, (Sq, T, 1, Br, 1, TILE)))
    st = g.transpose(sc, (0, 3, 2, 4, 1, 5))                                            # [Sq, Br, Hkv, G, T, TILE]
    kh = _per_head(g, k16, Sq, Br, Hkv)                                                             # [Sq, Hkv, Br, hd]
    prod = g.mul(g.cast(g.reshape(qh, (Sq, Hkv, Br, G, hd)), "float32"),
                 g.cast(g.reshape(kh, (Sq, Hkv, Br, 1, hd)), "float32"))                            # exact
    hi = g.cast(prod, "float16")
    lo = g.cast(g.sub(prod, g.cast(hi, "float32")), "float16")
    ones = _const(g, consts, f"tile_sum_{hd}", np.ones((hd, TILE), F16))
    own = g.add(g.matmul(hi, ones, out_dtype="float32"), g.matmul(lo, ones, out_dtype="float32"))
    own = g.transpose(g.mul(own, scale), (0, 2, 1, 3, 4))                                   # [Sq, Br, Hkv, G, TILE]
    return st, g.reshape(own, (Sq, Br, Hkv, G, 1, TILE))
