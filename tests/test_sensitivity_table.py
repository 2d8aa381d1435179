"""tools/sensitivity_table.py: the docs' sensitivity table from bench_llm_sensitivity.py's JSON lines (a
prediction, an out-of-range value, a chip that does not compile, a value not yet run), and its rewrite of the
table under the docs' heading."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("sensitivity_table", ROOT / "tools" / "sensitivity_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_table_and_its_place_in_the_docs(tmp_path):
    t = _tool()
    rows = [dict(model="llama2-7b", capacity=2048, param=None, value=None, tokens_per_second=873.3),
            dict(model="llama2-7b", capacity=2048, param="c2c_latency", value=250, tokens_per_second=887.0,
                 tokens_match_reference=None),
            dict(model="llama2-7b", capacity=2048, param="sxm_shifters", value=4, error="CompileError: no")]
    f = tmp_path / "s.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = t.table([str(f)])
    lines = text.split("\n")
    assert lines[0].startswith("| parameter | value | Llama-2-7B (873): half / double |")
    by = {line.split("|")[1].strip(): line for line in lines[2:]}
    assert "| 887 / not run |" in by["`c2c_latency`"]
    assert "| no compile / not run |" in by["`sxm_shifters`"]
    assert "| - / not run |" in by["`sxm_hops`"]                 # half of 1 hop: out of the range
    assert len(lines) == 2 + len(t.estimates())
    doc = tmp_path / "d.md"
    doc.write_text(f"# T\n\n{t.HEADING}\n\nWords.\n\n| parameter | old |\n| --- | --- |\n| x | y |\n\nAfter.\n")
    t.write(str(doc), text)
    out = doc.read_text()
    assert text in out and "| x | y |" not in out and out.endswith("\nAfter.\n") and "Words." in out
