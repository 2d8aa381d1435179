"""One decode step of a decoder-only model as an lpucore :class:`~lpucore.Graph`.

The step program takes one token and its position and returns the logits of the next token; weights are
constants (written into SRAM once, when the program loads) and the KV cache is a set of graph *states*, so they
stay resident from step to step and a step moves 8 bytes in (token id and position, int32) and the logits out.
The same compiled program serves every step of every sequence. A prompt chunk (``batch=P, shared_cache=True``,
"Prefill" below) is the same graph over P positions of one sequence.

Layout and arithmetic (``S`` = cache capacity in tokens, ``hd`` = head_dim, ``G`` = query heads per kv head):

* Residual stream, norms, softmax and the final logits in float32; every matmul multiplies float16 operands on
  the MXM with float32 accumulators (``out_dtype="float32"``).
* Keys and values are cached as ``K_l, V_l [S, Hkv * hd]`` float16, one row per position (the precision of
  an fp16 cache), for caches of at most ``KEY_BLOCK`` positions: the new key and value rows are written at
  position ``p`` by :meth:`Graph.scatter` (MEM ``Scatter`` with addresses computed on the chip from ``p``, in
  place: :mod:`lpucore.compiler.scatter`). The scores ``q . K[s]`` of every head are the exact float32
  products ``q * K`` (float16 times float16), split exactly into float16 ``hi + lo`` and summed over each
  head's ``hd`` lanes by MXM products with a constant 0/1 matrix (one per part, side by side): three VXM
  passes and two MXM products over the whole cache; the softmax runs across the cache rows (``axis=-2``:
  elementwise over vectors); the weights ``e = exp(s - max s)``, rounded to float16, are spread over their
  head's lanes by another constant product (exact), the output is ``sum_s e[s] * V[s]`` across rows in
  float32, divided last by ``sum_s e[s]`` (spread the same way), so that the sum of the weights runs beside
  the weighted sum (:meth:`StepBuilder._mix`). With ``G > 1`` query heads per kv head the query heads are
  computed in :meth:`StepBuilder.head_order` (the q and o projections' weights permuted to match), so that
  query row ``j`` lines up with the cache's heads lane for lane.
* Longer caches (:func:`tiled_cache`) keep the keys with their positions on the lanes, in tiles of
  ``KEY_BLOCK`` positions, and the values as column tiles, and both products run on the MXM with the cache
  as weights, head by head (:mod:`lpucore.llm.tiled`); a step reads the cache before it writes (its own
  key and value come from its rows) and the writes come last in the graph; a new key is one lane of
  ``Hkv * hd`` vectors, written by reading its tile at the run-time tile index, blending the column in and
  writing the tile back (:meth:`Graph.gather_blocks`, :meth:`Graph.scatter_blocks`). Not the same rounding
  as the short-cache path, so cache buckets on both sides of ``KEY_BLOCK`` agree in tokens, not in bits.
* Attention runs over all ``S`` cache columns with an additive mask of ``-1e9`` on the columns after ``p``
  (``exp`` of it is exactly 0), so every step costs the same cycles whatever ``p`` is.
* ``precision="int8"``: each matmul weight is stored as int8 with one float32 scale per output channel (the
  exact data of :attr:`Reference.quantized`) and multiplied on the MXM as int8, at the int8 rate, with no
  float16 copy. The float16 activation row ``x`` is rescaled on the VXM into two int8 digit rows: with
  ``m = max|x|`` and ``u = x * 16256 / m``, ``h = round(u / 128)`` and ``l = round(u - 128 h)`` (``|h| <= 127``,
  ``|l| <= 64``), so ``x = m / 16256 * (128 h + l)`` to within ``m / 32512``, a 15-bit fixed-point code
  (finer than float16's 11 bits for every element above ``m / 16``). One int8 matmul of the ``[2, K]`` digit
  rows gives exact int32 products; the VXM combines them, ``(128 p_h + p_l) * scale * m / 16256``, in
  float32. The digits of an activation are computed once for every weight it meets (q, k and v share them).
  ``m`` may be any bound of ``max|x|`` the same in every lane (the code keeps its range; a bound twice too big
  costs one bit): a norm's output takes one computed beside the norm's own reductions
  (:meth:`StepBuilder.norm`), GPT-2's MLP activation ``max(max z, 0.1701)`` from the product ``z`` before
  its gelu, so neither waits for a lane all-reduce of its own; the attention output and the SwiGLU product
  measure ``max|x|``.
* Token embeddings are looked up on the chip by :meth:`Graph.gather` (a one-hot row times the table on the
  MXM). GPT-2's tied head in int8 keeps a second, transposed int8 copy of the table for the logits matmul.

Prefill (:mod:`lpucore.llm.prefill`): with ``shared_cache`` the ``B`` rows are consecutive positions of ONE
sequence and share its cache, the single-sequence states ``k<l>``, ``v<l>`` (:meth:`StepBuilder.chunk_attention`):
the B new key and value rows are scattered at their positions before attention reads the cache, and each query
row is masked after its own position, so attention is causal within the chunk and over the cache before it with
nothing else; llama rows are rotated by one rope over ``[heads, B, hd]`` (the B positions made ready once), and the
head takes the last row only (logits ``[1, vocab]``). Every row's arithmetic is the single-token step's
(bit for bit on the tiny models; :mod:`lpucore.llm.prefill`).

Shards side by side (``parallel_shards``, :class:`lpucore.llm.PipelineDecoder`): a layer's MLP shards (for
Mixtral its experts) are stages of their own that run at once, each from the residual ``x_in`` ``[1, d]``:
shard 0 sends ``[x; y_0]`` (``[2, d]``), shard ``j > 0`` its part ``y_j`` alone, and the stage after them takes
``x_in`` ``[2, d]`` and ``y_in<j>`` and adds ``x + (((y_0 + y_1) + y_2) + ...)``, the order the shards in a
row add them, so both give the same bits. An attention shard (``attn_shards``) is the attention of its
``n_kv_heads / t`` kv heads and their query heads (:func:`attn_shard_config`: its q, k, v columns, its KV
cache, its o projection rows); its part is its rows' share of the o projection.

:func:`build_step` returns the graph and a list of ``(label, first node, end node)`` spans naming the model part
each graph node belongs to (``embed``, ``attn``, ``kv``, ``mlp``, ``head``...) for the per-operation breakdown.
:attr:`StepBuilder.probes` names the residual stream after each layer (``x0``, ``x1``, ...): adding them as graph
outputs lets a debugging session compare every layer with the reference.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from ..graph import Graph, Tensor
from . import tiled
from .shapes import ModelConfig

F16, F32 = np.float16, np.float32
F16_MAX = 65504.0   # the largest finite float16
GELU_MIN = 0.1701   # above -min gelu (0.16997 in its erf form, 0.17004 in its tanh form)
MASK = tiled.MASK    # additive attention mask of future cache columns: exp(MASK - max) == 0 exactly
KEY_BLOCK = tiled.TILE     # cache positions per key tile (lpucore.llm.tiled)


def tiled_cache(capacity: int) -> bool:
    """Whether a step over a cache of ``capacity`` positions keeps its keys in tiles with the positions on
    the lanes (:mod:`lpucore.llm.tiled`: both attention products on the MXM with the cache as weights, a
    key written as one lane of ``Hkv * hd`` vectors) rather than one row per position (elementwise
    products over the whole cache, ``capacity`` rows per block: three VXM passes and two MXM products):
    the former when the cache has more positions than a tile."""
    return capacity > KEY_BLOCK
DEFAULT_BLOCK = 65536      # int8 weights: columns per constant (a model's head is one product, its tiles on all planes)
DIGIT, DIGIT_MAX = 128, 127  # int8 activation digits: x ~ max|x| / 16256 * (128 h + l)
_Q_PROJ, _O_PROJ = "self_attn.q_proj.weight", "self_attn.o_proj.weight"     # weights with permuted heads


class StepBuilder:
    """Builds the step graph; ``w`` are the reference's float32 weights, ``quantized`` its int8 tensors."""

    def __init__(self, cfg: ModelConfig, w: Mapping[str, np.ndarray],
                 quantized: Mapping[str, Tuple[np.ndarray, np.ndarray, int]], precision: str,
                 capacity: int, block: int = DEFAULT_BLOCK, layers: Optional[Tuple[int, int]] = None,
                 units: Optional[Tuple[int, int]] = None, shards: int = 1, table_shards: int = 1,
                 batch: int = 1, shared_cache: bool = False, cache_row: Optional[int] = None,
                 parallel_shards: bool = False, attn_shards: int = 1):
        self.cfg, self.w, self.q, self.precision = cfg, w, quantized, precision
        # B sequences per step (module docstring, "Batches"): B activation rows, a KV cache per sequence;
        # shared_cache: the B rows are B positions of one sequence, one cache (a prompt chunk, "Prefill")
        self.B = int(batch)
        if self.B < 1:
            raise ValueError(f"batch must be >= 1, not {batch}")
        self.shared = bool(shared_cache) and self.B > 1
        if self.shared and (shards > 1 or table_shards > 1):
            # a chunk of some units (layers) is for lpucore.llm.predict's prefill layer; sharded units take one row
            raise ValueError("a prompt chunk (shared_cache) holds no sharded units (MLP, embedding or head shards)")
        # a chunk of a batch's sequence ``cache_row``: its cache states are that row's, k<i>_b<row>
        # (lpucore.llm.batch, "Prefill"), so the chunk program can share them with the batch's step program
        self.cache_tag = "" if cache_row is None else f"_b{int(cache_row)}"
        # a pipeline stage: the model units [u0, u1) of model_units(cfg) (or the layers [a, b) with the
        # embedding before layer 0 and the head after the last); a stage that starts with the embedding
        # takes "tok", the others the residual stream "x_in" (float32 [1, d]); one that ends with the head
        # emits "logits", the others "x_out"
        all_units = model_units(cfg, shards, table_shards, attn_shards)
        if units is not None and layers is not None:
            raise ValueError("give layers or units, not both")
        if units is None:
            units = layer_units(cfg, layers) if layers is not None else (0, len(all_units))
        u0, u1 = int(units[0]), int(units[1])
        if not 0 <= u0 < u1 <= len(all_units):
            raise ValueError(f"units must be a range inside 0..{len(all_units)}, got {units}")
        self.units = all_units[u0:u1]
        # parallel_shards: a layer's attention or MLP shards run side by side on chips of their own (module
        # docstring, "Shards side by side"); ``self.fan_in``: the parts of the group before this stage's
        self.parallel = bool(parallel_shards) and (shards > 1 or attn_shards > 1)
        if attn_shards > 1 and not self.parallel:
            raise ValueError("attention shards run side by side only (parallel_shards=True)")
        self.fan_in = 0
        if self.parallel:
            if any(side_by_side(u) for u in self.units) and len(self.units) > 1:
                raise ValueError("with parallel_shards a shard is a stage of its own")
            a = group_start(all_units, u0)
            if a > 0 and side_by_side(all_units[a - 1]):
                self.fan_in = all_units[a - 1][3]
        if self.units[0][0] == "attn" and len(self.units[0]) == 4:
            # an attention shard is the attention of its kv heads (and their query heads) alone
            cfg = self.cfg = attn_shard_config(cfg, self.units[0][3])
        if self.B > 1 and any(len(u) == 4 for u in self.units):
            raise ValueError("a batched step does not hold sharded units (MLP, embedding or head shards)")
        idx = [u[1] for u in self.units if u[1] is not None]
        # constants and states of layer i are named by i - first: stages with the same units relative to
        # their first layer build the same graph, so one compiled program serves all of them
        self.first = idx[0] if idx else 0
        self._expert_base = 0      # experts of a shard are named from its first, for the same reason
        # layer (or "embed" / "head") -> its first shard in this stage (shard constants are named from it)
        self._shard0: Dict[Union[int, str], int] = {}
        for u in self.units:
            if len(u) == 4:
                self._shard0.setdefault(u[1] if u[0] == "mlp" else u[0], u[2])
        self.S, self.block = capacity, block
        # keys with their positions on the lanes (lpucore.llm.tiled): long caches, but for a batch's caches
        # stacked in one state (stacked_attention), which keep one row per position
        self.tiled = tiled_cache(capacity)
        self._key_consts: Dict[str, Tensor] = {}     # attention constants, shared by every layer
        self._late: List = []           # cache writes made after everything else (finish)
        self._digits: Dict[int, Tuple[Tensor, Tensor]] = {}     # activation id -> digits()
        self._bound: Dict[int, Tensor] = {}                     # activation id -> bound of max|x| (norm())
        self._digit_col: Optional[Tensor] = None                # _digit_weights()
        self._rows: Dict[tuple, Tensor] = {}                    # _row_pos()
        self.probes: Dict[str, Tensor] = {}     # intermediate values by name (residual stream per layer)
        self.g = Graph(f"{cfg.name}-step")
        self.spans: List[Tuple[str, int, int]] = []
        self._label: Optional[str] = None
        self._start = 0

    # ---- bookkeeping ---------------------------------------------------------------------------
    def part(self, label: Optional[str]) -> None:
        """Nodes added from now on belong to model part ``label`` (``None``: the graph is complete)."""
        n = len(self.g.nodes)
        if self._label is not None and n > self._start:
            self.spans.append((self._label, self._start, n))
        self._label, self._start = label, n

    def finish(self) -> None:
        # the tiled caches' writes last: the compiler lowers (and so schedules) in graph order, and nothing of
        # the step waits for them, so they take what the step's own path leaves free
        self.part("kv")
        for write in self._late:
            write()
        self.part(None)

    # ---- building blocks -------------------------------------------------------------------------
    def key(self, name: str) -> str:
        """The graph name of weight ``name``: dots to underscores, layer index relative to the stage."""
        parts = name.split(".")
        for j in range(len(parts) - 1):
            if parts[j] in ("layers", "h") and parts[j + 1].isdigit():
                parts[j + 1] = str(int(parts[j + 1]) - self.first)
            elif parts[j] == "experts" and parts[j + 1].isdigit():
                parts[j + 1] = str(int(parts[j + 1]) - self._expert_base)
        return "_".join(parts) + self._suffix

    _suffix = ""         # "_s<k>" while building the k-th shard of a layer held by this stage

    def vec(self, name: str, dtype=F32) -> Tensor:
        return self.g.constant(self.key(name), np.asarray(self.w[name], dtype=dtype))

    def linear(self, x16: Tensor, name: str, transpose: bool, bias: Optional[str] = None,
               rows: Optional[Tuple[int, int]] = None, cols: Optional[Tuple[int, int]] = None) -> Tensor:
        """``x16 [B, K] float16 @ W`` as float32 ``[B, N]``. ``transpose``: ``W`` is stored ``[N, K]``
        (Hugging Face Linear), else ``[K, N]`` (GPT-2 Conv1D). ``rows`` / ``cols``: only that range of
        ``W``'s ``K`` / ``N`` (a shard of an MLP)."""
        g = self.g
        rs = slice(*rows) if rows is not None else slice(None)
        cs = slice(*cols) if cols is not None else slice(None)
        key = self.key(name) + ("_T" if transpose else "")
        rows_in = x16.shape[0]     # B, or 1 where a prompt chunk's head takes its last row only
        if name in self.q:
            qw, scale, _ = self.q[name]
            qk = self._head_permuted(name, (qw.T if transpose else qw)[rs, cs])      # [K, N] int8
            scale = scale[cs][self._head_lanes()] if name.endswith(_Q_PROJ) else scale[cs]    # per output column
            digits, m = self.digits(x16)
            outs = []
            for c0 in range(0, qk.shape[1], self.block):
                c1 = min(c0 + self.block, qk.shape[1])
                p = g.cast(g.matmul(digits, g.constant(f"{key}_q{c0}", qk[:, c0:c1])), "float32")  # [2B, n]
                if rows_in > 1:     # rows h_0, l_0, h_1, l_1, ...: each sequence's pair as [B, 2, n]
                    p = g.reshape(p, (rows_in, 2, c1 - c0))
                # 128 p_h + p_l as a weighted sum across the two rows: one fused kernel with
                # the scales below, no row slices (exact: products by 128 and 1, one addition)
                y = g.sum(g.mul(p, self._digit_weights()), axis=-2, keepdims=rows_in == 1)
                y = g.mul(y, g.constant(f"{key}_s{c0}", (scale[c0:c1] / np.float32(DIGIT * DIGIT_MAX))
                                        .astype(F32).reshape(1, -1)))
                # undo the activation's scale block by block: the products' elementwise chain
                # ends here (one fused kernel), and the concatenation only moves values
                outs.append(g.mul(y, m))
            y = outs[0] if len(outs) == 1 else g.concat(outs, axis=-1)
        else:
            wk = self._head_permuted(name, (self.w[name].T if transpose else self.w[name])[rs, cs])
            y = g.matmul(x16, g.constant(key, np.ascontiguousarray(wk.astype(F16))), out_dtype="float32")
        if bias is not None:
            y = g.add(y, self.vec(bias))
        return y

    def _digit_weights(self) -> Tensor:
        """The float32 ``[2, 1]`` column ``(DIGIT, 1)`` weighting the two digit rows' products."""
        if self._digit_col is None:
            self._digit_col = self.g.constant("_digit_weights", np.array([[DIGIT], [1.0]], dtype=F32))
        return self._digit_col

    def _head_lanes(self) -> np.ndarray:
        """The q projection's output columns (and the o projection's input rows) in :meth:`head_order`."""
        hd = self.cfg.head_dim
        return (self.head_order().reshape(-1, 1) * hd + np.arange(hd)).ravel()

    def _head_permuted(self, name: str, w: np.ndarray) -> np.ndarray:
        """Weight ``w [K, N]`` of ``name`` with the query heads in :meth:`head_order` (a copy)."""
        if self.cfg.n_heads != self.cfg.n_kv_heads:
            if name.endswith(_Q_PROJ):
                w = w[:, self._head_lanes()]
            elif name.endswith(_O_PROJ):
                w = w[self._head_lanes(), :]
        return np.ascontiguousarray(w)

    def digits(self, x16: Tensor):
        """float16 ``[B, K]`` -> (int8 ``[2B, K]`` rows ``h, l`` of each row, float32 ``[B, 1]`` max|x|) with
        ``x = max|x| / (DIGIT * DIGIT_MAX) * (DIGIT * h + l)`` up to half a unit of ``l`` (module docstring).
        One pair per activation tensor (q, k and v share theirs)."""
        if x16.id in self._digits:
            return self._digits[x16.id]
        g = self.g
        x = g.cast(x16, "float32")
        top = self._bound[x16.id] if x16.id in self._bound else g.max(g.abs(x), keepdims=True)
        m = g.maximum(top, 1e-30)                                                  # [B, 1]
        u = g.div(g.mul(x, float(DIGIT * DIGIT_MAX)), m)                           # |u| <= 16256
        h = g.cast(g.mul(u, 1.0 / DIGIT), "int32")                                 # round half to even
        hf = g.cast(h, "float32")
        lo = g.cast(g.sub(u, g.mul(hf, float(DIGIT))), "int8")                    # |l| <= 64
        B = x16.shape[0]
        if B == 1:
            d = g.concat([g.cast(h, "int8"), lo], axis=0)
        else:               # [B, K] each -> rows h_0, l_0, h_1, l_1, ... ([2B, K]): a sequence's pair adjacent
            K = x16.shape[-1]
            d = g.reshape(g.concat([g.reshape(g.cast(h, "int8"), (B, 1, K)), g.reshape(lo, (B, 1, K))],
                                   axis=1), (2 * B, K))
        self._digits[x16.id] = (d, m)
        return d, m

    def f16(self, x: Tensor) -> Tensor:
        return self.g.cast(x, "float16")

    def norm(self, x: Tensor, weight: str, bias: Optional[str]) -> Tensor:
        """LayerNorm (``bias`` given) or RMSNorm of the float32 residual ``x [B, d]``, as float16 ``h``.

        In int8 the norm is built from its parts so that ``h``'s digit scale (:meth:`digits`) needs no lane
        all-reduce of its own after the norm (about 300 cycles each on a GPT-2-small layer's critical path):
        with ``mu = mean(x)`` (LayerNorm; 0 for RMSNorm), ``c = x - mu``, ``r = rsqrt(var + eps)``,
        weight ``w`` and bias ``b``, ``h = c w r + b``, so ``max|h| <= r (max|x w| + |mu| max|w|) + max|b|``,
        where ``max|x w|`` is reduced beside ``sum(x)`` and ``sum(x^2)`` (all-reduces side by side,
        :func:`~lpucore.compiler.allreduce.allreduce_kernel`) and the rest is known with ``r``. LayerNorm's
        variance is taken in one pass, ``var = max(mean(x^2) - mu^2, 0)``, so that its sum of squares is
        reduced beside ``sum(x)`` instead of after it (about 130 cycles a norm on GPT-2-small): in float32
        its error is about ``2^-20 (1 + mu^2 / var)`` relative, below ``h``'s float16 rounding (2^-11) unless
        the row's mean is more than about 20 times its standard deviation (a residual stream's is not; the
        bound on ``max|h|`` holds whatever the variance's error). The bound is
        ``max|h|`` itself for RMSNorm (and for LayerNorm with ``b = 0`` and a mean of 0); a bound above
        ``max|h|`` costs ``h``'s 15-bit code one bit per factor of two. It is raised by 2^-8 and rounded to
        float16, so that it is the same in every lane (``r`` differs between lanes by an ulp: each lane adds
        the squares in its own order) and covers ``h``'s float16 rounding. In float16 the graph's norm op."""
        g, eps = self.g, self.cfg.norm_eps
        w = self.vec(weight)
        if self.precision != "int8":
            if bias is None:
                return self.f16(g.rmsnorm(x, w, eps=eps))
            return self.f16(g.layernorm(x, w, self.vec(bias), eps=eps))
        inv_d = 1.0 / x.shape[-1]
        if bias is None:
            c, var = x, g.mul(g.sum(g.mul(x, x), keepdims=True), inv_d)
            top = g.max(g.abs(g.mul(x, w)), keepdims=True)
        else:
            # one pass: mean(x^2) - mean^2, the sum of squares reduced beside sum(x) instead of after it
            # (both before the bound's max in the graph, so placed first: the bound waits for r anyway)
            mean = g.mul(g.sum(x, keepdims=True), inv_d)
            var = g.maximum(g.sub(g.mul(g.sum(g.mul(x, x), keepdims=True), inv_d), g.mul(mean, mean)), 0.0)
            top = g.max(g.abs(g.mul(x, w)), keepdims=True)
            c = g.sub(x, mean)
            top = g.add(top, g.mul(g.abs(mean), float(np.max(np.abs(self.w[weight])))))
        r = g.rsqrt(g.add(var, eps))
        top = g.mul(top, r)
        y = g.mul(g.mul(c, w), r)
        if bias is not None:
            y = g.add(y, self.vec(bias))
            top = g.add(top, float(np.max(np.abs(self.w[bias]))))
        h = self.f16(y)
        # every lane holds its own float32 sum of squares (a lane all-reduce adds in a lane-dependent order),
        # so r and the bound differ between lanes by an ulp; the bound, a little raised and rounded to
        # float16 (at most the largest float16, which bounds h too), is the same in every lane whatever
        # order the chip's sums took (a batch's rows and a single row's, bit for bit)
        top = g.minimum(g.mul(top, 1.0 + 2.0 ** -8), F16_MAX)
        self._bound[h.id] = g.cast(self.f16(top), "float32")
        return h

    def embed(self, tok: Tensor, table: str, rows: Optional[Tuple[int, int]] = None) -> Tensor:
        """Row ``tok`` of the embedding table, float32 ``[1, d]``. ``rows``: only that range of the
        table is held (a shard): the row is 0 unless ``tok`` falls in it."""
        g = self.g
        key = table.replace(".", "_") + self._suffix
        lo, hi = rows if rows is not None else (0, None)
        idx = tok
        tokf = None
        if rows is not None:       # the row index inside the shard, clamped (the gather needs a valid one)
            tokf = g.sub(g.cast(tok, "float32"), float(lo))
            idx = g.cast(g.minimum(g.maximum(tokf, 0.0), float(rows[1] - lo - 1)), "int32")
        if table in self.q:       # an int8 table: gather the int8 row, scale it
            qw, scale, _ = self.q[table]
            qw, scale = qw[lo:hi], scale[lo:hi]
            row = g.cast(g.cast(self._gather_cols(key + "_rows", qw, idx), "float16"), "float32")
            # the row's scale: a [vocab, 1] table would take a whole MEM vector per entry, so the scales
            # are one float32 row and scale[tok] is the sum of that row times a one-hot (exact: one term;
            # none, so a 0 scale, when tok is outside a shard's rows)
            V = qw.shape[0]
            tokf = g.cast(tok, "float32") if tokf is None else tokf
            if self.B > 1:          # one token per row: [B, 1] against the [1, V] lane numbers
                tokf = g.reshape(tokf, (self.B, 1))
            iota = g.constant(key + "_iota", np.arange(V, dtype=F32).reshape(1, V))
            onehot = g.sub(1.0, g.minimum(g.abs(g.sub(iota, tokf)), 1.0))
            s = g.sum(g.mul(onehot, g.constant(key + "_rscale", scale.astype(F32).reshape(1, V))), keepdims=True)
            return g.mul(row, s)
        row = g.cast(self._gather_cols(key, self.w[table][lo:hi].astype(F16), idx), "float32")
        if rows is None:
            return row
        inside = g.sub(1.0, g.minimum(g.abs(g.sub(g.cast(idx, "float32"), tokf)), 1.0))   # 1 iff tok in rows
        return g.mul(row, inside)

    def _gather_cols(self, key: str, table: np.ndarray, tok: Tensor) -> Tensor:
        """Row ``tok`` of ``table``; a table wider than ``block`` columns is kept as column blocks
        (a tensor lives in one hemisphere: Llama-2's 32000 x 4096 int8 table, 131 MB, does not)."""
        g = self.g
        d = table.shape[1]
        if d <= self.block:
            return g.gather(g.constant(key, table), tok)
        return g.concat([g.gather(g.constant(f"{key}{c0}", np.ascontiguousarray(table[:, c0:c0 + self.block])), tok)
                         for c0 in range(0, d, self.block)], axis=-1)

    def attention(self, i: int, q: Tensor, k: Tensor, v: Tensor, att, row: Optional[int] = None) -> Tensor:
        """``q`` (``H * hd`` values: ``[1, H * hd]`` or ``[H, 1, hd]``; heads in :meth:`head_order`), ``k, v``
        (``Hkv * hd`` values) float32 -> attention output float16 ``[1, H * hd]`` (heads in the same order).
        ``row``: the sequence of a batch (its own cache states ``k<i>_b<row>``); None for one sequence.

        Everything is elementwise over whole vectors or a product with a constant on the MXM (module
        docstring): no lane moves and no reductions across lanes."""
        g, cfg, S = self.g, self.cfg, self.S
        H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        G, D = H // Hkv, Hkv * hd
        mask, segs, seg_t = att[2:]
        self.part("kv")
        tag = "" if row is None else f"_b{row}"           # a batch's sequence ``row`` has caches of its own
        if self.tiled:
            o = self._tiled(i, tag, g.reshape(q, (G, 1, D)), g.reshape(k, (1, D)), g.reshape(v, (1, D)), mask)
            return self.f16(g.reshape(o, (1, H * hd)))
        K = g.state(f"k{i - self.first}{tag}", (S, D), "float16")
        V = g.state(f"v{i - self.first}{tag}", (S, D), "float16")
        # row p of the cache := the new row, written in place by MEM Scatter
        K_new = g.scatter(K, att[0], self.f16(g.reshape(k, (1, D))))                      # [S, D]
        V_new = g.scatter(V, att[0], self.f16(g.reshape(v, (1, D))))
        g.assign(K, K_new)
        g.assign(V, V_new)
        self.part("attn")
        # scores[j, s, h] = q_jh . K[s, h]: exact float32 products, split exactly into float16 hi + lo, and
        # summed over each head's lanes by the MXM (a constant 0/1 matrix)
        q16 = self.f16(g.reshape(q, (G, 1, D)))
        s = self._scores(q16, K_new, segs, mask)                                            # [G, S, Hkv]
        # softmax over the cache rows: row reductions are elementwise over vectors
        o = self._mix(s, V_new, seg_t)                                                      # [G, 1, D]
        return self.f16(g.reshape(o, (1, H * hd)))

    def _tiled(self, i: int, tag: str, q: Tensor, k: Tensor, v: Tensor, tl: "tiled.Tiles") -> Tensor:
        """Attention over the tiled cache of layer ``i`` (:mod:`lpucore.llm.tiled`): query rows ``q [R, 1, D]``,
        new keys and values ``k, v [B, D]`` (float32) -> float32 ``[R, 1, D]``.

        One row per sequence: the cache is read before the new key and value are written (the row's own come
        from ``k, v``), so the writes are off attention's path, and made last (:meth:`finish`: the compiler
        schedules in graph order, so attention's kernels come first; the new keys' columns made right after
        the scores, their kernels delayed the softmax's: 31,169 to 35,266 cycles against 28,921 on the 7B
        attention chip, however the work was split).
        A prompt chunk's rows see each other's: its writes come first."""
        g, cfg = self.g, self.cfg
        D = cfg.n_kv_heads * cfg.head_dim
        T = tiled.tiles_of(self.S) * tl.seqs
        K = g.state(f"k{i - self.first}{tag}", (T * D, tiled.TILE), "float16")
        V = g.state(f"v{i - self.first}{tag}", (tiled.value_tiles(D) * T * tiled.TILE, tiled.TILE), "float16")
        k16, v16 = self.f16(k), self.f16(v)
        consts = self._key_consts

        def write():
            K_new = tiled.write_keys(g, consts, K, k16, tl)
            V_new = tiled.write_values(g, consts, V, v16, tl)
            g.assign(K, K_new)
            g.assign(V, V_new)
            return K_new, V_new
        if k.shape[0] > 1 and tl.seqs == 1:
            keys, values = write()
            self.part("attn")
            return tiled.scores_and_mix(g, consts, self.f16(q), k16, v16, keys, values, cfg.n_kv_heads, tl)
        self.part("attn")
        o = tiled.scores_and_mix(g, consts, self.f16(q), k16, v16, K, V, cfg.n_kv_heads, tl)
        self._late.append(write)
        return o

    def _tiles(self, pos: Tensor, posf: Tensor, stacked: bool = False) -> "tiled.Tiles":
        D = self.cfg.n_kv_heads * self.cfg.head_dim
        return tiled.tile_values(self.g, self._key_consts, pos, posf, self.S, D, stacked)

    def _key_const(self, name: str, arr: np.ndarray) -> Tensor:
        """The graph constant ``name`` (made once, shared by every layer)."""
        if name not in self._key_consts:
            self._key_consts[name] = self.g.constant(name, arr)
        return self._key_consts[name]

    def _mix(self, scores: Tensor, values: Tensor, seg_t: Tensor) -> Tensor:
        """Attention output float32 ``[..., 1, D]``: the softmax over the cache rows of ``scores [..., S, Hkv]``
        (row reductions: elementwise over vectors) weighting the cached ``values [..., S, D]`` float16.
        The weights ``e = exp(s - max s)`` (in ``(0, 1]``), rounded to float16, are spread over their head's
        lanes by a product with ``seg_t`` (exact), times ``V``, summed over the rows; the sum is divided by
        ``sum e`` last, spread the same way (its float16 ``hi + lo``, exact to 2^-22), so that the division
        and the sum of ``e`` run beside the weighted sum instead of before it."""
        g = self.g
        e = g.exp(g.sub(scores, g.max(scores, axis=-2, keepdims=True)))
        # float16 out is exact (one product e * 1 per output) and halves the largest temporary
        pe = g.cast(g.matmul(self.f16(e), seg_t, out_dtype="float16"), "float32")           # [..., S, D]
        total = g.sum(e, axis=-2, keepdims=True)                                            # [..., 1, Hkv]
        hi = self.f16(total)
        lo = self.f16(g.sub(total, g.cast(hi, "float32")))
        spread = g.add(g.matmul(hi, seg_t, out_dtype="float32"), g.matmul(lo, seg_t, out_dtype="float32"))
        num = g.sum(g.mul(pe, g.cast(values, "float32")), axis=-2, keepdims=True)           # [..., 1, D]
        return g.div(num, spread)

    def _scores(self, q16: Tensor, keys: Tensor, segs, mask: Tensor) -> Tensor:
        """Attention scores float32 ``[..., S, Hkv]``: ``q16 [..., 1, D]`` float16 against the cached ``keys
        [..., S, D]`` float16, scaled by ``1 / sqrt(hd)``, plus the additive ``mask``. The exact float32
        products ``q * K`` split exactly into float16 ``hi + lo``, each summed over each head's lanes by an
        MXM product with the lane-to-head matrix (``segs``: one constant per part, so the two products take
        two planes and run side by side), added on the VXM. The products are one graph operation (the
        graph holds the work once, so the bounds count it once; spelling it per use would let ``hi`` and
        ``lo`` fuse it, about 45 cycles of a GPT-2-small layer, for three times the VXM work at long caches)."""
        g = self.g
        prod = g.mul(g.cast(q16, "float32"), g.cast(keys, "float32"))
        hi = self.f16(prod)
        lo = self.f16(g.sub(prod, g.cast(hi, "float32")))
        s = g.add(g.matmul(hi, segs[0], out_dtype="float32"), g.matmul(lo, segs[1], out_dtype="float32"))
        return g.add(g.mul(s, float(1.0 / math.sqrt(self.cfg.head_dim))), mask)

    def head_order(self) -> np.ndarray:
        """The query heads in the order the step computes them: for ``G`` query heads per kv head, the
        ``j``-th of every group first, then the ``j + 1``-th..., so that query row ``j`` lines up with the
        cache's ``Hkv`` heads lane for lane. The q projection's output columns and the o projection's input
        rows are permuted to match (free: they are constants); the identity when ``G == 1``."""
        H, Hkv = self.cfg.n_heads, self.cfg.n_kv_heads
        G = H // Hkv
        return np.array([(i % Hkv) * G + i // Hkv for i in range(H)], dtype=np.int64)

    def _attention_constants(self, pos: Tensor, posf: Tensor):
        """(mask, segs, seg_t) shared by every layer's attention: ``mask`` float32 ``[S, Hkv]`` (``MASK`` on
        rows after ``pos``; for a tiled cache its :class:`~lpucore.llm.tiled.Tiles` instead), ``segs`` the
        float16 ``[D, Hkv]`` lane-to-head matrix as two constants (for :meth:`_scores`), ``seg_t`` float16
        ``[Hkv, D]`` (head to its lanes)."""
        mask = self._tiles(pos, posf) if self.tiled else self._mask(posf)
        return (mask,) + self._head_constants()

    def _mask(self, posf: Tensor, lanes: Optional[int] = None) -> Tensor:
        """float32 ``[S, lanes]`` (``Hkv`` lanes by default): 0 on the cache rows up to position ``posf``
        (float32 ``[1]``), ``MASK`` after."""
        g, S = self.g, self.S
        n = self.cfg.n_kv_heads if lanes is None else lanes
        iota = self._key_const("iota_rows_h" if lanes is None else f"iota_rows_{n}",
                               np.repeat(np.arange(S, dtype=F32).reshape(S, 1), n, axis=1))
        return g.mul(g.minimum(g.maximum(g.sub(iota, posf), 0.0), 1.0), MASK)

    def _head_constants(self):
        """(segs, seg_t): the lane-to-head matrix (twice) and its transpose (:meth:`_attention_constants`)."""
        g, cfg = self.g, self.cfg
        Hkv, hd = cfg.n_kv_heads, cfg.head_dim
        D = Hkv * hd
        seg = (np.arange(D).reshape(D, 1) // hd == np.arange(Hkv).reshape(1, Hkv)).astype(F16)
        segs = [] if tiled_cache(self.S) else [g.constant(f"head_sum_{part}", seg) for part in ("hi", "lo")]
        seg_t = g.constant("head_spread", np.ascontiguousarray(seg.T))
        return segs, seg_t

    def _stacked_attention(self, pos: Tensor):
        """A batch's attention constants when the B caches are one state (``G == 1``, :meth:`stacked_attention`):
        ``(pos, rows, mask, segs, seg_t)`` with ``rows`` int32 ``[B]`` the cache rows ``b * S + pos[b]`` and
        ``mask`` float32 ``[B, S, Hkv]`` (``MASK`` after each sequence's position)."""
        g, S, B = self.g, self.S, self.B
        posf = g.cast(pos, "float32")
        if self.tiled:
            return (pos, None, self._tiles(pos, posf, stacked=True)) + self._head_constants()
        base = g.constant("batch_rows", (np.arange(B, dtype=F32) * S))
        rows = g.cast(g.add(posf, base), "int32")                          # exact: integers below 2^24
        mask = self._mask(g.reshape(posf, (B, 1, 1)))                      # [B, S, Hkv]
        return (pos, rows, mask) + self._head_constants()

    def stacked_attention(self, i: int, q: Tensor, k: Tensor, v: Tensor, att) -> Tensor:
        """Layer ``i``'s attention for a batch with one query head per kv head: ``q, k, v`` float32
        ``[B, D]`` -> float16 ``[B, D]``. The B caches are one state ``[B * S, D]`` per layer (sequence
        ``b``'s rows ``b * S ..``): the B new rows are written by one MEM Scatter at ``b * S + pos[b]``,
        and every operation of :meth:`attention` runs once over ``[B, S, D]`` (B times the vectors, the
        same number of kernels: one chain of kernels for the whole batch, not B)."""
        g, cfg, S, B = self.g, self.cfg, self.S, self.B
        D = cfg.n_kv_heads * cfg.head_dim
        rows, mask, segs, seg_t = att[1:]
        self.part("kv")
        if self.tiled:
            return self.f16(g.reshape(self._tiled(i, "", g.reshape(q, (B, 1, D)), k, v, mask), (B, D)))
        K = g.state(f"k{i - self.first}", (B * S, D), "float16")
        V = g.state(f"v{i - self.first}", (B * S, D), "float16")
        K_new = g.scatter(K, rows, self.f16(k))
        V_new = g.scatter(V, rows, self.f16(v))
        g.assign(K, K_new)
        g.assign(V, V_new)
        self.part("attn")
        sc = self._scores(self.f16(g.reshape(q, (B, 1, D))), g.reshape(K_new, (B, S, D)), segs, mask)  # [B, S, Hkv]
        return self.f16(g.reshape(self._mix(sc, g.reshape(V_new, (B, S, D)), seg_t), (B, D)))

    def _chunk_attention(self, pos: Tensor):
        """A prompt chunk's attention constants (:meth:`chunk_attention`): ``(pos, mask, segs, seg_t)`` with
        ``mask`` float32 ``[B * G, S, Hkv]``, ``MASK`` after the position of each query row (row ``b * G + j``:
        query head ``j`` of the chunk's row ``b``, at ``pos[b]``)."""
        g, B = self.g, self.B
        G = self.cfg.n_heads // self.cfg.n_kv_heads
        if self.tiled:
            return (pos, self._tiles(pos, g.cast(pos, "float32"))) + self._head_constants()
        posf = g.reshape(g.cast(pos, "float32"), (B, 1))
        if G > 1:           # each row's position once per query head of a group
            posf = g.mul(posf, g.constant("chunk_heads", np.ones((1, G), F32)))
        return (pos, self._mask(g.reshape(posf, (B * G, 1, 1)))) + self._head_constants()

    def chunk_attention(self, i: int, q: Tensor, k: Tensor, v: Tensor, att) -> Tensor:
        """Layer ``i``'s attention for a prompt chunk: ``B`` positions of one sequence (``q`` float32
        ``[B, H * hd]``, heads in :meth:`head_order`; ``k, v`` ``[B, Hkv * hd]``) -> float16 ``[B, H * hd]``.

        The B new rows go into the one cache (the single-sequence state ``k<i>``, ``v<i>``) by one MEM
        Scatter at their positions, before anything reads it; every query row then attends over the whole
        cache with the mask "position <= its own", so causality within the chunk needs nothing more: a row
        sees the rows before it in the chunk (just written) and never those after (masked). Each query row's
        arithmetic is :meth:`attention`'s, so the chunk gives the token-by-token results row for row."""
        g, cfg, S, B = self.g, self.cfg, self.S, self.B
        H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        G, D = H // Hkv, Hkv * hd
        pos, mask, segs, seg_t = att
        self.part("kv")
        if self.tiled:
            o = self._tiled(i, self.cache_tag, g.reshape(q, (B * G, 1, D)), k, v, mask)
            return self.f16(g.reshape(o, (B, H * hd)))
        K = g.state(f"k{i - self.first}{self.cache_tag}", (S, D), "float16")
        V = g.state(f"v{i - self.first}{self.cache_tag}", (S, D), "float16")
        K_new = g.scatter(K, pos, self.f16(k))
        V_new = g.scatter(V, pos, self.f16(v))
        g.assign(K, K_new)
        g.assign(V, V_new)
        self.part("attn")
        sc = self._scores(self.f16(g.reshape(q, (B * G, 1, D))), K_new, segs, mask)          # [B G, S, Hkv]
        o = self._mix(sc, V_new, seg_t)                                                     # [B G, 1, D]
        return self.f16(g.reshape(o, (B, H * hd)))

    def _batch_attention(self, pos: Tensor):
        """Per sequence ``b`` of a batch: ``(pos_b, posf_b, mask_b, segs, seg_t)`` as :meth:`_attention_constants`
        gives for one sequence (the head matrices shared), ``pos_b`` int32 ``[1]`` sliced from ``pos [B]``."""
        g = self.g
        rows = []
        for b in range(self.B):
            pb = g.slice(pos, (slice(b, b + 1),))
            pf = g.cast(pb, "float32")
            rows.append((pb, pf, self._tiles(pb, pf) if self.tiled else self._mask(pf)))
        heads = self._head_constants()
        return [r + heads for r in rows]

    # ---- the model -------------------------------------------------------------------------------
    def _stage_input(self) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(the residual x, the partial sum of a sharded MLP or None) the stage starts from: None for a stage
        that starts with the embedding; after a group of shards side by side, shard 0's ``x_in`` (x and its
        part, ``[2, d]``) plus the other shards' ``y_in<j>``; inside a row of MLP shards, (x, the partial sum)
        as the two rows of ``x_in``; else ``x_in`` ``[B, d]``."""
        g, d = self.g, self.cfg.d_model
        u0 = self.units[0]
        if u0[0] == "embed" and (len(u0) == 2 or u0[2] == 0):
            return None, None
        if self.fan_in or (u0[0] == "mlp" and len(u0) == 4 and u0[2] > 0 and not self.parallel):
            xa = g.input("x_in", (2, d), "float32")
            x, acc = g.slice(xa, (slice(0, 1), slice(None))), g.slice(xa, (slice(1, 2), slice(None)))
            if not self.fan_in:
                return x, acc
            for j in range(1, self.fan_in):
                acc = g.add(acc, g.input(f"y_in{j}", (1, d), "float32"))
            return g.add(x, acc), None
        return g.input("x_in", (self.B, d), "float32"), None

    def build(self) -> Tuple[Graph, List[Tuple[str, int, int]]]:
        g, cfg = self.g, self.cfg
        kinds = [u[0] for u in self.units]
        self.part("inputs")
        gpt2 = cfg.family == "gpt2"
        B = self.B
        tok = g.input("tok", (B,), "int32") if "embed" in kinds else None
        pos = g.input("pos", (B,), "int32") if "attn" in kinds or (gpt2 and tok is not None) else None
        x, acc = self._stage_input()
        att = None
        if "attn" in kinds and self.shared:
            assert pos is not None
            self.part("kv")
            att = self._chunk_attention(pos)
        elif "attn" in kinds and B > 1:
            assert pos is not None
            self.part("kv")
            att = self._batch_attention(pos) if cfg.n_heads != cfg.n_kv_heads else self._stacked_attention(pos)
        elif "attn" in kinds:
            assert pos is not None
            self.part("kv")
            posf = g.cast(pos, "float32")
            att = (pos, posf) + self._attention_constants(pos, posf)
        logits = []
        for u in self.units:
            kind, i = u[0], u[1]
            if kind == "embed":
                assert tok is not None              # a stage with the embedding takes "tok" (and gpt2's "pos")
                self.part("embed")
                if len(u) == 4:
                    self._suffix = f"_s{u[2] - self._shard0['embed']}"
                    row = self.embed(tok, cfg.embedding_name, shard_range(cfg, u[2], u[3], "embed"))
                    self._suffix = ""
                    x = row if x is None else g.add(x, row)
                elif gpt2:
                    assert pos is not None
                    x = self._gpt2_embed(tok, pos)
                else:
                    x = self.embed(tok, "model.embed_tokens.weight")
                continue
            assert x is not None                    # the stage's input "x_in", or its embedding
            if len(u) == 4 and kind == "head":
                self._suffix = f"_s{u[2] - self._shard0['head']}"
                logits.append(self._llama_head(x, shard_range(cfg, u[2], u[3], "head")))
                self._suffix = ""
            elif len(u) == 4 and self.parallel:      # its part; shard 0 sends x with it
                y = self._attn_part(i, u[2], u[3], x, att) if kind == "attn" else self._shard_part(i, u[2], u[3], x)
                x = g.concat([x, y], axis=0) if u[2] == 0 else y
            elif len(u) == 4:
                x, acc = self._mlp_shard(i, u[2], u[3], x, acc)
                if u[2] == u[3] - 1:
                    self.probes[f"x{i}"] = x
            elif kind == "attn":
                x = (self._gpt2_attn if gpt2 else self._llama_attn)(i, x, att)
            elif kind == "mlp":
                x = (self._gpt2_mlp if gpt2 else self._llama_mlp)(i, x)
                self.probes[f"x{i}"] = x
            else:
                if self.shared:     # a prompt chunk: the next token needs the last row's logits only
                    x = g.slice(x, (slice(B - 1, B), slice(None)))
                x = (self._gpt2_head if gpt2 else self._llama_head)(x)
        assert x is not None        # a stage has at least one unit
        if acc is not None:         # the stage ends inside a sharded MLP
            x = g.concat([x, acc], axis=0)
        last = self.units[-1]
        if logits:                  # its head shards' logits; the residual goes on to the next head shard
            g.output("logits", logits[0] if len(logits) == 1 else g.concat(logits, axis=-1))
            if last[2] < last[3] - 1:
                g.output("x_out", g.add(x, 0.0))
        else:
            g.output("logits" if kinds[-1] == "head" else "x_out", x)
        self.finish()
        return g, self.spans

    def _heads(self, x: Tensor, n: int) -> Tensor:
        return self.g.reshape(x, (n, 1, self.cfg.head_dim))

    # ---- llama / mixtral units ---------------------------------------------------------------------
    def _llama_attn(self, i: int, x: Tensor, att) -> Tensor:
        g, cfg = self.g, self.cfg
        pos = att[0]
        p = f"model.layers.{i}."
        assert cfg.rope_theta is not None       # llama and mixtral always have a rotary base
        self.part("norm")
        h = self.norm(x, p + "input_layernorm.weight", None)
        self.part("attn")
        if self.B > 1:
            qa, ka, va = (self.linear(h, p + f"self_attn.{n}_proj.weight", True) for n in "qkv")
            if self.shared:     # a prompt chunk: every row rotated at once (positions [B], one index broadcast)
                qr1, kr1 = (self._rope_rows(t, n, att[0]) for t, n in ((qa, cfg.n_heads), (ka, cfg.n_kv_heads)))
                a = self.chunk_attention(i, qr1, kr1, va, att)
            elif isinstance(att, tuple):    # one cache state: each row rotated by its position, then stacked
                qr, kr = ([g.reshape(g.rope(self._heads(self._row(t, b), n), self._row_pos(att[0], b),
                                            base=cfg.rope_theta, max_positions=self.S), (1, n * cfg.head_dim))
                           for b in range(self.B)]
                          for t, n in ((qa, cfg.n_heads), (ka, cfg.n_kv_heads)))
                a = self.stacked_attention(i, g.concat(qr, axis=0), g.concat(kr, axis=0), va, att)
            else:
                a = g.concat([self._llama_row_attn(i, b, qa, ka, va, att[b]) for b in range(self.B)], axis=0)
            return g.add(x, self.linear(a, p + "self_attn.o_proj.weight", True))
        q = g.rope(self._heads(self.linear(h, p + "self_attn.q_proj.weight", True), cfg.n_heads), pos,
                   base=cfg.rope_theta, max_positions=self.S)
        k = g.rope(self._heads(self.linear(h, p + "self_attn.k_proj.weight", True), cfg.n_kv_heads), pos,
                   base=cfg.rope_theta, max_positions=self.S)
        v = self._heads(self.linear(h, p + "self_attn.v_proj.weight", True), cfg.n_kv_heads)
        a = self.attention(i, q, k, v, att)
        return g.add(x, self.linear(a, p + "self_attn.o_proj.weight", True))

    def _attn_part(self, i: int, j: int, t: int, x: Tensor, att) -> Tensor:
        """Attention shard ``j`` of ``t`` of layer ``i`` (its ``n_kv_heads / t`` kv heads and their query heads;
        ``self.cfg`` is :func:`attn_shard_config`'s): its part of the o projection's output, ``[1, d]``."""
        g, cfg = self.g, self.cfg
        p = f"model.layers.{i}."
        assert cfg.rope_theta is not None       # llama and mixtral always have a rotary base
        qd, kd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        qr, kr = (j * qd, (j + 1) * qd), (j * kd, (j + 1) * kd)
        self.part("norm")
        h = self.norm(x, p + "input_layernorm.weight", None)
        self.part("attn")
        q = g.rope(self._heads(self.linear(h, p + _Q_PROJ, True, cols=qr), cfg.n_heads), att[0],
                   base=cfg.rope_theta, max_positions=self.S)
        k = g.rope(self._heads(self.linear(h, p + "self_attn.k_proj.weight", True, cols=kr), cfg.n_kv_heads),
                   att[0], base=cfg.rope_theta, max_positions=self.S)
        v = self._heads(self.linear(h, p + "self_attn.v_proj.weight", True, cols=kr), cfg.n_kv_heads)
        return self.linear(self.attention(i, q, k, v, att), p + _O_PROJ, True, rows=qr)

    def _rope_rows(self, x: Tensor, n: int, pos: Tensor) -> Tensor:
        """``x [B, n * hd]`` (B rows, n heads) with row ``b`` rotated by position ``pos[b]``: one rope over
        ``[n, B, hd]`` (heads first, so that the rows are rope's positions axis), whose positions are made
        ready for the tables once for all rows; the same arithmetic as one rope per row."""
        g, cfg, B = self.g, self.cfg, self.B
        assert cfg.rope_theta is not None
        xt = g.transpose(g.reshape(x, (B, n, cfg.head_dim)), (1, 0, 2))
        r = g.rope(xt, pos, base=cfg.rope_theta)
        return g.reshape(g.transpose(r, (1, 0, 2)), (B, n * cfg.head_dim))

    def _row_pos(self, pos: Tensor, b: int) -> Tensor:
        """Sequence ``b``'s position, int32 ``[1]`` (sliced once, kept for every layer)."""
        key = ("pos", b)
        if key not in self._rows:
            self._rows[key] = self.g.slice(pos, (slice(b, b + 1),))
        return self._rows[key]

    def _row(self, x: Tensor, b: int) -> Tensor:
        """Row ``b`` of ``x [B, N]`` as ``[1, N]`` (sequence ``b`` of a batch)."""
        return self.g.slice(x, (slice(b, b + 1), slice(None)))

    def _llama_row_attn(self, i: int, b: int, qa: Tensor, ka: Tensor, va: Tensor, att) -> Tensor:
        """Sequence ``b``'s attention in layer ``i`` of a batch: its rows of the q, k, v projections
        (float32 ``[B, .]``) rotated by its position, over its own cache; float16 ``[1, H * hd]``."""
        g, cfg = self.g, self.cfg
        assert cfg.rope_theta is not None
        q = g.rope(self._heads(self._row(qa, b), cfg.n_heads), att[0], base=cfg.rope_theta,
                   max_positions=self.S)
        k = g.rope(self._heads(self._row(ka, b), cfg.n_kv_heads), att[0], base=cfg.rope_theta,
                   max_positions=self.S)
        return self.attention(i, q, k, self._heads(self._row(va, b), cfg.n_kv_heads), att, row=b)

    def _llama_mlp(self, i: int, x: Tensor) -> Tensor:
        g, cfg = self.g, self.cfg
        p = f"model.layers.{i}."
        self.part("norm")
        h = self.norm(x, p + "post_attention_layernorm.weight", None)
        if cfg.family == "mixtral":
            self.part("moe")
            return g.add(x, self._moe(h, p + "block_sparse_moe."))
        self.part("mlp")
        return g.add(x, self._swiglu(h, p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight",
                                     p + "mlp.down_proj.weight"))

    def _llama_head(self, x: Tensor, vocab: Optional[Tuple[int, int]] = None) -> Tensor:
        """Final norm and head; ``vocab``: only the logits of that range of tokens (a shard)."""
        self.part("norm")
        h = self.norm(x, "model.norm.weight", None)
        self.part("head")
        return self.linear(h, self.cfg.head_name, True, cols=vocab)

    def _swiglu(self, h, gate, up, down, ff: Optional[Tuple[int, int]] = None) -> Tensor:
        """``down(silu(gate(h)) * up(h))``; ``ff``: only that range of the hidden features (a shard)."""
        g = self.g
        a = g.mul(g.silu(self.linear(h, gate, True, cols=ff)), self.linear(h, up, True, cols=ff))
        return self.linear(self.f16(a), down, True, rows=ff)

    def _mlp_shard(self, i: int, j: int, t: int, x: Tensor, acc: Optional[Tensor]):
        """Shard ``j`` of ``t`` of layer ``i``'s MLP or mixture of experts (:meth:`_shard_part`): adds its
        part to the partial sum ``acc``; the last shard adds the sum to the residual. Returns (x, acc or None)."""
        y = self._shard_part(i, j, t, x)
        acc = y if acc is None else self.g.add(acc, y)
        if j == t - 1:
            return self.g.add(x, acc), None
        return x, acc

    def _shard_part(self, i: int, j: int, t: int, x: Tensor) -> Tensor:
        """Shard ``j`` of ``t`` of layer ``i``'s MLP (a range of its hidden features) or mixture of experts
        (a range of its experts, :func:`shard_range`): its part of the block's output, ``[1, d]``."""
        p = f"model.layers.{i}."
        lo, hi = shard_range(self.cfg, j, t)
        self._suffix = f"_s{j - self._shard0[i]}"
        self.part("norm")
        h = self.norm(x, p + "post_attention_layernorm.weight", None)
        if self.cfg.family == "mixtral":
            self.part("moe")
            y = self._moe(h, p + "block_sparse_moe.", experts=(lo, hi))
        else:
            self.part("mlp")
            y = self._swiglu(h, p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", p + "mlp.down_proj.weight",
                             ff=(lo, hi))
        self._suffix = ""
        return y

    def _moe(self, h: Tensor, p: str, experts: Optional[Tuple[int, int]] = None) -> Tensor:
        """Router softmax, top-k by repeated arg-max (ties to the lower expert), renormalised gates; every
        expert is computed (a static program) and weighted by its gate, 0 for the unchosen ones.
        ``experts``: only that range of experts (a shard; the router is computed whole)."""
        g, cfg = self.g, self.cfg
        E = cfg.n_experts
        probs = g.softmax(self.linear(h, p + "gate.weight", True))             # [1, E] float32
        # prefer the lower index on ties: a tiny decreasing bias that never reorders distinct probabilities
        # is not exact, so ties are broken by a first-maximum mask instead
        lower = g.constant(self.key(p) + "lower", np.triu(np.ones((E, E), F16), 1))  # [j, e]: j < e
        left = probs
        chosen = None
        for _ in range(cfg.top_k):
            m = g.max(left, keepdims=True)                                       # [1, 1]
            is_max = g.sub(1.0, g.minimum(g.mul(g.sub(m, left), 2.0 ** 100), 1.0))  # 1 where left == max
            # keep only the first maximum: subtract any earlier maximum (count of earlier maxima >= 1 -> 0)
            earlier = g.matmul(self.f16(is_max), lower, out_dtype="float32")      # [1, E]: maxima before e
            first = g.mul(is_max, g.sub(1.0, g.minimum(earlier, 1.0)))
            chosen = first if chosen is None else g.add(chosen, first)
            left = g.sub(left, g.mul(first, 4.0))                                # out of the running
        gates = g.mul(probs, chosen)
        gates = g.div(gates, g.sum(gates, keepdims=True))                        # [1, E]
        out = None
        e0, e1 = experts if experts is not None else (0, E)
        self._expert_base = e0
        for e in range(e0, e1):
            q = f"{p}experts.{e}."
            # expert e's gate, picked by a one-hot constant rather than a slice at e, so that a shard's
            # graph does not depend on which experts it holds (exact: one nonzero term)
            sel = g.constant(self.key(q + "select"), np.eye(E, dtype=F32)[e:e + 1])
            y = g.mul(self._swiglu(h, q + "w1.weight", q + "w3.weight", q + "w2.weight"),
                      g.sum(g.mul(gates, sel), keepdims=True))
            out = y if out is None else g.add(out, y)
        self._expert_base = 0
        assert out is not None                  # a shard holds at least one expert
        return out

    # ---- gpt2 units ----------------------------------------------------------------------------------
    def _gpt2_embed(self, tok: Tensor, pos: Tensor) -> Tensor:
        g = self.g
        wpe = g.constant("wpe", self.w["wpe.weight"][:self.S].astype(F16))
        return g.add(self.embed(tok, "wte.weight"), g.cast(g.gather(wpe, pos), "float32"))

    def _gpt2_attn(self, i: int, x: Tensor, att) -> Tensor:
        g, cfg = self.g, self.cfg
        d = cfg.d_model
        p = f"h.{i}."
        self.part("norm")
        h = self.norm(x, p + "ln_1.weight", p + "ln_1.bias")
        self.part("attn")
        qkv = self.linear(h, p + "attn.c_attn.weight", False, p + "attn.c_attn.bias")
        if self.B > 1 and isinstance(att, tuple):       # the B caches as one state, or a prompt chunk's one
            qs, ks, vs = (g.slice(qkv, (slice(None), slice(j * d, (j + 1) * d))) for j in range(3))
            a = (self.chunk_attention if self.shared else self.stacked_attention)(i, qs, ks, vs, att)
        elif self.B > 1:      # each sequence's row over its own cache
            rows = [[g.slice(qkv, (slice(b, b + 1), slice(j * d, (j + 1) * d))) for j in range(3)]
                    for b in range(self.B)]
            a = g.concat([self.attention(i, q, k, v, att[b], row=b) for b, (q, k, v) in enumerate(rows)], axis=0)
        else:
            q, k, v = (g.slice(qkv, (slice(None), slice(j * d, (j + 1) * d))) for j in range(3))
            a = self.attention(i, q, k, v, att)
        return g.add(x, self.linear(a, p + "attn.c_proj.weight", False, p + "attn.c_proj.bias"))

    def _gpt2_mlp(self, i: int, x: Tensor) -> Tensor:
        g = self.g
        p = f"h.{i}."
        self.part("norm")
        h = self.norm(x, p + "ln_2.weight", p + "ln_2.bias")
        self.part("mlp")
        z = self.linear(h, p + "mlp.c_fc.weight", False, p + "mlp.c_fc.bias")
        h16 = self.f16(g.gelu(z))
        if self.precision == "int8":
            # gelu(z) <= z above 0 and -GELU_MIN < gelu(z) < 0 below: max|gelu(z)| <= max(max z, GELU_MIN),
            # reduced from z beside gelu itself, not after it (the digit scale, :meth:`norm`)
            self._bound[h16.id] = g.maximum(g.max(z, keepdims=True), GELU_MIN)
        return g.add(x, self.linear(h16, p + "mlp.c_proj.weight", False, p + "mlp.c_proj.bias"))

    def _gpt2_head(self, x: Tensor) -> Tensor:
        cfg = self.cfg
        self.part("norm")
        h = self.norm(x, "ln_f.weight", "ln_f.bias")
        self.part("head")
        return self.linear(h, cfg.head_name, True)


def side_by_side(unit: tuple) -> bool:
    """Whether ``unit`` is an attention or MLP shard, which run side by side with ``parallel_shards``."""
    return len(unit) == 4 and unit[0] in ("attn", "mlp")


def group_start(units: List[tuple], a: int) -> int:
    """The index of the first shard of unit ``a``'s group of shards (``a`` itself for other units)."""
    return a - units[a][2] if side_by_side(units[a]) else a


def attn_shard_config(cfg: ModelConfig, t: int) -> ModelConfig:
    """``cfg`` as one of ``t`` attention shards sees it: ``n_kv_heads / t`` kv heads and their query heads."""
    if cfg.n_kv_heads % t:
        raise ValueError(f"{cfg.name}: {t} attention shards do not divide its {cfg.n_kv_heads} kv heads")
    return dataclasses.replace(cfg, n_heads=cfg.n_heads // t, n_kv_heads=cfg.n_kv_heads // t,
                               name=f"{cfg.name}/attn{t}")


def model_units(cfg: ModelConfig, shards: int = 1, table_shards: int = 1, attn_shards: int = 1) -> List[tuple]:
    """The model as a sequence of units a pipeline may cut between: the embedding, then per layer its
    attention block and its MLP (or mixture-of-experts) block, each with its norm and residual add, then
    the final norm and head: ``[("embed", None), ("attn", 0), ("mlp", 0), ..., ("head", None)]``.
    ``shards > 1`` (llama and mixtral) cuts every MLP into that many units ``("mlp", i, j, shards)``, each
    a range of the hidden features or of the experts (:func:`shard_range`), for an MLP bigger than a chip;
    ``table_shards > 1`` cuts the embedding table into that many ranges of rows (tokens) and the head into
    ranges of its logits, ``("embed", None, j, table_shards)`` and ``("head", None, j, table_shards)``."""
    if (shards > 1 or table_shards > 1) and cfg.family == "gpt2":
        raise ValueError("sharded MLPs and tables are built for the llama and mixtral families")
    if not 1 <= table_shards <= cfg.vocab_size:
        raise ValueError(f"table_shards must be 1..{cfg.vocab_size}, not {table_shards}")
    limit = cfg.n_experts if cfg.family == "mixtral" else cfg.d_ff
    if not 1 <= shards <= limit:
        raise ValueError(f"shards must be 1..{limit}, not {shards}")
    if attn_shards < 1 or cfg.n_kv_heads % attn_shards or (attn_shards > 1 and cfg.family == "gpt2"):
        raise ValueError(f"attn_shards must divide the {cfg.n_kv_heads} kv heads (llama, mixtral), not {attn_shards}")
    T = table_shards
    out: List[tuple] = [("embed", None)] if T == 1 else [("embed", None, j, T) for j in range(T)]
    for i in range(cfg.n_layers):
        out += [("attn", i)] if attn_shards == 1 else [("attn", i, j, attn_shards) for j in range(attn_shards)]
        out += [("mlp", i)] if shards == 1 else [("mlp", i, j, shards) for j in range(shards)]
    return out + ([("head", None)] if T == 1 else [("head", None, j, T) for j in range(T)])


def shard_range(cfg: ModelConfig, j: int, t: int, kind: str = "mlp") -> Tuple[int, int]:
    """The hidden features (llama) or experts (mixtral) ``[lo, hi)`` of MLP shard ``j`` of ``t``; for
    ``kind`` "embed" or "head", the tokens; for "attn", the kv heads."""
    n = cfg.vocab_size if kind in ("embed", "head") else cfg.n_kv_heads if kind == "attn" else \
        cfg.n_experts if cfg.family == "mixtral" else cfg.d_ff
    return (j * n) // t, ((j + 1) * n) // t


def layer_units(cfg: ModelConfig, layers: Tuple[int, int]) -> Tuple[int, int]:
    """The unit range of layers ``[a, b)``: with the embedding when ``a == 0`` and the head when ``b`` is
    the last layer."""
    a, b = int(layers[0]), int(layers[1])
    if not 0 <= a < b <= cfg.n_layers:
        raise ValueError(f"layers must be a range inside 0..{cfg.n_layers}, got {layers}")
    return (0 if a == 0 else 1 + 2 * a), 1 + 2 * b + (1 if b == cfg.n_layers else 0)


def build_step(cfg: ModelConfig, w, quantized, precision: str, capacity: int, block: int = DEFAULT_BLOCK,
               layers: Optional[Tuple[int, int]] = None, units: Optional[Tuple[int, int]] = None,
               shards: int = 1, table_shards: int = 1, batch: int = 1, shared_cache: bool = False,
               cache_row: Optional[int] = None, parallel_shards: bool = False, attn_shards: int = 1):
    """The step graph of ``cfg`` (or of the pipeline stage holding ``layers``, or the units ``[u0, u1)``
    of :func:`model_units` with ``shards``) for ``batch`` sequences, and its part spans (module docstring).
    ``shared_cache``: the ``batch`` rows are consecutive positions of one sequence sharing its cache, a
    prompt chunk (module docstring, "Prefill"); its ``logits`` are the last row's, ``[1, vocab]``;
    ``cache_row``: the chunk writes the cache of that row of a batch (states ``k<l>_b<row>``);
    ``parallel_shards``: a layer's MLP shards (and its ``attn_shards`` attention shards) are stages side by
    side (module docstring)."""
    return StepBuilder(cfg, w, quantized, precision, capacity, block, layers, units, shards, table_shards,
                       batch, shared_cache, cache_row, parallel_shards, attn_shards).build()
