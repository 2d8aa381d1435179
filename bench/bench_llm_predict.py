"""Decode-speed predictions for models bigger than this machine holds: Llama-2-70B and Mixtral-8x7B
(int8, random weights) on GroqChips, beside the published figures.

    python bench/bench_llm_predict.py [--models llama2-70b,mixtral-8x7b] [--layers 2] [--capacity 32]
                                      [--tensor-parallel 8]

For each model, :func:`lpucore.llm.predict` simulates the embedding, the first ``--layers`` layers
and the head as pipeline stages over as many chips as they take (MLPs or experts, and the
embedding table and head, cut into shards where one does not fit a chip), checks the tokens and
logits against the NumPy reference of that truncated model, and derives the whole model's step
from layer 1's simulated cycles (every later layer runs the same programs over the same
hand-over). Then :func:`lpucore.llm.predict.predict_tensor_parallel` compiles layer 1 split over a
GroqNode's 8 chips (``lpucore.compile(graph, system=...)``: Megatron-style splits, all-reduces
scheduled over the links), checks its output against the reference's residual stream, and derives
the step with every layer so split (``--tensor-parallel 0`` skips it). Prints each model's tables
(simulated and derived figures labelled) and the published figures; the last line is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import time

from lpucore.llm.predict import predict, predict_tensor_parallel


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama2-70b,mixtral-8x7b")
    ap.add_argument("--precision", default="int8", choices=("fp16", "int8"))
    ap.add_argument("--layers", type=int, default=2, help="layers simulated (at least 2)")
    ap.add_argument("--capacity", type=int, default=32, help="KV cache positions")
    ap.add_argument("--tensor-parallel", type=int, default=8, help="chips per tensor-parallel group (0: skip)")
    a = ap.parse_args(argv)
    out = {}
    for name in a.models.split(","):
        t0 = time.perf_counter()
        p = predict(name, a.precision, layers=a.layers, capacity=a.capacity,
                    progress=lambda m, t0=t0: print(f"  [{time.perf_counter() - t0:5.0f} s] {m}", flush=True)
                    if "compiled" in m else None)
        print(p.table(), flush=True)
        print(f"  (host: {time.perf_counter() - t0:.0f} s in all, compile {p.compile_seconds:.0f} s, "
              f"{p.wall_seconds_per_step:.1f} s per simulated step)\n", flush=True)
        out[name] = p.to_dict()
        if a.tensor_parallel:
            t0 = time.perf_counter()
            tp = predict_tensor_parallel(name, a.precision, group=a.tensor_parallel, pipeline=p,
                                         capacity=a.capacity)
            print(tp.table(), flush=True)
            print(f"  (host: {time.perf_counter() - t0:.0f} s in all, compile {tp.compile_seconds:.0f} s, "
                  f"{tp.wall_seconds_per_layer:.1f} s per simulated layer)\n", flush=True)
            out[name + " tensor-parallel"] = tp.to_dict()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
