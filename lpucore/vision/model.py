"""ResNet classifiers compiled onto the simulated chip (:class:`ResNet`), their weights (torchvision
names, or seeded random ones), int8 calibration, the NumPy reference and the run's figures."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..compiler import conv as conv_rewrite
from ..compiler.api import compile as compile_graph
from ..compiler.dump import kernel_cycles
from ..compiler.lower import Compiled, execute
from ..config import ChipConfig
from ..errors import LpuError, ModelError
from ..graph import Graph
from .arch import ARCHS, ResNetSpec, space_to_depth, space_to_depth4
from .nets import F32, F16Params, FloatNet, GraphF16, GraphInt8, Int8Params, NumpyF16, NumpyInt8, forward

PRECISIONS = ("int8", "fp16")
STEMS = ("auto", "s2d", "s2d4", "direct")
CALIBRATION = 4                # int8 activation scales: max |x| / 127 over this many seeded images
STAT_IMAGES, STAT_SIZE = 4, 64  # random weights: running statistics measured on these images
MIN_SIZE = 8


def random_weights(spec: ResNetSpec, seed: int = 0) -> Dict[str, np.ndarray]:
    """Seeded float32 weights of ``spec`` under torchvision's names: He-normal convolutions
    (std sqrt(2 / fan_in)), batch-norm gamma U(0.5, 1) (U(0.1, 0.3) on a block's last one, so that
    the residual sums grow slowly), beta N(0, 0.1), and running mean and variance measured: those of
    each convolution's output over STAT_IMAGES standard-normal images of STAT_SIZE pixels (seed + 1),
    so that every normalised activation has mean beta and deviation gamma. Classifier N(0, 1 / fan_in)."""
    rng = np.random.default_rng(seed)
    w: Dict[str, np.ndarray] = {}
    last = {b.convs[-1].bn for b in spec.blocks()}
    for c in spec.convs():
        fan = c.cin * c.kernel ** 2
        w[c.conv + ".weight"] = (rng.standard_normal((c.cout, c.cin, c.kernel, c.kernel))
                                 * np.sqrt(2.0 / fan)).astype(F32)
        lo, hi = (0.1, 0.3) if c.bn in last else (0.5, 1.0)
        w[c.bn + ".weight"] = rng.uniform(lo, hi, c.cout).astype(F32)
        w[c.bn + ".bias"] = (rng.standard_normal(c.cout) * 0.1).astype(F32)
        w[c.bn + ".running_mean"] = np.zeros(c.cout, F32)
        w[c.bn + ".running_var"] = np.ones(c.cout, F32)
    w["fc.weight"] = (rng.standard_normal((spec.num_classes, spec.features)) / np.sqrt(spec.features)).astype(F32)
    w["fc.bias"] = (rng.standard_normal(spec.num_classes) * 0.01).astype(F32)
    images = np.random.default_rng(seed + 1).standard_normal((STAT_IMAGES, 3, STAT_SIZE, STAT_SIZE)).astype(F32)
    forward(spec, FloatNet(w, stats=True), images)
    return w


def check_weights(spec: ResNetSpec, weights: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """float32 copies of a torchvision ``state_dict``-like mapping; ModelError naming the parameter
    that is missing, unexpected, of the wrong shape, not a number array or not finite (running
    variances must also be >= 0). ``num_batches_tracked`` entries are ignored."""
    if not isinstance(weights, Mapping):
        raise ModelError(f"weights must be a mapping of parameter names to arrays, not {type(weights).__name__}")
    shapes = spec.shapes()
    for name in weights:
        if name not in shapes and not (isinstance(name, str) and name.endswith(".num_batches_tracked")
                                       and name[:-len(".num_batches_tracked")] + ".weight" in shapes):
            raise ModelError(f"unexpected parameter (not in {spec.name})", field=str(name))
    out: Dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name not in weights:
            raise ModelError(f"missing parameter of shape {list(shape)}", field=name)
        try:
            a = np.array(weights[name], dtype=np.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ModelError(f"not an array of numbers ({type(e).__name__}: {e})", field=name) from None
        if a.shape != shape:
            raise ModelError(f"has shape {list(a.shape)}, expected {list(shape)}", field=name)
        if not np.isfinite(a).all():
            raise ModelError("holds a value that is not finite (or overflows float32)", field=name)
        if name.endswith("running_var") and (a < 0).any():
            raise ModelError("holds a negative variance", field=name)
        out[name] = a
    return out


@dataclass
class VisionStats:
    """Figures of one image through a compiled ResNet (cycles of the chip; seconds at its clock)."""

    model: str
    precision: str
    chip: str
    image_size: int
    clock_hz: float
    cycles: int
    predicted_cycles: int
    macs: int
    mxm_utilisation: float         # fraction of MXM plane-cycles busy
    sram_bytes: int
    sram_capacity: int
    by_layer: Dict[str, int]       # cycles attributed to parts (conv1 = stem and pool, layerI.J, fc, output)
    by_op: Dict[str, int]          # ... and to the rewritten graph's operations (window, matmul, ...)
    bounds: Dict[str, float]       # lower bounds (cycles) from the graph (lpucore.compiler.bounds)
    compile_seconds: float
    wall_seconds: float            # host time to simulate the image
    stream_images: int = 0         # images of the back-to-back program (0: not measured)
    stream_cycles: int = 0         # its cycles
    stream: Dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.cycles / self.clock_hz

    @property
    def images_per_second(self) -> float:
        """One image at a time, each after the last has finished."""
        return self.clock_hz / self.cycles if self.cycles else 0.0

    @property
    def stream_images_per_second(self) -> float:
        """Back to back: ``stream_images`` images a run of the overlapped program (0 if not measured)."""
        return self.stream_images * self.clock_hz / self.stream_cycles if self.stream_cycles else 0.0

    @property
    def bound(self) -> float:
        return max(self.bounds.values()) if self.bounds else 0.0

    @property
    def schedule_efficiency(self) -> float:
        return self.bound / self.cycles if self.cycles else 0.0

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.update(seconds=self.seconds, images_per_second=self.images_per_second,
                 stream_images_per_second=self.stream_images_per_second, schedule_efficiency=self.schedule_efficiency)
        return d

    def _stream_row(self) -> str:
        """The back-to-back figure, and a note when the overlapped program is slower than running the
        one-image program again and again (the greedy schedule can make it so: docs/guide/vision.md)."""
        if not self.stream_cycles:
            return ""
        row = (f"{self.stream_images_per_second:,.0f} images/s back to back ({self.stream_images} images overlapped "
               f"in {self.stream_cycles:,} cycles)")
        if self.stream_images_per_second < self.images_per_second:
            row += "; fewer than one at a time: the one-image program repeated is the faster stream"
        return row

    def table(self) -> str:
        """A readable summary, then the cycles by part and by operation."""
        binding = max(self.bounds, key=lambda k: self.bounds[k]) if self.bounds else "-"
        rows = [("model", f"{self.model} ({self.precision}), batch 1, {self.image_size} x {self.image_size}, "
                          f"one {self.chip} at {self.clock_hz / 1e6:.0f} MHz"),
                ("cycles", f"{self.cycles:,} (compiler predicted {self.predicted_cycles:,})"),
                ("latency", f"{self.seconds * 1e6:,.1f} us ({self.images_per_second:,.0f} images/s one at a time)"),
                ("stream", self._stream_row()),
                ("schedule bound", f"{self.bound:,.0f} cycles ({binding}); efficiency "
                                   f"{100 * self.schedule_efficiency:.2f} %"),
                ("MXM", f"{self.macs:,} MACs; planes busy {100 * self.mxm_utilisation:.2f} % of plane-cycles"),
                ("SRAM in use", f"{self.sram_bytes / 1e6:.2f} MB of {self.sram_capacity / 1e6:.1f} MB"),
                ("host", f"compile {self.compile_seconds:.1f} s, simulate {self.wall_seconds:.2f} s")]
        w = max(len(k) for k, _ in rows)
        out = [f"{k:<{w}}  {v}" for k, v in rows if v]
        for title, d in (("cycles by part", self.by_layer), ("cycles by operation", self.by_op)):
            total = sum(d.values()) or 1
            out.append(f"{title}:")
            out += [f"  {k:<22} {v:>12,} {100 * v / total:6.1f} %" for k, v in sorted(d.items(), key=lambda kv: -kv[1])]
        return "\n".join(out)


def breakdown(compiled: Compiled, labels: List[str]) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Cycles attributed to parts (``labels``: one per kernel of the rewritten graph) and operations:
    a kernel's share is how far it pushes the latest result-landing cycle beyond every earlier
    kernel's (a kernel hidden under earlier ones costs nothing; a fused one has no kernel and its
    consumer gets its cycles); what follows the last kernel (output copies, the drain) is ``output``."""
    return kernel_cycles(compiled.kernels, compiled.expected_cycles,
                         lambda i: labels[i] if i < len(labels) else "output", ("output", "output"))


def kernel_labels(g: Graph, marks: List[Tuple[str, int]], lanes: int) -> List[str]:
    """The part of each node of the rewritten graph (its kernel), from the parts' node counts in g."""
    part_of: List[str] = []
    start = 0
    for name, end in marks:
        part_of += [name] * (end - start)
        start = end
    return [part_of[k] if 0 <= k < len(part_of) else "output" for k in conv_rewrite.rewrite_origins(g, lanes)]


class ResNet:
    """A ResNet (``spec``) with its weights, compiled for one chip on first use per image size.

    ``precision`` "int8": per-output-channel int8 weights of the batch-norm-folded convolutions,
    per-tensor int8 activations (scales ``max |x| / 127`` over CALIBRATION standard-normal images of the
    size run, seed + 2), int32 sums, requantisation in float32 on the VXM, the classifier int8 too:
    float32 logits, equal bit for bit to :meth:`reference`. "fp16": float16 weights (batch norm
    folded on the host) and activations, float32 sums: float16 logits within :meth:`reference`'s
    bound. The host quantises (int8) or rounds (fp16) the float32 image; that is not chip time.

    ``stem`` "auto" (default): "s2d4" for images whose sides are multiples of 4, else "s2d". "s2d": the host
    writes the image space-to-depth (padded, 2 x 2 pixel blocks as
    12 channels: :func:`~lpucore.vision.arch.space_to_depth`) and the stem is the equivalent 4x4
    stride-1 convolution of 12 channels (the same int32 sums); "s2d4" (sides multiples of 4): 4 x 4 pixel
    blocks as 48 channels (:func:`~lpucore.vision.arch.space_to_depth4`), a 3x3 convolution giving 2 x 2
    output pixels a position (a quarter of the positions, windows of 9 pieces of 48 channels instead of 16
    of 12), then ``depth_to_space``; "direct": the 7x7 stride-2 window of the 3-channel image is formed on
    the chip."""

    def __init__(self, spec: ResNetSpec, weights: Optional[Mapping[str, Any]] = None, precision: str = "int8",
                 seed: int = 0, config: Optional[ChipConfig] = None, stem: str = "auto"):
        if precision not in PRECISIONS:
            raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if stem not in STEMS:
            raise ModelError(f"stem must be one of {', '.join(STEMS)}, not {stem!r}")
        self.stem = stem
        if config is not None and not isinstance(config, ChipConfig):
            raise ModelError(f"config must be a ChipConfig, not {type(config).__name__}")
        self.spec, self.precision, self.seed = spec, precision, int(seed)
        self.config = config if config is not None else ChipConfig.groqchip1()
        self.weights = random_weights(spec, self.seed) if weights is None else check_weights(spec, weights)
        self._scales: Dict[int, Dict[str, float]] = {}
        self._compiled: Dict[Tuple[int, int], Tuple[Compiled, float, List[str]]] = {}
        self._tapped: Dict[int, Compiled] = {}
        self._int8: Dict[int, Int8Params] = {}
        self._f16_by: Dict[str, F16Params] = {}              # fp16: the folded parameters of each stem used
        if precision == "fp16":
            self._f16_by["direct"] = F16Params(spec, self.weights)
            bad = self._f16_by["direct"].finite()
            if bad is not None:
                raise ModelError("overflows float16 once its batch normalisation is folded in", field=bad)

    # ---- images and calibration --------------------------------------------------------------------
    def check_images(self, images: Any) -> np.ndarray:
        """float32 [1, 3, H, W] (H == W) images; ModelError otherwise."""
        try:
            x = np.asarray(images, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ModelError(f"images must be a float array [1, 3, H, W] ({e})") from None
        if x.ndim != 4 or x.shape[:2] != (1, 3) or x.shape[2] != x.shape[3]:
            raise ModelError(f"images must be [1, 3, H, H] (batch 1, RGB, square), got {list(x.shape)}")
        if x.shape[2] < MIN_SIZE:
            raise ModelError(f"images must be at least {MIN_SIZE} x {MIN_SIZE} pixels, got {x.shape[2]}")
        if not np.isfinite(x).all():
            raise ModelError("images hold a value that is not finite")
        return x

    def scales(self, image_size: int) -> Dict[str, float]:
        """int8 activation scales for images of ``image_size`` pixels (class docstring), by
        convolution name, "x" (the image) and "gap" (the pooled features); float32 values."""
        if image_size not in self._scales:
            rng = np.random.default_rng(self.seed + 2)
            net = FloatNet(self.weights)
            for _ in range(CALIBRATION):
                x = rng.standard_normal((1, 3, image_size, image_size)).astype(F32)
                net._seen("x", x)
                forward(self.spec, net, x)
            self._scales[image_size] = {k: float(F32(max(v, 1e-30) / 127)) for k, v in net.amax.items()}
        return self._scales[image_size]

    def stem_for(self, size: int) -> str:
        """The stem an image of ``size`` pixels a side runs with ("auto": "s2d4" when 4 divides it, else "s2d")."""
        if self.stem != "auto":
            return self.stem
        return "s2d4" if size % 4 == 0 else "s2d"

    def _f16_for(self, size: int) -> F16Params:
        stem = self.stem_for(size)
        if stem not in self._f16_by:
            self._f16_by[stem] = F16Params(self.spec, self.weights, stem)
        return self._f16_by[stem]

    def chip_input(self, images: Any) -> np.ndarray:
        """What the host writes: the image quantised to int8 with scale "x" (int8) or rounded to float16,
        space-to-depth for the "s2d" and "s2d4" stems."""
        x = self.check_images(images)
        q = x.astype(np.float16) if self.precision == "fp16" else NumpyInt8.quantize(x, self.scales(x.shape[2])["x"])
        stem = self.stem_for(x.shape[2])
        return space_to_depth(q) if stem == "s2d" else space_to_depth4(q) if stem == "s2d4" else q

    def _params(self, size: int) -> Int8Params:
        """The int8 constants for images of ``size`` pixels (made once per size: they fold every layer)."""
        if size not in self._int8:
            self._int8[size] = Int8Params(self.spec, self.weights, self.scales(size), self.stem_for(size))
        return self._int8[size]

    # ---- the graph, the program and the reference ----------------------------------------------------
    def graph(self, image_size: int, images: int = 1, taps: bool = False) -> Tuple[Graph, List[Tuple[str, int]]]:
        """The graph of ``images`` independent images (inputs x0, x1, ..., outputs logits0, ...; image
        i's operations after image i-1's, weights shared) and the parts' node counts (``nets.forward``);
        ``taps`` (fp16): every convolution's output is an output too, "tap_<name with _ for .>"."""
        d = "float16" if self.precision == "fp16" else "int8"
        g = Graph(f"{self.spec.name}-{self.precision}-{image_size}" + (f"x{images}" if images > 1 else ""))
        ops = (GraphF16(g, self._f16_for(image_size), taps) if self.precision == "fp16"
               else GraphInt8(g, self._params(image_size)))
        marks: List[Tuple[str, int]] = []
        shape = self.chip_input(np.zeros((1, 3, image_size, image_size), np.float32)).shape
        for i in range(images):
            x = g.input(f"x{i}", shape, d)
            first: Any = x if self.precision == "fp16" else (x, self.scales(image_size)["x"])
            g.output(f"logits{i}", forward(self.spec, ops, first, self.stem_for(image_size)))
            marks += [(name if images == 1 else f"{i}:{name}", n) for name, n in ops.marks]
            ops.marks = []
        return g, marks

    def compile(self, image_size: int, images: int = 1) -> Compiled:
        """The program for ``images`` images of ``image_size`` pixels (compiled once; see :meth:`graph`)."""
        key = (int(image_size), int(images))
        if key not in self._compiled:
            t0 = time.perf_counter()
            g, marks = self.graph(*key)
            c = compile_graph(g, self.config)
            self._compiled[key] = (c, time.perf_counter() - t0, kernel_labels(g, marks, self.config.lanes))
        return self._compiled[key][0]

    def reference(self, images: Any) -> np.ndarray:
        """The NumPy reference's logits [1, classes] on the same quantised weights and input (float32;
        int8: what the chip gives bit for bit; fp16: float16 values, see :meth:`layer_errors`)."""
        x, size = self.chip_input(images), self.check_images(images).shape[2]
        if self.precision == "fp16":
            return forward(self.spec, NumpyF16(self._f16_for(size)), x, self.stem_for(size)).astype(np.float32)
        p = self._params(size)
        return forward(self.spec, NumpyInt8(p), (x, p.s["x"]), self.stem_for(size))

    def layer_errors(self, images: Any, engine: str = "fast") -> Dict[str, float]:
        """fp16: run the program with every convolution's output tapped (a graph output) and check each
        layer against the reference computed from the chip's own input to it: {convolution name or
        "logits": largest ``|chip - reference| / bound``} (``lpucore.vision.nets.NumpyF16`` states the bound;
        <= 1: within the bound). A float16 network's error is checked layer by layer because a
        worst-case bound carried through ~50 layers grows by the weights' absolute sums at each and
        says nothing. int8: {"logits": 0.0} when the chip equals :meth:`reference` bit for bit, else inf."""
        x, size = self.chip_input(images), self.check_images(images).shape[2]
        if self.precision != "fp16":
            y, _ = self.run(images, engine=engine)
            return {"logits": 0.0 if y.tobytes() == self.reference(images).tobytes() else float("inf")}
        if size not in self._tapped:
            self._tapped[size] = compile_graph(self.graph(size, taps=True)[0], self.config)
        out, _ = execute(self._tapped[size], {"x0": x}, engine=engine)
        names = {"tap_" + c.conv.replace(".", "_"): c.conv for c in self.spec.convs()}
        chip = {names.get(k, "logits"): v for k, v in out.items()}
        net = NumpyF16(self._f16_for(size), chip)
        forward(self.spec, net, x, self.stem_for(size))
        return net.worst

    # ---- running ------------------------------------------------------------------------------------
    def run(self, images: Any, engine: str = "fast", stream: bool = False) -> Tuple[np.ndarray, VisionStats]:
        """Logits [1, classes] (float32) of one image on the simulated chip, and its figures. With
        ``stream``, also the back-to-back figure (:meth:`stream`: compiles and runs the two-image program)."""
        x, size = self.chip_input(images), self.check_images(images).shape[2]
        c = self.compile(size)
        _, compile_s, labels = self._compiled[(size, 1)]
        t0 = time.perf_counter()
        out, st = execute(c, {"x0": x}, engine=engine)
        wall = time.perf_counter() - t0
        if st.cycles != c.expected_cycles:
            raise LpuError(f"internal: {self.spec.name} ran {st.cycles} cycles, the compiler predicted "
                           f"{c.expected_cycles}")
        by_layer, by_op = breakdown(c, labels)
        stats = VisionStats(self.spec.name, self.precision, self.config.name, size, self.config.clock_hz,
                            st.cycles, c.expected_cycles, st.macs, st.mxm_utilisation, c.memory_bytes,
                            self.config.sram_bytes, by_layer, by_op, c.bounds().as_dict(), compile_s, wall)
        if stream:
            s = self.stream(images, engine=engine)
            stats.stream_images, stats.stream_cycles, stats.stream = s["images"], s["cycles"], s
        return out["logits0"].astype(np.float32), stats

    def stream(self, images: Any, engine: str = "fast", n: int = 2) -> Dict[str, Any]:
        """Back-to-back images: the program of ``n`` independent images (:meth:`graph`), which the
        scheduler overlaps wherever its resources allow (image i+1's first layers start while image i
        is still running), run with ``n`` copies of ``images`` rolled by one pixel each (different
        inputs). Each image's logits must equal those of its own one-image run bit for bit, else
        LpuError. Returns {"images": n, "cycles", "one_image_cycles", "compile_seconds",
        "images_per_second"}: a stream that repeats this program gets n images every ``cycles``."""
        x = self.check_images(images)
        xs = [np.roll(x, i, axis=3) for i in range(n)]
        c = self.compile(x.shape[2], n)
        out, st = execute(c, {f"x{i}": self.chip_input(xi) for i, xi in enumerate(xs)}, engine=engine)
        for i, xi in enumerate(xs):
            one, _ = execute(self.compile(x.shape[2]), {"x0": self.chip_input(xi)}, engine=engine)
            if out[f"logits{i}"].tobytes() != one["logits0"].tobytes():
                raise LpuError(f"internal: image {i} of the {n}-image program differs from its own run")
        return {"images": n, "cycles": st.cycles, "one_image_cycles": self.compile(x.shape[2]).expected_cycles,
                "compile_seconds": self._compiled[(x.shape[2], n)][1],
                "images_per_second": n * self.config.clock_hz / st.cycles}


def resnet(name: str = "resnet50", weights: Optional[Mapping[str, Any]] = None, precision: str = "int8",
           seed: int = 0, config: Optional[ChipConfig] = None, *, block: Optional[str] = None,
           layers: Optional[Tuple[int, ...]] = None, width: int = 64, num_classes: int = 1000,
           stem: str = "auto") -> ResNet:
    """A ResNet by name (``ARCHS``: resnet18, resnet34, resnet50, resnet101) or, with ``block`` and
    ``layers``, any torchvision-shaped one (tests: ``block="basic", layers=(1, 1), width=8``)."""
    if block is None or layers is None:
        if name not in ARCHS:
            raise ModelError(f"unknown model {name!r}; known: {', '.join(ARCHS)} (or give block and layers)")
        block, layers = ARCHS[name]
    spec = ResNetSpec(name, block, tuple(int(n) for n in layers), int(width), int(num_classes))
    return ResNet(spec, weights, precision, seed, config, stem)


def resnet50(weights: Optional[Mapping[str, Any]] = None, precision: str = "int8", seed: int = 0,
             config: Optional[ChipConfig] = None, stem: str = "auto") -> ResNet:
    """torchvision's ResNet-50 (v1.5: the bottleneck's stride on its 3x3 convolution), 1,000 classes."""
    return resnet("resnet50", weights, precision, seed, config, stem=stem)


def resnet18(weights: Optional[Mapping[str, Any]] = None, precision: str = "int8", seed: int = 0,
             config: Optional[ChipConfig] = None, stem: str = "auto") -> ResNet:
    """torchvision's ResNet-18 (basic blocks), 1,000 classes."""
    return resnet("resnet18", weights, precision, seed, config, stem=stem)
