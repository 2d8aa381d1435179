"""The engines a :class:`~lpucore.Chip` drives, behind one protocol.

::

    eng = make_engine("fast", cfg)          # or "reference"
    eng.load(program)
    eng.run()                               # to the end of the program
    eng.read_mem(gslice, addr, count)       # uint8 [count, lanes]

Two engines simulate the same machine bit for bit and cycle for cycle:
``"reference"`` (lpucore.reference.engine.ReferenceEngine, plain NumPy, the executable
specification) and ``"fast"`` (lpucore._engine.FastEngine, Cython).  Both satisfy
:class:`Engine`; ``Chip`` talks to them only through it and never asks which one it has.
Cycles are chip cycles, addresses count vectors, a vector is ``lanes`` bytes, slices are
global MEM slice ids (:meth:`lpucore.ChipConfig.slice_id`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Protocol, Tuple

import numpy as np
import numpy.typing as npt

from .errors import EngineUnavailableError, LpuError

if TYPE_CHECKING:  # pragma: no cover
    from .config import ChipConfig
    from .program import Program

ENGINES: Tuple[str, ...] = ("fast", "reference")

# the fast engine's host tuning options (Engine.options, Chip.set_engine_options)
ENGINE_OPTIONS: Tuple[str, ...] = ("mxm_kernel", "helper_threads", "small_rows", "helper_delay_us", "bulk_reads")


class Engine(Protocol):
    """What a Chip drives: either engine.  Everything a chip, a trace or a host simulator needs."""

    @property
    def name(self) -> str:
        """``"fast"`` or ``"reference"`` (snapshots record it: the state forms differ)."""
    @property
    def fp16_mxm(self) -> str:
        """``"exact"`` or ``"fp32"`` (fast engine only): how float16 MXM products are summed."""
    @property
    def program(self) -> Optional[Program]: ...
    @property
    def cycle(self) -> int:
        """Cycles simulated so far."""
    @property
    def finished(self) -> bool:
        """The program has ended and the chip has reached its finish cycle."""
    @property
    def finish_cycle(self) -> int:
        """The cycle the program's last effect is done in (last effect + stagger), 0 if none."""
    @property
    def host_time(self) -> Mapping[str, float]:
        """Host counters (fast engine: wall seconds in the cycle loop and in MXM products, MXM
        batches by path; reference engine: empty)."""

    def load(self, program: Program, /) -> None:
        """Load a validated program; restart at cycle 0 with SRAM kept."""
    def reset(self, clear_memory: bool = ..., /) -> None:
        """Restart the loaded program at cycle 0; SRAM cleared unless ``clear_memory`` is false."""
    def run(self, until: Optional[int] = ..., /, idle: bool = ...) -> None:
        """Simulate up to (not including) cycle ``until`` (None: to the end); ScheduleError on a
        violation.  ``idle=False``: stop at the program's finish cycle if it comes first."""
    def counters(self) -> Mapping[str, npt.NDArray[np.int64]]:
        """Statistics (copies): issued, icu (per queue), bytes_read, bytes_written (per slice),
        mxm_macs, mxm_busy (per plane), mxm_peak_macs ([1]), c2c_sent, c2c_received (per link)."""
    def read_mem(self, gslice: int, addr: int, count: int = ..., /) -> npt.NDArray[np.uint8]:
        """``count`` vectors of slice ``gslice`` from ``addr`` on (a copy), uint8 [count, lanes]."""
    def write_mem(self, gslice: int, addr: int, data: npt.NDArray[np.uint8], /) -> None:
        """Write vectors (uint8 [n, lanes]) from ``addr`` on."""
    def sram(self) -> npt.NDArray[np.uint8]:
        """The whole SRAM as a uint8 [slices, addresses, lanes] view shared with the engine
        (writes land in the chip; for bulk tensor transfers)."""
    def c2c_take_outbox(self) -> List[Tuple[int, int, int, npt.NDArray[np.uint8]]]:
        """The vectors sent since the last call: (link, send cycle, arrival cycle, vector)."""
    def c2c_deliver(self, link: int, arrival: int, vec: npt.NDArray[np.uint8], /) -> None:
        """Put a vector in ``link``'s inbox, receivable from cycle ``arrival`` on."""
    def options(self) -> Dict[str, Any]:
        """Host tuning options and their values (:data:`ENGINE_OPTIONS`; none on the reference)."""
    def set_options(self, **options: Any) -> None:
        """Set host tuning options; LpuError for an unknown option or a bad value."""
    def get_state(self) -> Tuple[Dict[str, int], Dict[str, npt.NDArray[Any]]]:
        """(scalars, arrays): the whole state, copied, in the engine's own form (a Snapshot's
        payload); SnapshotError if a schedule error stopped the engine."""
    def set_state(self, scalars: Mapping[str, int], arrays: Mapping[str, npt.NDArray[Any]], /) -> None:
        """Replace the state with one from get_state of an engine of this kind, configuration and
        program.  Every index, counter, pointer and flag is checked first (SnapshotError): on an
        error the engine is left as it was."""


def make_engine(name: str, config: ChipConfig, fp16_mxm: str = "exact") -> Engine:
    """Instantiate an engine by name (:data:`lpucore.ENGINES`).  The fast engine never falls back silently:
    EngineUnavailableError if it is not built; LpuError for an unknown name or an fp16_mxm mode the
    engine lacks."""
    if name == "reference":
        if fp16_mxm != "exact":
            raise LpuError("the reference engine computes float16 MXM products exactly only (fp16_mxm='exact')")
        from .reference.engine import ReferenceEngine
        return ReferenceEngine(config)
    if name == "fast":
        fast: Engine = _fast_module().FastEngine(config, fp16_mxm)     # the compiled module has no stub: Any
        return fast
    raise LpuError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")


def _fast_module() -> Any:
    try:
        from . import _engine
    except ImportError as e:
        raise EngineUnavailableError(
            f"the fast engine (lpucore._engine) cannot be imported: {e}. Build it with "
            "`pip install -e .` (or `python setup.py build_ext --inplace`), or ask for engine='reference'."
        ) from None
    return _engine


# the fast engine's MXM kernels (Chip.set_engine_options(mxm_kernel=...); $LPUCORE_MXM_KERNEL sets a new
# engine's): a new engine takes the first of these its host runs, unless the variable says otherwise
MXM_KERNELS: Tuple[str, ...] = ("avx512", "avx2", "portable")
MXM_KERNEL_ENV = "LPUCORE_MXM_KERNEL"


def avx512_available() -> bool:
    """True if this host can run the fast engine's AVX-512 MXM kernels (``mxm_kernel="avx512"``)."""
    return bool(_fast_module().FastEngine.avx512_available())


def mxm_kernels_available() -> Tuple[str, ...]:
    """The fast engine's MXM kernels this host can run, fastest first (a subset of :data:`MXM_KERNELS`;
    ``"portable"`` always)."""
    have = set(_fast_module().FastEngine.mxm_kernels_available())
    return tuple(k for k in MXM_KERNELS if k in have)
