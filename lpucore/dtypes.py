"""Element types the chip handles, and how they map to streams and byte planes.

A stream register holds one byte per lane (TSP.md section 1), so a multi-byte
element travels as a *stream group* of consecutive streams, least significant
byte first: int16/float16 on 2 streams, int32/float32 on 4.  MEM stores the
same bytes as byte planes (one 320-byte vector per plane).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import numpy.typing as npt

from .errors import LpuError


@dataclass(frozen=True)
class DType:
    """One element type: its ISA code, name, width in bytes and NumPy twin."""

    code: int
    name: str
    nbytes: int
    is_float: bool
    numpy: np.dtype

    @property
    def bits(self) -> int:
        return 8 * self.nbytes

    def __str__(self) -> str:
        return self.name


INT8 = DType(0, "int8", 1, False, np.dtype(np.int8))
INT16 = DType(1, "int16", 2, False, np.dtype(np.int16))
INT32 = DType(2, "int32", 4, False, np.dtype(np.int32))
FLOAT16 = DType(3, "float16", 2, True, np.dtype(np.float16))
FLOAT32 = DType(4, "float32", 4, True, np.dtype(np.float32))

ALL = (INT8, INT16, INT32, FLOAT16, FLOAT32)
INTS = (INT8, INT16, INT32)
FLOATS = (FLOAT16, FLOAT32)
BY_CODE = {d.code: d for d in ALL}
_ALIASES = {"fp16": FLOAT16, "fp32": FLOAT32, "half": FLOAT16, "float": FLOAT32,
            "i8": INT8, "i16": INT16, "i32": INT32, "f16": FLOAT16, "f32": FLOAT32}
BY_NAME = {**{d.name: d for d in ALL}, **_ALIASES}


def get(spec: Union[DType, int, np.integer[Any], npt.DTypeLike]) -> DType:
    """Resolve a name (``"float16"``, ``"fp16"``), a code, a NumPy dtype or a DType."""
    if isinstance(spec, DType):
        return spec
    if isinstance(spec, bool):                  # not a code (np.dtype(True) is a TypeError too)
        raise LpuError(f"unknown dtype {spec!r}")
    if isinstance(spec, (int, np.integer)):
        if int(spec) in BY_CODE:
            return BY_CODE[int(spec)]
        raise LpuError(f"unknown dtype code {spec}")
    if isinstance(spec, str):
        d = BY_NAME.get(spec.lower())
        if d is None:
            raise LpuError(f"unknown dtype {spec!r}; the chip handles {', '.join(x.name for x in ALL)}")
        return d
    try:
        npd = np.dtype(spec)
    except TypeError:
        raise LpuError(f"unknown dtype {spec!r}") from None
    for d in ALL:
        if d.numpy == npd:
            return d
    raise LpuError(f"dtype {npd} is not one the chip handles ({', '.join(x.name for x in ALL)})")
