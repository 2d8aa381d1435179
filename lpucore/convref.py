"""NumPy references of the convolution and pooling operations (NCHW, PyTorch conventions), in the
chip's arithmetic, and the window geometry the compiler shares with them.

* int8 ``conv2d``: int32 sums of int8 products, exact (what the MXM's accumulators hold), plus an
  int32 bias;
* float16 ``conv2d``: float16 products summed in float32, rounded once to float16, then the
  float16 bias added (rounded again).  The chip sums in another order (per chunk of K on the MXM),
  so it differs by at most the float32 sum's error plus one float16 rounding of the result:
  ``|chip - ref| <= 2**-10 * |ref| + 2**-20 * sum |x * w|`` per output (:func:`conv2d_bound`);
* ``max_pool2d`` exact; ``avg_pool2d`` and ``global_avg_pool2d``: float32 sums of the window, times
  1 / count, rounded to the dtype (same bound form over the window);
* ``batch_norm``: ``x * scale + shift`` with ``scale = gamma / sqrt(var + eps)`` and
  ``shift = beta - mean * scale`` computed in float64, applied in float32 and rounded to x's dtype
  (how the VXM applies it); folded into a float16 convolution, the folded weights and bias are
  rounded to float16 instead (a convolution's bound then).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

Pair = Tuple[int, int]


def _pair(v) -> Pair:
    return (int(v), int(v)) if np.ndim(v) == 0 else (int(v[0]), int(v[1]))


def out_size(H: int, W: int, kernel, stride, padding, dilation) -> Pair:
    """(Ho, Wo) of a window over an H x W image (floor mode)."""
    k, s, p, d = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
    return tuple((n + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i, n in enumerate((H, W)))  # type: ignore


def window_rows(N: int, H: int, W: int, kernel, stride, padding, dilation) -> np.ndarray:
    """int64 [N * Ho * Wo, kH * kW]: for output position (n, ho, wo) (row-major) and tap (kh, kw),
    the pixel it reads, as a row n * H * W + h * W + w of the channel-last image, or -1 for a pad."""
    k, s, p, d = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
    Ho, Wo = out_size(H, W, k, s, p, d)
    hh = np.arange(Ho)[:, None] * s[0] + np.arange(k[0])[None, :] * d[0] - p[0]      # [Ho, kH]
    ww = np.arange(Wo)[:, None] * s[1] + np.arange(k[1])[None, :] * d[1] - p[1]      # [Wo, kW]
    h = hh[:, None, :, None]
    w = ww[None, :, None, :]
    ok = (h >= 0) & (h < H) & (w >= 0) & (w < W)
    rows = np.where(ok, h * W + w, -1)                                                # [Ho, Wo, kH, kW]
    rows = rows.reshape(1, Ho * Wo, k[0] * k[1])
    base = (np.arange(N) * H * W)[:, None, None]
    return np.where(rows >= 0, rows + base, -1).reshape(N * Ho * Wo, k[0] * k[1])


def windows(x: np.ndarray, kernel, stride, padding, dilation, fill=0) -> np.ndarray:
    """[N, Ho, Wo, kH * kW, C]: each output position's taps of NCHW x (pads: fill)."""
    N, C, H, W = x.shape
    rows = window_rows(N, H, W, kernel, stride, padding, dilation)
    cl = np.concatenate([x.transpose(0, 2, 3, 1).reshape(N * H * W, C), np.full((1, C), fill, x.dtype)])
    Ho, Wo = out_size(H, W, kernel, stride, padding, dilation)
    return cl[rows].reshape(N, Ho, Wo, rows.shape[1], C)


def weight_matrix(w: np.ndarray, groups: int) -> np.ndarray:
    """The [kH * kW * C_in, C_out] matrix of weights w [C_out, C_in / groups, kH, kW] (rows tap-major,
    then input channel; zero where an input channel is not in an output channel's group)."""
    Co, Cg, kh, kw = w.shape
    C = Cg * groups
    m = np.zeros((kh * kw, C, Co), dtype=w.dtype)
    per = Co // groups
    for g in range(groups):
        blk = w[g * per:(g + 1) * per].transpose(2, 3, 1, 0).reshape(kh * kw, Cg, per)
        m[:, g * Cg:(g + 1) * Cg, g * per:(g + 1) * per] = blk
    return m.reshape(kh * kw * C, Co)


def conv2d(x: np.ndarray, w: np.ndarray, bias: Optional[np.ndarray] = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> np.ndarray:
    """PyTorch conv2d in the chip's arithmetic (module docstring): int8 -> int32, float16 -> float16."""
    k = w.shape[2:]
    win = windows(x, k, stride, padding, dilation)
    N, Ho, Wo = win.shape[:3]
    cols = win.reshape(N * Ho * Wo, -1)
    m = weight_matrix(w, groups)
    if x.dtype == np.int8:
        y = cols.astype(np.int64) @ m.astype(np.int64)
        if bias is not None:
            y = y + bias.astype(np.int64)
        y = y.astype(np.int32)
    else:
        y = (cols.astype(np.float32) @ m.astype(np.float32)).astype(np.float16)
        if bias is not None:
            y = (y.astype(np.float32) + bias.astype(np.float32)).astype(np.float16)
    return np.ascontiguousarray(y.reshape(N, Ho, Wo, -1).transpose(0, 3, 1, 2))


def conv2d_bound(x: np.ndarray, w: np.ndarray, ref: np.ndarray, stride=1, padding=0, dilation=1,
                 groups: int = 1) -> np.ndarray:
    """The documented bound on |chip - reference| of a float16 conv2d, per output element."""
    mag = np.abs(conv2d(np.abs(x).astype(np.float32).astype(np.float16), np.abs(w), None, stride, padding,
                        dilation, groups).astype(np.float32))
    return 2.0 ** -10 * np.abs(ref.astype(np.float32)) + 2.0 ** -9 * mag + 2.0 ** -24


def max_pool2d(x: np.ndarray, kernel_size, stride=None, padding=0, dilation=1) -> np.ndarray:
    lo = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    win = windows(x, kernel_size, kernel_size if stride is None else stride, padding, dilation, fill=lo)
    return np.ascontiguousarray(win.max(axis=3).transpose(0, 3, 1, 2))


def avg_pool2d(x: np.ndarray, kernel_size, stride=None, padding=0, count_include_pad: bool = True) -> np.ndarray:
    s = kernel_size if stride is None else stride
    win = windows(x, kernel_size, s, padding, 1).astype(np.float32)
    if count_include_pad:
        y = win.sum(axis=3) * np.float32(1.0 / win.shape[3])
    else:
        N, C, H, W = x.shape
        cnt = (window_rows(N, H, W, kernel_size, s, padding, 1) >= 0).sum(axis=1)
        y = win.sum(axis=3) * (1.0 / cnt.astype(np.float32)).reshape(win.shape[:3] + (1,))
    return np.ascontiguousarray(y.astype(x.dtype).transpose(0, 3, 1, 2))


def global_avg_pool2d(x: np.ndarray) -> np.ndarray:
    N, C, H, W = x.shape
    return (x.astype(np.float32).sum(axis=(2, 3)) * np.float32(1.0 / (H * W))).astype(x.dtype).reshape(N, C, 1, 1)


def bn_affine(*stats: np.ndarray, eps: float) -> Tuple[np.ndarray, np.ndarray]:
    """float64 (scale, shift) of an inference batch normalisation; stats: mean, var, gamma, beta [C]."""
    mean, var, gamma, beta = stats
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    return scale, np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * scale


def batch_norm(x: np.ndarray, mean, var, gamma=None, beta=None, eps: float = 1e-5) -> np.ndarray:
    C = x.shape[1]
    gamma = np.ones(C) if gamma is None else gamma
    beta = np.zeros(C) if beta is None else beta
    scale, shift = bn_affine(mean, var, gamma, beta, eps=eps)
    s = scale.astype(np.float32).reshape(1, C, 1, 1)
    b = shift.astype(np.float32).reshape(1, C, 1, 1)
    return (x.astype(np.float32) * s + b).astype(x.dtype)


def flatten(x: np.ndarray, start_dim: int = 1, end_dim: int = -1) -> np.ndarray:
    nd = x.ndim
    a, b = start_dim % nd, end_dim % nd
    shape: Sequence[int] = x.shape[:a] + (int(np.prod(x.shape[a:b + 1])),) + x.shape[b + 1:]
    return x.reshape(shape)


def depth_to_space(x: np.ndarray, block: int) -> np.ndarray:
    """ONNX DepthToSpace, mode "DCR": [N, C * r * r, H, W] -> [N, C, H * r, W * r]."""
    N, C, H, W = x.shape
    r = int(block)
    y = x.reshape(N, r, r, C // (r * r), H, W).transpose(0, 3, 4, 1, 5, 2)
    return np.ascontiguousarray(y.reshape(N, C // (r * r), H * r, W * r))
