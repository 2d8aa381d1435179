#!/usr/bin/env python3
"""GEMM on the simulated GroqChip against NumPy's float32 matmul, in one process.

Shapes (C[M, N] = A[M, K] x B[K, N]):
  (a) int8    [2304 x 4096] x [4096 x 4096]   (P22 reports >= 80% MXM utilisation)
  (b) float16 [1024 x 1024] x [1024 x 1024]   (fast engine, fp16_mxm "exact" and "fp32")
  (c) int8    [1 x 4096] x [4096 x 4096]      (a decode step)

For each: simulated cycles and time, MXM utilisation (busy plane-cycles, and useful
MACs / (cycles x 409,600)), host MACs per second of ``chip.run()`` (the simulation,
the best of --reps warm runs after a first that maps the SRAM pages) and, the headline, end
to end with the program cached (packing and writing the inputs, the run, reading and unpacking
the output; best of --reps; goals: at most 1.5x the run for (a) and (b) fp32, 3x for (c)), NumPy's float32 matmul of the
same operands (already converted; best of --reps) and the ratio lpucore / NumPy; then the same product
through ``lpucore.compile`` (cycles, schedule efficiency, compile time: the one GEMM path the compiler
issue asks for).  Last line: one JSON object.

    python bench/bench_gemm.py [--only a,b,c] [--reps 3] [--kernel avx512|avx2|portable]

--kernel forces the fast engine's MXM kernel (mxm_kernel; default: the fastest the host runs)
and adds, for each int8 shape, the forced kernel's run against NumPy's float32 matmul in a
child process started with OPENBLAS_CORETYPE=Haswell (OpenBLAS's AVX2 kernels, what a host
without AVX-512 runs; OpenBLAS reads the variable when it loads, hence the child).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

import lpucore
from lpucore import Chip, ChipConfig, Graph
from lpucore.compiler import gemm_program
from lpucore.compiler.bounds import graph_bounds

SHAPES = {"a": (2304, 4096, 4096, "int8"), "b": (1024, 1024, 1024, "float16"), "c": (1, 4096, 4096, "int8")}


def numpy_time(A, B, reps):
    a, b = A.astype(np.float32), B.astype(np.float32)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_bounds(M, K, N, dtype, out, cfg, cycles):
    """The bounds (lpucore.compiler.bounds) of C = A x B with A an input and B a constant."""
    g = Graph("gemm")
    a = g.input("a", (M, K), dtype)
    b = g.constant("b", np.zeros((K, N), dtype))
    g.output("c", g.matmul(a, b, out_dtype=out))
    return graph_bounds(g, cfg, cycles)


def bench(key, fp16_mxm="exact", reps=3, kernel=None):
    M, K, N, dtype = SHAPES[key]
    cfg = ChipConfig.groqchip1()
    rng = np.random.default_rng(0)
    if dtype == "int8":
        A = rng.integers(-128, 128, (M, K)).astype(np.int8)
        B = rng.integers(-128, 128, (K, N)).astype(np.int8)
    else:
        A = rng.standard_normal((M, K)).astype(np.float16)
        B = rng.standard_normal((K, N)).astype(np.float16)
    t0 = time.perf_counter()
    g = gemm_program(M, K, N, dtype)
    t_build = time.perf_counter() - t0
    chip = Chip(cfg, fp16_mxm=fp16_mxm)
    if kernel:
        chip.set_engine_options(mxm_kernel=kernel)
    t0 = time.perf_counter()
    chip.load(g.program)
    packed = g.pack(A, B)
    for name, arr in packed.items():
        chip.write_tensor(name, arr)
    t_in = time.perf_counter() - t0
    t0 = time.perf_counter()
    chip.run()                                 # first run: maps the SRAM pages it writes
    t_cold = time.perf_counter() - t0
    # warm calls, the best of `reps` (as NumPy's time below is its best of `reps`): end to end with the
    # program cached (loaded on this chip): pack and write the inputs (through the program's staging
    # buffers, as a driver would keep them), run, read and unpack the output (through kept read buffers,
    # into a new array as NumPy's result is)
    t_run = t_e2e = t_warm_in = t_out = float("inf")
    for _ in range(reps):
        chip.reset(clear_memory=False)
        t0 = time.perf_counter()
        g.write(chip, A, B)
        t1 = time.perf_counter()
        h0 = chip.host_time
        st = chip.run()
        t2 = time.perf_counter()
        h1 = chip.host_time
        C = g.read(chip)
        t3 = time.perf_counter()
        t_warm_in, t_out, t_e2e = min(t_warm_in, t1 - t0), min(t_out, t3 - t2), min(t_e2e, t3 - t0)
        if t2 - t1 < t_run:
            t_run, host0, host1 = t2 - t1, h0, h1
    if dtype == "int8":
        ok = bool(np.array_equal(C.astype(np.int64), A.astype(np.int64) @ B.astype(np.int64)))
    else:
        ref = A.astype(np.float64) @ B.astype(np.float64)
        ok = bool(np.allclose(C, ref, rtol=1e-4, atol=1e-3))
    t_np = numpy_time(A, B, reps if key != "c" else 20)
    macs = M * K * N
    bounds = gemm_bounds(M, K, N, dtype, g.out, cfg, st.cycles)
    r = {
        "shape": [M, K, N], "dtype": dtype, "fp16_mxm": fp16_mxm if dtype == "float16" else None,
        "mxm_kernel": chip.engine_options().get("mxm_kernel"),
        "helper_threads": chip.engine_options().get("helper_threads", 0),
        "helper_batches": host1.get("mxm_helper_batches", 0) - host0.get("mxm_helper_batches", 0),
        "correct": ok, "cycles": st.cycles, "predicted_cycles": g.expected_cycles,
        "simulated_seconds": st.seconds,
        "simulated_tops": 2 * macs / st.seconds / 1e12,
        "mxm_utilisation": st.mxm_utilisation,
        "mxm_useful_utilisation": macs / (st.cycles * cfg.mxm_planes * cfg.mxm_size ** 2),
        "build_s": t_build, "first_inputs_s": t_in, "inputs_s": t_warm_in, "run_cold_s": t_cold, "run_s": t_run,
        "outputs_s": t_out, "end_to_end_s": t_e2e, "end_to_end_over_run": t_e2e / t_run,
        "input_bytes": int(sum(a.nbytes for a in packed.values())), "output_bytes": int(C.nbytes),
        "run_loop_s": host1.get("loop_s", 0) - host0.get("loop_s", 0),
        "run_products_s": host1.get("mxm_products_s", 0) - host0.get("mxm_products_s", 0),
        "host_macs_per_s": macs / t_run,
        "end_to_end_macs_per_s": macs / t_e2e,
        "numpy_s": t_np, "numpy_macs_per_s": macs / t_np,
        "ratio_vs_numpy": t_np / t_run,
        "ratio_vs_numpy_end_to_end": t_np / t_e2e,
        "simulated_cycles_per_s": st.cycles / t_run,
        "bounds": bounds.as_dict(), "schedule_efficiency": bounds.efficiency,
    }
    label = (f"({key}) {dtype} [{M} x {K}] x [{K} x {N}]" + (f" fp16_mxm={fp16_mxm}" if dtype == "float16" else "")
             + f"  [MXM kernel {r['mxm_kernel']}, helper threads {r['helper_threads']}]")
    print(f"{label}\n    {st.cycles:,} cycles = {st.seconds * 1e6:,.1f} us simulated ({r['simulated_tops']:.0f} TOPS); "
          f"MXM busy {r['mxm_utilisation']:.1%}, useful {r['mxm_useful_utilisation']:.1%}; correct: {ok}\n"
          f"    bound {bounds.bound:,.0f} cycles ({bounds.binding}); schedule efficiency {bounds.efficiency:.1%}\n"
          f"    host: run {t_run:.3f} s, best of {reps} warm runs ({r['host_macs_per_s'] / 1e9:.1f} GMAC/s; "
          f"cycle loop {r['run_loop_s']:.3f} s, "
          f"MXM products {r['run_products_s']:.3f} s); NumPy {t_np:.4f} s ({r['numpy_macs_per_s'] / 1e9:.1f} GMAC/s)\n"
          f"    end to end (program cached; inputs {t_warm_in:.3f} s, run, outputs {t_out:.3f} s): {t_e2e:.3f} s = "
          f"{t_e2e / t_run:.2f} x the run; first call also builds {t_build:.2f} s and loads + writes {t_in:.2f} s\n"
          f"    lpucore / NumPy MAC rate: {r['ratio_vs_numpy_end_to_end']:.2f} end to end (headline), "
          f"{r['ratio_vs_numpy']:.2f} run alone")
    return r


def compiled_section(key, generator, reps=3):
    """The same product through ``lpucore.compile`` (the path ``lpucore.ops.matmul`` takes; a decode
    GEMV's weights as a constant, as a model's are): its cycles on the fast engine (= predicted),
    bound and schedule efficiency, compile time, a repeated ``lpucore.execute`` end to end (best of
    ``reps``), correctness; against ``generator`` (bench()'s result for the same shape)."""
    M, K, N, dtype = SHAPES[key]
    cfg = ChipConfig.groqchip1()
    A, B = int8_operands(key) if dtype == "int8" else fp16_operands(key)
    g = Graph(f"gemm-{key}")
    a = g.input("a", (M, K), dtype)
    b = g.constant("b", B) if M == 1 else g.input("b", (K, N), dtype)
    g.output("c", g.matmul(a, b, out_dtype="int32" if dtype == "int8" else "float32"))
    t0 = time.perf_counter()
    c = lpucore.compile(g, cfg)
    t_compile = time.perf_counter() - t0
    inputs = {"a": A} if M == 1 else {"a": A, "b": B}
    out, st = lpucore.execute(c, inputs)
    t_call = float("inf")           # a repeated call: the loaded chip is kept, so inputs, run, outputs
    for _ in range(reps):
        t0 = time.perf_counter()
        lpucore.execute(c, inputs)
        t_call = min(t_call, time.perf_counter() - t0)
    ref = A.astype(np.float64) @ B.astype(np.float64)
    ok = bool(np.array_equal(out["c"], ref) if dtype == "int8" else np.allclose(out["c"], ref, rtol=1e-4, atol=1e-3))
    b_ = c.bounds()
    print(f"    one GEMM path: lpucore.compile of the same product: {st.cycles:,} cycles (predicted "
          f"{c.expected_cycles:,}; generator {generator['cycles']:,}: {st.cycles / generator['cycles']:.3f}x), "
          f"schedule efficiency {b_.efficiency:.1%} of {b_.bound:,.0f} ({b_.binding}); compile {t_compile:.1f} s; "
          f"repeated lpucore.execute {t_call:.3f} s end to end (generator {generator['end_to_end_s']:.3f} s: "
          f"{t_call / generator['end_to_end_s']:.2f}x); correct: {ok}")
    return {"cycles": st.cycles, "predicted_cycles": c.expected_cycles, "schedule_efficiency": b_.efficiency,
            "compile_s": t_compile, "execute_s": t_call, "correct": ok}


def fp16_operands(key):
    """Shape ``key``'s float16 operands, as bench() draws them."""
    M, K, N, _ = SHAPES[key]
    rng = np.random.default_rng(0)
    return rng.standard_normal((M, K)).astype(np.float16), rng.standard_normal((K, N)).astype(np.float16)


def int8_operands(key):
    """Shape ``key``'s int8 operands, as bench() draws them (numpy_time converts them to float32)."""
    M, K, N, _ = SHAPES[key]
    rng = np.random.default_rng(0)
    A = rng.integers(-128, 128, (M, K)).astype(np.int8)
    B = rng.integers(-128, 128, (K, N)).astype(np.int8)
    return A, B


def haswell_numpy(key, reps):
    """NumPy's float32 matmul of shape ``key`` in a child process with OpenBLAS held to its
    Haswell (AVX2) kernels: {"numpy_s": best of reps, "coretype": what OpenBLAS says it runs}."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_L2_SIZE"}
    env["OPENBLAS_CORETYPE"] = "Haswell"
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--numpy-child", key, "--reps", str(reps)],
                       env=env, capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def openblas_coretype():
    """The kernel family OpenBLAS runs (openblas_get_corename through ctypes), or "unknown"."""
    import ctypes
    import glob
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), "..", "scipy_openblas*", "lib", "*.so*"))
    libs += glob.glob(os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs", "*openblas*.so*"))
    for lib in libs:
        try:
            dll = ctypes.CDLL(lib)
        except OSError:
            continue
        for fn in ("scipy_openblas_get_corename64_", "openblas_get_corename64_", "openblas_get_corename"):
            f = getattr(dll, fn, None)
            if f is not None:
                f.restype = ctypes.c_char_p
                return f().decode()
    return "unknown"


def forced_kernel_section(key, r, reps):
    """The forced kernel's run (r: bench()'s result) against NumPy float32 held to AVX2 kernels."""
    hw = haswell_numpy(key, reps)
    M, K, N = r["shape"]
    macs = M * K * N
    ratio = hw["numpy_s"] / r["run_s"]
    print(f"    forced MXM kernel {r['mxm_kernel']}: run {r['run_s']:.3f} s ({macs / r['run_s'] / 1e9:.1f} GMAC/s) vs "
          f"NumPy float32 with OPENBLAS_CORETYPE=Haswell (child process, OpenBLAS core {hw['coretype']}) "
          f"{hw['numpy_s']:.4f} s ({macs / hw['numpy_s'] / 1e9:.1f} GMAC/s): ratio {ratio:.2f}")
    return {"kernel": r["mxm_kernel"], "run_s": r["run_s"], "numpy_haswell_s": hw["numpy_s"],
            "numpy_haswell_coretype": hw["coretype"], "ratio_vs_numpy_haswell": ratio}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="a,b,c")
    ap.add_argument("--reps", type=int, default=3, help="warm runs of lpucore and of NumPy; each reports its best")
    ap.add_argument("--kernel", choices=("avx512", "avx2", "portable"), default=None,
                    help="force the MXM kernel; int8 shapes then also report it against NumPy held to AVX2 (Haswell)")
    ap.add_argument("--numpy-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.numpy_child:
        A, B = int8_operands(args.numpy_child)
        print(json.dumps({"numpy_s": numpy_time(A, B, args.reps), "coretype": openblas_coretype()}))
        return
    cfg = ChipConfig.groqchip1()
    print(f"chip {cfg.name} (config digest {cfg.digest()})")
    out = {"lpucore": lpucore.__version__, "config": cfg.name, "config_digest": cfg.digest(), "results": {}}
    for key in args.only.split(","):
        if SHAPES[key][3] == "float16":
            for mode in ("exact", "fp32"):
                out["results"][f"{key}_{mode}"] = bench(key, mode, args.reps)
            out["results"][f"{key}_exact"]["compiled"] = compiled_section(key, out["results"][f"{key}_exact"],
                                                                         args.reps)
        else:
            out["results"][key] = bench(key, reps=args.reps, kernel=args.kernel)
            out["results"][key]["compiled"] = compiled_section(key, out["results"][key], args.reps)
            if args.kernel:
                out["results"][key]["forced_kernel"] = forced_kernel_section(key, out["results"][key], args.reps)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
