"""Decoder-only language models run token by token on the simulated chip.

>>> from lpucore.llm import Decoder
>>> model = Decoder.random("tiny", seed=0, precision="int8", config=ChipConfig.small())   # doctest: +SKIP
>>> result = model.generate([1, 2, 3], max_new_tokens=32)                                # doctest: +SKIP
>>> result.tokens, result.logits, result.stats                                          # doctest: +SKIP

A :class:`Decoder` compiles one *step program* (see :mod:`lpucore.llm.program`) the first time it is needed,
loads it into a :class:`~lpucore.Chip` once (weights and the KV cache then stay in SRAM), and runs it once per
token: each prompt token is one prefill step, each new token one decode step. The program is static, so every
step takes the same number of cycles (attention always spans the whole cache capacity, masked); the figures are
those of the cycle-level run, not estimates.

Numerics against :class:`~lpucore.llm.Reference` (float32 arithmetic over the same rounded weights): the chip
computes with float16 matmul operands, a float16 KV cache and float16 rotary tables, with float32 accumulators,
residual stream, norms and softmax. The logits differ from the reference's by at most
``LOGIT_TOLERANCE`` x (1 + max |reference logit|) at every step on the test models (asserted in
``tests/test_llm_decoder.py``), and greedy tokens are identical.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..config import ChipConfig
from ..errors import LpuError, ModelDoesNotFit
from .program import DEFAULT_BLOCK, build_step
from .reference import Reference, choose_token
from .shapes import ModelConfig, model_config
from .weights import RandomWeights, load_config, load_pretrained

if TYPE_CHECKING:
    from ..compiler.lower import Compiled

PRECISIONS = ("fp16", "int8")
LOGIT_TOLERANCE = 0.002    # documented bound (module docstring), relative to 1 + max |logit|
MAX_CAPACITY = 2048        # rotary tables of the compiler cover positions 0..2047


@dataclass
class StepStats:
    """One step: the token fed in at ``position``; ``cycles`` of the chip, ``seconds`` at its clock."""

    index: int
    phase: str                  # "prefill" or "decode"
    position: int
    token: int
    cycles: int
    seconds: float
    mxm_utilisation: float      # fraction of MXM plane-cycles busy
    macs: int
    wall_seconds: float         # host time to simulate the step


@dataclass
class DecodeStats:
    """Figures of one :meth:`Decoder.generate` (simulated time at ``clock_hz``; SRAM in bytes)."""

    model: str
    precision: str
    chip: str
    clock_hz: float
    capacity: int               # KV cache positions (tokens)
    prompt_tokens: int
    new_tokens: int
    step_cycles: int            # cycles of one step (every step runs the same static program)
    predicted_cycles: int       # the compiler's prediction of step_cycles
    ttft_seconds: float         # time to first token: every prefill step
    tokens_per_second: float    # per user, decode steps
    mxm_utilisation: float
    sram_bytes: int             # SRAM the step program uses (weights, cache, temporaries)
    sram_capacity: int
    weight_bytes: int
    kv_cache_bytes: int
    by_unit: Dict[str, int]     # busy cycles of one step per functional unit
    by_part: Dict[str, int]     # cycles of one step attributed to model parts (embed, attn, kv, mlp, head, ...)
    by_op: Dict[str, int]       # ... and to graph operations (matmul, cast, softmax, ...)
    compile_seconds: float
    wall_seconds: float
    steps: List[StepStats] = field(default_factory=list)
    bounds: Dict[str, float] = field(default_factory=dict)   # lower bounds of one step (cycles, by name)

    @property
    def schedule_efficiency(self) -> float:
        """The largest bound over the step's cycles (lpucore.compiler.bounds); 0 without bounds."""
        return max(self.bounds.values()) / self.step_cycles if self.bounds and self.step_cycles else 0.0

    @property
    def step_seconds(self) -> float:
        return self.step_cycles / self.clock_hz

    def to_dict(self) -> dict:
        d = asdict(self)
        d["step_seconds"] = self.step_seconds
        return d

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def _bound_line(self) -> str:
        """The largest lower bound of a step, which it is, and the schedule efficiency."""
        if not self.bounds:
            return ""
        name = max(self.bounds, key=lambda k: self.bounds[k])
        others = ", ".join(f"{k} {v:,.0f}" for k, v in self.bounds.items() if k != name)
        return (f"{self.bounds[name]:,.0f} cycles ({name}); schedule efficiency "
                f"{100 * self.schedule_efficiency:.1f} % (other bounds: {others})")

    def table(self) -> str:
        """A readable summary."""
        us = 1e6
        rows = [
            ("model", f"{self.model} ({self.precision}) on one {self.chip} at {self.clock_hz / 1e6:.0f} MHz"),
            ("tokens", f"{self.prompt_tokens} prompt + {self.new_tokens} new; KV cache {self.capacity} positions"),
            ("cycles per step", f"{self.step_cycles:,} (compiler predicted {self.predicted_cycles:,})"),
            ("schedule bound", self._bound_line()),
            ("latency per step", f"{self.step_seconds * us:.2f} us"),
            ("time to first token", f"{self.ttft_seconds * us:.2f} us ({self.prompt_tokens} prefill steps)"),
            ("tokens/s per user", f"{self.tokens_per_second:,.0f}"),
            ("MXM utilisation", f"{100 * self.mxm_utilisation:.1f} %"),
            ("SRAM in use", f"{self.sram_bytes / 1e6:.1f} MB of {self.sram_capacity / 1e6:.1f} MB "
                            f"(weights {self.weight_bytes / 1e6:.1f} MB, KV cache {self.kv_cache_bytes / 1e6:.2f} MB)"),
            ("host", f"compile {self.compile_seconds:.1f} s, simulate {self.wall_seconds:.2f} s "
                     f"({self.wall_seconds / max(1, len(self.steps)) * 1e3:.1f} ms per step)"),
        ]
        w = max(len(k) for k, _ in rows)
        out = [f"{k:<{w}}  {v}" for k, v in rows if v]
        for title, d in (("cycles by part", self.by_part), ("cycles by operation", self.by_op),
                         ("busy cycles by unit", self.by_unit)):
            total = sum(d.values()) or 1
            items = sorted(d.items(), key=lambda kv: -kv[1])
            out.append(f"{title}: " + ", ".join(f"{k} {v:,} ({100 * v / total:.0f} %)" for k, v in items if v))
        return "\n".join(out)


@dataclass
class GenerateResult:
    tokens: np.ndarray          # int64 [n] new tokens
    logits: np.ndarray          # float32 [n, vocab]: logits[i] are those token i was chosen from
    stats: DecodeStats


def _breakdown(compiled: Compiled, spans: List[Tuple[str, int, int]]) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Cycles of one step attributed to model parts and graph operations.

    A kernel's share is how far it pushes the latest result-landing cycle beyond every earlier kernel's
    (kernels overlap, so a kernel hidden under an earlier one costs nothing); what follows the last kernel
    (the cache write-back and the pipeline drain) goes to ``kv`` / ``writeback``. An operation fused into
    its consumer (landing cycle None, :mod:`lpucore.compiler.fuse`) has no kernel: the consumer's op
    and part get its cycles."""
    label_of: Dict[int, str] = {}
    for label, a, b in spans:
        for i in range(a, b):
            label_of[i] = label
    by_part: Dict[str, int] = {}
    by_op: Dict[str, int] = {}
    front = 0
    for i, (op, _name, last) in enumerate(compiled.kernels):
        if last is None or last <= front:
            continue
        d = int(last - front)
        front = int(last)
        lab = label_of.get(i, "other")
        by_part[lab] = by_part.get(lab, 0) + d
        by_op[op] = by_op.get(op, 0) + d
    rest = int(compiled.expected_cycles - front)
    if rest > 0:
        by_part["kv"] = by_part.get("kv", 0) + rest
        by_op["writeback"] = by_op.get("writeback", 0) + rest
    return by_part, by_op


class Decoder:
    """A decoder-only model (llama, mixtral or gpt2 family) on one simulated chip.

    ``cfg`` and ``weights`` (Hugging Face names, see :func:`random_weights`); ``precision`` ``"fp16"`` or
    ``"int8"`` (per-output-channel int8 weights, float16 activations); ``config`` the chip (GroqChip by
    default); ``capacity`` the KV cache size in tokens (default ``min(max_positions, 128)``; at most 2048);
    ``engine`` ``"fast"`` or ``"reference"``; ``fp16_mxm`` as for :class:`~lpucore.Chip`; ``block`` the columns
    of an int8 weight kept as one constant (:mod:`lpucore.llm.program`); ``chips`` > 1 splits the model by
    layers over that many chips (:attr:`pipeline`, a :class:`~lpucore.llm.PipelineDecoder`).
    Compilation happens on first use (:meth:`compile`).
    """

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, np.ndarray], precision: str = "fp16",
                 config: Optional[ChipConfig] = None, capacity: Optional[int] = None, engine: str = "fast",
                 fp16_mxm: str = "exact", block: int = DEFAULT_BLOCK, chips: Union[int, str] = 1, comm=None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.cfg = cfg
        self.precision = precision
        self.chip_config = config if config is not None else ChipConfig.groqchip1()
        cap = min(cfg.max_positions, 128) if capacity is None else int(capacity)
        if not 1 <= cap <= min(cfg.max_positions, MAX_CAPACITY):
            raise ValueError(f"capacity must be 1..{min(cfg.max_positions, MAX_CAPACITY)} tokens "
                             f"({cfg.name}'s max_positions, and the rotary tables' 2048), not {capacity}")
        self.capacity = cap
        self.engine, self.fp16_mxm, self.block = engine, fp16_mxm, block
        self.comm = comm
        self.chips = self.chips_needed(cfg, precision, self.chip_config, cap, chips)
        self._pipeline = None
        self._weights = weights
        self.ref = Reference(cfg, weights, precision)      # the rounded / quantised weights both use
        self.compiled: Optional[Compiled] = None
        self.compile_seconds = 0.0
        self._chip = None
        self.position = 0

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
        """A Hugging Face directory (``config.json`` + ``*.safetensors``; needs ``lpucore[llm]``).

        The directory is untrusted: a malformed, oversized or escaping file raises
        :class:`~lpucore.errors.ModelError` naming it (see :func:`~lpucore.llm.load_pretrained`, which takes
        ``allow_nonfinite`` and ``max_bytes``). The fit in SRAM is checked from ``config.json`` before any
        weight is read."""
        cfg = load_config(path)
        cls.chips_needed(cfg, precision, kw.get("config"), kw.get("capacity"), kw.get("chips", 1))
        cfg, weights = load_pretrained(path, allow_nonfinite=allow_nonfinite, max_bytes=max_bytes)
        return cls(cfg, weights, precision, **kw)

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
        from .pipeline import plan_stages
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        chip = config if config is not None else ChipConfig.groqchip1()
        cap = min(cfg.max_positions, 128) if capacity is None else int(capacity)
        w, kv = cls.memory_bytes(cfg, precision, cap)
        need = w + kv
        if chips == "auto":
            return 1 if need <= chip.sram_bytes else len(plan_stages(cfg, precision, cap, chip))
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
            self._pipeline = PipelineDecoder(self, self.chips, comm=self.comm)
        return self._pipeline

    @property
    def weight_bytes(self) -> int:
        return self.memory_bytes(self.cfg, self.precision, self.capacity)[0]

    # ---- compile and run -------------------------------------------------------------------------------
    def compile(self) -> Compiled:
        """Build and compile the step program (once); returns the :class:`~lpucore.compiler.Compiled`."""
        if self.chips > 1:
            raise LpuError(f"this Decoder spans {self.chips} chips: run it through decoder.pipeline")
        if self.compiled is None:
            import lpucore
            t0 = time.perf_counter()
            graph, self.spans = build_step(self.cfg, self.ref.w, self.ref.quantized, self.precision,
                                           self.capacity, self.block)
            self.compiled = lpucore.compile(graph, self.chip_config)
            self.compile_seconds = time.perf_counter() - t0
            self.by_part, self.by_op = _breakdown(self.compiled, self.spans)
        return self.compiled

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
        chip, compiled = self.chip, self.compile()        # compiled and loaded on first use
        chip.reset(clear_memory=False)
        compiled.write_inputs(chip, {"tok": np.array([token], np.int32), "pos": np.array([self.position], np.int32)})
        stats = chip.run()
        if not stats.finished:
            raise LpuError(f"step at position {self.position} did not finish")
        self.position += 1
        return compiled.read_outputs(chip)["logits"].reshape(-1).astype(np.float32), stats

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 32, greedy: bool = True,
                 temperature: float = 1.0, seed: Optional[int] = 0, eos_id: Optional[int] = None,
                 on_token: Optional[Callable[[int, StepStats], None]] = None) -> GenerateResult:
        """Prefill ``prompt_ids`` (a new sequence), then generate up to ``max_new_tokens`` tokens.

        Token choice as :meth:`Reference.generate` (greedy argmax, lowest id on ties; or sampling with
        ``np.random.default_rng(seed)``). ``on_token(token, step_stats)`` is called as each new token is chosen.
        """
        prompt = np.asarray(prompt_ids)
        if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
            raise ValueError(f"prompt_ids must be a non-empty 1-D sequence of integers, got {prompt_ids!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, not {max_new_tokens}")
        if not greedy and not temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, not {temperature}")
        bad = (prompt < 0) | (prompt >= self.cfg.vocab_size)
        if bad.any():
            raise ValueError(f"token id {int(prompt[bad][0])} out of range: {self.cfg.name} has vocab_size "
                             f"{self.cfg.vocab_size}")
        need = prompt.size + max(max_new_tokens - 1, 0)
        if need > self.capacity:
            raise ValueError(f"{prompt.size} prompt tokens + {max_new_tokens} new tokens need {need} cache "
                             f"positions; this decoder has {self.capacity} (Decoder(capacity=...))")
        compiled = self.compile()
        self.reset()
        rng = np.random.default_rng(seed)
        steps: List[StepStats] = []
        tokens, logits = [], []
        t_start = time.perf_counter()
        last_stats = None

        def run(tok, phase):
            nonlocal last_stats
            t0 = time.perf_counter()
            pos = self.position
            row, st = self.step(int(tok))
            last_stats = st
            steps.append(StepStats(len(steps), phase, pos, int(tok), st.cycles, st.seconds, st.mxm_utilisation,
                                   st.macs, time.perf_counter() - t0))
            return row

        row = None
        for tok in prompt:
            row = run(tok, "prefill")
        assert row is not None and last_stats is not None      # the prompt is not empty
        for i in range(max_new_tokens):
            tok = choose_token(row, greedy, temperature, rng)
            tokens.append(tok)
            logits.append(row)
            if on_token is not None:
                on_token(tok, steps[-1])
            if (eos_id is not None and tok == eos_id) or i == max_new_tokens - 1:
                break
            row = run(tok, "decode")
        wall = time.perf_counter() - t_start
        cfg = self.chip_config
        step_cycles = steps[-1].cycles
        prefill = [s for s in steps if s.phase == "prefill"]
        by_unit = {u: int(v.get("busy_cycles", 0)) for u, v in last_stats.by_unit.items()}
        w, kv = self.memory_bytes(self.cfg, self.precision, self.capacity)
        stats = DecodeStats(
            model=self.cfg.name, precision=self.precision, chip=cfg.name, clock_hz=cfg.clock_hz,
            capacity=self.capacity, prompt_tokens=int(prompt.size), new_tokens=len(tokens),
            step_cycles=step_cycles, predicted_cycles=compiled.expected_cycles,
            ttft_seconds=sum(s.seconds for s in prefill), tokens_per_second=cfg.clock_hz / step_cycles,
            mxm_utilisation=steps[-1].mxm_utilisation, sram_bytes=compiled.memory_bytes,
            sram_capacity=cfg.sram_bytes, weight_bytes=w, kv_cache_bytes=kv, by_unit=by_unit,
            by_part=dict(self.by_part), by_op=dict(self.by_op), compile_seconds=self.compile_seconds,
            wall_seconds=wall, steps=steps, bounds=compiled.bounds().as_dict())
        out_logits = np.stack(logits) if logits else np.zeros((0, self.cfg.vocab_size), np.float32)
        return GenerateResult(np.asarray(tokens, dtype=np.int64), out_logits, stats)

    def reference(self) -> Reference:
        """A fresh NumPy :class:`Reference` of the same model, weights and precision (sharing this
        decoder's prepared weights, so a big model's are not made twice)."""
        return Reference(self.cfg, self.ref.w, self.precision)

    def __repr__(self):
        return (f"Decoder({self.cfg.name!r}, precision={self.precision!r}, chip={self.chip_config.name!r}, "
                f"capacity={self.capacity})")
