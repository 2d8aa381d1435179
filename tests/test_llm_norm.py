"""The int8 step's LayerNorm (``StepBuilder.norm``): its one-pass variance against a float64 NumPy LayerNorm."""

import numpy as np
import pytest

import lpucore
from lpucore import ChipConfig
from lpucore.llm import model_config, random_weights
from lpucore.llm.program import StepBuilder


@pytest.fixture(scope="module")
def norm_program():
    cfg = model_config("tiny-gpt2")
    w = random_weights(cfg, seed=3)
    sb = StepBuilder(cfg, w, {}, "int8", capacity=8)
    x = sb.g.input("x", (2, cfg.d_model), "float32")
    sb.g.output("h", sb.norm(x, "h.0.ln_1.weight", "h.0.ln_1.bias"))
    return cfg, w, lpucore.compile(sb.g, ChipConfig.named("small"))


@pytest.mark.parametrize("engine", ["fast", "reference"])
@pytest.mark.parametrize("ratio", [0.0, 1.0, 10.0, 30.0])
def test_one_pass_variance_within_float16_rounding(norm_program, engine, ratio):
    """``var = mean(x^2) - mean^2`` in float32: rows whose mean is up to 30 times their standard deviation
    (the docstring's limit is about 20 for the variance's error to stay below float16's) still give ``h``
    within 2^-10 of its largest element: float16's rounding (2^-11 of each element) dominates."""
    cfg, w, compiled = norm_program
    rng = np.random.default_rng(int(ratio))
    x = (rng.standard_normal((2, cfg.d_model)) * 3 + ratio * 3).astype(np.float32)
    x[1] *= 1e-3                                       # a small row: eps matters, the bound still holds
    out, _ = lpucore.execute(compiled, {"x": x}, engine=engine)
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=-1, keepdims=True)
    var = ((x64 - mu) ** 2).mean(axis=-1, keepdims=True)
    ref = (x64 - mu) / np.sqrt(var + cfg.norm_eps) * w["h.0.ln_1.weight"] + w["h.0.ln_1.bias"]
    err = np.abs(out["h"].astype(np.float64) - ref).max(axis=-1) / np.abs(ref).max(axis=-1)
    assert (err <= 2.0 ** -10).all(), err
