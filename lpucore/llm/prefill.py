"""Prefill as matrix products: a prompt runs as chunks of P positions, one program run per chunk.

A chunk is the step program of P rows sharing ONE KV cache (:func:`~lpucore.llm.program.build_step` with
``batch=P, shared_cache=True``, ``StepBuilder.chunk_attention``): every matmul streams
the P activation rows through one load of its weights, the P new key and value rows go into the cache by one MEM
Scatter at their positions, and each row attends over the whole cache masked after its own position, which makes
attention causal within the chunk and over the cache before it. Its output is the last row's logits only (the
next token needs nothing else). The last chunk of a prompt that is not a multiple of P is padded with copies of
the prompt's last token at its last position: they write the same key and value rows at the same position (the
scatter's later-of-equal-indices rule changes nothing) and compute the same row, so the chunk's last row is always
the prompt's last token. Every row's arithmetic is the single-token step's: chunked prefill gives the
token-by-token cache and logits bit for bit on the tiny models (``tests/test_llm_prefill.py``), and on
GPT-2-small with more than one layer logits within :data:`~lpucore.llm.decoder.LOGIT_TOLERANCE` of them
(docs/guide/language-models.md, "Prefill").

Where the two programs meet: the chunk program is compiled and loaded into a chip of its own (as a batch's step
program is, :class:`~lpucore.llm.batch.BatchProgram`); after the prompt's last chunk the host copies the cache
states (``k<l>``, ``v<l>``: the same names and shapes in both programs) into the decode chip, which then decodes.
The weights are constants of both programs, written into both chips when they load. The copy is host work only
(counted in the host time, not in the simulated time to first token): on hardware both programs would sit on one
chip with the cache at the same addresses and pay nothing, or, on two chips, the cache would cross a
chip-to-chip link (:func:`cache_copy_seconds` states that cost). Compiling the chunk program with the decode
program's placement of states and constants (one chip, no copy) would need the compiler to take a placement as
given; it does not yet.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, List, Optional, Tuple

import numpy as np

from ..errors import CompileError, LpuError
from .steps import StepStats

if TYPE_CHECKING:
    from .batch import DecoderLike

DEFAULT_CHUNK = 16          # prompt positions per chunk program run (capped by the cache capacity)


class ChunkProgram:
    """The prompt-chunk program of ``rows`` positions of ``dec``'s model, compiled and loaded into a chip of
    its own (module docstring). Raises :class:`~lpucore.errors.CompileError` when it does not fit."""

    def __init__(self, dec: "DecoderLike", rows: int):
        import lpucore

        from ..chip import Chip
        from .program import build_step
        from .steps import _breakdown
        self.rows = int(rows)
        t0 = time.perf_counter()
        graph, self.spans = build_step(dec.cfg, dec.ref.w, dec.ref.quantized, dec.precision, dec.capacity,
                                       dec.block, batch=self.rows, shared_cache=True)
        self.compiled = lpucore.compile(graph, dec.chip_config)
        self.compile_seconds = time.perf_counter() - t0
        self.by_part, self.by_op = _breakdown(self.compiled, self.spans)
        self.chip = Chip(dec.chip_config, engine=dec.engine, fp16_mxm=dec.fp16_mxm)
        self.compiled.load(self.chip)

    @property
    def cycles(self) -> int:
        """The compiler's prediction of one chunk's cycles (a static program: every chunk the same)."""
        return int(self.compiled.expected_cycles)

    def run(self, tokens: np.ndarray, positions: np.ndarray):
        """One chunk: ``tokens``, ``positions`` int ``[rows]`` -> (last row's logits float32 ``[vocab]``, RunStats)."""
        self.chip.reset(clear_memory=False)
        self.compiled.write_inputs(self.chip, {"tok": np.asarray(tokens, np.int32),
                                               "pos": np.asarray(positions, np.int32)})
        st = self.chip.run()
        if not st.finished:
            raise LpuError("a prompt chunk did not finish")
        return self.compiled.read_outputs(self.chip)["logits"].reshape(-1).astype(np.float32), st


def chunk_program(dec: "DecoderLike", rows: int) -> Optional[ChunkProgram]:
    """The chunk program of ``rows`` positions, or of half as many while it does not fit one chip (its
    temporaries grow with the rows); None when not even 2 rows fit (prefill then runs token by token)."""
    while rows > 1:
        try:
            return ChunkProgram(dec, rows)
        except CompileError as e:
            if "does not fit" not in str(e):
                raise
            rows //= 2
    return None


def chunks(ids: np.ndarray, rows: int) -> List[Tuple[np.ndarray, np.ndarray, int]]:
    """The prompt ``ids`` as chunks of ``rows`` positions: ``(tokens, positions, real rows)`` each, the last
    padded with the last token at the last position (module docstring)."""
    out = []
    for a in range(0, len(ids), rows):
        tok = np.asarray(ids[a:a + rows], np.int32)
        pos = np.arange(a, a + len(tok), dtype=np.int32)
        pad = rows - len(tok)
        out.append((np.concatenate([tok, np.repeat(tok[-1:], pad)]),
                    np.concatenate([pos, np.repeat(pos[-1:], pad)]), len(tok)))
    return out


def run_prefill(prog: ChunkProgram, ids: np.ndarray, steps: List[StepStats]):
    """Prefill ``ids`` chunk by chunk on ``prog``'s chip, one :class:`~lpucore.llm.StepStats` per chunk
    appended to ``steps`` (``position`` / ``token``: the chunk's first; ``tokens``: its prompt tokens).
    Returns (the logits of the prompt's last token, the last RunStats)."""
    row, st = None, None
    for tok, pos, real in chunks(ids, prog.rows):
        t0 = time.perf_counter()
        row, st = prog.run(tok, pos)
        steps.append(StepStats(len(steps), "prefill", int(pos[0]), int(tok[0]), st.cycles, st.seconds,
                               st.mxm_utilisation, st.macs, time.perf_counter() - t0, tokens=real))
    assert row is not None and st is not None        # the prompt is not empty
    return row, st


def copy_cache(prog: ChunkProgram, compiled, chip) -> None:
    """Copy the KV cache states from the chunk program's chip into ``chip`` running ``compiled`` (the decode
    step program: the same state names and shapes)."""
    for name, (shape, _d) in prog.compiled.states.items():
        if compiled.states.get(name, (None,))[0] != shape:
            raise LpuError(f"the decode program has no cache state {name}{list(shape)} to take the prefill's")
        chip.write_tensor(name, prog.chip.read_tensor(name))


def cache_copy_seconds(kv_cache_bytes: int, config) -> float:
    """What handing ``kv_cache_bytes`` of prefilled cache from a prefill chip to a decode chip would cost over
    all the chip-to-chip links of ``config`` (a :class:`~lpucore.ChipConfig`); none when both programs share
    one chip, as they would on hardware."""
    return kv_cache_bytes / (config.c2c_links * config.c2c_link_bytes_per_s)
