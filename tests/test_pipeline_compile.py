"""``lpucore.compile(graph, system=..., strategy="pipeline")``: a graph cut into consecutive stages
on consecutive chips (lpucore/compiler/stages.py).  Results equal the single-chip compile bit for
bit, and every run takes the predicted cycles."""

import numpy as np
import pytest

import lpucore
from lpucore import ChipConfig, CompileError, Graph, System
from lpucore.compiler.stages import STAGE_IN, STAGE_OUT, compile_pipeline, cut_points, plan_cuts

SMALL = ChipConfig.small()


def line(n, cfg=SMALL):
    return System(n, topology=[(k, 0, k + 1, 1) for k in range(n - 1)], config=cfg)


def single(graph, inputs, chip=None, compiled=None):
    compiled = compiled or lpucore.compile(graph, SMALL)
    if chip is None:
        chip = lpucore.Chip(SMALL)
        compiled.load(chip)
    chip.reset(clear_memory=False)
    compiled.write_inputs(chip, inputs)
    stats = chip.run()
    return compiled.read_outputs(chip), stats, chip, compiled


def mlp_chain(seed=0):
    rng = np.random.default_rng(seed)
    g = Graph("chain")
    x = g.input("x", (2, 64), "int8")
    h = x
    for i in range(4):
        w = g.constant(f"w{i}", rng.integers(-1, 2, (64, 64)).astype(np.int8))
        y = g.matmul(h, w)                                            # int32
        if i == 1:
            g.output("mid", y)                                        # read from its own stage's chip
        h = g.cast(g.maximum(g.minimum(y, 127), -128), "int8")
    g.output("y", g.add(g.cast(h, "int32"), g.cast(g.input("bias", (2, 64), "int8"), "int32")))
    return g


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_a_chain_cut_into_stages_equals_one_chip(engine):
    g = mlp_chain()
    rng = np.random.default_rng(1)
    inputs = {"x": rng.integers(-9, 10, (2, 64)).astype(np.int8), "bias": rng.integers(-5, 5, (2, 64)).astype(np.int8)}
    system = System(4, topology=[(k, 0, k + 1, 1) for k in range(3)], config=SMALL, engine=engine)
    pc = compile_pipeline(g, system, fill=4200 / SMALL.sram_bytes)        # one 4 KB weight per stage
    assert len(pc.chips) == 4 and pc.chips == [0, 1, 2, 3] and len(pc.cuts) == 3
    assert "bias" in pc.parts[3].inputs and "bias" not in pc.parts[0].inputs     # only the stage that reads it
    assert all(STAGE_IN in p.inputs for p in pc.parts[1:]) and all(STAGE_OUT in p.outputs for p in pc.parts[:3])
    out, st = pc.run(inputs, system=system)
    ref, _, _, _ = single(g, inputs)
    assert st.cycles == pc.expected_cycles == pc.stage_cycles[-1]
    assert pc.stage_cycles == sorted(pc.stage_cycles)                 # each stage starts after the one before
    for k in ("y", "mid"):
        np.testing.assert_array_equal(out[k], ref[k])
    # an independent NumPy check of the chain
    names = {n: t for t, n in g.constant_names.items()}
    h = inputs["x"].astype(np.int32)
    for i in range(4):
        y = h @ g.constants[names[f"w{i}"]].astype(np.int32)
        if i == 1:
            np.testing.assert_array_equal(out["mid"], y)
        h = np.clip(y, -128, 127)
    np.testing.assert_array_equal(out["y"], h + inputs["bias"])
    assert np.abs(out["y"]).max() > 0
    assert sorted(pc.outputs) == ["mid", "y"] and sorted(pc.inputs) == ["bias", "x"]


def test_tiny_llama_step_over_a_line_of_chips_equals_one_chip():
    from lpucore.llm import Decoder
    from lpucore.llm.program import build_step
    dec = Decoder.random("tiny", seed=1, precision="fp16", config=SMALL, capacity=8)
    graph, _ = build_step(dec.cfg, dec.ref.w, dec.ref.quantized, dec.precision, dec.capacity, dec.block)
    assert len(cut_points(graph)) >= 4            # between the units: the residual is the one live tensor
    system = line(6)
    pc = compile_pipeline(graph, system, fill=0.03)
    assert len(pc.parts) >= 3
    chip, one = None, None
    for pos, tok in enumerate([3, 17, 5]):
        inp = {"tok": np.array([tok], np.int32), "pos": np.array([pos], np.int32)}
        out, st = pc.run(inp, system=system)
        ref, _, chip, one = single(graph, inp, chip, one)
        assert st.cycles == pc.expected_cycles
        np.testing.assert_array_equal(out["logits"], ref["logits"])
    np.testing.assert_array_equal(pc.read_state(system, "k1"), one.read_state(chip, "k1"))


def test_cut_points_keep_a_state_with_its_new_value():
    g = Graph("s")
    x = g.input("x", (1, 64), "float32")
    s = g.state("acc", (1, 64), "float32")
    a = g.mul(x, 2.0)               # 0
    b = g.add(a, s)                 # 1: reads the state
    c = g.mul(b, 0.5)               # 2
    d = g.add(c, 1.0)               # 3: the new value
    e = g.mul(d, 3.0)               # 4
    g.assign(s, d)
    g.output("y", e)
    cuts = cut_points(g)
    assert 2 not in cuts and 3 not in cuts        # between the read (1) and the new value (3)
    assert cuts[1] == a.id and cuts[4] == d.id
    x0 = np.arange(64, dtype=np.float32).reshape(1, 64)
    pc = compile_pipeline(g, line(2), fill=270 / SMALL.sram_bytes)   # the state (256 B) and 3 scalars fit
    assert pc.cuts == [4] and pc.chips == [0, 1] and "acc" in pc.parts[0].states
    system = pc.system()
    for _k in range(2):                            # the state carries over from run to run
        out, st = pc.run({"x": x0}, system=system)
        assert st.cycles == pc.expected_cycles
    acc = (x0 * 2 + (x0 + 1)) * 0.5 + 1           # run 1 left acc = x + 1
    np.testing.assert_array_equal(pc.read_state(system, "acc"), acc)
    np.testing.assert_array_equal(out["y"], acc * 3)


def test_errors():
    g = mlp_chain()
    with pytest.raises(CompileError, match="no allowed cut"):
        plan_cuts(g, 1000)                                            # a 4 KB weight alone is more
    with pytest.raises(CompileError, match="pipeline stages"):
        compile_pipeline(g, line(2), fill=4200 / SMALL.sram_bytes)   # needs 4 chips
    ring = System(4, topology=[(0, 0, 2, 0), (2, 1, 1, 0), (1, 1, 3, 0)], config=SMALL)
    with pytest.raises(CompileError, match="direct link"):
        compile_pipeline(g, ring, chips=[0, 1, 2, 3], fill=4200 / SMALL.sram_bytes)
    pc = compile_pipeline(g, ring, fill=4200 / SMALL.sram_bytes)     # along a path: 0, 2, 1, 3
    assert pc.chips == [0, 2, 1, 3]
    with pytest.raises(CompileError, match="state_axes"):
        lpucore.compile(g, system=ring, strategy="pipeline", state_axes={"k": 0})


def test_issues_from_a_cycle_skip_only_what_ends_before_it():
    """The hand-over's scan of a queue from cycle t_min (counted past cheaply) yields what the whole
    scan yields for the instructions whose last issue is at t_min or later, NOPs and Repeats included."""
    from lpucore.compiler.pipeline import _issues
    compiled = lpucore.compile(mlp_chain(), SMALL)
    queues = [q for q in compiled.program.queues.values() if len(q) > 3]
    assert any(ins.op.mnemonic == "Repeat" for q in queues for ins in q)
    for lst in queues:
        whole = [(list(span), times, named) for span, times, named in _issues(lst)]
        end = max(times[-1] for _, times, _ in whole) if whole else 0
        for t_min in (0, 1, 5, end // 3, end // 2, end, end + 1):
            got = [(list(span), times, named) for span, times, named in _issues(lst, t_min)]
            assert got == [w for w in whole if w[1][-1] >= t_min]
