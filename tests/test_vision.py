"""lpucore.vision: ResNets end to end on both engines. A tiny ResNet (two stages of one block, 8 and 16
channels, 16 x 16 images, the small chip) in int8 equals its NumPy reference bit for bit, in fp16 is
within the documented bound layer by layer; two images overlapped in one program give each image's own
logits; torchvision's names and shapes; bad weights and images raise ModelError naming the fault."""

import dataclasses

import numpy as np
import pytest

from lpucore import ChipConfig, LpuError, convref, vision
from lpucore.cli import main
from lpucore.vision.arch import ResNetSpec, space_to_depth, space_to_depth4, stem_weights_s2d, stem_weights_s2d4

SMALL = ChipConfig.small()
TINY = dict(layers=(1, 1), width=8, num_classes=10, config=SMALL)


def image(seed=0, size=16):
    return np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)


@pytest.fixture(scope="module")
def basic8():
    return vision.resnet("tiny", block="basic", **TINY)


@pytest.fixture(scope="module")
def bottleneck8():
    return vision.resnet("tinyb", block="bottleneck", seed=1, **TINY)


@pytest.fixture(scope="module")
def basic16():
    return vision.resnet("tiny", block="basic", precision="fp16", **TINY)


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_int8_equals_the_numpy_reference_bit_for_bit(basic8, engine):
    x = image()
    logits, st = basic8.run(x, engine=engine)
    ref = basic8.reference(x)
    assert logits.shape == (1, 10) and logits.dtype == np.float32
    assert logits.tobytes() == ref.tobytes()
    assert st.cycles == st.predicted_cycles > 0
    # every cycle is attributed once, to a part and to an operation
    assert sum(st.by_layer.values()) == sum(st.by_op.values()) == st.cycles
    assert {"conv1", "layer1.0", "layer2.0", "fc"} <= set(st.by_layer)
    # 1x1 and 3x3 products, the pool's max reading its taps from the image's rows (no window kernel)
    assert {"matmul", "conv_taps", "max"} <= set(st.by_op) and "window" not in st.by_op
    assert 0 < st.schedule_efficiency <= 1 and 0 < st.mxm_utilisation <= 1
    assert st.macs >= basic8.spec.macs(16) and 0 < st.sram_bytes <= st.sram_capacity
    assert st.images_per_second == pytest.approx(SMALL.clock_hz / st.cycles)
    assert "cycles by part" in st.table() and st.to_dict()["seconds"] == st.seconds


def test_int8_bottleneck_v15_and_a_stream_of_two_images(bottleneck8):
    m = bottleneck8
    b = m.spec.blocks()[1]
    assert [c.stride for c in b.convs] == [1, 2, 1] and b.down.stride == 2       # v1.5: stride on the 3x3
    x = image(1)
    one, st = m.run(x, stream=True)
    assert one.tobytes() == m.reference(x).tobytes()
    s = st.stream
    assert st.stream_images == 2 and s["one_image_cycles"] == st.cycles
    # overlapped, two images take less than two runs (and at least one); each image's logits are its own
    assert st.cycles < st.stream_cycles < 2 * st.cycles
    assert st.stream_images_per_second > st.images_per_second
    assert "back to back" in st.table() and "repeated" not in st.table()
    # an overlapped program slower than two runs of the one-image program says so
    slow = dataclasses.replace(st, stream_cycles=3 * st.cycles)
    assert "the one-image program repeated is the faster stream" in slow.table()
    from lpucore import execute
    c2 = m.compile(16, 2)
    xs = [image(5), image(6)]
    out, _ = execute(c2, {f"x{i}": m.chip_input(xi) for i, xi in enumerate(xs)})
    for i, xi in enumerate(xs):
        assert out[f"logits{i}"].tobytes() == m.reference(xi).tobytes()


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_fp16_within_the_documented_bound_layer_by_layer(basic16, engine):
    x = image(2)
    worst = basic16.layer_errors(x, engine=engine)
    assert set(worst) == {c.conv for c in basic16.spec.convs()} | {"logits"}
    assert max(worst.values()) <= 1.0, worst
    logits, st = basic16.run(x, engine=engine)
    assert st.cycles == st.predicted_cycles and logits.dtype == np.float32
    # the untapped program computes the same logits as the tapped one checked above
    assert np.array_equal(np.argmax(logits), np.argmax(basic16.reference(x)))


def test_torchvision_names_shapes_and_sizes():
    r50 = ResNetSpec("resnet50", "bottleneck", (3, 4, 6, 3))
    r18 = ResNetSpec("resnet18", "basic", (2, 2, 2, 2))
    # torchvision's parameter counts (batch-norm statistics aside) and ResNet-50's 4.09 GMACs at 224
    count = {s.name: sum(int(np.prod(v)) for k, v in s.shapes().items() if "running" not in k) for s in (r50, r18)}
    assert count == {"resnet50": 25_557_032, "resnet18": 11_689_512}
    assert round(r50.macs(224) / 1e9, 2) == 4.09
    sh = r50.shapes()
    assert sh["layer1.0.downsample.0.weight"] == (256, 64, 1, 1) and sh["layer4.2.bn3.running_var"] == (2048,)
    assert sh["fc.weight"] == (1000, 2048) and "layer1.0.downsample.0.weight" in sh


@pytest.mark.parametrize("size", [16, 15, 9])
def test_space_to_depth_stem_is_the_same_convolution(basic8, size):
    """The host's space-to-depth image and the 4x4 weights give the 7x7 stride-2 stem's int32 sums
    exactly; the whole int8 network's reference logits are the same bit for bit either way."""
    rng = np.random.default_rng(size)
    x = rng.integers(-128, 128, (1, 3, size, size + 1)).astype(np.int8)
    w = rng.integers(-127, 128, (4, 3, 7, 7)).astype(np.int8)
    direct = convref.conv2d(x, w, None, 2, 3)
    assert np.array_equal(convref.conv2d(space_to_depth(x), stem_weights_s2d(w), None, 1, 0), direct)
    d = vision.ResNet(basic8.spec, basic8.weights, config=SMALL, stem="direct")
    img = image(4, size)
    assert d.reference(img).tobytes() == basic8.reference(img).tobytes()
    assert d.chip_input(img).shape == (1, 3, size, size)
    assert basic8.chip_input(img).shape[1] == (48 if size % 4 == 0 else 12)      # "auto": s2d4 when 4 divides


def test_given_weights_are_checked(basic8):
    spec, w = basic8.spec, dict(basic8.weights)
    again = vision.ResNet(spec, {**w, "bn1.num_batches_tracked": np.array(3)}, config=SMALL)
    assert again.reference(image(3)).tobytes() == basic8.reference(image(3)).tobytes()
    cases = [({k: v for k, v in w.items() if k != "fc.bias"}, "'fc.bias': missing"),
             ({**w, "layer9.weight": w["fc.bias"]}, "'layer9.weight': unexpected"),
             ({**w, "conv1.weight": w["conv1.weight"][:, :2]}, "'conv1.weight': has shape"),
             ({**w, "bn1.bias": np.full(8, np.nan)}, "'bn1.bias': holds a value that is not finite"),
             ({**w, "bn1.running_var": -np.ones(8)}, "negative variance"),
             ({**w, "fc.weight": "abc"}, "'fc.weight': not an array"),
             ([1, 2], "must be a mapping")]
    for weights, words in cases:
        with pytest.raises(vision.ModelError, match=words):
            vision.ResNet(spec, weights, config=SMALL)
    with pytest.raises(vision.ModelError, match="overflows float16"):
        vision.ResNet(spec, {**w, "bn1.weight": np.full(8, 1e6, np.float32)}, precision="fp16", config=SMALL)


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_the_s2d4_stem_gives_the_same_network(basic8, engine):
    """4 x 4 space-to-depth: the 3x3 stem's 2 x 2 pixel blocks, put in place by depth_to_space, are the
    7x7 stride-2 stem's int32 sums exactly; the int8 network on the chip equals the reference bit for
    bit, and that reference equals the other stems'; a side not a multiple of 4 is refused."""
    rng = np.random.default_rng(7)
    x = rng.integers(-128, 128, (1, 3, 12, 16)).astype(np.int8)
    w = rng.integers(-127, 128, (4, 3, 7, 7)).astype(np.int8)
    y = convref.conv2d(space_to_depth4(x), stem_weights_s2d4(w), None, 1, 0)
    assert np.array_equal(convref.depth_to_space(y, 2), convref.conv2d(x, w, None, 2, 3))
    m = vision.ResNet(basic8.spec, basic8.weights, config=SMALL, stem="s2d4")
    img = image(5)
    logits, st = m.run(img, engine=engine)
    s2d = vision.ResNet(basic8.spec, basic8.weights, config=SMALL, stem="s2d")
    assert logits.tobytes() == m.reference(img).tobytes() == s2d.reference(img).tobytes()
    assert st.cycles == st.predicted_cycles and "d2s" in st.by_op
    assert m.chip_input(img).shape == (1, 48, 6, 6)
    with pytest.raises(vision.ModelError, match="multiples of 4"):
        m.run(image(5, 18))


def test_bad_arguments():
    for call, words in ((lambda: vision.resnet("resnet51"), "unknown model"),
                        (lambda: vision.resnet50(precision="int4"), "precision"),
                        (lambda: vision.resnet50(stem="s4d"), "stem"),
                        (lambda: vision.resnet("t", block="dense", layers=(1,)), "block"),
                        (lambda: vision.resnet("t", block="basic", layers=()), "layers")):
        with pytest.raises(vision.ModelError, match=words):
            call()


def test_bad_images(basic8):
    for x, words in ((np.zeros((2, 3, 16, 16)), r"\[1, 3, H, H\]"), (np.zeros((1, 3, 16, 8)), "square"),
                     (np.zeros((1, 3, 4, 4)), "at least"), (np.full((1, 3, 16, 16), np.inf), "not finite"),
                     ("abc", "float array")):
        with pytest.raises(LpuError, match=words):
            basic8.run(x)


def test_cli_errors(capsys):
    assert main(["vision", "--image-size", "4"]) == 2
    assert main(["vision", "--precision", "int4"]) == 2
    # ResNet-18's 11.7 M weights do not fit the small chip: one error line, status 1
    assert main(["vision", "--model", "resnet18", "--chip", "small", "--image-size", "8"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("lpucore: error:") for e in err) and "does not fit" in err[-1]


def test_cli_runs_resnet18_on_the_groqchip(capsys, tmp_path):
    """The real ResNet-18 (11.7 M weights) on the GroqChip at 8 x 8 pixels: top-1 and logits as the reference's."""
    out = tmp_path / "stats.json"
    assert main(["vision", "--model", "resnet18", "--image-size", "8", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "logits bit for bit" in text and "cycles by part" in text and "layer4.1" in text
    import json
    d = json.loads(out.read_text())
    assert d["model"] == "resnet18" and d["image_size"] == 8 and d["cycles"] == d["predicted_cycles"] > 0
