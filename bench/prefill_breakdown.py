"""Where a prefill chunk's cycles go: a one-layer GPT-2-small (int8, one GroqChip, 32-position cache) compiled
as a chunk of P positions and as a single-token step, its cycles attributed to model parts and operations.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE LPUCORE_CACHE=0 python bench/prefill_breakdown.py [P]
"""

import sys

import lpucore
from lpucore.llm import Decoder, model_config
from lpucore.llm.predict import truncated
from lpucore.llm.program import build_step
from lpucore.llm.steps import _breakdown


def main(argv):
    rows = int(argv[1]) if len(argv) > 1 else 16
    dec = Decoder.random(truncated(model_config("gpt2"), 1), precision="int8", capacity=32)
    for P in (1, rows):
        g, spans = build_step(dec.cfg, dec.ref.w, dec.ref.quantized, "int8", dec.capacity, dec.block, batch=P,
                              shared_cache=P > 1)
        c = lpucore.compile(g, dec.chip_config)
        by_part, by_op = _breakdown(c, spans)
        print(f"{P} position{'s' * (P > 1)}: {c.expected_cycles:,} cycles; by part {by_part}; by operation {by_op}")


if __name__ == "__main__":
    main(sys.argv)
