# Type stub for the lpucore package: the public API re-exported from its modules.
from . import ops as ops
from .asm import assemble as assemble, disassemble as disassemble
from .chip import ENGINES as ENGINES, Chip as Chip, RunStats as RunStats
from .compiler.lower import Compiled as Compiled, compile as compile, execute as execute
from .config import ChipConfig as ChipConfig
from .errors import (CompileError as CompileError, ConfigError as ConfigError,
                     EngineUnavailableError as EngineUnavailableError, LpuError as LpuError,
                     ProgramError as ProgramError, ScheduleError as ScheduleError, SnapshotError as SnapshotError,
                     TensorError as TensorError)
from .graph import Graph as Graph, GraphError as GraphError, Tensor as Tensor
from .program import Instruction as Instruction, Program as Program
from .snapshot import Snapshot as Snapshot
from .system import System as System, SystemStats as SystemStats

__version__: str

def get_include() -> str: ...
__all__: list[str]
