"""A decoder's model split into pipeline stages, one chip per stage, on a :class:`lpucore.System`.

The model is a sequence of *units* (:func:`lpucore.llm.program.model_units`): the embedding, each
layer's attention block and MLP (or mixture-of-experts) block, and the head. A stage is a run of
consecutive units; :func:`plan_stages` cuts the sequence by SRAM bytes (:func:`unit_bytes`), so a
7B-parameter layer whose attention and MLP together overflow a GroqChip's 230 MB take a chip each.

Stages that hold the same units relative to their first layer (every "attention of one layer"
stage of Llama-2-7B, say) build the same graph, up to the weights' values: constants and KV-cache
states are named by layer index relative to the stage (:class:`~lpucore.llm.program.StepBuilder`).
So each distinct stage is compiled once and its program serves every chip that holds such a stage,
each chip with its own weights written into the same addresses. :meth:`PipelineDecoder.compile`
checks that every shared stage's graph has exactly the compiled one's structure
(:func:`graph_structure`: operations, their attributes, constant names, shapes and dtypes) and
the same values for any constant the compiler folded into an instruction, so sharing cannot
change a value; the tests check that tiny models give the single-chip logits bit for bit.

Blocks bigger than a stage are cut into shards (:func:`mlp_shards`, :func:`table_shards`): an
MLP into ranges of hidden features, a mixture of experts into ranges of experts (the partial sum
travels with the residual as ``[2, d]``), the embedding table and the head into ranges of tokens.

With ``parallel_shards`` the shards of a block run *side by side* instead, each on a chip of its own: a
layer's attention cut by kv heads (:func:`attn_shards`: each shard its heads' q, k, v columns, o rows and
KV cache) and its MLP or experts. Each chip of a group takes the residual from the chip (or the group)
before it, over a link of its own, and sends its part on; shard 0 sends the residual with its part. A
chip after a group adds the parts in shard order (:func:`~lpucore.llm.program.build_step`), so with
experts side by side the bits are those of the experts in a row. A layer then costs its slowest shard of
each group, not their sum; a chip between two groups of t shards uses 2t links (at most ``c2c_links``).

The residual stream (float32 ``[1, d_model]``) goes from stage to stage over a C2C link (each chip's
links numbered in turn, :attr:`PipelineDecoder.wires`), scheduled by
:func:`lpucore.compiler.pipeline.plan_sends` and :func:`~lpucore.compiler.pipeline.plan_receives` as soon as
the residual is written (``early``: a stage's KV cache write, which nothing of the step waits for, runs
on while the next stages work), so a step's cycles are each stage's cycles until its residual leaves
plus the transfers, and the last stage's, known before the run. Every stage keeps the KV cache of its
own attention blocks.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CompileError, LpuError, ModelDoesNotFit
from . import tiled
from .program import attn_shard_config, build_step, group_start, model_units, shard_range, side_by_side, tiled_cache
from .reference import choose_token

if TYPE_CHECKING:
    from ..compiler.lower import Compiled
    from ..system import System

#: fraction of a chip's SRAM a stage's weights and KV cache may fill (the rest holds the step's
#: temporaries: a Llama-2-7B layer, 205 MB of weights and cache, does not compile on a 230.7 MB GroqChip)
STAGE_FILL = 0.8


def _padded(rows: int, cols: int, itemsize: int, lanes: int) -> int:
    """Bytes of a [rows, cols] tensor in MEM: each row is whole 320-lane vectors."""
    return rows * -(-cols // lanes) * lanes * itemsize


def cache_bytes(cfg, capacity: int, lanes: int = 320) -> int:
    """SRAM bytes of one layer's KV cache for one sequence: float16 ``[S, Hkv * head_dim]`` keys and values
    (one row per position), or for a tiled cache (:func:`lpucore.llm.program.tiled_cache`) the key tiles
    ``[T * D, TILE]`` and the value column tiles ``[nC * T * TILE, TILE]`` (:mod:`lpucore.llm.tiled`)."""
    D = cfg.n_kv_heads * cfg.head_dim
    if not tiled_cache(capacity):
        return 2 * _padded(capacity, D, 2, lanes)
    T = tiled.tiles_of(capacity)
    return _padded(T * D, tiled.TILE, 2, lanes) + _padded(tiled.value_tiles(D) * T * tiled.TILE, tiled.TILE, 2, lanes)


def unit_bytes(cfg, precision: str, capacity: int, lanes: int = 320, block: int = 2560, shards: int = 1,
               table_shards: int = 1, attn_shards: int = 1) -> List[int]:
    """SRAM bytes each unit of :func:`model_units` keeps resident: its weights as the step program
    stores them (int8 blocks of ``block`` columns with float32 scales, or float16; float32 norm
    vectors; rows padded to whole vectors) and, for an attention block, its KV cache."""
    shapes = cfg.tensor_shapes()
    int8 = cfg.int8_tensors() if precision == "int8" else {}
    conv1d = cfg.family == "gpt2"

    def matrix(name, transpose, rows=None, cols=None):
        shape = shapes[name]
        K, N = (shape[1], shape[0]) if transpose else shape
        K = K if rows is None else rows[1] - rows[0]
        N = N if cols is None else cols[1] - cols[0]
        if name not in int8:
            return _padded(K, N, 2, lanes)
        return sum(_padded(K, min(block, N - c), 1, lanes) + _padded(1, min(block, N - c), 4, lanes)
                   for c in range(0, N, block))

    def vec(name):
        return _padded(1, shapes[name][0], 4, lanes)

    def table(name, rows=None):
        V, d = shapes[name]
        V = V if rows is None else rows[1] - rows[0]
        if name in int8:      # int8 rows, and the per-row scales and an iota as float32 rows
            return _padded(V, d, 1, lanes) + 2 * _padded(1, V, 4, lanes)
        return _padded(V, d, 2, lanes)

    def layer_tensors(i, kind):
        p = f"h.{i}." if conv1d else f"model.layers.{i}."
        names = [n for n in shapes if n.startswith(p)]
        if conv1d:
            own = ("ln_1", "attn.") if kind == "attn" else ("ln_2", "mlp.")
        else:
            own = ("input_layernorm", "self_attn.") if kind == "attn" else \
                ("post_attention_layernorm", "mlp.", "block_sparse_moe.")
        return [n for n in names if n[len(p):].startswith(own)]

    S = capacity
    out = []
    for u in model_units(cfg, shards, table_shards, attn_shards):
        kind, i = u[0], u[1]
        if len(u) == 4 and kind == "attn":       # its kv heads' and their query heads' rows and columns
            v = attn_shard_config(cfg, u[3])
            qd, kd = v.n_heads * v.head_dim, v.n_kv_heads * v.head_dim
            p = f"model.layers.{i}.self_attn."
            b = vec(f"model.layers.{i}.input_layernorm.weight") + cache_bytes(v, S, lanes)
            b += matrix(p + "q_proj.weight", True, cols=(u[2] * qd, (u[2] + 1) * qd))
            b += sum(matrix(p + f"{n}_proj.weight", True, cols=(u[2] * kd, (u[2] + 1) * kd)) for n in "kv")
            b += matrix(p + "o_proj.weight", True, rows=(u[2] * qd, (u[2] + 1) * qd))
        elif len(u) == 4 and kind == "embed":
            b = table(cfg.embedding_name, shard_range(cfg, u[2], u[3], kind))
        elif len(u) == 4 and kind == "head":
            b = vec("model.norm.weight") + matrix(cfg.head_name, True, cols=shard_range(cfg, u[2], u[3], kind))
        elif len(u) == 4:
            lo, hi = shard_range(cfg, u[2], u[3])
            p = f"model.layers.{i}."
            b = vec(p + "post_attention_layernorm.weight")
            if cfg.family == "mixtral":
                b += matrix(p + "block_sparse_moe.gate.weight", True)
                b += sum(matrix(f"{p}block_sparse_moe.experts.{e}.{n}.weight", True)
                         for e in range(lo, hi) for n in ("w1", "w2", "w3"))
            else:
                b += sum(matrix(p + f"mlp.{n}_proj.weight", True, cols=(lo, hi)) for n in ("gate", "up"))
                b += matrix(p + "mlp.down_proj.weight", True, rows=(lo, hi))
        elif kind == "embed":
            b = table(cfg.embedding_name)
            if conv1d:
                b += _padded(S, cfg.d_model, 2, lanes)          # learned positions
        elif kind == "head":
            norm = [n for n in ("ln_f.weight", "ln_f.bias", "model.norm.weight") if n in shapes]
            b = sum(vec(n) for n in norm) + matrix(cfg.head_name, True)
        else:
            b = sum(vec(n) if len(shapes[n]) == 1 else matrix(n, not conv1d) for n in layer_tensors(i, kind))
            if kind == "attn":
                b += cache_bytes(cfg, S, lanes)
        out.append(int(b))
    return out


#: float32 ``[G, S, Hkv * head_dim]`` tensors an attention block's step keeps live besides its cache
#: (``G`` query heads per kv head, ``S`` cache positions): the products ``q * K``, their float16 halves,
#: the probabilities spread over the lanes... Measured: a Llama-2-7B int8 attention block compiled
#: at 512 and 2,048 positions peaks at 43.3 and 84.2 MB above its unit_bytes, 26.6 kB more per
#: position, 1.63 such rows (16 kB each); the constant rest (30 MB) is what STAGE_FILL leaves over
#: (so that block at 2,048 positions plans at 182 MB of the 185 MB a stage may fill, and compiles at 213 MB)
ATTENTION_ROWS = 1.6
#: For a tiled cache (:mod:`lpucore.llm.tiled`) the temporaries are a few float16 ``[D, TILE]`` tiles (the
#: tile read, the new key columns, their diagonals, the blended tile) and float32 score rows ``[H, T * TILE]``
#: (``H`` query heads): measured on the Llama-2-7B int8 attention block at 512 and 2,048 positions (11.9
#: and 13.9 MB above its unit_bytes), 4.2 such tiles and 10 such rows.
ATTENTION_TILES, ATTENTION_SCORE_ROWS = 4.2, 10


def attention_bytes(cfg, capacity: int, lanes: int = 320) -> int:
    """SRAM bytes an attention block's step needs for its temporaries at ``capacity`` positions (freed when
    the block ends, so a stage needs the largest of its blocks', not their sum): :data:`ATTENTION_ROWS`
    float32 ``[G, S, Hkv * head_dim]`` tensors, rows padded to whole vectors; for a tiled cache
    :data:`ATTENTION_TILES` float16 key tiles and :data:`ATTENTION_SCORE_ROWS` float32 score rows."""
    G = cfg.n_heads // cfg.n_kv_heads
    D = cfg.n_kv_heads * cfg.head_dim
    if tiled_cache(capacity):
        T = tiled.tiles_of(capacity)
        return int(ATTENTION_TILES * _padded(D, tiled.TILE, 2, lanes)
                   + ATTENTION_SCORE_ROWS * _padded(cfg.n_heads, T * tiled.TILE, 4, lanes))
    return int(ATTENTION_ROWS * G * _padded(capacity, D, 4, lanes))


def unit_temps(cfg, capacity: int, lanes: int = 320, shards: int = 1, table_shards: int = 1,
               attn_shards: int = 1) -> List[int]:
    """Per unit of :func:`model_units`, the temporaries it needs beyond :data:`STAGE_FILL`'s margin while
    it runs: :func:`attention_bytes` for an attention block (or shard), 0 for the others."""
    att = attention_bytes(attn_shard_config(cfg, attn_shards) if attn_shards > 1 else cfg, capacity, lanes)
    return [att if u[0] == "attn" else 0 for u in model_units(cfg, shards, table_shards, attn_shards)]


def _greedy(sizes: Sequence[int], cap: float, temps: Optional[Sequence[int]] = None) -> List[Tuple[int, int]]:
    """Consecutive groups of units, each holding its units' ``sizes`` plus the largest of their ``temps``
    within ``cap`` bytes (a unit that alone exceeds it is a group of its own)."""
    temps = temps if temps is not None else [0] * len(sizes)
    groups, start, total, peak = [], 0, 0, 0
    for u, (b, t) in enumerate(zip(sizes, temps)):
        if u > start and total + b + max(peak, t) > cap:
            groups.append((start, u))
            start, total, peak = u, 0, 0
        total += b
        peak = max(peak, t)
    groups.append((start, len(sizes)))
    return groups


def _peak(cfg, precision: str, capacity: int, chip, block: int, shards: int, tables: int, attn: int,
          kinds: Sequence[str]) -> int:
    """The most SRAM (bytes: :func:`unit_bytes` plus :func:`unit_temps`) one unit of the given ``kinds``
    needs when the MLPs are cut in ``shards``, the tables in ``tables`` and the attention blocks in ``attn``."""
    units = model_units(cfg, shards, tables, attn)
    sizes = unit_bytes(cfg, precision, capacity, chip.lanes, block, shards, tables, attn)
    temps = unit_temps(cfg, capacity, chip.lanes, shards, tables, attn)
    return max(b + t for u, b, t in zip(units, sizes, temps) if u[0] in kinds)


def mlp_shards(cfg, precision: str, capacity: int, chip, block: int = 2560, fill: float = STAGE_FILL,
               kinds=("mlp",)) -> int:
    """How many shards each MLP (or mixture of experts) is cut into so that one fits a stage: 1 when
    it fits whole, else the fewest that fit (llama and mixtral; gpt2 is never cut). ``kinds=("embed",
    "head")``: the same for the embedding table and the head (:func:`table_shards`)."""
    cap = fill * chip.sram_bytes
    tables = kinds != ("mlp",)
    limit = cfg.vocab_size if tables else cfg.n_experts if cfg.family == "mixtral" else cfg.d_ff
    if cfg.family == "gpt2":
        return 1
    t = 1
    while t <= limit:
        if _peak(cfg, precision, capacity, chip, block, 1 if tables else t, t if tables else 1, 1, kinds) <= cap:
            return t
        t += 1
    return limit


def attn_shards(cfg, precision: str, capacity: int, chip, block: int = 2560, fill: float = STAGE_FILL) -> int:
    """How many attention shards (ranges of kv heads, side by side) each attention block is cut into so that
    one fits a stage with its cache and temporaries: 1 when it fits whole, else the fewest dividing the kv
    heads that fit (the most, the kv heads, if none does)."""
    cap = fill * chip.sram_bytes
    if cfg.family == "gpt2":
        return 1
    for t in (t for t in range(1, cfg.n_kv_heads + 1) if cfg.n_kv_heads % t == 0):
        if _peak(cfg, precision, capacity, chip, block, 1, 1, t, ("attn",)) <= cap:
            return t
    return cfg.n_kv_heads


def table_shards(cfg, precision: str, capacity: int, chip, block: int = 2560, fill: float = STAGE_FILL) -> int:
    """How many ranges of tokens the embedding table and the head are cut into (1 when both fit a stage;
    Llama-2-70B's 32000 x 8192 int8 table is 262 MB)."""
    return mlp_shards(cfg, precision, capacity, chip, block, fill, kinds=("embed", "head"))


def plan_stages(cfg, precision: str, capacity: int, chip, chips: Optional[int] = None, block: int = 2560,
                fill: float = STAGE_FILL, shards: Optional[int] = None,
                tables: Optional[int] = None, parallel_shards: bool = False,
                attn: int = 1) -> List[Tuple[int, int]]:
    """Unit ranges ``[(u0, u1), ...]`` of :func:`model_units` with ``shards`` (default
    :func:`mlp_shards`), one per chip.

    ``chips=None``: as few stages as hold at most ``fill`` x the chip's SRAM each (cut greedily in
    unit order). ``chips=N``: exactly N stages, as even in bytes as contiguous cuts allow. A stage's bytes
    are its units' :func:`unit_bytes` plus the largest of their :func:`unit_temps` (an attention block's
    temporaries grow with the cache, as its cache does). ``parallel_shards`` (``chips=None`` only): every
    MLP shard (and each of ``attn`` attention shards) a stage of its own, the shards of a layer side by side
    (:class:`PipelineDecoder`). Raises
    :class:`~lpucore.llm.ModelDoesNotFit` (saying how many chips it takes) when a stage overflows."""
    if shards is None:
        shards = mlp_shards(cfg, precision, capacity, chip, block, fill)
    if tables is None:
        tables = table_shards(cfg, precision, capacity, chip, block, fill)
    if attn > 1 and not parallel_shards:
        raise ValueError("attention shards run side by side only (parallel_shards=True)")
    sizes = unit_bytes(cfg, precision, capacity, chip.lanes, block, shards, tables, attn)
    temps = unit_temps(cfg, capacity, chip.lanes, shards, tables, attn)
    cap = fill * chip.sram_bytes
    least = len(_greedy(sizes, cap, temps))
    whole = [b + t for b, t in zip(sizes, temps)]
    if max(whole) > cap:
        u = int(np.argmax(whole))
        raise ModelDoesNotFit(
            f"{cfg.name} ({precision}): unit {model_units(cfg, shards, tables, attn)[u][:2]} alone needs "
            f"{whole[u] / 1e6:,.1f} MB of SRAM (" + (f"{sizes[u] / 1e6:,.1f} MB of weights and KV cache, "
                                                     f"{temps[u] / 1e6:,.1f} MB of attention temporaries at "
                                                     f"{capacity} positions" if temps[u] else "weights") +
            f"), more than a stage may fill on one {chip.name} ({fill:.0%} of {chip.sram_bytes / 1e6:,.1f} MB); "
            f"it needs tensor parallelism (attention shards side by side: PipelineDecoder(parallel_shards=True))")
    if parallel_shards and (shards > 1 or attn > 1):
        if chips is not None:
            raise ValueError("parallel_shards plans its own stages: give chips=None")
        return _alone(model_units(cfg, shards, tables, attn), sizes, cap, temps)
    if chips is None:
        return _greedy(sizes, cap, temps)
    n = int(chips)
    if not 1 <= n <= len(sizes):
        raise ValueError(f"{cfg.name} has {len(sizes)} units (embedding, attention and MLP blocks, head): "
                         f"1..{len(sizes)} chips, not {chips}")
    if n < least:
        raise ModelDoesNotFit(
            f"{cfg.name} ({precision}) with a {capacity}-token KV cache needs {least} x {chip.name} as pipeline "
            f"stages of at most {fill:.0%} of a chip's SRAM ({sum(sizes) / 1e6:,.1f} MB in all), not {n} "
            f"(Decoder(..., chips={least}) or chips='auto')")
    lo, hi = max(whole), sum(sizes) + max(temps)     # the smallest largest-stage size that n cuts achieve
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_greedy(sizes, mid, temps)) <= n:
            hi = mid
        else:
            lo = mid + 1
    groups = _greedy(sizes, lo, temps)
    while len(groups) < n:                   # fewer stages than chips: split the biggest splittable one
        k = max((k for k, (a, b) in enumerate(groups) if b - a > 1), key=lambda k: sum(sizes[slice(*groups[k])]))
        a, b = groups[k]
        m = (a + b) // 2
        groups[k:k + 1] = [(a, m), (m, b)]
    return groups


def plan_auto(cfg, precision: str, capacity: int, chip, block: int = 2560, fill: float = STAGE_FILL
              ) -> Tuple[List[Tuple[int, int]], bool]:
    """(stages, side by side) of ``chips="auto"``: :func:`plan_stages` in a row when every unit fits a stage,
    else with the shards side by side (an attention block cut by kv heads, :func:`attn_shards`); raises the
    row plan's :class:`~lpucore.llm.ModelDoesNotFit` when neither fits."""
    try:
        return plan_stages(cfg, precision, capacity, chip, None, block, fill), False
    except ModelDoesNotFit as e:
        if cfg.family == "gpt2":
            raise
        attn = attn_shards(cfg, precision, capacity, chip, block, fill)
        try:
            return plan_stages(cfg, precision, capacity, chip, None, block, fill, parallel_shards=True, attn=attn), True
        except ModelDoesNotFit:
            raise e from None


def plan_within(cfg, precision: str, capacity: int, chip, max_chips: int, block: int = 2560,
                fill: float = STAGE_FILL) -> Tuple[int, int]:
    """(MLP shards, attention shards) side by side for at most ``max_chips`` chips: of the cuts that fit (each
    shard a stage, :func:`plan_stages` with ``parallel_shards``), the one whose biggest shard (weights, cache
    and temporaries) is smallest, fewer chips on ties: at batch 1 a layer takes about as long as its biggest
    shard streams its weights. Raises :class:`~lpucore.llm.ModelDoesNotFit` when none fits the budget."""
    cap = fill * chip.sram_bytes
    limit = cfg.n_experts if cfg.family == "mixtral" else cfg.d_ff
    best: Optional[Tuple[int, int, int, int]] = None
    fewest = None
    for a in (t for t in range(1, cfg.n_kv_heads + 1) if cfg.n_kv_heads % t == 0):
        for m in range(1, limit + 1):
            attn = _peak(cfg, precision, capacity, chip, block, m, 1, a, ("attn",))
            biggest = max(attn, _peak(cfg, precision, capacity, chip, block, m, 1, a, ("mlp",)))
            if attn > cap:
                break                   # this cut of the attention does not fit, whatever the MLP's
            if biggest > cap:
                continue
            try:
                n = len(plan_stages(cfg, precision, capacity, chip, None, block, fill, m, None, m > 1 or a > 1, a))
            except ModelDoesNotFit:
                continue
            fewest = n if fewest is None else min(fewest, n)
            if n > max_chips:
                break                   # more MLP shards only take more chips
            if best is None or (biggest, n) < (best[0], best[1]):
                best = (biggest, n, m, a)
    if best is None:
        raise ModelDoesNotFit(f"{cfg.name} ({precision}) at {capacity} positions does not fit {max_chips} x "
                              f"{chip.name} with its shards side by side" +
                              (f" (the fewest it takes: {fewest})" if fewest is not None else ""))
    return best[2], best[3]


def _alone(units, sizes, cap, temps) -> List[Tuple[int, int]]:
    """:func:`_greedy`'s stages with every attention or MLP shard unit of ``units`` a stage of its own."""
    groups: List[Tuple[int, int]] = []
    a = 0
    for u, unit in enumerate(list(units) + [("end", None)]):
        if unit[0] == "end" or side_by_side(unit):
            if u > a:
                groups += [(a + x, a + y) for x, y in _greedy(sizes[a:u], cap, temps[a:u])]
            if unit[0] != "end":
                groups.append((u, u + 1))
            a = u + 1
    return groups


def stage_signature(cfg, units: Tuple[int, int], shards: int = 1, tables: int = 1, parallel: bool = False,
                    attn: int = 1) -> tuple:
    """What a stage's graph depends on besides the weights: its units, layers counted from its first
    (and for an MLP shard: whether it is its layer's first or last, and its size)."""
    every = model_units(cfg, shards, tables, attn)
    us = every[units[0]:units[1]]
    first = next((u[1] for u in us if u[1] is not None), 0)
    out = []
    for u in us:
        sig: tuple = (u[0], None if u[1] is None else u[1] - first)
        if len(u) == 4:
            lo, hi = shard_range(cfg, u[2], u[3], u[0])
            # side by side, only shard 0 differs (it sends the residual with its part)
            sig += (u[2] == 0, False if parallel else u[2] == u[3] - 1, hi - lo)
        out.append(sig)
    a = group_start(every, units[0]) if parallel else 0
    if a > 0 and side_by_side(every[a - 1]):
        out.append(("after shards", every[a - 1][3]))         # it takes their parts
    return tuple(out)


def graph_structure(graph) -> str:
    """Everything of a graph but its constants' values: two stages may share one compiled program
    only if this is equal (a slice position or a folded scalar would otherwise differ unseen)."""
    rows = [graph.name]
    for n in graph.nodes:
        rows.append(f"{n.op}{tuple(n.inputs)}->{n.output} {sorted((k, repr(v)) for k, v in n.attrs.items())}")
    for tid, arr in sorted(graph.constants.items()):
        rows.append(f"c{tid} {graph.constant_names.get(tid)} {arr.shape} {arr.dtype}"
                    + ("" if graph.constant_names.get(tid) else f" {arr.tobytes().hex()}"))
    for kind in ("inputs", "outputs", "states"):
        entries = sorted((k, t.id, tuple(t.shape), str(t.dtype)) for k, t in getattr(graph, kind).items())
        rows.append(f"{kind} {entries}")
    rows.append(f"assigns {sorted((k, v.id) for k, v in graph.assigns.items())}")
    return "\n".join(rows)


def _named_constants(graph) -> Dict[str, np.ndarray]:
    out = {}
    for tid, arr in graph.constants.items():
        name = graph.constant_names.get(tid)
        if name:
            out[name] = arr
    return out


class PipelineDecoder:
    """``decoder``'s model (a :class:`~lpucore.llm.Decoder`, used for its weights, precision,
    chip configuration, capacity and engine) over ``chips`` chips (``None``: as few as it fits on,
    :func:`plan_stages`). ``comm``: an MPI communicator, to spread the chips over processes
    (:class:`lpucore.System`); every process then calls the same methods and gets the same results.
    ``shards`` / ``tables``: MLP and table shards (default: as few as fit a chip); ``parallel_shards``: the
    MLP shards and ``attn`` attention shards (default: as few as fit, :func:`attn_shards`) of a layer side
    by side (module docstring; the chips are then as many as that plan takes)."""

    def __init__(self, decoder, chips: Optional[int] = None, comm=None, fill: float = STAGE_FILL,
                 shards: Optional[int] = None, tables: Optional[int] = None, parallel_shards: bool = False,
                 attn: Optional[int] = None):
        self.decoder = decoder
        d = decoder
        self.shards = mlp_shards(d.cfg, d.precision, d.capacity, d.chip_config, d.block, fill) if shards is None \
            else int(shards)
        self.tables = table_shards(d.cfg, d.precision, d.capacity, d.chip_config, d.block, fill) if tables is None \
            else int(tables)
        # the shards of a layer's MLP (Mixtral: its experts) and of its attention (ranges of kv heads) side
        # by side on chips of their own
        self.attn = 1 if not parallel_shards else int(attn) if attn is not None else \
            attn_shards(d.cfg, d.precision, d.capacity, d.chip_config, d.block, fill)
        self.parallel = bool(parallel_shards) and (self.shards > 1 or self.attn > 1)
        self.stages: List[Tuple[int, int]] = plan_stages(d.cfg, d.precision, d.capacity, d.chip_config,
                                                         None if self.parallel else chips, d.block, fill,
                                                         self.shards, self.tables, self.parallel, self.attn)
        if len(self.stages) < 2:
            raise ValueError(f"{decoder.cfg.name} fits one chip: use the Decoder itself (chips=1)")
        if self.parallel and chips is not None and int(chips) != len(self.stages):
            raise ValueError(f"{decoder.cfg.name} with its MLP shards side by side takes {len(self.stages)} chips, "
                             f"not {chips}")
        self.n_chips = len(self.stages)
        self.comm = comm
        self.units = model_units(decoder.cfg, self.shards, self.tables, self.attn)
        self.signatures = [stage_signature(decoder.cfg, s, self.shards, self.tables, self.parallel, self.attn)
                           for s in self.stages]
        self.sources = self._sources()
        self.wires = self._wires(d.chip_config.c2c_links)
        self.compiled: Dict[tuple, Compiled] = {}    # signature -> Compiled (one per distinct stage)
        self.system: Optional[System] = None
        self.step_cycles: Optional[int] = None
        self.stage_cycles: List[int] = []            # when each chip's stage program ends, in a step
        self.stage_starts: List[int] = []            # when each chip's program starts (its input arrived)
        self.stage_sends: List[int] = []             # when each chip's output starts to leave (the last: its end)
        self.stage_receives: List[int] = []          # when each chip takes its first input vector (chip 0: 0)
        self.sent: Dict[Tuple[int, int], List[int]] = {}   # (from chip, to chip): each vector's Send cycle
        self.compile_seconds = 0.0
        self.load_seconds = 0.0
        self.position = 0

    def __repr__(self):
        return (f"PipelineDecoder({self.decoder.cfg.name!r}, {self.n_chips} chips x {self.decoder.chip_config.name}, "
                f"{len(set(self.signatures))} distinct stages)")

    def _sources(self) -> List[List[Tuple[int, str]]]:
        """Per chip, the (chip, input name) its inputs come from: the chip before it; with shards side by
        side, a shard's from the chip before its layer's shards, and the stage after them from each shard
        (shard 0 into ``x_in``, shard j into ``y_in<j>``; :func:`~lpucore.llm.program.build_step`)."""
        chip_of = {u: k for k, (a, b) in enumerate(self.stages) for u in range(a, b)}
        out: List[List[Tuple[int, str]]] = [[]]
        for k in range(1, self.n_chips):
            # the unit before this stage's (or before its group of shards side by side)
            before = (group_start(self.units, self.stages[k][0]) if self.parallel else self.stages[k][0]) - 1
            prev = self.units[before]
            if self.parallel and side_by_side(prev):
                first = group_start(self.units, before)
                out.append([(chip_of[first + j], "x_in" if j == 0 else f"y_in{j}") for j in range(prev[3])])
            else:
                out.append([(chip_of[before], "x_in")])
        return out

    def _wires(self, links: int) -> List[Tuple[int, int, int, int]]:
        """(chip, link, chip, link) of every hand-over of :meth:`_sources`, each chip's links numbered in turn."""
        used = [0] * self.n_chips
        wires = []
        for k, srcs in enumerate(self.sources):
            for src, _ in srcs:
                wires.append((src, used[src], k, used[k]))
                used[src] += 1
                used[k] += 1
        if max(used) > links:
            k = int(np.argmax(used))
            raise ValueError(f"{self.decoder.cfg.name}: chip {k} would need {used[k]} C2C links, more than the "
                             f"{links} of a {self.decoder.chip_config.name}")
        return wires

    def describe(self) -> List[str]:
        """One line per chip: its units."""
        out = []
        for k, (a, b) in enumerate(self.stages):
            us = self.units[a:b]
            names = [(u[0] if u[1] is None else f"{u[0]} {u[1]}") + (f" shard {u[2] + 1}/{u[3]}" if len(u) == 4 else "")
                     for u in us]
            out.append(f"chip {k}: " + ", ".join(names))
        return out

    def _graph(self, k: int):
        d = self.decoder
        g, _ = build_step(d.cfg, d.ref.w, d.ref.quantized, d.precision, d.capacity, d.block, units=self.stages[k],
                          shards=self.shards, table_shards=self.tables, parallel_shards=self.parallel,
                          attn_shards=self.attn)
        return g

    def compile(self, progress=None, release_weights: Optional[bool] = None):
        """Compile each distinct stage once, chain the chips' programs and load them into a new
        :class:`~lpucore.System` with every chip's weights (once). ``progress(message)`` is called
        as chips are loaded. ``release_weights`` (default: with MPI) drops each chip's weights from
        the host's prepared copy once they are in the chip (a reference run would make them again)."""
        if self.system is not None:
            return self.compiled
        import lpucore

        from ..compiler.pipeline import check_pair
        from ..system import System
        d = self.decoder
        t0 = time.perf_counter()
        names: Dict[tuple, Dict[str, np.ndarray]] = {}
        self._structure: Dict[tuple, str] = {}
        for k, sig in enumerate(self.signatures):
            if sig not in self.compiled:
                g = self._graph(k)
                self.compiled[sig] = lpucore.compile(g, d.chip_config)
                names[sig] = {n: a for n, a in _named_constants(g).items()}
                self._structure[sig] = graph_structure(g)
                del g
                if progress:
                    progress(f"compiled stage {sig[0][0]}.. ({len(self.compiled)} distinct) "
                             f"in {time.perf_counter() - t0:.0f} s")
        self.compile_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        s = System(self.n_chips, self.wires, config=d.chip_config, engine=d.engine, fp16_mxm=d.fp16_mxm,
                   comm=self.comm)
        self.stage_cycles, self.stage_starts, self.stage_sends, self.stage_receives = [], [], [], []
        sent: Dict[Tuple[int, int], List[int]] = {}      # (from chip, to chip) -> each vector's Send cycle
        self.sent = sent
        release = release_weights or (release_weights is None and self.comm is not None)
        # each chip's constants are written on a thread while the next chip's program and weights are
        # made (the same bytes land either way); one chip at a time in flight
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lpucore-load") as writer:
            pending: List[Tuple[int, Future]] = []
            for k in range(self.n_chips):
                comp = self.compiled[self.signatures[k]]
                ins = [w for w in self.wires if w[2] == k]
                outs = [w for w in self.wires if w[0] == k]
                incoming = []
                for (src, name), w in zip(self.sources[k], ins):
                    check_pair(self.compiled[self.signatures[src]], "x_out", comp, name)
                    incoming.append((name, w[3], sent[(src, k)]))
                prog, ends, shift, first, times, first_send = self._chip_program(comp, incoming,
                                                                                 [w[1] for w in outs])
                self.stage_starts.append(shift)
                self.stage_receives.append(first)
                for w, ts in zip(outs, times):
                    sent[(k, w[2])] = ts
                self.stage_sends.append(first_send)
                self.stage_cycles.append(ends)
                chip = s.chips[k]
                if chip is not None:
                    writes = self._load_chip(k, chip, prog, names)
                    self._finish(pending, release, progress)     # the chip before: written, weights released
                    pending.append((k, writer.submit(self._write_constants, k, chip, writes)))
            self._finish(pending, release, progress)
        self.step_cycles = max(self.stage_cycles)
        self.load_seconds = time.perf_counter() - t1
        self.system = s
        return self.compiled

    def _finish(self, pending: List[Tuple[int, Future]], release: bool, progress) -> None:
        """Wait for the chips' constant writes in ``pending`` (raising what they raised), then drop their
        weights from the host's copy (``release``) and report them loaded."""
        while pending:
            k, fut = pending.pop()
            fut.result()
            if release:
                self._release(k)
            if progress:
                progress(f"loaded chip {k + 1} of {self.n_chips}")

    def _chip_program(self, comp, incoming, links):
        """(program, expected cycles, start shift, first Receive, per link the Send cycles of each vector,
        the cycle the output is complete) of a chip running ``comp`` that receives ``incoming`` ((input
        name, link, send cycles) each) and sends its residual over ``links``."""
        from ..compiler.pipeline import _with, events_end, plan_receives, plan_sends
        cfg = self.decoder.chip_config
        shift, first = 0, 0
        if incoming:     # the program starts once its inputs are in
            head, shift = plan_receives(comp, incoming)
            first = min(c for events in head.values() for c, mn, _ in events if mn == "Receive")
            comp = dataclasses.replace(comp, program=_with(comp.program, head, shift, {}),
                                       expected_cycles=max(shift + comp.expected_cycles, events_end(cfg, head)))
        prog, ends = comp.program, comp.expected_cycles
        if not links:
            return prog, ends, shift, first, [], comp.expected_cycles
        # the residual leaves as soon as it is written: a KV cache write runs on meanwhile
        tail, times, first_send = plan_sends(comp, "x_out", links, early=True, start=shift)
        prog = _with(prog, {}, 0, tail)
        # = max(comp's, emit.expected_cycles(prog)), from the events (not walking the program again)
        return prog, max(ends, events_end(cfg, tail)), shift, first, times, first_send

    def _load_chip(self, k, chip, prog, names) -> List[Tuple[str, np.ndarray]]:
        """Chip k: its program (built from validated parts: the compiled stage and the hand-over's
        instructions, each checked as it was added), and the constants to write into it (returned:
        :meth:`_write_constants` writes them): the compiled stage's, with this stage's own weights in
        place of those it was compiled with."""
        sig = self.signatures[k]
        comp = self.compiled[sig]
        chip.load(prog)
        compiled_with = names.get(sig)
        if compiled_with is None:        # compiled by the first stage of this kind on another process
            g0 = self._graph(self.signatures.index(sig))
            compiled_with = names[sig] = _named_constants(g0)
            self._structure[sig] = graph_structure(g0)
        g = self._graph(k)
        own = _named_constants(g)
        if graph_structure(g) != self._structure[sig]:
            raise CompileError(f"pipeline: chip {k}'s stage is not the graph of the stage compiled for it "
                               f"({sig[:3]}...): it cannot share that program")
        writes = [(name, arr) for name, arr in comp.constants.items() if name not in own]
        for name, arr in own.items():
            if name in comp.constants:
                writes.append((name, arr))
            elif not np.array_equal(arr, compiled_with[name]):
                raise CompileError(f"pipeline: constant {name!r} of chip {k} was folded into the shared "
                                   f"program with another value; this stage cannot share it")
        return writes

    def _write_constants(self, k: int, chip, writes: List[Tuple[str, np.ndarray]]) -> None:
        """Write chip k's constants (:meth:`_load_chip`). It runs on a thread of its own while the next
        chip is prepared: the copies into SRAM (mostly first touches of its pages) release the GIL."""
        comp = self.compiled[self.signatures[k]]
        for name, arr in writes:
            comp.write_constant(chip, name, arr)

    def _release(self, k: int) -> None:
        store, cfg = self.decoder.ref.w, self.decoder.cfg
        if not hasattr(store, "forget"):
            return
        a, b = self.stages[k]
        for u in self.units[a:b]:
            if u[1] is not None:
                store.forget(f"model.layers.{u[1]}.")
            elif u[0] == "embed":
                store.forget(cfg.embedding_name)
            else:
                store.forget(cfg.head_name)

    def reset(self) -> None:
        """Start a new sequence (as :meth:`Decoder.reset`)."""
        self.position = 0

    def step(self, token: int):
        """Feed ``token`` at the next position: returns (logits float32 [vocab], SystemStats)."""
        cfg = self.decoder.cfg
        if not 0 <= int(token) < cfg.vocab_size:
            raise ValueError(f"token id {token} out of range: {cfg.name} has vocab_size {cfg.vocab_size}")
        if self.position >= self.decoder.capacity:
            raise ValueError(f"the KV cache is full: {self.decoder.capacity} positions")
        self.compile()
        s = self.system
        assert s is not None                 # made by compile()
        s.reset(clear_memory=False)
        pos = np.array([[self.position]], np.int32)
        for k in s.local:
            chip = s.local_chip(k)
            inputs = self.compiled[self.signatures[k]].inputs
            if "tok" in inputs:
                chip.write_tensor("tok", np.array([[int(token)]], np.int32))
            if "pos" in inputs:
                chip.write_tensor("pos", pos)
        st = s.run()
        if not st.finished:
            raise LpuError(f"pipeline step at position {self.position} did not finish")
        self.position += 1
        # the logits: the head's chip, or every head shard's chip (in token order)
        parts = {k: s.local_chip(k).read_tensor("logits").reshape(-1).astype(np.float32) for k in s.local
                 if "logits" in self.compiled[self.signatures[k]].outputs}
        if self.comm is not None:
            for other in self.comm.allgather(parts):
                parts.update(other)
        return np.concatenate([parts[k] for k in sorted(parts)]), st

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 8, greedy: bool = True,
                 temperature: float = 1.0, seed: Optional[int] = 0, on_step=None):
        """(new tokens, the logits each was chosen from [tokens, vocab], per-step SystemStats), as
        :meth:`Decoder.generate` chooses them. ``on_step(index, token, stats, wall_seconds)`` after each step."""
        if not len(prompt_ids):
            raise ValueError("generate needs at least one prompt token")
        self.reset()
        rng = np.random.default_rng(seed)
        tokens, logits, stats = [], [], []
        row = None

        def run(tok):
            t0 = time.perf_counter()
            r, st = self.step(int(tok))
            stats.append(st)
            if on_step:
                on_step(len(stats) - 1, int(tok), st, time.perf_counter() - t0)
            return r

        for t in prompt_ids:
            row = run(t)
        assert row is not None               # the prompt is not empty
        for i in range(max_new_tokens):
            tok = choose_token(row, greedy, temperature, rng)
            tokens.append(tok)
            logits.append(row)
            if i == max_new_tokens - 1:
                break
            row = run(tok)
        return np.array(tokens, dtype=np.int64), np.stack(logits), stats


__all__ = ["PipelineDecoder", "plan_stages", "plan_auto", "plan_within", "mlp_shards", "table_shards",
           "attn_shards", "unit_bytes", "stage_signature", "STAGE_FILL"]
