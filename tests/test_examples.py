"""The examples in examples/ build, compile and run real models and check them against
NumPy; here they run at reduced sizes on both engines."""

import importlib.util
import pathlib

import numpy as np
import pytest

import lpucore

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("example, kwargs, tol", [
    ("mlp", dict(batch=5, d_in=70, d_hidden=130, d_out=40), 1e-2),
    ("transformer_block", dict(seq=8, d_model=32, heads=2, d_ff=64), 2e-2),
])
def test_example_matches_numpy_on_both_engines(example, kwargs, tol):
    mod = load(example)
    cfg = lpucore.ChipConfig.small()
    fast = mod.run(cfg, "fast", verbose=False, **kwargs)
    ref = mod.run(cfg, "reference", verbose=False, **kwargs)
    for r in (fast, ref):
        assert r["cycles"] == r["expected_cycles"]
        assert r["max_abs_error"] <= tol * max(1.0, r["max_abs_ref"])
    assert fast["cycles"] == ref["cycles"]
    assert np.array_equal(fast["y"].view(np.uint16), ref["y"].view(np.uint16))


def test_examples_run_as_scripts_on_the_groqchip(capsys):
    assert load("mlp").main(["--config", "groqchip1"]) == 0
    assert "OK" in capsys.readouterr().out
