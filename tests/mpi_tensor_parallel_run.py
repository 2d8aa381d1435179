"""Run by tests/test_mpi.py: an int8 two-layer MLP split over 4 chips (tensor parallelism), in one
process or, with --mpi, over the MPI processes; prints one JSON line from the process that has chip 0."""

import hashlib
import json
import sys

import numpy as np

from lpucore import ChipConfig, Graph
from lpucore.compiler.tensor_parallel import compile_system


def main(mpi: bool) -> None:
    cfg, P = ChipConfig.small(), 4
    wires = [(a, (b - a) % P - 1, b, (a - b) % P - 1) for a in range(P) for b in range(a + 1, P)]
    rng = np.random.default_rng(0)
    d, h = 64, 256
    w1 = rng.integers(-8, 8, (d, h)).astype(np.int8)
    w2 = rng.integers(-8, 8, (h, d)).astype(np.int8)
    x = rng.integers(-8, 8, (2, d)).astype(np.int8)
    g = Graph("mlp")
    hh = g.matmul(g.input("x", (2, d), "int8"), g.constant("w1", w1))
    g.output("y", g.matmul(g.cast(g.maximum(g.minimum(hh, 127), -128), "int8"), g.constant("w2", w2)))
    if mpi:
        from lpucore.mpi import System
    else:
        from lpucore import System
    system = System(P, topology=wires, config=cfg)
    sc = compile_system(g, system, min_cols=1)
    out, st = sc.run({"x": x}, system=system) if system.chips[0] is not None else (None, None)
    if system.chips[0] is None:            # this process does not hold chip 0: run its share
        sc.load(system)
        sc.write_inputs(system, {"x": x})
        system.run()
        return
    ref = np.clip(x.astype(np.int32) @ w1, -128, 127).astype(np.int32) @ w2.astype(np.int32)
    print(json.dumps({"cycles": st.cycles, "expected": sc.expected_cycles, "exact": bool(np.array_equal(out["y"], ref)),
                      "c2c_bytes": st.c2c_bytes, "digest": hashlib.sha1(out["y"].tobytes()).hexdigest(),
                      "processes": system.size}))


if __name__ == "__main__":
    main("--mpi" in sys.argv)
