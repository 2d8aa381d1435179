"""The documentation's Python examples run, so they cannot rot.

Every fenced block marked ``python`` in README.md and in docs/ (the guide, the references) is
executed, each in a fresh namespace in a temporary directory. A block too long for the suite is
kept out explicitly, with its reason, by a MyST comment on the line just above its fence::

    % not executed: <why>
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md"] + sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
FENCE = re.compile(r"(?:^% not executed:(?P<why>.*)\n)?^```python\n(?P<code>.*?)^```", re.S | re.M)


def blocks():
    for page in PAGES:
        for i, m in enumerate(FENCE.finditer(page.read_text())):
            name = f"{page.relative_to(ROOT)}#{i}"
            why = m.group("why")
            marks = [pytest.mark.skip(reason=f"not executed: {why.strip()}")] if why is not None else []
            yield pytest.param(name, m.group("code"), why, id=name, marks=marks)


BLOCKS = list(blocks())


@pytest.mark.parametrize("name, code, why", BLOCKS)
def test_doc_example_runs(name, code, why, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)            # examples may write files (traces, snapshots)
    exec(compile(code, f"{name} (python block)", "exec"), {"__name__": "docs_example"})


def test_every_python_block_is_found_and_skips_say_why():
    """Each ```python fence is collected (none hides behind a pattern mismatch), and a block kept out
    of the suite gives its reason."""
    for page in PAGES:
        text = page.read_text()
        assert len(FENCE.findall(text)) == text.count("```python\n"), page
    assert all(why is None or why.strip() for _, _, why in (p.values for p in BLOCKS))
    assert sum(why is not None for _, _, why in (p.values for p in BLOCKS)) <= 2, "skip sparingly"


def test_readme_has_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert 'pip install -e ".[test]"' in text and "python -m pytest" in text


def test_readme_links_into_the_docs_resolve():
    """README is not built by Sphinx (which checks the guide's links): its relative links are checked here."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [x for x in links if "://" not in x]
    assert local and all((ROOT / x).exists() for x in local), [x for x in local if not (ROOT / x).exists()]
