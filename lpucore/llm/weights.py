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
import struct
import zlib
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ..errors import ModelError
from .shapes import ModelConfig, is_buffer_name

Weights = Dict[str, np.ndarray]
PathLike = Union[str, os.PathLike]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

MAX_JSON_BYTES = 64 << 20
"""Largest ``config.json`` or ``model.safetensors.index.json`` read (64 MiB; real ones are kilobytes)."""
MAX_HEADER_BYTES = 100_000_000
"""Largest JSON header of a ``.safetensors`` file (the safetensors library's own limit)."""
MAX_BYTES_ENV = "LPUCORE_MAX_MODEL_BYTES"
"""Environment variable: host bytes a checkpoint may take when loaded, overriding physical memory
(see :func:`host_memory_bytes`)."""

# safetensors dtype -> bytes per element
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
# the dtype each safetensors dtype has once loaded (bf16 becomes float32)
_ST_LOADED = {"F16": "float16", "BF16": "float32", "F32": "float32", "F64": "float64", "BOOL": "bool",
              "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32", "U32": "uint32",
              "I64": "int64", "U64": "uint64", "F8_E5M2": "uint8", "F8_E4M3": "uint8"}


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
            raise ModelError("config ties the output head to the embedding, but the checkpoint has a different "
                             "'lm_head.weight'", field="lm_head.weight")
    check_weights(cfg, out)
    return out


def check_names(cfg: ModelConfig, weights: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`~lpucore.errors.ModelError` (a ``ValueError``) unless ``weights`` has exactly ``cfg``'s
    tensor names (a lazy mapping's tensors are checked as they are read)."""
    expected = cfg.tensor_shapes()
    missing = [n for n in expected if n not in weights]
    unexpected = sorted(n for n in weights if n not in expected)
    if missing or unexpected:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}"
        raise ModelError(f"{cfg.name}: {what}", field=missing[0] if missing else unexpected[0])


def check_weights(cfg: ModelConfig, weights: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`~lpucore.errors.ModelError` (a ``ValueError``) naming the first missing, unexpected or
    wrongly shaped tensor (``field``)."""
    expected = cfg.tensor_shapes()
    missing = [n for n in expected if n not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelError(f"{cfg.name}: missing tensor {missing[0]!r}{more}", field=missing[0])
    unexpected = sorted(n for n in weights if n not in expected)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ModelError(f"{cfg.name}: unexpected tensor {unexpected[0]!r}{more} for family {cfg.family!r}",
                         field=unexpected[0])
    for name, shape in expected.items():
        arr = weights[name]
        if tuple(arr.shape) != shape:
            raise ModelError(f"{cfg.name}: tensor {name!r} has shape {tuple(arr.shape)}, expected {shape}",
                             field=name)
        if not np.issubdtype(arr.dtype, np.floating):
            raise ModelError(f"{cfg.name}: tensor {name!r} has dtype {arr.dtype}, expected a float type", field=name)


# ---------------------------------------------------------------------- random weights

CODE_STD = math.sqrt((255 ** 2 - 1) / 12)
"""Standard deviation of a random int8 code (uniform on the 255 values -127..127): about 73.6."""
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _codes(key: int, n: int) -> np.ndarray:
    """``n`` int8 codes in [-127, 127] from the 64-bit ``key``: word i = mix64(key + i * golden) (splitmix64's
    finaliser) gives elements 8i..8i+7 from its least significant byte up, each byte b the code
    ``(b * 255 >> 8) - 127`` (one value of the 255 has two bytes). The compiled loader fills them at
    memory speed (``lpucore._loader.random_codes``); this NumPy path gives the same bytes."""
    out = np.empty(n, dtype=np.int8)
    if os.environ.get("LPUCORE_FAST_LOAD", "1") != "0":      # as lpucore.fastload: 0 runs the NumPy path
        try:
            from .._loader import random_codes
        except ImportError:                                   # not built: the NumPy path
            pass
        else:
            random_codes(np.uint64(key), out)
            return out
    lut = (((np.arange(256) * 255) >> 8) - 127).astype(np.int8)
    step = 1 << 20                        # words a chunk: bounds the temporaries
    for w0 in range(0, (n + 7) // 8, step):
        z = np.arange(w0, min(w0 + step, (n + 7) // 8), dtype=np.uint64) * _GOLDEN + np.uint64(key)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
        b = z.astype("<u8").view(np.uint8)[: n - 8 * w0]
        out[8 * w0: 8 * w0 + b.size] = lut[b]
    return out


def _std(cfg: ModelConfig, name: str, shape: Tuple[int, ...]) -> float:
    """The standard deviation a random 2-D tensor aims at (:func:`random_weights`)."""
    if name == cfg.embedding_name:
        return 1 / math.sqrt(cfg.d_model) if cfg.tie_embeddings else 1.0
    if name == "wpe.weight":
        return 1.0
    return 1 / math.sqrt(shape[0] if cfg.family == "gpt2" else shape[1])


def random_int8(cfg: ModelConfig, name: str, seed: int = 0) -> Tuple[np.ndarray, np.ndarray, int]:
    """``(q int8, scale float32 [channels], axis)`` of the 2-D random tensor ``name``: the tensor is
    ``q * scale`` along the output-channel ``axis`` (:meth:`ModelConfig.int8_tensors`, 0 for the
    others), exactly, and :func:`quantize_int8` of it (at float16 or float32) gives back ``q`` and
    ``scale``: every scale is a power of two and every channel holds a code of magnitude 127.

    Codes are uniform (``_codes``, keyed by the tensor's generator); each channel's scale is
    ``2**-k`` or ``2**-(k+1)`` (drawn per channel, so a kernel that mixed up channels would be seen), ``k``
    the integer nearest to what gives the tensor the standard deviation of :func:`random_weights`. A
    Linear weight ``[out, in]``'s codes are made ``[in, out]`` in memory (``q`` is a transposed view):
    the layout the chip's weight rows take, so loading needs no transpose."""
    shape = tuple(cfg.tensor_shapes()[name])
    if len(shape) != 2:
        raise ValueError(f"random_int8: {name!r} is not a 2-D tensor")
    axis = cfg.int8_tensors().get(name, 0)
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    key = int(rng.integers(0, 1 << 63)) * 2 + 1
    ch, fan = shape[axis], shape[1 - axis]
    rows_major = axis == 0 and name not in (cfg.embedding_name, "wpe.weight")   # embeddings: rows read whole
    q = _codes(key, ch * fan).reshape((fan, ch) if rows_major else shape)
    if rows_major:
        q = q.T                                           # [out, in], a view of the [in, out] codes
    top = rng.integers(0, fan, size=ch)                   # one code of magnitude 127 per channel
    sign = np.where(rng.integers(0, 2, size=ch) == 1, 127, -127).astype(np.int8)
    if axis == 0:
        q[np.arange(ch), top] = sign
    else:
        q[top, np.arange(ch)] = sign
    # E[scale^2] over the two exponents is 0.625 * 4**-k: k makes CODE_STD * scale the target std
    k = round(math.log2(CODE_STD * math.sqrt(0.625) / _std(cfg, name, shape)))
    scale = np.ldexp(np.float32(1.0), -(k + rng.integers(0, 2, size=ch))).astype(np.float32)
    return q, scale, axis


def random_tensor(cfg: ModelConfig, name: str, seed: int = 0, dtype=np.float16) -> np.ndarray:
    """Tensor ``name`` of the deterministic random weight set of ``cfg`` (see :func:`random_weights`).

    Each tensor has its own generator, seeded by ``(seed, crc32(name))``, so any one tensor (a layer of a
    70B model) can be made without the others, in any order, with the values :func:`random_weights` gives.
    """
    shape = cfg.tensor_shapes()[name]
    if len(shape) == 2:
        q, scale, axis = random_int8(cfg, name, seed)
        w = q.astype(np.float32) * (scale[:, None] if axis == 0 else scale[None, :])    # exact
        return np.ascontiguousarray(w.astype(dtype))
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    is_gain = name.endswith("weight")
    w = (1.0 if is_gain else 0.0) + 0.1 * rng.standard_normal(shape, dtype=np.float32)
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

    def int8(self, name: str, axis: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """``quantize_int8(self[name] as float32, axis)`` without making the float tensor: ``(q, scale)``
        (``random_int8``), or None when ``name`` is not 2-D or its channels are not along ``axis``."""
        if len(self._shapes.get(name, ())) != 2 or self.cfg.int8_tensors().get(name, 0) != axis:
            return None
        q, scale, _ = random_int8(self.cfg, name, self.seed)
        return q, scale

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

    Every 2-D tensor is int8 codes times a power of two per output channel (``random_int8``: uniform
    codes, made at memory speed, so a 7B model's weights take seconds, and int8 quantisation gives them back
    exactly), with the standard deviation, within a factor of about 1.4, of: ``1 / sqrt(fan_in)`` for matmul
    weights, so each projection about preserves the scale of its input; ``1`` for token embeddings (llama:
    RMSNorm rescales them anyway), or ``1 / sqrt(d_model)`` when tied so the tied head also gives O(1)
    logits; ``1`` for gpt2's learned positions. Norm gains are ``1 + 0.1 normal`` and biases ``0.1 normal``
    (not exactly 1 and 0, so a reference that ignored them would be
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
    costs its size in RAM on top of the float32 result). A file the library refuses raises
    :class:`~lpucore.errors.ModelError` naming it.
    """
    st = _safetensors()
    out: Weights = {}
    bf16 = []
    try:
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
    except st.SafetensorError as e:
        raise ModelError(f"not a valid safetensors file: {e}", path=path) from None
    except OSError as e:
        raise ModelError(f"cannot read: {e.strerror or e}", path=path) from None
    return out


# ---------------------------------------------------------------------- untrusted model directories

def host_memory_bytes() -> Optional[int]:
    """Bytes of host memory a loaded checkpoint may take: the environment variable ``LPUCORE_MAX_MODEL_BYTES``
    when set, else the machine's physical memory (``SC_PHYS_PAGES * SC_PAGE_SIZE``), or ``None`` (no check)
    where the system does not say."""
    env = os.environ.get(MAX_BYTES_ENV)
    if env is not None:
        try:
            n = int(env.strip().replace("_", ""), 0)
        except ValueError:
            raise ModelError(f"environment variable {MAX_BYTES_ENV} must be a number of bytes, not {env!r}") from None
        if n < 0:
            raise ModelError(f"environment variable {MAX_BYTES_ENV} must be >= 0, not {n}")
        return n
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def _inside(root: pathlib.Path, p: pathlib.Path, what: str) -> pathlib.Path:
    """``p``, which must name a file inside the model directory ``root`` by its path (no ``..``
    leading out). Symlinks are the directory owner's and are followed, as in Hugging Face's cache,
    whose snapshot folders link every file into ``../../blobs``."""
    r = pathlib.Path(os.path.normpath(p))
    if r != root and root not in r.parents:
        raise ModelError(f"{what} lies outside the model directory {root} (it names {r}); "
                         f"every file of a model must be inside its directory", path=p)
    try:
        r.stat()
    except RuntimeError as e:                  # a symlink loop
        raise ModelError(f"cannot resolve {what}: {e}", path=p) from None
    except OSError:
        pass                                   # missing: the caller says so
    return r


def _read_json(path: pathlib.Path) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ModelError(f"is {size:,} bytes; lpucore reads at most {MAX_JSON_BYTES:,} "
                             f"(lpucore.llm.weights.MAX_JSON_BYTES)", path=path)
        return json.loads(path.read_bytes().decode("utf-8"))
    except ModelError:
        raise
    except OSError as e:
        raise ModelError(f"cannot read: {e.strerror or e}", path=path) from None
    except (ValueError, RecursionError) as e:      # JSONDecodeError, UnicodeDecodeError, nesting
        raise ModelError(f"is not valid JSON: {str(e)[:200]}", path=path) from None


class _Entry:
    """One tensor as a safetensors header describes it (enough for :func:`check_weights`)."""

    def __init__(self, file: pathlib.Path, dtype: str, shape: Tuple[int, ...]):
        self.file, self.st_dtype, self.shape = file, dtype, shape
        self.dtype = np.dtype(_ST_LOADED[dtype])
        self.nbytes = math.prod(shape) * _ST_ITEMSIZE[dtype]


def read_header(path: pathlib.Path) -> Dict[str, _Entry]:
    """The tensors a ``.safetensors`` file declares, from its header alone (nothing else is read): each name's
    dtype and shape. Raises :class:`~lpucore.errors.ModelError` for a short, truncated or garbage file, an
    unknown dtype, or offsets that do not match the shapes or lie beyond the end of the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"is {size} bytes, too short for a safetensors file (truncated or empty)", path=path)
            n = struct.unpack("<Q", head)[0]
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise ModelError(f"header length {n:,} exceeds the file ({size:,} bytes) or the "
                                 f"{MAX_HEADER_BYTES:,}-byte limit: truncated or not a safetensors file", path=path)
            raw = f.read(n)
    except OSError as e:
        raise ModelError(f"cannot read: {e.strerror or e}", path=path) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise ModelError("header is not valid JSON: not a safetensors file", path=path) from None
    if not isinstance(header, dict):
        raise ModelError("header is not a JSON object: not a safetensors file", path=path)
    data = size - 8 - n
    out: Dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ModelError("header entry is not a JSON object", path=path, field=name)
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_ITEMSIZE:
            raise ModelError(f"unsupported dtype {str(dtype)[:20]!r} (supported: {', '.join(_ST_ITEMSIZE)})",
                             path=path, field=name)
        if not (isinstance(shape, list) and len(shape) <= 8
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ModelError(f"shape must be a list of at most 8 non-negative integers, not {str(shape)[:60]}",
                             path=path, field=name)
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise ModelError("data_offsets must be two integers", path=path, field=name)
        entry = _Entry(path, dtype, tuple(shape))
        begin, end = offsets
        if not 0 <= begin <= end <= data:
            raise ModelError(f"data_offsets {offsets} lie outside the file's {data:,} data bytes (truncated?)",
                             path=path, field=name)
        if end - begin != entry.nbytes:
            raise ModelError(f"data_offsets {offsets} hold {end - begin:,} bytes, but {dtype} {list(shape)} "
                             f"needs {entry.nbytes:,}", path=path, field=name)
        out[name] = entry
    return out


def _weight_files(root: pathlib.Path) -> List[pathlib.Path]:
    """The weight files of the (resolved) directory ``root``: those its index names, else every
    ``*.safetensors``; each checked to be a regular file inside ``root``."""
    index = root / INDEX_FILE
    if index.exists() or index.is_symlink():
        _inside(root, index, INDEX_FILE)
        doc = _read_json(index)
        if not isinstance(doc, dict):
            raise ModelError(f"must be a JSON object, not a {type(doc).__name__}", path=index)
        wmap = doc.get("weight_map")
        if not isinstance(wmap, dict):
            raise ModelError("must be an object mapping tensor names to file names"
                             + (" (missing)" if wmap is None else f", not a {type(wmap).__name__}"),
                             path=index, field="weight_map")
        names = []
        for tensor, fname in wmap.items():
            if not isinstance(fname, str) or not fname or "\0" in fname:
                raise ModelError(f"file name must be a non-empty string, not {str(fname)[:60]!r}",
                                 path=index, field=f"weight_map[{tensor!r}]")
            if pathlib.PurePath(fname).is_absolute():
                raise ModelError(f"names the absolute path {fname!r}; files must be inside the model directory",
                                 path=index, field=f"weight_map[{tensor!r}]")
            names.append(fname)
        files = []
        for fname in sorted(set(names)):
            p = root / fname
            r = _inside(root, p, f"{fname!r} (named in {INDEX_FILE})")
            if not r.is_file():
                raise ModelError(f"names weight file {fname!r}, which does not exist in {root}",
                                 path=index, field="weight_map")
            files.append(p)
    else:
        files = sorted(root.glob("*.safetensors"))
        for p in files:
            if not _inside(root, p, p.name).is_file():
                raise ModelError("is not a regular file", path=p)
    if not files:
        raise ModelError(f"{root} has no .safetensors weights", path=root)
    return files


def _model_root(path: PathLike) -> pathlib.Path:
    given = pathlib.Path(path)
    try:
        root = given.resolve()
    except (OSError, RuntimeError) as e:
        raise ModelError(f"cannot resolve the model directory: {e}", path=given) from None
    if not root.is_dir():
        raise ModelError("is not a model directory" + ("" if root.exists() else " (no such directory)"),
                         path=given)
    return root


def load_config(path: PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of the Hugging Face model directory ``path`` (its ``config.json`` only).

    Raises :class:`~lpucore.errors.ModelError` naming the file and key: no or unreadable ``config.json``, not
    JSON, not an object, a missing or mistyped key, a size above :data:`lpucore.llm.shapes.LIMITS`, an
    or an unsupported feature.
    """
    root = _model_root(path)
    cfile = root / CONFIG_FILE
    if not (cfile.exists() or cfile.is_symlink()):
        raise ModelError(f"{root} has no {CONFIG_FILE}", path=root)
    if not _inside(root, cfile, CONFIG_FILE).is_file():
        raise ModelError("is not a regular file", path=cfile)
    try:
        return ModelConfig.from_hf(_read_json(cfile), name=None)
    except ModelError as e:
        raise e.at(cfile) from None


def _check_nonfinite(name: str, arr: np.ndarray, file: pathlib.Path) -> None:
    if not np.issubdtype(arr.dtype, np.floating):
        return
    flat = arr.reshape(-1)
    step = 1 << 24                      # bounded temporary memory for a huge tensor
    bad = 0
    for i in range(0, flat.size, step):
        bad += int(np.count_nonzero(~np.isfinite(flat[i:i + step])))
    if bad:
        raise ModelError(f"holds {bad:,} non-finite value(s) (NaN or infinity); load_pretrained(..., "
                         f"allow_nonfinite=True) loads it anyway", path=file, field=name)


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


def load_pretrained(path: PathLike, *, allow_nonfinite: bool = False,
                    max_bytes: Optional[int] = None) -> Tuple[ModelConfig, Weights]:
    """Read a Hugging Face model directory: ``config.json`` and its safetensors weights -> ``(cfg, weights)``.

    With a ``model.safetensors.index.json`` the files it names are read, else every ``*.safetensors`` in the
    directory. Names are normalised and checked (:func:`normalize_weights`). Arrays keep their stored dtype,
    except bf16, which becomes float32.

    The directory is untrusted: everything is checked before the weights are read, and every mistake raises
    :class:`~lpucore.errors.ModelError` (a ``ValueError``) naming the file and the key or tensor at fault:

    * ``config.json`` as in :func:`load_config` (sizes capped by :data:`lpucore.llm.shapes.LIMITS`);
    * the index must map tensor names to files inside the directory (a name with ``..`` leading out,
      or an absolute one, is refused) that exist; symlinks in the directory are followed;
    * each ``.safetensors`` header must be sound (a truncated, empty or garbage file is refused), its tensors
      must be the ones ``config.json`` implies, with their shapes;
    * the bytes the tensors take once loaded must not exceed ``max_bytes`` (default: :func:`host_memory_bytes`,
      the machine's physical memory or ``$LPUCORE_MAX_MODEL_BYTES``), checked from the headers before any
      tensor is read;
    * a tensor holding NaN or infinity is refused, naming it, unless ``allow_nonfinite=True``.
    """
    cfg = load_config(path)
    root = _model_root(path)
    files = _weight_files(root)
    entries: Dict[str, _Entry] = {}
    for f in files:
        for name, e in read_header(f).items():
            if name in entries:
                raise ModelError(f"appears in more than one file of {root} (first: {entries[name].file.name})",
                                 path=f, field=name)
            entries[name] = e
    # names and shapes from the headers, before any data is read (a tied lm_head is compared once read)
    declared = {n: e for n, e in entries.items() if not (cfg.tie_embeddings and n.endswith("lm_head.weight"))}
    try:
        normalize_weights(cfg, declared)        # type: ignore[arg-type]   # shapes and dtypes suffice
    except ModelError as e:
        where = entries[e.field].file if e.field in entries else None
        if where is None and e.field is not None and ("transformer." + e.field) in entries:
            where = entries["transformer." + e.field].file
        raise e.at(where if where is not None else root) from None
    limit = host_memory_bytes() if max_bytes is None else int(max_bytes)
    if limit is not None:
        need = sum(e.nbytes * (2 if e.st_dtype == "BF16" else 1) for e in entries.values())
        bf16_files = [f for f in files if any(e.file == f and e.st_dtype == "BF16" for e in entries.values())]
        need += max((f.stat().st_size for f in bf16_files), default=0)     # deserialize() reads a bf16 file whole
        if need > limit:
            source = "max_bytes" if max_bytes is not None else (
                f"${MAX_BYTES_ENV}" if os.environ.get(MAX_BYTES_ENV) is not None else "the host's physical memory")
            raise ModelError(f"the weights need {need:,} bytes of host memory to load, more than {source} "
                             f"({limit:,} bytes); load_pretrained(..., max_bytes=N) or ${MAX_BYTES_ENV} "
                             f"raises the limit", path=root)
    weights: Weights = {}
    for f in files:
        for name, arr in _read_file(f).items():
            if not allow_nonfinite:
                _check_nonfinite(name, arr, f)
            weights[name] = arr
    try:
        return cfg, normalize_weights(cfg, weights)
    except ModelError as e:
        raise e.at(root) from None
