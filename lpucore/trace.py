"""Instruction traces: what every queue issued, cycle by cycle, and what the chip's units did.

Recording: ``chip.run(trace="run.trace.csv", trace_window=(start, end))`` (or a :class:`Recorder`) writes one
record per issued functional instruction whose cycle lies in ``[start, end)``, plus one counter record per
``bucket`` cycles (MXM busy plane-cycles, SRAM bytes read and written), streamed to a CSV file as the run goes:
memory stays bounded whatever the window. Inside the window the chip advances one cycle at a time and the
queues that issued are read from the engine's per-queue counters, so a trace is the same on both engines and
costs a few tens of microseconds per traced cycle; outside it the run goes at full speed.

The record file (``#`` lines are comments)::

    cycle,kind,name,unit,what
    17,issue,MEM.W3,MEM,Read 0x12 E4
    64,counter,mxm_busy,MXM,12        (plane-cycles in the bucket ending before this cycle)

Converters, each streaming the record file: :func:`to_perfetto` (Chrome / Perfetto trace JSON: one track per
queue grouped by unit, counter tracks for MXM utilisation and SRAM bandwidth), :func:`to_vcd` (one wire per
selected queue, high in the cycles it issues), :func:`plot_utilisation` (PNG of MXM utilisation and SRAM
bandwidth over time; needs matplotlib, ``pip install lpucore[plot]``).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import LpuError

PathLike = Union[str, os.PathLike]
HEADER = ["cycle", "kind", "name", "unit", "what"]


class TraceError(LpuError):
    """A trace file or window that cannot be used."""


def _expanded(program, qname: str) -> List:
    """The functional instructions queue ``qname`` issues, in order, Repeats unrolled with their stride."""
    out = []
    prev = None
    for ins in program.queues.get(qname, []):
        m = ins.op.mnemonic
        if m == "Repeat":
            assert prev is not None, "Program.validate rejects a Repeat with no instruction before it"
            strided = [j for j, f in enumerate(prev.op.fields) if f.strided]
            for k in range(1, ins["n"] + 1):
                args = tuple(v + k * ins["stride"] if j in strided else v for j, v in enumerate(prev.args))
                out.append(type(prev)(prev.op, args))
        elif ins.op.unit != "ICU":
            out.append(ins)
            prev = ins
    return out


class Recorder:
    """Streams the records of one run to ``path`` (CSV). ``window = (start, end)`` in absolute cycles
    (``end`` None: to the end of the run); ``bucket``: cycles per counter record."""

    def __init__(self, path: PathLike, window: Tuple[int, Optional[int]] = (0, None), bucket: int = 64):
        start, end = window
        if start < 0 or (end is not None and end <= start):
            raise TraceError(f"trace window {window} must be (start >= 0, end > start or None)")
        if bucket < 1:
            raise TraceError(f"trace bucket must be >= 1 cycle, not {bucket}")
        self.path, self.start, self.end, self.bucket = Path(path), int(start), end, int(bucket)
        self.records = 0

    def record(self, chip, max_cycles: Optional[int] = None, until: Optional[int] = None):
        """Run ``chip`` like :meth:`lpucore.Chip.run`, tracing the window; returns the run's stats."""
        cfg, prog = chip.config, chip.program
        stop = _stop(chip, max_cycles, until)
        names = [q.name for q in cfg.queues]
        units = [q.unit for q in cfg.queues]
        expanded: Dict[int, List] = {}
        with open(self.path, "w", newline="") as f:
            w = csv.writer(f)
            f.write(f"# lpucore trace: config {cfg.name}, clock_hz {cfg.clock_hz}, lanes {cfg.lanes}, "
                    f"mxm_planes {cfg.mxm_planes}, window {self.start}..{self.end}, bucket {self.bucket}\n")
            w.writerow(HEADER)
            base: Dict[str, np.ndarray] = {}
            b0, ctr = None, None
            for c, ctr, new in _cycles(chip, self.start, self.end, stop):
                if c is None:
                    base = {k: ctr[k].copy() for k in ("mxm_busy", "bytes_read", "bytes_written")}
                    b0 = chip.cycle
                    continue
                for q, k in new:
                    if q not in expanded:
                        expanded[q] = _expanded(prog, names[q])
                    ins = expanded[q][k] if k < len(expanded[q]) else None
                    w.writerow([c, "issue", names[q], units[q], ins.text(cfg) if ins is not None else "?"])
                    self.records += 1
                if chip.cycle - b0 >= self.bucket or chip.engine.finished:
                    self._counters(w, chip.cycle, ctr, base)
                    base = {k: ctr[k].copy() for k in base}
                    b0 = chip.cycle
            if chip.cycle > b0:
                self._counters(w, chip.cycle, chip.counters(), base)
        return _finish(chip, stop)

    def _counters(self, w, cycle, ctr, base):
        w.writerow([cycle, "counter", "mxm_busy", "MXM", int((ctr["mxm_busy"] - base["mxm_busy"]).sum())])
        w.writerow([cycle, "counter", "sram_read", "MEM", int((ctr["bytes_read"] - base["bytes_read"]).sum())])
        w.writerow([cycle, "counter", "sram_write", "MEM",
                    int((ctr["bytes_written"] - base["bytes_written"]).sum())])



def _stop(chip, max_cycles, until) -> Optional[int]:
    if chip.program is None:
        raise TraceError("no program loaded")
    stop = None
    if max_cycles is not None:
        stop = chip.cycle + int(max_cycles)
    if until is not None:
        stop = int(until) if stop is None else min(stop, int(until))
    return stop


def _cycles(chip, start: int, end: Optional[int], stop: Optional[int]):
    """Run to ``start`` at full speed, then one cycle at a time up to ``end`` / ``stop`` / the program's end,
    yielding ``(cycle, counters, [(queue index, k), ...])`` for each cycle: the k-th functional instruction
    of each queue that issued in it. The first item is ``(None, counters, [])``, before the window."""
    eng = chip.engine
    first = max(start, chip.cycle)
    if chip.cycle < first:
        eng.run(first if stop is None else min(first, stop), idle=False)
    ctr = eng.counters()
    issued = ctr["issued"].copy()
    yield None, ctr, []
    while not eng.finished:
        c = chip.cycle
        if (stop is not None and c >= stop) or (end is not None and c >= end):
            break
        eng.run(c + 1, idle=False)
        ctr = eng.counters()
        now = ctr["issued"]
        new = [(int(q), k) for q in np.nonzero(now != issued)[0] for k in range(int(issued[q]), int(now[q]))]
        issued = now.copy()
        yield c, ctr, new


def _finish(chip, stop):
    """The rest of the run, outside the window, at full speed."""
    if not chip.engine.finished and (stop is None or chip.cycle < stop):
        chip.engine.run(stop, idle=False)
    return chip.stats()


class Watcher:
    """Callbacks for a host simulator, run with ``chip.run(events=Watcher(...))``.

    ``on_issue(cycle, queue, instruction)`` for every functional instruction issued by a queue of ``units``
    (unit names such as ``"MXM"`` or queue names such as ``"MEM.W3"``; None: all). ``watch``: MEM ranges
    ``(slice, first_address, end_address)`` (slice as ``"W3"``); ``on_write(cycle, slice, address, old, new)``
    is called for every vector of a range whose content changed by the end of ``cycle`` (``old``, ``new``:
    uint8 [lanes]). Both only inside ``window`` (absolute cycles), where the chip advances one cycle at a
    time; the run's results are those of an unwatched run. (C2C sends come with the links.)"""

    def __init__(self, on_issue=None, units=None, watch=(), on_write=None, window=(0, None)):
        if watch and on_write is None:
            raise TraceError("Watcher: watched MEM ranges need an on_write callback")
        self.on_issue, self.units, self.on_write = on_issue, None if units is None else set(units), on_write
        self.watch = [(str(s), int(a), int(b)) for s, a, b in watch]
        self.start, self.end = window

    def run(self, chip, max_cycles: Optional[int] = None, until: Optional[int] = None):
        cfg, prog, eng = chip.config, chip.program, chip.engine
        stop = _stop(chip, max_cycles, until)
        gids = {}
        for s, a, b in self.watch:
            try:
                g = next(i for i in range(cfg.mem_slices) if cfg.slice_name(i) == s)
            except StopIteration:
                raise TraceError(f"Watcher: no MEM slice {s!r}") from None
            if not 0 <= a < b <= cfg.addresses_per_slice:
                raise TraceError(f"Watcher: range {a}..{b} of {s} is outside 0..{cfg.addresses_per_slice}")
            gids[(s, a, b)] = g
        names = [q.name for q in cfg.queues]
        units = [q.unit for q in cfg.queues]
        expanded: Dict[int, List] = {}
        prev = {}
        for c, _ctr, new in _cycles(chip, self.start, self.end, stop):
            if c is None:
                prev = {key: eng.read_mem(g, key[1], key[2] - key[1]).copy() for key, g in gids.items()}
                continue
            if self.on_issue is not None:
                for q, k in new:
                    if self.units is None or units[q] in self.units or names[q] in self.units:
                        if q not in expanded:
                            expanded[q] = _expanded(prog, names[q])
                        self.on_issue(c, names[q], expanded[q][k])
            for key, g in gids.items():
                cur = eng.read_mem(g, key[1], key[2] - key[1])
                changed = np.nonzero((cur != prev[key]).any(axis=1))[0]
                for i in changed:
                    self.on_write(c, key[0], key[1] + int(i), prev[key][i].copy(), cur[i].copy())
                prev[key] = cur.copy()
        return _finish(chip, stop)


def read(path: PathLike) -> Tuple[Dict[str, str], Iterator[List[str]]]:
    """(header fields from the comment line, iterator over records ``[cycle, kind, name, unit, what]``)."""
    p = Path(path)
    if not p.is_file():
        raise TraceError(f"no trace file {p}")
    f = open(p, newline="")
    first = f.readline()
    if not first.startswith("# lpucore trace:"):
        f.close()
        raise TraceError(f"{p} is not an lpucore trace (first line {first[:40]!r})")
    meta = {}
    for part in first.split(":", 1)[1].split(","):
        k, _, v = part.strip().partition(" ")
        meta[k] = v
    r = csv.reader(f)
    if next(r, None) != HEADER:
        f.close()
        raise TraceError(f"{p}: the column line is not {','.join(HEADER)}")

    def rows():
        with f:
            for row in r:
                yield row
    return meta, rows()


def to_perfetto(path: PathLike, out: PathLike) -> int:
    """Write Chrome / Perfetto trace JSON (open it in ui.perfetto.dev or chrome://tracing): one process per
    unit, one track per queue with a 1-cycle slice per issued instruction, counter tracks ``MXM utilisation``
    (fraction of plane-cycles busy per bucket) and ``SRAM GB/s``. Timestamps are microseconds of simulated
    time. Streams the input. Returns the number of events written."""
    meta, rows = read(path)
    clock = float(meta.get("clock_hz", 900e6))
    planes = int(meta.get("mxm_planes", 4))
    us = 1e6 / clock
    pids: Dict[str, int] = {}
    tids: Dict[str, int] = {}
    n = 0
    last_counter = None
    with open(out, "w") as f:
        f.write('{"displayTimeUnit": "ns", "traceEvents": [\n')
        sep = ""

        def emit(ev):
            nonlocal sep, n
            f.write(sep + json.dumps(ev))
            sep = ",\n"
            n += 1
        prev_cycle: Dict[str, Optional[int]] = {"MXM": None, "MEM": None}
        read_bytes: Optional[int] = None
        for cycle, kind, name, unit, what in rows:
            c = int(cycle)
            if kind == "issue":
                if unit not in pids:
                    pids[unit] = len(pids) + 1
                    emit({"ph": "M", "name": "process_name", "pid": pids[unit], "args": {"name": unit}})
                if name not in tids:
                    tids[name] = len(tids) + 1
                    emit({"ph": "M", "name": "thread_name", "pid": pids[unit], "tid": tids[name],
                          "args": {"name": name}})
                emit({"ph": "X", "name": what.split(" ")[0], "pid": pids[unit], "tid": tids[name], "ts": c * us,
                      "dur": us, "args": {"cycle": c, "instruction": what}})
            elif kind == "counter":
                v = int(what)
                if name == "mxm_busy":
                    start = prev_cycle["MXM"] if prev_cycle["MXM"] is not None else (last_counter or c)
                    span = max(1, c - start) if prev_cycle["MXM"] is not None else max(1, c - (last_counter or 0))
                    emit({"ph": "C", "name": "MXM utilisation", "pid": 0, "ts": c * us,
                          "args": {"busy": v / (planes * span)}})
                    prev_cycle["MXM"] = c
                elif name == "sram_read":
                    read_bytes = v
                elif name == "sram_write":
                    start = prev_cycle["MEM"] if prev_cycle["MEM"] is not None else (last_counter or 0)
                    span = max(1, c - start)
                    emit({"ph": "C", "name": "SRAM GB/s", "pid": 0, "ts": c * us,
                          "args": {"read": (read_bytes or 0) / (span * us * 1e3), "write": v / (span * us * 1e3)}})
                    prev_cycle["MEM"] = c
                last_counter = c
        f.write("\n]}\n")
    return n


def to_csv(path: PathLike, out: PathLike) -> int:
    """The issue records only, as plain CSV ``cycle,queue,unit,instruction``. Returns the rows written."""
    _, rows = read(path)
    n = 0
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cycle", "queue", "unit", "instruction"])
        for cycle, kind, name, unit, what in rows:
            if kind == "issue":
                w.writerow([cycle, name, unit, what])
                n += 1
    return n


def to_vcd(path: PathLike, out: PathLike, signals: Optional[Sequence[str]] = None) -> List[str]:
    """A VCD file with one wire per queue in ``signals`` (default: every queue that issued), high during the
    cycles it issues (timescale: one cycle = 1 ns x 1 unit). Returns the signal names."""
    if signals is None:
        _, rows = read(path)
        seen = []
        for _, kind, name, _, _ in rows:
            if kind == "issue" and name not in seen:
                seen.append(name)
        signals = seen
    ids = {s: _vcd_id(i) for i, s in enumerate(signals)}
    _, rows = read(path)
    with open(out, "w") as f:
        f.write("$timescale 1ns $end\n$scope module lpucore $end\n")
        for s, i in ids.items():
            f.write(f"$var wire 1 {i} {s.replace('.', '_')} $end\n")
        f.write("$upscope $end\n$enddefinitions $end\n#0\n$dumpvars\n")
        for i in ids.values():
            f.write(f"0{i}\n")
        f.write("$end\n")
        high: set = set()
        cur = None
        for cycle, kind, name, _, _ in rows:
            if kind != "issue" or name not in ids:
                continue
            c = int(cycle)
            if c != cur:
                if cur is not None:
                    f.write(f"#{cur + 1}\n")
                    for i in sorted(high):
                        f.write(f"0{i}\n")
                    high = set()
                f.write(f"#{c}\n")
                cur = c
            if ids[name] not in high:
                f.write(f"1{ids[name]}\n")
                high.add(ids[name])
        if cur is not None:
            f.write(f"#{cur + 1}\n")
            for i in sorted(high):
                f.write(f"0{i}\n")
    return list(signals)


def _vcd_id(i: int) -> str:
    chars = "".join(chr(c) for c in range(33, 127))
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, len(chars))
        s = chars[r] + s
    return s


def utilisation(path: PathLike) -> Dict[str, np.ndarray]:
    """Per counter bucket: ``cycle`` (end of the bucket), ``mxm`` (fraction of MXM plane-cycles busy) and
    ``sram_bytes`` (bytes read + written), from the trace's counter records."""
    meta, rows = read(path)
    planes = int(meta.get("mxm_planes", 4))
    start = int(meta.get("window", "0..").split("..")[0] or 0)
    cyc, mxm, sram = [], [], []
    prev = None
    rd = 0
    for cycle, kind, name, _, what in rows:
        if kind != "counter":
            continue
        c = int(cycle)
        if name == "mxm_busy":
            span = max(1, c - (prev if prev is not None else start))
            cyc.append(c)
            mxm.append(int(what) / (planes * span))
        elif name == "sram_read":
            rd = int(what)
        elif name == "sram_write":
            sram.append(rd + int(what))
            prev = c
    return {"cycle": np.array(cyc), "mxm": np.array(mxm), "sram_bytes": np.array(sram)}


def plot_utilisation(path: PathLike, out: PathLike) -> None:
    """Draw MXM utilisation and SRAM traffic over simulated cycles as a PNG (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TraceError("plot_utilisation needs matplotlib: pip install lpucore[plot]") from None
    u = utilisation(path)
    fig, (a, b) = plt.subplots(2, 1, sharex=True, figsize=(8, 4.5))
    a.step(u["cycle"], 100 * u["mxm"], where="pre")
    a.set_ylabel("MXM busy (%)")
    a.set_ylim(0, 105)
    b.step(u["cycle"], u["sram_bytes"] / 1e3, where="pre", color="tab:orange")
    b.set_ylabel("SRAM kB / bucket")
    b.set_xlabel("cycle")
    fig.suptitle("lpucore: utilisation over time")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
