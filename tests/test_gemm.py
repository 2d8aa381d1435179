"""The GEMM program generator: results against NumPy, predicted cycles, utilisation."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lpucore import ChipConfig, CompileError
from lpucore import dtypes as dt
from lpucore import matmul as mm
from lpucore.compiler import expected_cycles, gemm_program
from lpucore.testing import run_both

GROQ = ChipConfig.groqchip1()
SMALL = ChipConfig.small()


def operands(M, K, N, dtype, seed):
    r = np.random.default_rng(seed)
    if dtype == "int8":
        return r.integers(-128, 128, (M, K)).astype(np.int8), r.integers(-128, 128, (K, N)).astype(np.int8)
    A = (r.standard_normal((M, K)) * 2).astype(np.float16)
    B = (r.standard_normal((K, N)) * 2).astype(np.float16)
    return A, B


def reference(A, B, out, cfg, requant=(1, 0, 0)):
    """The MXM contract, independently of the engines: exact int8; float16 products
    exactly rounded per K-chunk of lanes/2 and accumulated in float32 in chunk order."""
    if A.dtype == np.int8:
        C = A.astype(np.int64) @ B.astype(np.int64)
        if out == "int32":
            return C.astype(np.int32)
        mult, shift, zp = requant
        q = [[min(127, max(-128, round(Fraction(int(v) * mult, 2 ** shift)) + zp)) for v in row] for row in C]
        return np.array(q, dtype=np.int8)
    Kc = cfg.lanes // 2
    acc = None
    for k0 in range(0, A.shape[1], Kc):
        part = mm.fp16_dot_exact(A[:, k0:k0 + Kc], B[k0:k0 + Kc])
        acc = part if acc is None else (acc + part).astype(np.float32)
    return acc if out == "float32" else acc.astype(np.float16)


def same(C, R):
    if C.dtype.kind == "f":
        return np.array_equal(C.view(np.uint8), R.view(np.uint8)) or (
            np.array_equal(np.isnan(C), np.isnan(R)) and np.array_equal(C[~np.isnan(C)], R[~np.isnan(R)]))
    return np.array_equal(C, R)


@settings(max_examples=8)
@given(st.integers(1, 40), st.integers(1, 700), st.integers(1, 700), st.sampled_from(
    [("int8", "int32"), ("int8", "int8"), ("float16", "float32"), ("float16", "float16")]), st.integers(0, 99))
def test_groqchip_gemms_of_random_shapes(M, K, N, kinds, seed):
    dtype, out = kinds
    requant = (1 << 20, 27, -5)
    g = gemm_program(M, K, N, dtype, out, requant=requant)
    A, B = operands(M, K, N, dtype, seed)
    C, st_ = g.run(A, B, engine="fast")
    assert C.shape == (M, N) and C.dtype == dt.get(out).numpy
    assert same(C, reference(A, B, out, GROQ, requant))
    assert st_.cycles == g.expected_cycles == expected_cycles(g.program)
    assert st_.finished


@pytest.mark.parametrize("kinds", [("int8", "int32"), ("int8", "int8"), ("float16", "float32"), ("float16", "float16")])
def test_both_engines_agree_on_gemms(kinds):
    dtype, out = kinds
    g = gemm_program(37, 150, 130, dtype, out, requant=(3 << 14, 22, 7), config=SMALL)
    A, B = operands(37, 150, 130, dtype, 3)

    def setup(chip):
        for name, arr in g.pack(A, B).items():
            chip.write_tensor(name, arr)
    assert run_both(g.program, setup) == []
    C, _ = g.run(A, B, engine="reference")
    assert same(C, reference(A, B, out, SMALL, (3 << 14, 22, 7)))


def test_int8_exact_at_the_extremes_and_multiple_tiles():
    M, K, N = 3, 700, 650          # three K chunks, three column tiles (one partial)
    A = np.full((M, K), -128, np.int8)
    B = np.full((K, N), -128, np.int8)
    B[:, 5] = 127
    C, _ = gemm_program(M, K, N).run(A, B)
    assert C[0, 0] == 700 * 128 * 128 and C[0, 5] == -700 * 128 * 127
    assert np.array_equal(C, (A.astype(np.int64) @ B.astype(np.int64)).astype(np.int32))


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_staged_writes_and_buffered_reads_give_each_calls_product(dtype):
    """GemmProgram.write packs into staging buffers it keeps (their padding written once, zero), so a
    second product with other operands, of other values, is exact too; pack() still returns new arrays;
    unpack reads through kept buffers into a new C each call."""
    from lpucore import Chip
    M, K, N = 5, 2 * SMALL.lanes + 9, 3 * SMALL.lanes + 7           # partial K chunk and column tile
    g = gemm_program(M, K, N, dtype, config=SMALL)
    chip = Chip(SMALL)
    chip.load(g.program)
    results = []
    for seed in (1, 2):
        A, B = operands(M, K, N, dtype, seed)
        chip.reset(clear_memory=False)
        g.write(chip, A, B)
        chip.run()
        C = g.read(chip)
        assert same(C, reference(A, B, g.out, SMALL)) and np.array_equal(C, g.unpack(chip))
        results.append(C)
    assert results[0] is not results[1] and not np.array_equal(results[0], results[1])
    packed = g.pack(*operands(M, K, N, dtype, 3))
    assert all(arr is not buf for arr in packed.values() for buf in g._staging.values())


def test_staged_writes_and_reads_from_two_threads_take_turns():
    """Two chips sharing one GemmProgram in two threads: write and read hold its lock, so neither thread
    sees the other's operands or results in the shared buffers."""
    import threading

    from lpucore import Chip
    M, K, N = 4, SMALL.lanes + 3, 2 * SMALL.lanes
    g = gemm_program(M, K, N, "int8", config=SMALL)
    bad = []

    def work(seed):
        chip = Chip(SMALL)
        chip.load(g.program)
        for i in range(6):
            A, B = operands(M, K, N, "int8", 10 * seed + i)
            chip.reset(clear_memory=False)
            g.write(chip, A, B)
            chip.run()
            if not same(g.read(chip), reference(A, B, g.out, SMALL)):
                bad.append((seed, i))
    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []


def test_read_tensor_into_a_buffer_checks_it():
    from lpucore import Chip, Program, TensorError
    prog = Program(SMALL)
    prog.add_tensor("t", "int32", (2, 70), [[(0, 1, 4)], [(1, 1, 4)], [(2, 1, 4)], [(3, 1, 4)]])
    chip = Chip(SMALL)
    chip.load(prog)
    x = np.arange(140, dtype=np.int32).reshape(2, 70)
    chip.write_tensor("t", x)
    buf = np.empty((2, 70), np.int32)
    assert chip.read_tensor("t", out=buf) is buf and np.array_equal(buf, x)
    for bad in (np.empty((2, 71), np.int32), np.empty((2, 70), np.int64), np.empty((70, 2), np.int32).T,
                [[0] * 70] * 2):
        with pytest.raises(TensorError, match="out="):
            chip.read_tensor("t", out=bad)


def test_fp16_fast_mode_within_its_bound():
    A, B = operands(20, 600, 330, "float16", 4)
    g = gemm_program(20, 600, 330, "float16", "float32")
    exact, st1 = g.run(A, B)
    fast, st2 = g.run(A, B, fp16_mxm="fp32")
    assert st1.to_dict() == st2.to_dict()
    # per 160-element chunk: (K-1) * 2**-24 * sum|a b| + half an ulp, four chunks accumulated
    absprod = np.abs(A.astype(np.float64)) @ np.abs(B.astype(np.float64))
    bound = 4 * (159 * 2.0 ** -24 * absprod + np.spacing(np.abs(exact)))
    assert (np.abs(fast.astype(np.float64) - exact) <= bound).all()


def test_decode_shape_uses_both_hemispheres_and_is_weight_bound():
    g = gemm_program(1, 4096, 4096)
    hem = g.plan["hemispheres"]
    assert hem[0]["rows"] == hem[1]["rows"] == 1 and hem[0]["tiles"] + hem[1]["tiles"] == 13
    A, B = operands(1, 4096, 4096, "int8", 5)
    C, st_ = g.run(A, B)
    assert np.array_equal(C, (A.astype(np.int64) @ B.astype(np.int64)).astype(np.int32))
    # 16 MiB of weights through 4 planes x 15 streams x 320 B a cycle
    assert st_.cycles >= 4096 * 4096 / (4 * 15 * 320)


def test_large_gemm_keeps_the_mxm_busy():
    M, K, N = 1152, 1280, 1280
    g = gemm_program(M, K, N)
    A, B = operands(M, K, N, "int8", 6)
    C, st_ = g.run(A, B)
    assert np.array_equal(C, (A.astype(np.float32) @ B.astype(np.float32)).astype(np.int32))
    assert st_.mxm_peak_macs_per_cycle == 409_600
    assert st_.mxm_utilisation > 0.8 and g.useful_macs / (st_.cycles * 409_600) > 0.8


def test_gemm_errors():
    with pytest.raises(CompileError, match="does not fit"):
        gemm_program(4, 20, 20, config=ChipConfig.tiny())
    with pytest.raises(CompileError, match="int8 or float16"):
        gemm_program(4, 20, 20, dtype="int16")
    with pytest.raises(CompileError, match="gives"):
        gemm_program(4, 20, 20, dtype="int8", out="float32")
    with pytest.raises(CompileError, match="positive"):
        gemm_program(0, 20, 20)
    g = gemm_program(4, 20, 20)
    with pytest.raises(CompileError, match="built for"):
        g.pack(np.zeros((4, 21), np.int8), np.zeros((21, 20), np.int8))
    with pytest.raises(CompileError, match="does not fit"):
        gemm_program(60000, 8000, 8000)


# float16 values of every kind: normal, subnormal, zero of both signs, the largest, infinities, NaN
F16_SPECIALS = np.array([0.0, -0.0, 6e-8, -6e-8, 3e-5, 65504.0, -65504.0, np.inf, -np.inf, np.nan], np.float16)


@st.composite
def fp16_gemm_case(draw):
    M, K, N = draw(st.integers(1, 12)), draw(st.integers(1, 80)), draw(st.integers(1, 80))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    r = np.random.default_rng(seed)

    def matrix(shape):
        x = (r.standard_normal(shape) * 4).astype(np.float16)
        kind = draw(st.sampled_from(["normal", "specials", "huge", "tiny"]))
        if kind == "specials":
            mask = r.random(shape) < draw(st.sampled_from([0.01, 0.1]))
            x[mask] = r.choice(F16_SPECIALS, size=int(mask.sum()))
        elif kind == "huge":
            x = (r.choice([-1, 1], shape) * r.uniform(1e4, 65504, shape)).astype(np.float16)
        elif kind == "tiny":
            x = (r.integers(-1023, 1024, shape) * 2.0 ** -24).astype(np.float16)     # subnormals
        return x

    A, B = matrix((M, K)), matrix((K, N))
    # all-zero last rows / columns of B: weights the AVX-512 kernel may skip, unless an
    # activation meeting them is an infinity or a NaN
    zr, zc = draw(st.integers(0, K)), draw(st.integers(0, N))
    B[K - zr:] = 0
    B[:, N - zc:] = 0
    if draw(st.booleans()):
        A[r.integers(M), r.integers(K)] = draw(st.sampled_from([np.inf, -np.inf, np.nan]))
    return A, B


@pytest.mark.parametrize("kernel", ["avx512", "portable"])
@given(case=fp16_gemm_case())
@settings(max_examples=20)
def test_fp16_fast_mode_bound_over_special_values(kernel, case):
    """fp16_mxm="fp32" against the exact mode (bit-identical to the reference engine):
    the same infinities and NaNs, and finite results within
    nK ((Kc + 3) 2**-24 sum|a b| + ulp): per chunk the float32 sum's (Kc - 1) 2**-24 sum|a b|
    and the partial sum's rounding, nK chunks accumulated.  K and N that are not multiples
    of the chunk exercise the AVX-512 kernel's skipping of all-zero weight padding, which
    must not skip an infinity or NaN activation (times zero: NaN)."""
    from lpucore import Chip
    from lpucore.engine import avx512_available
    if kernel == "avx512" and not avx512_available():
        pytest.skip("host has no AVX-512 VNNI")
    A, B = case
    M, K = A.shape
    N = B.shape[1]
    g = gemm_program(M, K, N, "float16", "float32", config=SMALL)
    exact, st1 = g.run(A, B)
    chip = Chip(SMALL, fp16_mxm="fp32")
    chip.set_engine_options(mxm_kernel=kernel)
    chip.set_engine_options(small_rows=0)           # the portable path's BLAS, as a GEMM's batches take
    fast, st2 = g.run(A, B, chip=chip)
    assert st1.to_dict() == st2.to_dict()
    finite = np.isfinite(exact)
    assert np.array_equal(np.isnan(fast), np.isnan(exact))
    assert np.array_equal(fast[np.isinf(exact)], exact[np.isinf(exact)])
    Kc = SMALL.lanes // 2
    nK = -(-K // Kc)
    with np.errstate(invalid="ignore", over="ignore"):
        absprod = np.abs(A.astype(np.float64)) @ np.abs(B.astype(np.float64))
    bound = nK * ((Kc + 3) * 2.0 ** -24 * absprod + np.spacing(np.abs(exact).astype(np.float32)))
    err = np.abs(fast[finite].astype(np.float64) - exact[finite].astype(np.float64))
    assert (err <= bound[finite]).all()


def _helper_runs(dtype, helper, M=48, K=150, N=70, delay_us=0, kernel="avx512"):
    from lpucore import Chip
    A, B = operands(M, K, N, dtype, seed=7)
    out = "int32" if dtype == "int8" else "float32"
    g = gemm_program(M, K, N, dtype, out, config=SMALL)
    chip = Chip(SMALL, fp16_mxm="fp32")
    chip.set_engine_options(mxm_kernel=kernel)
    chip.set_engine_options(small_rows=0)
    chip.set_engine_options(helper_threads=helper)
    chip.set_engine_options(helper_delay_us=delay_us)
    C, st_ = g.run(A, B, chip=chip)
    return C, st_.to_dict(), chip.host_time["mxm_helper_batches"], A, B


@pytest.mark.parametrize("dtype,kernel", [("int8", "avx512"), ("float16", "avx512"), ("int8", "avx2")])
@pytest.mark.parametrize("shape,delay_us", [((48, 150, 70), 0), ((40, 320, 256), 0), ((40, 320, 256), 2000)])
def test_helper_thread_changes_nothing_but_who_multiplies(dtype, kernel, shape, delay_us):
    """Big MXM batches go to the helper thread (AVX-512 kernels, and the AVX2 kernel's
    int8): results, cycles and statistics are those of the same run with helper_threads=0.
    The second shape installs many weight sets back to back, so LW rewrites slots and
    batches reuse staging buffers that jobs read moments before; with a slow helper
    (delay_us), a loop that did not wait for them would corrupt the jobs' inputs."""
    from lpucore.engine import mxm_kernels_available
    if kernel not in mxm_kernels_available():
        pytest.skip(f"the host cannot run mxm_kernel={kernel!r}")
    C0, s0, h0, A, B = _helper_runs(dtype, 0, *shape, kernel=kernel)
    C1, s1, h1, _, _ = _helper_runs(dtype, 1, *shape, delay_us=delay_us, kernel=kernel)
    assert h0 == 0 and h1 > 0
    assert s0 == s1
    assert np.array_equal(C0.view(np.uint32), C1.view(np.uint32))
    if dtype == "int8":
        assert np.array_equal(C1, A.astype(np.int64) @ B.astype(np.int64))
    from lpucore import Chip, LpuError
    with pytest.raises(LpuError, match="helper_threads"):
        Chip(SMALL).set_engine_options(helper_threads=2)


def test_helper_thread_survives_a_fork():
    """A process forked after the parent's helper thread started gets a thread of its own
    (the parent's did not come along), not a hang."""
    import multiprocessing as mp
    import sys

    from lpucore.engine import mxm_kernels_available
    if mxm_kernels_available()[0] == "portable" or sys.platform != "linux":
        pytest.skip("needs the AVX-512 or AVX2 kernels (the helper thread) and fork")
    from lpucore import Chip
    A, B = operands(48, 150, 70, "int8", seed=7)
    g = gemm_program(48, 150, 70, "int8", "int32", config=SMALL)
    chip = Chip(SMALL)
    chip.set_engine_options(small_rows=0)
    g.run(A, B, chip=chip)
    assert chip.host_time["mxm_helper_batches"] > 0
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_reuse, args=(q, chip, g, A, B))
    p.start()
    ok, h = q.get(timeout=120)
    p.join(60)
    assert ok and h > 0 and p.exitcode == 0


def _child_reuse(q, chip, g, A, B):
    """In the child: the parent's chip (its pool copied, thread absent) runs again."""
    h0 = chip.host_time["mxm_helper_batches"]
    C, _ = g.run(A, B, chip=chip)
    q.put((np.array_equal(C, A.astype(np.int64) @ B.astype(np.int64)), chip.host_time["mxm_helper_batches"] - h0))
