"""lpucore: a functional, cycle-level simulator of Groq's Tensor Streaming Processor.

The public API::

    ChipConfig            geometry and timing (groqchip1() default, tiny() for tests)
    Program               instruction queues + tensor table; save()/load() binary files
    assemble, disassemble text <-> Program
    Chip                  the driver: load, write_tensor, run, read_tensor, stats
    LpuError and subclasses ConfigError, ProgramError, TensorError, ScheduleError,
    EngineUnavailableError, CompileError
    Graph, compile, execute   tensor graphs compiled to scheduled programs
    lpucore.ops           NumPy-like operations run on the chip
    lpucore.compiler      scheduled programs (gemm_program, matmul)
    lpucore.matmul        the MXM's numerics contract
"""

from .asm import assemble, disassemble
from .chip import ENGINES, Chip, RunStats
from .config import ChipConfig
from .errors import (CompileError, ConfigError, EngineUnavailableError, LpuError, ProgramError,
                     ScheduleError, TensorError)
from .program import Instruction, Program
from .graph import Graph, GraphError, Tensor
from .compiler.lower import Compiled, compile, execute
from . import ops

__version__ = "0.1.0"

__all__ = ["ChipConfig", "Program", "Instruction", "assemble", "disassemble", "Chip", "RunStats",
           "ENGINES", "LpuError", "ConfigError", "ProgramError", "TensorError", "ScheduleError",
           "EngineUnavailableError", "CompileError", "Graph", "GraphError", "Tensor", "Compiled", "compile",
           "execute", "ops", "__version__"]
