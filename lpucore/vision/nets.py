"""The one ResNet forward pass (:func:`forward`) over four implementations of its operations:

* :class:`FloatNet`: float32 NumPy with the batch normalisations as given (calibration, and the
  statistics pass that gives random weights their running means and variances);
* :class:`GraphInt8` / :class:`NumpyInt8`: the int8 network on a Graph, and the same arithmetic
  in NumPy (bit for bit: int32 sums, the chip's float32 requantisation);
* :class:`GraphF16` / :class:`NumpyF16`: the float16 network (batch normalisation folded into
  float16 weights and bias on the host), and its NumPy reference, which can check a run layer by layer.

An int8 activation is a pair (tensor, scale).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import convref
from ..graph import Graph
from .arch import ConvBN, ResNetSpec, stem_weights_s2d, stem_weights_s2d4

F16, F32 = np.float16, np.float32
EPS = 1e-5                     # torchvision's BatchNorm2d eps
U16 = 2.0 ** -10               # a float16 rounding (relative), with margin


def forward(spec: ResNetSpec, ops: Any, x: Any, stem: str = "direct") -> Any:
    """The network: stem convolution, ReLU, 3x3/2 max pool, the residual blocks (the last
    convolution of a block adds the shortcut before its ReLU), then ``ops.head`` (global average
    pool and the linear layer). ``ops.mark(name)`` closes each part (for the cycle attribution).
    ``stem`` "s2d": x is the space-to-depth image and the stem its 4x4 form
    (:func:`~lpucore.vision.arch.space_to_depth`); "s2d4": x is the 4 x 4 space-to-depth image, the stem
    its 3x3 form giving 2 x 2 pixel blocks, then ``ops.d2s`` (:func:`~lpucore.vision.arch.space_to_depth4`)."""
    y = ops.conv(x, {"direct": spec.stem, "s2d": spec.stem_s2d, "s2d4": spec.stem_s2d4}[stem], True)
    x = ops.pool(ops.d2s(y) if stem == "s2d4" else y)
    ops.mark("conv1")
    for b in spec.blocks():
        short = x if b.down is None else ops.conv(x, b.down, False)
        y = x
        for c in b.convs[:-1]:
            y = ops.conv(y, c, True)
        x = ops.conv(y, b.convs[-1], True, res=short)
        ops.mark(b.name)
    out = ops.head(x)
    ops.mark("fc")
    return out


def stem_form(stem: str, w: np.ndarray, *per_channel: np.ndarray) -> tuple:
    """The stem convolution's weights ``w`` [C_out, 3, 7, 7] and per-output-channel constants as ``stem``
    uses them: the same for "direct", the weights moved for "s2d", and for "s2d4" the weights moved and each
    constant repeated four times (four output pixels a position)."""
    if stem == "s2d":
        return (stem_weights_s2d(w), *per_channel)
    if stem == "s2d4":
        return (stem_weights_s2d4(w), *(np.tile(v, 4) for v in per_channel))
    return (w, *per_channel)


def conv_f32(x: np.ndarray, w: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """float32 convolution in NumPy (the windows of :mod:`lpucore.convref` times the weight matrix)."""
    win = convref.windows(x.astype(F32), w.shape[2:], stride, padding, 1)
    N, Ho, Wo = win.shape[:3]
    y = win.reshape(N * Ho * Wo, -1) @ convref.weight_matrix(w.astype(F32), 1)
    return np.ascontiguousarray(y.reshape(N, Ho, Wo, -1).transpose(0, 3, 1, 2))


def folded(w: Dict[str, np.ndarray], c: ConvBN) -> Tuple[np.ndarray, np.ndarray]:
    """float64 weights [C_out, C_in, k, k] and shift [C_out] of convolution c with its batch
    normalisation folded in (``w * gamma / sqrt(var + eps)``, ``beta - mean * gamma / sqrt(var + eps)``)."""
    scale, shift = convref.bn_affine(w[c.bn + ".running_mean"], w[c.bn + ".running_var"],
                                     w[c.bn + ".weight"], w[c.bn + ".bias"], eps=EPS)
    return w[c.conv + ".weight"].astype(np.float64) * scale[:, None, None, None], shift


class Marks:
    """Part names, and for a graph the node count at the end of each part."""

    def __init__(self, g: Optional[Graph] = None) -> None:
        self.marks: List[Tuple[str, int]] = []
        self._graph = g

        self.consts: Dict[str, Any] = {}

    def mark(self, name: str) -> None:
        self.marks.append((name, len(self._graph.nodes) if self._graph is not None else 0))

    def const(self, key: str, arr: np.ndarray):
        """One graph constant per array, however many images read it (graph networks only)."""
        if key not in self.consts:
            assert self._graph is not None, "const() builds a graph constant"
            self.consts[key] = self._graph.constant(None, arr)
        return self.consts[key]


class FloatNet(Marks):
    """float32 NumPy; ``stats=True`` sets each batch normalisation's running mean and variance (in
    ``w``) to those of its convolution's output on these images first. ``amax``: the largest |value|
    of each convolution's output (after the shortcut and ReLU), of the image ("x") and of the pooled
    features ("gap")."""

    def __init__(self, w: Dict[str, np.ndarray], stats: bool = False):
        super().__init__()
        self.w, self.stats = w, stats
        self.amax: Dict[str, float] = {}

    def _seen(self, name: str, v: np.ndarray) -> None:
        self.amax[name] = max(self.amax.get(name, 0.0), float(np.abs(v).max()))

    def conv(self, x, c: ConvBN, relu: bool, res=None):
        y = conv_f32(x, self.w[c.conv + ".weight"], c.stride, c.padding)
        if self.stats:
            self.w[c.bn + ".running_mean"] = y.mean(axis=(0, 2, 3)).astype(F32)
            self.w[c.bn + ".running_var"] = y.var(axis=(0, 2, 3)).astype(F32)
        scale, shift = convref.bn_affine(self.w[c.bn + ".running_mean"], self.w[c.bn + ".running_var"],
                                         self.w[c.bn + ".weight"], self.w[c.bn + ".bias"], eps=EPS)
        y = y * scale.astype(F32).reshape(1, -1, 1, 1) + shift.astype(F32).reshape(1, -1, 1, 1)
        if res is not None:
            y = y + res
        y = np.maximum(y, F32(0)) if relu else y
        self._seen(c.conv, y)
        return y.astype(F32)

    def pool(self, x):
        return convref.max_pool2d(x, 3, 2, 1)

    def head(self, x):
        f = x.mean(axis=(2, 3))
        self._seen("gap", f)
        return f @ self.w["fc.weight"].T.astype(F32) + self.w["fc.bias"].astype(F32)


class Int8Params:
    """The int8 network's constants, shared by :class:`GraphInt8` and :class:`NumpyInt8` so that both
    compute with the same numbers: per conv, int8 weights (per-output-channel scale max |w| / 127 of
    the folded weights), the float32 multiplier ``s_in * s_w / s_out`` and shift ``shift / s_out``
    (computed in float64: the output's scale folded in, so that requantising is a ``cvt`` of the
    result, as a fixed-point requantisation multiplies by one combined scale); the classifier likewise."""

    def __init__(self, spec: ResNetSpec, w: Dict[str, np.ndarray], scales: Dict[str, float], stem: str = "direct"):
        self.s = scales
        self.conv: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        sin = {spec.stem.conv: scales["x"]}
        prev = spec.stem.conv
        for b in spec.blocks():
            sin[b.convs[0].conv] = scales[prev]
            if b.down is not None:
                sin[b.down.conv] = scales[prev]
            for a, c in zip(b.convs, b.convs[1:]):
                sin[c.conv] = scales[a.conv]
            prev = b.convs[-1].conv
        for c in spec.convs():
            wf, shift = folded(w, c)
            wq, ws = _per_channel(wf.reshape(len(wf), -1))
            sout = np.float64(scales[c.conv])
            self.conv[c.conv] = (wq.reshape(wf.shape), (sin[c.conv] * ws / sout).astype(F32),
                                 (shift / sout).astype(F32))
        self.conv[spec.stem.conv] = stem_form(stem, *self.conv[spec.stem.conv])
        self.last = prev
        fq, fs = _per_channel(w["fc.weight"].astype(np.float64))
        self.fc_w = np.ascontiguousarray(fq.T)                              # [features, classes]
        self.gap_scale = F32(scales["gap"] / scales[prev])                  # quantize the pooled q values
        self.fc_m = (scales["gap"] * fs).astype(F32)
        self.fc_b = w["fc.bias"].astype(F32)


def _per_channel(w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """int8 rows of w (max |row| / 127 per row; a zero row gets scale 1 / 127) and the scales."""
    m = np.abs(w).max(axis=1)
    s = np.where(m > 0, m, 1.0) / 127
    return np.clip(np.rint(w / s[:, None]), -127, 127).astype(np.int8), s


def residual_ratio(res_scale: float, out_scale: float, channels: int) -> np.ndarray:
    """A shortcut's int8 values' scale over the block output's, per channel (float32; computed in float64):
    the shortcut added as ``q_res * ratio`` to a sum already in units of the output's scale."""
    return np.full(channels, np.float64(res_scale) / np.float64(out_scale), dtype=F32)


class GraphInt8(Marks):
    """The int8 network on a Graph: int8 convolutions (int32 sums), requantised in float32 on the VXM in
    one fused kernel: ``cast``, ``mul`` and ``add`` per channel (the output's scale folded in, Int8Params),
    a shortcut's ``cast`` and ``mul`` by its scale ratio, ``relu``, ``quantize`` with scale 1 (a lone
    ``cvt``): 8 VXM operations at a block's end, so that two ALU sets take two rows a cycle."""

    def __init__(self, g: Graph, p: Int8Params):
        super().__init__(g)
        self.g, self.p = g, p

    def conv(self, x, c: ConvBN, relu: bool, res=None):
        g, (q, _sin) = self.g, x
        wq, m, shift = self.p.conv[c.conv]
        acc = g.conv2d(q, self.const(c.conv, wq), stride=c.stride, padding=c.padding)
        y = g.add(g.mul(g.cast(acc, "float32"), m.reshape(-1, 1, 1)), shift.reshape(-1, 1, 1))
        sout = self.p.s[c.conv]
        if res is not None:
            ratio = residual_ratio(res[1], sout, len(m))
            y = g.add(y, g.mul(g.cast(res[0], "float32"), ratio.reshape(-1, 1, 1)))
        return g.quantize(g.relu(y) if relu else y, 1.0), sout

    def pool(self, x):
        return self.g.max_pool2d(x[0], 3, 2, 1), x[1]

    def d2s(self, x):
        return self.g.depth_to_space(x[0], 2), x[1]

    def head(self, x):
        g, p = self.g, self.p
        f = g.flatten(g.global_avg_pool2d(g.cast(x[0], "float32")))   # mean of the q values: exact sums
        acc = g.matmul(g.quantize(f, float(p.gap_scale)), self.const("fc", p.fc_w))
        return g.add(g.mul(g.cast(acc, "float32"), p.fc_m), p.fc_b)


class NumpyInt8(Marks):
    """:class:`GraphInt8`'s arithmetic in NumPy, operation for operation (the chip rounds float32
    products, sums and quotients like NumPy's float32)."""

    def __init__(self, p: Int8Params):
        super().__init__()
        self.p = p

    @staticmethod
    def quantize(y: np.ndarray, s) -> np.ndarray:
        return np.clip(np.rint(y / F32(s)), -128, 127).astype(np.int8)

    def conv(self, x, c: ConvBN, relu: bool, res=None):
        (q, _sin), (wq, m, shift) = x, self.p.conv[c.conv]
        acc = convref.conv2d(q, wq, None, c.stride, c.padding).astype(F32)
        y = acc * m.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
        sout = self.p.s[c.conv]
        if res is not None:
            y = y + res[0].astype(F32) * residual_ratio(res[1], sout, len(m)).reshape(1, -1, 1, 1)
        y = np.maximum(y, F32(0)) if relu else y
        return self.quantize(y, 1.0), sout

    def pool(self, x):
        return convref.max_pool2d(x[0], 3, 2, 1), x[1]

    def d2s(self, x):
        return convref.depth_to_space(x[0], 2), x[1]

    def head(self, x):
        p = self.p
        f = convref.global_avg_pool2d(x[0].astype(F32)).reshape(1, -1)
        acc = (self.quantize(f, p.gap_scale).astype(np.int64) @ p.fc_w.astype(np.int64)).astype(np.int32)
        return acc.astype(F32) * p.fc_m + p.fc_b


class F16Params:
    """The float16 network's constants: each convolution's folded weights and bias rounded to float16
    (what the compiler would fold from float16 statistics, but from the float32 ones), the
    classifier's transposed weights and bias in float16."""

    def __init__(self, spec: ResNetSpec, w: Dict[str, np.ndarray], stem: str = "direct"):
        self.conv: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        for c in spec.convs():
            wf, shift = folded(w, c)
            with np.errstate(over="ignore"):          # an overflow is reported by finite()
                self.conv[c.conv] = (wf.astype(F16), shift.astype(F16))
        self.conv[spec.stem.conv] = stem_form(stem, *self.conv[spec.stem.conv])
        with np.errstate(over="ignore"):
            self.fc_w = np.ascontiguousarray(w["fc.weight"].T).astype(F16)
            self.fc_b = w["fc.bias"].astype(F16)

    def finite(self) -> Optional[str]:
        """The name of a parameter that overflows float16, or None."""
        for name, (wf, b) in self.conv.items():
            if not (np.isfinite(wf).all() and np.isfinite(b).all()):
                return name
        return None if np.isfinite(self.fc_w).all() and np.isfinite(self.fc_b).all() else "fc"


class GraphF16(Marks):
    """The float16 network on a Graph (float32 sums on the MXM, results rounded to float16)."""

    def __init__(self, g: Graph, p: F16Params, taps: bool = False):
        super().__init__(g)
        self.g, self.p, self.taps = g, p, taps

    def conv(self, x, c: ConvBN, relu: bool, res=None):
        g = self.g
        wf, b = self.p.conv[c.conv]
        y = g.conv2d(x, self.const(c.conv, wf), self.const(c.conv + ".bias", b), stride=c.stride, padding=c.padding)
        if res is not None:
            y = g.add(y, res)
        y = g.relu(y) if relu else y
        if self.taps:
            g.output("tap_" + c.conv.replace(".", "_"), y)
        return y

    def pool(self, x):
        return self.g.max_pool2d(x, 3, 2, 1)

    def d2s(self, x):
        return self.g.depth_to_space(x, 2)

    def head(self, x):
        g = self.g
        f = g.flatten(g.global_avg_pool2d(x))
        return g.add(g.matmul(f, self.const("fc", self.p.fc_w)), self.const("fc.bias", self.p.fc_b))


class NumpyF16(Marks):
    """The float16 network in NumPy (:mod:`lpucore.convref`). With ``chip`` (the chip's output of
    every convolution, by name, and its logits: a tapped run), each layer is computed from the chip's
    own input to it instead and checked against the chip's result: ``worst[name]`` is the largest
    |chip - reference| / bound, the bound being the documented one of a float16 convolution
    (:func:`lpucore.convref.conv2d_bound`) plus a float16 rounding of the bias and of a shortcut
    addition (the chip may fuse them into the convolution's one rounding), and for the classifier that
    of the mean (a rounding and the float32 sum's error) passed through |w|. <= 1 is within the bound."""

    def __init__(self, p: F16Params, chip: Optional[Dict[str, np.ndarray]] = None):
        super().__init__()
        self.p, self.chip = p, chip
        self.worst: Dict[str, float] = {}

    def _check(self, name: str, ref: np.ndarray, bound: np.ndarray) -> np.ndarray:
        """The chip's value of ``name`` after noting its distance from ``ref`` against ``bound``."""
        if self.chip is None:
            return ref
        got = self.chip[name]
        err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        self.worst[name] = float((err / bound).max())
        return got

    def conv(self, x, c: ConvBN, relu: bool, res=None):
        wf, b = self.p.conv[c.conv]
        y = convref.conv2d(x, wf, b, c.stride, c.padding)
        bound = (convref.conv2d_bound(x, wf, y, c.stride, c.padding)
                 + U16 * (np.abs(y.astype(np.float64)) + np.abs(b.astype(np.float64)).reshape(1, -1, 1, 1)))
        if res is not None:
            y = (y.astype(F32) + res.astype(F32)).astype(F16)
            bound = bound + U16 * np.abs(y.astype(np.float64))
        y = np.maximum(y, F16(0)) if relu else y
        return self._check(c.conv, y, bound)

    def pool(self, x):
        return convref.max_pool2d(x, 3, 2, 1)           # exact: the chip's is the same

    def d2s(self, x):
        return convref.depth_to_space(x, 2)             # exact: values moved

    def head(self, x):
        p = self.p
        f = convref.global_avg_pool2d(x).reshape(1, -1)
        n = x.shape[2] * x.shape[3]
        ef = U16 * np.abs(f.astype(np.float64)) + n * 2.0 ** -23 * np.abs(x.astype(np.float64)).max()
        y = (f.astype(F32) @ p.fc_w.astype(F32)).astype(F16)
        logits = (y.astype(F32) + p.fc_b.astype(F32)).astype(F16)
        wabs = np.abs(p.fc_w.astype(np.float64))
        bound = (2 * U16 * (np.abs(f.astype(np.float64)) @ wabs) + ef @ wabs * (1 + 4 * U16)
                 + U16 * (np.abs(logits.astype(np.float64)) + np.abs(p.fc_b.astype(np.float64))) + 2.0 ** -24)
        return self._check("logits", logits, bound)
