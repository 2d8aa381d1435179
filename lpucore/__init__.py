"""lpucore: a functional, cycle-level simulator of Groq's Tensor Streaming Processor.

The public API::

    ChipConfig            geometry and timing (groqchip1() default, tiny() for tests)
    Program               instruction queues + tensor table; save()/load() binary files
    assemble, disassemble text <-> Program
    Chip                  the driver: load, write_tensor, run, step, read_tensor, stats
    Snapshot              a chip's whole state (Chip.snapshot / Chip.restore, save / load)
    System                chips joined by C2C links (node, rack, dragonfly, any wiring), run in lockstep
    LpuError and subclasses ConfigError, ProgramError, TensorError, ScheduleError,
    EngineUnavailableError, CompileError, SnapshotError, ModelError, CompiledFileError
    Graph, compile, execute   tensor graphs compiled to scheduled programs
    Compiled.save, load_compiled   compiled programs on disk (and the compile cache, lpucore.compiler.store)
    lpucore.ops           NumPy-like operations run on the chip
    lpucore.compiler      scheduled programs (gemm_program, matmul)
    lpucore.matmul        the MXM's numerics contract
    lpucore.engine        the Engine protocol both engines satisfy (Chip.engine), make_engine
"""

from . import ops
from .asm import assemble, disassemble
from .chip import Chip, RunStats
from .compiler.api import compile, load_compiled
from .compiler.lower import Compiled, execute
from .config import ChipConfig
from .engine import ENGINES
from .errors import (
    CompiledFileError,
    CompileError,
    ConfigError,
    EngineUnavailableError,
    LpuError,
    ModelError,
    ProgramError,
    ScheduleError,
    SnapshotError,
    TensorError,
)
from .graph import Graph, GraphError, Tensor
from .program import Instruction, Program
from .snapshot import Snapshot
from .system import System, SystemStats

__version__ = "0.1.0"


def get_include() -> str:
    """The directory holding the ``lpucore`` package, for Cython's ``include_path`` so that
    ``from lpucore._engine cimport ...`` finds ``lpucore/_engine.pxd`` (needed when lpucore
    is installed in editable mode; a regular install is found on ``sys.path`` anyway)."""
    import os
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = ["ChipConfig", "Program", "Instruction", "assemble", "disassemble", "Chip", "RunStats", "Snapshot",
           "System", "SystemStats", "ENGINES", "LpuError", "ConfigError", "ProgramError", "TensorError",
           "ScheduleError", "EngineUnavailableError", "CompileError", "SnapshotError", "ModelError", "Graph",
           "GraphError", "Tensor", "Compiled", "compile", "execute", "load_compiled", "CompiledFileError", "ops",
           "get_include", "__version__"]
