"""A decoder's model split into pipeline stages by layers, one chip per stage, on a
:class:`lpucore.System`.

Stage k holds layers ``[a_k, a_{k+1})`` (contiguous, as even as the layer count allows): the
first stage also embeds the token, the last also applies the final norm and the head. Each
stage is compiled on its own (:func:`lpucore.llm.program.build_step` with ``layers=``); the
residual stream (float32 ``[1, d_model]``) goes from stage to stage over one C2C link (chip
k's link 0 to chip k+1's link 1), scheduled by :func:`lpucore.compiler.pipeline.hand_over`,
so a step's cycles are the stages' cycles plus the transfers, known before the run. Every
stage keeps the KV cache of its own layers. The values are those of the single-chip
:class:`~lpucore.llm.Decoder` (the same operations on the same numbers), which the tests check
bit for bit.
"""

from __future__ import annotations

import dataclasses
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..errors import LpuError
from .program import build_step
from .reference import choose_token


class PipelineDecoder:
    """``decoder``'s model (a :class:`~lpucore.llm.Decoder`, used for its weights, precision,
    chip configuration, capacity and engine) over ``chips`` chips."""

    def __init__(self, decoder, chips: int):
        n = decoder.cfg.n_layers
        if not 2 <= int(chips) <= n:
            raise ValueError(f"a pipeline of {decoder.cfg.name} needs 2..{n} chips (one or more layers each), "
                             f"not {chips}")
        self.decoder = decoder
        self.n_chips = int(chips)
        bounds = [round(k * n / self.n_chips) for k in range(self.n_chips + 1)]
        self.stages: List[Tuple[int, int]] = list(zip(bounds, bounds[1:]))
        self.compiled = None
        self.system = None
        self.step_cycles: Optional[int] = None
        self.compile_seconds = 0.0
        self.position = 0

    def __repr__(self):
        return (f"PipelineDecoder({self.decoder.cfg.name!r}, {self.n_chips} chips x {self.decoder.chip_config.name}, "
                f"layers {self.stages})")

    def compile(self):
        """Compile every stage and chain them; builds and loads the system (once)."""
        if self.system is not None:
            return self.compiled
        import lpucore
        from ..compiler.pipeline import hand_over
        from ..system import System
        d = self.decoder
        t0 = time.perf_counter()
        comps = []
        for layers in self.stages:
            graph, _ = build_step(d.cfg, d.ref.w, d.ref.quantized, d.precision, d.capacity, d.block, layers=layers)
            comps.append(lpucore.compile(graph, d.chip_config))
        programs, cur = [], comps[0]
        for k in range(self.n_chips - 1):
            pa, pb, end = hand_over(cur, "x_out", comps[k + 1], "x_in", 0, 1)
            programs.append(pa)
            cur = dataclasses.replace(comps[k + 1], program=pb, expected_cycles=end)
        programs.append(cur.program)
        self.step_cycles = cur.expected_cycles
        self.compile_seconds = time.perf_counter() - t0
        self.compiled = comps
        s = System(self.n_chips, [(k, 0, k + 1, 1) for k in range(self.n_chips - 1)], config=d.chip_config,
                   engine=d.engine, fp16_mxm=d.fp16_mxm)
        for chip, prog, comp in zip(s.chips, programs, comps):
            chip.load(prog)
            for name, arr in comp.constants.items():
                chip.write_tensor(name, arr)
        self.system = s
        return comps

    def reset(self) -> None:
        """Start a new sequence (as :meth:`Decoder.reset`)."""
        self.position = 0

    def step(self, token: int):
        """Feed ``token`` at the next position: returns (logits float32 [vocab], SystemStats)."""
        cfg = self.decoder.cfg
        if not 0 <= int(token) < cfg.vocab_size:
            raise ValueError(f"token id {token} out of range: {cfg.name} has vocab_size {cfg.vocab_size}")
        if self.position >= self.decoder.capacity:
            raise ValueError(f"the KV cache is full: {self.decoder.capacity} positions")
        self.compile()
        s = self.system
        s.reset(clear_memory=False)
        pos = np.array([[self.position]], np.int32)
        s.chips[0].write_tensor("tok", np.array([[int(token)]], np.int32))
        for chip in s.chips:
            chip.write_tensor("pos", pos)
        st = s.run()
        if not st.finished:
            raise LpuError(f"pipeline step at position {self.position} did not finish")
        self.position += 1
        return s.chips[-1].read_tensor("logits").reshape(-1).astype(np.float32), st

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 8, greedy: bool = True,
                 temperature: float = 1.0, seed: Optional[int] = 0):
        """(new tokens, the logits each was chosen from [tokens, vocab], per-step SystemStats), as
        :meth:`Decoder.generate` chooses them."""
        if not len(prompt_ids):
            raise ValueError("generate needs at least one prompt token")
        self.reset()
        rng = np.random.default_rng(seed)
        tokens, logits, stats = [], [], []
        row = None
        for t in prompt_ids:
            row, st = self.step(int(t))
            stats.append(st)
        for i in range(max_new_tokens):
            tok = choose_token(row, greedy, temperature, rng)
            tokens.append(tok)
            logits.append(row)
            if i == max_new_tokens - 1:
                break
            row, st = self.step(tok)
            stats.append(st)
        return np.array(tokens, dtype=np.int64), np.stack(logits), stats
