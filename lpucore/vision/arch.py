"""ResNet architectures (torchvision's, v1.5) as plain data: every convolution with its batch
normalisation, the blocks, and the parameter names and shapes of a torchvision ``state_dict``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import ModelError


@dataclass(frozen=True)
class ConvBN:
    """One convolution (no bias) and the batch normalisation after it."""

    conv: str          # parameter prefix of the convolution ("layer1.0.conv2", "layer1.0.downsample.0")
    bn: str            # ... of its batch normalisation ("layer1.0.bn2", "layer1.0.downsample.1")
    cin: int
    cout: int
    kernel: int
    stride: int
    padding: int


@dataclass(frozen=True)
class Block:
    """A residual block: its convolutions in order (ReLU after each but the last, which is added to
    the shortcut and then ReLU'd), and the projection shortcut (None: identity)."""

    name: str
    convs: Tuple[ConvBN, ...]
    down: Optional[ConvBN]


@dataclass(frozen=True)
class ResNetSpec:
    """A ResNet as torchvision builds it: ``block`` "basic" (two 3x3 convolutions, ResNet-18/34) or
    "bottleneck" (1x1, 3x3, 1x1 with 4x expansion, ResNet-50/101/152; v1.5: the stride is on the 3x3
    convolution), ``layers`` blocks per stage, ``width`` channels of the stem (64 in torchvision),
    ``num_classes`` logits."""

    name: str
    block: str
    layers: Tuple[int, ...]
    width: int = 64
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if self.block not in ("basic", "bottleneck"):
            raise ModelError(f"ResNet block must be 'basic' or 'bottleneck', not {self.block!r}")
        if not self.layers or any(int(n) < 1 for n in self.layers) or len(self.layers) > 4:
            raise ModelError(f"ResNet layers must be 1 to 4 stages of >= 1 blocks, got {self.layers!r}")
        if int(self.width) < 1 or int(self.num_classes) < 1:
            raise ModelError(f"ResNet width and num_classes must be >= 1, got {self.width}, {self.num_classes}")

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def stem(self) -> ConvBN:
        """7x7 stride-2 convolution of the 3-channel image (then ReLU and a 3x3 stride-2 max pool)."""
        return ConvBN("conv1", "bn1", 3, self.width, 7, 2, 3)

    @property
    def stem_s2d(self) -> ConvBN:
        """The stem on the host's space-to-depth image (:func:`~lpucore.vision.arch.space_to_depth`): a
        4x4 stride-1 unpadded convolution of 12 channels, the same sums
        (:func:`~lpucore.vision.arch.stem_weights_s2d`)."""
        return ConvBN("conv1", "bn1", 12, self.width, 4, 1, 0)

    @property
    def stem_s2d4(self) -> ConvBN:
        """The stem on the host's 4 x 4 space-to-depth image (:func:`~lpucore.vision.arch.space_to_depth4`):
        a 3x3 stride-1 unpadded convolution of 48 channels giving the stem's output as 2 x 2 pixel blocks,
        4 x ``width`` channels (:func:`~lpucore.vision.arch.stem_weights_s2d4`), put in place by
        ``depth_to_space``: the same sums, a quarter of the positions."""
        return ConvBN("conv1", "bn1", 48, 4 * self.width, 3, 1, 0)

    @property
    def features(self) -> int:
        """Channels into the classifier."""
        return self.width * 2 ** (len(self.layers) - 1) * self.expansion

    def blocks(self) -> List[Block]:
        out: List[Block] = []
        cin = self.width
        for i, n in enumerate(self.layers):
            planes = self.width * 2 ** i
            for j in range(n):
                name = f"layer{i + 1}.{j}"
                s = 2 if (i > 0 and j == 0) else 1
                cout = planes * self.expansion
                if self.block == "basic":
                    convs: Tuple[ConvBN, ...] = (ConvBN(f"{name}.conv1", f"{name}.bn1", cin, planes, 3, s, 1),
                                                 ConvBN(f"{name}.conv2", f"{name}.bn2", planes, planes, 3, 1, 1))
                else:
                    convs = (ConvBN(f"{name}.conv1", f"{name}.bn1", cin, planes, 1, 1, 0),
                             ConvBN(f"{name}.conv2", f"{name}.bn2", planes, planes, 3, s, 1),
                             ConvBN(f"{name}.conv3", f"{name}.bn3", planes, cout, 1, 1, 0))
                down = None
                if s != 1 or cin != cout:
                    down = ConvBN(f"{name}.downsample.0", f"{name}.downsample.1", cin, cout, 1, s, 0)
                out.append(Block(name, convs, down))
                cin = cout
        return out

    def convs(self) -> List[ConvBN]:
        """Every convolution, in the order the network runs them."""
        out = [self.stem]
        for b in self.blocks():
            out += list(b.convs) + ([b.down] if b.down is not None else [])
        return out

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """torchvision's parameter names and shapes (``num_batches_tracked`` aside)."""
        d: Dict[str, Tuple[int, ...]] = {}
        for c in self.convs():
            d[c.conv + ".weight"] = (c.cout, c.cin, c.kernel, c.kernel)
            for p in ("weight", "bias", "running_mean", "running_var"):
                d[f"{c.bn}.{p}"] = (c.cout,)
        d["fc.weight"] = (self.num_classes, self.features)
        d["fc.bias"] = (self.num_classes,)
        return d

    def macs(self, image_size: int) -> int:
        """Multiply-accumulates of one image of ``image_size`` x ``image_size`` pixels."""
        total, hw = 0, _out(image_size, 7, 2, 3)
        total += hw * hw * 3 * 49 * self.width
        hw = _out(hw, 3, 2, 1)
        for b in self.blocks():
            h = hw
            for c in b.convs:
                h = _out(h, c.kernel, c.stride, c.padding)
                total += h * h * c.cin * c.kernel ** 2 * c.cout
            if b.down is not None:
                total += h * h * b.down.cin * b.down.cout
            hw = h
        return total + self.features * self.num_classes


def _out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


ARCHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
         "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3))}


def _to_depth(x: np.ndarray, r: int) -> np.ndarray:
    """[N, C, H, W] (H, W multiples of r) with each r x r block of pixels made C * r * r channels, channel
    c * r * r + r * row + column (the stems' space-to-depth, for images and for weights alike)."""
    N, C, H, W = x.shape
    b = x.reshape(N, C, H // r, r, W // r, r).transpose(0, 1, 3, 5, 2, 4)
    return np.ascontiguousarray(b.reshape(N, C * r * r, H // r, W // r))


def space_to_depth(x: np.ndarray) -> np.ndarray:
    """The image [N, 3, H, W] as the stem's space-to-depth input [N, 12, H2, W2]: padded with zeros
    (3 before, enough after) to 2 x (ceil(H / 2) + 3) pixels, then each 2 x 2 block of pixels made 12
    channels (channel c * 4 + 2 * row + column): a fixed permutation of its values and the zero pads,
    done by the host, so that the 7x7 stride-2 window of 3 channels (49 three-lane pieces per output
    position on the chip) becomes a 4x4 stride-1 window of 12 (16 twelve-lane pieces)."""
    N, C, H, W = x.shape
    ho, wo = (H + 1) // 2, (W + 1) // 2
    xp = np.zeros((N, C, 2 * (ho + 3), 2 * (wo + 3)), x.dtype)
    xp[:, :, 3:3 + H, 3:3 + W] = x
    return _to_depth(xp, 2)


def stem_weights_s2d(w: np.ndarray) -> np.ndarray:
    """The 7x7 stride-2 stem's weights [C_out, 3, 7, 7] as the 4x4 weights [C_out, 12, 4, 4] of the
    same convolution over :func:`~lpucore.vision.arch.space_to_depth`'s image: tap 2a + r of the 7
    (r = 0, 1; tap 7 a zero) is block tap a of channel c * 4 + 2 * r_h + r_w. Same dtype; the values
    are moved, not changed."""
    Co, C = w.shape[:2]
    wp = np.zeros((Co, C, 8, 8), w.dtype)
    wp[:, :, :7, :7] = w
    return _to_depth(wp, 2)


def space_to_depth4(x: np.ndarray) -> np.ndarray:
    """The image [N, 3, H, W] (H and W multiples of 4) as the "s2d4" stem's input [N, 48, H / 4 + 2,
    W / 4 + 2]: padded with zeros (3 before, 5 after), then each 4 x 4 block of pixels made 48 channels
    (channel c * 16 + 4 * row + column): a fixed permutation of its values and the zero pads, done by the
    host, so that the stem's output block (a, b) of 2 x 2 pixels reads the 3 x 3 blocks from (a, b)."""
    N, C, H, W = x.shape
    if H % 4 or W % 4:
        raise ModelError(f"the s2d4 stem needs an image whose sides are multiples of 4, got {H} x {W}")
    xp = np.zeros((N, C, H + 8, W + 8), x.dtype)
    xp[:, :, 3:3 + H, 3:3 + W] = x
    return _to_depth(xp, 4)


def stem_weights_s2d4(w: np.ndarray) -> np.ndarray:
    """The 7x7 stride-2 stem's weights [C_out, 3, 7, 7] as the 3x3 weights [4 C_out, 48, 3, 3] over
    :func:`space_to_depth4`'s image, output channel (2 i + j) C_out + o being output pixel (2a + i, 2b + j)
    of block (a, b) (``depth_to_space`` order): tap (bh, bw) of input channel c * 16 + 4 u + v is the
    7x7 tap (4 bh + u - 2 i, 4 bw + v - 2 j), or zero outside it. Same dtype; values moved, not changed."""
    Co, C = w.shape[:2]
    out = np.zeros((4, Co, C, 4, 4, 3, 3), w.dtype)        # [phase, o, c, u, v, bh, bw]
    for i in range(2):
        for j in range(2):
            for bh in range(3):
                for u in range(4):
                    kh = 4 * bh + u - 2 * i
                    if not 0 <= kh < 7:
                        continue
                    for bw in range(3):
                        for v in range(4):
                            kw = 4 * bw + v - 2 * j
                            if 0 <= kw < 7:
                                out[2 * i + j, :, :, u, v, bh, bw] = w[:, :, kh, kw]
    return np.ascontiguousarray(out.reshape(4 * Co, C * 16, 3, 3))
