"""Decode speed of a model too big to simulate whole, from the part of it that is simulated.

:func:`predict` runs the model's first ``layers`` layers with its real embedding and head (the
weights of a :class:`~lpucore.llm.weights.RandomWeights` model are made per tensor name, so this
*truncated* model has exactly the full model's first layers) as a pipeline over as many chips as
they take (:class:`~lpucore.llm.PipelineDecoder`), checks its tokens and logits against the NumPy
reference of the same truncated model, and takes the cycles of one layer from the simulation: the
chips of layer 1 run the same compiled programs as those of layer 0 (one compile per distinct
stage) and as those every later layer would run, and each layer receives the residual stream from
the previous layer's last chip over the same hand-over, so every layer after the first takes
exactly the cycles layer 1 took. The full model's step is then

    simulated step of the truncated model + (n_layers - layers) x cycles of layer 1,

a *derived* figure (labelled so), made only of simulated parts that are identical by construction.
Nothing is fitted to a published number: the chip parameters are those of
:meth:`lpucore.ChipConfig.groqchip1`, documented with their sources.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..compiler.pipeline import plan_receives
from ..config import ChipConfig
from .decoder import LOGIT_TOLERANCE, Decoder
from .pipeline import STAGE_FILL, PipelineDecoder, plan_stages
from .shapes import ModelConfig, model_config
from .weights import RandomWeights

#: published decode speeds per user (tokens/s), ../shared/TSP.md section 8
PUBLISHED = {
    "llama2-70b": {"Groq (late 2023 / early 2024), about 576 chips": "240-300",
                   "independent LLMPerf run, Jan 2024": "185"},
    "mixtral-8x7b": {"Groq claim": "480"},
    "llama2-7b": {"Groq claim": "750"},
}


#: published times to first token (seconds), ../shared/TSP.md section 8 and issue 26
PUBLISHED_TTFT = {
    "llama2-70b": {"LLMPerf, Jan 2024: median, prompts of about 550 tokens": "0.22 s"},
}


def _cycles(clock_hz: float):
    return lambda n: f"{n:,} cycles ({n / clock_hz * 1e6:,.1f} us)"


def _model_line(p) -> str:
    return (f"{p.model} ({p.precision}), KV cache {p.capacity} positions, on {p.chip} "
            f"at {p.clock_hz / 1e6:.0f} MHz")


def _table(rows, published) -> str:
    rows = rows + [(f"published: {k}", f"{v} tokens/s") for k, v in published.items()]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


@dataclass
class _Model:
    """Which model, precision and chip a prediction is for."""

    model: str
    precision: str
    chip: str
    clock_hz: float
    capacity: int
    n_layers: int


@dataclass
class Prediction(_Model):
    """Simulated and derived figures of one model (cycles at the chip's clock)."""

    chips: int                          # derived: chips the whole model takes as pipeline stages
    mlp_shards: int
    table_shards: int
    simulated_layers: int
    simulated_chips: int
    simulated_step_cycles: int          # simulated: a step of the truncated model
    layer_cycles: int                   # simulated: layer 1 (every later layer is identical)
    before_cycles: int                  # simulated: the chips before layer 1's (embedding, layer 0)
    after_cycles: int                   # simulated: the chips after layer 1's (later simulated layers, head)
    layer_parts: Dict[str, int]         # simulated: layer 1 by chip kind ("attn", "mlp shard 1/4", ...)
    handover_cycles: int                # simulated: of layer_cycles, spent on hand-overs between chips
    step_cycles: int                    # derived: the whole model's step
    tokens_per_second: float            # derived, per user
    layer_chips: int                    # simulated: chips of layer 1 (every layer takes as many)
    simulated_bound_cycles: int         # the simulated chips' schedule bounds (the largest of each), summed
    layer_bound_cycles: int             # ... of layer 1's chips
    parallel_shards: bool               # MLP shards (experts) side by side on chips of their own, else in a row
    attn_shards: int                    # attention blocks cut by kv heads (side by side), 1: whole
    # simulated: the most cycles a chip is busy with one token, from its first input vector to its program's end
    # (its cache write included): streamed through the stages, a prompt's tokens follow one another at this rate
    stream_interval_cycles: int
    prompt_tokens: int                  # of the time-to-first-token line
    bound_cycles: int                   # derived as step_cycles is: a lower bound of the step without hand-overs
    tokens_match_reference: Optional[bool]      # None: not checked (predict(..., reference=False))
    max_logit_error: float
    logit_bound: float
    compile_seconds: float
    wall_seconds_per_step: float
    published: Dict[str, str] = field(default_factory=dict)

    @property
    def nodes(self) -> int:
        """GroqNodes (8 chips each) the pipeline's chips fill."""
        return -(-self.chips // 8)

    @property
    def schedule_efficiency(self) -> float:
        """The derived bound over the derived step (lpucore.compiler.bounds; 1.0: every chip's program
        as fast as its graph allows, and no hand-over time)."""
        return self.bound_cycles / self.step_cycles

    @property
    def ttft_cycles(self) -> int:
        """Derived time to first token of a ``prompt_tokens`` prompt streamed token by token through the
        stages (each chip takes the next token once its program for the last has ended and its input is in;
        the first token is through after a step, each later one at most an interval after the one before)."""
        return self.step_cycles + (self.prompt_tokens - 1) * self.stream_interval_cycles

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["schedule_efficiency"] = self.schedule_efficiency
        d["ttft_cycles"] = self.ttft_cycles
        return d

    def table(self) -> str:
        us = _cycles(self.clock_hz)
        rows = [
            ("model", _model_line(self)),
            ("system (derived)", f"{self.chips} chips as pipeline stages (MLPs "
                                 + (f"in {self.mlp_shards} shards" if self.mlp_shards > 1 else "whole")
                                 + (f", attention in {self.attn_shards}" if self.attn_shards > 1 else "")
                                 + (" side by side" if self.parallel_shards else "")
                                 + (f", embedding and head in {self.table_shards})" if self.table_shards > 1 else ")")),
            ("simulated", f"embedding + {self.simulated_layers} layers + head on {self.simulated_chips} chips: "
                          f"{us(self.simulated_step_cycles)} per step; tokens "
                          + {True: "identical to", False: "DIFFERENT from", None: "not checked against"}[
                              self.tokens_match_reference] + " the reference, "
                          f"max logit error {self.max_logit_error:.2g} (bound {self.logit_bound:.2g})"),
            ("  embedding and layer 0", us(self.before_cycles)),
            ("  layer 1 (= every later layer)", us(self.layer_cycles) + ": " +
             ", ".join(f"{k} {v:,}" for k, v in self.layer_parts.items()) + f"; hand-overs {self.handover_cycles:,}"),
            ("  " + ("head" if self.simulated_layers == 2 else f"layers 2..{self.simulated_layers - 1} and head"),
             us(self.after_cycles)),
            ("step (derived)", f"{us(self.step_cycles)} = simulated step + {self.n_layers - self.simulated_layers} "
                               f"x layer 1"),
            ("tokens/s per user (derived)", f"{self.tokens_per_second:,.0f} "
                                            f"({self.tokens_per_second / (8 * self.nodes):.2f} per chip of "
                                            f"{self.nodes} 8-chip nodes)"),
            ("schedule bound (derived)", f"{us(self.bound_cycles)}: efficiency {100 * self.schedule_efficiency:.1f} %"),
            (f"time to first token, {self.prompt_tokens}-token prompt (derived)",
             f"{self.ttft_cycles / self.clock_hz:.4f} s: the prompt streamed token by token, "
             f"{self.stream_interval_cycles:,} cycles apart (the busiest chip's time per token)"),
        ]
        rows += [(f"published: {k} (time to first token)", v) for k, v in PUBLISHED_TTFT.get(self.model, {}).items()]
        return _table(rows, self.published)


def _levels(sources) -> List[int]:
    """Each chip's hand-overs from the first chip (a :class:`~lpucore.llm.PipelineDecoder`'s ``sources``)."""
    level: List[int] = []
    for srcs in sources:
        level.append(1 + max((level[k] for k, _ in srcs), default=-1))
    return level


def _path(bounds, level, chips) -> int:
    """The sum over levels of the largest bound of ``chips`` at each level: chips at one level work at once."""
    top: Dict[int, int] = {}
    for k in chips:
        top[level[k]] = max(top.get(level[k], 0), bounds[k])
    return sum(top.values())


def truncated(cfg: ModelConfig, layers: int) -> ModelConfig:
    """``cfg`` with only its first ``layers`` layers (same name stem, so the same random tensors)."""
    if not 1 <= layers <= cfg.n_layers:
        raise ValueError(f"layers must be 1..{cfg.n_layers}, not {layers}")
    return dataclasses.replace(cfg, n_layers=int(layers), name=f"{cfg.name}[:{layers}]")


def _layer1_chips(pd, cfg) -> List[int]:
    """The chips of layer 1: they hold units of layer 1 only, and every later layer's would be the same."""
    l1 = [k for k, (a, b) in enumerate(pd.stages) if all(u[1] == 1 for u in pd.units[a:b])]
    if not l1 or l1 != list(range(l1[0], l1[-1] + 1)) or l1[-1] + 1 >= pd.n_chips or any(
            any(u[1] == 1 for u in pd.units[slice(*pd.stages[k])]) for k in range(pd.n_chips) if k not in l1):
        raise ValueError(f"{cfg.name}: layer 1 does not have chips of its own; predict needs them")
    return l1


def _layer_cycles(pd, cfg, l1: List[int]) -> Tuple[int, Dict[str, int]]:
    """(cycles of layer 1, its chips' cycles by kind until their output is written; chips side by side
    counted once, by the slowest). Layer 1 lasts from its first chip's start to the start layer 2's first
    chip would have, receiving what layer 1's last chips send as layer 1's first chip received layer 0's
    (the chip after layer 1 here may take it in other cycles: the head's input lies elsewhere), as every
    later layer does."""
    starts, sends = pd.stage_starts, pd.stage_sends
    after = l1[-1] + 1
    ins = [w for w in pd.wires if w[2] == after]
    incoming = [(name, w[3], pd.sent[(src, after)]) for (src, name), w in zip(pd.sources[after], ins)]
    layer = plan_receives(pd.compiled[pd.signatures[l1[0]]], incoming)[1] - starts[l1[0]]
    parts: Dict[str, int] = {}
    for k in l1:
        u = pd.units[pd.stages[k][0]]
        own = sends[k] - starts[k]
        if pd.parallel and len(u) == 4 and u[0] in ("attn", "mlp"):
            what = "attention shards" if u[0] == "attn" else "experts" if cfg.family == "mixtral" else "MLP shards"
            label = f"{what} ({u[3]} side by side)"
            parts[label] = max(parts.get(label, 0), own)
        else:
            label = u[0] + (f" shard {u[2] + 1}/{u[3]}" if len(u) == 4 else "")
            parts[label] = parts.get(label, 0) + own
    return layer, parts


def predict(name, precision: str = "int8", layers: int = 2, capacity: int = 32,
            config: Optional[ChipConfig] = None, seed: int = 0, prompt=(1, 2), new_tokens: int = 2,
            engine: str = "fast", unit_per_chip: bool = False, progress=None,
            parallel_shards: Optional[bool] = None, shards: Optional[int] = None,
            attn: Optional[int] = None, prompt_tokens: int = 550, reference: bool = True) -> Prediction:
    """Simulate ``name``'s first ``layers`` (at least 2) layers with its embedding and head, check them
    against the reference, and derive the whole model's decode step (module docstring).
    ``unit_per_chip``: every unit on a chip of its own, even if several would fit one (small models,
    tests); by default the stages are :func:`~lpucore.llm.pipeline.plan_stages`'s. ``parallel_shards``: a
    layer's MLP shards side by side, each on a chip of its own (:class:`~lpucore.llm.PipelineDecoder`);
    ``None``: for a mixture of experts cut into shards (Mixtral's experts) or a model with a block no chip
    holds whole (:func:`~lpucore.llm.pipeline.plan_auto`), else in a row. ``shards`` MLP
    shards and ``attn`` attention shards per layer side by side (default: as few as fit a chip).
    ``prompt_tokens``: the prompt of the derived time to first token (:attr:`Prediction.ttft_cycles`).
    ``reference=False``: the tokens and logits are not checked against the reference (a sensitivity run of
    a model already checked: the cycles do not depend on the values)."""
    cfg = model_config(name) if isinstance(name, str) else name
    if layers < 2:
        raise ValueError("predict needs at least 2 simulated layers (layer 1 is the one every later layer repeats)")
    chip = config if config is not None else ChipConfig.groqchip1()
    part = truncated(cfg, min(layers, cfg.n_layers))
    # RandomWeights makes each tensor from its name: the truncated model's are the full model's
    dec = Decoder(part, RandomWeights(part, seed), precision=precision, config=chip, capacity=capacity,
                  engine=engine, chips="auto")
    if unit_per_chip:
        pd = PipelineDecoder(dec, len(PipelineDecoder(dec, 2).units))
    elif parallel_shards or (parallel_shards is None and dec.chips > 1 and (cfg.family == "mixtral" or
                                                                             dec.side_by_side)):
        pd = PipelineDecoder(dec, None, shards=shards, parallel_shards=True, attn=attn)
    elif dec.chips == 1:
        raise ValueError(f"{part.name} fits one chip: run the Decoder itself (or unit_per_chip=True)")
    else:
        pd = dec.pipeline
    pd.compile(progress=progress)
    assert pd.step_cycles is not None        # set by compile()
    walls: List[float] = []
    tokens, logits, stats = pd.generate(list(prompt), new_tokens, on_step=lambda i, t, st, w: walls.append(w))
    match: Optional[bool] = None
    err = bound = float("nan")
    if reference:
        ref_tokens, ref_logits = dec.reference().generate(list(prompt), new_tokens)
        err = float(np.max(np.abs(logits - ref_logits)))
        bound = LOGIT_TOLERANCE * (1 + float(np.max(np.abs(ref_logits))))
        match = bool(np.array_equal(tokens, ref_tokens))
    l1 = _layer1_chips(pd, cfg)
    full_chips = pd.n_chips + (cfg.n_layers - part.n_layers) * len(l1) if unit_per_chip else \
        len(plan_stages(cfg, precision, capacity, chip, None, dec.block, shards=pd.shards, tables=pd.tables,
                        parallel_shards=pd.parallel, attn=pd.attn))
    if full_chips != pd.n_chips + (cfg.n_layers - part.n_layers) * len(l1):
        raise AssertionError(f"{cfg.name}: the whole model's stages are not the simulated ones with layer 1's repeated")
    # each chip's largest schedule bound; at batch 1 the chips work one after another (those side by side at
    # once), so the bounds of the chips of each level (hand-overs from the embedding) add up
    chip_bound = [max(pd.compiled[s].bounds().as_dict().values()) for s in pd.signatures]
    level = _levels(pd.sources)
    layer_bound = _path(chip_bound, level, l1)
    layer, parts = _layer_cycles(pd, cfg, l1)
    starts = pd.stage_starts
    full = int(pd.step_cycles + (cfg.n_layers - part.n_layers) * layer)
    simulated_bound = _path(chip_bound, level, range(pd.n_chips))
    return Prediction(
        model=cfg.name, precision=precision, chip=chip.name, clock_hz=chip.clock_hz, capacity=capacity,
        n_layers=cfg.n_layers, chips=full_chips,
        mlp_shards=pd.shards, table_shards=pd.tables, simulated_layers=part.n_layers, simulated_chips=pd.n_chips,
        simulated_step_cycles=int(pd.step_cycles), layer_cycles=int(layer),
        before_cycles=int(starts[l1[0]]), after_cycles=int(pd.step_cycles - starts[l1[0]] - layer),
        layer_parts=parts, handover_cycles=int(layer - sum(parts.values())), step_cycles=full,
        tokens_per_second=chip.clock_hz / full, layer_chips=len(l1), simulated_bound_cycles=int(simulated_bound),
        layer_bound_cycles=int(layer_bound), parallel_shards=pd.parallel, attn_shards=pd.attn,
        stream_interval_cycles=int(max(c - r for c, r in zip(pd.stage_cycles, pd.stage_receives))),
        prompt_tokens=int(prompt_tokens),
        bound_cycles=int(simulated_bound + (cfg.n_layers - part.n_layers) * layer_bound),
        tokens_match_reference=match, max_logit_error=err, logit_bound=bound,
        compile_seconds=pd.compile_seconds, wall_seconds_per_step=float(np.mean(walls)),
        published=dict(PUBLISHED.get(cfg.name, {})))


@dataclass
class TensorParallelPrediction(_Model):
    """Decode speed with every layer split over a group of chips wired pairwise (a GroqNode),
    from layer 1 simulated on such a group (cycles at the chip's clock)."""

    group: int                          # chips per tensor-parallel group
    layer_cycles: int                   # simulated: layer 1 over its group(s) (= every layer)
    layer_parts: Dict[str, int]         # simulated: per group of the layer ("attention + MLP", or each)
    collectives: int                    # simulated: all-gathers and all-reduces in a layer
    link_bytes: int                     # simulated: bytes each chip sends per layer
    chip_bytes: int                     # simulated: SRAM of the fullest chip, one layer
    layers_per_group: int               # derived: layers a group holds at STAGE_FILL (0: a layer takes 2 groups)
    groups: int                         # derived: groups for all layers
    handover_cycles: int                # simulated: the residual [1, d_model] float32 from group to group
    outside_cycles: int                 # from the pipeline prediction: embedding, head and their hand-overs
    outside_capacity: int               # the pipeline prediction's cache (the embedding and head read none)
    outside_chips: int                  # from the pipeline prediction: the embedding's and head's chips
    step_cycles: int                    # derived
    tokens_per_second: float            # derived, per user
    layer_bound_cycles: int             # layer 1's schedule bound: its fullest chip's largest, per group
    bound_cycles: int                   # derived as step_cycles is, without hand-overs
    positions: int                      # layer 1 checked at positions 0..positions-1
    max_error: float                    # layer 1's output against the reference's residual stream
    error_bound: float
    compile_seconds: float
    wall_seconds_per_layer: float
    published: Dict[str, str] = field(default_factory=dict)

    @property
    def chips(self) -> int:
        """Chips of the layers' groups (the embedding and head take :attr:`outside_chips` more)."""
        return self.groups * self.group

    @property
    def nodes(self) -> int:
        """Nodes of ``group`` chips for the layers, the embedding and the head."""
        return -(-(self.chips + self.outside_chips) // self.group)

    @property
    def schedule_efficiency(self) -> float:
        return self.bound_cycles / self.step_cycles

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(chips=self.chips, nodes=self.nodes, schedule_efficiency=self.schedule_efficiency)
        return d

    def table(self) -> str:
        us = _cycles(self.clock_hz)
        rows = [
            ("model", _model_line(self) + f", tensor parallel over groups of {self.group}"),
            ("simulated", f"layer 1 on {len(self.layer_parts)} group(s) of {self.group} chips: "
                          f"{us(self.layer_cycles)} ("
                          + ", ".join(f"{k} {v:,}" for k, v in self.layer_parts.items())
                          + ("" if len(self.layer_parts) == 1 else ", hand-over") + f"); {self.collectives} "
                          f"all-gathers/all-reduces, {self.link_bytes:,} bytes sent per chip; fullest chip "
                          f"{self.chip_bytes / 1e6:,.1f} MB; output vs reference at {self.positions} positions: "
                          f"max error {self.max_error:.2g} (bound {self.error_bound:.2g})"),
            ("  hand-over between groups", us(self.handover_cycles)),
            ("  embedding and head (pipeline prediction)", us(self.outside_cycles) + (
                f" (pipeline at a {self.outside_capacity}-position cache: they read none)"
                if self.outside_capacity != self.capacity else "")),
            ("system (derived)", (f"{self.layers_per_group} layer(s) per group" if self.layers_per_group else
                                  f"{len(self.layer_parts)} groups per layer") +
             f", {self.groups} groups = {self.chips} chips for the layers, {self.outside_chips} for the embedding "
             f"and head: {self.nodes} nodes of {self.group} ({self.nodes * self.group} chips)"),
            ("step (derived)", f"{us(self.step_cycles)} = {self.n_layers} x layer + hand-overs between groups "
                               "+ embedding and head"),
            ("tokens/s per user (derived)", f"{self.tokens_per_second:,.0f} "
                                            f"({self.tokens_per_second / (self.nodes * self.group):.2f} per chip)"),
            ("schedule bound (derived)", f"{us(self.bound_cycles)} (layer {self.layer_bound_cycles:,}): "
                                         f"efficiency {100 * self.schedule_efficiency:.1f} %"),
        ]
        return _table(rows, self.published)


def _handover_cycles(chip: ChipConfig, d: int, rows: int = 1) -> int:
    """Cycles :func:`~lpucore.compiler.pipeline.hand_over` adds to move a [rows, d] float32 over one link."""
    import lpucore

    from ..compiler.pipeline import hand_over
    from ..graph import Graph
    g = Graph("residual")
    g.output("x_out", g.add(g.input("x_in", (rows, d), "float32"), 0.0))
    c = lpucore.compile(g, chip)
    return hand_over(c, "x_out", c, "x_in", 0, 0)[2] - 2 * c.expected_cycles


def _compile_layer(part: ModelConfig, ref: Any, precision: str, capacity: int, group: int, chip: ChipConfig,
                   engine: str, min_cols: Optional[int], split_layer: Optional[bool], chunk: int = 1
                   ) -> Tuple[List[Tuple[Any, Any, bool]], List[str], float]:
    """Layer 1 of ``part`` compiled over ``group`` chips wired pairwise: the whole layer on one
    group if its part fits a chip, else its attention and its MLP on a group each; ``chunk`` > 1: for a
    prompt chunk of that many rows sharing one cache (:mod:`lpucore.llm.prefill`).  Returns the
    pieces (compiled, system, reads a position), their labels and the compile time (seconds)."""
    import time

    from ..compiler.tensor_parallel import compile_system
    from ..errors import CompileError
    from ..system import System
    from .program import build_step, model_units
    units = model_units(part)
    u0, u1 = units.index(("attn", 1)), units.index(("mlp", 1)) + 1
    wires = [(a, (b - a) % group - 1, b, (a - b) % group - 1) for a in range(group) for b in range(a + 1, group)]

    def compile_pieces(spans):
        out = []
        for lo, hi in spans:
            graph, _ = build_step(part, ref.w, ref.quantized, precision, capacity, units=(lo, hi), batch=chunk,
                                  shared_cache=chunk > 1)
            system = System(group, topology=wires, config=chip, engine=engine)
            out.append((compile_system(graph, system, min_cols=min_cols), system, "pos" in graph.inputs))
        return out
    t0 = time.perf_counter()
    try:
        if split_layer:
            raise CompileError("split_layer: does not fit (asked)")
        pieces = compile_pieces([(u0, u1)])
        labels = ["attention + MLP"]
    except CompileError as e:
        if "does not fit" not in str(e) or split_layer is False:
            raise
        pieces = compile_pieces([(u0, u0 + 1), (u0 + 1, u1)])
        labels = ["attention", "MLP"]
    return pieces, labels, time.perf_counter() - t0


def _run_layer(ref: Any, pieces: List[Tuple[Any, Any, bool]], positions: int) -> Tuple[float, List[float], float]:
    """Run the compiled layer on the reference's residual stream before layer 1, token by token;
    returns the largest difference from the reference's stream after it, the host seconds per
    position and the documented bound."""
    import time
    ref.hidden = []
    ref.prefill(list(range(1, positions + 1)))
    x_in, x_ref = ref.hidden[1], ref.hidden[2]
    err, walls = 0.0, []
    for p in range(positions):
        t = time.perf_counter()
        x = x_in[p:p + 1].astype(np.float32)
        for sc, system, has_pos in pieces:
            inputs = {"x_in": x, "pos": np.array([p], np.int32)} if has_pos else {"x_in": x}
            out, st = sc.run(inputs, system=system)
            if st.cycles != sc.expected_cycles:
                raise AssertionError(f"layer 1 took {st.cycles} cycles; the compiler predicted {sc.expected_cycles}")
            x = out["x_out"]
        walls.append(time.perf_counter() - t)
        err = max(err, float(np.max(np.abs(x[0] - x_ref[p]))))
    return err, walls, LOGIT_TOLERANCE * (1 + float(np.max(np.abs(x_ref))))


def predict_tensor_parallel(name, precision: str = "int8", group: int = 8, pipeline: Optional[Prediction] = None,
                            capacity: int = 32, config: Optional[ChipConfig] = None, seed: int = 0,
                            positions: int = 2, engine: str = "fast", progress=None,
                            min_cols: Optional[int] = None, split_layer: Optional[bool] = None
                            ) -> TensorParallelPrediction:
    """Simulate layer 1 of ``name`` split over ``group`` chips wired pairwise
    (``lpucore.compile(graph, system=...)``: Megatron-style splits, scheduled all-reduces),
    check its output against the reference's residual stream at ``positions`` positions, and
    derive the whole model's decode step as n_layers x that layer + hand-overs between groups
    + the embedding and head of ``pipeline`` (a :func:`predict` result; made if not given).
    ``min_cols``: see :func:`~lpucore.compiler.tensor_parallel.compile_system` (small models).
    ``split_layer``: the attention and the MLP on a group each (None: only if the layer's part
    does not fit a chip). ``pipeline`` may be at a smaller cache than ``capacity`` (a model whose
    attention block does not fit one chip at ``capacity``): its embedding and head read no cache."""
    from .reference import Reference
    cfg = model_config(name) if isinstance(name, str) else name
    chip = config if config is not None else ChipConfig.groqchip1()
    if pipeline is None:
        pipeline = predict(cfg, precision, capacity=capacity, config=chip, seed=seed, engine=engine, progress=progress)
    part = truncated(cfg, 2)
    ref = Reference(part, RandomWeights(part, seed), precision)
    pieces, labels, compile_seconds = _compile_layer(part, ref, precision, capacity, group, chip, engine,
                                                     min_cols, split_layer)
    err, walls, bound = _run_layer(ref, pieces, positions)
    handover = _handover_cycles(chip, cfg.d_model)
    parts = {label: int(sc.expected_cycles) for label, (sc, _, _) in zip(labels, pieces)}
    layer = sum(parts.values()) + (len(pieces) - 1) * handover
    per_chip = max(max(sc.memory_bytes) for sc, _, _ in pieces)
    if len(pieces) == 1:
        per_group = max(1, int(STAGE_FILL * chip.sram_bytes // per_chip))
        groups = -(-cfg.n_layers // per_group)
        between = groups - 1
    else:
        per_group, groups = 0, cfg.n_layers * len(pieces)
        between = cfg.n_layers - 1                  # the in-layer hand-overs are in ``layer``
    outside = max(0, pipeline.simulated_step_cycles - pipeline.simulated_layers * pipeline.layer_cycles)
    step = cfg.n_layers * layer + between * handover + outside
    # a group's chips run side by side: the layer is bounded by its fullest chip's largest bound
    layer_bound = sum(max(max(c.bounds().as_dict().values()) for c in sc.parts) for sc, _, _ in pieces)
    outside_bound = max(0, pipeline.simulated_bound_cycles - pipeline.simulated_layers * pipeline.layer_bound_cycles)
    return TensorParallelPrediction(
        model=cfg.name, precision=precision, chip=chip.name, clock_hz=chip.clock_hz, capacity=capacity,
        n_layers=cfg.n_layers, group=group, layer_cycles=int(layer), layer_parts=parts,
        collectives=sum(len(sc.partition.collectives) for sc, _, _ in pieces),
        link_bytes=sum(int(sc.link_bytes) for sc, _, _ in pieces), chip_bytes=int(per_chip),
        layers_per_group=per_group, groups=groups,
        handover_cycles=int(handover), outside_cycles=int(outside), outside_capacity=pipeline.capacity,
        outside_chips=pipeline.simulated_chips - pipeline.simulated_layers * pipeline.layer_chips,
        step_cycles=int(step), tokens_per_second=chip.clock_hz / step, layer_bound_cycles=int(layer_bound),
        bound_cycles=int(cfg.n_layers * layer_bound + outside_bound), positions=positions, max_error=err,
        error_bound=bound,
        compile_seconds=compile_seconds, wall_seconds_per_layer=float(np.mean(walls)),
        published=dict(PUBLISHED.get(cfg.name, {})))



@dataclass
class PrefillPrediction(_Model):
    """Time to first token of a prompt prefilled in chunks of ``chunk`` rows through tensor-parallel groups
    of ``group`` chips, one group per ``layers_per_group`` layers, from layer 1's chunk simulated on a group
    (cycles at the chip's clock)."""

    group: int
    chunk: int                          # prompt positions per chunk (rows of the chunk program)
    prompt_tokens: int
    chunks: int                         # ceil(prompt_tokens / chunk)
    chunk_layer_cycles: int             # simulated: layer 1 for one chunk on its group(s) (= every layer)
    layer_parts: Dict[str, int]         # simulated: per group of the layer
    layers_per_group: int               # derived: layers a group holds at STAGE_FILL (0: a layer takes 2 groups)
    groups: int                         # derived: groups for all layers
    handover_cycles: int                # simulated: a chunk's residual [chunk, d_model] float32, group to group
    outside_cycles: int                 # from the pipeline prediction: embedding and head (one row), assumed
    outside_chips: int
    stage_cycles: int                   # derived: the slowest stage's time per chunk
    fill_cycles: int                    # derived: the first chunk through every stage
    ttft_cycles: int                    # derived: fill + (chunks - 1) x stage
    chunk_layer_bound_cycles: int       # layer 1's chunk bound: its fullest chip's largest, per group
    bound_ttft_cycles: int              # derived as ttft_cycles is, from the bounds, without hand-overs
    chip_bytes: int                     # simulated: SRAM of the fullest chip of the chunk layer
    max_error: float                    # the chunk's output rows against the reference's residual stream
    error_bound: float
    compile_seconds: float
    wall_seconds: float                 # host seconds to simulate the chunk layer once
    # measured_at: the layer's simulated cycles (its pieces, without hand-overs) at each smaller cache, from
    # which chunk_layer_cycles is extrapolated linearly to ``capacity``; empty: simulated at ``capacity``
    measured_cycles: Dict[int, int] = field(default_factory=dict)
    published: Dict[str, str] = field(default_factory=dict)

    @property
    def ttft_seconds(self) -> float:
        return self.ttft_cycles / self.clock_hz

    @property
    def chips(self) -> int:
        return self.groups * self.group + self.outside_chips

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(ttft_seconds=self.ttft_seconds, chips=self.chips)
        return d

    def table(self) -> str:
        us = _cycles(self.clock_hz)
        rows = [
            ("model", _model_line(self) + f", prompt chunks of {self.chunk} rows over groups of {self.group}"),
            ("simulated", f"layer 1, one chunk of {self.chunk} rows on {len(self.layer_parts)} group(s) of "
                          f"{self.group} chips: {us(self.chunk_layer_cycles)} ("
                          + ", ".join(f"{k} {v:,}" for k, v in self.layer_parts.items()) + f"); fullest chip "
                          f"{self.chip_bytes / 1e6:,.1f} MB; output rows vs reference: max error "
                          f"{self.max_error:.2g} (bound {self.error_bound:.2g})"),
            ("  measured at smaller caches", ", ".join(f"{c} positions {v:,} cycles" for c, v in
                                                       self.measured_cycles.items()) +
             f"; extrapolated linearly to {self.capacity}" if self.measured_cycles else "simulated at the cache"),
            ("  hand-over of a chunk between groups", us(self.handover_cycles)),
            ("  embedding and head (decode pipeline, assumed)", us(self.outside_cycles)),
            ("system (derived)", f"{self.groups} groups of {self.group} for {self.n_layers} layers + "
                                 f"{self.outside_chips} chips: {self.chips} chips"),
            ("per chunk, slowest stage (derived)", us(self.stage_cycles)),
            ("first chunk through all stages (derived)", us(self.fill_cycles)),
            ("time to first token (derived)", f"{us(self.ttft_cycles)} = fill + ({self.chunks} - 1) x stage, "
                                              f"for {self.prompt_tokens} prompt tokens: "
                                              f"{self.ttft_seconds:.4f} s"),
            ("bound (derived)", us(self.bound_ttft_cycles)),
        ]
        w = max(len(k) for k, _ in rows)
        return "\n".join([f"{k:<{w}}  {v}" for k, v in rows] + [f"published: {k}  {v}" for k, v in
                                                                 self.published.items()])


def _run_chunk_layer(ref: Any, pieces: List[Tuple[Any, Any, bool]], chunk: int) -> Tuple[float, float, float]:
    """Run the compiled chunk layer on the reference's residual stream before layer 1 at positions
    0..chunk-1 (the prompt's first chunk); returns the largest difference of its output rows from the
    reference's stream after layer 1, the host seconds and the documented bound."""
    import time
    ref.hidden = []
    ref.prefill(list(range(1, chunk + 1)))
    x_in, x_ref = ref.hidden[1], ref.hidden[2]
    t = time.perf_counter()
    x = x_in[:chunk].astype(np.float32)
    for sc, system, has_pos in pieces:
        inputs = {"x_in": x, "pos": np.arange(chunk, dtype=np.int32)} if has_pos else {"x_in": x}
        out, st = sc.run(inputs, system=system)
        if st.cycles != sc.expected_cycles:
            raise AssertionError(f"the chunk layer took {st.cycles} cycles; predicted {sc.expected_cycles}")
        x = out["x_out"]
    wall = time.perf_counter() - t
    err = float(np.max(np.abs(x - x_ref[:chunk])))
    return err, wall, LOGIT_TOLERANCE * (1 + float(np.max(np.abs(x_ref))))


def _chunk_layer(part: ModelConfig, ref: Any, precision: str, capacity: int, group: int, chip: ChipConfig,
                 engine: str, min_cols: Optional[int], split_layer: Optional[bool], chunk: int) -> Dict[str, Any]:
    """Layer 1 of ``part`` for one chunk over a cache of ``capacity`` positions, compiled over ``group`` chips,
    run and checked (:func:`_run_chunk_layer`): its figures."""
    pieces, labels, compile_seconds = _compile_layer(part, ref, precision, capacity, group, chip, engine, min_cols,
                                                     split_layer, chunk=chunk)
    err, wall, bound = _run_chunk_layer(ref, pieces, chunk)
    return dict(parts={label: int(sc.expected_cycles) for label, (sc, _, _) in zip(labels, pieces)},
                bound=sum(max(max(c.bounds().as_dict().values()) for c in sc.parts) for sc, _, _ in pieces),
                per_chip=max(max(sc.memory_bytes) for sc, _, _ in pieces), err=err, wall=wall, error_bound=bound,
                compile_seconds=compile_seconds)


def predict_prefill(name, precision: str = "int8", group: int = 8, chunk: int = 16, prompt_tokens: int = 550,
                    capacity: Optional[int] = None, pipeline: Optional[Prediction] = None,
                    config: Optional[ChipConfig] = None, seed: int = 0, engine: str = "fast",
                    min_cols: Optional[int] = None, split_layer: Optional[bool] = None,
                    measured_at: Optional[Tuple[int, int]] = None,
                    outside: Optional[Tuple[int, int]] = None) -> PrefillPrediction:
    """Simulate layer 1 of ``name`` for one prompt chunk of ``chunk`` rows (the chunk program's layer:
    ``build_step(..., batch=chunk, shared_cache=True)``, a cache of ``capacity`` positions, default the
    prompt rounded up to whole chunks) split over ``group`` chips wired pairwise, check its rows against the
    reference, and derive the time to first token of ``prompt_tokens`` (docs/guide/language-models.md).

    Assumptions, stated: every layer's chunk takes layer 1's cycles (the same program); the groups form a
    pipeline, one group per :attr:`layers_per_group` layers, and the chunks stream through it: a group
    takes chunk k + 1 as soon as it has handed chunk k on, so the first token comes after the first
    chunk's pass through every stage (fill) plus one slowest stage per further chunk. The embedding and
    the head are ``pipeline``'s (a :func:`predict` result, made at a 32-position cache if not given; one
    row, not a chunk's), or ``outside`` = (their cycles, their chips) taken from such a result.
    ``measured_at`` = (S1, S2): the layer is simulated at those smaller caches instead (a big model's chunk
    layer at the full cache compiles too slowly here) and its cycles and bound are extrapolated linearly
    in the capacity (attention spans the whole cache, masked: its work grows linearly with it)."""
    from .reference import Reference
    cfg = model_config(name) if isinstance(name, str) else name
    chip = config if config is not None else ChipConfig.groqchip1()
    if not 1 <= prompt_tokens <= cfg.max_positions or chunk < 2:
        raise ValueError(f"prompt_tokens must be 1..{cfg.max_positions} and chunk at least 2")
    n_chunks = -(-prompt_tokens // chunk)
    cap = int(capacity) if capacity is not None else min(cfg.max_positions, n_chunks * chunk)
    if cap < prompt_tokens:
        raise ValueError(f"a cache of {cap} positions does not hold a {prompt_tokens}-token prompt")
    if outside is None:
        pipeline = pipeline if pipeline is not None else predict(cfg, precision, capacity=32, config=chip, seed=seed,
                                                                 engine=engine)
        outside = (max(0, pipeline.simulated_step_cycles - pipeline.simulated_layers * pipeline.layer_cycles),
                   pipeline.simulated_chips - pipeline.simulated_layers * pipeline.layer_chips)
    part = truncated(cfg, 2)
    ref = Reference(part, RandomWeights(part, seed), precision)
    caps = [cap] if measured_at is None else [int(c) for c in measured_at]
    runs = {c: _chunk_layer(part, ref, precision, c, group, chip, engine, min_cols, split_layer, chunk) for c in caps}
    last = runs[caps[-1]]
    if measured_at is None:
        parts, layer_bound = last["parts"], last["bound"]
    else:       # linear in the capacity through the two measured points
        (s1, r1), (s2, r2) = runs.items()
        parts = {k: int(round(r1["parts"][k] + (r2["parts"][k] - r1["parts"][k]) * (cap - s1) / (s2 - s1)))
                 for k in r2["parts"]}
        layer_bound = r1["bound"] + (r2["bound"] - r1["bound"]) * (cap - s1) / (s2 - s1)
    handover = _handover_cycles(chip, cfg.d_model, chunk)
    layer = sum(parts.values()) + (len(parts) - 1) * handover
    per_group = max(1, int(STAGE_FILL * chip.sram_bytes // last["per_chip"])) if len(parts) == 1 else 0
    groups = -(-cfg.n_layers // per_group) if per_group else cfg.n_layers * len(parts)
    # a stage: its layers' chunk (or one piece of a split layer) and handing the chunk on
    stage = (per_group * layer if per_group else max(parts.values())) + handover
    fill = cfg.n_layers * layer + (groups - 1) * handover + outside[0]
    stage_bound = per_group * layer_bound if per_group else layer_bound / len(parts)
    return PrefillPrediction(
        model=cfg.name, precision=precision, chip=chip.name, clock_hz=chip.clock_hz, capacity=cap,
        n_layers=cfg.n_layers, group=group, chunk=chunk, prompt_tokens=prompt_tokens, chunks=n_chunks,
        chunk_layer_cycles=int(layer), layer_parts=parts, layers_per_group=per_group, groups=groups,
        handover_cycles=int(handover), outside_cycles=int(outside[0]), outside_chips=int(outside[1]),
        stage_cycles=int(stage), fill_cycles=int(fill), ttft_cycles=int(fill + (n_chunks - 1) * stage),
        chunk_layer_bound_cycles=int(layer_bound),
        bound_ttft_cycles=int(cfg.n_layers * layer_bound + (n_chunks - 1) * stage_bound),
        chip_bytes=int(last["per_chip"]), max_error=max(r["err"] for r in runs.values()),
        error_bound=min(r["error_bound"] for r in runs.values()),
        compile_seconds=sum(r["compile_seconds"] for r in runs.values()), wall_seconds=last["wall"],
        measured_cycles={c: sum(r["parts"].values()) for c, r in runs.items()} if measured_at else {},
        published=dict(PUBLISHED_TTFT.get(cfg.name, {})))

__all__ = ["Prediction", "predict", "truncated", "PUBLISHED", "TensorParallelPrediction", "predict_tensor_parallel",
           "PrefillPrediction", "predict_prefill", "PUBLISHED_TTFT"]
