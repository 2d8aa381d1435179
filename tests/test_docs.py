"""README's Python examples run, so they cannot rot."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)            # examples may write files (traces, snapshots)
    exec(compile(BLOCKS[i], f"README.md python block {i}", "exec"), {"__name__": "readme"})


def test_readme_has_the_two_commands():
    text = README.read_text()
    assert 'pip install -e ".[test]"' in text and "python -m pytest" in text
