# Type stub for lpucore.snapshot: a chip's whole state (Chip.snapshot / Chip.restore).
import os
from typing import Dict, Optional, Union

import numpy as np

from .config import ChipConfig
from .program import Program

FORMAT: str
VERSION: int

class Snapshot:
    engine: str
    config: ChipConfig
    fp16_mxm: str
    program_bytes: Optional[bytes]
    scalars: Dict[str, int]
    arrays: Dict[str, np.ndarray]
    def __init__(self, engine: str, config: ChipConfig, fp16_mxm: str, program: Optional[bytes],
                 scalars: Dict[str, int], arrays: Dict[str, np.ndarray]) -> None: ...
    @property
    def cycle(self) -> int: ...
    @property
    def program(self) -> Optional[Program]: ...
    @property
    def nbytes(self) -> int: ...
    def save(self, path: Union[str, os.PathLike]) -> None: ...
    @classmethod
    def load(cls, path: Union[str, os.PathLike], config: Optional[ChipConfig] = None) -> "Snapshot": ...

def check_config(snap: Snapshot, config: ChipConfig) -> None: ...
