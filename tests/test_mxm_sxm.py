"""The MXM and the SXM, instruction by instruction, with exact timing, on both engines.

Tiny geometry: MXM W planes at position 0, SXM W at 1, MEM W2/W3 at 2, W0/W1 at 3,
VXM 4, E0/E1 5, E2/E3 6, SXM E 7, MXM E planes 8.  Delays: MEM read 2, MEM write 2,
IW install 3, ABC to accumulator 5, ACC to streams 3, SXM 4; fp16 ABC every 2 cycles.
"""

import dataclasses

import numpy as np
import pytest
from helpers import TINY, make_chip, run, schedule_error, timed

from lpucore import Chip, ChipConfig, LpuError, assemble, matmul
from lpucore.engine import avx512_available, mxm_kernels_available

L = TINY.lanes
POS = {f"W{i}": TINY.mem_position(0, i) for i in range(4)} | {f"E{i}": TINY.mem_position(1, i) for i in range(4)}


def rng(seed):
    return np.random.default_rng(seed)


def repeat_reads(ev, slice_, c, addr, stream, n):
    ev.setdefault(f"MEM.{slice_}", []).append((c, f"Read {addr}, {stream}"))
    if n > 1:
        ev[f"MEM.{slice_}"].append((c + 1, f"Repeat {n - 1}, 1, 1"))


def fold(ev):
    """timed() takes one event per cycle: merge the Repeat pseudo-events (cycle c+1)
    so that the queue's next real instruction is placed after the repetitions."""
    out = {}
    for q, evs in ev.items():
        lst = []
        skip_until = -1
        for c, ins in sorted(evs):
            if ins.startswith("Repeat"):
                n, d = int(ins.split()[1].rstrip(",")), int(ins.split()[2].rstrip(","))
                lst.append((c - 1, "__R" + ins))
                skip_until = c - 1 + n * d
                continue
            assert c > skip_until, (q, c, skip_until)
            lst.append((c, ins))
        out[q] = lst
    lines = []
    for q, evs in out.items():
        t = 0
        for c, ins in evs:
            if ins.startswith("__R"):
                lines.append(f"{q}: {ins[3:]}")
                n, d = int(ins.split()[1].rstrip(",")), int(ins.split()[2].rstrip(","))
                t = c + n * d + 1
                continue
            if c > t:
                lines.append(f"{q}: NOP {c - t}")
            lines.append(f"{q}: {ins}")
            t = c + 1
    return "\n".join(lines)


def int8_setup(L0=10, A0=20, rows=3, second_pass=False):
    r = rng(1)
    W = r.integers(-128, 128, (L, L)).astype(np.int8)
    X = r.integers(-128, 128, (rows, L)).astype(np.int8)
    ev, mem = {}, {}
    # weight rows k on stream W(k % 4) from slice W(k % 4), address 10 + k // 4
    for i in range(4):
        s = f"W{i}"
        repeat_reads(ev, s, L0 - 2 - POS[s], 10, f"W{i}", 4)
        for j in range(4):
            mem[(s, 10 + j)] = W[4 * j + i].view(np.uint8)
    ev["MXM.W0.LW"] = [(L0, "LW W0, 4, 0"), (L0 + 1, "Repeat 3, 1, 4"), (L0 + 4, "IW int8")]
    # activations on W4 from E0 (position 5): 7 cycles to the MXM
    repeat_reads(ev, "E0", A0 - 7, 20, "W4", rows)
    for m in range(rows):
        mem[("E0", 20 + m)] = X[m].view(np.uint8)
    ev["MXM.W0.ABC"] = [(A0, "ABC int8, W4, 0, 0"), (A0 + 1, f"Repeat {rows - 1}, 1, 1")]
    passes = 1
    if second_pass:
        repeat_reads(ev, "E1", A0 + rows - 7, 20, "W4", rows)
        for m in range(rows):
            mem[("E1", 20 + m)] = X[m].view(np.uint8)
        ev["MXM.W0.ABC"] += [(A0 + rows, "ABC int8, W4, 0, 1"), (A0 + rows + 1, f"Repeat {rows - 1}, 1, 1")]
        passes = 2
    last_land = A0 + passes * rows - 1 + 5
    C0 = last_land
    ev["MXM.W0.ACC"] = [(C0, "ACC 0, E4"), (C0 + 1, f"Repeat {rows - 1}, 1, 1")]
    # result byte planes E4..E7 reach W2/W3 (position 2) at C0 + 3 + 2, W0/W1 (3) at C0 + 6
    for b, s in enumerate(["W2", "W3", "W0", "W1"]):
        repeat_reads(ev, s, C0 + 3 + POS[s], 40, f"E{4 + b}", rows)
        ev[f"MEM.{s}"][-2] = (C0 + 3 + POS[s], f"Write 40, E{4 + b}")
        if rows > 1:
            ev[f"MEM.{s}"][-1] = (C0 + 3 + POS[s] + 1, f"Repeat {rows - 1}, 1, 1")
    return fold(ev), mem, W, X, passes


def read_int32(chip, rows, addr=40):
    planes = [chip.read_mem(s[0], int(s[1:]), addr, rows) for s in ["W2", "W3", "W0", "W1"]]
    return np.stack(planes, axis=-1).reshape(rows, L, 4).copy().view("<i4").reshape(rows, L)


@pytest.mark.parametrize("second_pass", [False, True])
def test_int8_matmul_and_accumulate(engine, second_pass):
    text, mem, W, X, passes = int8_setup(second_pass=second_pass)
    chip, st = run(engine, text, mem=mem)
    got = read_int32(chip, 3)
    want = passes * (X.astype(np.int64) @ W.astype(np.int64))
    assert np.array_equal(got, want.astype(np.int32))
    assert st.mxm_macs["W0"] == passes * 3 * L * L and st.mxm_busy_cycles["W0"] == passes * 3
    assert st.issued["MXM.W0.LW"] == 5 and st.issued["MXM.W0.ACC"] == 3
    assert st.mxm_peak_macs_per_cycle == L * L


def test_abc_before_the_install_lands(engine):
    text, mem, *_ = int8_setup(A0=16)            # IW at 14: weights usable from 17
    e = schedule_error(engine, text, mem=mem)
    assert (e.kind, e.cycle, e.unit) == ("mxm-no-weights", 16, "MXM.W0.ABC")


def test_weights_switch_exactly_at_install(engine):
    """A second IW at cycle 22 (usable from 25): the ABC at 24 uses the first weights,
    the ABC at 25 the second."""
    r = rng(9)
    W1 = r.integers(-128, 128, (L, L)).astype(np.int8)
    W2 = r.integers(-128, 128, (L, L)).astype(np.int8)
    X = r.integers(-128, 128, (2, L)).astype(np.int8)
    ev, mem = {}, {}
    for L0, W, base in ((10, W1, 10), (18, W2, 14)):
        for i in range(4):
            s = f"W{i}"
            repeat_reads(ev, s, L0 - 2 - POS[s], base, f"W{i}", 4)
            for j in range(4):
                mem[(s, base + j)] = W[4 * j + i].view(np.uint8)
    ev["MXM.W0.LW"] = [(10, "LW W0, 4, 0"), (11, "Repeat 3, 1, 4"), (14, "IW int8"),
                       (18, "LW W0, 4, 0"), (19, "Repeat 3, 1, 4"), (22, "IW int8")]
    repeat_reads(ev, "E0", 24 - 7, 20, "W4", 2)
    mem[("E0", 20)], mem[("E0", 21)] = X[0].view(np.uint8), X[1].view(np.uint8)
    ev["MXM.W0.ABC"] = [(24, "ABC int8, W4, 0, 0"), (25, "ABC int8, W4, 1, 0")]
    C0 = 25 + 5
    ev["MXM.W0.ACC"] = [(C0, "ACC 0, E4"), (C0 + 1, "Repeat 1, 1, 1")]
    for b, s in enumerate(["W2", "W3", "W0", "W1"]):
        ev[f"MEM.{s}"] += [(C0 + 3 + POS[s], f"Write 40, E{4 + b}"), (C0 + 4 + POS[s], "Repeat 1, 1, 1")]
    chip, _ = run(engine, fold(ev), mem=mem)
    got = read_int32(chip, 2)
    assert np.array_equal(got[0], (X[0].astype(np.int64) @ W1).astype(np.int32))
    assert np.array_equal(got[1], (X[1].astype(np.int64) @ W2).astype(np.int32))


def test_fp16_rate_and_dtype_rules(engine):
    ev = {"MXM.W0.LW": [(0, "IW float16")],
          "MEM.E0": [(3, "Read 0, W4"), (4, "Repeat 1, 1, 0")],
          "MEM.E1": [(3, "Read 0, W5"), (4, "Repeat 1, 1, 0")],
          "MXM.W0.ABC": [(10, "ABC float16, W4, 0, 0"), (11, "ABC float16, W4, 1, 0")]}
    e = schedule_error(engine, timed({k: [x for x in v if not x[1].startswith("Repeat")] for k, v in ev.items()}
                                     ).replace("MEM.E0: Read 0, W4", "MEM.E0: Read 0, W4\nMEM.E0: Repeat 1, 1, 0")
                       .replace("MEM.E1: Read 0, W5", "MEM.E1: Read 0, W5\nMEM.E1: Repeat 1, 1, 0"))
    assert (e.kind, e.cycle, e.unit) == ("mxm-busy", 11, "MXM.W0.ABC")
    text = ("MXM.W0.LW: IW float16\nMEM.E0: NOP 3\nMEM.E0: Read 0, W4\n"
            "MXM.W0.ABC: NOP 10\nMXM.W0.ABC: ABC int8, W4, 0, 0")
    e = schedule_error(engine, text)
    assert (e.kind, e.cycle) == ("mxm-dtype", 10)


def fp16_two_rows(W, X):
    """Program and memory: W (float16 [L/2, L]) installed on plane W0, the two rows of X
    (float16 [2, L/2]) multiplied in one batch, results at address 40 (read_int32)."""
    K = L // 2
    wb = W.view(np.uint16)
    rows = np.empty((L, L), np.uint8)
    rows[0::2] = (wb & 0xFF).astype(np.uint8)
    rows[1::2] = (wb >> 8).astype(np.uint8)
    ev, mem = {}, {}
    L0 = 10
    for i in range(4):
        s = f"W{i}"
        repeat_reads(ev, s, L0 - 2 - POS[s], 10, f"W{i}", 4)
        for j in range(4):
            mem[(s, 10 + j)] = rows[4 * j + i]
    ev["MXM.W0.LW"] = [(L0, "LW W0, 4, 0"), (L0 + 1, "Repeat 3, 1, 4"), (L0 + 4, "IW float16")]
    xb = np.zeros((2, L), np.uint16)
    xb[:, :K] = X.view(np.uint16)
    A0 = 20
    for m in range(2):
        mem[("E0", 20 + m)] = (xb[m] & 0xFF).astype(np.uint8)
        mem[("E1", 20 + m)] = (xb[m] >> 8).astype(np.uint8)
    ev["MEM.E0"] = [(A0 - 7, "Read 20, W4"), (A0 - 5, "Read 21, W4")]
    ev["MEM.E1"] = [(A0 - 7, "Read 20, W5"), (A0 - 5, "Read 21, W5")]
    ev["MXM.W0.ABC"] = [(A0, "ABC float16, W4, 0, 0"), (A0 + 2, "ABC float16, W4, 1, 0")]
    C0 = A0 + 2 + 5
    ev["MXM.W0.ACC"] = [(C0, "ACC 0, E4"), (C0 + 1, "ACC 1, E4")]
    for b, s in enumerate(["W2", "W3", "W0", "W1"]):
        ev.setdefault(f"MEM.{s}", []).extend([(C0 + 3 + POS[s], f"Write 40, E{4 + b}"),
                                             (C0 + 4 + POS[s], f"Write 41, E{4 + b}")])
    return fold(ev), mem


def test_fp16_matmul_is_exactly_rounded(engine):
    r = rng(5)
    K = L // 2
    W = (r.standard_normal((K, L)) * 4).astype(np.float16)
    X = (r.standard_normal((2, K)) * 4).astype(np.float16)
    X[1, :3] = [np.float16(6e-8), np.float16(-65504), np.float16(1e-3)]
    text, mem = fp16_two_rows(W, X)
    chip, st = run(engine, text, mem=mem)
    got = read_int32(chip, 2).view(np.float32)
    want = matmul.fp16_dot_exact(X, W)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert st.mxm_macs["W0"] == 2 * K * L and st.mxm_busy_cycles["W0"] == 4


def _fp16_case(name):
    r = rng(11)
    K = L // 2
    W = (r.standard_normal((K, L)) * 8).astype(np.float16)
    X = (r.standard_normal((2, K)) * 8).astype(np.float16)
    if name == "one-hot":                        # sparse rows: weights read in place
        X[:] = 0
        X[0, 3], X[1, K - 1] = 1, -2
    elif name == "subnormal":
        X[0] = np.float16(6e-8) * r.integers(-3, 4, K)
        W[:, 1] = np.float16(-6e-8)
    elif name == "cancel":                       # exact zero sums: the bound cannot settle them
        W[1::2] = W[0::2]
        X[:, 1::2] = -X[:, 0::2]
    elif name == "inf-weight":
        W[5, 2] = np.inf
        X[0, 5] = 0                              # 0 x inf is NaN even where x is zero
    elif name == "nan-activation":
        X[1, 0] = np.nan
    elif name == "huge":
        X[:] = np.float16(65504)
        W[:] = np.float16(-65504)
    return W, X


@pytest.mark.parametrize("case", ["dense", "one-hot", "subnormal", "cancel", "inf-weight", "nan-activation",
                                  "huge"])
def test_fp16_in_loop_kernels_match_the_host_path_and_the_reference(case):
    """The fast engine multiplies small batches in C (lpu_kernels.h) and hands the rest
    (and whatever its bound cannot settle) to the host: same bits either way, and the
    reference's."""
    W, X = _fp16_case(case)
    text, mem = fp16_two_rows(W, X)
    want = matmul.fp16_dot_exact(X, W)
    results = {}
    for engine, small in [("reference", None), ("fast", 32), ("fast", 0)]:
        chip = make_chip(engine, text, mem=mem)
        if small is not None:
            chip.set_engine_options(small_rows=small)
        chip.run()
        results[(engine, small)] = read_int32(chip, 2).view(np.uint32)
        if small is not None:
            batches = chip.host_time
            small_case = case in ("dense", "one-hot", "subnormal", "huge", "cancel")
            assert (batches["mxm_small_batches"] > 0) == (small > 0 and small_case)
    for got in results.values():
        assert np.array_equal(got, want.view(np.uint32)), case


INT8_KERNELS = [("avx512", 32), ("avx2", 32), ("portable", 32), ("portable", 0)]


@pytest.mark.parametrize("rows", [3, 13])
def test_int8_in_loop_kernels_match_the_host_path(rows):
    """int8 batches go to the VNNI or the AVX2 kernel (any size, where the host has it), to
    the portable C kernel (small batches) or to the host's BLAS: the same exact sums.
    13 rows: three full groups of the VNNI kernel's 4 rows (two of the AVX2 kernel's 6) and
    a remainder."""
    text, mem, W, X, _ = int8_setup(rows=rows)
    want = X.astype(np.int64) @ W.astype(np.int64)
    for kernel, small in INT8_KERNELS:
        if kernel not in mxm_kernels_available():
            continue
        chip = make_chip("fast", text, mem=mem)
        chip.set_engine_options(mxm_kernel=kernel)
        chip.set_engine_options(small_rows=small)
        chip.run()
        assert np.array_equal(read_int32(chip, rows), want), (kernel, small)
        assert (chip.host_time["mxm_small_batches"] > 0) == (kernel != "portable" or small > 0)
        assert (chip.host_time["mxm_batches"] > 0) == (kernel == "portable" and small == 0)
    with pytest.raises(LpuError, match="small_rows"):
        chip.set_engine_options(small_rows=-1)
    with pytest.raises(LpuError, match="mxm_kernel"):
        chip.set_engine_options(mxm_kernel="avx")


def test_mxm_kernel_avx512_is_refused_where_the_host_lacks_it():
    chip = make_chip("fast", "", mem={})
    if avx512_available():
        chip.set_engine_options(mxm_kernel="avx512")
        assert chip.engine_options()["mxm_kernel"] == "avx512"
    else:
        assert chip.engine_options()["mxm_kernel"] == mxm_kernels_available()[0]
        with pytest.raises(LpuError, match="AVX-512"):
            chip.set_engine_options(mxm_kernel="avx512")


def test_all_four_planes_reach_409600_macs_in_one_cycle(engine):
    cfg = ChipConfig.groqchip1()
    text = """
MXM.W0.LW: IW int8
MXM.W1.LW: IW int8
MXM.E0.LW: IW int8
MXM.E1.LW: IW int8
MEM.W0: Read 0, W0        ; position 12: at the West MXM (position 0) 2 + 12 cycles later
MEM.E0: Read 0, E0        ; position 14: at the East MXM (position 26) 2 + 12 cycles later
MXM.W0.ABC: NOP 14
MXM.W0.ABC: ABC int8, W0, 0, 0
MXM.W1.ABC: NOP 14
MXM.W1.ABC: ABC int8, W0, 0, 0
MXM.E0.ABC: NOP 14
MXM.E0.ABC: ABC int8, E0, 0, 0
MXM.E1.ABC: NOP 14
MXM.E1.ABC: ABC int8, E0, 0, 0
"""
    chip = Chip(cfg, engine=engine)
    chip.load(assemble(text))
    st = chip.run()
    assert st.mxm_peak_macs_per_cycle == 409_600 == st.mxm_peak_per_cycle
    assert st.macs == 409_600
    assert st.to_dict()["mxm_peak_macs_per_cycle"] == 409_600


# ---- SXM ---------------------------------------------------------------------------------------------
def sxm_run(engine, op_text, inputs, outputs, cfg=TINY, t=12):
    """inputs {westward stream index: vector} arrive at SXM W (position 1) at cycle t;
    outputs: eastward stream indices, written to MEM after sxm_delay.  Returns vectors."""
    ev, mem = {}, {}
    srcs = ["W0", "W1", "W2", "W3", "E0", "E1", "E2", "E3"]
    pos = {s: cfg.mem_position(0 if s[0] == "W" else 1, int(s[1:])) for s in srcs}
    sx = cfg.sxm_position(0)
    for (stream, vec), s in zip(sorted(inputs.items()), srcs):
        ev.setdefault(f"MEM.{s}", []).append((t - cfg.mem_read_delay - (pos[s] - sx), f"Read 1, W{stream}"))
        mem[(s, 1)] = vec
    ev["SXM.W0"] = [(t, op_text)]
    T = t + cfg.sxm_delay
    for stream, s in zip(outputs, srcs):
        ev.setdefault(f"MEM.{s}", []).append((T + pos[s] - sx, f"Write 2, E{stream}"))
    chip, st = run(engine, timed(ev), cfg, mem)
    return [chip.read_mem(s[0], int(s[1:]), 2)[0] for _, s in zip(outputs, srcs)], st


def test_shift(engine):
    x = rng(1).integers(1, 256, L).astype(np.uint8)
    for n in (3, -5, 0):
        (y,), _ = sxm_run(engine, f"Shift E0, W0, {n}", {0: x}, [0])
        want = np.zeros(L, np.uint8)
        if n >= 0:
            want[n:] = x[:L - n]
        else:
            want[:n] = x[-n:]
        assert np.array_equal(y, want)


def test_permute_any_lane_order(engine):
    x = rng(2).integers(0, 256, L).astype(np.uint8)
    perm = rng(3).permutation(L).astype(np.int16)
    perm[3] = -1                                   # out of range: zero
    perm[4] = L
    m = perm.view(np.uint16)
    (y,), st = sxm_run(engine, "Permute E0, W0, W2", {0: x, 2: (m & 0xFF).astype(np.uint8),
                                                      3: (m >> 8).astype(np.uint8)}, [0])
    want = np.array([x[p] if 0 <= p < L else 0 for p in perm], np.uint8)
    assert np.array_equal(y, want)
    assert st.by_unit["SXM"]["issued"] == 1


def test_distribute_within_superlanes(engine):
    x = rng(4).integers(0, 256, L).astype(np.uint8)
    n = TINY.lanes_per_superlane
    m = np.tile(np.array([0, 0, 7, 3, 200, 1, 1, 8], np.uint8), L // n)
    (y,), _ = sxm_run(engine, "Distribute E0, W0, W1", {0: x, 1: m}, [0])
    want = np.array([x[(ln // n) * n + m[ln]] if m[ln] < n else 0 for ln in range(L)], np.uint8)
    assert np.array_equal(y, want)


def test_transpose(engine):
    n = TINY.lanes_per_superlane                     # 8 streams x 8 lanes on tiny
    xs = {i: rng(10 + i).integers(0, 256, L).astype(np.uint8) for i in range(n)}
    ys, _ = sxm_run(engine, "Transpose E0, W0", xs, list(range(n)))
    for j in range(n):
        for sl in range(L // n):
            for i in range(n):
                assert ys[j][sl * n + i] == xs[i][sl * n + j]


def test_select(engine):
    a, b = rng(5).integers(0, 256, L).astype(np.uint8), rng(6).integers(0, 256, L).astype(np.uint8)
    m = (np.arange(L) % 3 == 0).astype(np.uint8) * 9
    (y,), _ = sxm_run(engine, "Select E0, W0, W1, W2", {0: a, 1: b, 2: m}, [0])
    assert np.array_equal(y, np.where(m != 0, a, b))


def test_rotate_on_a_16_stream_chip(engine):
    cfg = dataclasses.replace(TINY, name="t16", streams_per_direction=16)
    xs = {i: rng(20 + i).integers(0, 256, L).astype(np.uint8) for i in range(3)}
    ys, _ = sxm_run(engine, "Rotate E0, W0, 3", xs, list(range(8)), cfg=cfg)
    for k in range(8):
        i, j = divmod(k, 3)
        assert np.array_equal(ys[k], np.roll(xs[i], j))


def test_resource_limit_per_hemisphere(engine):
    text = """
MEM.W2: NOP 1
MEM.W2: Read 1, W0         ; all three reach the SXM (position 1) at cycle 4
MEM.W3: NOP 1
MEM.W3: Read 1, W2
MEM.W0: Read 1, W3
SXM.W0: NOP 4
SXM.W0: Permute E0, W0, W2
SXM.W1: NOP 4
SXM.W1: Permute E1, W0, W2
"""
    e = schedule_error(engine, text)
    assert (e.kind, e.cycle, e.unit) == ("resource", 4, "SXM.W1") and "permuters" in str(e)
    # two distributors in one cycle are within the budget of 4
    ok = text.replace("Permute E0, W0, W2", "Distribute E0, W0, W2")
    ok = ok.replace("Permute E1, W0, W2", "Distribute E1, W0, W2")
    run(engine, ok)
