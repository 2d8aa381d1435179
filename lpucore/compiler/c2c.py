"""Scheduled programs that move data between chips over C2C links.

:func:`relay_programs` builds the *relay*: a block of vectors starts in one chip's
SRAM and is passed along a path through every chip of a :class:`~lpucore.System`;
each chip stores the block as it arrives and forwards it at the links' full rate.
It exercises every hop type of a topology (node-local, rack and dragonfly links)
and is the workload of ``python -m lpucore relay`` (also under ``mpiexec``).

:func:`allgather_programs` builds an all-gather over directly wired chips (a
GroqNode): every chip sends its block to every other chip over their own link, all
links at once, and ends with all the blocks, in chip order, in one MEM slice: the
exchange a tensor-parallel layer needs between chips.

Timing (all from the configuration): a block vector read from the outermost West
MEM slice reaches the SXM ``mem_read_delay + hops`` cycles after the Read; a
received vector reaches that slice ``c2c_receive_delay + hops`` cycles after the
Receive.  Vector j of the block leaves chip k ``c2c_send_interval`` cycles after
vector j - 1, so each link runs at its bandwidth.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from ..config import ChipConfig
from ..errors import CompileError
from ..program import Program
from ..system import Wire


def chip_path(n_chips: int, wires: Sequence[Wire], start: int = 0) -> List[Tuple[int, int, int, int]]:
    """A path visiting every chip once over the wires: ``[(chip, link, next_chip, next_link), ...]``.
    Depth-first with Warnsdorff's rule (go to the neighbour with the fewest unvisited
    neighbours; ties to the lowest chip), which finds one at once on these topologies."""
    nbr: Dict[int, List[Tuple[int, int, int]]] = {i: [] for i in range(n_chips)}
    for a, la, b, lb in wires:
        nbr[a].append((b, la, lb))
        nbr[b].append((a, lb, la))
    for v in nbr.values():
        v.sort()
    seen = {start}
    path: List[Tuple[int, int, int, int]] = []
    budget = 200 * n_chips

    def options(c):
        opts = []
        for b, la, lb in nbr[c]:
            if b not in seen and all(x[0] != b for x in opts):
                opts.append((b, la, lb))
        return sorted(opts, key=lambda o: (sum(1 for y in nbr[o[0]] if y[0] not in seen), o[0]))

    it = [iter(options(start))]
    cur = [start]
    while len(seen) < n_chips:
        budget -= 1
        if budget < 0 or not it:
            raise CompileError(f"no path through all {n_chips} chips over these links")
        nxt = next(it[-1], None)
        if nxt is None:                     # dead end: back up
            it.pop()
            c = cur.pop()
            seen.discard(c)
            if path:
                path.pop()
            continue
        b, la, lb = nxt
        if b in seen:
            continue
        path.append((cur[-1], la, b, lb))
        seen.add(b)
        cur.append(b)
        it.append(iter(options(b)))
    return path


def relay_programs(cfg: ChipConfig, n_chips: int, wires: Sequence[Wire], n_vectors: int,
                   address: int = 0) -> Tuple[Dict[int, Program], List[Tuple[int, int, int, int]], int]:
    """Programs for the relay of ``n_vectors`` vectors stored at ``address`` of the outermost
    West MEM slice of chip 0, along :func:`chip_path`; every chip on the path stores the
    block at the same place.  Returns (programs by chip, the path, the cycle the last
    chip's last write lands)."""
    if n_vectors < 1 or address < 0 or address + n_vectors > cfg.addresses_per_slice:
        raise CompileError(f"a relay block of {n_vectors} vectors at address {address} does not fit a slice "
                           f"of {cfg.addresses_per_slice}")
    path = chip_path(n_chips, wires)
    slot = cfg.mem_slices_per_hemisphere - 1
    mem_q = f"MEM.W{slot}"
    rx_q, tx_q = "SXM.W0", "SXM.W1"               # receives and sends may fall in one cycle
    hops = cfg.mem_position(0, slot) - cfg.sxm_position(0)
    to_sxm = cfg.mem_read_delay + hops            # Read issue -> vector at the SXM
    to_mem = cfg.c2c_receive_delay + hops         # Receive issue -> vector at the slice
    iv, lat = cfg.c2c_send_interval, cfg.c2c_latency
    if iv < 2:
        raise CompileError("the relay stores and re-reads each vector on one MEM slice: it needs "
                           "c2c_send_interval >= 2")
    events: Dict[int, Dict[str, list]] = {}

    def ev(c):
        return events.setdefault(c, {rx_q: [], tx_q: [], mem_q: []})

    # a stored vector is read back o cycles after its Write: after the write lands (no
    # bank conflict), and never in a cycle the slice's queue writes or a write lands
    o = cfg.mem_write_delay + 1
    while o % iv == 0 or (o - cfg.mem_write_delay) % iv == 0:
        o += 1

    links_used: Dict[int, set] = {}
    for a, la, b, lb in path:
        links_used.setdefault(a, set()).add(la)
        links_used.setdefault(b, set()).add(lb)
    for c, ls in links_used.items():
        ev(c)[rx_q] += [(k, f"Deskew {link}") for k, link in enumerate(sorted(ls))]
    t0 = max(len(ls) for ls in links_used.values()) + cfg.c2c_deskew_delay + to_sxm
    send = t0                                     # first Send of the current hop
    first = path[0][0]
    for j in range(n_vectors):
        ev(first)[mem_q].append((send - to_sxm + j * iv, f"Read {address + j}, W1"))
    last_land = 0
    for k, (a, la, b, lb) in enumerate(path):
        for j in range(n_vectors):
            ev(a)[tx_q].append((send + j * iv, f"Send {la}, W1"))
        recv = send + lat
        nxt = recv + to_mem + o + to_sxm          # b's first Send: after the first vector is stored and read
        for j in range(n_vectors):
            r = recv + j * iv
            ev(b)[rx_q].append((r, f"Receive {lb}, E2"))
            ev(b)[mem_q].append((r + to_mem, f"Write {address + j}, E2"))
            last_land = max(last_land, r + to_mem + cfg.mem_write_delay)
            if k + 1 < len(path):
                ev(b)[mem_q].append((nxt - to_sxm + j * iv, f"Read {address + j}, W1"))
        send = nxt
    programs = _emit(cfg, {c: {q: v for q, v in qs.items() if v} for c, qs in events.items()})
    return programs, path, last_land


def _emit(cfg: ChipConfig, events: Dict[int, Dict[str, list]]) -> Dict[int, Program]:
    programs = {}
    for c, qs in events.items():
        p = Program(cfg)
        for q, lst in qs.items():
            t = 0
            for cyc, text in sorted(lst):
                if cyc < t:
                    raise CompileError(f"schedule collides on chip {c}, {q}, cycle {cyc}")
                if cyc > t:
                    p.add(q, "NOP", cyc - t)
                mn, _, rest = text.partition(" ")
                p.add(q, mn, *[_arg(x) for x in rest.split(",")] if rest else [])
                t = cyc + 1
        programs[c] = p
    return programs


def allgather_programs(cfg: ChipConfig, n_chips: int, wires: Sequence[Wire], n_vectors: int,
                       address: int = 0) -> Tuple[Dict[int, Program], int]:
    """All-gather among ``n_chips`` chips wired pairwise (every pair needs a direct link).

    Chip i starts with its block of ``n_vectors`` vectors at ``address`` of its outermost
    West MEM slice (W{n-1}); every chip ends with block k at ``address + k * n_vectors`` of
    the next slice in (W{n-2}), for every k.  Schedule: vector j goes from chip p to chip i
    in cycle ``T0 + j * period + (i - p - 1) mod n_chips`` with ``period = max(c2c_send_interval,
    n_chips - 1)``, so each chip sends and receives at most one vector per cycle and each
    link carries one vector per period; the own block is copied last.  Returns (programs
    by chip, the cycle the last write lands), which :class:`~lpucore.System` reproduces."""
    P = n_chips
    if P < 2:
        raise CompileError("an all-gather needs at least 2 chips")
    if n_vectors < 1 or address < 0 or address + P * n_vectors > cfg.addresses_per_slice:
        raise CompileError(f"{P} blocks of {n_vectors} vectors at address {address} do not fit a slice of "
                           f"{cfg.addresses_per_slice}")
    if cfg.mem_slices_per_hemisphere < 2:
        raise CompileError("the all-gather needs two West MEM slices")
    link: Dict[Tuple[int, int], Tuple[int, int]] = {}
    for a, la, b, lb in wires:
        link.setdefault((a, b), (la, lb))
        link.setdefault((b, a), (lb, la))
    for i in range(P):
        for k in range(P):
            if i != k and (i, k) not in link:
                raise CompileError(f"chips {i} and {k} have no direct link: the all-gather needs every pair wired")
    n_sl = cfg.mem_slices_per_hemisphere
    src_q, dst_q = f"MEM.W{n_sl - 1}", f"MEM.W{n_sl - 2}"
    ps, p_src, p_dst = cfg.sxm_position(0), cfg.mem_position(0, n_sl - 1), cfg.mem_position(0, n_sl - 2)
    to_sxm = cfg.mem_read_delay + (p_src - ps)
    to_mem = cfg.c2c_receive_delay + (p_dst - ps)
    period = max(cfg.c2c_send_interval, P - 1)
    events: Dict[int, Dict[str, list]] = {i: {"SXM.W0": [], "SXM.W1": [], src_q: [], dst_q: []} for i in range(P)}
    for i in range(P):
        used = sorted({link[(i, k)][0] for k in range(P) if k != i})
        events[i]["SXM.W0"] += [(k, f"Deskew {link}") for k, link in enumerate(used)]
    T0 = (P - 1) + cfg.c2c_deskew_delay + to_sxm
    last = 0
    for p in range(P):
        for i in range(P):
            if i == p:
                continue
            o = (i - p - 1) % P
            lp, li = link[(p, i)]
            for j in range(n_vectors):
                s = T0 + j * period + o
                events[p][src_q].append((s - to_sxm, f"Read {address + j}, W1"))
                events[p]["SXM.W1"].append((s, f"Send {lp}, W1"))
                r = s + cfg.c2c_latency
                events[i]["SXM.W0"].append((r, f"Receive {li}, E2"))
                events[i][dst_q].append((r + to_mem, f"Write {address + p * n_vectors + j}, E2"))
                last = max(last, r + to_mem)
    # the own block: read it again after the sends and write it in its place
    hops, stream = abs(p_dst - p_src), ("E3" if p_dst >= p_src else "W3")
    end = 0
    for i in range(P):
        start = max(c for c, _ in events[i][src_q]) + 1
        first_w = max(start + cfg.mem_read_delay + hops, last + 1)
        start = first_w - cfg.mem_read_delay - hops
        for j in range(n_vectors):
            events[i][src_q].append((start + j, f"Read {address + j}, {stream}"))
            events[i][dst_q].append((first_w + j, f"Write {address + i * n_vectors + j}, {stream}"))
        end = max(end, first_w + n_vectors - 1 + cfg.mem_write_delay)
    return _emit(cfg, events), end


def _arg(x: str):
    x = x.strip()
    return int(x) if x.lstrip("-").isdigit() else x
