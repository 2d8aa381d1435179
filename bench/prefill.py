"""Time to first token, chunked prefill against token by token (lpucore.llm.prefill).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE LPUCORE_CACHE=0 python bench/prefill.py \
        [model] [prompt] [chunk] [capacity]

Defaults: GPT-2-small in int8 on one GroqChip, a 32-token prompt, chunks of 16 positions (32 rows' attention
temporaries do not fit beside the weights), a 32-position KV cache. Each decoder
generates once to compile and load its programs, then once more, measured: simulated time to first token
(cycles at the chip's clock) and host time of that prefill (the simulation; the chunk program shares the
decode program's chip, or on the own-chip fallback route the host also copies the cache).
"""

import sys
import time

import numpy as np

from lpucore import ChipConfig
from lpucore.llm import Decoder
from lpucore.llm.decoder import LOGIT_TOLERANCE
from lpucore.llm.prefill import cache_copy_seconds


def ttft(dec: Decoder, prompt):
    """(DecodeStats, host seconds) of prefilling ``prompt`` and choosing one token, programs compiled."""
    t0 = time.perf_counter()
    dec.generate(prompt, max_new_tokens=1)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = dec.generate(prompt, max_new_tokens=1)
    return res, time.perf_counter() - t0, first


def main(argv):
    name = argv[1] if len(argv) > 1 else "gpt2"
    n = int(argv[2]) if len(argv) > 2 else 32
    chunk = int(argv[3]) if len(argv) > 3 else 16
    capacity = int(argv[4]) if len(argv) > 4 else 32
    prompt = list(np.random.default_rng(0).integers(0, 1000, n))
    out = {}
    for label, p in (("chunked", chunk), ("token by token", 1)):
        dec = Decoder.random(name, precision="int8", capacity=capacity, prefill_chunk=p)
        res, host, first = ttft(dec, prompt)
        st = res.stats
        out[label] = res
        print(f"{label}: prefill_chunk {st.prefill_chunk} ({st.prefill_route or 'step program'}); "
              f"time to first token {st.ttft_seconds * 1e6:,.1f} us "
              f"simulated ({st.ttft_cycles:,} cycles, {st.prefill_cycles_per_token:,.0f} per prompt token); "
              f"host {host:.2f} s (first call, with compiling and loading: {first:.1f} s)")
        if st.prefill_chunk > 1:
            b = st.chunk_bounds
            top = max(b, key=lambda k: b[k])
            print(f"  chunk program: {st.chunk_cycles:,} cycles (predicted {st.chunk_predicted_cycles:,}), "
                  f"MXM utilisation {100 * st.chunk_mxm_utilisation:.1f} %, largest bound {b[top]:,.0f} "
                  f"({top}; schedule efficiency {100 * b[top] / st.chunk_cycles:.1f} %); bounds "
                  + ", ".join(f"{k} {v:,.0f}" for k, v in b.items()))
        print(f"  decode step: {st.step_cycles:,} cycles, MXM utilisation {100 * st.mxm_utilisation:.1f} %")
    a, b = out["chunked"], out["token by token"]
    kv = a.stats.kv_cache_bytes * n // a.stats.capacity
    print(f"the prompt's cache rows, {kv:,} bytes, over a GroqChip's chip-to-chip links: "
          f"{cache_copy_seconds(kv, ChipConfig.groqchip1()) * 1e6:.1f} us")
    _, ref = Decoder.random(name, precision="int8", capacity=capacity).reference().generate(prompt, 1)
    print(f"first token: chunked {a.tokens.tolist()}, token by token {b.tokens.tolist()}; logits: max |chunked - "
          f"token by token| {np.abs(a.logits - b.logits).max():.4f}, max |chunked - reference| "
          f"{np.abs(a.logits - ref).max():.4f}, max |token by token - reference| {np.abs(b.logits - ref).max():.4f} "
          f"(bound {LOGIT_TOLERANCE * (1 + np.abs(ref).max()):.4f}); speed-up of the simulated time to first token "
          f"{b.stats.ttft_cycles / a.stats.ttft_cycles:.2f}x")


if __name__ == "__main__":
    main(sys.argv)
