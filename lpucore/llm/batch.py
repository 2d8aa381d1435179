"""Batched decode: B sequences share one step program on one chip.

>>> res = model.generate([[1, 2, 3], [7, 8]], max_new_tokens=16)                   # doctest: +SKIP
>>> res[0].tokens, res[1].finish_reason, print(res.stats.table())                  # doctest: +SKIP

The step program of a batch (:func:`~lpucore.llm.program.build_step` with ``batch=B``) takes B token ids and B
positions (int32 ``[B]``) and returns B rows of logits. Every matmul streams the B activation rows through one
load of its weights (the MXM holds a weight tile and takes the rows one after the other), so a step costs the
weights' streaming once for the B sequences; each sequence has KV cache states of its own (``k<l>_b<b>``,
``v<l>_b<b>``), written at its own position by MEM Scatter and attended with its own mask, so sequences of
different lengths share a step and each finishes on its own: the host feeds each row its next prompt token
(prefill, one token per step as for one sequence) or its last new token (decode), and a finished row runs on a
dummy token (id 0, position 0 of its own cache) with its output ignored until the whole batch has finished.
Each row's arithmetic is the single-sequence program's, row for row, so greedy tokens are those of decoding
each sequence alone and the logits are within the same bound of the reference
(:data:`~lpucore.llm.decoder.LOGIT_TOLERANCE`).

Why B cache states rather than one ``[B * S, D]`` state with a block mask: a tensor lives in one hemisphere
of the chip, so one state would cap the batch's cache at half the SRAM; B states are placed independently,
each attention is the single-sequence attention (its lowering and numerics unchanged), and the B chains have
no data between them, so the scheduler overlaps one sequence's softmax (VXM) with another's head sums (MXM).
A prompt chunk (several positions of one sequence in one step) is the same program with the rows sharing one
cache under a causal mask: rows are (token, position) pairs either way, which is what continuous batching
mixes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import numpy as np

from ..errors import CompileError, LpuError, ModelDoesNotFit
from .continuation import Continuation
from .prefill import DecoderLike
from .steps import GenerateResult

if TYPE_CHECKING:
    from .prefill import ChunkProgram


@dataclass
class BatchStepStats:
    """One step of a batch: how many rows fed a prompt token (``prefill``), a new token (``decode``) or
    nothing (``idle``, finished); ``new_tokens`` chosen from its logits; simulated ``cycles`` / ``seconds``."""

    index: int
    prefill: int
    decode: int
    idle: int
    new_tokens: int
    cycles: int
    seconds: float
    mxm_utilisation: float      # fraction of MXM plane-cycles busy
    macs: int
    wall_seconds: float         # host time to simulate the step
    chunk_tokens: int = 0       # a prompt chunk of one row (lpucore.llm.prefill): its prompt tokens; 0 a step

    @property
    def tokens_per_second(self) -> float:
        """Aggregate: the new tokens of this step over its simulated time."""
        return self.new_tokens / self.seconds if self.seconds else 0.0


@dataclass
class BatchStats:
    """Figures of one batched :meth:`Decoder.generate <lpucore.llm.Decoder.generate>` (simulated time at
    ``clock_hz``; SRAM in bytes)."""

    model: str
    precision: str
    chip: str
    clock_hz: float
    batch: int                  # sequences sharing the step program
    capacity: int               # KV cache positions per sequence
    prompt_tokens: List[int]
    new_tokens: List[int]
    step_cycles: int            # cycles of one step (static program: every step the same)
    predicted_cycles: int       # the compiler's prediction of step_cycles
    mxm_utilisation: float
    sram_bytes: int             # SRAM the batched step program uses
    sram_capacity: int
    weight_bytes: int
    kv_cache_bytes: int         # all B caches
    by_unit: Dict[str, int]
    by_part: Dict[str, int]
    by_op: Dict[str, int]
    compile_seconds: float
    wall_seconds: float
    steps: List[BatchStepStats] = field(default_factory=list)
    # chunked prefill (module docstring, "Prefill"): the rows per chunk (1: every row token by token), where the
    # chunk programs ran, one chunk's cycles (and the compiler's prediction), and each row's simulated time to
    # first token (cycles from the batch's start to the end of the run that chose its first token)
    prefill_chunk: int = 1
    prefill_route: str = ""
    chunk_cycles: int = 0
    chunk_predicted_cycles: int = 0
    ttft_cycles: List[int] = field(default_factory=list)

    @property
    def step_seconds(self) -> float:
        return self.step_cycles / self.clock_hz

    @property
    def tokens_per_second_per_user(self) -> float:
        """One token per step for each decoding sequence."""
        return self.clock_hz / self.step_cycles

    @property
    def peak_tokens_per_second(self) -> float:
        """Aggregate with every row decoding: ``batch`` tokens per step."""
        return self.batch * self.tokens_per_second_per_user

    @property
    def tokens_per_second(self) -> float:
        """Aggregate over the whole run: all new tokens over all steps' simulated time (prefill included)."""
        t = sum(s.seconds for s in self.steps)
        return sum(self.new_tokens) / t if t else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(step_seconds=self.step_seconds, tokens_per_second_per_user=self.tokens_per_second_per_user,
                 peak_tokens_per_second=self.peak_tokens_per_second, tokens_per_second=self.tokens_per_second)
        return d

    def table(self, steps: bool = True) -> str:
        """A readable summary; ``steps``: and one line per step."""
        us = 1e6
        rows = [
            ("model", f"{self.model} ({self.precision}) on one {self.chip} at {self.clock_hz / 1e6:.0f} MHz"),
            ("batch", f"{self.batch} sequences; prompts {self.prompt_tokens} tokens, new {self.new_tokens}; "
                      f"KV cache {self.capacity} positions each"),
            ("cycles per step", f"{self.step_cycles:,} (compiler predicted {self.predicted_cycles:,})"),
            ("latency per step", f"{self.step_seconds * us:.2f} us"),
            ("tokens/s per user", f"{self.tokens_per_second_per_user:,.0f}"),
            ("tokens/s aggregate", f"{self.peak_tokens_per_second:,.0f} with all {self.batch} rows decoding; "
                                   f"{self.tokens_per_second:,.0f} over this run ({len(self.steps)} steps)"),
            ("time to first token", ", ".join(f"{c / self.clock_hz * us:.2f}" for c in self.ttft_cycles)
             + " us by row" + ("" if self.prefill_chunk == 1 else
                               f" (prompt chunks of {self.prefill_chunk} positions, {self.prefill_route}: "
                               f"{self.chunk_cycles:,} cycles each, predicted {self.chunk_predicted_cycles:,})")),
            ("MXM utilisation", f"{100 * self.mxm_utilisation:.1f} %"),
            ("SRAM in use", f"{self.sram_bytes / 1e6:.1f} MB of {self.sram_capacity / 1e6:.1f} MB "
                            f"(weights {self.weight_bytes / 1e6:.1f} MB, "
                            f"KV caches {self.kv_cache_bytes / 1e6:.2f} MB)"),
            ("host", f"compile {self.compile_seconds:.1f} s, simulate {self.wall_seconds:.2f} s"),
        ]
        w = max(len(k) for k, _ in rows)
        out = [f"{k:<{w}}  {v}" for k, v in rows]
        for title, d in (("cycles by part", self.by_part), ("busy cycles by unit", self.by_unit)):
            total = sum(d.values()) or 1
            items = sorted(d.items(), key=lambda kv: -kv[1])
            out.append(f"{title}: " + ", ".join(f"{k} {v:,} ({100 * v / total:.0f} %)" for k, v in items if v))
        if steps:
            out.append("step  prefill decode idle  new  tokens/s aggregate  tokens/s per user  MXM util")
            for s in self.steps:
                per_user = self.clock_hz / s.cycles if s.decode or s.new_tokens else 0.0
                out.append(f"{s.index:>4}  {s.prefill:>7} {s.decode:>6} {s.idle:>4} {s.new_tokens:>4}  "
                           f"{s.tokens_per_second:>18,.0f}  {per_user:>17,.0f}  {100 * s.mxm_utilisation:>7.1f} %")
        return "\n".join(out)


class BatchResult(Sequence):
    """What a batched :meth:`Decoder.generate <lpucore.llm.Decoder.generate>` returns: one
    :class:`~lpucore.llm.GenerateResult` per prompt, in order (``result[i]``, ``len(result)``, iteration), each
    with its own :class:`~lpucore.llm.DecodeStats` (its steps; the batch's step cycles), and :attr:`stats`, the
    batch's :class:`BatchStats`."""

    def __init__(self, results: List["GenerateResult"], stats: BatchStats):
        self.results, self.stats = results, stats

    def __getitem__(self, i):
        return self.results[i]

    def __len__(self) -> int:
        return len(self.results)

    @property
    def tokens(self) -> List[np.ndarray]:
        return [r.tokens for r in self.results]

    def __repr__(self):
        return f"BatchResult({len(self)} sequences, {sum(self.stats.new_tokens)} new tokens)"


def batch_fit(dec: DecoderLike, batch: int) -> None:
    """Raise :class:`~lpucore.errors.ModelDoesNotFit` unless the weights and ``batch`` KV caches of
    ``dec.capacity`` positions fit one chip's SRAM, saying how many chips they need and how many sequences
    would fit; :class:`~lpucore.errors.LpuError` for a decoder spread over several chips."""
    from .pipeline import plan_stages
    cfg, chip, cap = dec.cfg, dec.chip_config, dec.capacity
    w, kv = dec.memory_bytes(cfg, dec.precision, cap)
    need = w + batch * kv
    if dec.chips > 1:
        raise LpuError(f"{cfg.name} ({dec.precision}) runs on {dec.chips} chips: batched decode runs on one chip "
                       f"(batches over pipeline stages are not built yet); give one prompt at a time")
    if need <= chip.sram_bytes:
        return
    fits = max(0, int((chip.sram_bytes - w) // kv)) if kv else 0
    head = (f"{batch} sequences of {cfg.name} ({dec.precision}) need {need / 1e6:,.1f} MB of SRAM: weights "
            f"{w / 1e6:,.1f} MB and {batch} KV caches of {cap} positions ({kv / 1e6:,.2f} MB each); one "
            f"{chip.name} has {chip.sram_bytes / 1e6:,.1f} MB, so they need at least "
            f"{math.ceil(need / chip.sram_bytes)} chips")
    try:
        least = f", {len(plan_stages(cfg, dec.precision, cap * batch, chip))} as pipeline stages"
    except (ModelDoesNotFit, ValueError):
        least = ""
    raise ModelDoesNotFit(f"{head}{least}; one chip holds at most {fits} such sequences (fewer prompts, or a "
                          f"smaller Decoder(capacity=...))")


class BatchProgram:
    """The step program of ``batch`` sequences for a :class:`~lpucore.llm.Decoder`, compiled and loaded into
    a chip of its own (of the decoder's engine; for one sequence, the decoder's own program and chip).
    ``like``: another decoder's program of the same model and batch, whose compiled program is reused (no
    compile; e.g. the same program on the other engine)."""

    def __init__(self, dec: DecoderLike, batch: int, like: Optional["BatchProgram"] = None):
        import lpucore

        from ..chip import Chip
        from ..compiler.api import compile_one
        from .program import build_step
        from .steps import _breakdown
        batch_fit(dec, batch)
        self.chunks: Dict[int, Optional[ChunkProgram]] = {}     # row -> its chunk program (chunk_program)
        self.batch: int = batch
        # the chunk programs are compiled against this program (compile_sharing), which needs its placements:
        # a program read from the compile cache has none
        chunked = dec.prefill_chunk > 1
        if like is None and batch == 1:     # the single-sequence program and chip
            self.compiled = dec._sharing_base() if chunked else dec.compile()
            self.spans, self.compile_seconds = dec.spans, dec.compile_seconds
        elif like is not None:
            if like.batch != batch:
                raise ValueError(f"like is a program of {like.batch} sequences, not {batch}")
            self.spans, self.compiled, self.compile_seconds = like.spans, like.compiled, 0.0
        else:
            t0 = time.perf_counter()
            graph, self.spans = build_step(dec.cfg, dec.ref.w, dec.ref.quantized, dec.precision, dec.capacity,
                                           dec.block, batch=batch)
            try:
                self.compiled = (compile_one if chunked else lpucore.compile)(graph, dec.chip_config)
            except CompileError as e:
                if "does not fit" not in str(e):
                    raise
                w, kv = dec.memory_bytes(dec.cfg, dec.precision, dec.capacity)
                raise ModelDoesNotFit(
                    f"the step program of {batch} sequences of {dec.cfg.name} ({dec.precision}) does not fit one "
                    f"{dec.chip_config.name}: weights and {batch} KV caches take {(w + batch * kv) / 1e6:,.1f} MB, "
                    f"and its temporaries the rest, so it needs at least 2 chips (batches over pipeline stages "
                    f"are not built; fewer sequences or a smaller capacity fit one): {e}") from None
            self.compile_seconds = time.perf_counter() - t0
        self.by_part, self.by_op = _breakdown(self.compiled, self.spans)
        if like is None and batch == 1:
            self.chip = dec.chip
        else:
            self.chip = Chip(dec.chip_config, engine=dec.engine, fp16_mxm=dec.fp16_mxm)
            self.compiled.load(self.chip)

    def chunk_program(self, dec: DecoderLike, row: int) -> Optional[ChunkProgram]:
        """The prompt-chunk program filling row ``row``'s cache (:mod:`lpucore.llm.prefill`; made on first use and
        kept): for one sequence the decoder's own; else compiled against this program with that row's cache
        states (``build_step(..., cache_row=row)``), on this chip. None when prefill runs token by token:
        ``prefill_chunk`` 1, no chunk fits, or the rows' caches are one stacked state (one query head per kv
        head, module docstring), which a chunk program cannot address by row."""
        from .prefill import chunk_program  # prefill's types name this module's: imported when used
        if dec.prefill_chunk == 1:
            return None
        if row not in self.chunks:
            if self.chip is dec.chip:
                self.chunks[row] = dec.prefill_program()
            elif f"k0_b{row}" not in self.compiled.states:
                self.chunks[row] = None
            else:
                self.chunks[row] = chunk_program(dec, dec.prefill_chunk, self.compiled, self.chip, row)
        return self.chunks[row]

    def prefill_row(self, dec: DecoderLike, row: int, ids: np.ndarray, steps: list):
        """Prefill the prompt ``ids`` into row ``row``'s cache by its chunk program, when it has one, the prompt
        fills a chunk and the chunks are predicted faster than a step per token (as one sequence's,
        :meth:`Decoder._prefill_prompt <lpucore.llm.Decoder>`); one StepStats per chunk appended to ``steps``.
        Returns (the prompt's last logits, the chunk program), or None (then the row prefills token by token in
        the batch's steps)."""
        from .prefill import copy_cache, run_prefill
        known = self.chunks.get(row)        # a program made already may have fewer rows than asked (halved)
        if dec.prefill_chunk == 1 or len(ids) < (known.rows if known is not None else dec.prefill_chunk):
            return None
        prog = self.chunk_program(dec, row)
        if prog is None or len(ids) < prog.rows or \
                -(-len(ids) // prog.rows) * prog.cycles >= len(ids) * self.compiled.expected_cycles:
            return None
        logits, _ = run_prefill(prog, ids, steps)
        if not prog.shared:     # the own-chip route: the row's cache states (same names) into this chip
            copy_cache(prog, self.compiled, self.chip)
        return logits, prog

    def step(self, tokens: np.ndarray, positions: np.ndarray):
        """One step: ``tokens``, ``positions`` int ``[B]`` -> (logits float32 ``[B, vocab]``, RunStats)."""
        if self.chip.program is not self.compiled.program:
            # a chunk program ran on this chip: its constants never touched this program's
            self.chip.load(self.compiled.program)
        self.chip.reset(clear_memory=False)
        self.compiled.write_inputs(self.chip, {"tok": np.asarray(tokens, np.int32),
                                               "pos": np.asarray(positions, np.int32)})
        st = self.chip.run()
        if not st.finished:
            raise LpuError("a batched step did not finish")
        return self.compiled.read_outputs(self.chip)["logits"].reshape(self.batch, -1).astype(np.float32), st


class _Row:
    """One sequence's host bookkeeping in a batch: its prompt, where it is, and its continuation."""

    def __init__(self, ids: np.ndarray, seq: Continuation):
        self.ids, self.seq = ids, seq
        self.fed = 0            # tokens fed so far (= the position of the next one)
        self.next = int(ids[0])
        self.steps: list = []   # its StepStats
        self.first_cycles: Optional[int] = None     # the batch's simulated clock when its first token was chosen
        self.chunk: Optional[ChunkProgram] = None   # the chunk program that prefilled it (None: token by token)

    @property
    def phase(self) -> str:
        if self.seq.finished:
            return "idle"
        return "prefill" if self.fed < len(self.ids) else "decode"


def _prefill_chunks(dec: DecoderLike, prog: BatchProgram, rows: List[_Row], steps: List[BatchStepStats],
                    on_token) -> int:
    """Before the batch's steps: each live row whose prompt its chunk program takes is prefilled by it, one
    row after the other (:meth:`BatchProgram.prefill_row`), and chooses its first token. Returns the simulated
    clock after them (cycles)."""
    clock = 0
    for b, r in enumerate(rows):
        if r.seq.finished:
            continue
        got = prog.prefill_row(dec, b, r.ids, r.steps)
        if got is None:
            continue
        logits, r.chunk = got
        for s in r.steps:
            clock += s.cycles
            steps.append(BatchStepStats(len(steps), 1, 0, len(rows) - 1, 0, s.cycles, s.seconds, s.mxm_utilisation,
                                        s.macs, s.wall_seconds, chunk_tokens=s.tokens))
        steps[-1].new_tokens = 1
        r.fed, r.first_cycles = len(r.ids), clock
        r.next = r.seq.step(logits)
        if on_token is not None:
            on_token(b, r.next, r.steps[-1])
    return clock


def run_batch(dec: DecoderLike, prog: BatchProgram, rows: List[_Row], on_token=None):
    """Prefill the rows whose prompts fill a chunk by their chunk programs (``_prefill_chunks``), then step
    ``prog`` until every row has finished: per step, each row feeds its next prompt token or its last new token
    at its own position (a finished row a dummy token at position 0); the logits of a row's last prompt token
    and of its new tokens go to its continuation. Each row's ``first_cycles`` is the simulated clock when its
    first token was chosen. Returns (BatchStepStats list, last RunStats of a step, wall seconds)."""
    from .steps import StepStats
    B = len(rows)
    steps: List[BatchStepStats] = []
    t_start = time.perf_counter()
    clock = _prefill_chunks(dec, prog, rows, steps, on_token)
    last = None
    while not all(r.seq.finished for r in rows):
        phases = [r.phase for r in rows]
        live = [p != "idle" for p in phases]
        toks = np.array([r.next if a else 0 for r, a in zip(rows, live)], np.int32)
        pos = np.array([r.fed if a else 0 for r, a in zip(rows, live)], np.int32)
        t0 = time.perf_counter()
        logits, last = prog.step(toks, pos)
        wall = time.perf_counter() - t0
        clock += last.cycles
        new = 0
        for b, (r, ph) in enumerate(zip(rows, phases)):
            if ph == "idle":
                continue
            r.steps.append(StepStats(len(r.steps), ph, r.fed, r.next, last.cycles, last.seconds,
                                     last.mxm_utilisation, last.macs, wall))
            r.fed += 1
            if r.fed < len(r.ids):
                r.next = int(r.ids[r.fed])
                continue
            r.next = r.seq.step(logits[b])
            if r.first_cycles is None:
                r.first_cycles = clock
            new += 1
            if on_token is not None:
                on_token(b, r.next, r.steps[-1])
        steps.append(BatchStepStats(len(steps), phases.count("prefill"), phases.count("decode"),
                                    phases.count("idle"), new, last.cycles, last.seconds, last.mxm_utilisation,
                                    last.macs, wall))
        assert B == len(phases)
    return steps, last, time.perf_counter() - t_start
