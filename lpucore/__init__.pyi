# Type stub for the lpucore package: the public API re-exported from its modules.
from . import ops as ops
from .asm import assemble as assemble
from .asm import disassemble as disassemble
from .chip import Chip as Chip
from .chip import RunStats as RunStats
from .compiler.api import compile as compile
from .compiler.api import load_compiled as load_compiled
from .compiler.lower import Compiled as Compiled
from .compiler.lower import execute as execute
from .config import ChipConfig as ChipConfig
from .engine import ENGINES as ENGINES
from .errors import CompiledFileError as CompiledFileError
from .errors import CompileError as CompileError
from .errors import ConfigError as ConfigError
from .errors import EngineUnavailableError as EngineUnavailableError
from .errors import LpuError as LpuError
from .errors import ModelError as ModelError
from .errors import ProgramError as ProgramError
from .errors import ScheduleError as ScheduleError
from .errors import SnapshotError as SnapshotError
from .errors import TensorError as TensorError
from .graph import Graph as Graph
from .graph import GraphError as GraphError
from .graph import Tensor as Tensor
from .program import Instruction as Instruction
from .program import Program as Program
from .snapshot import Snapshot as Snapshot
from .system import System as System
from .system import SystemStats as SystemStats

__version__: str

def get_include() -> str: ...
__all__: list[str]
