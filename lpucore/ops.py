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
