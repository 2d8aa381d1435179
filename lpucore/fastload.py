"""Program loading at C speed: the tables that ``lpucore._loader`` checks code tables against.

:meth:`lpucore.Program.validate`, :meth:`~lpucore.Program.lower` and
:meth:`~lpucore.Program.from_bytes` use the compiled loader when it is built: it packs the
instruction lists into the engine's code table (int32 ``[n, 1 + NFIELDS]``) and checks every row
against the ISA table and the configuration in one C loop (tens of millions of instructions a
second). It only ever answers "every instruction passes" or "some instruction fails" (or "cannot
say": an entry that is not a plain Instruction); on anything but "passes", the Python validator
runs and raises today's exact :class:`~lpucore.ProgramError`. The tables are derived here from
:data:`lpucore.isa.TABLE`, so the two validators cannot drift apart silently
(``tests/test_fastload.py`` compares their verdicts on random and mutated programs).

``LPUCORE_FAST_LOAD=0`` turns the compiled loader off (the Python path only), for comparisons.
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import numpy.typing as npt

from . import dtypes as dt
from . import isa
from .config import ChipConfig

K_RANGE, K_SRC, K_NONE_OK = 0, 1, 2
R_NONE, R_LW, R_ABC, R_ACC, R_PERMUTE, R_ROTATE, R_TRANSPOSE, R_VXM, R_MAP, R_REPEAT = range(10)
V_NONE, V_SRC, V_DST = 0, 1, 2
MAXOPS = 64

_RULES: Dict[str, Tuple[int, Tuple[str, ...]]] = {
    "LW": (R_LW, ("src", "n", "row")), "ABC": (R_ABC, ("dtype", "src")), "ACC": (R_ACC, ("dst",)),
    "Permute": (R_PERMUTE, ("map",)), "Rotate": (R_ROTATE, ("dst", "src", "n")),
    "Transpose": (R_TRANSPOSE, ("dst", "src")), "Gather": (R_MAP, ("map",)), "Scatter": (R_MAP, ("map",)),
    "Repeat": (R_REPEAT, ("n", "stride")),
}

# op index of each TABLE entry, by identity (and by value, for Ops copied by pickling)
OP_INDEX: Dict[int, Tuple[int, int]] = {id(op): (op.opcode, len(op.fields)) for op in isa.TABLE}
OPS_BY_OPCODE: List[Optional[isa.Op]] = [isa.BY_OPCODE.get(c) for c in range(256)]
NFIELDS_BY_OPCODE: List[int] = [len(op.fields) if op is not None else 0 for op in OPS_BY_OPCODE]


def _loader() -> Any:
    """The compiled loader module, or None (not built, or LPUCORE_FAST_LOAD=0)."""
    if os.environ.get("LPUCORE_FAST_LOAD", "1") == "0":
        return None
    try:
        return importlib.import_module("lpucore._loader")
    except ImportError:
        return None


def queue_kinds(cfg: ChipConfig) -> Dict[str, int]:
    """Queue kind -> code, the same for ops and queues."""
    kinds = sorted({q.kind for q in cfg.queues} | {op.queue_kind for op in isa.TABLE if op.unit != "ICU"})
    return {k: i for i, k in enumerate(kinds)}


def _op_rows(op: isa.Op, cfg: ChipConfig, kinds: Dict[str, int]) -> Dict[str, Any]:
    """One op's entries of the tables (see src_pyx/_loader.pyx, struct Tables)."""
    names = [f.name for f in op.fields]
    lo = [0] * isa.NFIELDS
    hi = [0] * isa.NFIELDS
    fkind = [K_RANGE] * isa.NFIELDS
    vrole = [V_NONE] * isa.NFIELDS
    for j, f in enumerate(op.fields):
        k = f.k
        lo[j], hi[j] = k.lo(cfg), k.hi(cfg)
        fkind[j] = K_SRC if k.name == "src" else (K_NONE_OK if k.allow_none else K_RANGE)
        if op.unit == "VXM" and f.kind in ("src", "dst"):
            vrole[j] = V_SRC if f.kind == "src" else V_DST
    rule, fields = _RULES.get(op.mnemonic, (R_VXM if op.unit == "VXM" else R_NONE, ()))
    fa = [names.index(n) for n in fields] + [0] * (4 - len(fields))
    return {"nf": len(op.fields), "lo": lo, "hi": hi, "fkind": fkind, "vrole": vrole,
            "qkind": -1 if op.unit == "ICU" else kinds[op.queue_kind],
            "dtype_f": names.index("dtype") if "dtype" in names else -1,
            "dmask": sum(1 << dt.get(n).code for n in op.dtypes), "rule": rule, "fa": fa,
            "vto": names.index("to") if op.cls == "cvt" else -1, "vout": 1 if op.cls == "requant" else 0,
            "strided": sum(1 << j for j, f in enumerate(op.fields) if f.strided),
            "is_icu": int(op.unit == "ICU")}


def tables(cfg: ChipConfig) -> Dict[str, Any]:
    """The checker's tables for one configuration, as plain Python values."""
    if isa.NFIELDS != 8 or len(isa.TABLE) > MAXOPS or max(op.opcode for op in isa.TABLE) > 255:
        raise RuntimeError("src_pyx/_loader.pyx's table sizes no longer fit lpucore.isa")  # pragma: no cover
    kinds = queue_kinds(cfg)
    rows = [_op_rows(op, cfg, kinds) for op in isa.TABLE]
    out: Dict[str, Any] = {key: [r[key] for r in rows] for key in rows[0]}
    opk = [-1] * 256
    for i, op in enumerate(isa.TABLE):
        opk[op.opcode] = i
    out.update(opk=opk, dbytes=[d.nbytes for d in dt.ALL], streams=cfg.streams, S=cfg.streams_per_direction,
               latch_base=isa.LATCH_BASE, alus=cfg.vxm_alus_per_lane, mxm_size=cfg.mxm_size,
               lps=cfg.lanes_per_superlane)
    if [d.code for d in dt.ALL] != list(range(len(dt.ALL))):
        raise RuntimeError("dtype codes are no longer 0..n-1")  # pragma: no cover
    return out


_CACHE: Dict[ChipConfig, Tuple[Any, npt.NDArray[np.int32]]] = {}
_LOCK = threading.Lock()


def checker(cfg: ChipConfig) -> Optional[Tuple[Any, npt.NDArray[np.int32]]]:
    """(compiled checker, queue-kind code of each queue) for ``cfg``, or None without the loader."""
    mod = _loader()
    if mod is None:
        return None
    with _LOCK:
        hit = _CACHE.get(cfg)
        if hit is None:
            kinds = queue_kinds(cfg)
            hit = (mod.Checker(tables(cfg)), np.array([kinds[q.kind] for q in cfg.queues], dtype=np.int32))
            if len(_CACHE) >= 16:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[cfg] = hit
    return hit


def first_bad(cfg: ChipConfig, code: npt.NDArray[np.int32], qstart: npt.NDArray[np.int64]) -> Optional[int]:
    """Row of the first instruction (queue by queue) that the Python validator rejects, -1 if none,
    or None without the compiled loader. ``code``/``qstart``: :meth:`lpucore.Program.lower`'s form."""
    hit = checker(cfg)
    if hit is None:
        return None
    chk, qkind = hit
    r: int = chk.first_bad(code, qstart, qkind)
    return r


def pack(lists: List[List[Any]], instruction: type) -> Optional[Tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]]:
    """:meth:`lpucore.Program.lower`'s packed form of per-queue instruction lists, or None (no
    compiled loader, or an entry the Python path must look at: anything but an ``instruction``,
    the :class:`lpucore.program.Instruction` class, of a table Op with plain int operands)."""
    mod = _loader()
    if mod is None:
        return None
    res: Optional[Tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]] = mod.pack(lists, OP_INDEX, instruction)
    return res


def unpack(code: npt.NDArray[np.int32], start: int, count: int, instruction: type) -> Optional[List[Any]]:
    """``instruction`` objects (the :class:`lpucore.program.Instruction` class) of rows
    start..start+count-1 of a checked code table (every opcode known and every unused field
    zero), or None without the compiled loader."""
    mod = _loader()
    if mod is None:
        return None
    out: List[Any] = mod.unpack(code, start, count, OPS_BY_OPCODE, NFIELDS_BY_OPCODE, instruction)
    return out
