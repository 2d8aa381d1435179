"""The chip configuration: geometry, timing parameters and the stream-hop map.

Every number the engines use comes from a :class:`ChipConfig`.  Each field
declares its unit, what it means and where its value comes from (the tags are
those of ``shared/TSP.md``: [A] primary source, [B] detailed secondary reading,
[C] third-party code or trade press, [U] uncertain).  Values marked *estimate*
are lpucore's own choice where nothing is public; change them freely.

Geometry of the stream fabric
-----------------------------
Functional slices sit on one east-west line (TSP.md section 1)::

    MXM(W) SXM(W) MEM W43 .. W0  VXM  MEM E0 .. E43 SXM(E) MXM(E)

Stream registers exist at *positions* along that line and a value moves one
position per cycle.  Whether each MEM slice has a position of its own or a few
slices share one is not public [U]; ``mem_hop_map`` gives, for MEM slice ``i``
of a hemisphere (``i = 0`` next to the VXM), its distance in hops from the VXM.
By default ``mem_slices_per_hop`` consecutive slices share a position.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, TypeVar, Union

from .errors import ConfigError

_T = TypeVar("_T")


Number = Union[int, float]


def _param(default: _T, unit: str, doc: str, source: str, lo: Optional[Number] = None,
           hi: Optional[Number] = None) -> _T:
    """A ChipConfig field: its unit, meaning, source and (for numbers) its accepted range lo..hi,
    inclusive.  A field with a range must be an int (not a bool) if its default is one, else a
    finite int or float; :meth:`ChipConfig.describe` shows the range."""
    return field(default=default, metadata={"unit": unit, "doc": doc, "source": source, "lo": lo, "hi": hi})


# Why the ranges are what they are.  Every bound covers every real TSP geometry with wide room:
# geometry counts allow 16-64 times the GroqChip's (44 -> 1,024 MEM slices per hemisphere, 4 -> 64
# MXM planes, 14 -> 256 SXM queues, 512 -> 32,768 accumulators), fixed-width fields keep their
# hardware limit (4,096 lanes, 64 streams per direction, 65,536 addresses: Gather/Scatter carry
# 16-bit addresses), functional delays allow 1,024 cycles (>= 20 times the longest, mxm_delay's 47,
# which itself allows 4,096), C2C latencies allow milliseconds.  Frequencies and bandwidths are
# finite floats of at least 1 (per second) so that c2c_send_interval is a positive whole number.
# Together they keep every derived size (queues, positions, cycles) a small integer; what the
# combinations cost in host memory is bounded separately (host_memory, MAX_CHIP_MEMORY).
MAX_SRAM_BYTES = 1 << 36
"""Largest SRAM one chip may have (64 GiB, 292 times the GroqChip's 220 MiB).  SRAM is not
committed up front (the engines allocate it zeroed, so the host maps pages as they are written),
but the address space must still be reservable in one piece."""

MAX_CHIP_MEMORY = 4 << 30
"""Default limit on the host memory one :class:`~lpucore.Chip` commits when it is built
(:meth:`lpucore.ChipConfig.host_memory`): 4 GiB, about 130 times a GroqChip's (about 30 MiB besides its
SRAM).  Raise it with the environment variable ``LPUCORE_MAX_CHIP_MEMORY`` (bytes, or a number
with a K/M/G/T suffix: powers of 1,024; ``0`` or ``none``: no limit) or ``Chip(max_memory=...)``."""

MEMORY_ENV = "LPUCORE_MAX_CHIP_MEMORY"


class QueueInfo(NamedTuple):
    """One instruction queue of the ICU: the functional slice it feeds."""

    # index: position in ChipConfig.queues (the ISA's queue number)
    index: int        # type: ignore[assignment]  # the (public) field name shadows tuple.index
    name: str         # "MEM.W3", "VXM.0"
    unit: str         # "MEM", "VXM", ...
    hemisphere: int   # 0 = West, 1 = East, -1 = centre (VXM)
    slot: int         # slice number inside its hemisphere, ALU number, MXM plane or SXM queue number
    position: int     # stream-register position, 0 = west edge
    role: str = ""    # MXM queues: "LW" (LW, IW), "ABC" or "ACC"

    @property
    def kind(self) -> str:
        """What the queue runs: its unit, or MXM.LW / MXM.ABC / MXM.ACC."""
        return f"{self.unit}.{self.role}" if self.role else self.unit


HEMISPHERES = ("W", "E")


@dataclass(frozen=True)
class ChipConfig:
    """Geometry and timing of one simulated TSP.

    Use :meth:`groqchip1` (the default everywhere) or :meth:`tiny`, or
    ``dataclasses.replace(cfg, field=value)`` for variants; every instance is
    validated on construction and raises :class:`~lpucore.ConfigError` if
    inconsistent.
    """

    name: str = _param("groqchip1", "-", "Name of the configuration (presets: groqchip1, tiny).", "-")
    # ---- geometry -------------------------------------------------------------
    superlanes: int = _param(20, "superlanes", "Superlanes (tiles) across the chip.", "TSP.md s1 [B]", lo=1, hi=256)
    lanes_per_superlane: int = _param(16, "lanes", "Lanes in one superlane.", "TSP.md s1 [B]", lo=1, hi=256)
    hemispheres: int = _param(2, "hemispheres", "West and East, mirror images about the VXM; must be 2.",
                              "TSP.md s1 [C]", lo=2, hi=2)
    mem_slices_per_hemisphere: int = _param(44, "slices", "MEM slices in each hemisphere.", "TSP.md s2 [B]",
                                            lo=1, hi=1024)
    addresses_per_slice: int = _param(8192, "vectors", "Addresses in one MEM slice; each holds one vector (one byte "
                                      "per lane).", "TSP.md s2 [B]", lo=1, hi=65536)
    banks_per_slice: int = _param(2, "banks", "SRAM banks per MEM slice (one read and one write per cycle, to "
                                  "different banks).", "TSP.md s2 [B]", lo=1, hi=64)
    bank_select: str = _param("msb", "-", "How an address picks its bank: 'msb' (contiguous halves, TSP.md s9's 2 x "
                              "4,096) or 'lsb' (interleaved).", "TSP.md s9 [U]")
    streams_per_direction: int = _param(32, "streams", "Stream registers per lane flowing east, and as many flowing "
                                        "west.", "TSP.md s1 [B]", lo=4, hi=64)
    mxm_planes: int = _param(4, "planes", "MXM planes (independent MACC arrays), half per hemisphere.", "TSP.md s3 [B]",
                             lo=2, hi=64)
    mxm_size: int = _param(320, "rows/cols", "Rows and columns of one square MXM plane.", "TSP.md s3 [B]",
                           lo=2, hi=4096)
    vxm_alus_per_lane: int = _param(16, "ALUs", "VXM ALUs per lane (a 4 x 4 mesh); one ICU queue each.",
                                    "TSP.md s4 [B, A]", lo=1, hi=64)
    clock_hz: float = _param(900e6, "Hz", "Core clock, used to turn cycles into seconds.",
                             "TSP.md s1 [A] (GroqFlow uses 900 MHz)", lo=1.0, hi=1e12)
    # ---- timing -----------------------------------------------------------------
    stagger: int = _param(20, "cycles", "Superlane stagger N: an instruction reaches superlane k at issue + k. "
                          "lpucore models it as the uniform latency term N of P20 Eq. 4, added once at the end of a "
                          "run for the last superlane's wavefront.", "TSP.md s1 [B]", lo=1, hi=4096)
    mem_slices_per_hop: int = _param(4, "slices", "Consecutive MEM slices sharing one stream-register position (used "
                                     "when mem_hop_map is None). FTLPU models 4; GM's hardware timings count ~10 "
                                     "crossings per hemisphere.", "TSP.md s1 [U] estimate", lo=1, hi=1024)
    mem_hop_map: Optional[Tuple[int, ...]] = _param(None, "hops", "Explicit hop distance from the VXM of each MEM "
                                                    "slice of a hemisphere (slice 0 first); non-decreasing, >= 1. "
                                                    "None derives it from mem_slices_per_hop.", "TSP.md s1 [U]",
                                                    lo=1, hi=1024)
    sxm_hops: int = _param(1, "hops", "Hops from the outermost MEM position to the SXM position.", "estimate",
                           lo=1, hi=64)
    mxm_hops: int = _param(1, "hops", "Hops from the SXM position to the MXM position.", "estimate", lo=1, hi=64)
    mem_read_delay: int = _param(2, "cycles", "d_func of MEM Read/Gather: from issue (bank access) to the vector on "
                                 "the stream at the slice's position.",
                                 "estimate (P20 exposes d_func, value not public)", lo=1, hi=1024)
    mem_write_delay: int = _param(2, "cycles", "From MEM Write/Scatter issue (stream sampled) to the bank write; a "
                                  "Read issued in that cycle must use the other bank.", "estimate", lo=1, hi=1024)
    vxm_alu_delay: int = _param(2, "cycles", "d_func of a VXM arithmetic, logic or compare op: issue to result on the "
                                "stream and in the ALU latch.", "estimate", lo=1, hi=1024)
    vxm_convert_delay: int = _param(2, "cycles", "d_func of VXM conversions (cvt, requant).", "estimate", lo=1, hi=1024)
    vxm_transcendental_delay: int = _param(4, "cycles", "d_func of VXM exp/tanh/sigmoid/rsqrt/recip/sqrt/div.",
                                           "estimate", lo=1, hi=1024)
    notify_delay: int = _param(4, "cycles", "From a Notify's issue to the first cycle a queue parked on the matching "
                               "Sync may issue again.", "estimate", lo=1, hi=1024)
    # ---- MXM ----------------------------------------------------------------------
    mxm_accumulators: int = _param(512, "vectors", "Accumulator registers per MXM plane, each one 320 x 32-bit vector.",
                                   "estimate (not public; FTLPU models 256)", lo=1, hi=32768)
    mxm_lw_streams: int = _param(16, "streams", "Most streams one LW can load into a plane's weight buffer in a cycle "
                                 "(a full 320-row load then takes 20 cycles).", "TSP.md s3 [B, C]", lo=1, hi=64)
    mxm_install_delay: int = _param(3, "cycles", "From IW's issue to the first cycle an ABC uses the installed "
                                    "weights.", "TSP.md s3 [C] (GM: 3 weight install)", lo=1, hi=1024)
    mxm_delay: int = _param(47, "cycles", "From ABC's issue (activation read) to its product landing in the "
                            "accumulator.", "TSP.md s3 [C] (GM: 13 multiply + 34 accumulation)", lo=1, hi=4096)
    mxm_acc_delay: int = _param(3, "cycles", "From ACC's issue to the accumulator vector on its 4 result streams.",
                                "estimate", lo=1, hi=1024)
    mxm_fp16_interval: int = _param(2, "cycles", "Cycles between fp16 ABCs on one plane: a plane does one [1 x 160] x "
                                    "[160 x 320] fp16 sub-op every 2 cycles, so the chip does 2 per cycle against 4 "
                                    "int8 [1 x 320] x [320 x 320].", "TSP.md s3 [A] (P22)", lo=1, hi=64)
    # ---- SXM ----------------------------------------------------------------------
    sxm_queues_per_hemisphere: int = _param(14, "queues", "SXM instruction queues per hemisphere.", "TSP.md s6 [B, C]",
                                            lo=1, hi=256)
    sxm_shifters: int = _param(8, "units", "Shift/Select units per hemisphere usable in one cycle (8: a float32 lane "
                               "rotation, two shifts of four byte planes, in one cycle).",
                               "estimate (TSP.md names no limit for shifts)", lo=1, hi=256)
    sxm_distributors: int = _param(4, "units", "Distribute/Rotate units per hemisphere usable in one cycle.",
                                   "TSP.md s5 [B, C] (GroqAPI: about 4)", lo=1, hi=256)
    sxm_transposers: int = _param(2, "units", "Transpose units per hemisphere usable in one cycle.",
                                  "TSP.md s5 [B, C] (GroqAPI: 2)", lo=1, hi=256)
    sxm_permuters: int = _param(1, "units", "Permute units per hemisphere usable in one cycle.",
                                "TSP.md s5 [B, C] (GroqAPI: 1)", lo=1, hi=256)
    sxm_delay: int = _param(4, "cycles", "d_func of every SXM instruction: issue to result on its streams.",
                            "estimate (GM counts 9 cycles for an SXM crossing)", lo=1, hi=1024)
    # ---- C2C (chip-to-chip links) ---------------------------------------------------
    c2c_links: int = _param(16, "links", "Chip-to-chip links per chip. Send, Receive and Deskew are switch-unit "
                            "instructions: any SXM queue may use any link, at the SXM position.", "TSP.md s7 [B, C]",
                            lo=2, hi=4096)
    c2c_link_bytes_per_s: float = _param(14e9, "bytes/s", "Bandwidth of one link in one direction (4 lanes x 30 Gb/s "
                                         "after coding): a link takes one vector every c2c_send_interval = ceil(lanes "
                                         "x clock_hz / c2c_link_bytes_per_s) cycles (21 on the GroqChip).",
                                         "TSP.md s7 [B, C]", lo=1.0, hi=1e15)
    c2c_latency: int = _param(500, "cycles", "From a Send's issue to the first cycle the chip at the link's other end "
                              "can Receive the vector (SerDes, wire and deskew FIFO; about 0.56 us).",
                              "estimate (TSP.md s7 [A, C]: < 3 us end to end across a Dragonfly of a few hops)",
                              lo=1, hi=1 << 24)
    c2c_receive_delay: int = _param(2, "cycles", "d_func of Receive: from issue to the vector on its stream at the "
                                    "C2C position.", "estimate", lo=1, hi=1024)
    c2c_deskew_delay: int = _param(64, "cycles", "From a Deskew's issue to the first cycle Send and Receive may use "
                                   "the link (the link's lane skew is measured and compensated).", "estimate",
                                   lo=1, hi=1 << 20)

    # ---- presets ----------------------------------------------------------------
    @classmethod
    def groqchip1(cls) -> "ChipConfig":
        """The first-generation GroqChip: 320 lanes, 88 x 8,192 x 320 B = 220 MiB, 32+32 streams, 900 MHz."""
        return cls()

    @classmethod
    def tiny(cls) -> "ChipConfig":
        """A small chip for fast tests: 2 superlanes x 8 lanes, 4 MEM slices per hemisphere of
        64 addresses, 8+8 streams, 4 VXM ALUs per lane, 16 x 16 MXM planes with 16 accumulators,
        3 SXM queues per hemisphere, 4 C2C links of 12 cycles' latency.  Same code paths."""
        return cls(name="tiny", superlanes=2, lanes_per_superlane=8, mem_slices_per_hemisphere=4,
                   addresses_per_slice=64, streams_per_direction=8, mxm_size=16,
                   vxm_alus_per_lane=4, stagger=2, mem_slices_per_hop=2, mxm_accumulators=16,
                   mxm_lw_streams=4, mxm_delay=5, sxm_queues_per_hemisphere=3, c2c_links=4,
                   c2c_latency=12, c2c_deskew_delay=4)

    @classmethod
    def small(cls) -> "ChipConfig":
        """A fifth-scale chip (4 superlanes x 16 lanes = 64 lanes, 16 MEM slices per
        hemisphere of 1,024 addresses, 16 + 16 streams, 64 x 64 MXM planes) on which the
        GEMM generator and the compiler have room to work, for quick experiments."""
        return cls(name="small", superlanes=4, lanes_per_superlane=16, mem_slices_per_hemisphere=16,
                   addresses_per_slice=1024, streams_per_direction=16, mxm_size=64, vxm_alus_per_lane=8,
                   stagger=4, mem_slices_per_hop=2, mxm_accumulators=64, mxm_lw_streams=8, mxm_delay=12,
                   sxm_queues_per_hemisphere=8)

    PRESETS = ("groqchip1", "tiny", "small")

    @classmethod
    def named(cls, name: str) -> "ChipConfig":
        presets = {"groqchip1": cls.groqchip1, "tiny": cls.tiny, "small": cls.small}
        if name not in presets:
            raise ConfigError(f"unknown chip configuration {name!r}; presets are {', '.join(presets)}")
        return presets[name]()

    # ---- validation -------------------------------------------------------------
    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_geometry()
        self._check_hop_map()

    def _check_numbers(self) -> None:
        """Type and range of every field, from its metadata (before anything is derived from them)."""
        if not isinstance(self.name, str) or len(self.name) > 200:
            raise ConfigError(f"ChipConfig.name must be a str of at most 200 characters, got {self.name!r:.80}")
        for f in dataclasses.fields(self):
            lo, hi = f.metadata["lo"], f.metadata["hi"]
            if lo is None or f.name == "mem_hop_map":
                continue
            v = getattr(self, f.name)
            if isinstance(f.default, int):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ConfigError(f"ChipConfig.{f.name} must be an int, got {v!r:.80}")
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or \
                        (isinstance(v, float) and not math.isfinite(v)):
                    raise ConfigError(f"ChipConfig.{f.name} must be a finite number, got {v!r:.80}")
            if not lo <= v <= hi:
                shown = v if abs(v) < 10 ** 30 else f"a number of {len(str(abs(int(v))))} digits"
                raise ConfigError(f"ChipConfig.{f.name} must be in {lo}..{hi} ({f.metadata['unit']}), got {shown}")
            if not isinstance(f.default, int):
                object.__setattr__(self, f.name, float(v))
        if self.bank_select not in ("msb", "lsb"):
            raise ConfigError(f"ChipConfig.bank_select must be 'msb' or 'lsb', got {self.bank_select!r:.80}")

    def _check_geometry(self) -> None:
        if self.addresses_per_slice % self.banks_per_slice:
            raise ConfigError(f"addresses_per_slice ({self.addresses_per_slice}) must be a multiple of "
                              f"banks_per_slice ({self.banks_per_slice})")
        if self.streams_per_direction % 4:
            raise ConfigError("streams_per_direction must be a multiple of 4 (fp32 stream groups), "
                              f"got {self.streams_per_direction}")
        if self.mxm_planes % 2:
            raise ConfigError(f"mxm_planes must be even (half per hemisphere), got {self.mxm_planes}")
        if self.lanes > 4096:
            raise ConfigError(f"at most 4096 lanes: superlanes x lanes_per_superlane = {self.superlanes} x "
                              f"{self.lanes_per_superlane} = {self.lanes}")
        if self.mxm_size != self.lanes:
            raise ConfigError(f"mxm_size ({self.mxm_size}) must equal the lanes ({self.lanes}): a plane takes one "
                              "lane-wide activation vector and gives one lane-wide result")
        if self.mxm_size % 2:
            raise ConfigError("mxm_size must be even (fp16 weights take two byte-rows each)")
        if self.mxm_lw_streams > self.streams_per_direction:
            raise ConfigError("mxm_lw_streams must be <= streams_per_direction")
        if self.streams_per_direction < self.lanes_per_superlane:
            raise ConfigError("Transpose needs streams_per_direction >= lanes_per_superlane")
        if self.c2c_links % 2:
            raise ConfigError(f"c2c_links must be even (half per hemisphere), got {self.c2c_links}")
        if self.sram_bytes > MAX_SRAM_BYTES:
            raise ConfigError(f"SRAM of {self.sram_bytes / 2**30:.1f} GiB is more than one chip may have "
                              f"({MAX_SRAM_BYTES >> 30} GiB): lower mem_slices_per_hemisphere "
                              f"({self.mem_slices_per_hemisphere}), addresses_per_slice ({self.addresses_per_slice}) "
                              f"or the lanes (superlanes x lanes_per_superlane = {self.lanes})")

    def _check_hop_map(self) -> None:
        if self.mem_hop_map is not None:
            if not isinstance(self.mem_hop_map, (list, tuple)):
                raise ConfigError("mem_hop_map must be None or a sequence of integers")
            if len(self.mem_hop_map) != self.mem_slices_per_hemisphere:
                raise ConfigError(f"mem_hop_map has {len(self.mem_hop_map)} entries, expected one per MEM slice "
                                  f"({self.mem_slices_per_hemisphere})")
            m = tuple(self.mem_hop_map)
            hi = _FIELDS["mem_hop_map"].metadata["hi"]
            if any(isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= hi for h in m) \
                    or any(b < a for a, b in zip(m, m[1:])):
                raise ConfigError(f"mem_hop_map must be non-decreasing integers in 1..{hi}")
            object.__setattr__(self, "mem_hop_map", m)

    # ---- host memory ------------------------------------------------------------
    def host_memory(self) -> Dict[str, int]:
        """Bytes of host memory a :class:`~lpucore.Chip` of this configuration commits when it is
        built, by part, on the engine that needs more (an upper bound for both; SRAM is left out:
        the engines allocate it zeroed and the host commits its pages only as they are written).

        Parts: ``streams`` (stream registers and their ring of values in flight: positions x
        streams x the longest delay), ``mxm`` (per plane: weight buffers, accumulators, activation
        and result staging: mxm_planes x lanes^2 and mxm_planes x mxm_accumulators x lanes),
        ``mem`` (write and latch pipelines), ``queues`` and ``c2c``."""
        L, S, P = self.lanes, self.streams_per_direction, self.positions
        NQ = 2 * self.mem_slices_per_hemisphere + self.vxm_alus_per_lane \
            + 3 * self.mxm_planes + 2 * self.sxm_queues_per_hemisphere
        delays = (self.mem_read_delay, self.mem_write_delay, self.vxm_alu_delay, self.vxm_convert_delay,
                  self.vxm_transcendental_delay, self.mxm_acc_delay, self.sxm_delay, self.c2c_receive_delay)
        dmax = max(delays)
        D = 1 << (P + dmax).bit_length()            # the fast engine's ring: a power of 2 > P + dmax
        width = (2 * self.mem_slices_per_hemisphere + 4 * self.vxm_alus_per_lane + 12 * self.mxm_planes
                 + 2 * self.sxm_queues_per_hemisphere * max(16, self.lanes_per_superlane))
        streams = max(2 * S * D * (3 * 4 * P + 12) + D * width * L,     # fast: rings and pool
                      2 * P * S * (L + 1))                               # reference: registers
        NP, R, NACC = self.mxm_planes, self.mxm_size, self.mxm_accumulators
        RI = self.mxm_install_delay + 1
        BMAX, NR = 512, 3
        BB = 2 * BMAX + self.mxm_delay + 2
        per_plane = ((RI + 2) * L * L + L * L + (L // 2) * L * (8 + 4) + R * L       # weights, all forms
                     + NACC * L * 4                                              # accumulators
                     + NR * BMAX * L * 5 + BB * L * 4 + BB * 32 + BMAX * 16       # staging
                     + RI * 16 + 128 * (L // 64 + 1) + L * 4)
        mxm = NP * per_plane + 8 * L * 8            # + float16 sums of four rows (scratch)
        RW = self.mem_write_delay + 1
        RL = max(self.vxm_alu_delay, self.vxm_convert_delay, self.vxm_transcendental_delay) + 1
        mem = (self.mem_slices * (RW * (9 + 4 * self.superlanes + L) + 16)
               + self.vxm_alus_per_lane * (L * 4 + RL * (8 + 4 * L) + 1))
        queues = NQ * (1024 + 8)                    # engine rows and Python objects (QueueInfo, QueueState), bulk runs
        c2c = self.c2c_links * (16 * (L + 8) + 64) + 64 * (L + 24)
        return {"streams": streams, "mxm": mxm, "mem": mem, "queues": queues, "c2c": c2c}

    def check_host_memory(self, limit: Optional[int] = None) -> int:
        """Raise ConfigError if a Chip of this configuration would commit more host memory than
        ``limit`` bytes (None: ``LPUCORE_MAX_CHIP_MEMORY`` or :data:`~lpucore.config.MAX_CHIP_MEMORY`; 0: no limit).
        Returns the estimate (:meth:`host_memory`, summed)."""
        parts = self.host_memory()
        total = sum(parts.values())
        if limit is None:
            limit = memory_limit()
        if limit and total > limit:
            fields = {"streams": "mem_slices_per_hemisphere/mem_hop_map, sxm_hops, mxm_hops, streams_per_direction "
                                 "and the *_delay fields (the stream rings)",
                      "mxm": "mxm_planes, superlanes x lanes_per_superlane (lanes^2 per plane), mxm_accumulators, "
                             "mxm_install_delay, mxm_delay",
                      "mem": "mem_slices_per_hemisphere, mem_write_delay, vxm_alus_per_lane and the vxm delays",
                      "queues": "mem_slices_per_hemisphere, vxm_alus_per_lane, mxm_planes, sxm_queues_per_hemisphere",
                      "c2c": "c2c_links and the lanes"}
            big = max(parts, key=lambda k: parts[k])
            raise ConfigError(f"a chip of configuration {self.name!r} would commit {total / 2**20:,.0f} MiB of host "
                              f"memory besides its SRAM, above the limit of {limit / 2**20:,.0f} MiB; most of it "
                              f"({parts[big] / 2**20:,.0f} MiB) is driven by {fields[big]}. Raise the limit with "
                              f"{MEMORY_ENV}=<bytes> (or K/M/G/T; 0: none) or Chip(max_memory=...)")
        return total

    # ---- derived geometry -------------------------------------------------------
    @property
    def lanes(self) -> int:
        """Lanes across the chip = bytes in one vector."""
        return self.superlanes * self.lanes_per_superlane

    @property
    def vector_bytes(self) -> int:
        return self.lanes

    @property
    def mem_slices(self) -> int:
        """MEM slices on the chip (both hemispheres)."""
        return self.hemispheres * self.mem_slices_per_hemisphere

    @property
    def sram_bytes(self) -> int:
        return self.mem_slices * self.addresses_per_slice * self.lanes

    @property
    def streams(self) -> int:
        """Stream registers per lane in both directions."""
        return 2 * self.streams_per_direction

    @functools.cached_property
    def hops(self) -> Tuple[int, ...]:
        """Hop distance from the VXM of MEM slice i of either hemisphere."""
        if self.mem_hop_map is not None:
            return self.mem_hop_map
        return tuple(1 + i // self.mem_slices_per_hop for i in range(self.mem_slices_per_hemisphere))

    @functools.cached_property
    def vxm_position(self) -> int:
        return self.hops[-1] + self.sxm_hops + self.mxm_hops

    @functools.cached_property
    def positions(self) -> int:
        """Number of stream-register positions from the west edge to the east edge."""
        return 2 * self.vxm_position + 1

    @property
    def c2c_send_interval(self) -> int:
        """Cycles one link needs per vector: ceil(lanes x clock_hz / c2c_link_bytes_per_s)."""
        return max(1, -(-int(round(self.lanes * self.clock_hz)) // int(round(self.c2c_link_bytes_per_s))))

    @property
    def mxm_planes_per_hemisphere(self) -> int:
        return self.mxm_planes // 2

    def mxm_position(self, hemisphere: int) -> int:
        """Both planes of a hemisphere sit at the die's edge."""
        return 0 if hemisphere == 0 else self.positions - 1

    def sxm_position(self, hemisphere: int) -> int:
        return self.mxm_hops if hemisphere == 0 else self.positions - 1 - self.mxm_hops

    def plane_name(self, plane: int) -> str:
        """MXM plane p: W0, W1 (West), E0, E1 (East)."""
        k = self.mxm_planes_per_hemisphere
        return f"{HEMISPHERES[plane // k]}{plane % k}"

    def mem_position(self, hemisphere: int, slot: int) -> int:
        h = self.hops[slot]
        return self.vxm_position - h if hemisphere == 0 else self.vxm_position + h

    def bank_of(self, address: int) -> int:
        if self.bank_select == "msb":
            return address // (self.addresses_per_slice // self.banks_per_slice)
        return address % self.banks_per_slice

    # ---- MEM slice names ------------------------------------------------------------
    def slice_id(self, hemisphere: int, slot: int) -> int:
        """Global MEM slice number: West slices 0..S-1, then East."""
        return hemisphere * self.mem_slices_per_hemisphere + slot

    def slice_name(self, gid: int) -> str:
        s = self.mem_slices_per_hemisphere
        return f"{HEMISPHERES[gid // s]}{gid % s}"

    def parse_slice(self, text: str) -> int:
        t = text.strip().upper() if isinstance(text, str) else ""
        if len(t) >= 2 and t[0] in "WE" and t[1:].isascii() and t[1:].isdigit() and len(t) < 10:
            slot = int(t[1:])
            if slot < self.mem_slices_per_hemisphere:
                return self.slice_id(HEMISPHERES.index(t[0]), slot)
        raise ConfigError(f"no MEM slice {text!r} (W0..W{self.mem_slices_per_hemisphere - 1}, "
                          f"E0..E{self.mem_slices_per_hemisphere - 1})")

    # ---- queues -------------------------------------------------------------------
    @property
    def queues(self) -> Tuple[QueueInfo, ...]:
        """Every ICU queue, in ISA queue-number order (also the order in which queues
        issue within one cycle).  MEM: one per slice; VXM: one per ALU; MXM: three per
        plane; SXM: ``sxm_queues_per_hemisphere`` per hemisphere (they also run the C2C
        instructions)."""
        cached: Optional[Tuple[QueueInfo, ...]] = self.__dict__.get("_queues")
        if cached is not None:
            return cached
        q: List[QueueInfo] = []
        for hem in range(2):
            for slot in range(self.mem_slices_per_hemisphere):
                q.append(QueueInfo(len(q), f"MEM.{HEMISPHERES[hem]}{slot}", "MEM", hem, slot,
                                   self.mem_position(hem, slot)))
        for alu in range(self.vxm_alus_per_lane):
            q.append(QueueInfo(len(q), f"VXM.{alu}", "VXM", -1, alu, self.vxm_position))
        # MXM: three queues per plane (weights: LW/IW; activations: ABC; results: ACC)
        for plane in range(self.mxm_planes):
            hem = plane // self.mxm_planes_per_hemisphere
            for role in ("LW", "ABC", "ACC"):
                q.append(QueueInfo(len(q), f"MXM.{self.plane_name(plane)}.{role}", "MXM", hem, plane,
                                   self.mxm_position(hem), role))
        for hem in range(2):
            for k in range(self.sxm_queues_per_hemisphere):
                q.append(QueueInfo(len(q), f"SXM.{HEMISPHERES[hem]}{k}", "SXM", hem, k, self.sxm_position(hem)))
        out = tuple(q)
        object.__setattr__(self, "_queues", out)
        return out

    @property
    def queue_index(self) -> Dict[str, int]:
        cached: Optional[Dict[str, int]] = self.__dict__.get("_qindex")
        if cached is None:
            cached = {q.name: q.index for q in self.queues}
            object.__setattr__(self, "_qindex", cached)
        return cached

    def queue(self, name: str) -> QueueInfo:
        """The queue called ``name``, in any case and with spaces around it; its canonical
        spelling is the result's ``name`` (ASCII only: ``str.upper`` maps some other letters,
        such as U+017F, onto ASCII ones)."""
        i = self.queue_index.get(name)
        if i is not None:
            return self.queues[i]
        i = self.queue_index.get(name.strip().upper()) if isinstance(name, str) and name.isascii() else None
        if i is None:
            raise ConfigError(f"no queue {name!r:.80} on this chip (MEM.W0..MEM.E{self.mem_slices_per_hemisphere - 1}, "
                              f"VXM.0..VXM.{self.vxm_alus_per_lane - 1}, MXM.W0.LW/ABC/ACC .. MXM.E"
                              f"{self.mxm_planes_per_hemisphere - 1}.ACC, "
                              f"SXM.W0..SXM.E{self.sxm_queues_per_hemisphere - 1})")
        return self.queues[i]

    # ---- derived peaks and serialisation ------------------------------------------------
    def peaks(self) -> Dict[str, float]:
        """Derived peak figures (per cycle and per second at ``clock_hz``)."""
        macs = self.mxm_planes * self.mxm_size * self.mxm_size
        mem_bw = self.mem_slices * self.banks_per_slice * self.lanes
        return {
            "lanes": self.lanes,
            "sram_bytes": self.sram_bytes,
            "int8_macs_per_cycle": macs,
            "int8_tops": 2 * macs * self.clock_hz / 1e12,
            "fp16_tflops": 2 * macs * self.clock_hz / 4 / 1e12,
            "sram_bytes_per_cycle": mem_bw,
            "sram_tb_per_s": mem_bw * self.clock_hz / 1e12,
            "vxm_alus": self.lanes * self.vxm_alus_per_lane,
        }

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if d["mem_hop_map"] is not None:
            d["mem_hop_map"] = list(d["mem_hop_map"])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ChipConfig":
        if not isinstance(d, dict):
            raise ConfigError("a chip configuration must be a mapping")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown ChipConfig fields: {', '.join(sorted(map(str, unknown)))}")
        d = dict(d)
        if d.get("mem_hop_map") is not None:
            if not isinstance(d["mem_hop_map"], (list, tuple)):
                raise ConfigError("mem_hop_map must be a list of integers")
            d["mem_hop_map"] = tuple(d["mem_hop_map"])
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(str(e)) from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def digest(self) -> str:
        """12 hex digits of the SHA-256 of every field (:meth:`to_json`): two configurations with the
        same name but any parameter changed have different digests. Benchmarks print it."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    @classmethod
    def describe(cls) -> str:
        """A Markdown table of every parameter: name, unit, default, accepted range, meaning, source."""
        rows = ["| parameter | unit | groqchip1 | tiny | range | meaning | source |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        g, t = cls.groqchip1(), cls.tiny()
        for f in dataclasses.fields(cls):
            m = f.metadata
            rows.append(f"| `{f.name}` | {m['unit']} | {getattr(g, f.name)} | {getattr(t, f.name)} | "
                        f"{_range_text(f.name, m)} | {m['doc']} | {m['source']} |")
        return "\n".join(rows)


def _range_text(name: str, m: Any) -> str:
    if name == "name":
        return "str, <= 200 chars"
    if name == "bank_select":
        return "msb, lsb"
    lo, hi = m["lo"], m["hi"]
    if name == "mem_hop_map":
        return f"None or ints {lo:,}..{hi:,}"
    kind = "int" if isinstance(lo, int) else "float"
    return f"{kind} {lo:,g}..{hi:,g}" if kind == "float" else f"{kind} {lo:,}..{hi:,}"


_FIELDS = {f.name: f for f in dataclasses.fields(ChipConfig)}


def memory_limit() -> int:
    """The host-memory limit per chip in bytes (0: none): ``LPUCORE_MAX_CHIP_MEMORY`` if set
    (bytes, or with a K/M/G/T suffix in powers of 1,024; ``0`` or ``none``: no limit), else
    :data:`~lpucore.config.MAX_CHIP_MEMORY`."""
    text = os.environ.get(MEMORY_ENV)
    if text is None or not text.strip():
        return MAX_CHIP_MEMORY
    return parse_memory(text, MEMORY_ENV)


def parse_memory(text: str, what: str) -> int:
    """Bytes from text such as ``8589934592``, ``8G``, ``512M`` or ``none`` (0: no limit)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    if t in ("NONE", "0"):
        return 0
    scale = 1
    if t[-1:] in ("K", "M", "G", "T"):
        scale = 1 << (10 * ("KMGT".index(t[-1]) + 1))
        t = t[:-1]
    if not t.isascii() or not t.isdigit() or len(t) > 18:
        raise ConfigError(f"{what} must be a number of bytes (optionally with K, M, G or T), or none; got {text!r:.80}")
    return int(t) * scale
