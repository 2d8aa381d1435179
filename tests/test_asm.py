"""The assembler and disassembler."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lpucore
from lpucore import ChipConfig, ProgramError, assemble, disassemble

SRC = """
.config tiny
.tensor x float16 (2, 16) [W1:0+1, W2:0] [E1:0]
.queue MEM.W0
  Read 0x3, E0          ; a comment
  Repeat n=3, d=1, stride=1
VXM.0: add int8, E4, E0, W0   # another comment
VXM.1: const float32, -, 1.5
VXM.2: cvt int8, float32, E4, A0
VXM.3: requant W1, E4, 0x40000000, 30
"""


def test_round_trip():
    p = assemble(SRC)
    assert p.config == ChipConfig.tiny()
    text = disassemble(p)
    assert assemble(text) == p
    assert disassemble(assemble(text)) == text
    assert p.queues["VXM.3"][0]["zp"] == 0            # defaulted operand


def test_striped_tensors_round_trip_and_compiled_programs_disassemble():
    p = assemble(".config tiny\n.tensor z int16 (4, 16) {W1:0x0, W2:0x2} {E2:0x1, E3:0x1}\n")
    z = p.tensors["z"]
    assert [pl.parts for pl in z.planes] == [((1, 0), (2, 2)), ((ChipConfig.tiny().slice_id(1, 2), 1),
                                                                 (ChipConfig.tiny().slice_id(1, 3), 1))]
    assert assemble(disassemble(p)) == p
    g = lpucore.Graph()
    g.output("y", g.add(g.input("x", (3, 100), "float16"), 1.0))
    prog = lpucore.compile(g, ChipConfig.small()).program          # the compiler stripes its tensors
    assert "{" in disassemble(prog) and assemble(disassemble(prog)) == prog
    for bad in ("{W1:0x0+2}", "{W1:0x0", "{}"):
        with pytest.raises(ProgramError):
            assemble(f".config tiny\n.tensor z int8 (4, 16) {bad}\n")


def test_groqchip_default_and_json_config():
    p = assemble("MEM.E43: Write 8191, W31")
    assert p.config == ChipConfig.groqchip1()
    import dataclasses
    cfg = dataclasses.replace(ChipConfig.tiny(), name="mine", mem_slices_per_hop=1)
    q = lpucore.Program(cfg)
    q.add("MEM.W3", "Read", 1, "E2")
    assert assemble(disassemble(q)) == q


@pytest.mark.parametrize("text,line,what", [
    (".config tiny\nMEM.W0: Read 64, E0", 2, "addr"),
    (".config tiny\n\nMEM.W0: Read 0, E9", 3, "stream"),
    (".config tiny\nMEM.W0: Jump 3", 2, "unknown instruction"),
    (".config tiny\nRead 0, E0", 2, "outside any queue"),
    (".config tiny\n.queue MEM.X0", 2, "no queue"),
    (".config tiny\nMEM.W0: Read addr=1, addr=2", 2, "twice"),
    (".config tiny\nMEM.W0: Read addr=1, E0", 2, "positional"),
    (".config tiny\nMEM.W0: Read 1, E0, E1", 2, "at most"),
    (".config tiny\n.tensor x int8 (2, 2) W9:0", 2, "W9"),
    (".config nope", 1, "unknown chip configuration"),
    ("MEM.W0: NOP 1\n.config tiny", 2, "before everything"),
    (".config tiny\n.bogus", 2, "unknown directive"),
    (".config tiny\nVXM.0: const int8, -, 1.5", 2, "float literal"),
])
def test_errors_name_the_line(text, line, what):
    with pytest.raises(ProgramError) as e:
        assemble(text)
    assert e.value.line == line
    assert what in str(e.value)


def test_config_argument_must_agree():
    with pytest.raises(ProgramError):
        assemble(".config tiny\n", config=ChipConfig.groqchip1())


@given(st.text(max_size=200))
def test_fuzz_random_text_only_raises_program_error(text):
    try:
        assemble(text, config=ChipConfig.tiny())
    except ProgramError:
        pass


_TOKENS = ["Read", "Write", "Gather", "Scatter", "NOP", "Repeat", "Sync", "Notify", "add", "cvt", "select",
           "requant", "const", "E0", "W7", "A3", "-", "0x10", "-5", "1.5", "int8", "float16", ",", "=", "n",
           "MEM.W0:", "VXM.1:", ".queue", ".tensor", "x", "(2, 16)", "W0:0", "[", "]", "\n", ";", " "]


@given(st.lists(st.sampled_from(_TOKENS), max_size=40))
def test_fuzz_token_soup_only_raises_program_error(tokens):
    try:
        assemble(" ".join(tokens), config=ChipConfig.tiny())
    except ProgramError:
        pass
