"""Plain-NumPy reference forward pass of the llama, mixtral and gpt2 families, with a KV cache.

This is the ground truth the compiled, chip-simulated models are checked against, so it is written for
clarity and Hugging Face fidelity, not speed, and does not depend on lpucore's compiler.

Conventions (those of Hugging Face ``transformers``):

* Arithmetic is float32 throughout. Weights are first rounded to the chosen storage ``precision``: ``"fp16"``
  (default; the fp16 checkpoint), ``"fp32"`` (as given; use it for bf16 checkpoints, which load as float32
  exactly) or ``"int8"`` (fp16, then every matmul weight quantised per output channel, see
  :meth:`ModelConfig.int8_tensors`, and dequantised to float32).
* Activations are ``[T, features]`` for the ``T`` tokens of a chunk; heads are ``[heads, T, head_dim]``.
* Llama RMSNorm: ``x * rsqrt(mean(x**2) + eps) * w``. GPT-2 LayerNorm: ``(x - mean) / sqrt(var + eps) * w + b``
  with the biased variance.
* RoPE (rotate-half form): ``x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]`` (halves
  of the head), angles ``position * inv_freq`` for ``inv_freq[i] = theta ** (-2 i / head_dim)``, both halves
  sharing the same angles; applied to q and k at their absolute positions before k enters the cache.
* Attention: ``softmax(q k^T / sqrt(head_dim) + causal_mask) v``; query head ``h`` uses kv head
  ``h // (n_heads // n_kv_heads)`` (GQA).
* Llama MLP (SwiGLU): ``down(silu(gate(x)) * up(x))``. Mixtral: router ``softmax(gate(x))`` over all experts,
  the ``top_k`` largest renormalised to sum 1 (ties go to the lower expert index), output
  ``sum_e weight_e * expert_e(x)`` with ``expert = SwiGLU(w1=gate, w3=up, w2=down)``.
* GPT-2: token plus learned position embeddings, pre-norm blocks, ``c_attn`` output split into q, k, v
  (in that order), Conv1D ``x @ W + b``, GELU tanh form ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.
* Output: final norm, then ``logits = x @ head.T`` (head = embedding when tied).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .shapes import ModelConfig
from .weights import check_names, dequantize_int8, normalize_weights, quantize_int8

PRECISIONS = ("fp16", "fp32", "int8")
F32 = np.float32
TokenIds = Union[Sequence[int], np.ndarray]      # token ids: a list, or a 1-D integer array


# ---------------------------------------------------------------------- building blocks (float32 in and out)

def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """Llama RMSNorm over the last axis."""
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x * (F32(1.0) / np.sqrt(ms + F32(eps))) * w


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """GPT-2 LayerNorm over the last axis (biased variance, as torch.nn.LayerNorm)."""
    mu = np.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = np.mean(xc * xc, axis=-1, keepdims=True)
    return xc / np.sqrt(var + F32(eps)) * w + b


def silu(x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(x)``; sigmoid through tanh so large |x| neither overflows nor warns."""
    return x * (F32(0.5) * (F32(1.0) + np.tanh(F32(0.5) * x)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GPT-2's GELU ("gelu_new"): ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    c = F32(math.sqrt(2.0 / math.pi))
    return F32(0.5) * x * (F32(1.0) + np.tanh(c * (x + F32(0.044715) * x * x * x)))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax with the max subtracted first (``-inf`` entries give exactly 0)."""
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float) -> Tuple[np.ndarray, np.ndarray]:
    """``cos`` and ``sin`` ``[T, head_dim]`` of the rotary angles at ``positions``.

    Computed as Hugging Face does: ``inv_freq`` and ``position * inv_freq`` in float32 (at large positions the
    float32 angle differs from the exact one by up to half an ulp of the angle; matching that keeps the reference
    bit-close to checkpoints' own runs). Each half of the head uses the same angles.
    """
    inv_freq = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(F32) / F32(head_dim))))
    inv_freq = inv_freq.astype(F32)
    ang = np.asarray(positions, dtype=F32)[:, None] * inv_freq[None, :]
    ang = np.concatenate([ang, ang], axis=-1)
    return np.cos(ang.astype(np.float64)).astype(F32), np.sin(ang.astype(np.float64)).astype(F32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate ``x [heads, T, head_dim]`` by angles whose ``cos`` / ``sin`` are ``[T, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
    """Causal grouped-query attention of a chunk of queries over the cache.

    ``q [H, T, hd]`` are the queries at absolute positions ``start .. start + T - 1``; ``k, v [Hkv, S, hd]`` hold
    every key/value at positions ``0 .. S - 1`` with ``S = start + T``. Returns ``[T, H * hd]`` (heads
    concatenated in order, as the output projection expects).
    """
    H, T, hd = q.shape
    Hkv, S, _ = k.shape
    g = H // Hkv
    qg = q.reshape(Hkv, g * T, hd)                       # query head h = kv * g + j reads kv head h // g
    scores = (qg @ k.transpose(0, 2, 1)) * F32(1.0 / math.sqrt(hd))
    scores = scores.reshape(Hkv, g, T, S)
    future = np.arange(S)[None, :] > (start + np.arange(T))[:, None]    # key after the query: masked
    scores = np.where(future, F32(-np.inf), scores)
    probs = softmax(scores, axis=-1).reshape(Hkv, g * T, S)
    out = (probs @ v).reshape(H, T, hd)
    return out.transpose(1, 0, 2).reshape(T, H * hd)


class KVCache:
    """Keys and values of every layer, ``[n_kv_heads, position, head_dim]`` float32, grown as needed."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_positions: int):
        self.n_layers, self.n_kv_heads, self.head_dim, self.max_positions = n_layers, n_kv_heads, head_dim, \
            max_positions
        self.reset()

    def reset(self) -> None:
        self.length = 0
        self._k = [np.zeros((self.n_kv_heads, 0, self.head_dim), F32) for _ in range(self.n_layers)]
        self._v = [np.zeros((self.n_kv_heads, 0, self.head_dim), F32) for _ in range(self.n_layers)]

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Store ``k, v [Hkv, T, hd]`` at positions ``length .. length + T - 1``; return all keys/values so far.

        ``length`` itself advances in :meth:`advance`, once every layer has appended the chunk.
        """
        end = self.length + k.shape[1]
        cap = self._k[layer].shape[1]
        if end > cap:           # double the capacity so a long decode costs amortised O(1) copies per token
            new = min(self.max_positions, max(end, 2 * cap, 16))
            for store in (self._k, self._v):
                grown = np.zeros((self.n_kv_heads, new, self.head_dim), F32)
                grown[:, :self.length] = store[layer][:, :self.length]
                store[layer] = grown
        self._k[layer][:, self.length:end] = k
        self._v[layer][:, self.length:end] = v
        return self._k[layer][:, :end], self._v[layer][:, :end]

    def advance(self, tokens: int) -> None:
        self.length += tokens

    def keys(self, layer: int) -> np.ndarray:
        """Layer ``layer``'s cached keys, float32 ``[n_kv_heads, length, head_dim]`` (a copy)."""
        return self._k[layer][:, :self.length].copy()

    def values(self, layer: int) -> np.ndarray:
        """Layer ``layer``'s cached values, float32 ``[n_kv_heads, length, head_dim]`` (a copy)."""
        return self._v[layer][:, :self.length].copy()


EAGER_BYTES = 2 << 30    # models whose float32 weights fit in this many bytes are prepared up front


class WeightStore(Mapping):
    """The reference's weights: ``store[name]`` is the float32 array the reference multiplies by.

    Each tensor is rounded to the storage precision (fp16 unless ``"fp32"``) and, for ``"int8"``, quantised
    per output channel and dequantised (:attr:`quantized` keeps the int8 data). A model whose float32 weights
    fit in :data:`EAGER_BYTES` is prepared at once and kept as float32. A bigger one (a 7B model) is prepared
    tensor by tensor on first use and kept compactly, the int8 data (or the fp16 array) only, and expanded to
    float32 on each access: the values are the same either way, the big model just costs its storage size in
    host memory rather than four bytes a weight. ``weights`` may itself be lazy
    (:class:`~lpucore.llm.weights.RandomWeights`).
    """

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, np.ndarray], precision: str):
        self.cfg, self.precision = cfg, precision
        if isinstance(weights, dict):
            weights = normalize_weights(cfg, weights)
        else:
            check_names(cfg, weights)
        #: the tensors before rounding; None once an eager store has prepared them all
        self.source: Optional[Mapping[str, np.ndarray]] = weights
        self.int8 = cfg.int8_tensors() if precision == "int8" else {}
        self.shapes = cfg.tensor_shapes()
        self.names = list(self.shapes)
        self.eager = 4 * cfg.parameter_count() <= EAGER_BYTES
        self._q: Dict[str, Tuple[np.ndarray, np.ndarray, int]] = {}
        self._kept: Dict[str, Optional[np.ndarray]] = {}      # None: a lazy store's int8 tensor (in _q)
        self.quantized = _Quantized(self)
        if self.eager:
            for name in self.names:
                self._kept[name] = self._prepare(name)
            self.source = None

    def _prepare(self, name: str) -> Optional[np.ndarray]:
        """The float32 weight (eager) or its compact form (lazy: fp16, or int8 via :attr:`_q`, then None)."""
        assert self.source is not None       # only an eager store drops it, having prepared every tensor
        if self._made_int8(name):
            q, scale, axis = self._q[name]
            return dequantize_int8(q, scale, axis) if self.eager else None
        a = np.asarray(self.source[name])
        if tuple(a.shape) != self.shapes[name]:
            raise ValueError(f"{self.cfg.name}: tensor {name!r} has shape {tuple(a.shape)}, expected "
                             f"{self.shapes[name]}")
        if self.precision != "fp32":
            with np.errstate(over="ignore"):  # overflow is reported here, with the tensor's name
                h = a.astype(np.float16)      # the stored checkpoint precision
            if np.isinf(h).any() and not np.isinf(a).any():
                raise ValueError(f"tensor {name!r} overflows fp16 (a bf16 checkpoint?): use precision='fp32'")
            a = h
        if name in self.int8:
            q, scale = quantize_int8(a.astype(F32), self.int8[name])
            self._q[name] = (q, scale, self.int8[name])
            return dequantize_int8(q, scale, self.int8[name]) if self.eager else None
        return a.astype(F32) if self.eager or self.precision == "fp32" else a

    def _made_int8(self, name: str) -> bool:
        """Whether the source made int8 tensor ``name``'s quantised form itself (random weights:
        ``source.int8``, what quantising its float16 values gives, without making them), now in :attr:`_q`."""
        make = getattr(self.source, "int8", None)
        if name not in self.int8 or self.precision != "int8" or not callable(make):
            return False
        got = make(name, self.int8[name])
        if got is None:
            return False
        self._q[name] = (got[0], got[1], self.int8[name])
        return True

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._kept:
            kept = self._kept[name]
        elif name in self.shapes:
            kept = self._kept[name] = self._prepare(name)
        else:
            raise KeyError(name)
        if name in self.int8 and not self.eager:
            return dequantize_int8(*self._q[name])
        assert kept is not None              # only a lazy store's int8 tensors are kept as None
        return kept if self.eager else kept.astype(F32)

    def prepare(self) -> None:
        """Prepare every tensor now (a lazy store otherwise prepares each on first use)."""
        for name in self.names:
            if name not in self._kept:
                self._kept[name] = self._prepare(name)

    def forget(self, prefix: str) -> None:
        """Drop the prepared tensors whose names start with ``prefix`` (a lazy store makes them again
        from its source if they are read later; an eager one keeps everything)."""
        if self.eager:
            return
        for name in [n for n in self._kept if n.startswith(prefix)]:
            del self._kept[name]
            self._q.pop(name, None)

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """``self[name][ids]`` (an embedding lookup) without expanding the whole table."""
        if self.eager:
            return self[name][ids]
        self[name] if name not in self._kept else None
        if name in self.int8:
            q, scale, axis = self._q[name]
            return dequantize_int8(q[ids], scale[ids], 0) if axis == 0 else dequantize_int8(q[ids], scale, 1)
        kept = self._kept[name]
        assert kept is not None              # not an int8 tensor
        return kept[ids].astype(F32)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class _Quantized(Mapping):
    """``name -> (q int8, scale float32, out_axis)`` of :class:`WeightStore`'s int8 tensors."""

    def __init__(self, store: WeightStore):
        self.store = store

    def __getitem__(self, name):
        st = self.store
        if name not in st.int8:
            raise KeyError(name)
        if name not in st._q:        # prepared (quantised) only: expanding it to float32 here is waste
            st._kept[name] = st._prepare(name)
        return st._q[name]

    def __contains__(self, name):
        return name in self.store.int8

    def __iter__(self):
        return iter(self.store.int8)

    def __len__(self):
        return len(self.store.int8)


class Reference:
    """The reference model: ``prefill`` a prompt, then ``decode`` one token at a time over the KV cache.

    ``weights`` maps Hugging Face names to arrays (see :func:`random_weights` / :func:`load_pretrained`); they
    are checked against ``cfg``. ``precision`` is ``"fp16"``, ``"fp32"`` or ``"int8"`` (module docstring). With
    ``"int8"``, :attr:`quantized` holds ``name -> (q int8, scale float32, out_axis)`` for every quantised tensor,
    the exact data a compiled model should use.
    """

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, np.ndarray], precision: str = "fp16"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.cfg = cfg
        self.precision = precision
        if isinstance(weights, WeightStore) and weights.cfg == cfg and weights.precision == precision:
            store = weights          # another Reference's prepared weights (a fresh cache)
        else:
            store = WeightStore(cfg, weights, precision)
        #: name -> float32 weight as the reference multiplies by it (rounded / dequantised)
        self.w: WeightStore = store
        #: name -> (q int8, scale float32, out_axis) of every int8 tensor (``precision="int8"``)
        self.quantized: Mapping[str, Tuple[np.ndarray, np.ndarray, int]] = store.quantized
        self.cache = KVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.max_positions)
        #: if a list, each forward pass appends the residual stream ``[T, d_model]`` after the
        #: embedding and after every layer (n_layers + 1 arrays)
        self.hidden: Optional[List[np.ndarray]] = None

    # ------------------------------------------------------------------ public API

    @property
    def position(self) -> int:
        """Number of tokens in the cache = absolute position of the next token."""
        return self.cache.length

    def reset(self) -> None:
        """Forget the cached sequence."""
        self.cache.reset()

    def prefill(self, ids: TokenIds) -> np.ndarray:
        """Start a new sequence with ``ids``: returns logits ``[T, vocab]`` (row t predicts token t + 1)."""
        self.reset()
        return self.forward(ids)

    def decode(self, token: int) -> np.ndarray:
        """Append one token to the cached sequence and return its logits ``[vocab]``."""
        return self.forward([token])[0]

    def forward(self, ids: TokenIds) -> np.ndarray:
        """Append a chunk of tokens at positions ``position ..`` and return their logits ``[T, vocab]``."""
        arr = self._check_ids(ids)
        start = self.position
        if self.cfg.family == "gpt2":
            logits = self._forward_gpt2(arr, start)
        else:
            logits = self._forward_llama(arr, start)
        self.cache.advance(len(arr))
        return logits

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, greedy: bool = True,
                 temperature: float = 1.0, seed: Optional[int] = 0,
                 eos_id: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Generate up to ``max_new_tokens`` tokens after ``prompt_ids`` (a new sequence).

        Greedy takes the argmax (lowest id on ties); otherwise tokens are sampled from
        ``softmax(logits / temperature)`` with ``np.random.default_rng(seed)``. Stops after ``eos_id`` if given.
        Returns ``(tokens int64 [n], logits float32 [n, vocab])`` where ``logits[i]`` are the ones token ``i`` was
        chosen from.
        """
        self.reset()
        prompt = self._check_ids(prompt_ids)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, not {max_new_tokens}")
        # The last new token is never fed back, so the deepest position used is len(prompt) + n - 2.
        last = len(prompt) + max_new_tokens - 1
        if last > self.cfg.max_positions:
            raise ValueError(f"{len(prompt)} prompt tokens + {max_new_tokens} new tokens need "
                             f"{last} positions; {self.cfg.name} has {self.cfg.max_positions}")
        if not greedy and not temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, not {temperature}")
        rng = np.random.default_rng(seed)
        tokens, steps = [], []
        row = self.prefill(prompt)[-1] if max_new_tokens else None
        for i in range(max_new_tokens):
            assert row is not None           # max_new_tokens > 0: the prompt was prefilled
            tok = choose_token(row, greedy, temperature, rng)
            tokens.append(tok)
            steps.append(row)
            if (eos_id is not None and tok == eos_id) or i == max_new_tokens - 1:
                break
            row = self.decode(tok)
        logits = np.stack(steps) if steps else np.zeros((0, self.cfg.vocab_size), F32)
        return np.asarray(tokens, dtype=np.int64), logits

    # ------------------------------------------------------------------ internals

    def _check_ids(self, ids) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"token ids must be a non-empty 1-D sequence, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
        bad = (arr < 0) | (arr >= self.cfg.vocab_size)
        if bad.any():
            raise ValueError(f"token id {int(arr[bad][0])} out of range: {self.cfg.name} has vocab_size "
                             f"{self.cfg.vocab_size}")
        end = self.position + arr.size
        if end > self.cfg.max_positions:
            raise ValueError(f"position {end - 1} is beyond {self.cfg.name}'s max_positions "
                             f"{self.cfg.max_positions} (cache holds {self.position} tokens, chunk has {arr.size})")
        return arr.astype(np.int64)

    def _keep(self, x: np.ndarray) -> None:
        if self.hidden is not None:
            self.hidden.append(x.copy())

    def _heads(self, x: np.ndarray, n: int) -> np.ndarray:
        """``[T, n * hd]`` -> ``[n, T, hd]``."""
        T = x.shape[0]
        return x.reshape(T, n, self.cfg.head_dim).transpose(1, 0, 2)

    def _logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.w[self.cfg.head_name].T

    def _forward_llama(self, ids: np.ndarray, start: int) -> np.ndarray:
        cfg, w = self.cfg, self.w
        x = w.rows("model.embed_tokens.weight", ids)
        self._keep(x)
        assert cfg.rope_theta is not None    # llama and mixtral always have a rotary base
        cos, sin = rope_cos_sin(np.arange(start, start + len(ids)), cfg.head_dim, cfg.rope_theta)
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], cfg.norm_eps)
            q = apply_rope(self._heads(h @ w[p + "self_attn.q_proj.weight"].T, cfg.n_heads), cos, sin)
            k = apply_rope(self._heads(h @ w[p + "self_attn.k_proj.weight"].T, cfg.n_kv_heads), cos, sin)
            v = self._heads(h @ w[p + "self_attn.v_proj.weight"].T, cfg.n_kv_heads)
            k_all, v_all = self.cache.append(i, k, v)
            x = x + attention(q, k_all, v_all, start) @ w[p + "self_attn.o_proj.weight"].T
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.norm_eps)
            if cfg.family == "mixtral":
                x = x + self._moe(h, p + "block_sparse_moe.")
            else:
                x = x + swiglu(h, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"],
                               w[p + "mlp.down_proj.weight"])
            self._keep(x)
        return self._logits(rms_norm(x, w["model.norm.weight"], cfg.norm_eps))

    def _moe(self, h: np.ndarray, p: str) -> np.ndarray:
        cfg, w = self.cfg, self.w
        probs = softmax(h @ w[p + "gate.weight"].T, axis=-1)                  # [T, E]
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :cfg.top_k]        # [T, k], ties -> lower index
        gates = np.take_along_axis(probs, top, axis=-1)
        gates = gates / np.sum(gates, axis=-1, keepdims=True)
        out = np.zeros_like(h)
        for e in range(cfg.n_experts):
            rows, slot = np.nonzero(top == e)
            if rows.size:
                q = f"{p}experts.{e}."
                y = swiglu(h[rows], w[q + "w1.weight"], w[q + "w3.weight"], w[q + "w2.weight"])
                out[rows] += gates[rows, slot][:, None] * y
        return out

    def _forward_gpt2(self, ids: np.ndarray, start: int) -> np.ndarray:
        cfg, w = self.cfg, self.w
        d, H = cfg.d_model, cfg.n_heads
        x = w.rows("wte.weight", ids) + w["wpe.weight"][start:start + len(ids)]
        self._keep(x)
        for i in range(cfg.n_layers):
            p = f"h.{i}."
            h = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], cfg.norm_eps)
            qkv = h @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
            q, k, v = (self._heads(qkv[:, j * d:(j + 1) * d], H) for j in range(3))
            k_all, v_all = self.cache.append(i, k, v)
            x = x + attention(q, k_all, v_all, start) @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
            h = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], cfg.norm_eps)
            h = gelu_tanh(h @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
            x = x + h @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
            self._keep(x)
        return self._logits(layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], cfg.norm_eps))


def choose_token(row: np.ndarray, greedy: bool, temperature: float, rng) -> int:
    """The next token from logits ``row``: the argmax (lowest id on ties), or a sample of
    ``softmax(row / temperature)`` drawn with ``rng`` (a ``np.random.Generator``)."""
    if greedy:
        return int(np.argmax(row))
    p = softmax(row.astype(np.float64) / temperature)
    return int(rng.choice(len(p), p=p))


def swiglu(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """``down(silu(gate(x)) * up(x))`` with ``[out, in]`` weights."""
    return (silu(x @ gate.T) * (x @ up.T)) @ down.T
