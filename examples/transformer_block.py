"""One pre-LayerNorm transformer block compiled for the simulated chip and checked
against NumPy.

    python examples/transformer_block.py [--config groqchip1|small|tiny] [--engine fast|reference]

    h   = x + Wo · attention(LN1(x))          multi-head, causal mask, softmax in float32
    y   = h + W2 · gelu(W1 · LN2(h) + b1) + b2

Everything is float16 in MEM; the MXM multiplies float16 exactly and accumulates in
float32; the VXM computes LayerNorm, softmax and GELU in float32 and rounds to float16
once per graph operation.  The causal mask is a constant added to the scores (-30000
above the diagonal, which exp() turns into an exact 0).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import lpucore

MASKED = -30000.0          # fits float16; exp(MASKED - max) underflows to exactly 0


def build(seq: int, d_model: int, heads: int, d_ff: int, seed: int = 0):
    """The graph and its NumPy parameters."""
    if d_model % heads:
        raise ValueError(f"d_model {d_model} is not a multiple of heads {heads}")
    dh = d_model // heads
    r = np.random.default_rng(seed)

    def w(*shape, fan_in):
        return (r.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float16)
    p = dict(wq=w(d_model, d_model, fan_in=d_model), wk=w(d_model, d_model, fan_in=d_model),
             wv=w(d_model, d_model, fan_in=d_model), wo=w(d_model, d_model, fan_in=d_model),
             w1=w(d_model, d_ff, fan_in=d_model), w2=w(d_ff, d_model, fan_in=d_ff),
             b1=(0.1 * r.standard_normal(d_ff)).astype(np.float16),
             b2=(0.1 * r.standard_normal(d_model)).astype(np.float16),
             g1=(1 + 0.1 * r.standard_normal(d_model)).astype(np.float16),
             be1=(0.1 * r.standard_normal(d_model)).astype(np.float16),
             g2=(1 + 0.1 * r.standard_normal(d_model)).astype(np.float16),
             be2=(0.1 * r.standard_normal(d_model)).astype(np.float16))
    mask = np.triu(np.full((seq, seq), MASKED, np.float16), 1)

    g = lpucore.Graph("transformer_block")
    c = {k: g.constant(k, v) for k, v in p.items()}
    x = g.input("x", (seq, d_model), "float16")

    h1 = g.layernorm(x, c["g1"], c["be1"], eps=1e-5)

    def heads_of(t):                                  # [seq, d_model] -> [heads, seq, dh]
        return g.transpose(g.reshape(t, (seq, heads, dh)), (1, 0, 2))
    q = heads_of(g.matmul(h1, c["wq"]))
    k_t = g.transpose(g.reshape(g.matmul(h1, c["wk"]), (seq, heads, dh)), (1, 2, 0))   # [heads, dh, seq]
    v = heads_of(g.matmul(h1, c["wv"]))
    scores = g.add(g.mul(g.matmul(q, k_t), float(1 / np.sqrt(dh))), g.constant("mask", mask))
    att = g.matmul(g.softmax(scores), v)                                                # [heads, seq, dh]
    att = g.reshape(g.transpose(att, (1, 0, 2)), (seq, d_model))
    h = g.add(x, g.matmul(att, c["wo"]))

    h2 = g.layernorm(h, c["g2"], c["be2"], eps=1e-5)
    ff = g.gelu(g.add(g.matmul(h2, c["w1"]), c["b1"]))
    y = g.add(h, g.add(g.matmul(ff, c["w2"]), c["b2"]))
    g.output("y", y)
    return g, p, mask


def reference(x: np.ndarray, p: dict, mask: np.ndarray, heads: int) -> np.ndarray:
    """The same block in float64."""
    f = {k: v.astype(np.float64) for k, v in p.items()}
    x = x.astype(np.float64)
    seq, d = x.shape
    dh = d // heads

    def ln(t, gm, bt):
        mu = t.mean(-1, keepdims=True)
        var = ((t - mu) ** 2).mean(-1, keepdims=True)
        return (t - mu) / np.sqrt(var + 1e-5) * gm + bt
    h1 = ln(x, f["g1"], f["be1"])
    q, k, v = (np.transpose((h1 @ f[n]).reshape(seq, heads, dh), (1, 0, 2)) for n in ("wq", "wk", "wv"))
    s = q @ np.transpose(k, (0, 2, 1)) / np.sqrt(dh) + mask.astype(np.float64)
    e = np.exp(s - s.max(-1, keepdims=True))
    a = (e / e.sum(-1, keepdims=True)) @ v
    h = x + np.transpose(a, (1, 0, 2)).reshape(seq, d) @ f["wo"]
    z = ln(h, f["g2"], f["be2"]) @ f["w1"] + f["b1"]
    z = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
    return h + z @ f["w2"] + f["b2"]


def run(config: lpucore.ChipConfig = None, engine: str = "fast", seq: int = 32, d_model: int = 128, heads: int = 4,
        d_ff: int = 512, seed: int = 0, verbose: bool = True) -> dict:
    """Build, compile, run and check; returns the error and the run's figures."""
    cfg = config or lpucore.ChipConfig.groqchip1()
    g, p, mask = build(seq, d_model, heads, d_ff, seed)
    t0 = time.perf_counter()
    prog = lpucore.compile(g, cfg)
    t1 = time.perf_counter()
    x = np.random.default_rng(seed + 1).standard_normal((seq, d_model)).astype(np.float16)
    out, stats = lpucore.execute(prog, {"x": x}, engine=engine)
    t2 = time.perf_counter()
    ref = reference(x, p, mask, heads)
    err = float(np.abs(out["y"].astype(np.float64) - ref).max())
    scale = float(np.abs(ref).max())
    res = dict(y=out["y"], max_abs_error=err, max_abs_ref=scale, cycles=stats.cycles,
               expected_cycles=prog.expected_cycles,
               compile_s=t1 - t0, run_s=t2 - t1, sram_bytes=prog.memory_bytes)
    if verbose:
        print(f"transformer block: seq {seq}, d_model {d_model}, {heads} heads, d_ff {d_ff}, float16, "
              f"on {cfg.name} ({engine} engine)")
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
    ok = res["cycles"] == res["expected_cycles"] and res["max_abs_error"] <= 2e-2 * max(1.0, res["max_abs_ref"])
    print("  OK" if ok else "  MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
