"""The reference engine's whole state as flat NumPy arrays and JSON scalars, and back.

Used by :meth:`lpucore.Chip.snapshot` / :meth:`lpucore.Chip.restore`.  Every
pending effect (stream values, bank writes, latch results, installs, MXM
products) is kept in issue order, so a restored engine continues exactly as the
one that was saved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np
import numpy.typing as npt

from .. import dtypes as dt
from .. import isa
from ..errors import SnapshotError
from ..snapshot import CYCLE_LIMIT as LIM
from ..snapshot import check_equal, check_range
from ._c2c import Links
from ._icu import INF, QueueState
from ._mem import Mem
from ._mxm import Mxm
from ._streams import StreamFile
from ._sxm import Sxm
from ._vxm import Latches

if TYPE_CHECKING:
    from ..config import ChipConfig
    from ..errors import ScheduleError
    from ..program import Instruction

# QueueState fields saved per queue, in this order (None / INF saved as -1)
_Q = ("pc", "next", "rep", "rep_left", "rep_k", "rep_d", "rep_stride", "syncs", "wait_for", "sync_cycle")


def _rows(lst: Sequence[Tuple[int, ...]], width: int, dtype: npt.DTypeLike = np.int64) -> npt.NDArray[Any]:
    return np.array(lst, dtype=dtype).reshape(len(lst), width)


def _stack(lst: Sequence[npt.ArrayLike], shape: Sequence[int], dtype: npt.DTypeLike) -> npt.NDArray[Any]:
    if not lst:
        return np.zeros((0,) + tuple(shape), dtype=dtype)
    return np.stack([np.asarray(v, dtype=dtype) for v in lst])


def get_state(eng: Machine) -> Tuple[Dict[str, int], Dict[str, npt.NDArray[Any]]]:
    """The engine's state: scalars (cycle counters) and, unit by unit, flat arrays."""
    a: Dict[str, npt.NDArray[Any]] = {}
    _icu_arrays(eng, a)
    _stream_mem_latch_arrays(eng, a)
    _mxm_arrays(eng, a)
    a["sx_use"] = _rows([(int(c), int(h), isa.SXM_RESOURCES.index(r), int(n))
                         for (c, h, r), n in eng.sxm.use.items()], 4)
    _link_arrays(eng, a)
    scalars = {"t": int(eng.t), "cycle": int(eng.cycle), "last_effect": int(eng.last_effect),
               "done": bool(eng.done), "mx_peak": int(eng.mxm.peak)}
    return scalars, a


def _icu_arrays(eng: Machine, a: Dict[str, npt.NDArray[Any]]) -> None:
    """Each queue's position, Repeat and Sync state (:data:`_Q`), Notifies, counters."""
    q = np.zeros((len(eng.queues), len(_Q)), dtype=np.int64)
    for i, qs in enumerate(eng.queues):
        rep = -1
        if qs.rep_ins is not None:
            found = next((k for k, x in enumerate(qs.prog) if x is qs.rep_ins), None)
            rep = qs.prog.index(qs.rep_ins) if found is None else found
        q[i] = (qs.pc, -1 if qs.next == INF else int(qs.next), rep, qs.rep_left, qs.rep_k, qs.rep_d,
                qs.rep_stride, qs.syncs, -1 if qs.wait_for is None else qs.wait_for, qs.sync_cycle)
    a["queues"] = q
    a["notifies"] = np.array(eng.notifies, dtype=np.int64)
    for k in ("issued", "icu", "bytes_read", "bytes_written"):
        a["stats_" + k] = getattr(eng, "stats_" + k).copy()


def _stream_mem_latch_arrays(eng: Machine, a: Dict[str, npt.NDArray[Any]]) -> None:
    """Stream registers, SRAM and ALU latches, with their pending writes in issue order."""
    L, SL = eng.cfg.lanes, eng.cfg.superlanes
    st = eng.streams
    a["st_data"], a["st_valid"] = st.data.copy(), st.valid.copy()
    meta: List[Tuple[int, ...]]
    meta, vecs = [], []
    for c, values in st.pending.items():
        for dr, pos, s, w, vec in values:
            meta.append((int(c), int(dr), int(pos), int(s), int(w)))
            vecs.append(vec)
    a["st_pmeta"], a["st_pvec"] = _rows(meta, 5), _stack(vecs, (L,), np.uint8)
    m = eng.mem
    a["sram"] = m.sram.copy()
    meta, addrs, data = [], [], []
    for c, writes in m.pending.items():
        for g, ad, vec in writes:
            meta.append((int(c), int(g)))
            addrs.append(ad)
            data.append(vec)
    a["mem_pmeta"], a["mem_paddr"], a["mem_pdata"] = _rows(meta, 2), _stack(addrs, (SL,), np.int64), \
        _stack(data, (L,), np.uint8)
    a["mem_banks"] = _rows([(int(g), int(b)) for g, bs in m.banks_written.items() for b in sorted(bs)], 2)
    lt = eng.latches
    a["lt_bits"], a["lt_valid"] = lt.bits.copy(), lt.valid.copy()
    meta, bits = [], []
    for c, results in lt.pending.items():
        for alu, b in results:
            meta.append((int(c), int(alu)))
            bits.append(b)
    a["lt_pmeta"], a["lt_pbits"] = _rows(meta, 2), _stack(bits, (L,), np.uint32)


def _mxm_arrays(eng: Machine, a: Dict[str, npt.NDArray[Any]]) -> None:
    """The MXM planes: buffers, installed weights, accumulators, pending installs and products."""
    L, R = eng.cfg.lanes, eng.cfg.mxm_size
    meta: List[Tuple[int, ...]]
    mx = eng.mxm
    a["mx_buffer"] = np.stack([p.buffer for p in mx.planes])
    a["mx_array"] = np.stack([p.array if p.array is not None else np.zeros((R, L), np.uint8) for p in mx.planes])
    a["mx_array_dt"] = np.array([-1 if p.dtype is None else p.dtype.code for p in mx.planes], dtype=np.int64)
    a["mx_acc"] = np.stack([p.acc for p in mx.planes])
    a["mx_busy_until"] = np.array([p.busy_until for p in mx.planes], dtype=np.int64)
    meta, ibytes = [], []
    for i, pl in enumerate(mx.planes):
        for c, wbytes, d in pl.installs:
            meta.append((i, int(c), d.code))
            ibytes.append(wbytes)
    a["mx_imeta"], a["mx_ibytes"] = _rows(meta, 3), _stack(ibytes, (R, L), np.uint8)
    meta, res = [], []
    for c, products in mx.pending.items():
        for p, acc, add, d, r in products:
            meta.append((int(c), int(p), int(acc), int(add), d.code))
            res.append(r)
    a["mx_pmeta"], a["mx_pres"] = _rows(meta, 5), _stack(res, (L,), np.uint32)
    a["mx_macs"], a["mx_busy"] = mx.macs.copy(), mx.busy.copy()
    a["mx_macs_in_cycle"] = _rows([(int(c), int(n)) for c, n in mx.macs_in_cycle.items()], 2)


def _link_arrays(eng: Machine, a: Dict[str, npt.NDArray[Any]]) -> None:
    """The C2C links' state and the vectors in flight."""
    L = eng.cfg.lanes
    lk = eng.links
    a["lk_state"] = np.array([lk.busy_until, lk.ready, lk.sent.tolist(), lk.received.tolist()], dtype=np.int64)
    a["lk_imeta"] = _rows([(k, int(arr)) for k, ib in enumerate(lk.inbox) for arr, _ in ib], 2)
    a["lk_ivec"] = _stack([v for ib in lk.inbox for _, v in ib], (L,), np.uint8)
    a["lk_ometa"] = _rows([(int(k), int(c), int(arr)) for k, c, arr, _ in lk.outbox], 3)
    a["lk_ovec"] = _stack([v for _, _, _, v in lk.outbox], (L,), np.uint8)


def _check(arrays: Mapping[str, npt.NDArray[Any]], name: str, shape: Optional[Sequence[int]],
           dtype: npt.DTypeLike) -> npt.NDArray[Any]:
    v = arrays.get(name)
    if v is None:
        raise SnapshotError(f"snapshot has no array {name!r}")
    if v.dtype != np.dtype(dtype) or (shape is not None and v.shape != tuple(shape)):
        raise SnapshotError(f"snapshot array {name!r} is {v.dtype}{list(v.shape)}, "
                            f"this chip needs {np.dtype(dtype)}{list(shape) if shape is not None else ''}")
    return v


def _rows_of(arrays: Mapping[str, npt.NDArray[Any]], name: str, width: int,
             dtype: npt.DTypeLike = np.int64) -> npt.NDArray[Any]:
    v = _check(arrays, name, None, dtype)
    if v.ndim != 2 or v.shape[1] != width:
        raise SnapshotError(f"snapshot array {name!r} has shape {list(v.shape)}, expected [n, {width}]")
    return v


def _check_scalars(t: int, cycle: int, last_effect: int, done: int, peak: int) -> None:
    check_range("scalar cycle", cycle, 0, LIM)
    check_range("scalar t", t, -1, cycle - 1)
    check_range("scalar last_effect", last_effect, -1, LIM)
    check_range("scalar done", done, 0, 1)
    check_range("scalar mx_peak", peak, 0, LIM)


def _check_cols(name: str, rows: npt.NDArray[Any], *cols: Tuple[Any, ...]) -> None:
    """Column i of rows must be in cols[i] = (what, lo, hi[, also])."""
    for i, (what, lo, hi, *also) in enumerate(cols):
        check_range(f"array {name!r}[%s, {i}] ({what})", rows[:, i], lo, hi, also=tuple(also[0]) if also else ())


def _check_queues(eng: Machine, q: npt.NDArray[Any], n_notify: int) -> None:
    """Each queue's position, Repeat and Sync state against its instructions."""
    for i, (row, lst) in enumerate(zip(q, eng._lists)):
        pc, nx, rep, rl, rk, rd, rs, syncs, wait, sc = (int(x) for x in row)
        nm = f"array 'queues'[{i}, %d] (queue {i}'s %s)"
        check_range(nm % (0, f"pc; it holds {len(lst)} instructions"), pc, 0, len(lst))
        check_range(nm % (1, "next issue cycle, -1: none"), nx, -1, LIM)
        check_range(nm % (3, "rep_left"), rl, 0, 2 ** 31 - 1)
        check_range(nm % (2, "repeated instruction, -1: none"), rep, -1, len(lst) - 1)
        if rl > 0:
            if not (pc >= 2 and lst[pc - 1].op.mnemonic == "Repeat"):
                raise SnapshotError(f"snapshot array 'queues'[{i}] is repeating (rep_left {rl}) but instruction "
                                    f"{pc - 1} of queue {i} is no Repeat")
            r = lst[pc - 1]
            check_equal(nm % (2, "repeated instruction"), rep, pc - 2, "the instruction before the Repeat")
            check_range(nm % (4, "rep_k"), rk, 0, r["n"] - rl)
            check_equal(nm % (4, "rep_k + rep_left"), rk + rl, r["n"], "the Repeat's count")
            check_equal(nm % (5, "rep_d"), rd, r["d"], "the Repeat's delay")
            check_equal(nm % (6, "rep_stride"), rs, r["stride"], "the Repeat's stride")
        nsync = sum(1 for x in lst[:pc] if x.op.mnemonic == "Sync")
        check_equal(nm % (7, "syncs"), syncs, nsync, "Syncs before pc")
        check_range(nm % (9, "sync_cycle"), sc, 0, LIM)
        if wait >= 0:
            check_equal(nm % (8, "wait_for, -1: not parked"), wait, nsync, "the queue's last Sync")
            check_range(nm % (8, "wait_for (a Notify not yet issued)"), wait, n_notify + 1, LIM)
            check_equal(nm % (1, "next issue cycle (parked)"), nx, -1, "-1: parked")
        else:
            check_range(nm % (8, "wait_for, -1: not parked"), wait, -1, -1)
        if rl == 0 and pc == len(lst):
            check_equal(nm % (1, "next issue cycle (nothing left to issue)"), nx, -1, "-1: none")


_STATS = ("issued", "icu", "bytes_read", "bytes_written")
# arrays of metadata rows: name -> columns
_META = {"st_pmeta": 5, "mem_pmeta": 2, "lt_pmeta": 2, "mx_imeta": 3, "mx_pmeta": 5, "mx_macs_in_cycle": 2,
         "sx_use": 4, "mem_banks": 2}


def _read_arrays(eng: Machine, arrays: Mapping[str, npt.NDArray[Any]]) -> Dict[str, npt.NDArray[Any]]:
    """Every array of a snapshot, checked for presence, dtype and shape against this chip."""
    cfg = eng.cfg
    L, SL, R, NP = cfg.lanes, cfg.superlanes, cfg.mxm_size, cfg.mxm_planes
    nq, ns = len(cfg.queues), cfg.mem_slices
    fixed: List[Tuple[str, Optional[Sequence[int]], npt.DTypeLike]] = [
        ("queues", (nq, len(_Q)), np.int64), ("sram", eng.mem.sram.shape, np.uint8),
        ("st_data", eng.streams.data.shape, np.uint8), ("st_valid", eng.streams.valid.shape, bool),
        ("lt_bits", eng.latches.bits.shape, np.uint32), ("lt_valid", eng.latches.valid.shape, bool)]
    fixed += [("stats_" + k, (nq if k in ("issued", "icu") else ns,), np.int64) for k in _STATS]
    fixed += [("mx_buffer", (NP, R, L), np.uint8), ("mx_array", (NP, R, L), np.uint8),
              ("mx_array_dt", (NP,), np.int64), ("mx_acc", (NP, cfg.mxm_accumulators, L), np.uint32),
              ("mx_busy_until", (NP,), np.int64), ("mx_macs", (NP,), np.int64), ("mx_busy", (NP,), np.int64),
              ("notifies", None, np.int64)]
    v = {name: _check(arrays, name, shape, dtype) for name, shape, dtype in fixed}
    if v["notifies"].ndim != 1:
        raise SnapshotError(f"snapshot array 'notifies' has shape {list(v['notifies'].shape)}, expected [n]")
    v.update({name: _rows_of(arrays, name, width) for name, width in _META.items()})
    for name, meta, shape, dtype in (("st_pvec", "st_pmeta", (L,), np.uint8),
                                     ("mem_paddr", "mem_pmeta", (SL,), np.int64),
                                     ("mem_pdata", "mem_pmeta", (L,), np.uint8),
                                     ("lt_pbits", "lt_pmeta", (L,), np.uint32),
                                     ("mx_ibytes", "mx_imeta", (R, L), np.uint8),
                                     ("mx_pres", "mx_pmeta", (L,), np.uint32)):
        v[name] = _check(arrays, name, (len(v[meta]),) + shape, dtype)
    v["lk_state"] = _check(arrays, "lk_state", (4, cfg.c2c_links), np.int64)
    v["lk_imeta"], v["lk_ometa"] = _rows_of(arrays, "lk_imeta", 2), _rows_of(arrays, "lk_ometa", 3)
    v["lk_ivec"] = _check(arrays, "lk_ivec", (len(v["lk_imeta"]), L), np.uint8)
    v["lk_ovec"] = _check(arrays, "lk_ovec", (len(v["lk_ometa"]), L), np.uint8)
    return v


def _check_values(eng: Machine, v: Mapping[str, npt.NDArray[Any]]) -> None:
    """Every value the engine will index with (cycles, slices, planes, queues, links) in range."""
    cfg = eng.cfg
    nq, ns = len(cfg.queues), cfg.mem_slices
    check_range("array 'notifies'", v["notifies"], 0, LIM)
    _check_queues(eng, v["queues"], len(v["notifies"]))
    for k in _STATS:
        check_range(f"array 'stats_{k}'", v["stats_" + k], 0, LIM)
    P, S, NQ, NACC, NP = cfg.positions, cfg.streams_per_direction, nq, cfg.mxm_accumulators, cfg.mxm_planes
    _check_cols("st_pmeta", v["st_pmeta"], ("cycle", 0, LIM), ("direction", 0, 1), ("position", 0, P - 1),
                ("stream", 0, S - 1), ("writer queue", 0, NQ - 1))
    _check_cols("mem_pmeta", v["mem_pmeta"], ("cycle", 0, LIM), ("slice", 0, ns - 1))
    check_range("array 'mem_paddr' (pending write address)", v["mem_paddr"], 0, cfg.addresses_per_slice - 1)
    _check_cols("mem_banks", v["mem_banks"], ("slice", 0, ns - 1), ("bank", 0, cfg.banks_per_slice - 1))
    _check_cols("lt_pmeta", v["lt_pmeta"], ("cycle", 0, LIM), ("ALU", 0, cfg.vxm_alus_per_lane - 1))
    dts = (dt.get("int8").code, dt.get("float16").code)
    check_range("array 'mx_array_dt' (installed dtype code, -1: none)", v["mx_array_dt"], -1, -1, also=dts)
    _check_cols("mx_imeta", v["mx_imeta"], ("plane", 0, NP - 1), ("cycle", 0, LIM),
                ("dtype code", dts[0], dts[0], dts))
    _check_cols("mx_pmeta", v["mx_pmeta"], ("cycle", 0, LIM), ("plane", 0, NP - 1), ("accumulator", 0, NACC - 1),
                ("add flag", 0, 1), ("dtype code", dts[0], dts[0], dts))
    _check_cols("mx_macs_in_cycle", v["mx_macs_in_cycle"], ("cycle", 0, LIM), ("MACs", 0, LIM))
    for k in ("mx_busy_until", "mx_macs", "mx_busy"):
        check_range(f"array {k!r}", v[k], 0, LIM)
    _check_cols("sx_use", v["sx_use"], ("cycle", 0, LIM), ("hemisphere", 0, 1),
                ("resource", 0, len(isa.SXM_RESOURCES) - 1), ("units in use", 0, 2 ** 31 - 1))
    lk_state = v["lk_state"]
    check_range("array 'lk_state'[0] (link busy until)", lk_state[0], 0, LIM)
    check_range("array 'lk_state'[1] (link ready, -1: never deskewed)", lk_state[1], -1, LIM)
    check_range("array 'lk_state'[2:] (vectors sent, received)", lk_state[2:], 0, LIM)
    _check_cols("lk_imeta", v["lk_imeta"], ("link", 0, cfg.c2c_links - 1), ("arrival cycle", 0, LIM))
    _check_cols("lk_ometa", v["lk_ometa"], ("link", 0, cfg.c2c_links - 1), ("send cycle", 0, LIM),
                ("arrival cycle", 0, LIM))


def set_state(eng: Machine, scalars: Mapping[str, int], arrays: Mapping[str, npt.NDArray[Any]]) -> None:
    """Replace the engine's state (the program must already be loaded): every array and scalar is
    checked before anything changes, then each unit takes back its part."""
    try:
        v = _read_arrays(eng, arrays)
        t, cycle, last_effect = int(scalars["t"]), int(scalars["cycle"]), int(scalars["last_effect"])
        done, peak = bool(scalars["done"]), int(scalars["mx_peak"])
        _check_scalars(t, cycle, last_effect, int(scalars["done"]), peak)
        _check_values(eng, v)
    except SnapshotError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"snapshot state is incomplete or malformed: {type(e).__name__}: {e}") from None
    eng._restart()
    _restore_icu(eng, v)
    eng.t, eng.cycle, eng.last_effect, eng.done, eng.error = t, cycle, last_effect, done, None
    _restore_streams_mem_latches(eng, v)
    _restore_mxm(eng, v, peak)
    eng.sxm.use = {(c, h, isa.SXM_RESOURCES[r]): n for c, h, r, n in v["sx_use"].tolist()}
    _restore_links(eng, v)


def _restore_icu(eng: Machine, v: Mapping[str, npt.NDArray[Any]]) -> None:
    """The instruction queues, pending Notifies and per-queue / per-slice counters."""
    eng.queues = []
    for info, row in zip(eng.cfg.queues, v["queues"]):
        qs = QueueState(info, eng._lists[info.index])
        pc, nx, rep, rl, rk, rd, rs, syncs, wait, sc = (int(x) for x in row)
        qs.pc, qs.next = pc, (INF if nx < 0 else nx)
        qs.rep_ins = None if rep < 0 else qs.prog[rep]
        qs.rep_left, qs.rep_k, qs.rep_d, qs.rep_stride = rl, rk, rd, rs
        qs.syncs, qs.wait_for, qs.sync_cycle = syncs, (None if wait < 0 else wait), sc
        eng.queues.append(qs)
    eng.notifies = [int(x) for x in v["notifies"]]
    for k in _STATS:
        setattr(eng, "stats_" + k, v["stats_" + k].copy())


def _restore_streams_mem_latches(eng: Machine, v: Mapping[str, npt.NDArray[Any]]) -> None:
    """Stream registers, SRAM and the VXM's ALU latches, with their pending writes."""
    st = eng.streams
    st.data[...] = v["st_data"]
    st.valid[...] = v["st_valid"]
    st.pending = {}
    for (c, d, pos, s, w), vec in zip(v["st_pmeta"].tolist(), v["st_pvec"]):
        st.pending.setdefault(c, []).append((d, pos, s, w, vec.copy()))
    m = eng.mem
    m.sram[...] = v["sram"]
    m.pending = {}
    for (c, g), ad, vec in zip(v["mem_pmeta"].tolist(), v["mem_paddr"], v["mem_pdata"]):
        m.pending.setdefault(c, []).append((g, [int(x) for x in ad], vec.copy()))
    m.banks_written = {}
    for g, b in v["mem_banks"].tolist():
        m.banks_written.setdefault(g, set()).add(b)
    lt = eng.latches
    lt.bits[...] = v["lt_bits"]
    lt.valid[...] = v["lt_valid"]
    lt.pending = {}
    for (c, alu), b in zip(v["lt_pmeta"].tolist(), v["lt_pbits"]):
        lt.pending.setdefault(c, []).append((alu, b.copy()))


def _restore_mxm(eng: Machine, v: Mapping[str, npt.NDArray[Any]], peak: int) -> None:
    """The MXM planes' buffers, installed weights, accumulators, pending installs and products."""
    mx = eng.mxm
    for i, p in enumerate(mx.planes):
        p.buffer[...] = v["mx_buffer"][i]
        code = int(v["mx_array_dt"][i])
        p.array, p.dtype = (None, None) if code < 0 else (v["mx_array"][i].copy(), dt.get(code))
        p.acc[...] = v["mx_acc"][i]
        p.busy_until = int(v["mx_busy_until"][i])
        p.installs = []
    for (i, c, code), b in zip(v["mx_imeta"].tolist(), v["mx_ibytes"]):
        mx.planes[i].installs.append((c, b.copy(), dt.get(code)))
    mx.pending = {}
    for (c, p_, acc, add, code), r in zip(v["mx_pmeta"].tolist(), v["mx_pres"]):
        mx.pending.setdefault(c, []).append((p_, acc, add, dt.get(code), r.copy()))
    mx.macs, mx.busy = v["mx_macs"].copy(), v["mx_busy"].copy()
    mx.macs_in_cycle = {c: n for c, n in v["mx_macs_in_cycle"].tolist()}
    mx.peak = peak


def _restore_links(eng: Machine, v: Mapping[str, npt.NDArray[Any]]) -> None:
    """The C2C links' state and the vectors in flight."""
    cfg, lk, lk_state = eng.cfg, eng.links, v["lk_state"]
    lk.reset()
    lk.busy_until, lk.ready = lk_state[0].tolist(), lk_state[1].tolist()
    lk.sent, lk.received = lk_state[2].copy(), lk_state[3].copy()
    for (k, arr), vec in zip(v["lk_imeta"].tolist(), v["lk_ivec"]):
        if not 0 <= k < cfg.c2c_links:
            raise SnapshotError(f"snapshot inbox entry names link {k}")
        lk.inbox[k].append((arr, vec.copy()))
    lk.outbox = [(k, c, arr, vec.copy()) for (k, c, arr), vec in zip(v["lk_ometa"].tolist(), v["lk_ovec"])]


class Machine(Protocol):
    """The whole engine state a snapshot saves and restores: every unit's, the queues' and the
    run's (a protocol, so that this module does not import the engine that imports it)."""

    cfg: ChipConfig
    streams: StreamFile
    mem: Mem
    latches: Latches
    mxm: Mxm
    sxm: Sxm
    links: Links
    queues: List[QueueState]
    notifies: List[int]
    t: int
    cycle: int
    last_effect: int
    done: bool
    error: Optional[ScheduleError]
    _lists: List[List[Instruction]]

    def _restart(self) -> None: ...
