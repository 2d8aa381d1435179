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
