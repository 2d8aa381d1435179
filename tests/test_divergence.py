"""lpucore.testing.first_divergence: the first cycle and unit at which two engines disagree."""

import pytest

from lpucore import Chip, ChipConfig
from lpucore.testing import first_divergence, run_both
from lpucore.testing.programs import generate


def test_identical_engines_do_not_diverge():
    gen = generate(ChipConfig.tiny(), seed=3)
    assert run_both(gen.program, gen.load_inputs) == []
    assert first_divergence(gen.program, gen.load_inputs) is None


class FaultyChip(Chip):
    """The fast engine with a fault: from cycle FAULT on, one byte of MEM slice W1 reads back flipped."""

    FAULT = 7

    def run(self, max_cycles=None, until=None):
        st = super().run(max_cycles=max_cycles, until=until)
        if self.cycle >= self.FAULT and not getattr(self, "_done", False):
            self._done = True
            v = self.read_mem("W", 1, 5)
            v[0, 3] ^= 0x40
            self.write_mem("W", 1, 5, v)
        return st


@pytest.mark.parametrize("fault", [1, 7, 12])
def test_finds_the_cycle_and_the_slice_of_an_injected_fault(fault):
    gen = generate(ChipConfig.tiny(), seed=3)
    cycles = Chip(gen.program.config)
    cycles.load(gen.program)
    gen.load_inputs(cycles)
    end = cycles.run().cycles
    assert end > fault

    def factory(engine, cfg):
        if engine == "fast":
            chip = FaultyChip(cfg, engine="fast")
            chip.FAULT = fault
            return chip
        return Chip(cfg, engine=engine)

    d = first_divergence(gen.program, gen.load_inputs, factory=factory)
    assert d is not None and d.cycle == fault
    assert d.units == ["MEM.W1"]
    assert "address 5 lane 3" in str(d) and d.engines == ("reference", "fast")
