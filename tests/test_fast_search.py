"""The compiler's fast searches (kernels.FAST_SEARCH: cycles at which a try would fail at committed work
are skipped without a plan) place every instruction exactly where trying each cycle in turn does."""

import numpy as np
import pytest

from lpucore import ChipConfig, Graph
from lpucore.compiler import kernels
from lpucore.compiler.api import compile_one

SMALL = ChipConfig.small()


def _layer_graph() -> Graph:
    """Elementwise chains over many vectors with colliding operand reads (layernorm, gelu, softmax,
    a residual), beside a product: the searches skip many cycles here."""
    rng = np.random.default_rng(3)
    g = Graph("fast_search")
    x = g.input("x", (24, 200), "float16")
    w = g.constant("w", (rng.standard_normal((200, 96)) / 14).astype(np.float16))
    gam = g.constant("gamma", rng.standard_normal(200).astype(np.float16))
    bet = g.constant("beta", rng.standard_normal(200).astype(np.float16))
    h = g.layernorm(x, gam, bet)
    y = g.gelu(g.matmul(h, w))
    g.output("y", g.add(g.softmax(y), g.mul(y, y)))
    g.output("r", g.add(x, g.mul(h, x)))
    return g


def _tiny_step() -> Graph:
    from lpucore.llm import Decoder
    from lpucore.llm.program import build_step
    dec = Decoder.random("tiny-gpt2", seed=2, precision="int8", config=SMALL, capacity=8)
    graph, _ = build_step(dec.cfg, dec.ref.w, dec.ref.quantized, dec.precision, dec.capacity, dec.block)
    return graph


@pytest.mark.parametrize("make", [_layer_graph, _tiny_step])
def test_fast_search_places_every_instruction_as_trying_each_cycle(make, monkeypatch):
    graph = make()
    fast = compile_one(graph, SMALL)
    monkeypatch.setattr(kernels, "FAST_SEARCH", False)
    slow = compile_one(graph, SMALL)
    assert fast.expected_cycles == slow.expected_cycles
    assert fast.program.to_bytes() == slow.program.to_bytes()
    assert len(fast.program) > 1000


def test_fast_search_skips_tries(monkeypatch):
    """The fast search makes far fewer plans than trying each cycle (else it would be pointless)."""
    graph = _layer_graph()
    calls = []
    real = kernels._map_try

    def counted(*a):
        calls.append(1)
        return real(*a)
    monkeypatch.setattr(kernels, "_map_try", counted)
    compile_one(graph, SMALL)
    fast = len(calls)
    calls.clear()
    monkeypatch.setattr(kernels, "FAST_SEARCH", False)
    compile_one(graph, SMALL)
    assert fast < len(calls) / 2, (fast, len(calls))


def test_fast_search_over_chips_places_every_instruction_as_trying_each_cycle(monkeypatch):
    """Tensor parallelism adds the collectives' searches (receiving a block from a link)."""
    from lpucore import System
    from lpucore.compiler.tensor_parallel import compile_system
    from lpucore.llm import Decoder
    from lpucore.llm.program import build_step
    dec = Decoder.random("tiny", seed=1, precision="int8", config=SMALL, capacity=8)
    graph, _ = build_step(dec.cfg, dec.ref.w, dec.ref.quantized, dec.precision, dec.capacity, dec.block)
    system = System(2, topology=[(0, 0, 1, 0)], config=SMALL)
    fast = compile_system(graph, system, min_cols=1)
    monkeypatch.setattr(kernels, "FAST_SEARCH", False)
    slow = compile_system(graph, system, min_cols=1)
    assert len(fast.partition.collectives) > 0
    for f, s in zip(fast.parts, slow.parts):
        assert f.expected_cycles == s.expected_cycles
        assert f.program.to_bytes() == s.program.to_bytes()
