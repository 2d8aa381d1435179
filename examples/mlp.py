"""A 2-layer MLP compiled for the simulated chip and checked against NumPy.

    python examples/mlp.py [--config groqchip1|small|tiny] [--engine fast|reference]

y = gelu(x @ W1 + b1) @ W2 + b2 with float16 weights and activations; the MXM
multiplies float16 exactly and accumulates in float32 (see docs/guide/mxm-sxm-gemm.md),
the VXM does the bias and GELU in float32 and rounds to float16 once per operation.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import lpucore


def build(batch: int, d_in: int, d_hidden: int, d_out: int, seed: int = 0):
    """The graph and its NumPy weights (fan-in scaled so activations stay O(1))."""
    r = np.random.default_rng(seed)
    w1 = (r.standard_normal((d_in, d_hidden)) / np.sqrt(d_in)).astype(np.float16)
    b1 = (0.1 * r.standard_normal(d_hidden)).astype(np.float16)
    w2 = (r.standard_normal((d_hidden, d_out)) / np.sqrt(d_hidden)).astype(np.float16)
    b2 = (0.1 * r.standard_normal(d_out)).astype(np.float16)
    g = lpucore.Graph("mlp")
    x = g.input("x", (batch, d_in), "float16")
    h = g.gelu(g.add(g.matmul(x, g.constant("w1", w1)), g.constant("b1", b1)))
    g.output("y", g.add(g.matmul(h, g.constant("w2", w2)), g.constant("b2", b2)))
    return g, dict(w1=w1, b1=b1, w2=w2, b2=b2)


def reference(x: np.ndarray, p: dict) -> np.ndarray:
    """The same MLP in float64."""

    def f(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float64)

    h = f(x) @ f(p["w1"]) + f(p["b1"])
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    return h @ f(p["w2"]) + f(p["b2"])


def run(config: lpucore.ChipConfig = None, engine: str = "fast", batch: int = 16, d_in: int = 384,
        d_hidden: int = 1024, d_out: int = 384, seed: int = 0, verbose: bool = True) -> dict:
    """Build, compile, run and check; returns the error and the run's figures."""
    cfg = config or lpucore.ChipConfig.groqchip1()
    g, p = build(batch, d_in, d_hidden, d_out, seed)
    t0 = time.perf_counter()
    prog = lpucore.compile(g, cfg)
    t1 = time.perf_counter()
    x = np.random.default_rng(seed + 1).standard_normal((batch, d_in)).astype(np.float16)
    out, stats = lpucore.execute(prog, {"x": x}, engine=engine)
    t2 = time.perf_counter()
    ref = reference(x, p)
    err = float(np.abs(out["y"].astype(np.float64) - ref).max())
    scale = float(np.abs(ref).max())
    res = dict(y=out["y"], max_abs_error=err, max_abs_ref=scale, cycles=stats.cycles,
               expected_cycles=prog.expected_cycles,
               compile_s=t1 - t0, run_s=t2 - t1, sram_bytes=prog.memory_bytes)
    if verbose:
        print(f"2-layer MLP {batch}x{d_in} -> {d_hidden} -> {d_out}, float16, on {cfg.name} ({engine} engine)")
        print(f"  compiled in {t1 - t0:.2f} s, ran in {t2 - t1:.2f} s")
        print(f"  {stats.cycles} cycles (predicted {prog.expected_cycles}) = "
              f"{stats.cycles / cfg.clock_hz * 1e6:.2f} us at {cfg.clock_hz / 1e6:.0f} MHz")
        print(f"  max |y - float64 reference| = {err:.2e} (max |y| = {scale:.2f})")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="groqchip1", choices=lpucore.ChipConfig.PRESETS)
    ap.add_argument("--engine", default="fast", choices=("fast", "reference"))
    a = ap.parse_args(argv)
    res = run(lpucore.ChipConfig.named(a.config), a.engine)
    ok = res["cycles"] == res["expected_cycles"] and res["max_abs_error"] <= 1e-2 * max(1.0, res["max_abs_ref"])
    print("  OK" if ok else "  MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
