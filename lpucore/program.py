"""Programs: one instruction list per ICU queue, plus a tensor table.

Binary file format (little-endian), version 1::

    offset  size  what
    0       4     magic b"LPUP"
    4       2     format version (1)
    6       2     fields per instruction (isa.NFIELDS)
    8       4     length M of the metadata JSON
    12      M     metadata: {"config": ChipConfig.to_dict(), "tensors": [...],
                              "queues": [[queue name, instruction count], ...]}
    12+M    4     total instruction count N
    16+M    N*4*(1+NFIELDS)   instructions: int32 opcode, then NFIELDS int32 fields
    end-4   4     CRC-32 of every byte before it

Every field is validated against the ISA table and the configuration before
any engine sees the program (:meth:`Program.validate`).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np
import numpy.typing as npt

from . import dtypes as dt
from . import isa
from .config import ChipConfig
from .errors import ConfigError, LpuError, ProgramError
from .layout import Extent, Stripes, TensorInfo, make_tensor

if TYPE_CHECKING:  # pragma: no cover
    from typing import TypeGuard  # Python >= 3.10; only named in annotations, which are never evaluated

MAGIC = b"LPUP"
VERSION = 1
_HDR = struct.Struct("<4sHHI")

# An operand as make_instruction takes it: an int, a DType, or text such as "E5", "A2", "float16", "-"
Operand = Union[int, "np.integer[Any]", str, dt.DType]
# A byte plane as make_tensor takes it: Stripes, {"stripes": [(slice, base address), ...]}, or extents given
# as Extent, (slice, address, count) or (slice, address); a slice is a number or a name such as "W3"
PlaneSpec = Union[Stripes, Mapping[str, Sequence[Sequence[Union[int, str]]]],
                  Iterable[Union[Extent, Sequence[Union[int, str]]]]]
# (opcode, operands) of instructions already found legal on a configuration
_Legal = Set[Tuple[int, Tuple[int, ...]]]


@dataclass(frozen=True)
class Instruction:
    """One encoded instruction: an ISA table entry and its operand values."""

    # no per-instance dict: a compiled decode step holds a million of these, and the loader reads
    # both fields of each (Python 3.9 has no dataclass(slots=True))
    __slots__ = ("op", "args")
    op: isa.Op
    args: Tuple[int, ...]

    def __reduce__(self) -> Tuple[Any, Tuple[isa.Op, Tuple[int, ...]]]:
        # frozen with slots: pickle and copy rebuild through __init__, not by setting attributes
        return (Instruction, (self.op, self.args))

    def __getitem__(self, name: str) -> int:
        return self.args[self.op.field_index(name)]

    @property
    def mnemonic(self) -> str:
        return self.op.mnemonic

    def text(self, cfg: ChipConfig) -> str:
        ops = ", ".join(isa.format_value(f.kind, v, cfg) for f, v in zip(self.op.fields, self.args))
        return f"{self.op.mnemonic} {ops}".rstrip()


# (mnemonic, unit) -> (op, operand defaults) for ops whose defaults are all plain ints or absent:
# the compiler builds millions of instructions from plain ints, and this skips the general path.
_PLAIN: Dict[Tuple[str, Optional[str]], Tuple[isa.Op, Tuple[Optional[int], ...]]] = {}


def _plain_ints(vals: Tuple[object, ...]) -> TypeGuard[Tuple[int, ...]]:
    """Every value is a plain int (not a bool, a NumPy integer, a string or None)."""
    return all(type(v) is int for v in vals)


def make_instruction(cfg: ChipConfig, mnemonic: str, *args: Operand, unit: Optional[str] = None,
                     **kwargs: Operand) -> Instruction:
    """Build an instruction from Python values: ints, or text such as ``"E5"``, ``"A2"``,
    ``"float16"`` and ``"-"`` for the operand kinds that have a text form.  ``unit``
    resolves mnemonics that two units share (VXM ``select``, SXM ``Select``)."""
    if not kwargs:
        hit = _PLAIN.get((mnemonic, unit))
        if hit is not None:
            plain_op, defaults = hit
            n = len(args)
            if n <= len(defaults):
                full = args + defaults[n:]
                if _plain_ints(full):        # plain int operands, and no default left absent (None)
                    return Instruction(plain_op, full)
    op = isa.lookup(mnemonic, unit)
    if op is None:
        if isa.lookup(mnemonic) is None and any(o.mnemonic.lower() == mnemonic.lower() for o in isa.TABLE):
            raise ProgramError(f"{mnemonic!r} exists in several units; say which (unit=...)")
        raise ProgramError(f"unknown instruction {mnemonic!r}" + (f" for the {unit}" if unit else ""))
    if len(args) > len(op.fields):
        raise ProgramError(f"{op.mnemonic} takes at most {len(op.fields)} operands, got {len(args)}")
    vals: List[Optional[Operand]] = list(args) + [None] * (len(op.fields) - len(args))
    names = [f.name for f in op.fields]
    for k, given in kwargs.items():
        if k not in names:
            raise ProgramError(f"{op.mnemonic} has no operand {k!r} (operands: {', '.join(names) or 'none'})")
        if vals[names.index(k)] is not None:
            raise ProgramError(f"{op.mnemonic}: operand {k!r} given twice")
        vals[names.index(k)] = given
    out: List[int] = []
    dtype_code: Optional[int] = None
    for f, v in zip(op.fields, vals):
        if v is None:
            if f.default is None:
                raise ProgramError(f"{op.mnemonic}: missing operand {f.name!r}")
            v = f.default
        if isinstance(v, dt.DType):
            v = v.code
        if isinstance(v, str):
            try:
                v = isa.parse_value(f.kind, v, cfg, dtype_code)
            except ValueError as e:
                raise ProgramError(f"{op.mnemonic}: {e}", field=f.name) from None
        if isinstance(v, (bool, float)) or not isinstance(v, (int, np.integer)):
            raise ProgramError(f"{op.mnemonic}: operand {f.name!r} must be an integer, got {v!r}")
        v = int(v)
        if f.kind == "dtype":
            dtype_code = v
        out.append(v)
    defaults = tuple(f.default for f in op.fields)
    if all(d is None or type(d) is int for d in defaults):
        _PLAIN[(mnemonic, unit)] = (op, defaults)
    return Instruction(op, tuple(out))


def _group(d: dt.DType) -> int:
    return d.nbytes


def _check_stream_groups(op: isa.Op, a: Dict[str, int], cfg: ChipConfig) -> Optional[Tuple[str, str]]:
    """check_instruction's rules for MXM and SXM instructions (``a``: the operands by field name)."""
    S = cfg.streams_per_direction

    def group(field: str, width: int, aligned: bool = True) -> Optional[Tuple[str, str]]:
        """The stream group field..field+width-1 stays in one direction (and is aligned)."""
        v = a[field] % S
        if aligned and v % width:
            return field, (f"a {width}-stream group must start at a multiple of {width}; "
                           f"{isa.format_value('stream', a[field], cfg)} does not")
        if v + width > S:
            return field, (f"streams {isa.format_value('stream', a[field], cfg)}.. +{width} run past the "
                           f"{S} streams of one direction")
        return None

    if op.unit == "MXM":
        if op.mnemonic == "LW":
            if a["row"] + a["n"] > cfg.mxm_size:
                return "row", f"byte-rows {a['row']}..{a['row'] + a['n'] - 1} run past the {cfg.mxm_size} of the buffer"
            return group("src", a["n"], aligned=False)
        if op.mnemonic == "ABC":
            return group("src", dt.get(a["dtype"]).nbytes)
        if op.mnemonic == "ACC":
            return group("dst", 4)
        return None
    if op.unit == "SXM":
        if op.mnemonic == "Permute":
            return group("map", 2)
        if op.mnemonic == "Rotate":
            return group("src", a["n"], aligned=False) or group("dst", a["n"] * a["n"], aligned=False)
        if op.mnemonic == "Transpose":
            n = cfg.lanes_per_superlane
            return group("src", n, aligned=False) or group("dst", n, aligned=False)
        return None
    return None


def check_instruction(ins: Instruction, cfg: ChipConfig) -> Optional[Tuple[Optional[str], str]]:
    """None if legal, else (field name or None, reason)."""
    op = ins.op
    if len(ins.args) != len(op.fields):
        return None, f"{op.mnemonic} takes {len(op.fields)} operands, got {len(ins.args)}"
    for f, v in zip(op.fields, ins.args):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            return f.name, f"{v!r} is not an integer"
        err = f.k.check(int(v), cfg)
        if err:
            return f.name, err
    a = dict(zip((f.name for f in op.fields), ins.args))
    if op.dtypes and "dtype" in a and dt.get(a["dtype"]).name not in op.dtypes:
        return "dtype", f"{op.mnemonic} does not take {dt.get(a['dtype']).name} (takes {', '.join(op.dtypes)})"
    if op.unit in ("MXM", "SXM"):
        return _check_stream_groups(op, a, cfg)
    if op.unit == "VXM":
        src_d = dt.get(a.get("dtype", dt.INT32.code))
        out_d = dt.get(a["to"]) if op.cls == "cvt" else (dt.INT8 if op.cls == "requant" else src_d)
        for f in op.fields:
            if f.kind not in ("src", "dst"):
                continue
            v = a[f.name]
            if v == isa.NONE or v >= isa.LATCH_BASE:
                continue
            w = _group(out_d if f.kind == "dst" else src_d)
            if f.name == "b" and op.cls == "shift":
                w = _group(src_d)
            local = v % cfg.streams_per_direction
            if local % w:
                return f.name, (f"a {w}-byte element needs a stream group starting at a multiple of {w}; "
                                f"{isa.format_value('stream', v, cfg)} is not")
    if op.mnemonic in ("Gather", "Scatter"):
        if ins["map"] % cfg.streams_per_direction % 2:
            return "map", "the address map is an int16 stream group and must start at an even stream"
    return None


def _read_meta(raw: bytes) -> Tuple[ChipConfig, List[Tuple[str, int]], List[Any]]:
    """A program file's metadata: its configuration, (queue name, instruction count) pairs and
    tensor entries; ProgramError for anything malformed (the JSON nested too deeply, too long an
    integer, a bad configuration, ...)."""
    try:
        meta = json.loads(raw.decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("metadata is not an object")
        cfg = ChipConfig.from_dict(meta["config"])
        queues = [(n, c) for n, c in meta["queues"]]
        if not all(isinstance(n, str) and type(c) is int for n, c in queues):
            raise ValueError("queues must be [name, instruction count] pairs")
        tensors = list(meta["tensors"])
    except LpuError as e:
        raise ProgramError(f"bad metadata: {e}") from None
    except Exception as e:           # ValueError, KeyError, TypeError, RecursionError, ...
        raise ProgramError(f"bad metadata: {type(e).__name__}: {str(e)[:200]}") from None
    return cfg, queues, tensors


class _Lazy:
    """A checked code table standing in for a program's instruction lists (see Program._lazy)."""

    __slots__ = ("code", "qstart", "names")

    def __init__(self, code: npt.NDArray[np.int32], qstart: npt.NDArray[np.int64], names: List[str]) -> None:
        self.code, self.qstart, self.names = code, qstart, names


class Program:
    """A complete program for one chip: per-queue instruction lists and a tensor table.

    Build one with :func:`lpucore.assemble`, :meth:`load`, or programmatically::

        p = Program(ChipConfig.tiny())
        p.add("MEM.W0", "Read", 0, "E0")
        p.add("MEM.E0", "NOP", 3)
        p.add("MEM.E0", "Write", 5, "E0")
    """

    def __init__(self, config: Optional[ChipConfig] = None) -> None:
        self.config = config if config is not None else ChipConfig.groqchip1()
        self.queues: Dict[str, List[Instruction]] = {}
        self.tensors: Dict[str, TensorInfo] = {}
        # the state validate last passed (see validate): a program is checked once until it changes
        self._checked: Optional[Tuple[ChipConfig, Any, Dict[str, TensorInfo]]] = None
        # a program read from a file whose instructions are not needed yet: its checked code table
        # (rows in queue-number order, Program.lower's form); the lists are built on first access
        self._lazy: Optional[_Lazy] = None

    def __getattr__(self, name: str) -> Any:
        """``queues`` of a program read from a file, built from its code table on first access."""
        lazy = self.__dict__.get("_lazy")
        if name != "queues" or lazy is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        from . import fastload
        queues: Dict[str, List[Instruction]] = {}
        for q, name_ in enumerate(lazy.names):
            a, b = int(lazy.qstart[q]), int(lazy.qstart[q + 1])
            if b > a:
                lst = fastload.unpack(lazy.code, a, b - a, Instruction)
                assert lst is not None            # a lazy program exists only with the compiled loader
                queues[name_] = lst
        self.__dict__["queues"] = queues
        return queues

    # ---- building ---------------------------------------------------------------------
    def add(self, queue: str, mnemonic: str, *args: Operand, check: bool = True, **kwargs: Operand) -> Instruction:
        """Append one instruction to a queue and return it (validated on the spot, unless
        ``check=False``: then the caller must call :meth:`validate` before the program is
        used, as the compiler does once for the whole program)."""
        try:
            q = self.config.queue(queue)
        except ConfigError as e:
            raise ProgramError(str(e)) from None
        lst = self.queues.get(q.name, [])
        try:
            ins = make_instruction(self.config, mnemonic, *args, unit=q.unit, **kwargs)
        except ProgramError as e:
            msg = str(e).split(": ", 1)[1] if e.field is not None else str(e)
            raise ProgramError(msg, queue=q.name, index=len(lst), field=e.field) from None
        lst = self.queues.setdefault(q.name, [])
        if check:
            self._check_one(q.name, lst, len(lst), ins)
        lst.append(ins)
        return ins

    def add_tensor(self, name: str, dtype: Union[dt.DType, int, np.integer[Any], npt.DTypeLike], shape: Sequence[int],
                   planes: Sequence[PlaneSpec]) -> TensorInfo:
        """Add a tensor-table entry (see :func:`lpucore.layout.make_tensor`)."""
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ProgramError(f"tensor name {name!r} must be a non-empty word")
        if name in self.tensors:
            raise ProgramError(f"tensor {name!r} defined twice")
        info = make_tensor(name, dtype, shape, planes, self.config)
        self.tensors[name] = info
        return info

    # ---- validation -----------------------------------------------------------------------
    def _check_one(self, qname: str, lst: List[Instruction], i: int, ins: Instruction,
                   legal: Optional[_Legal] = None) -> None:
        """Check instruction i of queue qname.  ``legal``: (opcode, operands) already found legal
        on this configuration (a Repeat is always checked, as it depends on its predecessor)."""
        q = self.config.queue(qname)
        if not isinstance(ins, Instruction) or (id(ins.op) not in isa.TABLE_IDS and ins.op not in isa.TABLE):
            raise ProgramError("not an Instruction", queue=qname, index=i)
        if ins.op.unit != "ICU" and ins.op.queue_kind != q.kind:
            raise ProgramError(f"{ins.op.mnemonic} is a {ins.op.queue_kind} instruction; queue {qname} runs "
                               f"{q.kind} instructions", queue=qname, index=i)
        key = None
        if legal is not None and ins.op.mnemonic != "Repeat":
            key = (ins.op.opcode, ins.args)
            if key in legal:
                return
        bad = check_instruction(ins, self.config)
        if bad:
            raise ProgramError(f"{ins.op.mnemonic}: {bad[1]}", queue=qname, index=i, field=bad[0])
        if key is not None and legal is not None:
            legal.add(key)
        if ins.op.mnemonic == "Repeat":
            prev = lst[i - 1] if i > 0 else None
            if prev is None or prev.op.unit == "ICU":
                raise ProgramError("Repeat must follow a functional-unit instruction", queue=qname, index=i)
            n, stride = ins["n"], ins["stride"]
            strided = [j for j, f in enumerate(prev.op.fields) if f.strided]
            if stride and not strided:
                raise ProgramError(f"{prev.op.mnemonic} has no address to stride", queue=qname, index=i, field="stride")
            if stride:
                # fields move linearly, so the last repetition being valid makes all valid
                last = Instruction(prev.op, tuple(v + n * stride if j in strided else v
                                                  for j, v in enumerate(prev.args)))
                bad = check_instruction(last, self.config)
                if bad:
                    raise ProgramError(f"repetition {n} of {prev.op.mnemonic}: {bad[0]} {bad[1]}",
                                       queue=qname, index=i, field="stride")

    def validate(self) -> "Program":
        """Check every queue, instruction and field against the table and the configuration.

        A program that passed is remembered as it was (its configuration, each queue's
        instructions and its tensor table): validating it again while it is unchanged costs a
        comparison of those (about 10 ns an instruction), and any change is checked in full."""
        if not isinstance(self.config, ChipConfig):
            raise ProgramError("program has no ChipConfig")
        checked = getattr(self, "_checked", None)         # None too for a Program unpickled from an old lpucore
        if checked is not None and checked == self._state():
            return self
        self._checked = None
        self.__dict__.pop("_packed", None)
        if not self._fast_check():
            self._slow_check()
        for name, t in self.tensors.items():
            if not isinstance(t, TensorInfo) or t.name != name:
                raise ProgramError(f"tensor table entry {name!r} is malformed")
            make_tensor(t.name, t.dtype, t.shape, t.planes, self.config)
        self._checked = self._state()
        return self

    def _fast_check(self) -> bool:
        """True if the compiled loader (:mod:`lpucore.fastload`) finds every queue name canonical and
        every instruction legal; False if it finds a fault or is not built (the Python validator
        then runs and raises the exact error)."""
        from . import fastload
        if self.__dict__.get("_lazy") is not None and "queues" not in self.__dict__:
            return True                          # read from a file, its code table checked then
        index = self.config.queue_index          # canonical names only
        if not all(type(q) is str and q in index for q in self.queues):
            return False
        packed = fastload.pack(self.queue_lists(), Instruction)
        if packed is None or fastload.first_bad(self.config, *packed) != -1:
            return False
        self.__dict__["_packed"] = packed        # for the lower() that Chip.load calls next
        return True

    def _slow_check(self) -> None:
        """The Python validator: raises a ProgramError for the first fault, queue by queue."""
        legal: _Legal = set()
        for qname, lst in self.queues.items():
            try:
                canonical = self.config.queue(qname).name
            except ConfigError as e:
                raise ProgramError(str(e), queue=qname) from None
            if canonical != qname:
                raise ProgramError(f"queue names are spelt as the configuration does: {canonical!r}, not {qname!r}",
                                   queue=qname)
            for i, ins in enumerate(lst):
                self._check_one(qname, lst, i, ins, legal)

    def _state(self) -> Tuple[ChipConfig, Any, Dict[str, TensorInfo]]:
        """What validate checks, as immutable values (Instructions and TensorInfos are frozen;
        tuples of them compare by identity first, so comparing an unchanged program is cheap)."""
        lazy = self.__dict__.get("_lazy")
        if lazy is not None and "queues" not in self.__dict__:
            return (self.config, lazy, dict(self.tensors))        # the lists not built: unchanged
        return (self.config, {q: tuple(lst) for q, lst in self.queues.items()}, dict(self.tensors))

    def _mark_checked(self) -> None:
        """Record the program as validated without checking it: only for a program put together
        from the instructions of validated programs and instructions checked as they were added
        (:func:`lpucore.compiler.pipeline.hand_over`)."""
        self._checked = self._state()

    # ---- views -------------------------------------------------------------------------------
    def queue_lists(self) -> List[List[Instruction]]:
        """Instruction lists indexed by ISA queue number (empty where unused)."""
        out: List[List[Instruction]] = [[] for _ in self.config.queues]
        for name, lst in self.queues.items():
            out[self.config.queue_index[name]] = lst
        return out

    def lower(self) -> Tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]:
        """Packed form for the fast engine: int32 code[n, 1 + NFIELDS] (opcode, fields)
        and int64 qstart[nqueues + 1] (queue q holds rows qstart[q]:qstart[q+1])."""
        from . import fastload
        lazy = self.__dict__.get("_lazy")
        if lazy is not None and "queues" not in self.__dict__:
            return lazy.code.copy(), lazy.qstart.copy()
        packed = self.__dict__.pop("_packed", None)
        if packed is not None and self._checked is not None and self._checked == self._state():
            mine: Tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]] = packed
            return mine                          # packed by validate, and unchanged since: the caller's now
        lists = self.queue_lists()
        packed = fastload.pack(lists, Instruction)
        if packed is not None:
            return packed
        n = sum(len(lst) for lst in lists)
        qstart = np.zeros(len(lists) + 1, dtype=np.int64)
        pad = (0,) * isa.NFIELDS
        rows: List[Tuple[int, ...]] = []
        for qi, lst in enumerate(lists):
            qstart[qi] = len(rows)
            rows.extend((ins.op.opcode,) + ins.args + pad[len(ins.args):] for ins in lst)
        qstart[-1] = len(rows)
        code = np.array(rows, dtype=np.int32).reshape(n, 1 + isa.NFIELDS)
        return code, qstart

    def __len__(self) -> int:
        return sum(len(lst) for lst in self.queues.values())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Program):
            return NotImplemented
        mine = {k: v for k, v in self.queues.items() if v}
        theirs = {k: v for k, v in other.queues.items() if v}
        return self.config == other.config and mine == theirs and self.tensors == other.tensors

    def __repr__(self) -> str:
        return (f"<Program for {self.config.name}: {len(self)} instructions in "
                f"{sum(1 for lst in self.queues.values() if lst)} queues, {len(self.tensors)} tensors>")

    # ---- binary files --------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        self.validate()
        lists = [(name, self.queues[name]) for name in (q.name for q in self.config.queues)
                 if self.queues.get(name)]
        meta = {"config": self.config.to_dict(),
                "tensors": [t.to_json() for t in self.tensors.values()],
                "queues": [[name, len(lst)] for name, lst in lists]}
        mj = json.dumps(meta, sort_keys=True).encode()
        code = np.zeros((sum(len(lst) for _, lst in lists), 1 + isa.NFIELDS), dtype="<i4")
        r = 0
        for _, lst in lists:
            for ins in lst:
                code[r, 0] = ins.op.opcode
                code[r, 1: 1 + len(ins.args)] = ins.args
                r += 1
        body = _HDR.pack(MAGIC, VERSION, isa.NFIELDS, len(mj)) + mj + struct.pack("<I", len(code)) + code.tobytes()
        return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)

    @classmethod
    def from_bytes(cls, data: Union[bytes, bytearray, memoryview]) -> "Program":
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ProgramError("program data must be bytes")
        data = bytes(data)
        if len(data) < _HDR.size + 8:
            raise ProgramError(f"file too short to be an lpucore program ({len(data)} bytes)")
        magic, version, nf, mlen = _HDR.unpack_from(data, 0)
        if magic != MAGIC:
            raise ProgramError(f"not an lpucore program (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise ProgramError(f"program format version {version} is not supported (this lpucore reads {VERSION})")
        if nf != isa.NFIELDS:
            raise ProgramError(f"program has {nf} fields per instruction, expected {isa.NFIELDS}")
        (crc,) = struct.unpack_from("<I", data, len(data) - 4)
        if zlib.crc32(data[:-4]) & 0xFFFFFFFF != crc:
            raise ProgramError("program file is corrupted or truncated (checksum mismatch)")
        end_meta = _HDR.size + mlen
        if end_meta + 4 > len(data) - 4:
            raise ProgramError("program file is truncated (metadata runs past the end)")
        cfg, queues, tensors = _read_meta(data[_HDR.size:end_meta])
        (n,) = struct.unpack_from("<I", data, end_meta)
        rec = 4 * (1 + isa.NFIELDS)
        if end_meta + 4 + n * rec != len(data) - 4:
            raise ProgramError(f"program file length does not match its {n} instructions")
        if sum(c for _, c in queues) != n or any(c < 0 for _, c in queues):
            raise ProgramError("queue instruction counts do not add up to the instruction count")
        code = np.frombuffer(data, dtype="<i4", count=n * (1 + isa.NFIELDS),
                             offset=end_meta + 4).reshape(n, 1 + isa.NFIELDS)
        prog = cls(cfg)
        if not prog._fast_fill(code, queues):
            prog._slow_fill(code, queues)
        for t in tensors:
            info = TensorInfo.from_json(t)
            prog.add_tensor(info.name, info.dtype, info.shape, info.planes)      # each entry checked here
        if prog._lazy is not None:
            prog._checked = prog._state()      # code table and tensor table both checked just now
            return prog
        return prog.validate()

    def _fast_fill(self, code: npt.NDArray[np.int32], queues: List[Tuple[str, int]]) -> bool:
        """Keep a program file's code table as the program's instructions (lists built on first
        access) if the compiled loader finds every queue name canonical, listed once and in order,
        and every row legal (known opcode, unused fields zero, operands valid); False (nothing
        done) otherwise, or without the loader: the Python path then names the fault."""
        from . import fastload
        index = self.config.queue_index
        names = [q for q, _ in queues]
        if not all(q in index for q in names) or len(set(names)) != len(names) or fastload.checker(self.config) is None:
            return False
        code = np.ascontiguousarray(code, dtype=np.int32)
        order = [index[q] for q in names]
        qstart = np.zeros(len(self.config.queues) + 1, dtype=np.int64)
        for q, (_, count) in zip(order, queues):
            qstart[q + 1] = count
        np.cumsum(qstart, out=qstart)
        if order != sorted(order) or fastload.first_bad(self.config, code, qstart) != -1:
            return False                       # queues out of order, or a fault for the Python path to name
        del self.queues                        # built from the checked table on first access
        self._lazy = _Lazy(code, qstart, [q.name for q in self.config.queues])
        return True

    def _slow_fill(self, code: npt.NDArray[np.int32], queues: List[Tuple[str, int]]) -> None:
        """Fill the queues from a program file's code table row by row (ProgramError for an unknown
        queue or opcode, or a non-zero unused field)."""
        cfg = self.config
        prog = self
        r = 0
        for qname, count in queues:
            try:
                qname = cfg.queue(qname).name       # the canonical spelling ("mem.w0" -> "MEM.W0")
            except ConfigError as e:
                raise ProgramError(str(e), queue=qname) from None
            if qname in prog.queues:
                raise ProgramError("queue listed twice", queue=qname)
            lst = prog.queues.setdefault(qname, [])
            for i in range(count):
                row = code[r]
                r += 1
                op = isa.BY_OPCODE.get(int(row[0]))
                if op is None:
                    raise ProgramError(f"unknown opcode {int(row[0]):#x}", queue=qname, index=i)
                if any(int(x) != 0 for x in row[1 + len(op.fields):]):
                    raise ProgramError(f"{op.mnemonic}: unused operand fields must be zero", queue=qname, index=i)
                lst.append(Instruction(op, tuple(int(x) for x in row[1: 1 + len(op.fields)])))

    def save(self, path: Union[str, os.PathLike[str]]) -> None:
        """Write the binary program file."""
        with open(path, "wb") as f:
            f.write(self.to_bytes())

    @classmethod
    def load(cls, path: Union[str, os.PathLike[str]]) -> "Program":
        """Read and validate a binary program file (raises ProgramError if anything is off)."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ProgramError(f"cannot read program file {path}: {e.strerror}") from None
        return cls.from_bytes(data)
