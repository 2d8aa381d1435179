"""Exceptions raised by lpucore.  Every one derives from :class:`LpuError`."""

from __future__ import annotations

import os
from typing import Optional, Protocol, Sequence, Tuple, Union


class _QueueNames(Protocol):
    """What the error texts read of a queue (a :class:`~lpucore.config.QueueInfo`)."""
    @property
    def name(self) -> str: ...
    @property
    def slot(self) -> int: ...
    @property
    def hemisphere(self) -> int: ...


class ConfigView(Protocol):
    """What the error texts read of a :class:`~lpucore.ChipConfig`: a protocol, so that this
    module, which config.py imports, does not import config.py back."""
    @property
    def queues(self) -> Sequence[_QueueNames]: ...
    @property
    def streams_per_direction(self) -> int: ...
    @property
    def addresses_per_slice(self) -> int: ...
    @property
    def mxm_fp16_interval(self) -> int: ...
    @property
    def c2c_send_interval(self) -> int: ...
    def bank_of(self, addr: int) -> int: ...
    def slice_name(self, gslice: int) -> str: ...
    def plane_name(self, plane: int) -> str: ...


class LpuError(Exception):
    """Base class of every error lpucore raises on purpose."""


class ConfigError(LpuError, ValueError):
    """A :class:`~lpucore.ChipConfig` is inconsistent or out of range."""


class ProgramError(LpuError, ValueError):
    """A program (text, binary file or in-memory object) is malformed or does not
    fit the chip configuration.

    Attributes name what is at fault where that is known: ``queue`` (queue name),
    ``index`` (position of the instruction in its queue), ``field`` (operand name),
    ``line`` (assembly source line).
    """

    def __init__(self, message: str, *, queue: Optional[str] = None, index: Optional[int] = None,
                 field: Optional[str] = None, line: Optional[int] = None):
        where = []
        if line is not None:
            where.append(f"line {line}")
        if queue is not None:
            where.append(f"queue {queue}")
        if index is not None:
            where.append(f"instruction {index}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.queue, self.index, self.field, self.line = queue, index, field, line


class TensorError(LpuError, ValueError):
    """A tensor handed to the driver has the wrong name, dtype or shape."""


class ScheduleError(LpuError):
    """The running program broke a rule of the statically scheduled machine.

    ``cycle`` is the cycle in which it happened, ``unit`` the queue (functional
    slice) at fault, ``stream`` the stream register (``"E5"``, ``"W12"``) or ALU
    latch (``"A3"``) involved, ``bank`` the MEM bank for a bank conflict, and
    ``kind`` one of ``"stream-conflict"``, ``"empty-read"``, ``"bank-conflict"``,
    ``"latch-conflict"``, ``"address"``, ``"deadlock"``, ``"mxm-*"``, ``"resource"``,
    ``"link-skew"``, ``"link-busy"``, ``"link-empty"`` (``link``: the C2C link number).
    """

    def __init__(self, kind: str, cycle: int, unit: str, message: str, *,
                 stream: Optional[str] = None, bank: Optional[int] = None, link: Optional[int] = None):
        super().__init__(f"cycle {cycle}, {unit}: {message}")
        self.kind, self.cycle, self.unit, self.stream, self.bank = kind, cycle, unit, stream, bank
        self.link = link
        self.chip: Optional[int] = None     # set by lpucore.System: the chip that raised it

    def key(self) -> Tuple[str, int, str, Optional[str], Optional[int], Optional[int]]:
        """What two engines must agree on for the same program."""
        return (self.kind, self.cycle, self.unit, self.stream, self.bank, self.link)


class CompiledFileError(LpuError, ValueError):
    """A compiled program file (Compiled.save, the compile cache) cannot be read: not such a file,
    an unsupported format version, a checksum mismatch, or a field, program or constant that is
    off. The compile cache compiles again instead."""


class SnapshotError(LpuError, ValueError):
    """A chip snapshot cannot be taken, read or restored: a corrupt or foreign file, an
    unsupported format version, or a snapshot of another configuration, engine or program."""


class EngineUnavailableError(LpuError, ImportError):
    """The compiled (fast) engine was asked for but cannot be imported."""


# ---------------------------------------------------------------------------
# The fast engine's error record.  The C loop cannot raise; it fills an int64 record
# (kind, cycle, queue, two details, ...) and FastEngine turns it into a ScheduleError
# with the constructors below.  These tuples are the one definition of its codes:
# lpucore.isa.generate_pxi() writes them into src_pyx/_isa_gen.pxi as Cython enums.
# ---------------------------------------------------------------------------
ENGINE_ERRORS: Tuple[str, ...] = ("stream-conflict", "empty-read", "bank-conflict", "latch-conflict", "address",
                                  "deadlock", "mxm", "resource", "link")
"""Error kinds of the fast engine's record: kind code ``i + 1`` is ``ENGINE_ERRORS[i]``
(``ERR_<KIND>`` in Cython, e.g. ``ERR_EMPTY_READ``); 0 (``ERR_NONE``) is no error.  Each is the
:attr:`ScheduleError.kind` it becomes, but ``mxm`` (``mxm-*``, reason in :data:`MXM_WHY`) and
``link`` (``link-*``, reason in :data:`LINK_WHY`)."""

MXM_WHY: Tuple[str, ...] = ("busy", "empty", "dtype")
"""Reasons of an ``mxm`` engine error (``MXE_<WHY>``), the ``what`` of :func:`mxm_error`."""

LINK_WHY: Tuple[str, ...] = ("skew", "busy", "empty")
"""Reasons of a ``link`` engine error (``LINK_<WHY>``), the ``why`` of :func:`link_error`."""

ERROR_RECORD: Tuple[str, ...] = ("kind", "cycle", "q", "a", "b", "q2", "class")
"""Fields of the engine's error record, by index (``E_<FIELD>``): the kind code, the cycle, the
queue at fault, two details (stream and position, slice and address, ...), a second queue or
extra value, and (pending landing errors only) the ordering class: 0 stream conflict,
1 latch conflict."""


# ---------------------------------------------------------------------------
# Schedule-error constructors shared by both engines, so that the same program
# produces the same exception text whichever engine ran it.
# ---------------------------------------------------------------------------
def stream_name(cfg: ConfigView, v: int) -> str:
    """Text form of an encoded stream (``E5``/``W12``) or ALU latch (``A3``)."""
    s = cfg.streams_per_direction
    if v >= 128:
        return f"A{v - 128}"
    return f"E{v}" if v < s else f"W{v - s}"


def stream_conflict(cfg: ConfigView, cycle: int, qa: int, qb: int, v: int, pos: int) -> ScheduleError:
    qs = cfg.queues
    name = stream_name(cfg, v)
    return ScheduleError("stream-conflict", cycle, qs[qb].name,
                         f"{qs[qa].name} and {qs[qb].name} both write stream {name} at position {pos}", stream=name)


def empty_read(cfg: ConfigView, cycle: int, q: int, v: int, pos: int) -> ScheduleError:
    name = stream_name(cfg, v)
    what = f"latch {name}" if v >= 128 else f"stream {name} at position {pos}"
    return ScheduleError("empty-read", cycle, cfg.queues[q].name, f"reads {what}, which holds no value", stream=name)


def bank_conflict(cfg: ConfigView, cycle: int, q: int, gslice: int, addr: int) -> ScheduleError:
    b = cfg.bank_of(addr)
    return ScheduleError("bank-conflict", cycle, cfg.queues[q].name,
                         f"reads bank {b} (address {addr:#x}) of slice {cfg.slice_name(gslice)} "
                         f"in the cycle a write lands in it", bank=b)


def latch_conflict(cfg: ConfigView, cycle: int, alu: int) -> ScheduleError:
    return ScheduleError("latch-conflict", cycle, f"VXM.{alu}",
                         f"two results of ALU {alu} land in its latch in the same cycle", stream=f"A{alu}")


def address_error(cfg: ConfigView, cycle: int, q: int, superlane: int, addr: int) -> ScheduleError:
    return ScheduleError("address", cycle, cfg.queues[q].name,
                         f"map gives superlane {superlane} address {addr}, outside 0..{cfg.addresses_per_slice - 1}")


def deadlock(cfg: ConfigView, cycle: int, q: int, wait: int, notifies: int) -> ScheduleError:
    return ScheduleError("deadlock", cycle, cfg.queues[q].name,
                         f"waits forever on its Sync number {wait}: the chip issued only {notifies} Notify")


def mxm_error(cfg: ConfigView, cycle: int, q: int, what: str) -> ScheduleError:
    """An MXM rule broken: kind mxm-busy, mxm-no-weights or mxm-dtype."""
    kinds = {"busy": "mxm-busy", "empty": "mxm-no-weights", "dtype": "mxm-dtype"}
    plane = cfg.queues[q].slot
    texts = {"busy": f"float16 ABC on plane {cfg.plane_name(plane)} sooner than mxm_fp16_interval "
                     f"({cfg.mxm_fp16_interval}) cycles after the previous one",
             "empty": f"ABC on plane {cfg.plane_name(plane)}, which has no weights installed",
             "dtype": f"ABC's dtype differs from the weights installed on plane {cfg.plane_name(plane)}"}
    return ScheduleError(kinds[what], cycle, cfg.queues[q].name, texts[what])


def resource_error(cfg: ConfigView, cycle: int, q: int, resource: str) -> ScheduleError:
    hem = "WE"[cfg.queues[q].hemisphere]
    n = getattr(cfg, "sxm_" + resource)
    return ScheduleError("resource", cycle, cfg.queues[q].name,
                         f"needs one more of the {n} SXM {resource} of hemisphere {hem} in this cycle")


def link_error(cfg: ConfigView, cycle: int, q: int, link: int, why: str, extra: int = -1) -> ScheduleError:
    """A C2C rule broken on ``link``: kind link-skew (not deskewed, or too soon after the
    Deskew: extra = first usable cycle or -1), link-busy (a Send before the link is free:
    extra = its first free cycle), link-empty (a Receive with nothing arrived: extra = the
    next arrival's cycle or -1)."""
    if why == "skew":
        text = (f"uses link {link}, which has not been deskewed" if extra < 0 else
                f"uses link {link} before its Deskew completes (cycle {extra})")
    elif why == "busy":
        text = (f"Send on link {link}, which is busy until cycle {extra}: one vector per "
                f"c2c_send_interval ({cfg.c2c_send_interval}) cycles")
    else:
        text = f"Receive on link {link}, where nothing has arrived" + (
            f" (the next vector arrives in cycle {extra})" if extra >= 0 else "")
    return ScheduleError("link-" + why, cycle, cfg.queues[q].name, text, link=link)


class CompileError(LpuError, ValueError):
    """A computation cannot be compiled for the chip (it does not fit, or is not supported)."""


class ModelDoesNotFit(LpuError, ValueError):
    """A language model's weights and KV cache need more SRAM than the configured chips have
    (raised by :mod:`lpucore.llm`; also ``lpucore.llm.ModelDoesNotFit``)."""


class ModelError(LpuError, ValueError):
    """A language model's configuration or weight files are malformed, unsupported or too big
    (raised by :mod:`lpucore.llm`: :meth:`~lpucore.llm.ModelConfig.from_hf`,
    :func:`~lpucore.llm.load_pretrained`, ``Decoder.from_pretrained``).

    ``path`` is the file at fault and ``field`` the key or tensor name in it, where known; the
    message starts with both.
    """

    def __init__(self, message: str, *, path: Union[str, "os.PathLike[str]", None] = None,
                 field: Optional[str] = None):
        where = []
        if path is not None:
            where.append(str(path))
        if field is not None:
            where.append(f"{field!r}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)
        self.path, self.field, self.message = (None if path is None else str(path)), field, message

    def at(self, path: Union[str, "os.PathLike[str]"]) -> "ModelError":
        """The same error, said of file ``path`` (when it does not name a file yet)."""
        if self.path is not None:
            return self
        return ModelError(self.message, path=path, field=self.field)
