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

Where the two programs meet: one chip. The chunk program is compiled against the decode program
(``lpucore.compiler.api.compile_sharing``): its weights, other shared constants and the cache states
(``k<l>``, ``v<l>``: the same names and shapes) are placed at the decode program's addresses, and nothing else of
it touches an address the decode program keeps a constant or state at. Both programs are then loaded into the
decoder's chip in turn: entering the chunk program loads its instructions and writes only its private constants
(its masks, rotary tables and scatter bases, ``Compiled.private_constants()``: the
decode program's temporaries may have overwritten them), the chunks write the cache in place, and the next decode
step loads the decode program back (its constants were never touched). No copy, no second chip, the weights in
SRAM once. Only when that shared placement does not fit (the chunk's temporaries need room the decode program's
constants and states leave free) does the chunk program run on a chip of its own, as it did before
compile_sharing: the weights are then written into both chips and after the prompt's last chunk the host copies
the cache states into the decode chip (:func:`copy_cache`; host work, not counted in the simulated time to first
token; on hardware the cache would cross a chip-to-chip link, :func:`cache_copy_seconds`). Which route ran is
:attr:`ChunkProgram.route` (``DecodeStats.prefill_route``, and the decoder's repr).

A batch's sequences (:mod:`lpucore.llm.batch`) have cache states of their own (``k<l>_b<row>``): a chunk program
is compiled per row (``build_step(..., cache_row=row)``, sharing that row's states with the batch's step
program), since a program's addresses are fixed at compile time and the compiler has no cache index parameter.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, List, Optional, Protocol, Tuple

import numpy as np

from ..errors import CompileError, LpuError
from .steps import StepStats

if TYPE_CHECKING:
    from ..chip import Chip
    from ..compiler.lower import Compiled
    from ..config import ChipConfig
    from .reference import Reference
    from .shapes import ModelConfig

DEFAULT_CHUNK = 16          # prompt positions per chunk program run (capped by the cache capacity)


class DecoderLike(Protocol):
    """What a batch and a chunk program use of a :class:`~lpucore.llm.Decoder`: its model, chip and step
    program (a protocol, so that this module, which the decoder imports, does not import it back)."""

    cfg: ModelConfig
    precision: str
    chip_config: ChipConfig
    capacity: int
    chips: int
    engine: str
    fp16_mxm: str
    block: int
    ref: Reference
    spans: List[Tuple[str, int, int]]
    compile_seconds: float
    prefill_chunk: int

    @property
    def chip(self) -> Chip: ...

    def compile(self) -> Compiled: ...

    def _sharing_base(self) -> Compiled: ...

    def prefill_program(self) -> Optional[ChunkProgram]: ...

    @staticmethod
    def memory_bytes(cfg: ModelConfig, precision: str, capacity: int) -> Tuple[int, int]: ...


ONE_CHIP = "one chip"                   # ChunkProgram.route: sharing the decode program's chip and cache
OWN_CHIP = "own chip + copy"            # ... on a chip of its own, the cache copied after the prompt


class ChunkProgram:
    """The prompt-chunk program of ``rows`` positions of ``dec``'s model (module docstring). With ``base`` (the
    decode program, compiled in this process) and ``chip`` (the chip holding it) it is compiled to share their
    weights and cache and runs on that chip; without, on a chip of its own. ``cache_row``: the chunk fills that
    row's cache of a batch's step program (``base``). Raises :class:`~lpucore.errors.CompileError` when it
    does not fit ("does not fit" in its message)."""

    def __init__(self, dec: "DecoderLike", rows: int, base=None, chip=None, cache_row: Optional[int] = None):
        import lpucore

        from ..chip import Chip
        from ..compiler.api import compile_sharing
        from .program import build_step
        from .steps import _breakdown
        self.rows = int(rows)
        t0 = time.perf_counter()
        graph, self.spans = build_step(dec.cfg, dec.ref.w, dec.ref.quantized, dec.precision, dec.capacity,
                                       dec.block, batch=self.rows, shared_cache=True, cache_row=cache_row)
        self.shared = base is not None
        if self.shared:
            self.compiled = compile_sharing(graph, base)
            lost = sorted(set(self.compiled.states) - self.compiled.shared)
            if lost:        # a cache elsewhere would not be the decode program's: no use
                raise CompileError(f"the chunk program's cache {lost[:3]} does not fit at the decode program's "
                                   f"addresses")
        else:
            self.compiled = lpucore.compile(graph, dec.chip_config)
        self.compile_seconds = time.perf_counter() - t0
        self.by_part, self.by_op = _breakdown(self.compiled, self.spans)
        if self.shared:
            self.chip = chip
        else:
            self.chip = Chip(dec.chip_config, engine=dec.engine, fp16_mxm=dec.fp16_mxm)
            self.compiled.load(self.chip)

    @property
    def route(self) -> str:
        """``ONE_CHIP`` (the decode program's chip, cache written in place) or ``OWN_CHIP``."""
        return ONE_CHIP if self.shared else OWN_CHIP

    @property
    def cycles(self) -> int:
        """The compiler's prediction of one chunk's cycles (a static program: every chunk the same)."""
        return int(self.compiled.expected_cycles)

    def enter(self) -> None:
        """Make this the program the chip runs: its instructions and its private constants (the shared ones
        are in place; the other program's temporaries may have overwritten the private ones). Nothing when
        it is loaded already."""
        if self.chip.program is self.compiled.program:
            return
        self.chip.load(self.compiled.program)
        for name in self.compiled.private_constants():
            self.compiled.write_constant(self.chip, name, self.compiled.constants[name])

    def run(self, tokens: np.ndarray, positions: np.ndarray):
        """One chunk: ``tokens``, ``positions`` int ``[rows]`` -> (last row's logits float32 ``[vocab]``, RunStats)."""
        self.enter()
        self.chip.reset(clear_memory=False)
        self.compiled.write_inputs(self.chip, {"tok": np.asarray(tokens, np.int32),
                                               "pos": np.asarray(positions, np.int32)})
        st = self.chip.run()
        if not st.finished:
            raise LpuError("a prompt chunk did not finish")
        return self.compiled.read_outputs(self.chip)["logits"].reshape(-1).astype(np.float32), st


def chunk_program(dec: "DecoderLike", rows: int, base=None, chip=None,
                  cache_row: Optional[int] = None) -> Optional[ChunkProgram]:
    """The chunk program of ``rows`` positions, or of half as many while it does not fit (its temporaries
    grow with the rows): sharing ``base``'s chip when given (:class:`ChunkProgram`) at any of those sizes,
    else (or when no size fits beside ``base``) on a chip of its own; None when not even 2 rows fit (prefill
    then runs token by token)."""
    for share in ((True, False) if base is not None else (False,)):
        r = rows
        while r > 1:
            try:
                return (ChunkProgram(dec, r, base, chip, cache_row) if share else
                        ChunkProgram(dec, r, cache_row=cache_row))
            except CompileError as e:
                if "does not fit" not in str(e):
                    raise
                r //= 2
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
    """Copy the KV cache states from the chunk program's own chip into ``chip`` running ``compiled`` (the
    decode step program: the same state names and shapes); the ``OWN_CHIP`` route only."""
    for name, (shape, _d) in prog.compiled.states.items():
        if compiled.states.get(name, (None,))[0] != shape:
            raise LpuError(f"the decode program has no cache state {name}{list(shape)} to take the prefill's")
        chip.write_tensor(name, prog.chip.read_tensor(name))


def cache_copy_seconds(kv_cache_bytes: int, config) -> float:
    """What handing ``kv_cache_bytes`` of prefilled cache from a prefill chip to a decode chip would cost over
    all the chip-to-chip links of ``config`` (a :class:`~lpucore.ChipConfig`); none when both programs share
    one chip, as they would on hardware."""
    return kv_cache_bytes / (config.c2c_links * config.c2c_link_bytes_per_s)
