"""No function of the package grows past about a screen: long ones are split into named steps
(issue "A house others can carry on", item 4).  Counts lines from ``def`` to the last line,
docstring and comments included."""

import ast
import pathlib

import lpucore

LIMIT = 80          # lines


def _long_functions(root: pathlib.Path, limit: int):
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_longer_than_the_limit():
    assert _long_functions(pathlib.Path(lpucore.__file__).parent, LIMIT) == []


def test_the_check_finds_a_long_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    (pkg / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert _long_functions(pkg, LIMIT) == [f"pkg/m.py:5 long ({LIMIT + 1} lines)"]
