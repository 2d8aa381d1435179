"""Generated parts of the documentation: the ISA reference, the chip-parameter table and the
schedule bounds' latency table, each between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``
markers in its page.

``python -m lpucore._docs`` rewrites them in place; ``python -m lpucore._docs --check`` exits
with status 1 naming the stale pages (as .ci/run does), and tests/test_isa.py fails when a page
is out of date with the table it comes from.
"""

from __future__ import annotations

import pathlib
import re
import sys
from typing import Callable, Dict, List, Tuple

from . import isa
from .compiler.bounds import latency_markdown
from .config import ChipConfig

# marker name -> (page, relative to the checkout's root; the function that writes its body)
SECTIONS: Dict[str, Tuple[str, Callable[[], str]]] = {
    "isa": ("docs/reference/isa.md", isa.reference_markdown),
    "config": ("docs/reference/chip-parameters.md", ChipConfig.describe),
    "bounds": ("docs/guide/compiler.md", latency_markdown),
}


def _between(body: str) -> Callable[[re.Match[str]], str]:
    """A substitution that puts ``body`` between a section's begin and end markers."""
    return lambda m: m.group(1) + body + "\n" + m.group(2)


def render(text: str, names: List[str] | None = None) -> str:
    """``text`` with the generated sections ``names`` (default: all) brought up to date."""
    for name in SECTIONS if names is None else names:
        pat = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        text, n = pat.subn(_between(SECTIONS[name][1]()), text)
        if n != 1:
            raise ValueError(f"{SECTIONS[name][0]} needs exactly one '<!-- {name}:begin -->' ... "
                             f"'<!-- {name}:end -->' block")
    return text


def root() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parent.parent


def pages() -> Dict[pathlib.Path, List[str]]:
    """Each page that holds generated sections, with their names."""
    out: Dict[pathlib.Path, List[str]] = {}
    for name, (page, _) in SECTIONS.items():
        out.setdefault(root() / page, []).append(name)
    return out


def stale() -> List[pathlib.Path]:
    """The pages whose generated sections differ from the tables."""
    return [p for p, names in pages().items() if render(p.read_text(), names) != p.read_text()]


def main(argv: List[str]) -> int:
    if "--check" in argv:
        bad = stale()
        for p in bad:
            print(f"{p.relative_to(root())} is stale: run `python -m lpucore._docs`")
        return 1 if bad else 0
    for p, names in pages().items():
        p.write_text(render(p.read_text(), names))
        print(f"updated {p.relative_to(root())}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
