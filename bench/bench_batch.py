"""Batched decode benchmark: the latency / throughput curve of B sequences sharing one step program.

    python bench/bench_batch.py [--batches 1,2,4,8,16,32] [--capacity 32] [--tokens 4] [--llama 1,8,32]
                                [--plot curve.png]

GPT-2-small (int8, random weights) on one simulated GroqChip: for each B that fits (weights and B KV caches of
``--capacity`` positions; a B that does not fit prints how many chips it needs and the sweep stops), B one-token
prompts generate ``--tokens`` greedy tokens each with :meth:`lpucore.llm.Decoder.generate` (fast engine); every
row's tokens are checked against the NumPy reference decoding that sequence alone. Printed per B: cycles per
step (simulated), tokens/s per user, tokens/s aggregate (B rows decoding), MXM utilisation, SRAM.

``--llama``: Llama-2-7B (int8) on its 66 chips (one unit per chip: embedding, 32 x attention, 32 x MLP, head,
as :func:`lpucore.llm.pipeline.plan_stages` cuts it). The whole model is too slow to run, so the figures are
*derived*: the batched step programs of the embedding, of layer 1's attention and MLP and of the head are compiled
with B rows and each simulated for one step (random inputs; cycles do not depend on the data); the model's step
is embedding + 32 x (attention + MLP) + head + 65 hand-overs of the [B, 4096] float32 residual (each hand-over
simulated once). One batch in flight: per-user tokens/s = clock / step, aggregate = B x that.
The last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from lpucore import ChipConfig
from lpucore.errors import LpuError, ModelDoesNotFit
from lpucore.llm import Decoder
from lpucore.llm.batch import batch_fit


def gpt2_point(dec: Decoder, B: int, tokens: int) -> dict:
    """Generate ``tokens`` for B one-token prompts; the figures of the batch (see the module docstring)."""
    prompts = [[100 + 7 * b] for b in range(B)]
    t0 = time.perf_counter()
    prog = dec.batch_program(B)
    compile_s = time.perf_counter() - t0
    res = dec.generate(prompts, max_new_tokens=tokens)
    st = res.stats
    same = all(np.array_equal(r.tokens, dec.reference().generate(p, tokens)[0]) for p, r in zip(prompts, res))
    out = dict(batch=B, step_cycles=st.step_cycles, step_us=st.step_seconds * 1e6,
               tokens_per_second_per_user=st.tokens_per_second_per_user,
               tokens_per_second_aggregate=st.peak_tokens_per_second, mxm_utilisation=st.mxm_utilisation,
               sram_mb=st.sram_bytes / 1e6, kv_cache_mb=st.kv_cache_bytes / 1e6, compile_seconds=compile_s,
               simulate_seconds_per_step=st.wall_seconds / max(1, len(st.steps)), tokens_identical=same,
               predicted_equals_simulated=st.step_cycles == st.predicted_cycles, by_part=st.by_part)
    if B > 1:
        dec.drop_batch_program(B)       # free the chip of this batch size
    del prog
    return out


def handover_cycles(chip: ChipConfig, rows: int, d: int) -> int:
    """Cycles the pipeline hand-over adds to move a [rows, d] float32 residual over one link (simulated)."""
    import lpucore
    from lpucore.compiler.pipeline import hand_over
    from lpucore.graph import Graph
    g = Graph("residual")
    g.output("x_out", g.add(g.input("x_in", (rows, d), "float32"), 0.0))
    c = lpucore.compile(g, chip)
    return hand_over(c, "x_out", c, "x_in", 0, 0)[2] - 2 * c.expected_cycles


def llama_point(dec: Decoder, B: int) -> dict:
    """Llama-2-7B's batched step derived from its unit programs, each compiled and simulated once."""
    import lpucore
    from lpucore import Chip
    from lpucore.llm.program import build_step, model_units
    cfg, chip_cfg = dec.cfg, dec.chip_config
    units = model_units(cfg)
    picks = {"embed": (0, 1), "attn": (3, 4), "mlp": (4, 5), "head": (len(units) - 1, len(units))}
    cyc, sram, t0 = {}, {}, time.perf_counter()
    rng = np.random.default_rng(0)
    for name, span in picks.items():
        g, _ = build_step(cfg, dec.ref.w, dec.ref.quantized, dec.precision, dec.capacity, 2560, units=span, batch=B)
        c = lpucore.compile(g, chip_cfg)
        chip = Chip(chip_cfg)
        c.load(chip)
        feed = {"pos": np.zeros(B, np.int32)} if name == "attn" else {}
        if name == "embed":
            feed["tok"] = np.arange(B, dtype=np.int32)
        else:
            feed["x_in"] = rng.standard_normal((B, cfg.d_model)).astype(np.float32)
        c.write_inputs(chip, feed)
        st = chip.run()
        cyc[name], sram[name] = int(st.cycles), c.memory_bytes / 1e6
        del chip
    hand = handover_cycles(chip_cfg, B, cfg.d_model)
    n_chips = len(units)
    step = cyc["embed"] + cfg.n_layers * (cyc["attn"] + cyc["mlp"]) + cyc["head"] + (n_chips - 1) * hand
    per_user = chip_cfg.clock_hz / step
    return dict(batch=B, chips=n_chips, unit_cycles=cyc, unit_sram_mb=sram, handover_cycles=hand,
                step_cycles=step, step_us=step / chip_cfg.clock_hz * 1e6, tokens_per_second_per_user=per_user,
                tokens_per_second_aggregate=B * per_user, seconds=time.perf_counter() - t0, derived=True)


def plot(gpt2, llama, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in (("GPT-2-small int8, 1 chip", gpt2), ("Llama-2-7B int8, 66 chips (derived)", llama)):
        if pts:
            ax.plot([p["step_us"] for p in pts], [p["tokens_per_second_aggregate"] for p in pts], "o-", label=label)
            for p in pts:
                ax.annotate(f"B={p['batch']}", (p["step_us"], p["tokens_per_second_aggregate"]), fontsize=7)
    ax.set_xlabel("latency per token (us)")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Batched decode on simulated GroqChips")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--capacity", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--llama", default="", help="batch sizes for Llama-2-7B (derived), e.g. 1,8,32")
    ap.add_argument("--plot", default=None, help="write the curve to this PNG (needs matplotlib)")
    a = ap.parse_args(argv)
    chip = ChipConfig.groqchip1()
    dec = Decoder.random("gpt2", seed=0, precision="int8", capacity=a.capacity)
    w, kv = dec.memory_bytes(dec.cfg, "int8", a.capacity)
    print(f"GPT-2-small int8 on one {chip.name} ({chip.sram_bytes / 1e6:.1f} MB SRAM): weights {w / 1e6:.1f} MB, "
          f"KV cache {kv / 1e6:.2f} MB per sequence at {a.capacity} positions", flush=True)
    gpt2, llama, ok = [], [], True
    hdr = (f"{'B':>3} {'cycles/step':>12} {'us/token':>9} {'tok/s/user':>11} {'tok/s aggregate':>16} {'MXM %':>6} "
           f"{'SRAM MB':>8}")
    print(hdr)
    for B in (int(x) for x in a.batches.split(",") if x):
        try:
            batch_fit(dec, B)
            p = gpt2_point(dec, B, a.tokens)
        except (ModelDoesNotFit, LpuError) as e:
            print(f"{B:>3} does not fit: {e}", flush=True)
            break
        gpt2.append(p)
        ok &= p["tokens_identical"] and p["predicted_equals_simulated"]
        print(f"{B:>3} {p['step_cycles']:>12,} {p['step_us']:>9.1f} {p['tokens_per_second_per_user']:>11,.0f} "
              f"{p['tokens_per_second_aggregate']:>16,.0f} {100 * p['mxm_utilisation']:>6.1f} {p['sram_mb']:>8.1f}"
              f"  (compile {p['compile_seconds']:.0f} s, tokens {'identical' if p['tokens_identical'] else 'DIFFER'})",
              flush=True)
    if a.llama:
        big = Decoder.random("llama2-7b", seed=0, precision="int8", capacity=a.capacity, chips="auto")
        print(f"Llama-2-7B int8 on {big.chips} x {chip.name} (one unit per chip), KV cache {a.capacity} positions "
              "per sequence; DERIVED from the simulated unit programs (module docstring)", flush=True)
        print(hdr.replace("SRAM MB", "chips"))
        for B in (int(x) for x in a.llama.split(",")):
            p = llama_point(big, B)
            llama.append(p)
            print(f"{B:>3} {p['step_cycles']:>12,} {p['step_us']:>9.1f} {p['tokens_per_second_per_user']:>11,.0f} "
                  f"{p['tokens_per_second_aggregate']:>16,.0f} {'':>6} {p['chips']:>8}  units {p['unit_cycles']}, "
                  f"hand-over {p['handover_cycles']}", flush=True)
    if a.plot:
        plot(gpt2, llama, a.plot)
        print(f"plot: {a.plot}")
    print(json.dumps(dict(capacity=a.capacity, tokens=a.tokens, gpt2=gpt2, llama2_7b=llama)))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
