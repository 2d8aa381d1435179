"""From computations to scheduled programs.

* :mod:`lpucore.compiler.emit` - place instructions at exact cycles, fill NOPs, fold runs
  into ``Repeat``, and predict a program's cycle count statically.
* :mod:`lpucore.compiler.gemm` - complete scheduled programs for C = A x B on all four MXM planes.
"""

from .api import compile, load_compiled
from .emit import Emitter, expected_cycles
from .gemm import GemmProgram, gemm_program, matmul
from .lower import Compiled, execute

__all__ = ["Emitter", "expected_cycles", "GemmProgram", "gemm_program", "matmul", "Compiled", "compile", "execute",
           "load_compiled"]
