#!/usr/bin/env python3
"""Two chips in two threads against the same two runs one after the other.

The fast engine's cycle loop runs without the GIL (`with nogil:` in FastEngine.run),
so chips in different threads simulate in parallel; only the Python glue between
loop segments (and MXM batch products, in NumPy) takes the GIL.  Each chip runs the
streaming program of bench_engine.py (every MEM slice and VXM ALU busy every cycle)
on the GroqChip geometry, or with --workload gemm an fp16 GEMM (MXM batches through
NumPy BLAS, which may itself use several threads).  Results of the threaded runs are
checked against the sequential ones.  Prints the speed-up; the last line is JSON.

    python bench/bench_threads.py [--cycles N] [--workload stream|gemm] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import threading
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

# below the path insert above, which makes bench/ importable
from bench_engine import streaming_program  # noqa: E402

import lpucore  # noqa: E402  (import order: after bench_engine)
from lpucore import Chip, ChipConfig  # noqa: E402  (import order: after bench_engine)


def make_jobs(workload: str, cycles: int):
    """Two independent (chip, run) jobs, each returning a result to compare."""
    cfg = ChipConfig.groqchip1()
    jobs = []
    if workload == "stream":
        prog = streaming_program(cfg, cycles)
        for seed in range(2):
            chip = Chip(cfg, engine="fast")
            chip.load(prog)
            data = np.random.default_rng(seed).integers(0, 256, (min(cycles, 8000), cfg.lanes), dtype=np.uint8)
            for s in range(cfg.mem_slices_per_hemisphere):
                chip.write_mem("W", s, 0, data)
            chip.run()                               # warm: map the SRAM pages once

            def job(chip=chip):
                chip.reset(clear_memory=False)
                st = chip.run()
                return st.to_dict(), chip.read_mem("E", 0, 0, 64)
            jobs.append(job)
    else:
        from lpucore.compiler import gemm_program
        g = gemm_program(512, 1024, 1024, "float16")
        for seed in range(2):
            r = np.random.default_rng(seed)
            A = r.standard_normal((512, 1024)).astype(np.float16)
            B = r.standard_normal((1024, 1024)).astype(np.float16)
            chip = Chip(cfg, engine="fast")
            g.run(A, B, chip=chip)

            def job(chip=chip, A=A, B=B):
                C, st = g.run(A, B, chip=chip)
                return st.to_dict(), C
            jobs.append(job)
    return jobs


def same(a, b):
    return a[0] == b[0] and np.array_equal(a[1], b[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=100_000, help="streaming cycles per chip")
    ap.add_argument("--workload", choices=["stream", "gemm"], default="stream")
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings")
    args = ap.parse_args(argv)
    jobs = make_jobs(args.workload, args.cycles)

    seq_best = thr_best = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        seq = [job() for job in jobs]
        seq_best = min(seq_best, time.perf_counter() - t0)

        res = [None] * len(jobs)

        def work(i, res=res):
            res[i] = jobs[i]()
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        thr_best = min(thr_best, time.perf_counter() - t0)
        assert all(same(a, b) for a, b in zip(seq, res)), "threaded runs differ from sequential runs"

    speedup = seq_best / thr_best
    cycles = seq[0][0]["cycles"]
    print(f"workload {args.workload}: 2 chips x {cycles:,} cycles on {os.cpu_count()} CPUs")
    print(f"  sequential: {seq_best:8.3f} s")
    print(f"  2 threads:  {thr_best:8.3f} s")
    print(f"  speed-up:   {speedup:8.2f}x (ideal 2.00x)")
    print(json.dumps({"lpucore": lpucore.__version__, "workload": args.workload, "cycles": cycles,
                      "cpus": os.cpu_count(), "sequential_s": seq_best, "threads_s": thr_best,
                      "speedup": speedup}))


if __name__ == "__main__":
    main()
