#!/usr/bin/env python3
"""The sensitivity table of docs/guide/systems.md from bench/bench_llm_sensitivity.py's JSON lines.

    python tools/sensitivity_table.py 7B.jsonl 70B.jsonl MIXTRAL.jsonl [--write docs/guide/systems.md]

Prints the Markdown table (one line per estimated ChipConfig parameter, tokens/s per user at half / double
for each model, in the order given); ``--write`` replaces the table under "### Sensitivity to the estimated
parameters" in that file (the lines from its first "| parameter" to the last "|" line after it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

from bench_llm_sensitivity import _scaled, estimates  # noqa: E402

NAMES = {"llama2-7b": "Llama-2-7B", "llama2-70b": "Llama-2-70B", "mixtral-8x7b": "Mixtral-8x7B"}
HEADING = "### Sensitivity to the estimated parameters"


def _rows(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    base = next(r for r in rows if r["param"] is None)
    return base, {(r["param"], r["value"]): r for r in rows if r["param"] is not None}


def _cell(runs, name, v):
    if v is None:
        return "-"
    r = runs.get((name, v))
    if r is None:
        return "not run"
    if "error" in r:
        return "no compile"
    return f"{r['tokens_per_second']:,.0f}" + (" (!)" if r.get("tokens_match_reference") is False else "")


def table(paths):
    models = [_rows(p) for p in paths]
    head = " | ".join(f"{NAMES.get(b['model'], b['model'])} ({b['tokens_per_second']:,.0f})" +
                      (": half / double" if i == 0 else "") for i, (b, _) in enumerate(models))
    lines = [f"| parameter | value | {head} | source |", "| --- | --- | " + "--- | " * len(models) + "--- |"]
    for name, value, src, lo, hi in estimates():
        cells = [" / ".join(_cell(runs, name, _scaled(value, f, lo, hi)) for f in (0.5, 2.0)) for _, runs in models]
        lines.append(f"| `{name}` | {value} | " + " | ".join(cells) + f" | {src} |")
    return "\n".join(lines)


def write(path, text):
    with open(path) as f:
        lines = f.read().split("\n")
    h = lines.index(HEADING)
    a = next(i for i in range(h, len(lines)) if lines[i].startswith("| parameter"))
    b = a
    while b < len(lines) and lines[b].startswith("|"):
        b += 1
    lines[a:b] = text.split("\n")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jsonl", nargs="+")
    ap.add_argument("--write", metavar="MARKDOWN")
    a = ap.parse_args(argv)
    text = table(a.jsonl)
    print(text)
    if a.write:
        write(a.write, text)


if __name__ == "__main__":
    main()
