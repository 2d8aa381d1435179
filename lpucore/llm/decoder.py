"""Decoder-only language models run token by token on the simulated chip.

>>> from lpucore.llm import Decoder
>>> model = Decoder.random("tiny", seed=0, precision="int8", config=ChipConfig.small())   # doctest: +SKIP
>>> result = model.generate([1, 2, 3], max_new_tokens=32)                                # doctest: +SKIP
>>> result.tokens, result.logits, result.stats                                          # doctest: +SKIP

A :class:`Decoder` compiles one *step program* (see :mod:`lpucore.llm.program`) the first time it is needed,
loads it into a :class:`~lpucore.Chip` once (weights and the KV cache then stay in SRAM), and runs it once per
new token (a decode step). A prompt of at least ``prefill_chunk`` tokens is prefilled in chunks of that many
positions by a second program on the same chip (:mod:`lpucore.llm.prefill`: one run per chunk, its rows as
matrix products, the cache written in place);
a shorter one runs one step per token. The program is static, so every
step takes the same number of cycles (attention always spans the whole cache capacity, masked); the figures are
those of the cycle-level run, not estimates.

Numerics against :class:`~lpucore.llm.Reference` (float32 arithmetic over the same rounded weights): the chip
computes with float16 matmul operands, a float16 KV cache and float16 rotary tables, with float32 accumulators,
residual stream, norms and softmax. The logits differ from the reference's by at most
``LOGIT_TOLERANCE`` x (1 + max |reference logit|) at every step on the test models (asserted in
``tests/test_llm_decoder.py``), and greedy tokens are identical.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union, overload

import numpy as np

from ..config import ChipConfig
from ..errors import CompileError, LpuError, ModelDoesNotFit, ModelError
from .continuation import Continuation
from .prefill import DEFAULT_CHUNK, ChunkProgram, chunk_program, copy_cache, run_prefill
from .program import DEFAULT_BLOCK, build_step
from .reference import Reference
from .sampling import SamplingError, SamplingParams
from .shapes import ModelConfig, model_config
from .steps import DecodeStats, GenerateResult, StepStats, _breakdown
from .text import TextError, Tokenizer, check_stop, load_text
from .weights import RandomWeights, load_config, load_pretrained

if TYPE_CHECKING:
    from ..compiler.lower import Compiled
    from .batch import BatchProgram, BatchResult

PRECISIONS = ("fp16", "int8")
LOGIT_TOLERANCE = 0.002    # documented bound (module docstring), relative to 1 + max |logit|
#: largest KV cache (positions) a decoder takes: Mixtral's max_positions, the largest of the named shapes.
#: The rotary tables are sized to the capacity (Graph.rope's max_positions), so this is no compiler limit;
#: what a model fits at a capacity is SRAM's say (ModelDoesNotFit, or the compiler's "does not fit")
MAX_CAPACITY = 32768


def cache_buckets(buckets: Union[None, str, Sequence[int]], capacity: int) -> List[int]:
    """The cache capacities a :class:`Decoder` compiles a step program for, ascending, ``capacity`` last:
    ``None`` just ``capacity``; ``"auto"`` powers of 4 from 128 below it (128, 512, 2,048...); or the
    given capacities (each 1..capacity)."""
    if buckets is None:
        return [capacity]
    if isinstance(buckets, str):
        if buckets != "auto":
            raise ValueError(f"buckets must be 'auto', None or a sequence of capacities, not {buckets!r}")
        out, b = [], 128
        while b < capacity:
            out.append(b)
            b *= 4
        return out + [capacity]
    got = list(buckets)
    if not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and 1 <= b <= capacity for b in got):
        raise ValueError(f"buckets must be capacities 1..{capacity} (the decoder's capacity), not {buckets!r}")
    return sorted({int(b) for b in got} | {capacity})


def _is_batch(prompt) -> bool:
    """Whether ``prompt`` is a list of prompts (texts, id lists or arrays) rather than one prompt."""
    if isinstance(prompt, (str, np.ndarray)) or not isinstance(prompt, (list, tuple)) or not prompt:
        return False
    return all(isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt)


class Decoder:
    """A decoder-only model (llama, mixtral or gpt2 family) on one simulated chip.

    ``cfg`` and ``weights`` (Hugging Face names, see :func:`random_weights`); ``precision`` ``"fp16"`` or
    ``"int8"`` (per-output-channel int8 weights, float16 activations); ``config`` the chip (GroqChip by
    default); ``capacity`` the KV cache size in tokens (default ``min(max_positions, 128)``; at most the model's
    ``max_positions`` and ``MAX_CAPACITY``, 32,768); ``buckets``: cache sizes to compile a step
    program each for (``"auto"``: powers of 4 from 128; ``lpucore.llm.decoder.cache_buckets``), each
    step running the smallest that holds its position, sharing the weights and cache in SRAM (one chip);
    ``engine`` ``"fast"`` or ``"reference"``; ``fp16_mxm`` as for :class:`~lpucore.Chip`; ``block`` the columns
    of an int8 weight kept as one constant (:mod:`lpucore.llm.program`); ``chips`` > 1 splits the model by
    layers over that many chips (:attr:`pipeline`, a :class:`~lpucore.llm.PipelineDecoder`; ``"auto"``: as
    few as hold it, its shards side by side when a block fits no chip whole: ``side_by_side``);
    ``prefill_chunk`` the prompt positions per prefill chunk (default 16, at most ``capacity``; 1: token by
    token; :mod:`lpucore.llm.prefill`). Compilation happens on first use (:meth:`compile`).

    Text: :attr:`tokenizer` (a :class:`~lpucore.llm.text.Tokenizer`) is the model directory's, read by
    :meth:`from_pretrained`; a named shape with random weights has none and takes token ids only
    (:attr:`no_text` says why there is no tokenizer). :attr:`eos_ids` are the end-of-sequence token ids
    :meth:`generate` stops at (the directory's ``config.json``, ``generation_config.json`` and tokenizer;
    none for a named shape).
    """

    tokenizer: Optional[Tokenizer] = None
    eos_ids: FrozenSet[int] = frozenset()
    no_text = "it is a named shape with random weights, which has no tokenizer: give token ids"

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, np.ndarray], precision: str = "fp16",
                 config: Optional[ChipConfig] = None, capacity: Optional[int] = None, engine: str = "fast",
                 fp16_mxm: str = "exact", block: int = DEFAULT_BLOCK, chips: Union[int, str] = 1, comm=None,
                 buckets: Union[None, str, Sequence[int]] = None, prefill_chunk: Optional[int] = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.cfg = cfg
        self.precision = precision
        self.chip_config = config if config is not None else ChipConfig.groqchip1()
        cap = min(cfg.max_positions, 128) if capacity is None else int(capacity)
        if not 1 <= cap <= min(cfg.max_positions, MAX_CAPACITY):
            raise ValueError(f"capacity must be 1..{min(cfg.max_positions, MAX_CAPACITY)} tokens "
                             f"({cfg.name}'s max_positions {cfg.max_positions}, and MAX_CAPACITY {MAX_CAPACITY}), "
                             f"not {capacity}")
        self.capacity = cap
        self.engine, self.fp16_mxm, self.block = engine, fp16_mxm, block
        self.comm = comm
        self.chips = self.chips_needed(cfg, precision, self.chip_config, cap, chips)
        # chips="auto" for a model with a block no chip holds whole: its shards side by side (PipelineDecoder)
        self.side_by_side = False
        if chips == "auto" and self.chips > 1:
            from .pipeline import plan_auto
            self.side_by_side = plan_auto(cfg, precision, cap, self.chip_config)[1]
        self.buckets = cache_buckets(buckets, cap)
        if len(self.buckets) > 1 and self.chips > 1:
            raise ValueError("cache buckets are for a decoder on one chip (chips=1)")
        self.bucket_programs: Dict[int, Compiled] = {}     # smaller buckets' step programs (compile)
        self._loaded = cap                                 # the bucket whose program the chip has loaded
        self.last_bucket = cap
        self._pipeline = None
        self._weights = weights
        self.ref = Reference(cfg, weights, precision)      # the rounded / quantised weights both use
        self.compiled: Optional[Compiled] = None
        self.compile_seconds = 0.0
        self._chip = None
        self._batches: Dict[int, "BatchProgram"] = {}     # batch size -> its step program (batch_program)
        self.position = 0
        self.prefill_chunk = self._chunk_size(prefill_chunk, cap)
        self._prefill: Optional[ChunkProgram] = None       # the chunk program (prefill_program)
        self._chunked: Optional[ChunkProgram] = None       # ... if the last generate's prefill ran on it

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def random(cls, name_or_config: Union[str, ModelConfig], seed: int = 0, precision: str = "fp16",
               **kw) -> "Decoder":
        """A model of a named shape (:data:`~lpucore.llm.SHAPES`) or a :class:`ModelConfig`, random weights."""
        cfg = model_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
        cls.chips_needed(cfg, precision, kw.get("config"), kw.get("capacity"), kw.get("chips", 1))
        # tensors are made as the model reads them: a 7B model's never all exist at float precision
        return cls(cfg, RandomWeights(cfg, seed), precision, **kw)

    @classmethod
    def from_pretrained(cls, path, precision: str = "fp16", *, allow_nonfinite: bool = False,
                        max_bytes: Optional[int] = None, **kw) -> "Decoder":
        """A Hugging Face directory (``config.json`` + ``*.safetensors``; needs ``lpucore[llm]``), with its
        tokenizer, chat template and end-of-sequence ids when it has ``tokenizer.json`` (+ ``tokenizer_config.json``;
        needs ``lpucore[text]``, else the model takes token ids only, :mod:`lpucore.llm.text`).

        The directory is untrusted: a malformed, oversized or escaping file raises
        :class:`~lpucore.errors.ModelError` naming it (see :func:`~lpucore.llm.load_pretrained`, which takes
        ``allow_nonfinite`` and ``max_bytes``). The fit in SRAM is checked from ``config.json`` before any
        weight is read."""
        cfg = load_config(path)
        cls.chips_needed(cfg, precision, kw.get("config"), kw.get("capacity"), kw.get("chips", 1))
        tokenizer, eos_ids, no_text = load_text(path, cfg.vocab_size)
        cfg, weights = load_pretrained(path, allow_nonfinite=allow_nonfinite, max_bytes=max_bytes)
        model = cls(cfg, weights, precision, **kw)
        model.tokenizer, model.eos_ids = tokenizer, eos_ids
        if no_text is not None:
            model.no_text = no_text
        return model

    # ---- sizes -----------------------------------------------------------------------------------------
    @staticmethod
    def memory_bytes(cfg: ModelConfig, precision: str, capacity: int) -> Tuple[int, int]:
        """(weight bytes, KV-cache bytes) the model ``cfg`` takes in SRAM at ``precision`` with a
        cache of ``capacity`` positions (what :meth:`chips_needed` divides among chips)."""
        w = cfg.weight_bytes(precision)
        if precision == "int8" and cfg.tie_embeddings:
            # the tied table is kept twice: [vocab, d] rows to gather, [d, vocab] for the head
            w += cfg.vocab_size * cfg.d_model
        else:
            w += cfg.vocab_size * cfg.d_model * 2 if cfg.tie_embeddings else 0
        return w, cfg.kv_cache_bytes(capacity)

    @classmethod
    def chips_needed(cls, cfg, precision, config, capacity, chips=1) -> int:
        """How many chips of configuration ``config`` (None: a GroqChip) the model ``cfg`` (a
        :class:`ModelConfig`) needs at ``precision`` with a KV cache of ``capacity`` positions:
        ``chips`` itself if they suffice, or the fewest for ``chips="auto"``. Raises
        :class:`ModelDoesNotFit` saying how many it takes (ValueError for a bad precision)."""
        from .pipeline import plan_auto, plan_stages
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        chip = config if config is not None else ChipConfig.groqchip1()
        cap = min(cfg.max_positions, 128) if capacity is None else int(capacity)
        w, kv = cls.memory_bytes(cfg, precision, cap)
        need = w + kv
        if chips == "auto":
            return 1 if need <= chip.sram_bytes else len(plan_auto(cfg, precision, cap, chip)[0])
        if isinstance(chips, bool) or not isinstance(chips, (int, np.integer)) or chips < 1:
            raise ValueError(f"chips must be a positive number of chips or 'auto', not {chips!r}")
        chips = int(chips)
        if chips > 1:
            plan_stages(cfg, precision, cap, chip, chips)        # raises ModelDoesNotFit / ValueError
            return chips
        if need > chip.sram_bytes:
            head = (f"{cfg.name} ({precision}) needs {need / 1e6:,.1f} MB of SRAM for its weights "
                    f"({w / 1e6:,.1f} MB) and a {cap}-token KV cache ({kv / 1e6:,.1f} MB); one {chip.name} has "
                    f"{chip.sram_bytes / 1e6:,.1f} MB, so it needs at least {math.ceil(need / chip.sram_bytes)} chips")
            try:
                least = len(plan_stages(cfg, precision, cap, chip))
            except ModelDoesNotFit as e:
                raise ModelDoesNotFit(f"{head}; but {e}") from None
            raise ModelDoesNotFit(
                f"{head}, and {least} as pipeline stages (Decoder(..., chips={least}) or chips='auto' splits it "
                f"over a System" + ("; or try precision='int8')" if precision != "int8" else ")"))
        return 1

    def check_fit(self) -> None:
        """Raise :class:`ModelDoesNotFit` unless weights + KV cache fit in the chips' SRAM (one chip's,
        or every pipeline stage's, :func:`~lpucore.llm.pipeline.plan_stages`)."""
        self.chips_needed(self.cfg, self.precision, self.chip_config, self.capacity, self.chips)

    @property
    def pipeline(self):
        """The model split by layers over ``chips`` chips (:class:`~lpucore.llm.PipelineDecoder`,
        created on first use); for ``chips=1`` the :class:`Decoder` itself runs the model."""
        if self.chips == 1:
            raise LpuError("this Decoder runs on one chip: Decoder(..., chips=N) makes a pipeline")
        if self._pipeline is None:
            from .pipeline import PipelineDecoder
            self._pipeline = PipelineDecoder(self, self.chips, comm=self.comm, parallel_shards=self.side_by_side)
        return self._pipeline

    @property
    def weight_bytes(self) -> int:
        return self.memory_bytes(self.cfg, self.precision, self.capacity)[0]

    # ---- compile and run -------------------------------------------------------------------------------
    def compile(self) -> Compiled:
        """Build and compile the step program (once); returns the :class:`~lpucore.Compiled`."""
        if self.chips > 1:
            raise LpuError(f"this Decoder spans {self.chips} chips: run it through decoder.pipeline")
        if self.compiled is None:
            import lpucore

            from ..compiler.api import compile_sharing
            from ..compiler.lower import Compiler
            t0 = time.perf_counter()
            graph, self.spans = build_step(self.cfg, self.ref.w, self.ref.quantized, self.precision,
                                           self.capacity, self.block)
            if len(self.buckets) == 1:
                self.compiled = lpucore.compile(graph, self.chip_config)
            else:       # the full cache's program, then each smaller bucket's at its addresses
                self.compiled = Compiler(graph, self.chip_config).run()
                for b in self.buckets[:-1]:
                    small, _ = build_step(self.cfg, self.ref.w, self.ref.quantized, self.precision, b, self.block)
                    self.bucket_programs[b] = prog = compile_sharing(small, self.compiled)
                    lost = sorted(set(prog.states) - prog.shared)
                    if lost:
                        raise CompileError(f"the {b}-position program could not keep its KV cache {lost[:3]} "
                                           f"at the {self.capacity}-position program's addresses")
            self.compile_seconds = time.perf_counter() - t0
            self.by_part, self.by_op = _breakdown(self.compiled, self.spans)
        return self.compiled

    def program_for(self, position: int) -> Tuple[int, Compiled]:
        """(bucket, step program) of a step at ``position``: the smallest bucket holding position + 1."""
        compiled = self.compile()
        b = next(b for b in self.buckets if b > position)
        return b, (compiled if b == self.capacity else self.bucket_programs[b])

    @property
    def chip(self):
        """The chip holding the model (created and loaded on first use)."""
        if self._chip is None:
            from ..chip import Chip
            compiled = self.compile()
            self._chip = Chip(self.chip_config, engine=self.engine, fp16_mxm=self.fp16_mxm)
            compiled.load(self._chip)
        return self._chip

    def reset(self) -> None:
        """Start a new sequence: the cache is emptied (positions past the new sequence's are masked, so the
        old entries need not be cleared; they are overwritten as the sequence grows)."""
        self.position = 0

    def step(self, token: int):
        """Feed ``token`` at the next position: returns (logits float32 [vocab], RunStats)."""
        if not 0 <= int(token) < self.cfg.vocab_size:
            raise ValueError(f"token id {token} out of range: {self.cfg.name} has vocab_size {self.cfg.vocab_size}")
        if self.position >= self.capacity:
            raise ValueError(f"the KV cache is full: {self.capacity} positions (Decoder(capacity=...))")
        chip = self.chip                                   # compiled and loaded on first use
        bucket, compiled = self.program_for(self.position)
        if bucket != self._loaded or chip.program is not compiled.program:
            # the weights and the cache are where both programs keep them; the smaller program's own
            # constants (its rotary tables, masks) may have been overwritten by the other's temporaries (or a
            # chunk program's, lpucore.llm.prefill, which leaves the full program's constants alone)
            chip.load(compiled.program)
            if bucket != self.capacity:
                for name in compiled.private_constants():
                    compiled.write_constant(chip, name, compiled.constants[name])
            self._loaded = bucket
        self.last_bucket = bucket
        chip.reset(clear_memory=False)
        compiled.write_inputs(chip, {"tok": np.array([token], np.int32), "pos": np.array([self.position], np.int32)})
        stats = chip.run()
        if not stats.finished:
            raise LpuError(f"step at position {self.position} did not finish")
        self.position += 1
        return compiled.read_outputs(chip)["logits"].reshape(-1).astype(np.float32), stats

    @overload
    def generate(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = 32, greedy: Optional[bool] = None,
                 temperature: Optional[float] = None, seed: Optional[int] = 0, eos_id: Optional[int] = None,
                 on_token: Optional[Callable[[int, StepStats], None]] = None, *, top_k: int = 0, top_p: float = 1.0,
                 stop: Union[str, Sequence[str], None] = None, ignore_eos: bool = False,
                 on_text: Optional[Callable[[str], None]] = None,
                 sampling: Optional[SamplingParams] = None) -> GenerateResult: ...

    @overload
    def generate(self, prompt: List[Union[str, Sequence[int], np.ndarray]], max_new_tokens: int = 32,
                 greedy: Optional[bool] = None, temperature: Optional[float] = None, seed: Optional[int] = 0,
                 eos_id: Optional[int] = None, on_token: Optional[Callable[[int, int, StepStats], None]] = None, *,
                 top_k: int = 0, top_p: float = 1.0, stop: Union[str, Sequence[str], None] = None,
                 ignore_eos: bool = False, on_text: None = None,
                 sampling: Optional[SamplingParams] = None) -> "BatchResult": ...

    def generate(self, prompt, max_new_tokens: int = 32, greedy: Optional[bool] = None,
                 temperature: Optional[float] = None, seed: Optional[int] = 0, eos_id: Optional[int] = None,
                 on_token: Optional[Callable] = None, *, top_k: int = 0, top_p: float = 1.0,
                 stop: Union[str, Sequence[str], None] = None, ignore_eos: bool = False,
                 on_text: Optional[Callable[[str], None]] = None,
                 sampling: Optional[SamplingParams] = None):
        """Prefill ``prompt`` (a new sequence), then generate up to ``max_new_tokens`` tokens.

        ``prompt`` is token ids, or text when the model has a tokenizer (:attr:`tokenizer`, read by
        :meth:`from_pretrained`; encoded with its special tokens, e.g. a BOS); text given to a model without
        one raises :class:`~lpucore.errors.ModelError`. The result (:class:`GenerateResult`) has the new ids,
        the logits each was chosen from and the chip's statistics, and with a tokenizer also the new text.

        Token choice (:mod:`lpucore.llm.sampling`, on the host from the chip's logits: no chip cycles): greedy
        by default (argmax, lowest id on ties); ``temperature`` > 0 (or ``greedy=False``, temperature 1) samples
        with ``top_k`` / ``top_p`` from ``np.random.default_rng(seed)``; or ``sampling`` (a
        :class:`SamplingParams`) says it all. Generation stops after an end-of-sequence token (``eos_id``, else
        the model's :attr:`eos_ids`; never with ``ignore_eos``), included in ``tokens`` but not in the text, or
        when the text holds one of the ``stop`` strings (the text ends before it; needs a tokenizer).
        ``on_token(token, step_stats)`` is called as each new token is chosen, ``on_text(piece)`` with each
        piece of new text as it can be shown (the pieces add up to ``result.text``).

        A list of prompts (lists of ids, arrays or texts) is a batch (:mod:`lpucore.llm.batch`): the B
        sequences share one step program of B rows, each with its own KV cache, position, sampler and stop
        conditions, and the result is a :class:`~lpucore.llm.batch.BatchResult` (a sequence of
        :class:`GenerateResult`, and ``.stats`` the batch's :class:`~lpucore.llm.batch.BatchStats`);
        ``on_token(row, token, step_stats)`` and ``on_text`` is not taken. Raises
        :class:`ModelDoesNotFit` (how many chips it needs) when the weights and B caches do not fit one chip.
        """
        if _is_batch(prompt):
            return self._generate_batch(prompt, max_new_tokens, greedy, temperature, seed, eos_id, on_token,
                                        top_k=top_k, top_p=top_p, stop=stop, ignore_eos=ignore_eos,
                                        on_text=on_text, sampling=sampling)
        ids, prompt_text = self._prompt_ids(prompt)
        if sampling is None:
            sampling = SamplingParams.resolve(greedy, temperature, top_k, top_p, seed)
        elif greedy is not None or temperature is not None or top_k != 0 or top_p != 1.0:
            raise SamplingError("give sampling=SamplingParams(...) or greedy/temperature/top_k/top_p, not both")
        if self.tokenizer is None and (check_stop(stop) or on_text is not None):
            self._tokenizer()               # raises: stop strings and text need a tokenizer
        eos = () if ignore_eos else ([int(eos_id)] if eos_id is not None else self.eos_ids)
        self._check_lengths(ids, max_new_tokens)
        seq = Continuation(ids.tolist(), max_new_tokens, sampling, tokenizer=self.tokenizer, stop=stop,
                           eos_ids=eos, on_text=on_text)
        compiled = self.compile()
        if len(ids) >= self.prefill_chunk > 1:
            self.prefill_program()          # compiled and loaded before the clock starts, as the step program
        self.reset()
        steps: List[StepStats] = []
        t_start = time.perf_counter()
        row, last = self._prefill_prompt(ids, steps)
        while not seq.finished:
            tok = seq.step(row)
            if on_token is not None:
                on_token(tok, steps[-1])
            if not seq.finished:
                row, last = self._timed_step(tok, "decode", steps)
        seq.close()
        stats = self._decode_stats(compiled, steps, last, len(ids), len(seq.tokens), time.perf_counter() - t_start)
        logits = np.stack(seq.logits) if seq.logits else np.zeros((0, self.cfg.vocab_size), np.float32)
        return GenerateResult(np.asarray(seq.tokens, dtype=np.int64), logits, stats, text=seq.text,
                              finish_reason=seq.finish_reason or "length", prompt_ids=ids, prompt_text=prompt_text,
                              stop_string=seq.stop_string)

    def batch_program(self, batch: int, like=None) -> "BatchProgram":
        """The compiled and loaded step program of ``batch`` sequences (:class:`~lpucore.llm.batch.BatchProgram`,
        made on first use and kept; ``like``: reuse that program's compilation). ``batch`` 1 builds the
        single-sequence graph (the same program as :meth:`compile`'s) on a chip of its own."""
        from .batch import BatchProgram
        if batch not in self._batches:
            self._batches[batch] = BatchProgram(self, batch, like)
        return self._batches[batch]

    def drop_batch_program(self, batch: int) -> None:
        """Forget the program of ``batch`` sequences and its chip (host memory); made again when needed."""
        self._batches.pop(batch, None)

    def _generate_batch(self, prompts, max_new_tokens, greedy, temperature, seed, eos_id, on_token, *, top_k,
                        top_p, stop, ignore_eos, on_text, sampling):
        """:meth:`generate` of a list of prompts (see there); a :class:`~lpucore.llm.batch.BatchResult`."""
        from .batch import BatchResult, _Row, batch_fit, run_batch
        if on_text is not None:
            raise ValueError("on_text streams one sequence: a batch's texts are in its results")
        if sampling is None:
            sampling = SamplingParams.resolve(greedy, temperature, top_k, top_p, seed)
        elif greedy is not None or temperature is not None or top_k != 0 or top_p != 1.0:
            raise SamplingError("give sampling=SamplingParams(...) or greedy/temperature/top_k/top_p, not both")
        if self.tokenizer is None and check_stop(stop):
            self._tokenizer()
        eos = () if ignore_eos else ([int(eos_id)] if eos_id is not None else self.eos_ids)
        parsed = [self._prompt_ids(p) for p in prompts]
        for ids, _ in parsed:
            self._check_lengths(ids, max_new_tokens)
        batch_fit(self, len(parsed))
        rows = [_Row(ids, Continuation(ids.tolist(), max_new_tokens, sampling, tokenizer=self.tokenizer, stop=stop,
                                       eos_ids=eos)) for ids, _ in parsed]
        prog = self.batch_program(len(rows))
        steps, last, wall = run_batch(self, prog, rows, on_token)
        stats = self._batch_stats(prog, rows, steps, last, wall)
        results = []
        for r, (ids, text) in zip(rows, parsed):
            r.seq.close()
            seq = r.seq
            logits = np.stack(seq.logits) if seq.logits else np.zeros((0, self.cfg.vocab_size), np.float32)
            st = self._row_stats(prog, stats, r, len(seq.tokens))
            results.append(GenerateResult(np.asarray(seq.tokens, dtype=np.int64), logits, st, text=seq.text,
                                          finish_reason=seq.finish_reason or "length", prompt_ids=ids,
                                          prompt_text=text, stop_string=seq.stop_string))
        return BatchResult(results, stats)

    def _batch_stats(self, prog, rows, steps, last, wall):
        """The :class:`~lpucore.llm.batch.BatchStats` of a batched run."""
        from .batch import BatchStats
        cfg, compiled = self.chip_config, prog.compiled
        w, kv = self.memory_bytes(self.cfg, self.precision, self.capacity)
        by_unit = {} if last is None else {u: int(v.get("busy_cycles", 0)) for u, v in last.by_unit.items()}
        chunk = next((r.chunk for r in rows if r.chunk is not None), None)     # the rows' chunk programs
        made = {id(c): c for c in prog.chunks.values() if c is not None}
        return BatchStats(
            model=self.cfg.name, precision=self.precision, chip=cfg.name, clock_hz=cfg.clock_hz, batch=prog.batch,
            capacity=self.capacity, prompt_tokens=[len(r.ids) for r in rows],
            new_tokens=[len(r.seq.tokens) for r in rows],
            step_cycles=last.cycles if last is not None else compiled.expected_cycles,
            predicted_cycles=compiled.expected_cycles,
            mxm_utilisation=last.mxm_utilisation if last is not None else 0.0, sram_bytes=compiled.memory_bytes,
            sram_capacity=cfg.sram_bytes, weight_bytes=w, kv_cache_bytes=kv * prog.batch, by_unit=by_unit,
            by_part=dict(prog.by_part), by_op=dict(prog.by_op), wall_seconds=wall, steps=steps,
            compile_seconds=prog.compile_seconds + sum(c.compile_seconds for c in made.values()),
            prefill_chunk=chunk.rows if chunk is not None else 1, prefill_route=chunk.route if chunk else "",
            chunk_cycles=next((s.cycles for s in steps if s.chunk_tokens), 0),
            chunk_predicted_cycles=chunk.cycles if chunk is not None else 0,
            ttft_cycles=[r.first_cycles or 0 for r in rows])

    def _row_stats(self, prog, bs, r, new_tokens: int) -> DecodeStats:
        """One sequence's :class:`DecodeStats` in a batch (``r`` its :class:`~lpucore.llm.batch._Row`): its own
        steps, the batch's program figures, its time to first token on the batch's clock (rows prefilled by
        chunks before it count)."""
        chunk = r.chunk         # the chunk program that prefilled it, or None: token by token
        ttft = r.first_cycles or 0
        return DecodeStats(
            model=bs.model, precision=bs.precision, chip=bs.chip, clock_hz=bs.clock_hz, capacity=bs.capacity,
            prompt_tokens=len(r.ids), new_tokens=new_tokens, step_cycles=bs.step_cycles,
            predicted_cycles=bs.predicted_cycles, ttft_seconds=ttft / bs.clock_hz, ttft_cycles=ttft,
            tokens_per_second=bs.tokens_per_second_per_user, mxm_utilisation=bs.mxm_utilisation,
            sram_bytes=bs.sram_bytes, sram_capacity=bs.sram_capacity, weight_bytes=bs.weight_bytes,
            kv_cache_bytes=bs.kv_cache_bytes // bs.batch, by_unit=dict(bs.by_unit), by_part=dict(bs.by_part),
            by_op=dict(bs.by_op), compile_seconds=bs.compile_seconds, wall_seconds=bs.wall_seconds, steps=r.steps,
            bounds=prog.compiled.bounds().as_dict(), prefill_chunk=chunk.rows if chunk else 1,
            prefill_route=chunk.route if chunk else "", chunk_cycles=r.steps[0].cycles if chunk else 0,
            chunk_predicted_cycles=chunk.cycles if chunk else 0,
            chunk_mxm_utilisation=r.steps[0].mxm_utilisation if chunk else 0.0,
            chunk_bounds=chunk.compiled.bounds().as_dict() if chunk else {})

    def chat(self, messages: Sequence[Mapping[str, object]], max_new_tokens: int = 32, *,
             add_generation_prompt: bool = True, template_vars: Optional[Mapping[str, object]] = None,
             **kw) -> GenerateResult:
        """Generate the reply to ``messages`` (``[{"role": "user", "content": "..."}, ...]``): the model's chat
        template renders them (as transformers' ``apply_chat_template`` does, :meth:`Tokenizer.apply_chat_template`;
        ``template_vars`` are further template variables), the text is encoded without adding special tokens (the
        template has them), and :meth:`generate` (``kw``: its sampling, stop and callback arguments) continues it.
        ``result.prompt_text`` is the rendered chat."""
        tk = self._tokenizer()
        rendered = tk.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                          **dict(template_vars or {}))
        ids = tk.encode(rendered, add_special_tokens=False)
        if not ids:
            raise TextError("the chat template rendered no tokens")
        res = self.generate(ids, max_new_tokens, **kw)
        res.prompt_text = rendered
        return res

    # ---- generate's parts -------------------------------------------------------------------------------
    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ModelError(f"{self.cfg.name} cannot take or give text: {self.no_text}")
        return self.tokenizer

    def _prompt_ids(self, prompt) -> Tuple[np.ndarray, Optional[str]]:
        """(prompt token ids, the prompt's text or None), checked."""
        text = None
        if isinstance(prompt, str):
            text = prompt
            prompt = self._tokenizer().encode(prompt)
            if not prompt:
                raise TextError(f"the prompt {text!r} encodes to no tokens"[:300])
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt_ids must be a non-empty 1-D sequence of integers (or text), got {prompt!r}"
                             [:300])
        bad = (ids < 0) | (ids >= self.cfg.vocab_size)
        if bad.any():
            raise ValueError(f"token id {int(ids[bad][0])} out of range: {self.cfg.name} has vocab_size "
                             f"{self.cfg.vocab_size}")
        return ids.astype(np.int64), text

    def _check_lengths(self, ids: np.ndarray, max_new_tokens: int) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, not {max_new_tokens!r}")
        need = ids.size + max(max_new_tokens - 1, 0)
        if need > self.capacity:
            raise ValueError(f"{ids.size} prompt tokens + {max_new_tokens} new tokens need {need} cache "
                             f"positions; this decoder has {self.capacity} (Decoder(capacity=...))")

    @staticmethod
    def _chunk_size(chunk: Optional[int], capacity: int) -> int:
        """``prefill_chunk`` checked: prompt positions per chunk, :data:`~lpucore.llm.prefill.DEFAULT_CHUNK`
        by default, at most the cache capacity."""
        if chunk is None:
            return min(DEFAULT_CHUNK, capacity)
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or not 1 <= chunk <= capacity:
            raise ValueError(f"prefill_chunk must be 1..{capacity} prompt positions (the cache capacity; 1: "
                             f"token by token), not {chunk!r}")
        return int(chunk)

    def _sharing_base(self) -> Compiled:
        """The step program with its placements (what :func:`~lpucore.compiler.api.compile_sharing` places a
        second program against). One read from the compile cache has none: it is compiled again here (the
        same program, so the chip holding it keeps it)."""
        compiled = self.compile()
        if not compiled.layout:
            from ..compiler.api import compile_one
            graph, _ = build_step(self.cfg, self.ref.w, self.ref.quantized, self.precision, self.capacity,
                                  self.block)
            self.compiled = compile_one(graph, self.chip_config)
            if self._chip is not None and self._loaded == self.capacity:
                self._chip.load(self.compiled.program)
            return self.compiled
        return compiled

    def prefill_program(self) -> Optional[ChunkProgram]:
        """The prompt-chunk program (:class:`~lpucore.llm.prefill.ChunkProgram`, compiled on first use, of
        ``prefill_chunk`` positions or fewer when that does not fit), sharing the step program's chip, weights
        and cache (``route`` "one chip"), or on a chip of its own when that does not fit; None for
        ``prefill_chunk=1`` or when not even 2 positions fit."""
        if self.prefill_chunk == 1:
            return None
        if self._prefill is None or self._prefill.rows > self.prefill_chunk:
            base = self._sharing_base()
            self._prefill = chunk_program(self, self.prefill_chunk, base, self.chip)
            if self._prefill is None:       # nothing fits: token by token from now on
                self.prefill_chunk = 1
        return self._prefill

    def _prefill_prompt(self, ids: np.ndarray, steps: List[StepStats]):
        """Feed the prompt ``ids`` from position 0 (the :class:`StepStats` appended to ``steps``): in chunks
        (:mod:`lpucore.llm.prefill`) when it fills at least one and the chunk program's predicted cycles for it
        are fewer than a step per token, else token by token (a shorter prompt would need a chunk program of
        fewer rows: another compile). Returns (logits of the last token, RunStats)."""
        compiled = self.compile()
        prog = self.prefill_program() if len(ids) >= self.prefill_chunk > 1 else None
        self._chunked = None
        if prog is not None and -(-len(ids) // prog.rows) * prog.cycles < len(ids) * compiled.expected_cycles:
            row, last = run_prefill(prog, ids, steps)
            if prog.shared:     # the cache is written in place; the next step loads its program back
                self._loaded = 0
            else:               # the decode chip takes the prefilled cache
                copy_cache(prog, compiled, self.chip)
            self.position = len(ids)
            self._chunked = prog
            return row, last
        row, last = None, None
        for tok in ids:
            row, last = self._timed_step(tok, "prefill", steps)
        assert row is not None and last is not None      # the prompt is not empty
        return row, last

    def _timed_step(self, tok, phase: str, steps: List[StepStats]):
        """:meth:`step` with its StepStats appended to ``steps``: (logits, RunStats)."""
        t0 = time.perf_counter()
        pos = self.position
        row, st = self.step(int(tok))
        steps.append(StepStats(len(steps), phase, pos, int(tok), st.cycles, st.seconds, st.mxm_utilisation,
                               st.macs, time.perf_counter() - t0, self.last_bucket))
        return row, st

    def _decode_stats(self, compiled: Compiled, steps: List[StepStats], last, prompt_tokens: int, new_tokens: int,
                      wall: float) -> DecodeStats:
        cfg = self.chip_config
        prefill = [s for s in steps if s.phase == "prefill"]
        # the step program's figures from its last run (a decode step, or a token-by-token prefill step)
        prog = self._chunked
        one = [s for s in steps if s.phase == "decode" or prog is None]
        chunked = prefill if prog is not None else []
        step_cycles = one[-1].cycles if one else compiled.expected_cycles
        by_unit = {u: int(v.get("busy_cycles", 0)) for u, v in last.by_unit.items()}
        w, kv = self.memory_bytes(self.cfg, self.precision, self.capacity)
        return DecodeStats(
            model=self.cfg.name, precision=self.precision, chip=cfg.name, clock_hz=cfg.clock_hz,
            capacity=self.capacity, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
            step_cycles=step_cycles, predicted_cycles=compiled.expected_cycles,
            ttft_seconds=sum(s.seconds for s in prefill), tokens_per_second=cfg.clock_hz / step_cycles,
            mxm_utilisation=one[-1].mxm_utilisation if one else 0.0, sram_bytes=compiled.memory_bytes,
            sram_capacity=cfg.sram_bytes, weight_bytes=w, kv_cache_bytes=kv, by_unit=by_unit,
            by_part=dict(self.by_part), by_op=dict(self.by_op),
            compile_seconds=self.compile_seconds + (prog.compile_seconds if prog is not None else 0.0),
            wall_seconds=wall, steps=steps, bounds=compiled.bounds().as_dict(),
            prefill_chunk=prog.rows if prog is not None else 1, ttft_cycles=sum(s.cycles for s in prefill),
            chunk_cycles=chunked[-1].cycles if chunked else 0,
            chunk_predicted_cycles=prog.cycles if prog is not None else 0,
            chunk_mxm_utilisation=chunked[-1].mxm_utilisation if chunked else 0.0,
            chunk_bounds=prog.compiled.bounds().as_dict() if prog is not None else {},
            prefill_route=prog.route if prog is not None else "",
            bucket_cycles={b: (self.bucket_programs[b] if b != self.capacity else compiled).expected_cycles
                           for b in self.buckets})

    def reference(self) -> Reference:
        """A fresh NumPy :class:`Reference` of the same model, weights and precision (sharing this
        decoder's prepared weights, so a big model's are not made twice)."""
        return Reference(self.cfg, self.ref.w, self.precision)

    def __repr__(self):
        # the prefill route once the chunk program is made (lpucore.llm.prefill: one chip, or own chip + copy)
        route = f", prefill_chunk={self._prefill.rows} ({self._prefill.route})" if self._prefill is not None else ""
        return (f"Decoder({self.cfg.name!r}, precision={self.precision!r}, chip={self.chip_config.name!r}, "
                f"capacity={self.capacity}{route})")
