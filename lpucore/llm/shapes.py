"""Model shapes: :class:`ModelConfig`, the tensors each family has, and a registry of named shapes.

Three decoder-only families are described, with Hugging Face's tensor names and layouts:

* ``llama``   -- RMSNorm, rotary position embeddings (rotate-half form), grouped-query attention, SwiGLU MLP.
* ``mixtral`` -- a llama whose MLP is a sparse mixture of SwiGLU experts with a top-k softmax router.
* ``gpt2``    -- LayerNorm with bias, learned absolute positions, multi-head attention, GELU (tanh form) MLP,
  Conv1D linear layers stored ``[in, out]``, output head tied to the token embedding.

Units used throughout: sizes are element counts (a "feature" is one element of a vector), lengths are tokens,
memory sizes are bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from ..errors import ModelError

FAMILIES = ("llama", "mixtral", "gpt2")

LIMITS: Dict[str, int] = {
    "vocab_size": 1 << 22,       # 4,194,304 tokens (the largest published vocabularies are ~256k)
    "d_model": 1 << 18,          # 262,144 features
    "d_ff": 1 << 20,             # 1,048,576 features
    "head_dim": 1 << 14,
    "n_heads": 1 << 14,
    "n_kv_heads": 1 << 14,
    "n_layers": 1 << 12,         # 4096 blocks (published models have at most a few hundred)
    "max_positions": 1 << 24,    # 16,777,216 tokens
    "n_experts": 1 << 12,
    "top_k": 1 << 12,
}
"""Largest value :class:`ModelConfig` accepts for each size field, far above any published model: a
``config.json`` asking for more (``num_hidden_layers: 1000000000``) raises :class:`~lpucore.errors.ModelError`
at once instead of making the loader enumerate a billion layers' tensors. Host memory is checked
separately, from the weight files' headers (:func:`lpucore.llm.load_pretrained`)."""

# Tensors of a checkpoint that are not parameters of the model (non-persistent buffers some exporters keep).
# Loading drops them; they carry nothing the reference needs.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


@dataclass(frozen=True, init=False)
class ModelConfig:
    """The shape of one decoder-only model.

    Fields (units in brackets)::

        ``name``            registry or checkpoint name (free text).
        ``family``          ``"llama"``, ``"mixtral"`` or ``"gpt2"``.
        ``vocab_size``      number of token ids [tokens]; valid ids are ``0 .. vocab_size - 1``.
        ``d_model``         width of the residual stream [features].
        ``n_layers``        number of decoder blocks.
        ``n_heads``         number of query heads.
        ``d_ff``            hidden width of one MLP (of one expert for mixtral) [features].
        ``max_positions``   longest sequence the model accepts [tokens]; positions are ``0 .. max_positions - 1``.
        ``n_kv_heads``      number of key/value heads (grouped-query attention); ``None`` means ``n_heads`` (MHA).
                            Query head ``h`` reads kv head ``h // (n_heads // n_kv_heads)``.
        ``head_dim``        width of one head [features]; ``None`` means ``d_model // n_heads``.
        ``norm_eps``        epsilon added to the mean square (RMSNorm) or variance (LayerNorm) [dimensionless].
        ``rope_theta``      rotary base: pair ``i`` turns by ``position * rope_theta ** (-2 i / head_dim)`` radians.
                            Llama/mixtral only; ``None`` means 10000. Must be ``None`` for gpt2.
        ``n_experts``       experts per MoE layer (mixtral); 0 for the other families.
        ``top_k``           experts each token is routed to (mixtral); 0 for the other families.
        ``tie_embeddings``  the output head reuses the token embedding ``[vocab, d_model]``; ``None`` means
                            True for gpt2 and False otherwise.
    """

    # The attributes hold the resolved values: the constructor's ``None`` for n_kv_heads, head_dim and
    # tie_embeddings (and rope_theta outside gpt2) is replaced by the default it stands for, so they are
    # typed without Optional. The constructor is written out (init=False) because its parameters, unlike
    # the attributes, accept None.
    name: str
    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_positions: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: Optional[float]        # None exactly for gpt2
    n_experts: int
    top_k: int
    tie_embeddings: bool

    def __init__(self, name: str, family: str, vocab_size: int, d_model: int, n_layers: int, n_heads: int,
                 d_ff: int, max_positions: int, n_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 norm_eps: float = 1e-5, rope_theta: Optional[float] = None, n_experts: int = 0, top_k: int = 0,
                 tie_embeddings: Optional[bool] = None):
        if family not in FAMILIES:
            raise ModelError(f"family must be one of {FAMILIES}, not {family!r}")
        # Resolve the defaults that depend on other fields. A head_dim left None here (n_heads or d_model
        # not a usable integer) is reported by _validate.
        if n_kv_heads is None:
            n_kv_heads = n_heads
        if head_dim is None and _is_int(n_heads) and n_heads > 0 and _is_int(d_model):
            head_dim = d_model // n_heads
        if tie_embeddings is None:
            tie_embeddings = family == "gpt2"
        if rope_theta is None and family != "gpt2":
            rope_theta = 10000.0
        values = dict(name=name, family=family, vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                      n_heads=n_heads, d_ff=d_ff, max_positions=max_positions, n_kv_heads=n_kv_heads,
                      head_dim=head_dim, norm_eps=norm_eps, rope_theta=rope_theta, n_experts=n_experts,
                      top_k=top_k, tie_embeddings=tie_embeddings)
        for f, v in values.items():
            object.__setattr__(self, f, v)      # a frozen dataclass: set through object
        self._validate()

    def _validate(self):
        where = f"ModelConfig {self.name!r}"
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_positions", "n_kv_heads", "head_dim"):
            v = getattr(self, f)
            if not _is_int(v) or v <= 0:
                raise ModelError(f"{where}: {f} must be a positive integer, not {v!r}")
            if v > LIMITS[f]:
                raise ModelError(f"{where}: {f} {v:,} exceeds lpucore's limit of {LIMITS[f]:,} "
                                 f"(lpucore.llm.shapes.LIMITS)")
        for f in ("n_experts", "top_k"):
            if not _is_int(getattr(self, f)) or getattr(self, f) < 0:
                raise ModelError(f"{where}: {f} must be a non-negative integer, not {getattr(self, f)!r}")
            if getattr(self, f) > LIMITS[f]:
                raise ModelError(f"{where}: {f} {getattr(self, f):,} exceeds lpucore's limit of {LIMITS[f]:,} "
                                 f"(lpucore.llm.shapes.LIMITS)")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"{where}: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads}) so that each kv head serves the same number of query heads")
        if not (_is_number(self.norm_eps) and 0 < self.norm_eps < math.inf):
            raise ModelError(f"{where}: norm_eps must be a positive number, not {self.norm_eps!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ModelError(f"{where}: tie_embeddings must be a bool, not {self.tie_embeddings!r}")
        if self.family == "gpt2":
            if self.n_kv_heads != self.n_heads:
                raise ModelError(f"{where}: gpt2 has no grouped-query attention (n_kv_heads {self.n_kv_heads} "
                                 f"!= n_heads {self.n_heads})")
            if self.head_dim * self.n_heads != self.d_model:
                raise ModelError(f"{where}: gpt2 needs head_dim * n_heads == d_model "
                                 f"({self.head_dim} * {self.n_heads} != {self.d_model})")
            if self.rope_theta is not None:
                raise ModelError(f"{where}: gpt2 has learned positions, not rotary ones (rope_theta must be None)")
        else:
            if not (_is_number(self.rope_theta) and 0 < self.rope_theta < math.inf):
                raise ModelError(f"{where}: rope_theta must be a positive number, not {self.rope_theta!r}")
            if self.head_dim % 2:
                raise ModelError(f"{where}: rotary embeddings rotate feature pairs, so head_dim ({self.head_dim}) "
                                 f"must be even")
        if self.family == "mixtral":
            if self.n_experts < 1 or not 1 <= self.top_k <= self.n_experts:
                raise ModelError(f"{where}: mixtral needs n_experts >= 1 and 1 <= top_k <= n_experts "
                                 f"(got n_experts={self.n_experts}, top_k={self.top_k})")
        elif self.n_experts or self.top_k:
            raise ModelError(f"{where}: n_experts and top_k must be 0 for the dense family {self.family!r}")

    # ------------------------------------------------------------------ tensors

    @property
    def kv_group(self) -> int:
        """Query heads per kv head (1 for MHA)."""
        return self.n_heads // self.n_kv_heads

    def tensor_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Every weight tensor of the model, by its Hugging Face name, with its shape (in model order).

        Llama/mixtral linear weights are ``[out, in]`` (``y = x @ W.T``); gpt2 Conv1D weights are ``[in, out]``
        (``y = x @ W + b``). With ``tie_embeddings`` there is no ``lm_head.weight``: the head is the embedding.
        """
        d, hd, ff, V = self.d_model, self.head_dim, self.d_ff, self.vocab_size
        shapes: Dict[str, Tuple[int, ...]] = {}
        if self.family == "gpt2":
            shapes["wte.weight"] = (V, d)
            shapes["wpe.weight"] = (self.max_positions, d)
            for i in range(self.n_layers):
                p = f"h.{i}."
                shapes[p + "ln_1.weight"] = (d,)
                shapes[p + "ln_1.bias"] = (d,)
                shapes[p + "attn.c_attn.weight"] = (d, 3 * d)
                shapes[p + "attn.c_attn.bias"] = (3 * d,)
                shapes[p + "attn.c_proj.weight"] = (d, d)
                shapes[p + "attn.c_proj.bias"] = (d,)
                shapes[p + "ln_2.weight"] = (d,)
                shapes[p + "ln_2.bias"] = (d,)
                shapes[p + "mlp.c_fc.weight"] = (d, ff)
                shapes[p + "mlp.c_fc.bias"] = (ff,)
                shapes[p + "mlp.c_proj.weight"] = (ff, d)
                shapes[p + "mlp.c_proj.bias"] = (d,)
            shapes["ln_f.weight"] = (d,)
            shapes["ln_f.bias"] = (d,)
        else:
            shapes["model.embed_tokens.weight"] = (V, d)
            for i in range(self.n_layers):
                p = f"model.layers.{i}."
                shapes[p + "input_layernorm.weight"] = (d,)
                shapes[p + "self_attn.q_proj.weight"] = (self.n_heads * hd, d)
                shapes[p + "self_attn.k_proj.weight"] = (self.n_kv_heads * hd, d)
                shapes[p + "self_attn.v_proj.weight"] = (self.n_kv_heads * hd, d)
                shapes[p + "self_attn.o_proj.weight"] = (d, self.n_heads * hd)
                shapes[p + "post_attention_layernorm.weight"] = (d,)
                if self.family == "mixtral":
                    shapes[p + "block_sparse_moe.gate.weight"] = (self.n_experts, d)
                    for e in range(self.n_experts):
                        q = f"{p}block_sparse_moe.experts.{e}."
                        shapes[q + "w1.weight"] = (ff, d)   # gate
                        shapes[q + "w2.weight"] = (d, ff)   # down
                        shapes[q + "w3.weight"] = (ff, d)   # up
                else:
                    shapes[p + "mlp.gate_proj.weight"] = (ff, d)
                    shapes[p + "mlp.up_proj.weight"] = (ff, d)
                    shapes[p + "mlp.down_proj.weight"] = (d, ff)
            shapes["model.norm.weight"] = (d,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (V, d)
        return shapes

    @property
    def embedding_name(self) -> str:
        """Name of the token embedding ``[vocab, d_model]``."""
        return "wte.weight" if self.family == "gpt2" else "model.embed_tokens.weight"

    @property
    def head_name(self) -> str:
        """Name of the tensor the output head multiplies by (``logits = x @ head.T``)."""
        return self.embedding_name if self.tie_embeddings else "lm_head.weight"

    def int8_tensors(self) -> Dict[str, int]:
        """The tensors stored as int8 in the ``"int8"`` scheme, each with its output-channel axis.

        Every matmul weight is quantised per output channel: the attention and MLP/expert projections and the
        output head (the embedding table itself when tied, so one int8 copy serves both uses). The token
        embedding table is quantised per row (per token) too, tied or not: it is the largest table of a llama
        (262 MB at fp16 for a 32k vocabulary, more than one GroqChip holds). Kept at fp16: norms, biases,
        learned positions and the mixtral router -- it is tiny (``n_experts x d_model``) and its output is
        a discrete top-k choice that int8 rounding would flip on near ties.
        """
        out_axis = 1 if self.family == "gpt2" else 0    # Conv1D [in, out] vs Linear [out, in]
        names = {}
        for name, shape in self.tensor_shapes().items():
            if name in (self.head_name, self.embedding_name):
                names[name] = 0                          # [vocab, d_model]: one channel per vocabulary row
            elif len(shape) == 2 and name not in (self.embedding_name, "wpe.weight") \
                    and not name.endswith("block_sparse_moe.gate.weight"):
                names[name] = out_axis
        return names

    # ------------------------------------------------------------------ sizes

    def parameter_count(self) -> int:
        """Exact number of weights the reference uses (a tied embedding counted once)."""
        return sum(math.prod(s) for s in self.tensor_shapes().values())

    def weight_bytes(self, precision: str = "fp16") -> int:
        """Bytes needed to store the weights.

        ``"fp32"``: 4 bytes a parameter; ``"fp16"`` / ``"bf16"``: 2 bytes; ``"int8"``: 1 byte for each element of
        a matmul weight (see :meth:`int8_tensors`) plus one fp16 scale (2 bytes) per output channel, 2 bytes for
        every other parameter.
        """
        per = {"fp32": 4, "fp16": 2, "bf16": 2}
        if precision in per:
            return per[precision] * self.parameter_count()
        if precision != "int8":
            raise ValueError(f"precision must be one of {sorted(per) + ['int8']}, not {precision!r}")
        quantised = self.int8_tensors()
        total = 0
        for name, shape in self.tensor_shapes().items():
            n = math.prod(shape)
            total += n + 2 * shape[quantised[name]] if name in quantised else 2 * n
        return total

    def kv_cache_bytes(self, tokens: int, bytes_per_elem: int = 2) -> int:
        """Bytes of the key/value cache for ``tokens`` positions: K and V, every layer, every kv head."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * int(tokens) * int(bytes_per_elem)

    # ------------------------------------------------------------------ Hugging Face config.json

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], name: Optional[str] = None) -> "ModelConfig":
        """Read a Hugging Face ``config.json`` dict (LlamaConfig, MixtralConfig or GPT2Config).

        The family comes from ``model_type`` or else ``architectures``. Keys absent from the dict take the
        Hugging Face class default, except the sizes, which are required. Features the reference does not
        implement (rope scaling, attention/MLP biases in llama, sliding windows, other activations) are
        refused rather than silently ignored. Anything wrong -- not an object, a missing or mistyped key, a
        size above :data:`LIMITS` -- raises :class:`~lpucore.errors.ModelError` (a ``ValueError``) naming
        the key (``field``).
        """
        if not isinstance(hf, Mapping):
            raise ModelError(f"a model configuration must be a JSON object, not a {type(hf).__name__}")
        family = _detect_family(hf)
        given = hf.get("_name_or_path")
        name = name or (given if isinstance(given, str) and given else family)
        r = _HFKeys(hf, family)
        return cls._checked(r.gpt2(name) if family == "gpt2" else r.llama(name))

    @classmethod
    def _checked(cls, kw: Dict[str, Any]) -> "ModelConfig":
        """``cls(**kw)``, where a ModelError names the config.json key of the field at fault."""
        try:
            return cls(**kw)
        except ModelError as e:
            text = str(e)
            fam = kw["family"]
            for f, key in _HF_KEYS[fam].items():
                if f": {f} " in text:
                    raise ModelError(text, field=key) from None
            raise

    def to_hf(self) -> Dict[str, Any]:
        """A Hugging Face ``config.json`` dict for this shape; :meth:`from_hf` reads it back unchanged."""
        if self.family == "gpt2":
            return {"_name_or_path": self.name, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                    "vocab_size": self.vocab_size, "n_embd": self.d_model, "n_layer": self.n_layers,
                    "n_head": self.n_heads, "n_inner": self.d_ff, "n_positions": self.max_positions,
                    "n_ctx": self.max_positions, "layer_norm_epsilon": self.norm_eps,
                    "activation_function": "gelu_new", "tie_word_embeddings": self.tie_embeddings,
                    "torch_dtype": "float16"}
        arch = "MixtralForCausalLM" if self.family == "mixtral" else "LlamaForCausalLM"
        hf = {"_name_or_path": self.name, "model_type": self.family, "architectures": [arch],
              "vocab_size": self.vocab_size, "hidden_size": self.d_model, "num_hidden_layers": self.n_layers,
              "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
              "head_dim": self.head_dim, "intermediate_size": self.d_ff,
              "max_position_embeddings": self.max_positions, "rms_norm_eps": self.norm_eps,
              "rope_theta": self.rope_theta, "hidden_act": "silu", "tie_word_embeddings": self.tie_embeddings,
              "attention_bias": False, "torch_dtype": "float16"}
        if self.family == "mixtral":
            hf.update(num_local_experts=self.n_experts, num_experts_per_tok=self.top_k, sliding_window=None)
        else:
            hf["mlp_bias"] = False
        return hf


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _short(v, limit: int = 60) -> str:
    """``repr(v)`` cut to ``limit`` characters (a hostile config.json may hold megabytes in one key)."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."


class _HFKeys:
    """Typed reads of a config.json dict: each raises ModelError naming the key (``field``)."""

    def __init__(self, hf: Mapping[str, Any], family: str):
        self.hf, self.family = hf, family

    def bad(self, key: str, message: str) -> ModelError:
        return ModelError(message, field=key)

    def need(self, key: str) -> int:
        if self.hf.get(key) is None:
            raise self.bad(key, f"{self.family} config.json lacks {key!r}")
        return self.size(key, 0)

    def size(self, key: str, default: Optional[int] = None):
        v = self.hf.get(key)
        if v is None:
            return default
        if not _is_int(v) or v <= 0:
            raise self.bad(key, f"must be a positive integer, not {_short(v)}")
        return v

    def number(self, key: str, default: float) -> float:
        v = self.hf.get(key)
        if v is None:
            return float(default)
        if not _is_number(v) or not math.isfinite(v):
            raise self.bad(key, f"must be a finite number, not {_short(v)}")
        return float(v)

    def flag(self, key: str, default: bool) -> bool:
        v = self.hf.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.bad(key, f"must be true or false, not {_short(v)}")
        return v

    def mapping(self, key: str) -> Mapping[str, Any]:
        v = self.hf.get(key)
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise self.bad(key, f"must be a JSON object or null, not {_short(v)}")
        return v

    def gpt2(self, name: str) -> Dict[str, Any]:
        act = self.hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise self.bad("activation_function", f"gpt2 activation_function {_short(act)} is not supported "
                                                   f"(only the tanh GELU)")
        if self.flag("scale_attn_by_inverse_layer_idx", False) or not self.flag("scale_attn_weights", True):
            raise self.bad("scale_attn_weights", "gpt2 attention scaling other than 1/sqrt(head_dim) is not "
                                                 "supported")
        d = self.need("n_embd")
        return dict(name=name, family="gpt2", vocab_size=self.need("vocab_size"), d_model=d,
                    n_layers=self.need("n_layer"), n_heads=self.need("n_head"),
                    d_ff=self.size("n_inner") or 4 * d, max_positions=self.size("n_positions", 1024),
                    norm_eps=self.number("layer_norm_epsilon", 1e-5),
                    tie_embeddings=self.flag("tie_word_embeddings", True))

    def _rope_theta(self) -> float:
        family = self.family
        # transformers < 5 keeps rope_theta / rope_scaling at the top level, >= 5 in rope_parameters.
        rope = self.mapping("rope_parameters")
        scaling = self.mapping("rope_scaling")
        rope_type = scaling.get("rope_type", scaling.get("type")) if scaling else rope.get("rope_type", "default")
        if rope_type not in (None, "default"):
            raise self.bad("rope_scaling" if scaling else "rope_parameters",
                           f"{family} rope scaling {_short(rope_type)} is not supported (only plain RoPE)")
        if self.hf.get("rope_theta") is not None:
            return self.number("rope_theta", 0.0)
        t = rope.get("rope_theta", 1e6 if family == "mixtral" else 10000.0)
        if not _is_number(t) or not math.isfinite(t):
            raise self.bad("rope_parameters", f"rope_theta must be a finite number, not {_short(t)}")
        return float(t)

    def llama(self, name: str) -> Dict[str, Any]:
        family = self.family
        act = self.hf.get("hidden_act", "silu")
        if act != "silu":
            raise self.bad("hidden_act", f"{family} hidden_act {_short(act)} is not supported (only silu / SwiGLU)")
        for key in ("attention_bias", "mlp_bias"):
            if self.flag(key, False):
                raise self.bad(key, f"{family} with {key} is not supported")
        theta = self._rope_theta()
        n_pos = self.need("max_position_embeddings")
        window = self.hf.get("sliding_window")
        if window is not None:
            if not _is_int(window) or window <= 0:
                raise self.bad("sliding_window", f"must be a positive integer or null, not {_short(window)}")
            if window < n_pos:
                raise self.bad("sliding_window", f"{family} sliding_window {window} < max_position_embeddings "
                                                 f"{n_pos} is not supported (the reference attends over the "
                                                 f"whole cache)")
        heads = self.need("num_attention_heads")
        kw = dict(name=name, family=family, vocab_size=self.need("vocab_size"), d_model=self.need("hidden_size"),
                  n_layers=self.need("num_hidden_layers"), n_heads=heads,
                  n_kv_heads=self.size("num_key_value_heads") or heads, head_dim=self.size("head_dim"),
                  d_ff=self.need("intermediate_size"), max_positions=n_pos,
                  norm_eps=self.number("rms_norm_eps", 1e-5 if family == "mixtral" else 1e-6),
                  rope_theta=theta, tie_embeddings=self.flag("tie_word_embeddings", False))
        if family == "mixtral":
            kw.update(n_experts=self.size("num_local_experts", 8), top_k=self.size("num_experts_per_tok", 2))
        return kw


# ModelConfig field -> the config.json key it is read from, per family (for error messages).
_LLAMA_KEYS = {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
               "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
               "d_ff": "intermediate_size", "max_positions": "max_position_embeddings", "norm_eps": "rms_norm_eps",
               "rope_theta": "rope_theta", "n_experts": "num_local_experts", "top_k": "num_experts_per_tok"}
_HF_KEYS: Dict[str, Dict[str, str]] = {
    "gpt2": {"vocab_size": "vocab_size", "d_model": "n_embd", "n_layers": "n_layer", "n_heads": "n_head",
             "d_ff": "n_inner", "max_positions": "n_positions", "norm_eps": "layer_norm_epsilon"},
    "llama": _LLAMA_KEYS, "mixtral": _LLAMA_KEYS}


def _detect_family(hf: Mapping[str, Any]) -> str:
    mt = hf.get("model_type")
    if isinstance(mt, str) and mt.lower() in FAMILIES:
        return mt.lower()
    arches = {"LlamaForCausalLM": "llama", "LlamaModel": "llama", "MixtralForCausalLM": "mixtral",
              "MixtralModel": "mixtral", "GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2"}
    given = hf.get("architectures")
    if given is not None and not (isinstance(given, list) and all(isinstance(a, str) for a in given)):
        raise ModelError(f"must be a list of class names, not {_short(given)}", field="architectures")
    for a in given or ():
        if a in arches:
            return arches[a]
    raise ModelError(f"unsupported model (model_type {_short(mt)}, architectures "
                     f"{_short(given)}); supported families: {FAMILIES}", field="model_type")


def is_buffer_name(name: str) -> bool:
    """True for checkpoint entries that are buffers, not parameters (dropped when loading)."""
    return name.endswith(_BUFFER_SUFFIXES)


def _named(name, family, **kw) -> ModelConfig:
    return ModelConfig(name=name, family=family, **kw)


_LLAMA2 = dict(vocab_size=32000, max_positions=4096, norm_eps=1e-5, rope_theta=10000.0)

SHAPES: Dict[str, ModelConfig] = {c.name: c for c in (
    _named("gpt2", "gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
           max_positions=1024),
    _named("llama2-7b", "llama", d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008, **_LLAMA2),
    _named("llama2-13b", "llama", d_model=5120, n_layers=40, n_heads=40, n_kv_heads=40, d_ff=13824, **_LLAMA2),
    _named("llama2-70b", "llama", d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672, **_LLAMA2),
    _named("llama3-8b", "llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
           d_ff=14336, max_positions=8192, norm_eps=1e-5, rope_theta=500000.0),
    _named("tinyllama-1.1b", "llama", vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
           d_ff=5632, max_positions=2048, norm_eps=1e-5, rope_theta=10000.0),
    _named("mixtral-8x7b", "mixtral", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
           d_ff=14336, max_positions=32768, norm_eps=1e-5, rope_theta=1e6, n_experts=8, top_k=2),
    # Tiny models for tests: every code path (GQA, MoE routing, tied head) at a size NumPy runs in milliseconds.
    _named("tiny", "llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
           max_positions=128),
    _named("tiny-moe", "mixtral", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
           max_positions=128, n_experts=4, top_k=2),
    _named("tiny-gpt2", "gpt2", vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_positions=128),
)}


def model_config(name: str) -> ModelConfig:
    """The registered shape called ``name`` (see :data:`SHAPES`)."""
    try:
        return SHAPES[name]
    except KeyError:
        raise ModelError(f"unknown model shape {name!r}; known shapes: {', '.join(SHAPES)}") from None
