"""Build lpucore's compiled engine (lpucore._engine) from src_pyx/.

Environment:
  LPUCORE_DEBUG=1        compile with bounds checking and without optimisation (slow; for debugging)
  LPUCORE_BOUNDSCHECK=1  compile with Cython's bounds and initialisation checks, still optimised
                         (.ci/run builds the engine so once and runs the engine tests against it)
"""

import hashlib
import os
import pathlib

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = pathlib.Path(__file__).resolve().parent
SRC = HERE / "src_pyx"
HASH_FILE = "_build_hash.pxi"


def source_hash() -> str:
    """Hash of every engine source, compiled into the module so tests catch a stale build."""
    h = hashlib.sha256()
    for p in sorted(SRC.iterdir()):
        if p.suffix in (".pyx", ".pxi", ".pxd", ".h") and p.name != HASH_FILE:
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


(SRC / HASH_FILE).write_text(f'SOURCE_HASH = "{source_hash()}"\n')

# The engine's C-level API ships inside the package, so that Cython code can
# `from lpucore._engine cimport ...`; src_pyx/_engine.pxd is the source, copied here by every build (the
# copy is not tracked: .gitignore).
PXD = HERE / "lpucore" / "_engine.pxd"
if not PXD.exists() or PXD.read_bytes() != (SRC / "_engine.pxd").read_bytes():
    PXD.write_bytes((SRC / "_engine.pxd").read_bytes())


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


debug = _flag("LPUCORE_DEBUG")
checked = debug or _flag("LPUCORE_BOUNDSCHECK")
directives = {
    "language_level": 3,
    "boundscheck": checked,
    "wraparound": False,
    "initializedcheck": checked,
    "cdivision": True,
    "embedsignature": True,
}
# Bit-exact floating point: no fused multiply-add contraction, no fast-math.
cflags = ["-ffp-contract=off", "-fno-fast-math"] + (["-O0", "-g"] if debug else ["-O3"])

ext = Extension(
    "lpucore._engine",
    sources=[str((SRC / "_engine.pyx").relative_to(HERE))],
    include_dirs=[str(SRC.relative_to(HERE))],
    extra_compile_args=cflags,
    depends=[str(p.relative_to(HERE)) for p in SRC.iterdir() if p.suffix in (".pxi", ".pxd", ".h")],
)

# program loading at C speed (lpucore.fastload): no engine internals, so a module of its own
loader = Extension("lpucore._loader", sources=[str((SRC / "_loader.pyx").relative_to(HERE))],
                   extra_compile_args=cflags)

# HERE: the module lpucore._engine finds its declarations, lpucore/_engine.pxd, by qualified name
setup(ext_modules=cythonize([ext, loader], compiler_directives=directives, include_path=[str(SRC), str(HERE)]))
