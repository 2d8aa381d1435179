"""Systems of chips joined by their C2C links, run in lockstep.

A :class:`System` holds ``n`` :class:`~lpucore.Chip` objects of one configuration
and a *topology*: which link of which chip is wired to which link of which other
chip.  :meth:`System.run` advances every chip in windows of ``c2c_latency``
cycles; after each window it moves the vectors each chip sent (its outbox) to the
inboxes at the links' other ends.  A vector sent in a window arrives
``c2c_latency`` cycles after its Send, hence never inside the window it was sent
in, so every chip sees exactly what it would see if all chips ran cycle by cycle
together: results and cycle counts do not depend on the window, the engine or
the number of processes (see :mod:`lpucore.mpi`).

Topologies (TSP.md section 7):

``"node"``       a GroqNode: 8 chips, fully connected by links 0..6 (chip a's link
                 ``(b - a) mod 8 - 1`` goes to chip b).
``"rack"``       9 nodes (72 chips); each chip's 4 global links (7..10) join the
                 nodes pairwise, 4 links per pair of nodes.
``"dragonfly"``  racks of 72 chips (``n`` a multiple of 72); the remaining links
                 (11..15) join every pair of racks with as many links as the ports allow.
a list           ``[(chip_a, link_a, chip_b, link_b), ...]``: any wiring; each
                 (chip, link) end used at most once.

Links left unconnected may not be used: :meth:`System.load` refuses a program that
names one in a Send or Receive (:class:`~lpucore.ProgramError`).  SRAM is allocated lazily by the operating
system (the engines zero-fill on demand), so a system of hundreds of GroqChips
costs host memory only for what its programs touch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .chip import Chip, RunStats
from .config import ChipConfig
from .errors import ConfigError, LpuError, ProgramError, ScheduleError

NODE_CHIPS = 8
RACK_NODES = 9
RACK_CHIPS = NODE_CHIPS * RACK_NODES
LOCAL_LINKS = range(0, 7)          # within a node
GLOBAL_LINKS = range(7, 11)        # between the nodes of a rack
SYSTEM_LINKS = range(11, 16)       # between racks

Wire = Tuple[int, int, int, int]    # chip_a, link_a, chip_b, link_b


def _pairs_between(groups: Sequence[Sequence[int]], ports: Sequence[int], per_pair: int) -> List[Wire]:
    """Join every pair of groups of chips with ``per_pair`` links, spreading each group's
    share over its chips and the given ports (slot s of a group: chip s mod size, port
    ports[s // size])."""
    wires = []
    n = len(groups)
    for a in range(n):
        for b in range(a + 1, n):
            ra, rb = b - 1, a                 # rank of b among a's peers, and of a among b's
            for k in range(per_pair):
                sa, sb = ra * per_pair + k, rb * per_pair + k
                ga, gb = groups[a], groups[b]
                wires.append((ga[sa % len(ga)], ports[sa // len(ga)], gb[sb % len(gb)], ports[sb // len(gb)]))
    return wires


def topology_wires(topology, n_chips: int, cfg: ChipConfig) -> List[Wire]:
    """The link list of a named topology (or a checked copy of a given one)."""
    if isinstance(topology, str):
        need = {"node": 7, "rack": 11, "dragonfly": 16}.get(topology)
        if need is None:
            raise ConfigError(f"unknown topology {topology!r}: 'node', 'rack', 'dragonfly' or a list of "
                              "(chip_a, link_a, chip_b, link_b)")
        if cfg.c2c_links < need:
            raise ConfigError(f"topology {topology!r} needs {need} C2C links per chip; "
                              f"the configuration has c2c_links={cfg.c2c_links}")
        size = {"node": NODE_CHIPS, "rack": RACK_CHIPS}.get(topology)
        if size is not None and n_chips != size:
            raise ConfigError(f"a {topology} has {size} chips, not {n_chips}")
        if topology == "dragonfly" and (n_chips % RACK_CHIPS or n_chips < 2 * RACK_CHIPS):
            raise ConfigError(f"a dragonfly is 2 or more racks of {RACK_CHIPS} chips; {n_chips} is not")
        nodes = [list(range(i, i + NODE_CHIPS)) for i in range(0, n_chips, NODE_CHIPS)]
        wires = []
        for node in nodes:                     # fully connected nodes
            for i, a in enumerate(node):
                for j in range(i + 1, NODE_CHIPS):
                    b = node[j]
                    wires.append((a, (j - i) - 1, b, (i - j) % NODE_CHIPS - 1))
        if topology == "node":
            return wires
        racks = [nodes[i:i + RACK_NODES] for i in range(0, len(nodes), RACK_NODES)]
        for rack in racks:
            wires += _pairs_between(rack, list(GLOBAL_LINKS), len(GLOBAL_LINKS) * NODE_CHIPS // (RACK_NODES - 1))
        if topology == "dragonfly":
            groups = [[c for node in rack for c in node] for rack in racks]
            per_pair = len(SYSTEM_LINKS) * RACK_CHIPS // (len(groups) - 1)
            if per_pair < 1:
                raise ConfigError(f"{len(groups)} racks are more than the {len(SYSTEM_LINKS) * RACK_CHIPS + 1} "
                                  "a dragonfly of these links can join pairwise")
            wires += _pairs_between(groups, list(SYSTEM_LINKS), per_pair)
        return wires
    wires = []
    for w in topology:
        try:
            a, la, b, lb = (int(x) for x in w)
        except (TypeError, ValueError):
            raise ConfigError(f"a link is (chip_a, link_a, chip_b, link_b), got {w!r}") from None
        wires.append((a, la, b, lb))
    return wires


@dataclass
class SystemStats:
    """What a system run did: ``cycles`` is the longest chip's; per-chip :class:`RunStats`
    in ``chips``; ``link_vectors`` counts vectors per wire ``(chip_a, link_a, chip_b,
    link_b)`` in both directions."""

    cycles: int
    seconds: float
    finished: bool
    chips: List[RunStats]
    windows: int
    link_vectors: Dict[Wire, int] = field(default_factory=dict)

    @property
    def c2c_bytes(self) -> int:
        """Bytes sent over all links."""
        return sum(s.by_unit.get("C2C", {}).get("bytes_sent", 0) for s in self.chips)


class System:
    """``n_chips`` chips of one configuration wired by ``topology`` (see the module doc).

    ``engine``: "fast" or "reference" for every chip.  Load one program per chip with
    :meth:`load`, then :meth:`run`; chips, their memory and their tensors are reached
    through :attr:`chips`."""

    def __init__(self, n_chips: Optional[int] = None, topology: Union[str, Sequence[Wire]] = "node",
                 config: Optional[ChipConfig] = None, engine: str = "fast", fp16_mxm: str = "exact",
                 comm=None):
        cfg = config if config is not None else ChipConfig.groqchip1()
        if n_chips is None:
            n_chips = {"node": NODE_CHIPS, "rack": RACK_CHIPS}.get(topology) if isinstance(topology, str) else None
            if n_chips is None:
                raise ConfigError("System: give n_chips")
        n_chips = int(n_chips)
        if n_chips < 1:
            raise ConfigError(f"a system needs at least one chip, got {n_chips}")
        self.config = cfg
        self.engine = engine
        self.wires = topology_wires(topology, n_chips, cfg)
        self.peer: Dict[Tuple[int, int], Tuple[int, int]] = {}
        for a, la, b, lb in self.wires:
            for c, link in ((a, la), (b, lb)):
                if not 0 <= c < n_chips:
                    raise ConfigError(f"link ({a}, {la}, {b}, {lb}) names chip {c}; "
                                      f"the system has chips 0..{n_chips - 1}")
                if not 0 <= link < cfg.c2c_links:
                    raise ConfigError(f"link ({a}, {la}, {b}, {lb}) names link {link}; chips have links "
                                      f"0..{cfg.c2c_links - 1}")
                if (c, link) in self.peer:
                    raise ConfigError(f"link {link} of chip {c} is wired twice")
            if (a, la) == (b, lb):
                raise ConfigError(f"link {la} of chip {a} is wired to itself")
            self.peer[(a, la)] = (b, lb)
            self.peer[(b, lb)] = (a, la)
        self.n_chips = n_chips
        # With an MPI communicator (lpucore.mpi), this process simulates a contiguous block of
        # chips; the others are None here.
        self.comm = comm
        self.rank: int
        self.size: int
        self.rank, self.size = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())
        self.owner = [i * self.size // n_chips for i in range(n_chips)]
        self.chips: List[Optional[Chip]] = [Chip(cfg, engine=engine, fp16_mxm=fp16_mxm)
                                            if self.owner[i] == self.rank else None for i in range(n_chips)]
        for chip in self.chips:
            if chip is not None:
                _small_pages(chip)
        self._wire_of = {}
        for w in self.wires:
            self._wire_of[(w[0], w[1])] = w
            self._wire_of[(w[2], w[3])] = w
        self.link_vectors: Dict[Wire, int] = {}
        self.windows = 0

    def __len__(self):
        return self.n_chips

    def local_chip(self, i: int) -> Chip:
        """Chip ``i``, which this process simulates (under MPI another rank may own it)."""
        chip = self.chips[i]
        if chip is None:
            raise LpuError(f"chip {i} is simulated by MPI rank {self.owner[i]}, not by this rank ({self.rank})")
        return chip

    @property
    def local(self) -> List[int]:
        """The chips this process simulates (all of them without MPI)."""
        return [i for i in range(self.n_chips) if self.owner[i] == self.rank]

    def __repr__(self):
        mpi = f", rank {self.rank} of {self.size}" if self.comm is not None else ""
        return f"System({self.n_chips} x {self.config.name}, {len(self.wires)} links, engine={self.engine!r}{mpi})"

    @property
    def window(self) -> int:
        """Lockstep window in cycles: the link latency (no vector arrives in the window it was sent in)."""
        return self.config.c2c_latency

    def load(self, programs) -> None:
        """One :class:`~lpucore.Program` per chip: a list (None: leave that chip idle), a
        dict chip -> program, or a callable chip -> program (called for this process's
        chips only).  Every chip restarts at cycle 0 with its SRAM kept."""
        items: Iterable[Tuple[int, Any]]
        if callable(programs):
            items = [(i, programs(i)) for i in self.local]
        elif isinstance(programs, dict):
            items = programs.items()
        else:
            programs = list(programs)
            if len(programs) != self.n_chips:
                raise LpuError(f"System.load: {len(programs)} programs for {self.n_chips} chips")
            items = enumerate(programs)
        for i, p in items:
            if not 0 <= int(i) < self.n_chips:
                raise LpuError(f"System.load: no chip {i}")
            chip = self.chips[int(i)]
            if p is not None and chip is not None:
                self._check_links(int(i), p)
                chip.load(p)
        self.reset(clear_memory=False)

    def _check_links(self, chip: int, program) -> None:
        for qname, lst in program.queues.items():
            for k, ins in enumerate(lst):
                if ins.op.unit == "C2C" and ins.op.mnemonic != "Deskew" and (chip, ins.args[0]) not in self.peer:
                    raise ProgramError(f"chip {chip}: {ins.op.mnemonic} on link {ins.args[0]}, which this system "
                                       f"leaves unconnected", queue=qname, index=k)

    def reset(self, clear_memory: bool = False) -> None:
        """Every chip back to cycle 0 (SRAM kept unless ``clear_memory``); links emptied."""
        for i in self.local:
            self.local_chip(i).reset(clear_memory)
        self.link_vectors = {}
        self.windows = 0

    def _route(self, i: int, sent, remote: List[list]) -> None:
        """Deliver chip i's sent vectors to local chips now; queue the others per rank."""
        for link, cycle, arrival, vec in sent:
            peer = self.peer.get((i, link))
            if peer is None:     # a program loaded behind the system's back
                raise LpuError(f"chip {i} sent on link {link} in cycle {cycle}, which this system leaves unconnected")
            w = self._wire_of[(i, link)]
            self.link_vectors[w] = self.link_vectors.get(w, 0) + 1
            if self.owner[peer[0]] == self.rank:
                self.local_chip(peer[0]).c2c_deliver(peer[1], arrival, vec)
            else:
                remote[self.owner[peer[0]]].append((peer[0], peer[1], arrival, vec))

    @staticmethod
    def _tag(e: ScheduleError, chip: int) -> ScheduleError:
        e.chip = chip
        e.args = (f"chip {chip}: {e.args[0]}",) + e.args[1:]
        return e

    def run(self, max_cycles: Optional[int] = None) -> SystemStats:
        """Run every chip to the end of its program (or ``max_cycles`` more cycles), in
        lockstep windows.  Raises the first :class:`~lpucore.ScheduleError` (its ``chip``
        attribute and message name the chip)."""
        stop = None if max_cycles is None else self.cycle + int(max_cycles)
        W = self.window
        t = self.cycle
        while True:
            target = t + W if stop is None else min(t + W, stop)
            all_done, error = True, None
            for i in self.local:
                eng = self.local_chip(i).engine      # Chip.run without building RunStats every window
                if eng.finished:              # its program has ended: nothing more can happen on it
                    continue
                try:
                    eng.run(target, idle=False)
                except ScheduleError as e:
                    error = (i, e)
                    break
                all_done &= bool(eng.finished)
            remote: List[list] = [[] for _ in range(self.size)]
            if error is None:
                for i in self.local:
                    self._route(i, self.local_chip(i).c2c_take_outbox(), remote)
            if self.comm is not None:
                # one exchange per window: vectors for other processes, errors, and whether all are done
                got = self.comm.alltoall([(None if error is None else _pack(*error), all_done, r) for r in remote])
                errors = [g[0] for g in got if g[0] is not None]
                if errors:
                    error = _unpack(min(errors, key=lambda x: x[0]))
                all_done = all(g[1] for g in got)
                if error is None:
                    for chip, link, arrival, vec in sorted((e for g in got for e in g[2]), key=lambda e: e[:2]):
                        self.local_chip(chip).c2c_deliver(link, arrival, vec)
            if error is not None:
                raise self._tag(error[1], error[0])
            self.windows += 1
            t = target
            if all_done or (stop is not None and t >= stop):
                break
        return self.stats()

    @property
    def cycle(self) -> int:
        c = max((self.local_chip(i).cycle for i in self.local), default=0)
        return c if self.comm is None else self.comm.allreduce(c, op=_max_op())

    def stats(self) -> SystemStats:
        """Every chip's statistics (gathered from all processes under MPI)."""
        per = {i: self.local_chip(i).stats() for i in self.local}
        links = dict(self.link_vectors)
        if self.comm is not None:
            per, links = {}, {}
            for p, lv in self.comm.allgather(({i: self.local_chip(i).stats() for i in self.local}, self.link_vectors)):
                per.update(p)
                for w, n in lv.items():
                    links[w] = links.get(w, 0) + n
        chips = [per[i] for i in range(self.n_chips)]
        cycles = max(s.cycles for s in chips)
        return SystemStats(cycles=cycles, seconds=cycles / self.config.clock_hz,
                           finished=all(s.finished for s in chips), chips=chips, windows=self.windows,
                           link_vectors=dict(sorted(links.items())))


def _small_pages(chip: Chip) -> None:
    """Back the chip's SRAM array with 4 KB pages. NumPy asks Linux for 2 MB pages on big arrays,
    so a program that writes a few hundred KB into each of many slices would cost whole 2 MB pages
    per slice: a GroqChip holding a 67 MB stage then takes over 200 MB of host memory. A system of
    many chips pays only for the bytes its programs touch (for one chip, the big pages' fewer TLB
    misses are worth more)."""
    import ctypes
    import mmap
    advice = getattr(mmap, "MADV_NOHUGEPAGE", None)
    arr = chip.engine.sram()
    if advice is None:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no C library to call
        return
    page = mmap.PAGESIZE
    start = -(-arr.ctypes.data // page) * page
    end = (arr.ctypes.data + arr.nbytes) // page * page
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)


def _pack(chip: int, e: ScheduleError):
    return (chip, e.kind, e.cycle, e.unit, str(e).split(": ", 1)[1] if ": " in str(e) else str(e),
            e.stream, e.bank, e.link)


def _unpack(x):
    chip, kind, cycle, unit, message, stream, bank, link = x
    return chip, ScheduleError(kind, cycle, unit, message, stream=stream, bank=bank, link=link)


def _max_op():
    from mpi4py import MPI
    return MPI.MAX
