import hashlib
import pathlib

import pytest

from lpucore import _docs, isa
from lpucore.config import ChipConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_table_self_check():
    isa.check_table()
    assert len({op.opcode for op in isa.TABLE}) == len(isa.TABLE)
    units = {op.unit for op in isa.TABLE}
    assert units == {"ICU", "MEM", "VXM", "MXM", "SXM", "C2C"}
    for op in isa.TABLE:
        assert op.doc.strip()
        for f in op.fields:
            isa.KINDS[f.kind]


def test_issue_instructions_present():
    names = {op.mnemonic for op in isa.TABLE}
    assert {"NOP", "Repeat", "Sync", "Notify", "Read", "Write", "Gather", "Scatter"} <= names
    assert {"add", "sub", "mul", "min", "max", "neg", "abs", "and", "or", "xor", "shl", "shr", "eq", "lt",
            "select", "relu", "exp", "tanh", "rsqrt", "recip", "sigmoid", "cvt", "requant"} <= names


def test_generated_pxi_is_current():
    text = (ROOT / "src_pyx" / "_isa_gen.pxi").read_text()
    assert text == isa.generate_pxi(), "src_pyx/_isa_gen.pxi is stale: run `python -m lpucore.isa --write-pxi`"


def test_readme_generated_sections_are_current():
    text = (ROOT / "README.md").read_text()
    assert _docs.render(text) == text, "README.md is stale: run `python -m lpucore._docs`"


def test_compiled_engine_is_built_from_these_sources():
    from lpucore import _engine
    h = hashlib.sha256()
    for p in sorted((ROOT / "src_pyx").iterdir()):
        if p.suffix in (".pyx", ".pxi", ".pxd", ".h") and p.name != "_build_hash.pxi":
            h.update(p.name.encode())
            h.update(p.read_bytes())
    assert _engine.SOURCE_HASH == h.hexdigest(), "lpucore._engine is stale: reinstall (pip install -e .)"


@pytest.mark.parametrize("kind,text,value", [("stream", "E3", 3), ("stream", "w0", 32), ("src", "A2", 130),
                                             ("dst", "-", -1), ("dtype", "fp16", 3), ("imm", "0xffffffff", -1),
                                             ("addr", "0x1f", 31)])
def test_operand_text_forms(kind, text, value):
    cfg = ChipConfig.groqchip1()
    assert isa.parse_value(kind, text, cfg) == value
    back = isa.format_value(kind, value, cfg)
    assert isa.parse_value(kind, back, cfg) == value
