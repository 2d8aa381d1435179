"""Weights: random initialisation, Hugging Face checkpoint I/O (safetensors) and int8 quantisation.

A weight set is a ``dict`` mapping Hugging Face tensor names (see :meth:`ModelConfig.tensor_shapes`) to NumPy
arrays. Llama/mixtral linear weights are ``[out, in]``; gpt2 Conv1D weights are ``[in, out]``.

safetensors is optional: it is imported only by :func:`save_pretrained` / :func:`load_pretrained`
(``pip install safetensors`` or ``pip install lpucore[llm]``).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import zlib
from collections.abc import Mapping
from typing import Dict, List, Tuple, Union

import numpy as np

from .shapes import ModelConfig, is_buffer_name

Weights = Dict[str, np.ndarray]
PathLike = Union[str, os.PathLike]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ---------------------------------------------------------------------- validation

def normalize_weights(cfg: ModelConfig, weights: Mapping[str, np.ndarray]) -> Weights:
    """Map checkpoint names onto the reference's names, then check them with :func:`check_weights`.

    Accepted variations: a ``transformer.`` prefix (gpt2 saved from ``GPT2LMHeadModel``); non-parameter buffers
    (``attn.bias`` masks, ``rotary_emb.inv_freq``), which are dropped; an ``lm_head.weight`` in a tied model,
    dropped when it equals the embedding.
    """
    out: Weights = {}
    for name, arr in weights.items():
        if cfg.family == "gpt2" and name.startswith("transformer."):
            name = name[len("transformer."):]
        if is_buffer_name(name):
            continue
        out[name] = arr
    if cfg.tie_embeddings and "lm_head.weight" in out:
        head = out.pop("lm_head.weight")
        emb = out.get(cfg.embedding_name)
        if emb is not None and not (head.shape == emb.shape and np.array_equal(head, emb)):
            raise ValueError("config ties the output head to the embedding, but the checkpoint has a different "
                             "'lm_head.weight'")
    check_weights(cfg, out)
    return out


def check_names(cfg: ModelConfig, weights: Mapping[str, np.ndarray]) -> None:
    """Raise ``ValueError`` unless ``weights`` has exactly ``cfg``'s tensor names (a lazy mapping's tensors are
    checked as they are read)."""
    expected = cfg.tensor_shapes()
    missing = [n for n in expected if n not in weights]
    unexpected = sorted(n for n in weights if n not in expected)
    if missing or unexpected:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}"
        raise ValueError(f"{cfg.name}: {what}")


def check_weights(cfg: ModelConfig, weights: Mapping[str, np.ndarray]) -> None:
    """Raise ``ValueError`` naming the first missing, unexpected or wrongly shaped tensor."""
    expected = cfg.tensor_shapes()
    missing = [n for n in expected if n not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{cfg.name}: missing tensor {missing[0]!r}{more}")
    unexpected = sorted(n for n in weights if n not in expected)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"{cfg.name}: unexpected tensor {unexpected[0]!r}{more} for family {cfg.family!r}")
    for name, shape in expected.items():
        arr = weights[name]
        if tuple(arr.shape) != shape:
            raise ValueError(f"{cfg.name}: tensor {name!r} has shape {tuple(arr.shape)}, expected {shape}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{cfg.name}: tensor {name!r} has dtype {arr.dtype}, expected a float type")


# ---------------------------------------------------------------------- random weights

def random_tensor(cfg: ModelConfig, name: str, seed: int = 0, dtype=np.float16) -> np.ndarray:
    """Tensor ``name`` of the deterministic random weight set of ``cfg`` (see :func:`random_weights`).

    Each tensor has its own generator, seeded by ``(seed, crc32(name))``, so any one tensor (a layer of a
    70B model) can be made without the others, in any order, with the values :func:`random_weights` gives.
    """
    shape = cfg.tensor_shapes()[name]
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    d = cfg.d_model
    if len(shape) == 1:
        is_gain = name.endswith("weight")
        w = (1.0 if is_gain else 0.0) + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    elif name == cfg.embedding_name:
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / math.sqrt(d) if cfg.tie_embeddings
                                                                      else 1.0)
    elif name == "wpe.weight":
        # Unit positions: with a tied head and small token embeddings a random gpt2 otherwise echoes its
        # last token forever; position-dependent hidden states keep greedy decoding varied.
        w = rng.standard_normal(shape, dtype=np.float32)
    else:
        fan_in = shape[0] if cfg.family == "gpt2" else shape[1]
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(1 / math.sqrt(fan_in))
    return w.astype(dtype)


class RandomWeights(Mapping):
    """The weight set of :func:`random_weights` as a read-only mapping that makes each tensor when it is
    asked for (and keeps nothing): a model bigger than host memory can be read layer by layer."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, dtype=np.float16):
        self.cfg, self.seed, self.dtype = cfg, int(seed), dtype
        self._shapes = cfg.tensor_shapes()
        self._names = list(self._shapes)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._shapes:
            raise KeyError(name)
        return random_tensor(self.cfg, name, self.seed, self.dtype)

    def __contains__(self, name) -> bool:      # without making the tensor
        return name in self._shapes

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self):
        return f"RandomWeights({self.cfg.name!r}, seed={self.seed})"


def random_weights(cfg: ModelConfig, seed: int = 0, dtype=np.float16) -> Weights:
    """A deterministic random weight set for ``cfg`` whose activations stay O(1).

    Matmul weights are ``normal / sqrt(fan_in)`` so each projection preserves the scale of its input. Token
    embeddings are ``normal`` (llama: RMSNorm rescales them anyway), or ``normal / sqrt(d_model)`` when tied so
    the tied head also gives O(1) logits. gpt2's learned positions are ``normal``. Norm gains are
    ``1 + 0.1 normal`` and biases ``0.1 normal`` (not exactly 1 and 0, so a reference that ignored them would be
    caught). Arrays are allocated per tensor: fine for the tiny shapes, ``parameter_count() * itemsize`` bytes
    for a real one (:class:`RandomWeights` makes the same tensors on demand instead).
    """
    return {name: random_tensor(cfg, name, seed, dtype) for name in cfg.tensor_shapes()}


# ---------------------------------------------------------------------- int8 quantisation

def quantize_int8(w: np.ndarray, axis: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 quantisation of a 2-D weight.

    ``axis`` is the output-channel axis: 0 for ``[out, in]`` Linear weights, 1 for gpt2's ``[in, out]`` Conv1D.
    For each channel ``scale = max|w| / 127`` and ``q = round_half_even(w / scale)`` (in ``[-127, 127]``; -128 is
    never used, so the code is symmetric). An all-zero channel gets scale 0 and q 0. Returns ``(q int8 same shape
    as w, scale float32 [channels])``; :func:`dequantize_int8` inverts it up to rounding.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize_int8 expects a 2-D weight, got shape {w.shape}")
    axis = axis % 2
    scale = (np.max(np.abs(w), axis=1 - axis) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    safe = safe[:, None] if axis == 0 else safe[None, :]
    q = np.clip(np.rint(w / safe), -127, 127).astype(np.int8)     # np.rint rounds half to even
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray, axis: int = 0) -> np.ndarray:
    """``q * scale`` broadcast along the output-channel ``axis`` (float32)."""
    scale = np.asarray(scale, dtype=np.float32)
    return q.astype(np.float32) * (scale[:, None] if axis % 2 == 0 else scale[None, :])


# ---------------------------------------------------------------------- safetensors I/O

def _safetensors():
    try:
        import safetensors.numpy
    except ImportError as e:
        raise ImportError("reading or writing checkpoints needs safetensors: pip install safetensors "
                          "(or pip install lpucore[llm])") from e
    return safetensors


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) to float32: bf16 is the top half of a float32, so shift it back up."""
    return (np.asarray(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)


def _read_file(path: pathlib.Path) -> Weights:
    """Every tensor of one ``.safetensors`` file; bf16 tensors converted to float32.

    NumPy has no bfloat16, so the library cannot hand a bf16 tensor over as an array. For a file that has any,
    the raw bytes come from ``safetensors.deserialize``, which reads the whole file into memory (so a bf16 shard
    costs its size in RAM on top of the float32 result).
    """
    st = _safetensors()
    out: Weights = {}
    bf16 = []
    with st.safe_open(str(path), framework="np") as f:
        for name in f.keys():
            if f.get_slice(name).get_dtype() == "BF16":
                bf16.append(name)
            else:
                out[name] = f.get_tensor(name)
    if bf16:
        wanted = set(bf16)
        for name, view in st.deserialize(path.read_bytes()):
            if name in wanted:
                out[name] = bf16_to_float32(np.frombuffer(view["data"], dtype="<u2")).reshape(view["shape"])
    return out


def save_pretrained(path: PathLike, cfg: ModelConfig, weights: Mapping[str, np.ndarray],
                    max_shard_bytes: int = 0) -> None:
    """Write ``config.json`` and the weights in Hugging Face's layout into the directory ``path``.

    One ``model.safetensors``, or with ``max_shard_bytes > 0`` shards ``model-0000i-of-0000n.safetensors`` of at
    most that many bytes each (a larger single tensor gets a shard of its own) plus
    ``model.safetensors.index.json``. The weights are checked against ``cfg`` first.
    """
    st = _safetensors()
    weights = dict(weights)
    check_weights(cfg, weights)
    root = pathlib.Path(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / CONFIG_FILE).write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    shards: List[List[str]] = [[]]      # tensor names per file
    size = 0
    for name in cfg.tensor_shapes():
        nbytes = weights[name].nbytes
        if max_shard_bytes > 0 and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    # "format": "pt" is what transformers expects in the header to load the file into PyTorch.
    meta = {"format": "pt"}
    if len(shards) == 1:
        st.numpy.save_file({n: np.ascontiguousarray(weights[n]) for n in shards[0]}, str(root / SINGLE_FILE),
                           metadata=meta)
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        st.numpy.save_file({n: np.ascontiguousarray(weights[n]) for n in names}, str(root / fname), metadata=meta)
        weight_map.update({n: fname for n in names})
    total = sum(weights[n].nbytes for n in weight_map)
    (root / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=2) + "\n")


def load_pretrained(path: PathLike) -> Tuple[ModelConfig, Weights]:
    """Read a Hugging Face model directory: ``config.json`` and its safetensors weights -> ``(cfg, weights)``.

    With a ``model.safetensors.index.json`` the files it names are read, else every ``*.safetensors`` in the
    directory. Names are normalised and checked (:func:`normalize_weights`): a missing or wrongly shaped tensor
    raises ``ValueError`` naming it. Arrays keep their stored dtype, except bf16, which becomes float32.
    """
    root = pathlib.Path(path)
    if not (root / CONFIG_FILE).is_file():
        raise ValueError(f"{root} has no {CONFIG_FILE}")
    cfg = ModelConfig.from_hf(json.loads((root / CONFIG_FILE).read_text()), name=None)
    if (root / INDEX_FILE).is_file():
        files = sorted(set(json.loads((root / INDEX_FILE).read_text())["weight_map"].values()))
        files = [root / f for f in files]
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{root} has no .safetensors weights")
    weights: Weights = {}
    for f in files:
        for name, arr in _read_file(f).items():
            if name in weights:
                raise ValueError(f"tensor {name!r} appears in more than one file of {root} (second: {f.name})")
            weights[name] = arr
    return cfg, normalize_weights(cfg, weights)
