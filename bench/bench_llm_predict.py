"""Decode-speed predictions at full context for models bigger than this machine holds: Llama-2-7B at
2,048 positions, Llama-2-70B and Mixtral-8x7B at 4,096 (int8, random weights, batch 1) on GroqChips,
beside Groq's published figures.

    python bench/bench_llm_predict.py [--models llama2-7b,llama2-70b,mixtral-8x7b] [--layers 2]
                                      [--capacity full|N] [--outside-capacity 32] [--tensor-parallel 8]

For each model, :func:`lpucore.llm.predict` simulates the embedding, the first ``--layers`` layers
and the head as pipeline stages over as many chips as they take (MLPs or experts, and the
embedding table and head, cut into shards where one does not fit a chip; Mixtral's experts, and a
block no chip holds whole, side by side: an attention block cut by kv heads, its shards and the
MLP's each on a chip of their own, ``--in-a-row`` for Mixtral's experts one after another), checks the tokens and
logits against the NumPy reference of that truncated model, and derives the whole model's step
from layer 1's simulated cycles (every later layer runs the same programs over the same
hand-over). Then :func:`lpucore.llm.predict.predict_tensor_parallel` compiles layer 1 split over a
GroqNode's 8 chips (``lpucore.compile(graph, system=...)``: Megatron-style splits, all-reduces
scheduled over the links), checks its output against the reference's residual stream, and derives
the step with every layer so split (``--tensor-parallel 0`` skips it).

``--capacity full`` (the default) is each model's context of the issue: 2,048 positions for
Llama-2-7B, 4,096 for the others. A model whose attention block does not fit one chip at that
capacity, even cut by kv heads (:func:`lpucore.llm.pipeline.plan_auto` says so), has
no pipeline prediction there; its pipeline runs at ``--outside-capacity`` positions for the
tensor-parallel step's embedding and head only (they read no cache), and is printed so labelled.

Prints each model's tables (simulated and derived figures labelled), then one summary line per
prediction: chips (whole 8-chip nodes), cycles per token, tokens/s per user and per chip, the
schedule bound (each chip's largest ``compiled.bounds()``, derived as the step is) and its
efficiency, and Groq's figure. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from lpucore import ChipConfig
from lpucore.errors import LpuError, ModelDoesNotFit
from lpucore.llm import model_config
from lpucore.llm.pipeline import plan_auto, plan_within
from lpucore.llm.predict import PUBLISHED, PUBLISHED_TTFT, predict, predict_prefill, predict_tensor_parallel

#: the context each model is predicted at by default (the issue's)
FULL = {"llama2-7b": 2048, "llama2-70b": 4096, "mixtral-8x7b": 4096}
NODE = 8                    # chips per GroqNode
#: chips a model may take: Groq's count for Llama-2-70B (about 576, TSP.md section 8; issue 26: "on at most
#: 576 GroqChips, as Groq"); the others on the fewest chips that hold them
BUDGET = {"llama2-70b": 576}


def _log(t0):
    return lambda m: print(f"  [{time.perf_counter() - t0:5.0f} s] {m}", flush=True) if "compiled" in m else None


def _chip(params) -> ChipConfig:
    """The GroqChip with ``NAME=VALUE`` parameters changed (integers or floats, as the field is)."""
    base = ChipConfig.groqchip1()
    changes = {}
    for item in params:
        name, _, value = item.partition("=")
        if not hasattr(base, name) or not value:
            raise ValueError(f"--chip-param wants NAME=VALUE with a ChipConfig field, not {item!r}")
        changes[name] = type(getattr(base, name))(float(value)) if isinstance(getattr(base, name), (int, float)) \
            else value
    return dataclasses.replace(base, **changes) if changes else base


def _summary(name, kind, p, chips, nodes) -> str:
    """One line: the figures the issue asks for, beside Groq's."""
    per_chip = p.tokens_per_second / (nodes * NODE)
    groq = "; ".join(f"{k}: {v}" for k, v in PUBLISHED.get(name, {}).items()) or "-"
    return (f"{name:13s} {p.capacity:5d}  {kind:17s} {chips:4d} ({nodes:3d} nodes) {p.step_cycles:>12,} "
            f"{p.tokens_per_second:9,.0f} {per_chip:8.2f} {p.bound_cycles:>11,} {100 * p.schedule_efficiency:5.1f} %  "
            f"{groq}")


def run_model(name, a, out, lines, ttft):
    """Pipeline and tensor-parallel predictions of ``name`` at its capacity; appends to ``out`` and ``lines``."""
    cap = FULL.get(name, 2048) if a.capacity == "full" else int(a.capacity)
    chip = a.chip
    try:
        plan_auto(model_config(name), a.precision, cap, chip)
        pipe_cap = cap
    except ModelDoesNotFit as e:
        pipe_cap = a.outside_capacity
        print(f"{name} at {cap} positions as pipeline stages: {e}\n  -> pipeline at {pipe_cap} positions, for the "
              f"tensor-parallel step's embedding and head only\n", flush=True)
    if a.prefill_only:
        return _prefill(name, a, None, out, ttft)
    t0 = time.perf_counter()
    budget = a.max_chips if a.max_chips is not None else BUDGET.get(name, 0)
    cut: dict = {}
    if budget and not a.in_a_row:       # the chips Groq used: shards side by side as fast as they allow
        shards, attn = plan_within(model_config(name), a.precision, pipe_cap, chip, budget)
        cut = dict(shards=shards, attn=attn, parallel_shards=True)
        print(f"{name}: at most {budget} chips: MLPs in {shards} shards, attention in {attn}, side by side\n",
              flush=True)
    p = predict(name, a.precision, layers=a.layers, capacity=pipe_cap, progress=_log(t0), config=chip,
                prompt_tokens=a.prompt, **(cut or dict(parallel_shards=False if a.in_a_row else None)))
    print(p.table(), flush=True)
    print(f"  (host: {time.perf_counter() - t0:.0f} s in all, compile {p.compile_seconds:.0f} s, "
          f"{p.wall_seconds_per_step:.1f} s per simulated step)\n", flush=True)
    out[name + f" pipeline {pipe_cap}"] = p.to_dict()
    if pipe_cap == cap:
        lines.append(_summary(name, "pipe side by side" if p.parallel_shards else "pipeline", p, p.chips, p.nodes))
    if a.tensor_parallel:
        t0 = time.perf_counter()
        tp = predict_tensor_parallel(name, a.precision, group=a.tensor_parallel, pipeline=p, capacity=cap,
                                     config=chip)
        print(tp.table(), flush=True)
        print(f"  (host: {time.perf_counter() - t0:.0f} s in all, compile {tp.compile_seconds:.0f} s, "
              f"{tp.wall_seconds_per_layer:.1f} s per simulated layer)\n", flush=True)
        out[name + f" tensor-parallel {cap}"] = tp.to_dict()
        lines.append(_summary(name, f"tensor par. {tp.group}", tp, tp.chips + tp.outside_chips, tp.nodes))
    if a.prefill and name in PUBLISHED_TTFT:
        _prefill(name, a, p, out, ttft)


def _prefill(name, a, p, out, ttft):
    """The time-to-first-token prediction of ``name`` (``p``: its pipeline prediction, or None with
    ``--outside``); appends to ``out`` and ``ttft``."""
    t0 = time.perf_counter()
    at = tuple(int(c) for c in a.prefill_at.split(",")) if a.prefill_at else None
    outside = tuple(int(c) for c in a.outside.split(",")) if a.outside else None
    pf = predict_prefill(name, a.precision, group=a.prefill_group, chunk=a.prefill, prompt_tokens=a.prompt,
                         pipeline=p, measured_at=at, outside=outside)
    print(pf.table(), flush=True)
    print(f"  (host: {time.perf_counter() - t0:.0f} s in all, compile {pf.compile_seconds:.0f} s, "
          f"{pf.wall_seconds:.1f} s to simulate the chunk layer)\n", flush=True)
    out[name + f" prefill {a.prompt}"] = pf.to_dict()
    groq = "; ".join(f"{k}: {v}" for k, v in PUBLISHED_TTFT.get(name, {}).items()) or "-"
    ttft.append(f"{name:13s} {a.prompt:6d} {pf.chunk:5d} {pf.chips:5d} {pf.ttft_cycles:>12,} "
                f"{pf.ttft_seconds:9.4f} {pf.bound_ttft_cycles / pf.clock_hz:9.4f}  {groq}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama2-7b,llama2-70b,mixtral-8x7b")
    ap.add_argument("--precision", default="int8", choices=("fp16", "int8"))
    ap.add_argument("--layers", type=int, default=2, help="layers simulated (at least 2)")
    ap.add_argument("--capacity", default="full", help="KV cache positions, or 'full' (2,048 for 7B, else 4,096)")
    ap.add_argument("--outside-capacity", type=int, default=32,
                    help="the pipeline's cache when the attention does not fit a chip at --capacity")
    ap.add_argument("--tensor-parallel", type=int, default=8, help="chips per tensor-parallel group (0: skip)")
    ap.add_argument("--prefill", type=int, default=16,
                    help="prompt rows per chunk for the time-to-first-token prediction (0: skip)")
    ap.add_argument("--prefill-group", type=int, default=8, help="chips per group of the prefill prediction")
    ap.add_argument("--prompt", type=int, default=550, help="prompt tokens of the time-to-first-token prediction")
    ap.add_argument("--prefill-at", default="", help="S1,S2: simulate the chunk layer at these caches and "
                    "extrapolate linearly to the prompt's (a full-cache 70B chunk layer compiles slowly)")
    ap.add_argument("--prefill-only", action="store_true", help="only the time-to-first-token prediction")
    ap.add_argument("--chip-param", action="append", default=[], metavar="NAME=VALUE",
                    help="a GroqChip parameter changed (repeatable), for a sensitivity line: c2c_latency=1000")
    ap.add_argument("--max-chips", type=int, default=None, help="chips the shards side by side may take "
                    "(default: 576 for Llama-2-70B, Groq's count; else 0, the fewest that hold the model)")
    ap.add_argument("--in-a-row", action="store_true", help="the shards of a block (Mixtral's experts) one "
                    "after another, each adding its part, rather than side by side")
    ap.add_argument("--outside", default="", help="CYCLES,CHIPS of the embedding and head, from a pipeline "
                    "prediction's table (its simulated step less its layers), instead of running it")
    a = ap.parse_args(argv)
    try:
        a.chip = _chip(a.chip_param)
    except (ValueError, LpuError) as e:
        ap.error(str(e))
    if a.chip_param:
        print(f"GroqChip with {', '.join(a.chip_param)} (a sensitivity run)\n", flush=True)
    if a.capacity != "full" and not a.capacity.isdigit():
        ap.error(f"--capacity must be 'full' or a number of positions, not {a.capacity!r}")
    out: dict = {}
    lines: list = []
    ttft: list = []
    for name in a.models.split(","):
        run_model(name, a, out, lines, ttft)
    print(f"{'model':13s} {'cache':>5s}  {'system':17s} {'chips':>15s} {'cycles/token':>12s} {'tok/s/user':>9s} "
          f"{'per chip':>8s} {'bound':>11s} {'eff.':>7s}  Groq (tokens/s per user)")
    print("\n".join(lines))
    if ttft:
        print(f"{'model':13s} {'prompt':>6s} {'chunk':>5s} {'chips':>5s} {'TTFT cycles':>12s} {'TTFT s':>9s} "
              f"{'bound s':>9s}  published")
        print("\n".join(ttft))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
