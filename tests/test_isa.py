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


@pytest.mark.parametrize("path", sorted(isa.GENERATED))
def test_generated_sources_are_current(path):
    """Every generated engine source equals what its Python definitions give now."""
    text = (ROOT / path).read_text()
    assert text == isa.GENERATED[path](), f"{path} is stale: run `python -m lpucore.isa --write-generated`"


def test_generated_sources_are_tracked():
    """Generated sources are part of the checkout (the build needs them), not ignored build output."""
    import subprocess
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in isa.GENERATED:
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path], check=False)
        assert ignored.returncode == 1, f"{path} is ignored by git"


def test_no_hand_kept_copies_of_generated_constants():
    """The constants generated into _isa_gen.pxi and lpu_numerics_gen.h are defined nowhere else in
    src_pyx: a second copy could drift from the Python definitions."""
    import re
    gen = (ROOT / "src_pyx" / "_isa_gen.pxi").read_text()
    names = re.findall(r"^    (\w+) = ", gen, re.M)
    hgen = (ROOT / "src_pyx" / "lpu_numerics_gen.h").read_text()
    macros = re.findall(r"^#define (LPU_\w+)", hgen, re.M)
    assert {"VC_ARITH", "ERR_EMPTY_READ", "MXE_BUSY", "LINK_SKEW", "E_KIND"} <= set(names)
    for p in sorted((ROOT / "src_pyx").iterdir()):
        if p.name in ("_isa_gen.pxi", "lpu_numerics_gen.h") or p.suffix not in (".pyx", ".pxi", ".pxd", ".h"):
            continue
        text = p.read_text()
        for n in names:
            assert not re.search(rf"^\s+{n}\s*=", text, re.M), f"{p.name} defines {n} again"
        for m in macros:
            assert not re.search(rf"#define\s+{m}\b", text), f"{p.name} defines {m} again"
    # the transcendental coefficients appear in lpu_numerics.h only by name
    body = (ROOT / "src_pyx" / "lpu_numerics.h").read_text()
    literals = set(re.findall(r"(?<![\w.])\d+\.\d*(?:e[-+]?\d+)?f", body))
    assert literals <= {"0.0f", "1.0f", "2.0f", "5.9604644775390625e-08f"}, literals


def test_generated_numerics_constants_are_bit_identical():
    """The C literals of lpu_numerics_gen.h read back as exactly the float32 values numerics.py uses."""
    import re

    import numpy as np

    from lpucore import numerics as nm
    text = nm.generate_c_header()
    lits = {name: val for name, val in re.findall(r"#define LPU_(\w+) \((-?0x[0-9a-f.]+p[-+]\d+)f\)", text)}
    for name, v in nm._C_SCALARS:
        assert np.float32(float.fromhex(lits[name])).tobytes() == v.tobytes(), name
    for name, vs in nm._C_ARRAYS:
        block = text[text.index(f"LPU_{name}[LPU_{name}_LEN] = {{"):]
        block = block[: block.index("};")]
        got = [np.float32(float.fromhex(x)) for x in re.findall(r"(-?0x[0-9a-f.]+p[-+]\d+)f", block)]
        assert [g.tobytes() for g in got] == [v.tobytes() for v in vs], name


def test_engine_codes_match_python_definitions():
    """The compiled engine maps the Python class and error tables through the generated codes."""
    from lpucore import errors
    assert isa.VXM_CLASS_CODE == {c: i + 1 for i, c in enumerate(isa.VXM_CLASSES)}
    assert {op.cls for op in isa.TABLE if op.unit == "VXM"} == set(isa.VXM_CLASSES)
    kinds = {"stream-conflict", "empty-read", "bank-conflict", "latch-conflict", "address", "deadlock", "resource"}
    assert kinds <= set(errors.ENGINE_ERRORS)


def test_generated_doc_sections_are_current():
    """The ISA reference, the chip-parameter table and the bounds table in the docs are the tables'."""
    assert _docs.stale() == [], "stale documentation pages: run `python -m lpucore._docs`"


def test_a_changed_table_makes_its_page_stale(monkeypatch):
    for name, (page, fn) in list(_docs.SECTIONS.items()):
        monkeypatch.setitem(_docs.SECTIONS, name, (page, lambda fn=fn: fn() + "\n| a new row |"))
        assert _docs.stale() == [ROOT / page], name
        monkeypatch.setitem(_docs.SECTIONS, name, (page, fn))
    assert _docs.main(["--check"]) == 0


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
