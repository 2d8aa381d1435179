"""Generated parts of README.md (the ISA reference, the parameter table and the bounds latency table).

``python -m lpucore._docs`` rewrites them in place; tests/test_isa.py fails when
README.md is out of date with the tables they come from.
"""

from __future__ import annotations

import pathlib
import re
from typing import Callable

from . import isa
from .compiler.bounds import latency_markdown
from .config import ChipConfig

SECTIONS = {"isa": isa.reference_markdown, "config": ChipConfig.describe, "bounds": latency_markdown}


def _between(body: str) -> Callable[[re.Match[str]], str]:
    """A substitution that puts ``body`` between a section's begin and end markers."""
    return lambda m: m.group(1) + body + "\n" + m.group(2)


def render(text: str) -> str:
    for name, fn in SECTIONS.items():
        pat = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        text, n = pat.subn(_between(fn()), text)
        if n != 1:
            raise ValueError(f"README needs exactly one '<!-- {name}:begin -->' ... '<!-- {name}:end -->' block")
    return text


def readme_path() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parent.parent / "README.md"


if __name__ == "__main__":  # pragma: no cover
    p = readme_path()
    p.write_text(render(p.read_text()))
    print(f"updated {p}")
