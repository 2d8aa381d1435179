"""NumPy-like operations that run on the simulated chip.

Each function builds a one-operation graph, compiles it (cached by the
operation, its attributes, and the shapes and dtypes of its operands; constant
operands are passed as inputs so that new values reuse the program), runs it
and returns a NumPy array, or ``(array, RunStats)`` with ``stats=True``::

    y = lpucore.ops.softmax(x)
    c, stats = lpucore.ops.matmul(a, b, stats=True)

``config`` (default: the GroqChip) and ``engine`` (default ``"fast"``) select the chip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple

import numpy as np

from .config import ChipConfig
from .graph import Graph, GraphError

if TYPE_CHECKING:
    from .compiler.lower import Compiled

_CACHE: Dict[tuple, "Compiled"] = {}
_CHIPS: Dict[tuple, object] = {}


def _key(op, arrays, attrs, cfg):
    return (op, tuple((a.shape, a.dtype.str) if isinstance(a, np.ndarray) else ("scalar", repr(a)) for a in arrays),
            tuple(sorted((k, repr(v)) for k, v in attrs.items())), cfg)


def _run(op: str, arrays, attrs, config: Optional[ChipConfig], engine: str, stats: bool):
    from .compiler.api import compile
    from .compiler.lower import execute
    cfg = config if config is not None else ChipConfig.groqchip1()
    arrays = [np.asarray(a) if not isinstance(a, (int, float)) else a for a in arrays]
    key = _key(op, arrays, attrs, cfg)
    compiled = _CACHE.get(key)
    if compiled is None:
        g = Graph(op)
        args = []
        for i, a in enumerate(arrays):
            if isinstance(a, np.ndarray):
                args.append(g.input(f"x{i}", a.shape, a.dtype))
            else:
                args.append(a)
        y = getattr(g, op)(*args, **attrs)
        g.output("y", y)
        compiled = compile(g, cfg)
        _CACHE[key] = compiled
    inputs = {f"x{i}": a for i, a in enumerate(arrays) if isinstance(a, np.ndarray)}
    out, st = execute(compiled, inputs, engine=engine)
    return (out["y"], st) if stats else out["y"]


def cache_info() -> Tuple[int]:
    """Number of compiled programs held by the cache."""
    return (len(_CACHE),)


def clear_cache() -> None:
    _CACHE.clear()


def _make(op, n_in, doc):
    def f(*args, config: Optional[ChipConfig] = None, engine: str = "fast", stats: bool = False, **attrs):
        if len(args) != n_in:
            raise GraphError(f"{op} takes {n_in} array argument(s), got {len(args)}")
        return _run(op, args, attrs, config, engine, stats)
    f.__name__ = op
    f.__doc__ = doc
    return f


for _op in ("add", "sub", "mul", "div", "maximum", "minimum"):
    globals()[_op] = _make(_op, 2, f"Elementwise {_op} with NumPy broadcasting, on the chip.")
for _op in ("neg", "abs", "relu", "exp", "tanh", "sigmoid", "sqrt", "rsqrt", "silu"):
    globals()[_op] = _make(_op, 1, f"Elementwise {_op} on the chip.")

gelu = _make("gelu", 1, "GELU (approximate='tanh' or 'erf') on the chip.")
cast = _make("cast", 1, "Convert to dtype= on the chip.")
sum = _make("sum", 1, "Sum over the last axis (keepdims=) on the chip.")       # NumPy's name, as np.sum
max = _make("max", 1, "Max over the last axis (keepdims=) on the chip.")       # NumPy's name, as np.max
mean = _make("mean", 1, "Mean over the last axis (keepdims=) on the chip.")
softmax = _make("softmax", 1, "Softmax over the last axis on the chip.")
layernorm = _make("layernorm", 3, "layernorm(x, gamma, beta, eps=) on the chip.")
rmsnorm = _make("rmsnorm", 2, "rmsnorm(x, gamma, eps=) on the chip.")
matmul = _make("matmul", 2, "a @ b on the MXM (int8 -> int32, float16 -> float16 or out_dtype=).")
transpose = _make("transpose", 1, "Transpose (axes=) on the chip.")
reshape = _make("reshape", 1, "reshape(x, shape=) on the chip.")
gather = _make("gather", 2, "table[indices] (an embedding lookup) on the chip.")
scatter = _make("scatter", 3, "x with rows[i] written at row indices[i] (out-of-range indices write nothing; "
                "the later of equal indices wins) on the chip.")
gather_blocks = _make("gather_blocks", 2, "Rows k * n .. k * n + n - 1 of x for each run-time block k "
                      "(gather_blocks(x, blocks, n=); out-of-range blocks read zeros) on the chip.")
scatter_blocks = _make("scatter_blocks", 3, "x with its blocks[i] of n = len(rows) / len(blocks) rows replaced "
                       "(out-of-range blocks write nothing; the later of equal blocks wins) on the chip.")
rope = _make("rope", 2, "Rotary position embedding rope(x, positions, base=) on the chip.")
quantize = _make("quantize", 1, "int8 quantisation quantize(x, scale=, zero_point=, axis=) on the chip.")
dequantize = _make("dequantize", 1, "dequantize(q, scale=, zero_point=, axis=, dtype=) on the chip.")


def concat(arrays, axis=0, **kw):
    """Concatenate a list of arrays on the chip."""
    arrays = list(arrays)
    cfg, engine, stats = kw.pop("config", None), kw.pop("engine", "fast"), kw.pop("stats", False)
    from .compiler.api import compile
    from .compiler.lower import execute
    cfg = cfg if cfg is not None else ChipConfig.groqchip1()
    key = ("concat", tuple((a.shape, a.dtype.str) for a in arrays), axis, cfg)
    compiled = _CACHE.get(key)
    if compiled is None:
        g = Graph("concat")
        xs = [g.input(f"x{i}", a.shape, a.dtype) for i, a in enumerate(arrays)]
        g.output("y", g.concat(xs, axis=axis))
        compiled = compile(g, cfg)
        _CACHE[key] = compiled
    out, st = execute(compiled, {f"x{i}": a for i, a in enumerate(arrays)}, engine=engine)
    return (out["y"], st) if stats else out["y"]


def slice(x, key, **kw):                  # the Graph method's name
    """x[key] (basic indexing, step 1) on the chip."""
    return _run("slice", [x], {"key": key}, kw.get("config"), kw.get("engine", "fast"), kw.get("stats", False))


def _run_image(op: str, x, consts, attrs, kw):
    """Run image operation ``op`` on x with the arrays ``consts`` as graph constants (a convolution's
    weights must be: they are packed at compile time); cached by the constants' bytes too."""
    import hashlib

    from .compiler.api import compile
    from .compiler.lower import execute
    cfg = kw.pop("config", None) or ChipConfig.groqchip1()
    engine, stats = kw.pop("engine", "fast"), kw.pop("stats", False)
    if kw:
        raise GraphError(f"{op}: unexpected arguments {sorted(kw)}")
    x = np.asarray(x)
    consts = [None if a is None else np.asarray(a) for a in consts]
    sig = tuple(None if a is None else (a.shape, a.dtype.str, hashlib.sha1(a.tobytes()).hexdigest()) for a in consts)
    key = (op, (x.shape, x.dtype.str), sig, tuple(sorted((k, repr(v)) for k, v in attrs.items())), cfg)
    compiled = _CACHE.get(key)
    if compiled is None:
        g = Graph(op)
        args = [None if a is None else g.constant(None, a) for a in consts]
        g.output("y", getattr(g, op)(g.input("x0", x.shape, x.dtype), *args, **attrs))
        compiled = compile(g, cfg)
        _CACHE[key] = compiled
    out, st = execute(compiled, {"x0": x}, engine=engine)
    return (out["y"], st) if stats else out["y"]


def conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, **kw):
    """PyTorch conv2d of NCHW x by weights w [C_out, C_in / groups, kH, kW] on the chip (int8 ->
    int32, float16 -> float16); w and bias are compiled in as constants."""
    return _run_image("conv2d", x, [w, bias], dict(stride=stride, padding=padding, dilation=dilation,
                                                   groups=groups), kw)


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, **kw):
    """PyTorch max_pool2d of NCHW x on the chip."""
    return _run_image("max_pool2d", x, [], dict(kernel_size=kernel_size, stride=stride, padding=padding,
                                                dilation=dilation), kw)


def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True, **kw):
    """PyTorch avg_pool2d of float NCHW x on the chip."""
    return _run_image("avg_pool2d", x, [], dict(kernel_size=kernel_size, stride=stride, padding=padding,
                                                count_include_pad=count_include_pad), kw)


def global_avg_pool2d(x, **kw):
    """The mean over H and W of float NCHW x, [N, C, 1, 1], on the chip."""
    return _run_image("global_avg_pool2d", x, [], {}, kw)


def batch_norm(x, mean, var, gamma=None, beta=None, eps=1e-5, **kw):
    """Inference batch normalisation of float NCHW x over its channels on the chip."""
    C = np.asarray(x).shape[1]
    d = np.asarray(x).dtype
    gamma = np.ones(C, d) if gamma is None else gamma
    beta = np.zeros(C, d) if beta is None else beta
    return _run_image("batch_norm", x, [mean, var, gamma, beta], dict(eps=eps), kw)


def depth_to_space(x, block, **kw):
    """ONNX DepthToSpace (mode "DCR") of NCHW x on the chip: [N, C * r * r, H, W] -> [N, C, H * r, W * r]."""
    return _run_image("depth_to_space", x, [], dict(block=block), kw)


def flatten(x, start_dim=1, end_dim=-1, **kw):
    """x with axes start_dim..end_dim merged (PyTorch flatten) on the chip."""
    return _run_image("flatten", x, [], dict(start_dim=start_dim, end_dim=end_dim), kw)
