"""lpucore.llm.predict: the decode step of a model bigger than what is simulated, derived from its
first layers; the derivation must equal simulating the whole model."""

import dataclasses

import pytest

from lpucore.llm import Decoder, PipelineDecoder, model_config
from lpucore.llm.predict import PUBLISHED, predict, truncated
from lpucore.llm.weights import RandomWeights


def test_derived_step_equals_the_whole_model_simulated():
    cfg = dataclasses.replace(model_config("tiny"), n_layers=4, name="tiny4")
    p = predict(cfg, "fp16", layers=2, capacity=8, unit_per_chip=True)
    assert p.tokens_match_reference and p.max_logit_error <= p.logit_bound
    assert p.simulated_layers == 2 and p.simulated_chips == 6 and p.chips == 10
    assert p.step_cycles == p.simulated_step_cycles + 2 * p.layer_cycles
    assert p.before_cycles + p.layer_cycles + p.after_cycles == p.simulated_step_cycles
    # every layer after the first repeats layer 1: simulate all four layers and compare
    whole = PipelineDecoder(Decoder(cfg, RandomWeights(cfg, 0), "fp16", capacity=8), 10)
    whole.compile()
    assert whole.step_cycles == p.step_cycles
    assert p.tokens_per_second == pytest.approx(900e6 / p.step_cycles)
    assert p.layer_cycles == sum(p.layer_parts.values()) + p.handover_cycles
    assert "derived" in p.table() and "identical to the reference" in p.table()
    # the schedule bound is derived the same way, from each chip's largest bound: the whole model's chips' sum
    assert p.bound_cycles == p.simulated_bound_cycles + 2 * p.layer_bound_cycles
    assert p.bound_cycles == sum(max(whole.compiled[s].bounds().as_dict().values()) for s in whole.signatures)
    assert 0 < p.schedule_efficiency <= 1 and "efficiency" in p.table() and p.nodes == 2   # 10 chips


def test_truncated_models_keep_the_full_models_tensors():
    cfg = model_config("tiny")
    part = truncated(cfg, 1)
    assert part.n_layers == 1 and part.d_model == cfg.d_model
    a, b = RandomWeights(cfg, 3), RandomWeights(part, 3)
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"):
        assert (a[name] == b[name]).all()
    with pytest.raises(ValueError, match="layers must be 1..2"):
        truncated(cfg, 3)
    with pytest.raises(ValueError, match="at least 2 simulated layers"):
        predict("tiny", layers=1)
    assert "185" in PUBLISHED["llama2-70b"].values()


def test_tensor_parallel_prediction_repeats_a_layer_that_is_identical_by_construction():
    from lpucore import ChipConfig, System
    from lpucore.compiler.tensor_parallel import compile_system
    from lpucore.llm.predict import predict_tensor_parallel
    from lpucore.llm.program import build_step, model_units
    from lpucore.llm.reference import Reference
    chip = ChipConfig.small()
    cfg = dataclasses.replace(model_config("tiny"), n_layers=4, name="tiny4")
    pipe = predict(cfg, "fp16", capacity=8, config=chip, unit_per_chip=True)
    tp = predict_tensor_parallel(cfg, "fp16", group=2, pipeline=pipe, capacity=8, config=chip, positions=3,
                                 min_cols=1)
    assert tp.max_error <= tp.error_bound and tp.collectives >= 2 and tp.link_bytes > 0
    assert tp.step_cycles == 4 * tp.layer_cycles + (tp.groups - 1) * tp.handover_cycles + tp.outside_cycles
    assert tp.outside_cycles == pipe.simulated_step_cycles - 2 * pipe.layer_cycles > 0
    assert tp.tokens_per_second == pytest.approx(chip.clock_hz / tp.step_cycles)
    assert tp.chips == tp.groups * 2 and tp.groups == -(-4 // tp.layers_per_group)
    assert "derived" in tp.table() and "simulated" in tp.table()
    # layer 3 of the whole model compiles to a program with exactly layer 1's cycles
    ref = Reference(cfg, RandomWeights(cfg, 0), "fp16")
    units = model_units(cfg)
    graph, _ = build_step(cfg, ref.w, ref.quantized, "fp16", 8,
                          units=(units.index(("attn", 3)), units.index(("mlp", 3)) + 1))
    sc = compile_system(graph, System(2, topology=[(0, 0, 1, 0)], config=chip), min_cols=1)
    assert sc.expected_cycles == tp.layer_cycles
    # attention and MLP on a group each (as Mixtral's layer needs): the same layer output, and the
    # layer's cycles are its two groups' plus the hand-over between them
    split = predict_tensor_parallel(cfg, "fp16", group=2, pipeline=pipe, capacity=8, config=chip, positions=2,
                                    min_cols=1, split_layer=True)
    assert list(split.layer_parts) == ["attention", "MLP"] and split.groups == 8 and split.layers_per_group == 0
    assert split.max_error <= split.error_bound
    assert split.layer_cycles == sum(split.layer_parts.values()) + split.handover_cycles
    assert split.step_cycles == 4 * split.layer_cycles + 3 * split.handover_cycles + split.outside_cycles
    outside_bound = pipe.simulated_bound_cycles - 2 * pipe.layer_bound_cycles
    for t in (tp, split):
        assert t.bound_cycles == 4 * t.layer_bound_cycles + outside_bound and 0 < t.schedule_efficiency <= 1
        assert t.outside_chips == pipe.simulated_chips - 2 * pipe.layer_chips == 2
        assert t.nodes == -(-(t.chips + 2) // 2) and t.outside_capacity == 8
    # a longer cache than the pipeline's (whose embedding and head read none): the layer's attention grows
    long = predict_tensor_parallel(cfg, "fp16", group=2, pipeline=pipe, capacity=24, config=chip, positions=2,
                                   min_cols=1)
    assert long.capacity == 24 and long.outside_capacity == 8 and "8-position cache" in long.table()
    assert long.layer_cycles > tp.layer_cycles and long.max_error <= long.error_bound


def test_prefill_prediction_streams_the_chunks_through_the_groups():
    """predict_prefill: layer 1 for one prompt chunk simulated over a group (its rows checked against the
    reference's residual stream, its cycles as predicted), and the time to first token derived as the first
    chunk's pass through every group plus one slowest stage per further chunk."""
    from lpucore import ChipConfig
    from lpucore.llm.predict import _handover_cycles, predict_prefill
    chip = ChipConfig.small()
    cfg = dataclasses.replace(model_config("tiny"), n_layers=4, name="tiny4")
    pipe = predict(cfg, "fp16", capacity=8, config=chip, unit_per_chip=True)
    pf = predict_prefill(cfg, "fp16", group=2, chunk=4, prompt_tokens=10, pipeline=pipe, config=chip, min_cols=1)
    assert pf.max_error <= pf.error_bound and pf.chunks == 3 and pf.capacity == 12
    assert pf.chunk_layer_cycles == sum(pf.layer_parts.values()) and list(pf.layer_parts) == ["attention + MLP"]
    assert pf.groups == -(-4 // pf.layers_per_group) and pf.chips == 2 * pf.groups + 2
    assert pf.outside_cycles == pipe.simulated_step_cycles - 2 * pipe.layer_cycles > 0
    assert pf.stage_cycles == pf.layers_per_group * pf.chunk_layer_cycles + pf.handover_cycles
    assert pf.fill_cycles == 4 * pf.chunk_layer_cycles + (pf.groups - 1) * pf.handover_cycles + pf.outside_cycles
    assert pf.ttft_cycles == pf.fill_cycles + 2 * pf.stage_cycles and pf.ttft_seconds == pf.ttft_cycles / 900e6
    assert 0 < pf.bound_ttft_cycles < pf.ttft_cycles and "= fill + (3 - 1) x stage" in pf.table()
    # a chunk's hand-over carries its 4 rows: more than one row's
    assert pf.handover_cycles > _handover_cycles(chip, cfg.d_model)
    # measured at two caches and extrapolated linearly: at one of them, exactly the simulated layer
    lin = predict_prefill(cfg, "fp16", group=2, chunk=4, prompt_tokens=10, config=chip, min_cols=1,
                          measured_at=(8, 12), outside=(pf.outside_cycles, pf.outside_chips))
    assert lin.chunk_layer_cycles == pf.chunk_layer_cycles and lin.ttft_cycles == pf.ttft_cycles
    assert lin.measured_cycles[12] == pf.chunk_layer_cycles > lin.measured_cycles[8]
    assert "extrapolated linearly to 12" in lin.table() and lin.max_error <= lin.error_bound
    with pytest.raises(ValueError, match="does not hold"):
        predict_prefill(cfg, "fp16", chunk=4, prompt_tokens=10, capacity=8, pipeline=pipe, config=chip)


def test_experts_side_by_side_derive_the_step_of_the_whole_model():
    """A mixture of experts whose experts run side by side, each on a chip of its own (the residual fanned
    out to them, their parts summed by the next chip in the order a row of shards adds them): the tokens and
    logits of the experts in a row, bit for bit, fewer cycles, and the derived step equal to the whole
    model simulated; the bound counts the chips side by side once (the slowest)."""
    cfg = dataclasses.replace(model_config("tiny-moe"), n_layers=4, name="tiny-moe4")
    p = predict(cfg, "int8", layers=2, capacity=8, shards=4, parallel_shards=True)
    assert p.parallel_shards and p.tokens_match_reference and p.max_logit_error <= p.logit_bound
    assert p.simulated_chips == 11 and p.chips == 21 and p.layer_chips == 5
    assert "experts (4 side by side)" in p.layer_parts and "side by side" in p.table()
    assert p.layer_cycles == sum(p.layer_parts.values()) + p.handover_cycles
    dec = Decoder(cfg, RandomWeights(cfg, 0), "int8", capacity=8)
    whole = PipelineDecoder(dec, None, shards=4, parallel_shards=True)
    tokens, logits, stats = whole.generate([1, 2], 2)
    assert whole.n_chips == 21 and whole.step_cycles == p.step_cycles
    assert all(st.cycles == whole.step_cycles for st in stats)
    row = PipelineDecoder(dec, 13, shards=4)
    tokens_row, logits_row, _ = row.generate([1, 2], 2)
    assert (tokens == tokens_row).all() and (logits == logits_row).all()
    assert whole.step_cycles < row.step_cycles
    assert p.bound_cycles < sum(max(whole.compiled[s].bounds().as_dict().values()) for s in whole.signatures)
    # each chip's links: the attention chip between two layers takes 4 parts in and sends 4 copies out
    assert max(sum(k in (w[0], w[2]) for w in whole.wires) for k in range(21)) == 8
    # a prompt streamed token by token: each token at most the busiest chip's time per token after the last
    busy = max(c - r for c, r in zip(whole.stage_cycles, whole.stage_receives))
    assert p.stream_interval_cycles == busy and p.ttft_cycles == p.step_cycles + 549 * busy
    assert 0 < busy < p.step_cycles and "time to first token, 550-token prompt" in p.table()
    with pytest.raises(ValueError, match="side by side takes 21 chips"):
        PipelineDecoder(dec, 13, shards=4, parallel_shards=True)
