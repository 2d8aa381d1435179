"""Property tests over generated programs: both engines agree with each other and with
an independent NumPy computation, cycle counts shift exactly with a NOP prefix."""

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lpucore import Chip, ChipConfig, Program, isa
from lpucore.program import Instruction
from lpucore.testing import generate, run_both
from lpucore.testing.strategies import configs, legal_programs, raw_programs

TINY = ChipConfig.tiny()


def run_generated(gen, engine):
    chip = Chip(gen.program.config, engine=engine)
    chip.load(gen.program)
    gen.load_inputs(chip)
    stats = chip.run()
    return chip, stats


@given(legal_programs())
def test_legal_programs_match_numpy_on_both_engines(gen):
    for engine in ("reference", "fast"):
        chip, stats = run_generated(gen, engine)
        assert gen.check(chip) == [], gen.description
        assert stats.finished
    assert run_both(gen.program, gen.load_inputs) == []


@settings(max_examples=15)
@given(st.data())
def test_legal_programs_on_random_geometries(data):
    cfg = data.draw(configs())
    gen = data.draw(legal_programs(cfg, max_transactions=8))
    for engine in ("reference", "fast"):
        chip, _ = run_generated(gen, engine)
        assert gen.check(chip) == [], gen.description
    assert run_both(gen.program, gen.load_inputs) == []


def random_memory(seed):
    def setup(chip):
        cfg = chip.config
        rng = np.random.default_rng(seed)
        for g in range(cfg.mem_slices):
            data = rng.integers(0, 256, (cfg.addresses_per_slice, cfg.lanes), dtype=np.uint8)
            if seed % 2:
                # small bytes, so that gathered int16 addresses are mostly in range
                A = cfg.addresses_per_slice
                data %= np.uint8(A if A <= 256 else A >> 8)
            chip.engine.write_mem(g, 0, data)
    return setup


@given(raw_programs(), st.integers(0, 1000))
def test_engines_agree_on_any_program_errors_included(program, seed):
    assert run_both(program, random_memory(seed)) == []


@given(legal_programs(), st.integers(1, 10 ** 6))
def test_nop_prefix_shifts_the_finish_exactly(gen, n):
    assume(gen.program.queues)              # an empty program has no queue to prefix
    chip, stats = run_generated(gen, "fast")
    shifted = Program(gen.program.config)
    for q, lst in gen.program.queues.items():
        shifted.queues[q] = [Instruction(isa.lookup("NOP"), (n,))] + list(lst)
    shifted.validate()
    for engine in ("reference", "fast"):
        c2 = Chip(gen.program.config, engine=engine)
        c2.load(shifted)
        gen.load_inputs(c2)
        s2 = c2.run()
        assert s2.cycles == stats.cycles + n
        assert gen.check(c2) == []
        assert s2.issued == stats.issued


def test_groqchip_geometry_legal_programs():
    cfg = ChipConfig.groqchip1()
    for seed in range(3):
        gen = generate(cfg, seed=seed, n_transactions=25, horizon=80, sync=bool(seed % 2))
        for engine in ("reference", "fast"):
            chip, _ = run_generated(gen, engine)
            assert gen.check(chip) == []
        assert run_both(gen.program, gen.load_inputs) == []


@given(st.integers(0, 2 ** 32 - 1))
def test_engines_agree_on_busy_programs(seed):
    """Long random programs over full streams: mostly legal for a while, then anything."""
    from lpucore.testing.programs import busy_program
    assert run_both(busy_program(TINY, seed), random_memory(seed)) == []


def test_engines_agree_on_busy_programs_groqchip():
    from lpucore.testing.programs import busy_program
    for seed in range(3):
        assert run_both(busy_program(ChipConfig.groqchip1(), seed, length=300), random_memory(seed)) == []
