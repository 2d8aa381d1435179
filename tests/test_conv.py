"""Convolution and pooling in the graph (lpucore.compiler.conv): every operation on both engines
against the NumPy references of lpucore.convref (int8 exact, float16 within the documented bound),
hypothesis-generated geometries, and a tiny ResNet end to end in float16 and int8."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lpucore
from lpucore import ChipConfig, Graph, GraphError, convref
from lpucore.compiler import conv
from lpucore.compiler.bounds import graph_bounds

SMALL = ChipConfig.small()
F16 = np.float16


def few(n: int) -> int:
    """Examples per property: the `ci` profile runs four times as many."""
    return 4 * n if os.environ.get("HYPOTHESIS_PROFILE") == "ci" else n


def run(g, inputs, engines=("fast", "reference")):
    """Compile g for the small chip and run it on the engines: the outputs (equal bit for bit on
    both engines, the predicted cycles the measured ones)."""
    c = lpucore.compile(g, SMALL)
    got = []
    for e in engines:
        out, stats = lpucore.execute(c, inputs, engine=e)
        assert stats.cycles == c.expected_cycles, e
        got.append(out)
    for name in got[0]:
        for o in got[1:]:
            assert got[0][name].tobytes() == o[name].tobytes(), name
    return got[0]


def close16(out, ref, bound):
    err = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    assert (err <= bound).all(), float((err - bound).max())


def rand(rng, shape, dtype):
    if dtype == "int8":
        return rng.integers(-128, 128, shape).astype(np.int8)
    return rng.standard_normal(shape).astype(F16)


# ---- every operation, both engines -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_conv2d_with_bias_stride_padding_groups(dtype):
    rng = np.random.default_rng(1)
    X, W = rand(rng, (2, 4, 7, 6), dtype), rand(rng, (6, 2, 3, 2), dtype)
    B = (rng.integers(-999, 999, 6).astype(np.int32) if dtype == "int8" else rand(rng, (6,), dtype))
    g = Graph("conv")
    g.output("y", g.conv2d(g.input("x", X.shape, dtype), g.constant("w", W), g.constant("b", B),
                           stride=(2, 1), padding=(1, 0), groups=2))
    y = run(g, {"x": X})["y"]
    ref = convref.conv2d(X, W, B, (2, 1), (1, 0), 1, 2)
    assert y.shape == ref.shape == (2, 6, 4, 5)
    if dtype == "int8":
        assert y.dtype == np.int32 and (y == ref).all()
    else:
        close16(y, ref, convref.conv2d_bound(X, W, ref, (2, 1), (1, 0), 1, 2))


@pytest.mark.parametrize("size", [6, 8, 19])
def test_an_int32_nchw_output_wider_than_a_few_pixels(size):
    """The NCHW output of a convolution (int32: four byte planes a vector) is a lane move of its channel-last
    pixels; on the small chip its pixels and masks share four slices, and the pieces' reads collided at every
    slip they were allowed (sizes 6-8, 10-12, 14-19 and 21-23 found no room at all)."""
    rng = np.random.default_rng(size)
    X, W = rand(rng, (1, 4, size, size), "int8"), rand(rng, (8, 4, 3, 3), "int8")
    g = Graph("conv")
    g.output("y", g.conv2d(g.input("x", X.shape, "int8"), g.constant("w", W), padding=1))
    y = run(g, {"x": X})["y"]
    assert y.dtype == np.int32 and (y == convref.conv2d(X, W, None, 1, 1, 1, 1)).all()


def test_pools_flatten_and_global_average():
    rng = np.random.default_rng(2)
    X = rand(rng, (2, 4, 6, 5), "float16")
    Xi = rand(rng, (1, 3, 5, 5), "int8")
    g = Graph("pools")
    x, xi = g.input("x", X.shape, "float16"), g.input("xi", Xi.shape, "int8")
    g.output("mx", g.max_pool2d(x, 3, 2, 1))
    g.output("mxi", g.max_pool2d(xi, (2, 3), (1, 2), dilation=(2, 1)))
    g.output("av", g.avg_pool2d(x, 3, 1, 1))
    g.output("avn", g.avg_pool2d(x, (3, 2), 2, (1, 1), count_include_pad=False))
    g.output("gap", g.global_avg_pool2d(x))
    g.output("fl", g.flatten(x, 1, 2))
    out = run(g, {"x": X, "xi": Xi})
    assert (out["mx"] == convref.max_pool2d(X, 3, 2, 1)).all()
    assert (out["mxi"] == convref.max_pool2d(Xi, (2, 3), (1, 2), 0, (2, 1))).all()
    assert (out["fl"] == convref.flatten(X, 1, 2)).all()
    for name, ref, n in (("av", convref.avg_pool2d(X, 3, 1, 1), 9),
                         ("avn", convref.avg_pool2d(X, (3, 2), 2, (1, 1), False), 6),
                         ("gap", convref.global_avg_pool2d(X), 30)):
        # float32 sums in another order, rounded once: within an ulp of float16 (plus the sum's error)
        close16(out[name], ref, 2.0 ** -10 * np.abs(ref.astype(np.float64)) + n * 2.0 ** -22 * 8)


def test_batch_norm_folded_into_the_convolution_and_on_the_vxm():
    rng = np.random.default_rng(3)
    X, W = rand(rng, (1, 3, 6, 6), "float16"), rand(rng, (5, 3, 3, 3), "float16")
    stats = [rng.standard_normal(5).astype(F16), rng.uniform(0.5, 2, 5).astype(F16),
             rng.uniform(0.5, 1.5, 5).astype(F16), rng.standard_normal(5).astype(F16)]
    g = Graph("bn")
    x = g.input("x", X.shape, "float16")
    y = g.conv2d(x, g.constant("w", W), stride=1, padding=1)
    g.output("folded", g.relu(g.batch_norm(y, *stats)))
    y2 = g.conv2d(x, g.constant("w2", W), padding=1)
    g.output("raw", y2)                               # y2 feeds two consumers: not folded
    g.output("vxm", g.batch_norm(y2, *stats, eps=1e-3))
    g.output("direct", g.batch_norm(x, *[s[:3] for s in stats]))
    h, _ = conv.rewrite(g, SMALL.lanes)
    assert [n.op for n in h.nodes].count("conv_taps") == 2      # no window: the taps read x's rows
    out = run(g, {"x": X})
    raw = convref.conv2d(X, W, None, 1, 1)
    close16(out["raw"], raw, convref.conv2d_bound(X, W, raw, 1, 1))
    assert (out["vxm"] == convref.batch_norm(out["raw"], *stats, eps=1e-3)).all()
    assert (out["direct"] == convref.batch_norm(X, *[s[:3] for s in stats])).all()
    scale, shift = convref.bn_affine(*stats, eps=1e-5)
    Wf = (W.astype(np.float64) * scale[:, None, None, None]).astype(F16)
    ref = np.maximum(convref.conv2d(X, Wf, shift.astype(F16), 1, 1), 0)
    close16(out["folded"], ref, convref.conv2d_bound(X, Wf, ref, 1, 1) + 2.0 ** -10 * np.abs(shift).max())


def test_channel_last_images_stay_channel_last_between_layers():
    g = Graph("chain")
    x = g.input("x", (1, 4, 6, 6), "float16")
    w = g.constant("w", np.ones((4, 4, 3, 3), F16))
    y = g.relu(g.conv2d(x, w, padding=1)) + g.constant("b", np.ones((4, 1, 1), F16))
    g.output("y", g.conv2d(y, g.constant("w2", np.ones((4, 4, 1, 1), F16))))
    h = conv.rewrite(g, SMALL.lanes)[0]
    ops = [n.op for n in h.nodes]
    # the input written channel-last (six pixels, 24 of the 64 lanes, a row: the same bytes), read by
    # the taps (no window); the 3x3 convolution's output, read only by the 1x1 one through elementwise
    # operations, packed six pixels a row too, which the 1x1 convolution reads back into one pixel a
    # row; one transpose back at the output
    assert ops.count("window") == 0 and ops.count("transpose") == 1
    assert ops.count("conv_taps") == 2 and ops.count("matmul") == 0
    taps = [n for n in h.nodes if n.op == "conv_taps"]
    assert h.inputs["x"].shape == (6, 24) and [n.attrs.get("pack") for n in taps] == [(6, 6), (6, 1)]
    assert h.tensors[taps[0].output].shape == (6, 24) and h.tensors[taps[1].output].shape == (36, 4)


def test_image_inputs_are_written_channel_last(tmp_path):
    rng = np.random.default_rng(8)
    X, W = rand(rng, (2, 3, 5, 4), "int8"), rand(rng, (4, 3, 3, 3), "int8")
    g = Graph("inp")
    x = g.input("x", X.shape, "int8")
    g.output("y", g.conv2d(x, g.constant("w", W), padding=1))
    v = g.input("v", X.shape, "int8")                  # also read by a non-image operation: stays NCHW
    g.output("m", g.max_pool2d(v, 2))
    g.output("n", g.neg(v))
    h, axes = conv.rewrite(g, SMALL.lanes)
    # channel-last, a row of the image (4 pixels of 3 channels) a row of the program's tensor
    assert axes == {"x": (0, 2, 3, 1)} and h.inputs["x"].shape == (2 * 5, 4 * 3)
    # x's convolution reads its taps from the channel-last rows; v's pool forms a window from NCHW
    assert [n.op for n in h.nodes].count("conv_taps") == 1
    assert [n.attrs["kind"] for n in h.nodes if n.op == "window"] == ["nchw"]
    c = lpucore.compile(g, SMALL)
    assert c.inputs["x"][0] == X.shape and c.input_axes == {"x": (0, 2, 3, 1)}
    c.save(tmp_path / "c.lpuc")
    again = lpucore.load_compiled(tmp_path / "c.lpuc")
    assert again.input_axes == c.input_axes
    for prog in (c, again):
        out, _ = lpucore.execute(prog, {"x": X, "v": X}, engine="fast")
        assert (out["y"] == convref.conv2d(X, W, None, 1, 1)).all()
        assert (out["m"] == convref.max_pool2d(X, 2)).all() and (out["n"] == -X).all()
    with pytest.raises(GraphError, match="must be int8"):
        lpucore.execute(c, {"x": X[:1], "v": X})


def test_a_saved_programs_packed_input_axes_are_checked():
    """A program whose input image is packed (4 pixels of 3 channels a row of its tensor) keeps the
    host's permutation in its file; an edited one whose last axis does not divide the tensor's
    columns, or that is no permutation, is a CompiledFileError, never a foreign exception."""
    import json
    import struct
    import zlib

    from lpucore import CompiledFileError
    from lpucore.compiler import store
    from lpucore.compiler.api import compiled_from_bytes
    rng = np.random.default_rng(8)
    g = Graph("inp")
    g.output("y", g.conv2d(g.input("x", (2, 3, 5, 4), "int8"), g.constant("w", rand(rng, (4, 3, 3, 3), "int8")),
                           padding=1))
    c = lpucore.compile(g, SMALL)
    assert c.program.tensors["x"].shape == (10, 12)
    data = store.to_bytes(c)
    mlen = struct.unpack_from("<I", data, 8)[0]
    for axes in ([0, 3, 1, 2], [0, 2, 3, 3]):            # ends in H = 5 (12 columns); not a permutation
        meta = json.loads(data[12:12 + mlen])
        meta["input_axes"] = {"x": axes}
        mj = json.dumps(meta).encode()
        b = bytearray(data[:8] + struct.pack("<I", len(mj)) + mj + data[12 + mlen:])
        b[-4:] = struct.pack("<I", zlib.crc32(bytes(b[:-4])) & 0xFFFFFFFF)
        with pytest.raises(CompiledFileError, match="input_axes"):
            compiled_from_bytes(bytes(b))


def test_ops_front_end_and_bounds():
    rng = np.random.default_rng(4)
    X, W = rand(rng, (1, 3, 5, 5), "int8"), rand(rng, (4, 3, 3, 3), "int8")
    y, stats = lpucore.ops.conv2d(X, W, stride=2, config=SMALL, stats=True)
    assert (y == convref.conv2d(X, W, None, 2)).all() and stats.cycles > 0
    Xf = rand(rng, (1, 3, 5, 5), "float16")
    assert (lpucore.ops.max_pool2d(Xf, 2, config=SMALL) == convref.max_pool2d(Xf, 2)).all()
    assert lpucore.ops.avg_pool2d(Xf, 2, config=SMALL).shape == (1, 3, 2, 2)
    gap = convref.global_avg_pool2d(Xf)
    close16(lpucore.ops.global_avg_pool2d(Xf, config=SMALL), gap, 2.0 ** -10 * np.abs(gap) + 25 * 2.0 ** -19)
    assert (lpucore.ops.flatten(Xf, config=SMALL) == Xf.reshape(1, -1)).all()
    ones, zeros = np.ones(3, F16), np.zeros(3, F16)
    assert (lpucore.ops.batch_norm(Xf, zeros, ones, eps=0.5, config=SMALL)
            == convref.batch_norm(Xf, zeros, ones, eps=0.5)).all()
    g = Graph("b")
    g.output("y", g.conv2d(g.input("x", (1, 3, 5, 5), "int8"), g.constant("w", W), stride=2))
    b = graph_bounds(g, SMALL, 1000)
    assert b.mxm == pytest.approx(1 * 4 * 2 * 2 * 27 / (SMALL.mxm_planes * SMALL.mxm_size ** 2))
    assert b.weight_stream > 0


def test_depth_to_space_of_an_input_and_of_a_convolution():
    """ONNX DepthToSpace ("DCR") of an NCHW input and of a convolution's channel-last output (then
    pooled: the stem of lpucore.vision's "s2d4" form), against convref and its definition."""
    rng = np.random.default_rng(5)
    X = rand(rng, (2, 18, 3, 2), "int8")
    Xc = rand(rng, (1, 3, 6, 5), "int8")
    Wc = rand(rng, (12, 3, 3, 3), "int8")
    g = Graph("d2s")
    x, xc = g.input("x", X.shape, "int8"), g.input("xc", Xc.shape, "int8")
    g.output("a", g.depth_to_space(x, 3))
    y = g.depth_to_space(g.conv2d(xc, g.constant("w", Wc), padding=1), 2)
    g.output("b", y)
    g.output("p", g.max_pool2d(y, 3, 2, 1))
    out = run(g, {"x": X, "xc": Xc})
    ref = np.zeros((2, 2, 9, 6), np.int8)
    for i in range(3):
        for j in range(3):
            ref[:, :, i::3, j::3] = X[:, (i * 3 + j) * 2:(i * 3 + j + 1) * 2]
    assert (convref.depth_to_space(X, 3) == ref).all() and (out["a"] == ref).all()
    yr = convref.depth_to_space(convref.conv2d(Xc, Wc, None, 1, 1), 2)
    assert (out["b"] == yr).all()
    assert (out["p"] == convref.max_pool2d(yr, 3, 2, 1)).all()


def test_argument_checks():
    g = Graph("bad")
    x = g.input("x", (1, 4, 5, 5), "float16")
    w = g.constant("w", np.ones((2, 4, 3, 3), F16))
    for call, words in (
            (lambda: g.conv2d(g.input("v", (4, 5, 5), "float16"), w), "4-d NCHW"),
            (lambda: g.conv2d(x, x), "4-d constant"),
            (lambda: g.conv2d(x, g.constant(None, np.ones((2, 4, 3, 3), np.int8))), "both be int8"),
            (lambda: g.conv2d(x, w, groups=3), "groups=3"),
            (lambda: g.conv2d(x, w, bias=np.ones(3, F16)), "bias must be"),
            (lambda: g.conv2d(x, w, stride=0), "stride must be"),
            (lambda: g.conv2d(x, g.constant(None, np.ones((2, 4, 7, 3), F16))), "does not fit"),
            (lambda: g.max_pool2d(x, 2, padding=2), "at most half"),
            (lambda: g.avg_pool2d(g.input("i", (1, 4, 5, 5), "int8"), 2), "float tensor"),
            (lambda: g.global_avg_pool2d(g.input("j", (1, 4, 5, 5), "int8")), "float tensor"),
            (lambda: g.batch_norm(x, np.zeros(3, F16), np.ones(4, F16)), "mean must be"),
            (lambda: g.batch_norm(x, np.zeros(4, F16), np.ones(4, F16), eps=0), "eps"),
            (lambda: g.flatten(x, 2, 1), "not a range"),
            (lambda: g.depth_to_space(x, 0), "block must be"),
            (lambda: g.depth_to_space(x, 3), "not a multiple")):
        with pytest.raises(GraphError, match=words):
            call()


@pytest.mark.parametrize("dtype,cin,stride", [("int8", 70, 1), ("int8", 130, 2), ("float16", 40, 1),
                                              ("float16", 70, 2)])
def test_windowless_convolution_of_taps_wider_than_a_chunk(dtype, cin, stride):
    """conv_taps with several K chunks a tap (SMALL: 64 lanes; float16 chunks of 32 rows, the odd ones
    the upper half of a vector shifted down), pads skipped, stride 2: equal to NumPy on both engines."""
    rng = np.random.default_rng(cin + stride)
    X = rand(rng, (1, cin, 5, 6), dtype)
    Wt = rand(rng, (3, cin, 3, 3), dtype)
    g = Graph("taps")
    g.output("y", g.conv2d(g.input("x", X.shape, dtype), g.constant("w", Wt), stride=stride, padding=1))
    assert [n.op for n in conv.rewrite(g, SMALL.lanes)[0].nodes].count("conv_taps") == 1
    out = run(g, {"x": X})["y"]
    ref = convref.conv2d(X, Wt, None, stride, 1)
    if dtype == "int8":
        assert (out == ref).all()
    else:
        close16(out, ref, convref.conv2d_bound(X, Wt, ref, stride, 1))


def test_windowless_convolution_deals_its_row_blocks_over_the_planes():
    """Rows enough for several accumulator blocks a plane (SMALL: 32-row blocks, 4 planes): the blocks
    dealt in turn (kernels._dealt), each plane's results right on both engines."""
    from lpucore.compiler.kernels import _dealt
    assert _dealt(320, 32, 4, 1) == [(32, 64), (160, 192), (288, 320)]
    assert _dealt(30, 32, 4, 3) == [(24, 30)]                 # fewer rows than blocks: M / k each
    dealt = [b for j in range(4) for b in _dealt(1000, 32, 4, j)]
    assert sorted(dealt)[0][0] == 0 and sum(b1 - b0 for b0, b1 in dealt) == 1000
    rng = np.random.default_rng(3)
    X, Wt = rand(rng, (1, 40, 16, 20), "int8"), rand(rng, (6, 40, 3, 3), "int8")    # 40 channels: not packed
    g = Graph("dealt")
    g.output("y", g.conv2d(g.input("x", X.shape, "int8"), g.constant("w", Wt), padding=1))
    assert (run(g, {"x": X})["y"] == convref.conv2d(X, Wt, None, 1, 1)).all()


def _lw_rows_per_install(compiled, queue):
    """Weight-buffer rows loaded before each IW of an MXM plane's LW queue (each LW's n rows; a Repeat
    of an LW counts its repeats)."""
    groups, n, last = [], 0, None
    for ins in compiled.program.queues[queue]:
        op = ins.op.mnemonic
        if op == "LW":
            n += ins["n"]
            last = ins
        elif op == "Repeat" and last is not None:
            n += ins["n"] * last["n"]
        elif op == "IW":
            groups.append(n)
            n = 0
        if op not in ("LW", "Repeat"):
            last = None
    return groups


def test_windowless_convolution_loads_only_the_weights_past_its_first_load():
    """Every tap's chunk has its weights in the same first rows and zeros after them: a plane's first
    load of the program fills the whole buffer (another program may have left weights in it), the next
    ones only the 40 rows of weights (IW installs a copy; the buffer keeps its zeros). Both engines agree
    with NumPy (test_windowless_convolution_deals_its_row_blocks_over_the_planes runs the same shapes)."""
    rng = np.random.default_rng(3)
    X, Wt = rand(rng, (1, 40, 16, 20), "int8"), rand(rng, (6, 40, 3, 3), "int8")    # 40 channels: not packed
    g = Graph("partial")
    g.output("y", g.conv2d(g.input("x", X.shape, "int8"), g.constant("w", Wt), padding=1))
    c = lpucore.compile(g, SMALL)
    for q in ("MXM.W0.LW", "MXM.E1.LW"):
        groups = _lw_rows_per_install(c, q)
        assert groups[0] == SMALL.mxm_size                                  # 64 rows
        assert len(groups) > 9 and set(groups[1:]) == {40}                 # the 40 rows of weights


def test_an_output_position_of_pads_alone_takes_a_window():
    """A position whose taps are all pads has no product to set its accumulator: that convolution
    forms a window (its pads the zero vector) instead of reading taps."""
    X = np.arange(8, dtype=np.int8).reshape(1, 2, 2, 2)
    Wt = np.ones((1, 2, 1, 1), np.int8)
    g = Graph("pads")
    g.output("y", g.conv2d(g.input("x", X.shape, "int8"), g.constant("w", Wt), padding=1))
    ops = [n.op for n in conv.rewrite(g, SMALL.lanes)[0].nodes]
    assert "conv_taps" not in ops and "window" in ops
    assert (run(g, {"x": X})["y"] == convref.conv2d(X, Wt, None, 1, 1)).all()


def test_a_max_pools_image_is_striped_so_its_taps_are_on_distinct_slices():
    g = Graph("pool")
    x = g.input("x", (1, 64, 112, 112), "int8")
    g.output("y", g.max_pool2d(x, 3, 2, 1))
    h, _ = conv.rewrite(g, SMALL.lanes)
    (win,) = [n for n in h.nodes if n.op == "window"]
    assert win.attrs["pads"] == "repeat"
    ns = conv.window_stripes(win, 44)
    assert ns == 12                           # 112 = 0 mod 8: eight stripes put the nine taps on three slices
    rows = convref.window_rows(1, 112, 112, 3, 2, 1, 1)
    inner = rows[(rows >= 0).all(axis=1)]
    assert max(np.bincount(r % ns).max() for r in inner) == 1
    assert max(np.bincount(r % 8).max() for r in inner) == 3


# ---- hypothesis: geometries ----------------------------------------------------------------------------
@st.composite
def geometries(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    s = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    p = (draw(st.integers(0, kh // 2 + 1)), draw(st.integers(0, kw // 2 + 1)))
    H = draw(st.integers(max(1, d[0] * (kh - 1) + 1 - 2 * p[0]), 7))
    W = draw(st.integers(max(1, d[1] * (kw - 1) + 1 - 2 * p[1]), 7))
    return dict(N=draw(st.integers(1, 2)), cin=cin, cout=cout, k=(kh, kw), H=H, W=W, stride=s, padding=p,
                dilation=d, groups=groups, bias=draw(st.booleans()), dtype=draw(st.sampled_from(["int8", "float16"])),
                seed=draw(st.integers(0, 2 ** 16)))


@settings(max_examples=few(6))
@given(geometries())
def test_conv2d_random_geometries(geo):
    rng = np.random.default_rng(geo["seed"])
    dtype = geo["dtype"]
    X = rand(rng, (geo["N"], geo["cin"], geo["H"], geo["W"]), dtype)
    Wt = rand(rng, (geo["cout"], geo["cin"] // geo["groups"]) + geo["k"], dtype)
    B = None
    if geo["bias"]:
        B = (rng.integers(-999, 999, geo["cout"]).astype(np.int32) if dtype == "int8"
             else rand(rng, (geo["cout"],), dtype))
    g = Graph("conv")
    x = g.input("x", X.shape, dtype)
    kw = dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"], groups=geo["groups"])
    g.output("y", g.conv2d(x, g.constant("w", Wt), None if B is None else g.constant("b", B), **kw))
    k = geo["k"]
    pp = (min(geo["padding"][0], k[0] // 2), min(geo["padding"][1], k[1] // 2))      # a pool pads at most k / 2
    pool = dtype == "float16" and min(convref.out_size(geo["H"], geo["W"], k, geo["stride"], pp, geo["dilation"])) >= 1
    if pool:
        g.output("p", g.max_pool2d(x, k, geo["stride"], pp, geo["dilation"]))
    out = run(g, {"x": X})
    ref = convref.conv2d(X, Wt, B, geo["stride"], geo["padding"], geo["dilation"], geo["groups"])
    if dtype == "int8":
        assert (out["y"] == ref).all()
    else:
        close16(out["y"], ref, convref.conv2d_bound(X, Wt, ref, geo["stride"], geo["padding"], geo["dilation"],
                                                    geo["groups"]))
    if pool:
        assert (out["p"] == convref.max_pool2d(X, k, geo["stride"], pp, geo["dilation"])).all()


@settings(max_examples=few(6))
@given(geometries(), st.integers(1, 12), st.sampled_from([1, 3]))
def test_packed_images_between_convolutions_random_geometries(geo, cmid, k1):
    """A convolution whose output only another convolution reads (through a requantisation) packs
    several pixels a row; the second reads the packed rows (:func:`conv.packed_groups`) whatever its
    geometry: int8 exact against NumPy on both engines."""
    rng = np.random.default_rng(geo["seed"])
    N, cin, H, W = geo["N"], geo["cin"], geo["H"], geo["W"]
    X = rand(rng, (N, cin, H, W), "int8")
    W1 = rand(rng, (cmid, cin, k1, k1), "int8")
    W2 = rand(rng, (geo["cout"], cmid, *geo["k"]), "int8")
    g = Graph("packed")
    acc = g.conv2d(g.input("x", X.shape, "int8"), g.constant("w1", W1), padding=k1 // 2)
    m = (rng.uniform(0.5, 2.0, cmid) / 2 ** 12).astype(np.float32)
    q = g.quantize(g.mul(g.cast(acc, "float32"), m.reshape(-1, 1, 1)), 0.5)
    kw = dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"])
    g.output("y", g.conv2d(q, g.constant("w2", W2), **kw))
    out = run(g, {"x": X})
    a = convref.conv2d(X, W1, None, 1, k1 // 2).astype(np.float32) * m.reshape(1, -1, 1, 1)
    qr = np.clip(np.rint(a / np.float32(0.5)), -128, 127).astype(np.int8)
    assert (out["y"] == convref.conv2d(qr, W2, None, **kw)).all()


@settings(max_examples=few(4))
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 4), st.integers(1, 4), st.integers(1, 2),
       st.sampled_from(["int8", "float16"]), st.booleans(), st.integers(0, 2 ** 16))
def test_depth_to_space_random_shapes(r, c, H, W, N, dtype, conv_first, seed):
    """depth_to_space of an NCHW input or of a convolution's channel-last output, both engines."""
    rng = np.random.default_rng(seed)
    g = Graph("d2s")
    if conv_first:
        X = rand(rng, (N, 2, H, W), dtype)
        Wt = rand(rng, (c * r * r, 2, 1, 1), dtype)
        x = g.conv2d(g.input("x", X.shape, dtype), g.constant("w", Wt))
        src = convref.conv2d(X, Wt, None, 1, 0)
    else:
        X = rand(rng, (N, c * r * r, H, W), dtype)
        x = g.input("x", X.shape, dtype)
        src = X
    g.output("y", g.depth_to_space(x, r))
    out = run(g, {"x": X})
    if conv_first and dtype == "float16":      # the product's rounding: compare its values moved
        ref = convref.depth_to_space(src, r)
        close16(out["y"], ref, convref.depth_to_space(convref.conv2d_bound(X, Wt, src, 1, 0), r))
    else:
        assert (out["y"] == convref.depth_to_space(src, r)).all()


# ---- a tiny ResNet end to end ---------------------------------------------------------------------------
C0, C1, HW, CLASSES = 8, 16, 8, 10


def resnet_params(rng):
    """Stem 3x3 conv (3 -> 8) + BN + ReLU, 3x3/2 max pool, a basic block at 8 channels, a
    downsampling block to 16 (stride 2, 1x1 projection), global average pool, a linear layer."""
    def conv_bn(co, ci, k):
        return {"w": (rng.standard_normal((co, ci, k, k)) / np.sqrt(ci * k * k)).astype(F16),
                "bn": [rng.standard_normal(co).astype(F16) * F16(0.1), rng.uniform(0.5, 1.5, co).astype(F16),
                       rng.uniform(0.5, 1.5, co).astype(F16), rng.standard_normal(co).astype(F16) * F16(0.1)]}
    return {"stem": conv_bn(C0, 3, 3), "a1": conv_bn(C0, C0, 3), "a2": conv_bn(C0, C0, 3),
            "b1": conv_bn(C1, C0, 3), "b2": conv_bn(C1, C1, 3), "bp": conv_bn(C1, C0, 1),
            "fc": (rng.standard_normal((C1, CLASSES)) / 4).astype(F16)}


class GraphNet:
    """The network's operations on a Graph (float16; BN nodes folded by the compiler)."""

    def __init__(self, g):
        self.g = g

    def conv_bn(self, x, p, stride, pad, relu=True):
        y = self.g.batch_norm(self.g.conv2d(x, self.g.constant(None, p["w"]), stride=stride, padding=pad), *p["bn"])
        return self.g.relu(y) if relu else y


class NumpyNet:
    """The same in NumPy (convref, BN applied after each convolution in float32)."""

    g = None

    def conv_bn(self, x, p, stride, pad, relu=True):
        y = convref.batch_norm(convref.conv2d(x, p["w"], None, stride, pad), *p["bn"])
        return np.maximum(y, F16(0)) if relu else y


def forward(net, x, P, ops):
    """ops: relu, add, max_pool2d, global_avg_pool2d, flatten, matmul on net's tensors."""
    x = net.conv_bn(x, P["stem"], 1, 1)
    x = ops["max_pool2d"](x, 3, 2, 1)
    y = net.conv_bn(net.conv_bn(x, P["a1"], 1, 1), P["a2"], 1, 1, relu=False)
    x = ops["relu"](ops["add"](y, x))
    y = net.conv_bn(net.conv_bn(x, P["b1"], 2, 1), P["b2"], 1, 1, relu=False)
    x = ops["relu"](ops["add"](y, net.conv_bn(x, P["bp"], 2, 0, relu=False)))
    return ops["matmul"](ops["flatten"](ops["global_avg_pool2d"](x)), P["fc"])


def test_tiny_resnet_float16():
    rng = np.random.default_rng(5)
    P = resnet_params(rng)
    X = rng.standard_normal((1, 3, HW, HW)).astype(F16)
    g = Graph("resnet")
    gops = {"relu": g.relu, "add": g.add, "max_pool2d": g.max_pool2d, "global_avg_pool2d": g.global_avg_pool2d,
            "flatten": g.flatten, "matmul": lambda a, w: g.matmul(a, g.constant(None, w))}
    g.output("logits", forward(GraphNet(g), g.input("x", X.shape, "float16"), P, gops))
    # 6 convs read their taps straight from the images' rows (the 1x1 one has stride 2); the pool a window
    ops = [n.op for n in conv.rewrite(g, SMALL.lanes)[0].nodes]
    assert ops.count("conv_taps") == 6 and ops.count("window") == 1
    out = run(g, {"x": X})["logits"]
    nops = {"relu": lambda a: np.maximum(a, F16(0)), "add": lambda a, b: (a + b).astype(F16),
            "max_pool2d": convref.max_pool2d, "global_avg_pool2d": convref.global_avg_pool2d,
            "flatten": convref.flatten,
            "matmul": lambda a, w: (a.astype(np.float32) @ w.astype(np.float32)).astype(F16)}
    ref = forward(NumpyNet(), X, P, nops)
    assert out.shape == (1, CLASSES)
    # five float16 layers deep (folded BN weights rounded to float16): a few percent of the logits' scale
    assert np.abs(out.astype(np.float32) - ref.astype(np.float32)).max() <= 0.03 * np.abs(ref).max() + 0.01


# int8: weights per output channel (max |w| / 127), activations per tensor (max |x| / 127 over the
# calibration set: CALIBRATION images, seed 6), int32 accumulation, requantised on the VXM in float32
CALIBRATION = 4


def fold(p):
    scale, shift = convref.bn_affine(*p["bn"], eps=1e-5)
    w = p["w"].astype(np.float64) * scale[:, None, None, None]
    ws = np.abs(w).reshape(len(w), -1).max(axis=1) / 127
    return np.clip(np.rint(w / ws[:, None, None, None]), -127, 127).astype(np.int8), ws, shift


class Int8Net:
    """The int8 network, on a Graph (g set) or in NumPy emulating the chip's float32 requantisation."""

    def __init__(self, P, scales, g=None):
        self.P, self.s, self.g = P, scales, g

    def conv(self, q, name, stride, pad, sin, sout, relu, res=None):
        wq, ws, shift = fold(self.P[name])
        m = (sin * ws).astype(np.float32)
        if self.g is not None:
            g = self.g
            acc = g.conv2d(q, g.constant(None, wq), stride=stride, padding=pad)
            y = g.add(g.mul(g.cast(acc, "float32"), m.reshape(-1, 1, 1)), shift.astype(np.float32).reshape(-1, 1, 1))
            if res is not None:
                y = g.add(y, g.dequantize(res[0], res[1], dtype="float32"))
            return g.quantize(g.relu(y) if relu else y, sout)
        acc = convref.conv2d(q, wq, None, stride, pad).astype(np.float32)
        y = acc * m.reshape(1, -1, 1, 1) + shift.astype(np.float32).reshape(1, -1, 1, 1)
        if res is not None:
            y = y + res[0].astype(np.float32) * np.float32(res[1])
        y = np.maximum(y, np.float32(0)) if relu else y
        return np.clip(np.rint(y / np.float32(sout)), -128, 127).astype(np.int8)

    def trunk(self, q):
        """The int8 image after the last block."""
        s, mp = self.s, (self.g.max_pool2d if self.g is not None else convref.max_pool2d)
        q = mp(self.conv(q, "stem", 1, 1, s["x"], s["stem"], True), 3, 2, 1)
        a = self.conv(q, "a1", 1, 1, s["stem"], s["a1"], True)
        q = self.conv(a, "a2", 1, 1, s["a1"], s["a2"], True, res=(q, s["stem"]))
        b = self.conv(q, "b1", 2, 1, s["a2"], s["b1"], True)
        p = self.conv(q, "bp", 2, 0, s["a2"], s["bp"], False)
        return self.conv(b, "b2", 1, 1, s["b1"], s["b2"], True, res=(p, s["bp"]))


def calibrate(P):
    """Per-tensor activation scales from the float network (BN folded) on the calibration images."""
    rng = np.random.default_rng(6)
    acts = {}

    def conv(x, name, stride, pad, relu, res=None):
        scale, shift = convref.bn_affine(*P[name]["bn"], eps=1e-5)
        w = P[name]["w"].astype(np.float64) * scale[:, None, None, None]
        y = convref.conv2d(x, w.astype(np.float32), None, stride, pad).astype(np.float64) + shift.reshape(1, -1, 1, 1)
        y = y + (res if res is not None else 0)
        y = np.maximum(y, 0) if relu else y
        acts[name] = max(acts.get(name, 0), np.abs(y).max())
        return y.astype(np.float32)
    for _ in range(CALIBRATION):
        x = rng.standard_normal((1, 3, HW, HW)).astype(np.float32)
        acts["x"] = max(acts.get("x", 0), np.abs(x).max())
        q = convref.max_pool2d(conv(x, "stem", 1, 1, True), 3, 2, 1)
        q = conv(conv(q, "a1", 1, 1, True), "a2", 1, 1, True, res=q)
        conv(conv(q, "b1", 2, 1, True), "b2", 1, 1, True, res=conv(q, "bp", 2, 0, False))
    return {k: float(np.float32(v / 127)) for k, v in acts.items()}


def test_tiny_resnet_int8():
    rng = np.random.default_rng(7)
    P = resnet_params(rng)
    s = calibrate(P)
    X = np.clip(np.rint(rng.standard_normal((1, 3, HW, HW)) / s["x"]), -128, 127).astype(np.int8)
    g = Graph("resnet8")
    out_q = Int8Net(P, s, g).trunk(g.input("x", X.shape, "int8"))
    g.output("trunk", out_q)
    feat = g.flatten(g.global_avg_pool2d(g.dequantize(out_q, s["b2"], dtype="float16")))
    g.output("logits", g.matmul(feat, g.constant(None, P["fc"])))
    out = run(g, {"x": X})
    ref = Int8Net(P, s).trunk(X)
    assert (out["trunk"] == ref).all()           # exact: int32 sums and the same float32 requantisation
    feat_ref = convref.global_avg_pool2d((ref.astype(np.float32) * np.float32(s["b2"])).astype(F16)).reshape(1, -1)
    logits = feat_ref.astype(np.float32) @ P["fc"].astype(np.float32)
    assert np.abs(out["logits"].astype(np.float32) - logits).max() <= 0.01 * np.abs(logits).max() + 0.01


def test_a_convolutions_image_is_placed_off_its_weights_slices():
    """The image a convolution's taps read, made by a kernel, keeps off the slices of the weights the
    planes load beside those reads (Compiler.weights_clear): a weight load reads one row of each of
    them a cycle, and an image row on one of them would make the load wait for a gap in the products."""
    from lpucore.compiler.lower import Compiler
    rng = np.random.default_rng(11)
    g = Graph("clear")
    acc = g.conv2d(g.input("x", (1, 8, 12, 12), "int8"), g.constant("w1", rand(rng, (16, 8, 3, 3), "int8")), padding=1)
    q = g.quantize(g.mul(g.cast(acc, "float32"), np.float32(2 ** -10)), 0.5)
    g.output("y", g.conv2d(q, g.constant("w2", rand(rng, (8, 16, 3, 3), "int8")), padding=1))
    c = Compiler(g, SMALL)
    c.run()
    checked = 0
    for n in c.g.nodes:
        if n.op == "conv_taps" and n.inputs[0] in c.g.producer:
            weights = c.slices_of(c.vts[n.inputs[1]])
            assert weights <= c.clear_hints[f"_t{n.inputs[0]}"]
            assert not c.slices_of(c.vts[n.inputs[0]]) & weights
            checked += 1
    assert checked == 1
