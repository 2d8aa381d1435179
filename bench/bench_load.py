#!/usr/bin/env python3
"""Program loading: instructions validated and lowered per second, Python path against the
compiled loader (lpucore.fastload), in one process.

Programs: GEMM shape (a) of bench_gemm.py (int8 [2304 x 4096] x [4096 x 4096], from the GEMM
generator), and a compiled GPT-2-small decode step (int8 weights, as bench_decode.py builds it).
For each, best of --reps:
  validate+lower   a program in memory checked from scratch (Program.validate) and lowered to the
                   engine's code table (Program.lower): what Chip.load does for a new program
  file             Program.from_bytes of its file (parse, build the instruction lists, validate)
                   and Program.lower: what loading a program from disk costs
Tensors: Chip.write_tensor / read_tensor of 4-16 MiB int8, float16 and int32 tensors against a
NumPy copy of the same bytes (goal: >= 2 GB/s and within 5x of the copy).
The paths must give byte-identical code tables. Goal: at least 10 M instructions/s (the issue's
127 k/s was the Python path on the 1.59 M-instruction GEMM of lpucore.ops). Last line: JSON.

    python bench/bench_load.py [--only tensors,gemm,gpt2] [--reps 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from contextlib import contextmanager

import numpy as np

from lpucore import ChipConfig, Program
from lpucore.compiler import gemm_program


@contextmanager
def python_path(on):
    """LPUCORE_FAST_LOAD=0 while on: the Python validator and lowering only."""
    old = os.environ.get("LPUCORE_FAST_LOAD")
    if on:
        os.environ["LPUCORE_FAST_LOAD"] = "0"
    try:
        yield
    finally:
        if on:
            if old is None:
                os.environ.pop("LPUCORE_FAST_LOAD", None)
            else:
                os.environ["LPUCORE_FAST_LOAD"] = old


def best(fn, reps):
    """(best wall seconds of reps calls, the last result)."""
    t, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        t = min(t, time.perf_counter() - t0)
    return t, out


def measure(name, program, reps):
    n = len(program)
    data = program.to_bytes()

    def validate_lower():
        program._checked = None            # forget the last validation: check from scratch
        program.validate()
        return program.lower()[0]

    def from_file():
        return Program.from_bytes(data).lower()[0]

    r = {"instructions": n, "file_bytes": len(data)}
    codes = []
    for path in ("python", "compiled"):
        with python_path(path == "python"):
            tv, code_v = best(validate_lower, reps if path == "compiled" else 1)
            tf, code_f = best(from_file, reps if path == "compiled" else 1)
        codes += [code_v, code_f]
        r[path] = {"validate_lower_s": tv, "validate_lower_per_s": n / tv, "file_s": tf, "file_per_s": n / tf}
    r["identical"] = all(np.array_equal(codes[0], c) for c in codes[1:])
    r["speedup_validate_lower"] = r["python"]["validate_lower_s"] / r["compiled"]["validate_lower_s"]
    r["speedup_file"] = r["python"]["file_s"] / r["compiled"]["file_s"]
    print(f"{name}: {n:,} instructions, file {len(data) / 1e6:.1f} MB; code tables identical: {r['identical']}")
    for path in ("python", "compiled"):
        x = r[path]
        print(f"    {path:8s} validate+lower {x['validate_lower_s']:.3f} s = "
              f"{x['validate_lower_per_s'] / 1e6:6.2f} M/s;"
              f"  from file {x['file_s']:.3f} s = {x['file_per_s'] / 1e6:6.2f} M/s")
    print(f"    speedup {r['speedup_validate_lower']:.0f}x (validate+lower), {r['speedup_file']:.0f}x (from file); "
          f"goal >= 10 M instructions/s", flush=True)
    return r


def gpt2_program():
    from lpucore.llm import Decoder
    dec = Decoder.random("gpt2", seed=0, precision="int8", capacity=32, config=ChipConfig.groqchip1())
    return dec.compile().program


def tensor_program(cfg):
    """Tensors of 4 to 16 MiB: int8 in extents, float16 in stripes, int32 (four planes) in extents."""
    p = Program(cfg)
    A, L = cfg.addresses_per_slice, cfg.lanes
    shapes = {"int8": (4096, 4096), "float16": (2048, 4096), "int32": (1024, 4096)}
    nxt = 0
    for name, shape in shapes.items():
        d = np.dtype(name)
        nvec = shape[0] * -(-shape[1] // L)
        planes = []
        for _ in range(d.itemsize):
            if name == "float16":                 # striped over 8 slices
                planes.append({"stripes": [[nxt + j, 0] for j in range(8)]})
                nxt += 8
            else:                                 # extents filling whole slices
                k = -(-nvec // A)
                planes.append([[nxt + j, 0, min(A, nvec - j * A)] for j in range(k)])
                nxt += k
        p.add_tensor(name, name, shape, planes)
    return p


def measure_tensors(reps):
    """write_tensor / read_tensor rates against a NumPy copy of the same bytes."""
    from lpucore import Chip
    cfg = ChipConfig.groqchip1()
    prog = tensor_program(cfg)
    out = {}
    rng = np.random.default_rng(0)
    for path in ("python", "compiled"):
        with python_path(path == "python"):
            chip = Chip(cfg)
            chip.load(prog)
            for name, t in prog.tensors.items():
                x = rng.integers(-100, 100, t.shape).astype(name)
                chip.write_tensor(name, x)                       # maps the SRAM pages
                tw, _ = best(functools.partial(chip.write_tensor, name, x), reps)
                tr, y = best(functools.partial(chip.read_tensor, name), reps)
                assert np.array_equal(x, y)
                tc, _ = best(x.copy, reps)
                out.setdefault(name, {"bytes": x.nbytes, "numpy_copy_gb_s": x.nbytes / tc / 1e9})
                out[name][path] = {"write_gb_s": x.nbytes / tw / 1e9, "read_gb_s": x.nbytes / tr / 1e9}
    print("tensors (GB/s; goal >= 2 and within 5x of a NumPy copy of the same bytes):")
    for name, r in out.items():
        print(f"    {name:8s} {r['bytes'] / 2**20:5.1f} MiB: NumPy copy {r['numpy_copy_gb_s']:5.2f}; "
              + "; ".join(f"{p} write {r[p]['write_gb_s']:5.2f} read {r[p]['read_gb_s']:5.2f}"
                          for p in ("python", "compiled")), flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="tensors,gemm,gpt2")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    out = {}
    for key in a.only.split(","):
        if key == "tensors":
            out[key] = measure_tensors(a.reps)
            continue
        t0 = time.perf_counter()
        prog = gemm_program(2304, 4096, 4096, "int8").program if key == "gemm" else gpt2_program()
        print(f"[{key}: built in {time.perf_counter() - t0:.1f} s]", flush=True)
        title = {"gemm": "GEMM (a) int8 2304 x 4096 x 4096", "gpt2": "GPT-2-small decode step (int8)"}[key]
        out[key] = measure(title, prog, a.reps)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
