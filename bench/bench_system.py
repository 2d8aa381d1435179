"""Systems benchmark: the relay (a block of vectors passed through every chip over the C2C
links) on a simulated GroqChip system, in one process and over MPI processes.

    python bench/bench_system.py [--topology rack] [--chips N] [--vectors 16] [--processes 2]

Runs ``python -m lpucore relay`` in this process (fast engine), then the same command under
``mpiexec -n PROCESSES ... --mpi`` (skipped, and said so, without mpi4py / mpiexec), and
prints the simulated figures (cycles, time, link bytes), each run's wall seconds, wall
seconds per simulated microsecond, the MPI run's speed-up over one process, and whether
the two runs agree (cycles and the digest of every chip's cycles and link traffic). The last
line is one JSON object.

(Issue #6's decode benchmark, Llama-2-7B on its system against the NumPy reference, needs the
multi-chip compiler, which is not built yet.)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _relay_args(a):
    args = ["relay", "--topology", a.topology, "--vectors", str(a.vectors), "--config", a.config]
    if a.chips:
        args += ["--chips", str(a.chips)]
    return args


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", default="rack", choices=("node", "rack", "dragonfly"))
    ap.add_argument("--chips", type=int, default=None)
    ap.add_argument("--vectors", type=int, default=16)
    ap.add_argument("--config", default="groqchip1")
    ap.add_argument("--processes", type=int, default=2)
    a = ap.parse_args(argv)

    from lpucore.cli import main as lpucore_main
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = lpucore_main(_relay_args(a))
    one_total = time.perf_counter() - t0
    if rc != 0:
        print(buf.getvalue())
        return rc
    one = json.loads(buf.getvalue().strip().splitlines()[-1])
    print(buf.getvalue().strip().splitlines()[0])
    out = dict(topology=a.topology, chips=one["chips"], vectors=a.vectors, hops=one["hops"], cycles=one["cycles"],
               simulated_seconds=one["simulated_seconds"], link_bytes=one["link_bytes"], windows=one["windows"],
               one_process_wall_seconds=one["wall_seconds"], one_process_total_seconds=one_total,
               wall_seconds_per_simulated_us=one["wall_seconds"] / (one["simulated_seconds"] * 1e6))
    exe = Path(sys.executable).parent / "mpiexec"
    exe = str(exe) if exe.exists() else shutil.which("mpiexec")
    if importlib.util.find_spec("mpi4py") is None:
        exe = None
    if exe is None or a.processes < 2:
        print("MPI run skipped: needs mpi4py and mpiexec (pip install -e '.[mpi]') and --processes >= 2")
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        t0 = time.perf_counter()
        r = subprocess.run([exe, "-n", str(a.processes), sys.executable, "-m", "lpucore", *_relay_args(a), "--mpi"],
                           capture_output=True, text=True, env=env)
        total = time.perf_counter() - t0
        if r.returncode != 0:
            print(r.stdout, r.stderr)
            return r.returncode
        many = json.loads(r.stdout.strip().splitlines()[-1])
        same = many["cycles"] == one["cycles"] and many["digest"] == one["digest"] and many["correct"]
        print(r.stdout.strip().splitlines()[0])
        print(f"{a.processes} processes: wall {many['wall_seconds']:.2f} s against {one['wall_seconds']:.2f} s in one "
              f"(speed-up {one['wall_seconds'] / many['wall_seconds']:.2f}); results "
              f"{'identical' if same else 'DIFFER'}")
        out.update(processes=a.processes, mpi_wall_seconds=many["wall_seconds"], mpi_total_seconds=total,
                   mpi_speedup=one["wall_seconds"] / many["wall_seconds"], mpi_identical=same)
    print(f"simulated: {one['cycles']:,} cycles = {one['simulated_seconds'] * 1e6:.1f} us; host: "
          f"{out['wall_seconds_per_simulated_us']:.3f} s of wall time per simulated us in one process")
    print(json.dumps(out))
    return 0 if out.get("mpi_identical", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
