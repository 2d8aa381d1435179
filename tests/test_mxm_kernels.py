"""The fast engine's MXM kernels (``mxm_kernel``: "avx512", "avx2", "portable"): every kernel the
host runs gives the reference engine's bits, cycles, statistics and counters, with and without the
helper thread and the in-loop small-batch path; choosing and forcing a kernel."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lpucore import Chip, ChipConfig, LpuError
from lpucore.compiler import gemm_program
from lpucore.engine import MXM_KERNEL_ENV, MXM_KERNELS, mxm_kernels_available
from lpucore.testing import run_on

SMALL = ChipConfig.small()
KERNELS = mxm_kernels_available()
# (kernel, helper_threads, small_rows): the helper thread takes "avx512" and "avx2" batches of 16
# rows or more; "portable" multiplies batches of at most small_rows rows in C, the rest with BLAS
VARIANTS = [(k, h, s) for k in KERNELS for h, s in ([(0, 64), (1, 64)] if k != "portable" else [(1, 64), (1, 0)])]


def odd_config(superlanes, lanes):
    """A chip whose lanes are not a multiple of the kernels' column blocks (16 AVX2, 64 AVX-512)."""
    n = superlanes * lanes
    return dataclasses.replace(SMALL, name=f"lanes{n}", superlanes=superlanes, lanes_per_superlane=lanes, mxm_size=n)


def forced(kernel, helper=1, small=64):
    def factory(engine, config):
        chip = Chip(config, engine=engine)
        chip.set_engine_options(mxm_kernel=kernel, helper_threads=helper, small_rows=small)
        return chip
    return factory


def check_against_reference(g, A, B, variants=VARIANTS, exact=True):
    """Run the GEMM program on the reference engine and on the fast engine with each kernel variant:
    identical memory (so results), cycles, statistics and counters; and (``exact``: int32 results)
    the exact product."""
    def setup(chip):
        for name, arr in g.pack(A, B).items():
            chip.write_tensor(name, arr)
    ref = run_on("reference", g.program, setup)
    assert ref.error is None
    want = A.astype(np.int64) @ B.astype(np.int64)
    for kernel, helper, small in variants:
        out = run_on("fast", g.program, setup, factory=forced(kernel, helper, small))
        what = (kernel, helper, small)
        assert out.error is None, what
        assert out.cycle == ref.cycle and out.stats == ref.stats, what
        for k in ref.counters:
            assert np.array_equal(out.counters[k], ref.counters[k]), (what, k)
        assert np.array_equal(out.memory, ref.memory), what
    if exact:
        C, _ = g.run(A, B, chip=forced(*variants[0])("fast", g.program.config))
        assert np.array_equal(C.astype(np.int64), want)


def extremes(shape, r):
    """int8 operands dense in -128 and 127: sums of -128 x -128 products that saturate int16."""
    return r.choice(np.array([-128, -128, -128, 127, -127, 0, 1, -1], np.int8), shape)


@pytest.mark.parametrize("M,K,N", [(40, 150, 70), (3, 64, 64), (33, 320, 130)])
def test_every_kernel_matches_the_reference_engine_on_int8_gemms(M, K, N):
    r = np.random.default_rng(M)
    A = r.integers(-128, 128, (M, K)).astype(np.int8)
    B = r.integers(-128, 128, (K, N)).astype(np.int8)
    check_against_reference(gemm_program(M, K, N, "int8", "int32", config=SMALL), A, B)


@pytest.mark.parametrize("value", [-128, 127])
def test_every_kernel_is_exact_at_the_int8_extremes(value):
    """All -128 (or 127) against all -128: every pair of products is 2^15 (vpmaddubsw would
    saturate it), every column sum K 2^14; requantised to int8 too."""
    M, K, N = 20, 200, 80
    A = np.full((M, K), value, np.int8)
    B = np.full((K, N), -128, np.int8)
    B[:, 3] = 127
    check_against_reference(gemm_program(M, K, N, "int8", "int32", config=SMALL), A, B)
    check_against_reference(gemm_program(M, K, N, "int8", "int8", requant=(1 << 20, 30, 3), config=SMALL), A, B,
                            exact=False)


@pytest.mark.parametrize("superlanes,lanes", [(3, 6), (1, 10), (5, 6)])
def test_every_kernel_on_lane_counts_that_leave_partial_column_blocks(superlanes, lanes):
    cfg = odd_config(superlanes, lanes)
    r = np.random.default_rng(lanes)
    M, K, N = 30, 2 * cfg.lanes + 3, cfg.lanes + 5
    A, B = extremes((M, K), r), extremes((K, N), r)
    check_against_reference(gemm_program(M, K, N, "int8", "int32", config=cfg), A, B)


@settings(max_examples=10)
@given(M=st.integers(1, 40), K=st.integers(1, 140), N=st.integers(1, 140), seed=st.integers(0, 2 ** 32 - 1),
       dense_extremes=st.booleans())
def test_every_kernel_matches_the_reference_engine_on_random_int8_gemms(M, K, N, seed, dense_extremes):
    r = np.random.default_rng(seed)
    if dense_extremes:
        A, B = extremes((M, K), r), extremes((K, N), r)
    else:
        A = r.integers(-128, 128, (M, K)).astype(np.int8)
        B = r.integers(-128, 128, (K, N)).astype(np.int8)
    check_against_reference(gemm_program(M, K, N, "int8", "int32", config=SMALL), A, B)


@pytest.mark.parametrize("kernel", KERNELS)
def test_float16_batches_under_every_kernel_match_the_reference_engine(kernel):
    """The AVX2 kernel is int8 only: float16 batches take the portable paths, exactly."""
    r = np.random.default_rng(5)
    M, K, N = 24, 100, 70
    A = (r.standard_normal((M, K)) * 2).astype(np.float16)
    B = (r.standard_normal((K, N)) * 2).astype(np.float16)
    f16_matches_the_reference_engine(A, B, kernel, SMALL)


def f16_matches_the_reference_engine(A, B, kernel, cfg):
    """A float16 GEMM of A and B with float32 results on the reference engine and on the fast one with
    `kernel` forced: the same bits and statistics.  Returns the fast chip."""
    (M, K), N = A.shape, B.shape[1]
    g = gemm_program(M, K, N, "float16", "float32", config=cfg)
    want, st_ref = g.run(A, B, engine="reference")
    chip = forced(kernel)("fast", cfg)
    got, st_fast = g.run(A, B, chip=chip)
    assert st_ref.to_dict() == st_fast.to_dict()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    return chip


def f16_operands(kind, M, K, N, r):
    """float16 operands of the in-loop exact path's hard cases: dense, one-hot rows (the sparse
    path), zeros of both signs, sums that cancel to (nearly) nothing, an infinite weight."""
    A = (r.standard_normal((M, K)) * 2).astype(np.float16)
    B = (r.standard_normal((K, N)) * 2).astype(np.float16)
    if kind == "one_hot":
        A[:] = 0
        A[np.arange(M), r.integers(0, K, M)] = r.standard_normal(M).astype(np.float16)
        A[1] = -0.0
    elif kind == "cancel":
        B[1] = B[0]
        A[:, 1] = -A[:, 0]
        A[:, 2:] = np.float16(2.0 ** -14)          # the rest far below the cancelled pair's rounding
    elif kind == "inf":
        B[3, 2] = np.inf
    return A, B


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["dense", "one_hot", "cancel", "inf"])
@pytest.mark.parametrize("lanes", [None, (3, 6), (1, 10)])
def test_small_float16_batches_under_every_kernel_match_the_reference_engine(kernel, kind, lanes):
    """Batches of a few rows are multiplied in the cycle loop (AVX-512: the weights read from the byte
    planes, four rows a pass; otherwise converted once per install): the reference engine's bits either
    way, also on lane counts that leave a partial block of 16 columns."""
    cfg = SMALL if lanes is None else odd_config(*lanes)
    r = np.random.default_rng(11)
    A, B = f16_operands(kind, 3, min(100, cfg.lanes // 2), min(70, cfg.lanes), r)
    chip = f16_matches_the_reference_engine(A, B, kernel, cfg)
    assert chip.host_time["mxm_small_batches"] > 0 or kind == "inf"


def test_switching_kernels_on_a_loaded_chip_changes_nothing():
    """The kernels keep installed weights packed in their own layouts: a switch between runs
    (same chip, same program) must not reuse the other kernel's packing."""
    r = np.random.default_rng(9)
    M, K, N = 40, 130, 100
    A = r.integers(-128, 128, (M, K)).astype(np.int8)
    B = r.integers(-128, 128, (K, N)).astype(np.int8)
    g = gemm_program(M, K, N, "int8", "int32", config=SMALL)
    want = A.astype(np.int64) @ B.astype(np.int64)
    chip = Chip(SMALL)
    chip.set_engine_options(helper_threads=0, small_rows=0)
    first = None
    for kernel in list(KERNELS) + list(KERNELS[::-1]):
        chip.set_engine_options(mxm_kernel=kernel)
        small = chip.host_time["mxm_small_batches"]
        C, st_ = g.run(A, B, chip=chip)
        assert np.array_equal(C.astype(np.int64), want), kernel
        # "avx512" and "avx2" multiply every int8 batch in the loop, "portable" (small_rows=0) none
        assert (chip.host_time["mxm_small_batches"] > small) == (kernel != "portable")
        first = first or st_.to_dict()
        assert st_.to_dict() == first


def test_the_avx2_kernel_goes_to_the_helper_thread_and_survives_a_slow_one():
    if "avx2" not in KERNELS:
        pytest.skip("host has no AVX2")
    r = np.random.default_rng(2)
    M, K, N = 40, 320, 256                # many weight sets back to back: slots and buffers reused
    A, B = extremes((M, K), r), extremes((K, N), r)
    g = gemm_program(M, K, N, "int8", "int32", config=SMALL)
    chip = forced("avx2", helper=1, small=0)("fast", SMALL)
    chip.set_engine_options(helper_delay_us=2000)
    C, st1 = g.run(A, B, chip=chip)
    assert chip.host_time["mxm_helper_batches"] > 0
    assert np.array_equal(C.astype(np.int64), A.astype(np.int64) @ B.astype(np.int64))
    _, st0 = g.run(A, B, chip=forced("avx2", helper=0)("fast", SMALL))
    assert st0.to_dict() == st1.to_dict()


def test_kernel_names_and_default():
    assert set(KERNELS) <= set(MXM_KERNELS) and KERNELS[-1] == "portable"
    assert KERNELS == tuple(k for k in MXM_KERNELS if k in KERNELS)     # fastest first
    if os.environ.get(MXM_KERNEL_ENV):
        pytest.skip(f"${MXM_KERNEL_ENV} chooses the default")
    assert Chip(SMALL).engine_options()["mxm_kernel"] == KERNELS[0]
    with pytest.raises(LpuError, match="mxm_kernel must be one of 'avx512', 'avx2', 'portable'"):
        Chip(SMALL).set_engine_options(mxm_kernel="sse")


def test_a_host_without_the_vector_kernels_defaults_to_the_next_and_refuses_them():
    from lpucore import _engine
    if os.environ.get(MXM_KERNEL_ENV):
        pytest.skip(f"${MXM_KERNEL_ENV} chooses the default")
    try:
        _engine._hide_mxm_kernels(["avx512"])
        chip = Chip(SMALL)
        assert chip.engine_options()["mxm_kernel"] == ("avx2" if "avx2" in KERNELS else "portable")
        with pytest.raises(LpuError, match=r"mxm_kernel='avx512' needs a host with AVX-512"):
            chip.set_engine_options(mxm_kernel="avx512")
        _engine._hide_mxm_kernels(["avx512", "avx2"])
        chip = Chip(SMALL)
        assert chip.engine_options()["mxm_kernel"] == "portable"
        with pytest.raises(LpuError, match=r"mxm_kernel='avx2' needs a host with AVX2; .*runs: portable\)"):
            chip.set_engine_options(mxm_kernel="avx2")
    finally:
        _engine._hide_mxm_kernels([])
    assert Chip(SMALL).engine_options()["mxm_kernel"] == KERNELS[0]


def _in_child(code, kernel):
    env = dict(os.environ, **{MXM_KERNEL_ENV: kernel})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_environment_variable_forces_a_new_engines_kernel(kernel):
    p = _in_child("import lpucore; print(lpucore.Chip(lpucore.ChipConfig.small()).engine_options()['mxm_kernel'])",
                  kernel)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == kernel


def test_the_environment_variable_refuses_an_unknown_or_unavailable_kernel():
    code = ("import lpucore\n"
            "try:\n"
            "    lpucore.Chip(lpucore.ChipConfig.small())\n"
            "except lpucore.LpuError as e:\n"
            "    print('LpuError:', e)\n")
    p = _in_child(code, "avx")
    assert f"LpuError: ${MXM_KERNEL_ENV} must be one of" in p.stdout, p.stdout + p.stderr
    for k in MXM_KERNELS:
        if k not in KERNELS:
            p = _in_child(code, k)
            assert f"LpuError: ${MXM_KERNEL_ENV}={k!r} needs a host with" in p.stdout, p.stdout + p.stderr
