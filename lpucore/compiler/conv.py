"""Convolution and pooling: how the compiler lowers ``conv2d``, ``max_pool2d``, ``avg_pool2d``,
``global_avg_pool2d``, ``batch_norm`` and ``flatten`` (NCHW graph operations, PyTorch conventions).

Before lowering, :func:`rewrite` turns a graph holding any of them into one of operations the
compiler already lowers plus one internal layout operation, ``window``:

* **Channel-last activations.**  An image produced by a convolution or a pool is kept
  channel-last, as a 2-d tensor ``[N*H*W, C]`` (one row per pixel, its channels across the
  lanes), never as NCHW: the MXM's results come out that way (a row per output position, a lane
  per output channel), and a window tap is then a choice of rows.  Elementwise operations whose
  operands are such images, per-channel vectors (``[C, 1, 1]``) or scalars (``relu``, a residual
  ``add``, ``cast``, ``quantize`` / ``dequantize`` per tensor, ...) stay channel-last; any other
  consumer gets the NCHW tensor back by a transpose (one lane-move relayout, at the boundary only).
  An NCHW graph input read only by image operations is written by the host channel-last (NHWC:
  a fixed permutation of its bytes, ``Compiled.input_axes``); another one is read straight by
  the first layer's windows (moving one lane per piece: slow).
* **Windows formed on the chip, taps and channels packed** (pools, and convolutions of NCHW
  images).  ``window`` is a layout operation (:func:`window_map`, lowered by
  :func:`lpucore.compiler.lower_more.relayout`): row p of its output is, for each tap (kh, kw) in
  turn, the C channels of the pixel that output position p reads
  (:func:`lpucore.convref.window_rows`, addresses fixed at compile time), or the fill vector for a
  pad.  The taps sit side by side along the row, so K = kH*kW*C is packed densely into the MXM's
  rows whatever C is: the 3-channel first layer's 7x7 window is one K chunk of 147 rows, not 49
  chunks.  A whole vector that only moves (C a multiple of the lanes) is copied by the VXM;
  pieces of vectors change lanes through SXM shifts (``lanemove_kernel``), which is what makes a
  window slow (about 4.7 cycles an output row for 64 channels).
* **Convolution of a channel-last image: no window** (``conv_taps``, lowered by
  :func:`lpucore.compiler.lower_more.conv_taps`).  The product by the constant weight matrix
  ``[kH*kW*C_in, C_out]`` (:func:`lpucore.convref.weight_matrix`; groups as a block-diagonal
  matrix, zeros elsewhere) takes each tap as K chunks of its own: the activations of tap (kh, kw)
  for output position p are the image's row that position reads, straight from MEM at an address
  fixed at compile time, and its weights are the matrix's C_in rows of that tap (the chunk's other
  rows load zeros).  A pad's products are skipped (the first tap with a pixel replaces the
  accumulator, the others add to it).  The MXM does ``kH*kW*ceil(C_in / K chunk)`` products a
  position instead of ``ceil(kH*kW*C_in / K chunk)``, and nothing moves the image: measured on
  ResNet-50 at 64 x 64 (one GroqChip), 26,605 cycles with windows against 24,427 without, and a
  quarter of the compile time; the space-to-depth stem's 4x4 convolution of 12 channels (16 taps of
  one nearly empty chunk each instead of one full chunk) still gains, 8,626 -> 6,897 cycles for
  stem and pool.  A 1x1 stride-1 unpadded convolution is a plain ``matmul``.
* **Pixels packed.**  An image of C channels fills C of a vector's lanes; when only convolutions
  read a convolution's output (through elementwise operations with constant per-channel or scalar
  operands: a requantisation, a ReLU), it is kept with P pixels a row, ``[N*H*W / P, P * C]``, P
  the most that fit the lanes and divide the image's width (the same bytes in the same order: a
  row of the image is W / P vectors).  Its elementwise operations take each per-channel constant
  P times along the row, and its reader convolves packed rows (:func:`packed_groups`): output
  vector j's P_out positions read input pixels at fixed offsets from j * P_out * stride / P_in, so
  the taps fall into groups (kernel row, input vector offset; and the output's phase when P_out *
  stride is not a multiple of P_in), one K chunk of P_in * C rows each, whose weights put tap t's
  C rows at the input pixel's slot and the output pixel's columns (:func:`packed_weights`).  A
  3x3 convolution of 64 channels over 56 pixels a row packed four to a vector: 9 products a row
  of four pixels instead of 9 a pixel, and a quarter of the requantisation's vectors; a 1x1 one
  back to 256 channels (one pixel a row): one product a pixel as before, each output row reading
  its phase's slot, the rows ordered so that a dealt block of rows is one phase's (one weight
  load).  ResNet-50 at 224 x 224: 147,783 -> 121,894 cycles.
* **Convolution of an NCHW image** (an input also read by other operations) or with an output
  position whose taps are all pads: ``window``, then one ``matmul`` by the same matrix.  Either
  way the bias is an ``add`` fused into the results' map kernel; int8 gives int32 accumulators;
  requantisation is the graph's own ``cast`` / ``mul`` / ``quantize``, fused on the VXM.
* **Pools**: ``window`` with the taps apart (``[P, taps, C]``) and a reduction across rows (one
  map kernel: ``max``, ``mean``, or a float32 sum times a per-position reciprocal when pads do
  not count); pads are -inf (the dtype's least integer) for max, zero otherwise.  A max pool of a
  channel-last image forms no window: its ``window`` (``pads="repeat"``) is a map of reads of the
  image's rows, fused into the max, a pad reading the position's first pixel again (it could not
  win the max), and the image is striped over as many slices as spread the taps of two
  neighbouring positions over distinct ones (:func:`window_stripes`: a slice reads one vector a
  cycle; the stem's 112-pixel-wide image over the default 8 stripes put its 9 taps on 3 slices).
  At 224 x 224 this took ResNet-50 from 168,470 cycles to 157,785 (stem and pool 34,682 -> 20,293). Global average
  pooling is ``mean`` across the rows of each image.
* **Batch normalisation** (inference) is folded into the preceding float convolution when that
  convolution's output feeds only it and its statistics are constants (weights and bias scaled
  at compile time: no cycles); otherwise it is ``x * scale + shift`` in float32 on the VXM.
* ``flatten`` of a globally pooled image is the channel-last tensor itself ([N, C]); otherwise a
  reshape of the NCHW tensor.
* ``depth_to_space`` (ONNX "DCR") of a channel-last image is the internal layout operation ``d2s``
  (:func:`d2s_map`): output row (n, h r + i, w r + j) is lanes ``(i r + j) C .. + C`` of input row
  (n, h, w), a piece moved by the SXM (or a copy for i = j = 0).

**Cost.**  A product costs one ABC per output row and K chunk (fp16: every ``mxm_fp16_interval``
cycles; a windowless convolution's chunks are per tap, pads skipped) and one weight load per K
chunk and column tile.  A window costs one MEM write per output vector (P * ceil(kH*kW*C / lanes)
of them) plus, when C is not a multiple of the lanes, an SXM shift per piece (about kH*kW pieces a
row).  A packed convolution costs one ABC per output vector and group (pads skipped).  An input
image read only by convolutions is packed too: the host writes the same bytes (``input_axes``), the
program's tensor holding several pixels a row.  Not done: a max pool or a residual ``add`` of
packed images (their images stay one pixel a row: 256 channels and more fill most of a vector
anyway), and keeping groups apart instead of block-diagonal weights (depthwise convolutions).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np

from .. import convref
from .. import dtypes as dt
from ..graph import BINARY, UNARY_ANY, UNARY_FLOAT, Graph, Node, Tensor

IMAGE_OPS = ("conv2d", "max_pool2d", "avg_pool2d", "global_avg_pool2d", "batch_norm", "flatten", "depth_to_space")
_ELEMENTWISE = set(BINARY) | set(UNARY_FLOAT) | set(UNARY_ANY) | {"cast", "gelu", "quantize", "dequantize"}
Dims = Tuple[int, ...]


def tap_rows(n: Node) -> np.ndarray:
    """int64 [positions, taps]: the image row each tap of a ``window`` or ``conv_taps`` node reads, -1
    for a pad (:func:`lpucore.convref.window_rows` of the node's geometry attributes); for a packed
    ``conv_taps`` (attribute ``pack``), [output vectors, groups] (:func:`packed_groups`)."""
    if "pack" in n.attrs:
        return packed_groups(n.attrs)[0]
    return _rows_of(n.attrs)


def packed_groups(a: Dict) -> Tuple[np.ndarray, List[List[Tuple[int, int, int]]]]:
    """A convolution between packed channel-last images (module docstring, "Pixels packed"): with
    ``pack=(Pi, Po)``, a vector (row) of the input holds Pi consecutive pixels of one image row, C
    channels each, and one of the output Po positions. Returns (rows, parts): rows int64 [output
    vectors, groups], the input vector each group of taps reads for each output vector (-1: none,
    a pad or another phase's group), and per group its parts (tap, input slot, output slot): the
    weights of tap t's C rows go to the group's rows si*C.. and columns so*C_out...

    A group is (phase q, kernel row ky, input vector offset d): output vector j's slots read input
    pixels j*Po*sx + so*sx + kx*dx - px, so when Po*sx is a multiple of Pi the input vectors lie at
    fixed offsets d from j*Po*sx/Pi (one phase); otherwise the offsets repeat with the phase
    q = j mod Q, Q = Pi / gcd(Po*sx, Pi), and each phase has groups of its own. A pixel outside
    the image lies in a vector outside it (W is a multiple of Pi), so a group is all pixels or a pad."""
    N, C, H, W = a["image"]
    Ho, Wo = a["out"]
    (kh, kw), (sy, sx), (py, px), (dy, dx) = a["kernel"], a["stride"], a["padding"], a["dilation"]
    Pi, Po = a["pack"]
    Wi, Wj = W // Pi, Wo // Po                    # vectors an image row, input and output
    Q = phases(a)
    keys: Dict[Tuple[int, int, int], List[Tuple[int, int, int]]] = {}
    for q in range(Q):
        base = (q * Po * sx) // Pi
        for ky in range(kh):
            for kx in range(kw):
                for so in range(Po):
                    xi = q * Po * sx + so * sx + kx * dx - px
                    keys.setdefault((q, ky, xi // Pi - base), []).append((ky * kw + kx, xi % Pi, so))
    groups = sorted(keys)
    j = np.arange(Wj)
    yo = np.arange(Ho)
    rows = np.full((N, Ho, Wj, len(groups)), -1, dtype=np.int64)
    for g, (q, ky, d) in enumerate(groups):
        yi = yo * sy + ky * dy - py                                   # [Ho]
        v = (j * Po * sx) // Pi + d                                   # [Wj]
        ok = ((yi >= 0) & (yi < H))[:, None] & ((v >= 0) & (v < Wi) & (j % Q == q))[None, :]
        r = yi[:, None] * Wi + v[None, :]
        for n in range(N):
            rows[n, :, :, g] = np.where(ok, r + n * H * Wi, -1)
    return rows.reshape(N * Ho * Wj, len(groups)), [keys[k] for k in groups]


def phases(a: Dict) -> int:
    """Phases of a ``conv_taps`` node's output vectors (:func:`packed_groups`; 1 when not packed)."""
    if "pack" not in a:
        return 1
    Pi, Po = a["pack"]
    return Pi // math.gcd(Po * a["stride"][1], Pi)


def packed_weights(a: Dict, m: np.ndarray, C: int,
                   parts: Optional[List[List[Tuple[int, int, int]]]] = None) -> np.ndarray:
    """The weight matrix [groups * Pi * C, Po * C_out] of a packed ``conv_taps`` (attribute ``pack``)
    from the convolution's matrix m [taps * C, C_out] (:func:`lpucore.convref.weight_matrix`): group
    g's rows are its parts' taps at their input slots, in their output slots' columns, zero elsewhere
    (``parts``: :func:`packed_groups`' second result, when already at hand)."""
    Pi, Po = a["pack"]
    Co = m.shape[1]
    if parts is None:
        parts = packed_groups(a)[1]
    out = np.zeros((len(parts), Pi * C, Po * Co), dtype=m.dtype)
    for g, ps in enumerate(parts):
        for t, si, so in ps:
            out[g, si * C:(si + 1) * C, so * Co:(so + 1) * Co] = m[t * C:(t + 1) * C]
    return out.reshape(len(parts) * Pi * C, Po * Co)


def _rows_of(a: Dict) -> np.ndarray:
    N, C, H, W = a["image"]
    return convref.window_rows(N, H, W, a["kernel"], a["stride"], a["padding"], a["dilation"])


def window_map(n: Node, ins: List[Tensor], t: Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """The element map of a ``window`` node (registry's ElementMap): for every flat output element,
    (0, element of the image) or (1, channel of the fill vector) for a pad."""
    a = n.attrs
    N, C, H, W = a["image"]
    rows = tap_rows(n)                            # [P, T]
    c = np.arange(C)
    r = rows[:, :, None]
    if a["kind"] == "rows":
        elem = r * C + c
    else:                                         # NCHW: pixel (n, h, w) of channel c
        nn, hw = np.divmod(np.maximum(r, 0), H * W)
        elem = (nn * C + c) * (H * W) + hw
    pad = np.broadcast_to(r < 0, elem.shape)
    which = pad.astype(np.int64).ravel()
    return which, np.where(pad, np.broadcast_to(c, elem.shape), elem).ravel().astype(np.int64)


def repeat_vectors(n: Node, lanes: int) -> np.ndarray:
    """For a ``window`` node with ``pads="repeat"`` (a max pool's taps of a channel-last image, read by
    the max alone): the image's vector each vector of the window [P, taps, C] is, a pad repeating the
    position's first tap with a pixel (max(a, a) = a, and a pad of the dtype's least value or -inf
    never wins the max, so the pool's result is the same)."""
    C = n.attrs["image"][1]
    rows = tap_rows(n)                            # [P, T]
    first = rows[np.arange(len(rows)), np.argmax(rows >= 0, axis=1)]
    rows = np.where(rows >= 0, rows, first[:, None])
    cv = -(-C // lanes)
    return (rows.reshape(-1, 1) * cv + np.arange(cv)).ravel()


def window_stripes(n: Node, most: int, sample: int = 64) -> int:
    """Slices to stripe the image of a ``pads="repeat"`` window over (the image's row r, chunk c lies in
    stripe (r + c) mod stripes), so that a max reading all its taps at once finds them on distinct
    slices (a slice reads one vector a cycle): the fewest stripes from the taps' count up to ``most``
    that least crowd one slice over two consecutive output positions (two ALU sets side by side),
    judged on ``sample`` positions whose taps are all pixels. 9 taps' rows of a 112-pixel-wide image
    over 8 stripes share 3 slices (112 = 0 mod 8); over 12 they take 9."""
    rows = tap_rows(n)
    inner = rows[(rows >= 0).all(axis=1)]
    T = rows.shape[1]
    if len(inner) < 2 or T >= most:
        return most
    step = max(1, (len(inner) - 1) // sample)
    # output vector (p, chunk c) reads chunk c of each tap's row: stripes (row + c) mod ns, as crowded as c = 0
    pairs = [inner[i:i + 2].ravel() for i in range(0, len(inner) - 1, step)]

    def crowd(ns: int) -> int:
        return max(int(np.bincount(p % ns, minlength=ns).max()) for p in pairs)
    return min(range(T, most + 1), key=lambda ns: (crowd(ns), ns))


def d2s_map(n: Node, ins: List[Tensor], t: Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """The element map of a ``d2s`` node (``depth_to_space`` of a channel-last image [N*H*W, C*r*r] into
    [N*(H*r)*(W*r), C]): for every flat output element, (0, element of the input)."""
    N, Cr, H, W = n.attrs["image"]
    r = n.attrs["block"]
    C = Cr // (r * r)
    nn, y, x, c = np.meshgrid(np.arange(N), np.arange(H * r), np.arange(W * r), np.arange(C), indexing="ij")
    row = (nn * H + y // r) * W + x // r
    elem = row * Cr + ((y % r) * r + x % r) * C + c
    return np.zeros(elem.size, dtype=np.int64), elem.ravel().astype(np.int64)


def rewrite(g: Graph, lanes: int) -> Tuple[Graph, Dict[str, Tuple[int, ...]]]:
    """(g itself, {}) when g has no image operation, else an equivalent graph of operations the
    compiler lowers (module docstring) and the inputs the host writes permuted (name -> axes).
    ``lanes``: the chip's vector width (``ChipConfig.lanes``), which sets how many pixels a packed
    image's vector holds."""
    if not any(n.op in IMAGE_OPS for n in g.nodes):
        return g, {}
    r = _Rewriter(g, lanes)
    return r.run(), r.input_axes


def rewrite_origins(g: Graph, lanes: int) -> List[int]:
    """For each node of :func:`rewrite`'s graph, the index of the node of g it was made for (-1: made
    for a graph output, a transpose back to NCHW): how a compiled program's kernels, which follow
    the rewritten graph's nodes, are attributed to the parts of g (``lpucore.vision``)."""
    if not any(n.op in IMAGE_OPS for n in g.nodes):
        return list(range(len(g.nodes)))
    r = _Rewriter(g, lanes)
    r.run()
    return r.origin


class _Rewriter:
    """Builds the rewritten graph h from g, node by node (module docstring)."""

    def __init__(self, g: Graph, lanes: int):
        self.g, self.lanes = g, lanes
        self.h = Graph(g.name)
        self.plain_of: Dict[int, Tensor] = {}          # g tensor -> h tensor of the same shape
        # g NCHW tensor -> h [N*H*W / P, P * C] (P pixels a row: packed when P > 1) and its NCHW dims
        self.cl: Dict[int, Tuple[Tensor, Dims]] = {}
        self.packable: Dict[int, bool] = {}
        self.uses: Dict[int, int] = {}
        self.readers: Dict[int, List[Node]] = {}
        for n in g.nodes:
            for i in n.inputs:
                self.uses[i] = self.uses.get(i, 0) + 1
            for i in set(n.inputs):
                self.readers.setdefault(i, []).append(n)
        for t in list(g.outputs.values()) + list(g.assigns.values()):
            self.uses[t.id] = self.uses.get(t.id, 0) + 2
        self.folds = {g.producer[n.inputs[0]].output: n for n in g.nodes if self._foldable(n)}
        self.input_axes: Dict[str, Tuple[int, ...]] = {}
        self.origin: List[int] = []                    # h node -> index of the g node it was made for

    def _image_input(self, t: Tensor) -> bool:
        """t is an NCHW graph input read only as the image of image operations (not flatten): the
        host writes it channel-last (NHWC, a fixed permutation of its bytes) instead of NCHW."""
        readers = [n for n in self.g.nodes if t.id in n.inputs]
        return (t.ndim == 4 and self.uses.get(t.id, 0) == len(readers) > 0
                and all(n.op in IMAGE_OPS and n.op != "flatten" and n.inputs.count(t.id) == 1
                        and n.inputs[0] == t.id for n in readers))

    def run(self) -> Graph:
        g, h = self.g, self.h
        for name, t in g.inputs.items():
            if self._image_input(t):
                N, C, H, W = t.shape
                P = self._fit(C, W) if self._packs(t.id) else 1       # the same bytes, P pixels a row
                self.cl[t.id] = (h.input(name, (N * H * W // P, C * P), t.dtype), t.shape)
                self.input_axes[name] = (0, 2, 3, 1)
            else:
                self.plain_of[t.id] = h.input(name, t.shape, t.dtype)
        for name, t in g.states.items():
            self.plain_of[t.id] = h.state(name, t.shape, t.dtype, init=g.state_init[t.id])
        for k, n in enumerate(g.nodes):
            t = g.tensors[n.output]
            if n.op in IMAGE_OPS:
                getattr(self, "_" + n.op)(n, t)
            elif not self._elementwise(n, t):
                ins = [self.plain(i) for i in n.inputs]
                self.plain_of[t.id] = h._node(n.op, ins, t.shape, t.dtype, **n.attrs)
            self.origin += [k] * (len(h.nodes) - len(self.origin))
        for name, t in g.outputs.items():
            h.output(name, self.plain(t.id))
        for sid, v in g.assigns.items():
            h.assign(self.plain(sid), self.plain(v.id))
        self.origin += [-1] * (len(h.nodes) - len(self.origin))
        return h

    # ---- tensors of h --------------------------------------------------------------------------------
    def plain(self, tid: int) -> Tensor:
        """The h tensor of g's tensor tid in g's shape (an NCHW image transposed back if need be)."""
        got = self.plain_of.get(tid)
        if got is not None:
            return got
        if tid in self.g.constants:
            arr = self.g.constants[tid]
            got = self.h.constant(self.g.constant_names.get(tid), arr)
        else:
            x, (N, C, H, W) = self.cl[tid]
            if H * W == 1:                        # [N, C, 1, 1]: the same elements in the same order
                got = self.h.reshape(x, (N, C, H, W))
            else:
                got = self.h.transpose(self.h.reshape(x, (N, H, W, C)), (0, 3, 1, 2))
        self.plain_of[tid] = got
        return got

    def const(self, arr: np.ndarray) -> Tensor:
        return self.h.constant(None, np.ascontiguousarray(arr))

    def windows(self, tid: int, n: Node, fill, apart: bool, pads: str = "fill") -> Tensor:
        """The ``window`` of g's NCHW image tid for node n's geometry (the image itself for a 1x1
        stride-1 unpadded window of a channel-last image); ``pads="repeat"``: a max's window, its
        pads repeating a tap (:func:`repeat_vectors`)."""
        x = self.g.tensors[tid]
        a = n.attrs
        one = a["kernel"] == (1, 1) and a["stride"] == (1, 1) and a["padding"] == (0, 0)
        if one and tid in self.cl and not apart:
            return self.channel_last(tid)
        src, kind = (self.channel_last(tid), "rows") if tid in self.cl else (self.plain(tid), "nchw")
        fillc = self.const(np.full((1, x.shape[1]), fill, dtype=x.dtype.numpy))
        extra = {"pads": pads} if pads != "fill" else {}
        return self.h._window(src, fillc, kind, apart=apart, **extra, **self.geometry(n))

    def geometry(self, n: Node) -> Dict:
        """The window attributes of image operation n: its image's NCHW shape, output (Ho, Wo), kernel,
        stride, padding and dilation."""
        a = n.attrs
        return dict(image=self.g.tensors[n.inputs[0]].shape, out=self.g.tensors[n.output].shape[2:],
                    kernel=a["kernel"], stride=a["stride"], padding=a["padding"], dilation=a.get("dilation", (1, 1)))

    def pack(self, tid: int) -> int:
        """Pixels a row of channel-last image tid (1: one pixel a row)."""
        x, dims = self.cl[tid]
        return x.shape[1] // dims[1]

    def channel_last(self, tid: int) -> Tensor:
        """g's NCHW image tid as [N*H*W, C] (made by a 1x1 window from NCHW when it is not yet; a packed
        image reshaped, which moves lanes: the rewriter packs only images that convolutions read)."""
        if tid in self.cl and self.pack(tid) > 1:
            x, (N, C, H, W) = self.cl[tid]
            return self.h.reshape(x, (N * H * W, C))
        if tid not in self.cl:
            N, C, H, W = self.g.tensors[tid].shape
            zero = self.const(np.zeros((1, C), self.g.tensors[tid].dtype.numpy))
            x = self.h._window(self.plain(tid), zero, "nchw", image=(N, C, H, W), out=(H, W), kernel=(1, 1),
                               stride=(1, 1), padding=(0, 0), dilation=(1, 1))
            self.cl[tid] = (x, (N, C, H, W))
        return self.cl[tid][0]

    # ---- the image operations ------------------------------------------------------------------------
    def _conv2d(self, n: Node, t: Tensor) -> None:
        g, h = self.g, self.h
        w = g.constants[n.inputs[1]]
        m = convref.weight_matrix(w, n.attrs["groups"])
        bias: Optional[Tensor] = self.plain(n.inputs[2]) if len(n.inputs) > 2 else None
        bn = self.folds.get(t.id)
        key = bn.output if bn is not None else t.id
        if bn is not None:
            scale, shift = convref.bn_affine(*[g.constants[i] for i in bn.inputs[1:]], eps=bn.attrs["eps"])
            m = (m.astype(np.float64) * scale).astype(w.dtype)
            b = g.constants[n.inputs[2]].astype(np.float64) if bias is not None else 0.0
            bias = self.const((b * scale + shift).astype(t.dtype.numpy))
        pi = self.pack(n.inputs[0]) if n.inputs[0] in self.cl else 1
        po = self._out_pack(n, key)
        if pi > 1 or po > 1:
            y = self._packed_conv(n, m, pi, po)
            if bias is not None and po > 1:       # a constant (_out_pack): one copy a pixel of the row
                bias = self.const(np.tile(self.h.constants[bias.id], po))
        elif self._taps(n):
            y = h._conv_taps(self.cl[n.inputs[0]][0], self.const(m), **self.geometry(n))
        else:
            y = h.matmul(self.windows(n.inputs[0], n, 0, apart=False), self.const(m))
        if bias is not None:
            y = h.add(y, bias)
        self.cl[key] = (y, t.shape)

    def _out_pack(self, n: Node, key: int) -> int:
        """Pixels a row of convolution n's output (g tensor ``key``, after a folded batch norm): the most
        that fit the lanes and divide the output's width, when n reads its taps from a channel-last
        image's rows, its bias is a constant and only such convolutions read the output (through
        elementwise operations with constant operands: :meth:`_packs`); else 1."""
        Co, Wo = self.g.tensors[n.output].shape[1], self.g.tensors[n.output].shape[3]
        if (not self._reads_rows(n) or (len(n.inputs) > 2 and n.inputs[2] not in self.g.constants)
                or not self._packs(key)):
            return 1
        return self._fit(Co, Wo)

    def _fit(self, C: int, W: int) -> int:
        """Pixels of C channels a packed row of an image W pixels wide: the most that fit the lanes and
        divide W (a row of the image is then whole vectors)."""
        return max([p for p in range(1, W + 1) if W % p == 0 and p * C <= self.lanes], default=1)

    def _packs(self, tid: int) -> bool:
        """g's image tid may be packed: it is read only by convolutions (as their image, every output
        position reading a pixel) and by elementwise operations whose other operands are constants
        (per-channel or scalar) and whose results may be packed in turn."""
        if tid not in self.packable:
            readers = self.readers.get(tid, [])
            ok = bool(readers) and self.uses.get(tid, 0) == sum(n.inputs.count(tid) for n in readers)
            for n in readers:
                ok = ok and n.inputs.count(tid) == 1 and n.inputs[0] == tid and (
                    (n.op == "conv2d" and self._every_position_reads(n))
                    or (self._per_channel_map(n, tid) and self._packs(n.output)))
            self.packable[tid] = ok
        return self.packable[tid]

    def _per_channel_map(self, n: Node, tid: int) -> bool:
        """n is elementwise over image tid with constant per-channel or scalar other operands."""
        t = self.g.tensors[n.output]
        if n.op not in _ELEMENTWISE or n.attrs.get("axis") is not None or t.shape != self.g.tensors[tid].shape:
            return False
        for i in n.inputs[1:]:
            s = self.g.tensors[i].shape
            s4 = (1,) * (4 - len(s)) + s
            if i not in self.g.constants or len(s) > 4 or s4[0] != 1 or s4[2:] != (1, 1):
                return False
        return True

    def _packed_conv(self, n: Node, m: np.ndarray, pi: int, po: int) -> Tensor:
        """Convolution n (weight matrix m) of an image of pi pixels a row into one of po
        (:func:`packed_groups`): a plain product by the packed weights when it is one group reading
        the same row (a 1x1 convolution keeping the pixels a row), else ``conv_taps``."""
        a = dict(self.geometry(n), pack=(pi, po))
        rows, parts = packed_groups(a)
        wm = self.const(packed_weights(a, m, self.g.tensors[n.inputs[0]].shape[1], parts))
        x = self.cl[n.inputs[0]][0]
        if rows.shape[1] == 1 and bool((rows[:, 0] == np.arange(len(rows))).all()):
            return self.h.matmul(x, wm)
        return self.h._conv_taps(x, wm, **a)

    def _taps(self, n: Node) -> bool:
        """Convolution n reads its taps straight from its channel-last image's rows (``conv_taps``)
        rather than from a window."""
        a = n.attrs
        one = a["kernel"] == (1, 1) and a["stride"] == (1, 1) and a["padding"] == (0, 0)
        # an output position whose taps are all pads would have no product to set its accumulator
        return not one and self._reads_rows(n)

    def _max_pool2d(self, n: Node, t: Tensor) -> None:
        lo = -np.inf if t.dtype.is_float else np.iinfo(t.dtype.numpy).min
        # the max reads the image's rows itself (the window a map of its reads, fused into it)
        win = self.windows(n.inputs[0], n, lo, apart=True, pads="repeat" if self._reads_rows(n) else "fill")
        self.cl[t.id] = (self.h.max(win, axis=-2), t.shape)

    def _reads_rows(self, n: Node) -> bool:
        """Image operation n's image is channel-last and every output position of its geometry reads at
        least one pixel: its taps can be read from the image's rows."""
        return n.inputs[0] in self.cl and self._every_position_reads(n)

    def _every_position_reads(self, n: Node) -> bool:
        """Every output position of image operation n's geometry reads at least one pixel."""
        return bool((_rows_of(self.geometry(n)) >= 0).any(axis=1).all())

    def _avg_pool2d(self, n: Node, t: Tensor) -> None:
        h = self.h
        win = self.windows(n.inputs[0], n, 0, apart=True)
        if n.attrs["count_include_pad"]:
            y = h.mean(win, axis=-2)
        else:
            N, C, H, W = self.g.tensors[n.inputs[0]].shape
            a = n.attrs
            cnt = (convref.window_rows(N, H, W, a["kernel"], a["stride"], a["padding"], 1) >= 0).sum(axis=1)
            recip = (1.0 / cnt.astype(np.float32)).reshape(-1, 1).astype(np.float32)
            y = h.cast(h.mul(h.sum(h.cast(win, "float32"), axis=-2), self.const(recip)), t.dtype)
        self.cl[t.id] = (y, t.shape)

    def _global_avg_pool2d(self, n: Node, t: Tensor) -> None:
        N, C, H, W = self.g.tensors[n.inputs[0]].shape
        x = self.channel_last(n.inputs[0])
        if H * W == 1:
            rows = x
        elif N == 1:                              # the rows are the one image's: no reshape (a copy)
            rows = self.h.mean(x, axis=-2, keepdims=True)
        else:
            rows = self.h.mean(self.h.reshape(x, (N, H * W, C)), axis=-2)
        self.cl[t.id] = (rows, t.shape)

    def _batch_norm(self, n: Node, t: Tensor) -> None:
        if t.id in self.cl:                       # folded into the convolution before it
            return
        h, f32 = self.h, dt.FLOAT32
        x = self.channel_last(n.inputs[0])
        if all(i in self.g.constants for i in n.inputs[1:]):
            scale, shift = convref.bn_affine(*[self.g.constants[i] for i in n.inputs[1:]],
                                             eps=n.attrs["eps"])
            s, b = self.const(scale.astype(np.float32)), self.const(shift.astype(np.float32))
        else:
            mean, var, gamma, beta = [h.cast(self.plain(i), f32) for i in n.inputs[1:]]
            s = h.mul(gamma, h.rsqrt(h.add(var, n.attrs["eps"])))
            b = h.sub(beta, h.mul(mean, s))
        y = h.cast(h.add(h.mul(h.cast(x, f32), s), b), t.dtype)
        self.cl[t.id] = (y, t.shape)

    def _depth_to_space(self, n: Node, t: Tensor) -> None:
        x = self.channel_last(n.inputs[0])
        self.cl[t.id] = (self.h._d2s(x, self.g.tensors[n.inputs[0]].shape, n.attrs["block"]), t.shape)

    def _flatten(self, n: Node, t: Tensor) -> None:
        src = self.g.tensors[n.inputs[0]]
        x = self.cl.get(src.id)
        if x is not None and x[0].shape == t.shape:
            self.plain_of[t.id] = x[0]            # [N, C, 1, 1] flattened: the channel-last rows
        else:
            self.plain_of[t.id] = self.h.reshape(self.plain(src.id), t.shape)

    # ---- folding and elementwise operations on channel-last images ------------------------------------
    def _foldable(self, n: Node) -> bool:
        """n is a batch_norm with constant statistics right after a float conv2d that feeds only it."""
        if n.op != "batch_norm" or not all(i in self.g.constants for i in n.inputs[1:]):
            return False
        p = self.g.producer.get(n.inputs[0])
        return (p is not None and p.op == "conv2d" and self.g.tensors[p.output].dtype.is_float
                and self.uses.get(p.output, 0) == 1 and (len(p.inputs) < 3 or p.inputs[2] in self.g.constants))

    def _elementwise(self, n: Node, t: Tensor) -> bool:
        """Lower n on channel-last images when it is elementwise over one (module docstring); False if not."""
        if n.op not in _ELEMENTWISE or n.attrs.get("axis") is not None or t.ndim != 4:
            return False
        imgs = [self.cl[i] for i in n.inputs if i in self.cl]
        if not imgs or any(d != t.shape for _, d in imgs):
            return False
        ins = []
        for i in n.inputs:
            if i in self.cl:
                ins.append(self.cl[i][0])
                continue
            s = (1,) * (4 - len(self.g.tensors[i].shape)) + self.g.tensors[i].shape
            if s[0] != 1 or s[2:] != (1, 1) or len(self.g.tensors[i].shape) > 4:
                return False
            if self.g.tensors[i].shape == ():
                ins.append(self.plain(i))
            elif i in self.g.constants:
                arr = self.g.constants[i]
                ins.append(self.const(arr.reshape(s[1]) if s[1] > 1 else arr.reshape(())))
            else:
                ins.append(self.h.reshape(self.plain(i), (s[1],)))
        N, C, H, W = t.shape
        P = self.pack(next(i for i in n.inputs if i in self.cl))
        if P > 1:                                 # packed (_packs): one copy of a per-channel constant a pixel
            if len(imgs) > 1 or any(i not in self.cl and i not in self.g.constants for i in n.inputs):
                return False
            ins = [self.const(np.tile(self.h.constants[x.id], P)) if i not in self.cl and x.shape == (C,) and C > 1
                   else x for i, x in zip(n.inputs, ins)]
        self.cl[t.id] = (self.h._node(n.op, ins, (N * H * W // P, C * P), t.dtype, **n.attrs), t.shape)
        return True
