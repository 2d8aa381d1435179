"""Where a prefill chunk's rows first differ from token-by-token steps: a truncated GPT-2-small (int8, one
GroqChip, 32-position cache) run as one chunk of P positions and as P single-token steps, with each layer's
residual stream, the float16 input of its qkv projection and the projection's output as extra outputs, and
the KV cache rows compared; prints which rows differ and by how much.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE LPUCORE_CACHE=0 python bench/prefill_rows.py [layers] [P]
"""

import sys

import numpy as np

import lpucore
from lpucore import Chip
from lpucore.llm import Decoder, model_config
from lpucore.llm.predict import truncated
from lpucore.llm.program import StepBuilder

_linear = StepBuilder.linear


def _probed_linear(self, x16, name, transpose, bias=None, rows=None, cols=None):
    """StepBuilder.linear, keeping the qkv projection's input and output of every layer as probes."""
    y = _linear(self, x16, name, transpose, bias, rows, cols)
    if "attn.c_attn" in name:
        i = name.split(".")[1]
        self.probes[f"ln{i}"] = self.g.cast(x16, "float32")
        self.probes[f"qkv{i}"] = y
    return y


def program(dec, rows):
    """The step (rows 1) or chunk program with its probes as outputs, compiled and loaded."""
    sb = StepBuilder(dec.cfg, dec.ref.w, dec.ref.quantized, "int8", dec.capacity, dec.block, batch=rows,
                     shared_cache=rows > 1)
    g, _ = sb.build()
    for k, t in sb.probes.items():
        g.output(k, t)
    c = lpucore.compile(g, dec.chip_config)
    chip = Chip(dec.chip_config)
    c.load(chip)
    return c, chip


def run(c, chip, tok, pos):
    chip.reset(clear_memory=False)
    c.write_inputs(chip, {"tok": tok, "pos": pos})
    chip.run()
    return c.read_outputs(chip)


def main(argv):
    layers = int(argv[1]) if len(argv) > 1 else 2
    P = int(argv[2]) if len(argv) > 2 else 8
    StepBuilder.linear = _probed_linear
    dec = Decoder.random(truncated(model_config("gpt2"), layers), precision="int8", capacity=32)
    prompt = np.random.default_rng(0).integers(0, 1000, P).astype(np.int32)
    (c1, chip1), (cP, chipP) = program(dec, 1), program(dec, P)
    steps = [run(c1, chip1, prompt[p:p + 1], np.array([p], np.int32)) for p in range(P)]
    chunk = run(cP, chipP, prompt, np.arange(P, dtype=np.int32))
    for k in sorted(k for k in chunk if k != "logits"):
        d = np.abs(chunk[k].reshape(P, -1) - np.stack([s[k].reshape(-1) for s in steps])).max(axis=1)
        print(f"{k}: rows differing {np.nonzero(d)[0].tolist()}, max |difference| {d.max():.3g}")
    for i in range(layers):
        for kv in "kv":
            d = np.abs(cP.read_state(chipP, f"{kv}{i}")[:P].astype(np.float32)
                       - c1.read_state(chip1, f"{kv}{i}")[:P].astype(np.float32)).max(axis=1)
            print(f"cache {kv}{i}: rows differing {np.nonzero(d)[0].tolist()}")


if __name__ == "__main__":
    main(sys.argv)
