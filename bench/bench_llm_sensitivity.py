"""How much a decode prediction depends on each GroqChip parameter that is an estimate: the prediction of
:func:`lpucore.llm.predict` (as ``bench/bench_llm_predict.py`` makes it) at half and at double each
parameter whose documented source says "estimate" (:class:`lpucore.ChipConfig`), beside the prediction at
the documented value (on the chips ``bench_llm_predict.py`` uses: within ``BUDGET`` for Llama-2-70B).

    python bench/bench_llm_sensitivity.py [--model mixtral-8x7b] [--capacity 4096] [--params c2c_latency,...]
                                          [--out sensitivity.jsonl]

Every prediction recompiles the model's stages for the changed chip (a few minutes each at full size), so
a run over all sixteen estimates takes hours: results go to ``--out`` one JSON line each as they are made,
and a rerun skips the ones already there (run it in the background, with a timeout, and come back). A value
that would leave the parameter's documented range (half of 1 hop) is reported as such, not run; one the
compiler cannot schedule for ("no compile") is recorded with its error.
Nothing here is tuned: the point is to show how far each unknown could move the figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from bench_llm_predict import BUDGET

from lpucore import ChipConfig, LpuError
from lpucore.llm import model_config
from lpucore.llm.pipeline import plan_within
from lpucore.llm.predict import predict

FULL = {"llama2-7b": 2048}


#: run first (a run is minutes): the chip-to-chip link, which every hand-over crosses, then the MXM and memory
FIRST = ("c2c_latency", "c2c_deskew_delay", "mxm_accumulators", "mem_read_delay", "mem_write_delay", "sxm_delay")


def estimates():
    """(name, documented value, source, lo, hi) of every ChipConfig field whose source is an estimate,
    :data:`FIRST` first."""
    base = ChipConfig.groqchip1()
    out = []
    for f in dataclasses.fields(ChipConfig):
        src = str(f.metadata.get("source", "")) if f.metadata else ""
        if "estimate" in src.lower():
            out.append((f.name, getattr(base, f.name), src, f.metadata.get("lo"), f.metadata.get("hi")))
    return sorted(out, key=lambda e: FIRST.index(e[0]) if e[0] in FIRST else len(FIRST))


def _scaled(value, factor, lo, hi):
    """``value * factor`` as the field's type, or None outside [lo, hi] or equal to ``value``."""
    v = type(value)(value * factor) if isinstance(value, float) else int(round(value * factor))
    if v == value or (lo is not None and v < lo) or (hi is not None and v > hi):
        return None
    return v


def _done(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {(r["model"], r["capacity"], r["param"], r["value"]): r for r in rows}


def _run(model, capacity, param, value, out, done):
    key = (model, capacity, param, value)
    if key in done:
        return done[key]
    chip = ChipConfig.groqchip1() if param is None else dataclasses.replace(ChipConfig.groqchip1(), **{param: value})
    t0 = time.perf_counter()
    # the documented chip's run checks the tokens; a changed one only moves cycles (values do not depend on
    # timing: a schedule error would stop the run), so it runs one step, unchecked
    cut: dict = {}
    if model in BUDGET:          # the cut bench_llm_predict.py makes: within Groq's chip count
        shards, attn = plan_within(model_config(model), "int8", capacity, ChipConfig.groqchip1(), BUDGET[model])
        cut = dict(shards=shards, attn=attn, parallel_shards=True)
    try:
        p = predict(model, "int8", capacity=capacity, config=chip, reference=param is None,
                    prompt=(1, 2) if param is None else (1,), new_tokens=2 if param is None else 1, **cut)
    except LpuError as e:       # a chip the compiler cannot schedule for (a finding, recorded as such)
        if param is None:
            raise
        row = dict(model=model, capacity=capacity, param=param, value=value, error=f"{type(e).__name__}: {e}")
    else:
        row = dict(model=model, capacity=capacity, param=param, value=value, chips=p.chips,
                   step_cycles=p.step_cycles, tokens_per_second=p.tokens_per_second,
                   tokens_match_reference=p.tokens_match_reference, host_seconds=time.perf_counter() - t0)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    done[key] = row
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--capacity", type=int, default=None, help="KV cache positions (default: 2,048 for 7B, else 4,096)")
    ap.add_argument("--params", default="", help="comma-separated fields (default: every estimate)")
    ap.add_argument("--out", default="sensitivity.jsonl")
    ap.add_argument("--table-only", action="store_true", help="print what --out holds, run nothing")
    a = ap.parse_args(argv)
    cap = a.capacity if a.capacity is not None else FULL.get(a.model, 4096)
    params = estimates()
    if a.params:
        want = a.params.split(",")
        unknown = sorted(set(want) - {p[0] for p in params})
        if unknown:
            ap.error(f"not estimates of ChipConfig: {', '.join(unknown)}")
        params = [p for p in params if p[0] in want]
    done = _done(a.out)
    if a.table_only and (a.model, cap, None, None) not in done:
        ap.error(f"{a.out} holds no prediction of {a.model} at {cap} positions")
    base = _run(a.model, cap, None, None, a.out, done)
    print(f"{a.model} int8, {cap} positions: {base['tokens_per_second']:,.0f} tokens/s per user at the documented "
          f"values ({base['chips']} chips)", flush=True)
    print(f"{'parameter':26s} {'value':>8s} {'half':>14s} {'double':>14s}  source", flush=True)
    for name, value, src, lo, hi in params:
        cells = []
        for factor in (0.5, 2.0):
            v = _scaled(value, factor, lo, hi)
            if v is None:
                cells.append("out of range")
                continue
            key = (a.model, cap, name, v)
            if a.table_only and key not in done:
                cells.append(f"{v}: not run")
                continue
            r = _run(a.model, cap, name, v, a.out, done)
            if "error" in r:
                cells.append(f"{v}: no compile")
                continue
            cells.append(f"{v}: {r['tokens_per_second']:,.0f}" + (" (!)" if r["tokens_match_reference"] is False
                                                                   else ""))
        print(f"{name:26s} {value!s:>8s} {cells[0]:>14s} {cells[1]:>14s}  {src}", flush=True)


if __name__ == "__main__":
    main()
