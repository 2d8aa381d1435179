"""Decode benchmark: GPT-2-small-shaped int8 weights on one simulated GroqChip, against the NumPy reference.

    python bench/bench_decode.py [--model gpt2] [--tokens 16] [--precision int8] [--capacity 32]

Generates ``--tokens`` greedy tokens after a one-token prompt (so ``--tokens`` chip steps) with
:class:`lpucore.llm.Decoder` (fast engine), then times :class:`lpucore.llm.Reference` (plain NumPy, float32)
doing the same decode in the same process. Prints the simulated figures (cycles per step, tokens/s per user,
MXM utilisation, where the cycles went), the host's wall seconds per simulated token, the ratio of lpucore's
wall time per token to the reference's (goal: at most 3), and checks that the tokens agree and the logits are
within the documented bound. Compilation (once per model) is timed separately and not in the ratio.
The last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from lpucore import ChipConfig
from lpucore.llm import Decoder
from lpucore.llm.decoder import LOGIT_TOLERANCE


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--precision", default="int8", choices=("fp16", "int8"))
    ap.add_argument("--capacity", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=200, help="the one prompt token id")
    ap.add_argument("--config", default="groqchip1", choices=ChipConfig.PRESETS)
    a = ap.parse_args(argv)

    t0 = time.perf_counter()
    dec = Decoder.random(a.model, seed=0, precision=a.precision, capacity=a.capacity,
                         config=ChipConfig.named(a.config))
    t1 = time.perf_counter()
    dec.compile()
    t2 = time.perf_counter()
    chip_cfg = ChipConfig.named(a.config)
    print(f"{dec}: weights {t1 - t0:.1f} s, compile {t2 - t1:.1f} s, SRAM {dec.compiled.memory_bytes / 1e6:.1f} MB; "
          f"chip {chip_cfg.name} (config digest {chip_cfg.digest()})", flush=True)
    _ = dec.chip                                # create the chip and write the weights once, outside the timing
    res = dec.generate([a.prompt], max_new_tokens=a.tokens)
    st = res.stats
    sim_wall = sum(s.wall_seconds for s in st.steps)
    steps = len(st.steps)

    ref = dec.reference()
    t3 = time.perf_counter()
    tokens, logits = ref.generate([a.prompt], a.tokens)
    ref_wall = time.perf_counter() - t3
    err = float(np.max(np.abs(res.logits - logits)))
    bound = LOGIT_TOLERANCE * (1 + float(np.max(np.abs(logits))))
    same = bool(np.array_equal(res.tokens, tokens))

    print(st.table())
    per_tok, ref_per_tok = sim_wall / steps, ref_wall / steps
    print(f"simulated: {st.step_cycles:,} cycles per token = {st.step_seconds * 1e6:.1f} us -> "
          f"{st.tokens_per_second:,.0f} tokens/s per user; MXM utilisation {100 * st.mxm_utilisation:.1f} %; "
          f"schedule efficiency {100 * st.schedule_efficiency:.1f} % of the bound "
          f"{max(st.bounds.values()):,.0f} cycles")
    print(f"host: lpucore {per_tok:.3f} s per simulated token, NumPy reference {ref_per_tok:.3f} s per token: "
          f"ratio {per_tok / ref_per_tok:.2f} (goal <= 3)")
    print(f"check: tokens {'identical' if same else 'DIFFER'}; max logit error {err:.2e} (bound {bound:.2e})")
    out = dict(model=dec.cfg.name, precision=a.precision, chip=a.config, config_digest=chip_cfg.digest(),
               tokens=a.tokens, steps=steps,
               capacity=a.capacity, step_cycles=st.step_cycles, step_seconds=st.step_seconds,
               tokens_per_second_per_user=st.tokens_per_second, mxm_utilisation=st.mxm_utilisation,
               sram_bytes=st.sram_bytes, compile_seconds=t2 - t1, wall_seconds_per_token=per_tok,
               reference_seconds_per_token=ref_per_tok, ratio_to_reference=per_tok / ref_per_tok,
               tokens_identical=same, max_logit_error=err, logit_bound=bound, by_part=st.by_part, by_op=st.by_op,
               bounds=st.bounds, schedule_efficiency=st.schedule_efficiency)
    print(json.dumps(out))
    return 0 if same and err <= bound else 1


if __name__ == "__main__":
    raise SystemExit(main())
