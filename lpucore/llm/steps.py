"""One step's figures, a decode's statistics and result, and the attribution of a step program's
cycles to model parts (shared by :mod:`lpucore.llm.decoder` and :mod:`lpucore.llm.batch`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np

from ..compiler.dump import kernel_cycles

if TYPE_CHECKING:
    from ..compiler.lower import Compiled


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
    bucket: int = 0             # the cache capacity of the step program that ran (Decoder buckets)
    tokens: int = 1             # prompt tokens fed (a prefill chunk feeds several, lpucore.llm.prefill)



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
    return kernel_cycles(compiled.kernels, compiled.expected_cycles, lambda i: label_of.get(i, "other"),
                         ("kv", "writeback"))


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
    bucket_cycles: Dict[int, int] = field(default_factory=dict)  # cache bucket -> cycles of its step program
    # prefill (lpucore.llm.prefill): prompt positions per prefill step (1: token by token), and the simulated
    # time to first token in cycles (every prefill step's, as ttft_seconds); a chunk program's figures
    prefill_chunk: int = 1
    ttft_cycles: int = 0
    chunk_cycles: int = 0               # cycles of one chunk (0: no chunk program ran)
    chunk_predicted_cycles: int = 0     # the compiler's prediction of chunk_cycles
    chunk_mxm_utilisation: float = 0.0
    chunk_bounds: Dict[str, float] = field(default_factory=dict)   # lower bounds of one chunk (cycles)
    # where the chunk program ran (lpucore.llm.prefill): "one chip" (the decode program's chip, cache written
    # in place) or "own chip + copy" (the fallback when the shared placement does not fit); "" token by token
    prefill_route: str = ""

    @property
    def schedule_efficiency(self) -> float:
        """The largest bound over the step's cycles (lpucore.compiler.bounds); 0 without bounds."""
        return max(self.bounds.values()) / self.step_cycles if self.bounds and self.step_cycles else 0.0

    @property
    def step_seconds(self) -> float:
        return self.step_cycles / self.clock_hz

    @property
    def prefill_cycles_per_token(self) -> float:
        """Simulated cycles of prefill per prompt token (the time to first token over the prompt's length)."""
        return self.ttft_cycles / self.prompt_tokens if self.prompt_tokens else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["step_seconds"] = self.step_seconds
        d["prefill_cycles_per_token"] = self.prefill_cycles_per_token
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

    def _chunk_bound(self) -> str:
        """The largest lower bound of a prefill chunk and which it is."""
        b = self.chunk_bounds
        if not b:
            return ""
        name = max(b, key=lambda k: b[k])
        return f"; bound {b[name]:,.0f} cycles ({name})"

    def _prefill_line(self) -> str:
        """How the prompt was prefilled: token by token or in chunks, and its cycles per token."""
        n = sum(1 for s in self.steps if s.phase == "prefill")
        how = (f"{n} prefill steps" if self.prefill_chunk == 1 else
               f"{n} chunk{'s' * (n != 1)} of {self.prefill_chunk} positions")
        return f"{how}, {self.prefill_cycles_per_token:,.0f} cycles per prompt token"

    def table(self) -> str:
        """A readable summary."""
        us = 1e6
        rows = [
            ("model", f"{self.model} ({self.precision}) on one {self.chip} at {self.clock_hz / 1e6:.0f} MHz"),
            ("tokens", f"{self.prompt_tokens} prompt + {self.new_tokens} new; KV cache {self.capacity} positions"),
            ("cycles per step", f"{self.step_cycles:,} (compiler predicted {self.predicted_cycles:,})"),
            ("cache buckets", ", ".join(f"{b} positions {c:,} cycles" for b, c in self.bucket_cycles.items())
             + " (a step runs the smallest holding its position)" if len(self.bucket_cycles) > 1 else ""),
            ("schedule bound", self._bound_line()),
            ("latency per step", f"{self.step_seconds * us:.2f} us"),
            ("time to first token", f"{self.ttft_seconds * us:.2f} us, {self.ttft_cycles:,} cycles "
                                    f"({self._prefill_line()})"),
            ("prefill chunk", "" if not self.chunk_cycles else
             f"{self.chunk_cycles:,} cycles (compiler predicted {self.chunk_predicted_cycles:,}), MXM utilisation "
             f"{100 * self.chunk_mxm_utilisation:.1f} %" + self._chunk_bound() + f"; {self.prefill_route}"),
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
    """What :meth:`Decoder.generate` and :meth:`Decoder.chat` return.

    ``tokens`` and ``logits`` as always (for id prompts too); ``text`` the new tokens' text when the model has
    a tokenizer (None otherwise): what ``on_text`` streamed, the EOS token left out, cut before a stop string.
    ``finish_reason`` is ``"length"`` (``max_new_tokens`` reached), ``"eos"`` (an end-of-sequence token, the
    last of ``tokens``) or ``"stop"`` (``stop_string`` appeared in the text; the token that completed it is the
    last of ``tokens``). ``prompt_ids`` are the ids prefilled; ``prompt_text`` the text prompt or rendered chat.
    """

    tokens: np.ndarray          # int64 [n] new tokens
    logits: np.ndarray          # float32 [n, vocab]: logits[i] are those token i was chosen from
    stats: DecodeStats
    text: Optional[str] = None
    finish_reason: str = "length"
    prompt_ids: Optional[np.ndarray] = None
    prompt_text: Optional[str] = None
    stop_string: Optional[str] = None
