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
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, TypeVar

from .errors import ConfigError

_T = TypeVar("_T")


def _param(default: _T, unit: str, doc: str, source: str) -> _T:
    return field(default=default, metadata={"unit": unit, "doc": doc, "source": source})


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
    superlanes: int = _param(20, "superlanes", "Superlanes (tiles) across the chip.", "TSP.md s1 [B]")
    lanes_per_superlane: int = _param(16, "lanes", "Lanes in one superlane.", "TSP.md s1 [B]")
    hemispheres: int = _param(2, "hemispheres", "West and East, mirror images about the VXM; must be 2.",
                              "TSP.md s1 [C]")
    mem_slices_per_hemisphere: int = _param(44, "slices", "MEM slices in each hemisphere.", "TSP.md s2 [B]")
    addresses_per_slice: int = _param(8192, "vectors", "Addresses in one MEM slice; each holds one vector (one byte "
                                      "per lane).", "TSP.md s2 [B]")
    banks_per_slice: int = _param(2, "banks", "SRAM banks per MEM slice (one read and one write per cycle, to "
                                  "different banks).", "TSP.md s2 [B]")
    bank_select: str = _param("msb", "-", "How an address picks its bank: 'msb' (contiguous halves, TSP.md s9's 2 x "
                              "4,096) or 'lsb' (interleaved).", "TSP.md s9 [U]")
    streams_per_direction: int = _param(32, "streams", "Stream registers per lane flowing east, and as many flowing "
                                        "west.", "TSP.md s1 [B]")
    mxm_planes: int = _param(4, "planes", "MXM planes (independent MACC arrays), half per hemisphere.", "TSP.md s3 [B]")
    mxm_size: int = _param(320, "rows/cols", "Rows and columns of one square MXM plane.", "TSP.md s3 [B]")
    vxm_alus_per_lane: int = _param(16, "ALUs", "VXM ALUs per lane (a 4 x 4 mesh); one ICU queue each.",
                                    "TSP.md s4 [B, A]")
    clock_hz: float = _param(900e6, "Hz", "Core clock, used to turn cycles into seconds.",
                             "TSP.md s1 [A] (GroqFlow uses 900 MHz)")
    # ---- timing -----------------------------------------------------------------
    stagger: int = _param(20, "cycles", "Superlane stagger N: an instruction reaches superlane k at issue + k. "
                          "lpucore models it as the uniform latency term N of P20 Eq. 4, added once at the end of a "
                          "run for the last superlane's wavefront.", "TSP.md s1 [B]")
    mem_slices_per_hop: int = _param(4, "slices", "Consecutive MEM slices sharing one stream-register position (used "
                                     "when mem_hop_map is None). FTLPU models 4; GM's hardware timings count ~10 "
                                     "crossings per hemisphere.", "TSP.md s1 [U] estimate")
    mem_hop_map: Optional[Tuple[int, ...]] = _param(None, "hops", "Explicit hop distance from the VXM of each MEM "
                                                    "slice of a hemisphere (slice 0 first); non-decreasing, >= 1. "
                                                    "None derives it from mem_slices_per_hop.", "TSP.md s1 [U]")
    sxm_hops: int = _param(1, "hops", "Hops from the outermost MEM position to the SXM position.", "estimate")
    mxm_hops: int = _param(1, "hops", "Hops from the SXM position to the MXM position.", "estimate")
    mem_read_delay: int = _param(2, "cycles", "d_func of MEM Read/Gather: from issue (bank access) to the vector on "
                                 "the stream at the slice's position.",
                                 "estimate (P20 exposes d_func, value not public)")
    mem_write_delay: int = _param(2, "cycles", "From MEM Write/Scatter issue (stream sampled) to the bank write; a "
                                  "Read issued in that cycle must use the other bank.", "estimate")
    vxm_alu_delay: int = _param(2, "cycles", "d_func of a VXM arithmetic, logic or compare op: issue to result on the "
                                "stream and in the ALU latch.", "estimate")
    vxm_convert_delay: int = _param(2, "cycles", "d_func of VXM conversions (cvt, requant).", "estimate")
    vxm_transcendental_delay: int = _param(4, "cycles", "d_func of VXM exp/tanh/sigmoid/rsqrt/recip/sqrt/div.",
                                           "estimate")
    notify_delay: int = _param(4, "cycles", "From a Notify's issue to the first cycle a queue parked on the matching "
                               "Sync may issue again.", "estimate")
    # ---- MXM ----------------------------------------------------------------------
    mxm_accumulators: int = _param(512, "vectors", "Accumulator registers per MXM plane, each one 320 x 32-bit vector.",
                                   "estimate (not public; FTLPU models 256)")
    mxm_lw_streams: int = _param(16, "streams", "Most streams one LW can load into a plane's weight buffer in a cycle "
                                 "(a full 320-row load then takes 20 cycles).", "TSP.md s3 [B, C]")
    mxm_install_delay: int = _param(3, "cycles", "From IW's issue to the first cycle an ABC uses the installed "
                                    "weights.", "TSP.md s3 [C] (GM: 3 weight install)")
    mxm_delay: int = _param(47, "cycles", "From ABC's issue (activation read) to its product landing in the "
                            "accumulator.", "TSP.md s3 [C] (GM: 13 multiply + 34 accumulation)")
    mxm_acc_delay: int = _param(3, "cycles", "From ACC's issue to the accumulator vector on its 4 result streams.",
                                "estimate")
    mxm_fp16_interval: int = _param(2, "cycles", "Cycles between fp16 ABCs on one plane: a plane does one [1 x 160] x "
                                    "[160 x 320] fp16 sub-op every 2 cycles, so the chip does 2 per cycle against 4 "
                                    "int8 [1 x 320] x [320 x 320].", "TSP.md s3 [A] (P22)")
    # ---- SXM ----------------------------------------------------------------------
    sxm_queues_per_hemisphere: int = _param(14, "queues", "SXM instruction queues per hemisphere.", "TSP.md s6 [B, C]")
    sxm_shifters: int = _param(8, "units", "Shift/Select units per hemisphere usable in one cycle (8: a float32 lane "
                               "rotation, two shifts of four byte planes, in one cycle).",
                               "estimate (TSP.md names no limit for shifts)")
    sxm_distributors: int = _param(4, "units", "Distribute/Rotate units per hemisphere usable in one cycle.",
                                   "TSP.md s5 [B, C] (GroqAPI: about 4)")
    sxm_transposers: int = _param(2, "units", "Transpose units per hemisphere usable in one cycle.",
                                  "TSP.md s5 [B, C] (GroqAPI: 2)")
    sxm_permuters: int = _param(1, "units", "Permute units per hemisphere usable in one cycle.",
                                "TSP.md s5 [B, C] (GroqAPI: 1)")
    sxm_delay: int = _param(4, "cycles", "d_func of every SXM instruction: issue to result on its streams.",
                            "estimate (GM counts 9 cycles for an SXM crossing)")
    # ---- C2C (chip-to-chip links) ---------------------------------------------------
    c2c_links: int = _param(16, "links", "Chip-to-chip links per chip. Send, Receive and Deskew are switch-unit "
                            "instructions: any SXM queue may use any link, at the SXM position.", "TSP.md s7 [B, C]")
    c2c_link_bytes_per_s: float = _param(14e9, "bytes/s", "Bandwidth of one link in one direction (4 lanes x 30 Gb/s "
                                         "after coding): a link takes one vector every c2c_send_interval = ceil(lanes "
                                         "x clock_hz / c2c_link_bytes_per_s) cycles (21 on the GroqChip).",
                                         "TSP.md s7 [B, C]")
    c2c_latency: int = _param(500, "cycles", "From a Send's issue to the first cycle the chip at the link's other end "
                              "can Receive the vector (SerDes, wire and deskew FIFO; about 0.56 us).",
                              "estimate (TSP.md s7 [A, C]: < 3 us end to end across a Dragonfly of a few hops)")
    c2c_receive_delay: int = _param(2, "cycles", "d_func of Receive: from issue to the vector on its stream at the "
                                    "C2C position.", "estimate")
    c2c_deskew_delay: int = _param(64, "cycles", "From a Deskew's issue to the first cycle Send and Receive may use "
                                   "the link (the link's lane skew is measured and compensated).", "estimate")

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
        ints = [f.name for f in dataclasses.fields(self) if f.type in ("int", int)]
        for n in ints:
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"ChipConfig.{n} must be an int, got {v!r}")
            if v < 1:
                raise ConfigError(f"ChipConfig.{n} must be >= 1, got {v}")
        if not isinstance(self.clock_hz, (int, float)) or not self.clock_hz > 0:
            raise ConfigError(f"ChipConfig.clock_hz must be a positive number, got {self.clock_hz!r}")
        if self.hemispheres != 2:
            raise ConfigError("ChipConfig.hemispheres must be 2: the TSP is two mirrored hemispheres about the VXM")
        if self.bank_select not in ("msb", "lsb"):
            raise ConfigError(f"ChipConfig.bank_select must be 'msb' or 'lsb', got {self.bank_select!r}")

    def _check_geometry(self) -> None:
        if self.addresses_per_slice % self.banks_per_slice:
            raise ConfigError(f"addresses_per_slice ({self.addresses_per_slice}) must be a multiple of "
                              f"banks_per_slice ({self.banks_per_slice})")
        if self.addresses_per_slice > 65536:
            raise ConfigError("addresses_per_slice must be <= 65536: Gather/Scatter carry 16-bit addresses")
        if self.streams_per_direction % 4 or self.streams_per_direction > 64:
            raise ConfigError("streams_per_direction must be a multiple of 4 (fp32 stream groups) and <= 64, "
                              f"got {self.streams_per_direction}")
        if self.mxm_planes % 2:
            raise ConfigError(f"mxm_planes must be even (half per hemisphere), got {self.mxm_planes}")
        if self.vxm_alus_per_lane > 64:
            raise ConfigError("vxm_alus_per_lane must be <= 64")
        if self.lanes > 4096:
            raise ConfigError("at most 4096 lanes")
        if self.mxm_size != self.lanes:
            raise ConfigError(f"mxm_size ({self.mxm_size}) must equal the lanes ({self.lanes}): a plane takes one "
                              "lane-wide activation vector and gives one lane-wide result")
        if self.mxm_size % 2:
            raise ConfigError("mxm_size must be even (fp16 weights take two byte-rows each)")
        if self.mxm_lw_streams > self.streams_per_direction:
            raise ConfigError("mxm_lw_streams must be <= streams_per_direction")
        if self.streams_per_direction < self.lanes_per_superlane:
            raise ConfigError("Transpose needs streams_per_direction >= lanes_per_superlane")
        if not isinstance(self.c2c_link_bytes_per_s, (int, float)) or not self.c2c_link_bytes_per_s > 0:
            raise ConfigError("ChipConfig.c2c_link_bytes_per_s must be a positive number, "
                              f"got {self.c2c_link_bytes_per_s!r}")
        if self.c2c_links % 2:
            raise ConfigError(f"c2c_links must be even (half per hemisphere), got {self.c2c_links}")

    def _check_hop_map(self) -> None:
        if self.mem_hop_map is not None:
            m = tuple(self.mem_hop_map)
            if len(m) != self.mem_slices_per_hemisphere:
                raise ConfigError(f"mem_hop_map has {len(m)} entries, expected one per MEM slice "
                                  f"({self.mem_slices_per_hemisphere})")
            if any((not isinstance(h, int)) or h < 1 for h in m) or any(b < a for a, b in zip(m, m[1:])):
                raise ConfigError("mem_hop_map must be non-decreasing integers >= 1")
            object.__setattr__(self, "mem_hop_map", m)

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
        t = text.strip().upper()
        if len(t) >= 2 and t[0] in "WE" and t[1:].isdigit():
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
        i = self.queue_index.get(name)
        if i is not None:
            return self.queues[i]
        i = self.queue_index.get(name.strip().upper())
        if i is None:
            raise ConfigError(f"no queue {name!r} on this chip (MEM.W0..MEM.E{self.mem_slices_per_hemisphere - 1}, "
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

    @classmethod
    def describe(cls) -> str:
        """A Markdown table of every parameter: name, unit, default, meaning, source."""
        rows = ["| parameter | unit | groqchip1 | tiny | meaning | source |", "| --- | --- | --- | --- | --- | --- |"]
        g, t = cls.groqchip1(), cls.tiny()
        for f in dataclasses.fields(cls):
            m = f.metadata
            rows.append(f"| `{f.name}` | {m['unit']} | {getattr(g, f.name)} | {getattr(t, f.name)} | {m['doc']} "
                        f"| {m['source']} |")
        return "\n".join(rows)
