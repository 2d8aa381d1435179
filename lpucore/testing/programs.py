"""Random programs that are legal by construction, with their expected results.

:class:`ProgramBuilder` places *transactions* (a MEM-to-MEM copy, a VXM
operation fed from MEM and written back to MEM, a chain of two VXM operations
through an ALU latch, a constant written to MEM) on a reservation table: a
queue issues at most once per cycle, a value keeps its stream register from its
producer to its last consumer, a read never meets a write landing in its bank,
and an ALU latch is not overwritten while a chained op still needs it.  So the
generator avoids every hazard instead of filtering illegal programs away.

Every transaction reads its inputs from addresses no transaction writes, and
writes its results to addresses written exactly once, so the expected final
memory is a pure function of the inputs, computed here independently of both
engines with NumPy's own arithmetic (:mod:`lpucore.testing.model`).

The builder draws its choices from a ``Chooser`` (``integers(lo, hi)``
inclusive, ``choice(seq)``, ``boolean()``): :class:`RandomChooser` wraps
``random.Random``; ``lpucore.testing.strategies`` drives it from hypothesis.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .. import dtypes as dt
from .. import isa
from ..config import ChipConfig
from ..program import Program
from . import model


class RandomChooser:
    def __init__(self, seed=0):
        self.r = random.Random(seed)

    def integers(self, lo, hi):
        return self.r.randint(lo, hi)

    def choice(self, seq):
        return seq[self.r.randrange(len(seq))]

    def boolean(self):
        return self.r.random() < 0.5


@dataclass
class GeneratedProgram:
    """A legal program, the memory it starts from and the memory it must end with."""

    program: Program
    inputs: Dict[Tuple[int, int], np.ndarray] = field(default_factory=dict)     # (slice, addr) -> vector
    expected: Dict[Tuple[int, int], np.ndarray] = field(default_factory=dict)   # (slice, addr) -> vector
    # float results: ([(slice, addr) per byte plane], dtype name, op mnemonic)
    float_groups: List[Tuple[List[Tuple[int, int]], str, str]] = field(default_factory=list)
    description: List[str] = field(default_factory=list)

    def load_inputs(self, chip) -> None:
        for (g, a), vec in self.inputs.items():
            chip.engine.write_mem(g, a, vec[None])

    def check(self, chip) -> List[str]:
        """Differences between the chip's memory and the expected results (empty if none)."""
        return model.compare_outputs(self, chip)


class ProgramBuilder:
    """Places transactions on a reservation table and emits the program."""

    def __init__(self, cfg: ChipConfig, chooser, horizon: int = 60):
        self.cfg, self.ch, self.horizon = cfg, chooser, horizon
        self.busy: Dict[int, set] = {}                 # queue -> issue cycles
        self.events: Dict[int, List[Tuple[int, str, tuple]]] = {}
        self.diag: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}  # (stream, diagonal) -> x intervals
        self.bank_rd: Dict[Tuple[int, int], set] = {}  # (slice, cycle) -> banks read
        self.bank_wr: Dict[Tuple[int, int], set] = {}  # (slice, cycle) -> banks written
        self.latch_land: Dict[int, set] = {}           # alu -> cycles a result lands
        self.latch_hold: Dict[int, List[Tuple[int, int]]] = {}  # alu -> (from, to] latch must not change
        self.used: set = set()                         # (slice, addr) read or written
        self.sxm_use: Dict[Tuple[int, int, str], int] = {}   # (cycle, hemisphere, resource) -> units
        self.out = GeneratedProgram(Program(cfg))
        self.S = cfg.streams_per_direction
        self.P = cfg.positions
        self.mem_q = [q for q in cfg.queues if q.unit == "MEM"]
        self.vxm_q = [q for q in cfg.queues if q.unit == "VXM"]
        self.vx_x = cfg.vxm_position

    # ---- geometry helpers ---------------------------------------------------------------
    def x(self, d, pos):
        """Direction-local coordinate: values move towards larger x."""
        return pos if d == 0 else self.P - 1 - pos

    def stream(self, d, s):
        return d * self.S + s

    # ---- reservations ------------------------------------------------------------------------
    def q_free(self, q, c, resv=()):
        return c >= 0 and c not in self.busy.get(q, ()) and not any(
            r[0] == "q" and r[1] == q and r[2] == c for r in resv)

    def stream_free(self, v, k, a, b, resv=()):
        """Nothing else is written onto diagonal k of stream v between x = a and x = b."""
        ivs = list(self.diag.get((v, k), ())) + [(r[3], r[4]) for r in resv if r[0] == "s" and r[1] == v and r[2] == k]
        return all(e < a or s > b for s, e in ivs)

    def bank_ok(self, g, c, bank, write, resv=()):
        """A read and a write landing in one slice in one cycle use different banks."""
        other = self.bank_rd if write else self.bank_wr
        kind = "br" if write else "bw"
        return bank not in other.get((g, c), ()) and not any(
            r[0] == kind and r[1] == g and r[2] == c and r[3] == bank for r in resv)

    def latch_ok(self, alu, T):
        if T in self.latch_land.get(alu, ()):
            return False
        return all(not (lo < T <= hi) for lo, hi in self.latch_hold.get(alu, ()))

    def fresh_addr(self, g):
        A = self.cfg.addresses_per_slice
        for _ in range(20):
            a = self.ch.integers(0, A - 1)
            if (g, a) not in self.used:
                return a
        for a in range(A):
            if (g, a) not in self.used:
                return a
        return None

    def emit(self, q, c, mnemonic, args):
        self.busy.setdefault(q, set()).add(c)
        self.events.setdefault(q, []).append((c, mnemonic, tuple(args)))

    # ---- transactions --------------------------------------------------------------------------
    def try_copy(self, t0):
        cfg = self.cfg
        d = self.ch.integers(0, 1)
        src = self.ch.choice(self.mem_q)
        xs = self.x(d, src.position)
        dests = [q for q in self.mem_q if self.x(d, q.position) >= xs]
        dst = self.ch.choice(dests)
        xd = self.x(d, dst.position)
        gs, gd = cfg.slice_id(src.hemisphere, src.slot), cfg.slice_id(dst.hemisphere, dst.slot)
        a, b = self.fresh_addr(gs), None
        if a is None:
            return False
        self.used.add((gs, a))
        b = self.fresh_addr(gd)
        self.used.discard((gs, a))
        if b is None or (gd, b) == (gs, a):
            return False
        s = self.ch.integers(0, self.S - 1)
        v = self.stream(d, s)
        for t in range(t0, t0 + 8):
            land = t + cfg.mem_read_delay
            tw = land + (xd - xs)
            k = land - xs
            if not (self.q_free(src.index, t) and self.q_free(dst.index, tw) and (src.index != dst.index or t != tw)):
                continue
            if not self.stream_free(v, k, xs, xd):
                continue
            if not (self.bank_ok(gs, t, cfg.bank_of(a), False)
                    and self.bank_ok(gd, tw + cfg.mem_write_delay, cfg.bank_of(b), True)):
                continue
            if gs == gd and t == tw + cfg.mem_write_delay and cfg.bank_of(a) == cfg.bank_of(b):
                continue
            self.emit(src.index, t, "Read", (a, v))
            self.emit(dst.index, tw, "Write", (b, v))
            self.diag.setdefault((v, k), []).append((xs, xd))
            self.bank_rd.setdefault((gs, t), set()).add(cfg.bank_of(a))
            self.bank_wr.setdefault((gd, tw + cfg.mem_write_delay), set()).add(cfg.bank_of(b))
            self.used.update({(gs, a), (gd, b)})
            vec = np.array([self.ch.integers(0, 255) for _ in range(cfg.lanes)], dtype=np.uint8)
            self.out.inputs[(gs, a)] = vec
            self.out.expected[(gd, b)] = vec
            self.out.description.append(f"copy {cfg.slice_name(gs)}:{a} -> {cfg.slice_name(gd)}:{b} "
                                        f"via {isa.format_value('stream', v, cfg)} at {t}")
            return True
        return False

    def _operand_from_mem(self, d_type: dt.DType, tv, resv, xpos=None, dirs=(0, 1)):
        """Plan reads delivering one operand of d_type to position xpos (default: the VXM)
        at cycle tv.  On success appends their reservations to resv and returns
        (stream base, [(slice, addr)])."""
        cfg = self.cfg
        w = d_type.nbytes
        d = self.ch.choice(list(dirs))
        xpos = self.vx_x if xpos is None else xpos
        pool = [q for q in self.mem_q if self.x(d, q.position) <= self.x(d, xpos)]   # upstream slices
        if len(pool) < w:
            return None
        picked = []
        for _ in range(w):
            q = self.ch.choice(pool)
            pool.remove(q)
            picked.append(q)
        base = self.ch.integers(0, self.S // w - 1) * w
        xv = self.x(d, xpos)
        mine: List[tuple] = []
        locs = []
        for i, q in enumerate(picked):
            g = cfg.slice_id(q.hemisphere, q.slot)
            xq = self.x(d, q.position)
            t = tv - cfg.mem_read_delay - (xv - xq)
            k = t + cfg.mem_read_delay - xq
            v = self.stream(d, base + i)
            a = self.fresh_addr(g)
            both = list(resv) + mine
            if a is None or not self.q_free(q.index, t, both) or not self.stream_free(v, k, xq, xv, both) \
                    or not self.bank_ok(g, t, cfg.bank_of(a), False, both):
                self._rollback(mine)
                return None
            mine += [("q", q.index, t, "Read", (a, v)), ("s", v, k, xq, xv), ("br", g, t, cfg.bank_of(a)), ("u", g, a)]
            self.used.add((g, a))
            locs.append((g, a))
        resv.extend(mine)
        return self.stream(d, base), locs

    def _result_to_mem(self, d_type: dt.DType, T, resv, xpos=None, dirs=(0, 1)):
        """Plan writes taking a result of d_type that lands at position xpos (default: the
        VXM) in cycle T to MEM."""
        cfg = self.cfg
        w = d_type.nbytes
        d = self.ch.choice(list(dirs))
        xpos = self.vx_x if xpos is None else xpos
        pool = [q for q in self.mem_q if self.x(d, q.position) > self.x(d, xpos)]    # downstream slices
        if len(pool) < w:
            return None
        picked = []
        for _ in range(w):
            q = self.ch.choice(pool)
            pool.remove(q)
            picked.append(q)
        base = self.ch.integers(0, self.S // w - 1) * w
        xv = self.x(d, xpos)
        mine: List[tuple] = []
        locs = []
        for i, q in enumerate(picked):
            g = cfg.slice_id(q.hemisphere, q.slot)
            xq = self.x(d, q.position)
            tw = T + (xq - xv)
            v = self.stream(d, base + i)
            a = self.fresh_addr(g)
            c = tw + cfg.mem_write_delay
            both = list(resv) + mine
            if a is None or not self.q_free(q.index, tw, both) or not self.stream_free(v, T - xv, xv, xq, both) \
                    or not self.bank_ok(g, c, cfg.bank_of(a), True, both):
                self._rollback(mine)
                return None
            mine += [("q", q.index, tw, "Write", (a, v)), ("s", v, T - xv, xv, xq), ("bw", g, c, cfg.bank_of(a)),
                     ("u", g, a)]
            self.used.add((g, a))
            locs.append((g, a))
        resv.extend(mine)
        return self.stream(d, base), locs

    def _commit(self, resv):
        for r in resv:
            if r[0] == "q":
                self.emit(r[1], r[2], r[3], r[4])
            elif r[0] == "s":
                self.diag.setdefault((r[1], r[2]), []).append((r[3], r[4]))
            elif r[0] == "br":
                self.bank_rd.setdefault((r[1], r[2]), set()).add(r[3])
            elif r[0] == "bw":
                self.bank_wr.setdefault((r[1], r[2]), set()).add(r[3])

    def _rollback(self, resv):
        for r in resv:
            if r[0] == "u":
                self.used.discard((r[1], r[2]))

    def _random_operand_data(self, d_type: dt.DType, locs):
        planes = [np.array([self.ch.integers(0, 255) for _ in range(self.cfg.lanes)], dtype=np.uint8)
                  for _ in locs]
        for (g, a), p in zip(locs, planes):
            self.out.inputs[(g, a)] = p
        return model.from_planes(planes, d_type)

    def _pick_op(self, classes):
        ops = [op for op in isa.TABLE if op.unit == "VXM" and op.cls in classes]
        return self.ch.choice(ops)

    def _vxm_fields(self, op, d_type, to_type, dst, srcs, imm):
        args = []
        for f in op.fields:
            if f.name == "dtype":
                args.append(d_type.code)
            elif f.name == "to":
                args.append(to_type.code)
            elif f.kind == "dst":
                args.append(dst)
            elif f.kind == "src":
                args.append(srcs[f.name])
            else:
                args.append(imm[f.name])
        return tuple(args)

    def _draw_op(self, classes):
        op = self._pick_op(classes)
        d_type = dt.get(self.ch.choice(op.dtypes))
        to_type = dt.get(self.ch.choice([x.name for x in dt.ALL])) if op.cls == "cvt" else None
        imm = {}
        if op.cls == "requant":
            imm = {"mult": self.ch.integers(-(2 ** 31), 2 ** 31 - 1), "shift": self.ch.integers(0, 62),
                   "zp": self.ch.integers(-128, 127)}
        if op.cls == "const":
            imm = {"value": self.ch.integers(-(2 ** 31), 2 ** 31 - 1)}
        out_type = to_type if op.cls == "cvt" else (dt.INT8 if op.cls == "requant" else d_type)
        return op, d_type, to_type, out_type, imm

    def try_vxm(self, t0, chain=False):
        cfg = self.cfg
        classes = ("arith", "bits", "shift", "cmp", "unary", "trans", "select", "cvt", "requant", "const")
        op, d_type, to_type, out_type, imm = self._draw_op(classes)
        alu = self.ch.choice(self.vxm_q)
        srcs_names = [f.name for f in op.fields if f.kind == "src"]
        in_type = dt.INT32 if op.cls == "requant" else d_type
        for tv in range(t0, t0 + 6):
            resv: List[tuple] = []
            if not self.q_free(alu.index, tv):
                continue
            T = tv + op.delay(cfg)
            if not self.latch_ok(alu.slot, T):
                continue
            srcs, vals, ok = {}, {}, True
            for name in srcs_names:
                r = self._operand_from_mem(in_type, tv, resv)
                if r is None:
                    ok = False
                    break
                srcs[name], locs = r
                vals[name] = locs
            if not ok:
                self._rollback(resv)
                continue
            # second stage of a chain: a unary op on another ALU reads this ALU's latch
            stage2 = None
            if chain:
                op2 = self.ch.choice([o for o in isa.TABLE if o.unit == "VXM" and o.cls in ("unary", "bits", "trans")
                                      and sum(f.kind == "src" for f in o.fields) == 1])
                if out_type.name in op2.dtypes:
                    alu2 = self.ch.choice([q for q in self.vxm_q if q.index != alu.index] or self.vxm_q)
                    t2 = T + self.ch.integers(0, 2)
                    T2 = t2 + op2.delay(cfg)
                    if self.q_free(alu2.index, t2, resv) and self.latch_ok(alu2.slot, T2) and alu2.index != alu.index \
                            and all(not (T < x <= t2) for x in self.latch_land.get(alu.slot, ())):
                        r = self._result_to_mem(out_type, T2, resv)
                        if r is not None:
                            stage2 = (op2, alu2, t2, T2, r)
            if stage2 is None:
                r = self._result_to_mem(out_type, T, resv)
                if r is None:
                    self._rollback(resv)
                    continue
                dst, out_locs = r
            else:
                dst = isa.NONE
            # all reservations hold: commit
            self._commit(resv)
            operands = {n: self._random_operand_data(in_type, vals[n]) for n in srcs_names}
            self.emit(alu.index, tv, op.mnemonic, self._vxm_fields(op, d_type, to_type, dst, srcs, imm))
            self.latch_land.setdefault(alu.slot, set()).add(T)
            res = model.vxm(op, d_type, to_type, operands, imm, cfg.lanes)
            desc = f"{op.mnemonic} {d_type.name} on VXM.{alu.slot} at {tv}"
            final_op, final_type = op, out_type
            if stage2 is not None:
                op2, alu2, t2, T2, (dst2, out_locs) = stage2
                self.latch_hold.setdefault(alu.slot, []).append((T, t2))
                self.emit(alu2.index, t2, op2.mnemonic,
                          self._vxm_fields(op2, out_type, None, dst2, {"a": isa.LATCH_BASE + alu.slot}, {}))
                self.latch_land.setdefault(alu2.slot, set()).add(T2)
                res = model.vxm(op2, out_type, None, {"a": res}, {}, cfg.lanes)
                desc += f" -> {op2.mnemonic} on VXM.{alu2.slot} at {t2} (latch A{alu.slot})"
                final_op = op2
            for (g, a), plane in zip(out_locs, model.to_planes(res, final_type)):
                self.out.expected[(g, a)] = plane
            if final_type.is_float and final_op.cls not in ("bits", "select", "const"):
                self.out.float_groups.append((list(out_locs), final_type.name, final_op.mnemonic))
            self.out.description.append(desc)
            return True
        return False

    def try_sxm(self, t0):
        """A Shift, Permute, Distribute or Select on an SXM, fed from MEM and written back."""
        cfg = self.cfg
        op = self.ch.choice([o for o in isa.TABLE if o.unit == "SXM" and o.mnemonic in
                             ("Shift", "Permute", "Distribute", "Select")])
        hem = self.ch.integers(0, 1)
        sq = self.ch.choice([q for q in cfg.queues if q.unit == "SXM" and q.hemisphere == hem])
        xs = sq.position
        inward = 1 if hem == 0 else 0         # MEM values reach the West SXM flowing west
        n_res = getattr(cfg, "sxm_" + op.resource)
        for tv in range(t0, t0 + 6):
            resv: List[tuple] = []
            if not self.q_free(sq.index, tv) or self.sxm_use.get((tv, hem, op.resource), 0) >= n_res:
                continue
            T = tv + cfg.sxm_delay
            names = {"Shift": ["src"], "Permute": ["src", "map"], "Distribute": ["src", "map"],
                     "Select": ["a", "b", "m"]}[op.mnemonic]
            srcs, vals, ok = {}, {}, True
            for name in names:
                d_in = dt.INT16 if (op.mnemonic == "Permute" and name == "map") else dt.INT8
                r = self._operand_from_mem(d_in, tv, resv, xpos=xs, dirs=(inward,))
                if r is None:
                    ok = False
                    break
                srcs[name], vals[name] = r
            if not ok:
                self._rollback(resv)
                continue
            r = self._result_to_mem(dt.INT8, T, resv, xpos=xs, dirs=(1 - inward,))
            if r is None:
                self._rollback(resv)
                continue
            dst, out_locs = r
            self._commit(resv)
            L = cfg.lanes
            data = {}
            for name in names:
                if op.mnemonic == "Permute" and name == "map":
                    # mostly valid lane numbers, a few out of range
                    m = np.array([self.ch.integers(-2, L + 1) for _ in range(L)], dtype=np.int16)
                    planes = model.to_planes(m, dt.INT16)
                    for (g, a), p_ in zip(vals[name], planes):
                        self.out.inputs[(g, a)] = p_
                    data[name] = m
                elif op.mnemonic == "Distribute" and name == "map":
                    m = np.array([self.ch.integers(0, cfg.lanes_per_superlane + 1) for _ in range(L)], dtype=np.uint8)
                    self.out.inputs[vals[name][0]] = m
                    data[name] = m
                else:
                    data[name] = self._random_operand_data(dt.INT8, vals[name]).view(np.uint8)
            imm = {}
            if op.mnemonic == "Shift":
                imm["n"] = self.ch.integers(-(L - 1), L - 1)
            args = []
            for f in op.fields:
                if f.name == "dst":
                    args.append(dst)
                elif f.name in srcs:
                    args.append(srcs[f.name])
                else:
                    args.append(imm[f.name])
            self.emit(sq.index, tv, op.mnemonic, tuple(args))
            self.sxm_use[(tv, hem, op.resource)] = self.sxm_use.get((tv, hem, op.resource), 0) + 1
            self.out.expected[out_locs[0]] = model.sxm(op.mnemonic, data, imm, cfg)
            self.out.description.append(f"{op.mnemonic} on {sq.name} at {tv}")
            return True
        return False

    # ---- emission ----------------------------------------------------------------------------------
    def build(self, n_transactions: int, sync: bool = False) -> GeneratedProgram:
        for _ in range(n_transactions):
            kind = self.ch.integers(0, 4)
            t0 = self.ch.integers(0, self.horizon)
            if kind == 0:
                self.try_copy(t0)
            elif kind == 4:
                self.try_sxm(t0)
            else:
                self.try_vxm(t0, chain=(kind == 3))
        self._emit_program(sync)
        return self.out

    def _emit_program(self, sync):
        cfg, prog = self.cfg, self.out.program
        base = 0
        used = sorted(self.events)
        if sync and used:
            base = cfg.notify_delay
            notifier = used[0]
            for q in used:
                prog.add(cfg.queues[q].name, "Notify" if q == notifier else "Sync")
        for q in used:
            name = cfg.queues[q].name
            evs = sorted(self.events[q])
            # next free issue cycle: after Notify, or when the Sync releases the queue
            t = (1 if q == used[0] else base) if (sync and used) else 0
            i = 0
            while i < len(evs):
                c, mn, args = evs[i]
                c += base
                # fold a run of equally spaced copies differing only in address into Repeat
                j = i + 1
                run_d = run_s = None
                op = isa.lookup(mn, cfg.queues[q].unit)
                if op.unit == "MEM" and mn in ("Read", "Write"):
                    while j < len(evs) and evs[j][1] == mn and evs[j][2][1] == args[1]:
                        dd = evs[j][0] - evs[j - 1][0]
                        ds = evs[j][2][0] - evs[j - 1][2][0]
                        if run_d is None:
                            run_d, run_s = dd, ds
                        if dd != run_d or ds != run_s or abs(ds) >= cfg.addresses_per_slice:
                            break
                        j += 1
                if c > t:
                    prog.add(name, "NOP", c - t)
                prog.add(name, mn, *args)
                if j - i > 1:
                    prog.add(name, "Repeat", j - i - 1, run_d, run_s)
                    t = evs[j - 1][0] + base + 1
                else:
                    t = c + 1
                i = j


def generate(cfg: Optional[ChipConfig] = None, seed: int = 0, n_transactions: int = 12,
             sync: bool = False, horizon: int = 60) -> GeneratedProgram:
    """One legal program from a seed (no hypothesis needed)."""
    cfg = cfg or ChipConfig.tiny()
    return ProgramBuilder(cfg, RandomChooser(seed), horizon).build(n_transactions, sync)


class _BusyBuilder:
    """The state busy_program's steps share: the chip, the random source, the program and stream menus."""

    def __init__(self, cfg: ChipConfig, r: random.Random, p: Program):
        self.cfg, self.r, self.p = cfg, r, p
        S = self.S = cfg.streams_per_direction
        self.A = cfg.addresses_per_slice
        self.good = {"W": {1: [0, 1, S, S + 1, S + 4, S + 5, S + 6, S + 7], 2: [0, S, S + 4, S + 6], 4: [S + 4]},
                     "E": {1: [0, 1, 4, 5, 6, 7, S, S + 1], 2: [0, 4, 6, S], 4: [4]},
                     "V": {1: [0, 1, 4, 5, 6, 7, S, S + 1, S + 4, S + 5, S + 6, S + 7], 2: [0, 4, 6, S, S + 4, S + 6],
                           4: [4, S + 4]}}
        self.free = {1: [2, 3, S + 2, S + 3], 2: [2, S + 2], 4: [0, S]}
        self.vx_ops = [op for op in isa.TABLE if op.unit == "VXM"]
        self.sx_ops = [op for op in isa.TABLE if op.unit == "SXM"]
        self.c2c_ops = [op for op in isa.TABLE if op.unit == "C2C"]
        self.warm = cfg.mem_read_delay + max(cfg.hops) + cfg.sxm_hops + cfg.mxm_hops + 3
        # MXM and SXM consumers sit beyond the MEM slices: East units read eastward streams
        # from the East side and vice versa
        self.good["MXW"] = {1: [S, S + 1, S + 4, S + 5, S + 6, S + 7], 2: [S, S + 4, S + 6], 4: [S + 4]}
        self.good["MXE"] = {1: [0, 1, 4, 5, 6, 7], 2: [0, 4, 6], 4: [4]}
        self.plane_dt: Dict[int, str] = {}

    def stream(self, side, w=1, dst=False):
        """A stream for a width-w operand: mostly a busy one (sources) or a free one (destinations)."""
        r, S = self.r, self.S
        if r.random() < 0.97:
            return r.choice(self.free[w] if dst else self.good[side][w])
        return r.randrange(2) * S + r.randrange(S // w) * w

    def src(self, side, w):
        """A VXM source operand: sometimes an ALU latch, otherwise a stream."""
        r = self.r
        if r.random() < 0.15:
            return isa.LATCH_BASE + r.randrange(self.cfg.vxm_alus_per_lane)
        return self.stream(side, w)

    def background(self, T):
        """The background producers: outer MEM slices and ALUs 0 and 1 streaming for T cycles."""
        r, p, A = self.r, self.p, self.A
        n = self.cfg.mem_slices_per_hemisphere
        out_w, out_e = [n - 1, n - 2], [n - 1, n - 2]
        for i, slot in enumerate(out_w):
            p.add(f"MEM.W{slot}", "Read", 0, f"E{i}")
            p.add(f"MEM.W{slot}", "Repeat", min(T, A - 1), 1, i % 2)
        for i, slot in enumerate(out_e):
            p.add(f"MEM.E{slot}", "Read", 5 % A, f"W{i}")
            p.add(f"MEM.E{slot}", "Repeat", T, 1, 0)
        p.add("VXM.0", "const", "int32", "E4", r.randrange(-2 ** 31, 2 ** 31))
        p.add("VXM.0", "Repeat", T, 1, 0)
        p.add("VXM.1", "const", "int32", "W4", r.randrange(-2 ** 31, 2 ** 31))
        p.add("VXM.1", "Repeat", T, 1, 0)

    def early_weights(self):
        """Give most MXM weight planes weights early (LW, IW), so that ABCs often find them."""
        r, p, cfg = self.r, self.p, self.cfg
        for q in cfg.queues:
            if q.unit != "MXM" or q.role != "LW" or r.random() < 0.2:
                continue
            side = "MXW" if q.hemisphere == 0 else "MXE"
            self.plane_dt[q.slot] = r.choice(["int8", "float16"])
            p.add(q.name, "NOP", self.warm)
            p.add(q.name, "LW", r.choice(self.good[side][1]), 1, r.randrange(cfg.mxm_size))
            p.add(q.name, "IW", self.plane_dt[q.slot])

    def fill_queue(self, q):
        """Fill queue q: a warm-up NOP, then one to four random instructions."""
        r = self.r
        late = self.cfg.mxm_install_delay + 4 if q.unit == "MXM" else 0
        self.p.add(q.name, "NOP", r.randrange(self.warm + late, self.warm + late + 5))
        side = "V" if q.unit == "VXM" else "WE"[q.hemisphere]
        if q.unit in ("MXM", "SXM"):
            side = "MXW" if q.hemisphere == 0 else "MXE"
        for _ in range(r.randrange(1, 5)):
            self.instruction(q, side)

    def instruction(self, q, side):
        """One random instruction (or NOP, Sync, Notify) for queue q."""
        r = self.r
        if r.random() < 0.25:
            self.p.add(q.name, "NOP", r.randrange(1, 5))
        elif r.random() < 0.03:
            self.p.add(q.name, r.choice(["Sync", "Notify"]))
        elif q.unit == "MEM":
            self.mem(q, side)
        elif q.unit == "MXM":
            self.mxm(q, side)
        elif q.unit == "SXM" and r.random() < 0.2:
            self.c2c(q, side)
        elif q.unit == "SXM":
            self.sxm(q, side)
        else:
            self.vxm(q, side)

    def mem(self, q, side):
        """A MEM Read, Write, Gather or Scatter, Reads and Writes sometimes repeated."""
        r, p, A, stream = self.r, self.p, self.A, self.stream
        k = r.random()
        if k < 0.45:
            ins = p.add(q.name, "Read", r.randrange(A), stream(side, dst=True))
        elif k < 0.85:
            ins = p.add(q.name, "Write", r.randrange(A), stream(side))
        elif k < 0.93:
            ins = p.add(q.name, "Gather", stream(side, dst=True), stream(side, 2))
        else:
            ins = p.add(q.name, "Scatter", stream(side), stream(side, 2))
        if r.random() < 0.4 and ins.op.mnemonic in ("Read", "Write"):
            reps, st = r.randrange(1, 6), r.choice([0, 1, -1])
            if 0 <= ins.args[0] + reps * st < A:
                p.add(q.name, "Repeat", reps, r.randrange(1, 3), st)

    def mxm(self, q, side):
        """An MXM instruction for q's role: LW or IW, ABC (sometimes repeated) or ACC."""
        r, p, cfg, good, S = self.r, self.p, self.cfg, self.good, self.S
        mdt = self.plane_dt.get(q.slot) if r.random() < 0.9 else None
        mdt = mdt or r.choice(["int8", "float16"])
        if q.role == "LW":
            if r.random() < 0.3:
                p.add(q.name, "IW", mdt)
            else:
                n_lw = r.randrange(1, min(cfg.mxm_lw_streams, 4) + 1)
                base = r.choice(good[side][1]) if n_lw == 1 else r.choice(good[side][2] + good[side][4])
                base = min(base, (base // S) * S + S - n_lw)
                p.add(q.name, "LW", base, n_lw, r.randrange(cfg.mxm_size - n_lw + 1))
        elif q.role == "ABC":
            acc = r.randrange(cfg.mxm_accumulators)
            p.add(q.name, "ABC", mdt, self.stream(side, 2 if mdt == "float16" else 1), acc, r.randrange(2))
            if r.random() < 0.3:
                p.add(q.name, "Repeat", r.randrange(1, 4), r.randrange(1, 3),
                      r.choice([0, 1]) if acc + 4 < cfg.mxm_accumulators else 0)
        else:
            p.add(q.name, "ACC", r.randrange(cfg.mxm_accumulators), self.stream(side, 4, dst=True))

    def c2c(self, q, side):
        """A C2C instruction on an SXM queue: Deskew, and maybe a Send or Receive."""
        # sends land in the outbox (compared); receives find nothing unless the
        # test delivers, so they mostly end the run with the same link-empty error
        r, p, cfg = self.r, self.p, self.cfg
        op = r.choice(self.c2c_ops)
        link = r.randrange(cfg.c2c_links)
        if op.mnemonic == "Deskew" or r.random() < 0.7:
            p.add(q.name, "Deskew", link)
            if r.random() < 0.8:
                p.add(q.name, "NOP", cfg.c2c_deskew_delay + r.randrange(-1, 2))
        if op.mnemonic != "Deskew":
            p.add(q.name, op.mnemonic, link, self.stream(side, dst=op.mnemonic == "Receive"))
            if r.random() < 0.3:
                p.add(q.name, "Repeat", r.randrange(1, 4), r.randrange(1, 4), 0)

    def sxm(self, q, side):
        """An SXM instruction (a Rotate or Transpose too wide for the streams is dropped)."""
        r, cfg, S, stream = self.r, self.cfg, self.S, self.stream
        op = r.choice(self.sx_ops)
        a = {"dst": stream(side, dst=True), "src": stream(side), "a": stream(side), "b": stream(side),
             "m": stream(side), "map": stream(side, 2 if op.mnemonic == "Permute" else 1),
             "n": r.randrange(-cfg.lanes + 1, cfg.lanes) if op.mnemonic == "Shift" else r.choice([3, 4])}
        if op.mnemonic in ("Rotate", "Transpose"):
            width = a["n"] if op.mnemonic == "Rotate" else cfg.lanes_per_superlane
            wout = a["n"] ** 2 if op.mnemonic == "Rotate" else width
            if wout > S or width > S:
                return
            a["src"] = r.randrange(2) * S + r.randrange(S - width + 1)
            if op.mnemonic == "Rotate" and r.random() < 0.8:
                a["src"] = self.good[side][4][0]
            a["dst"] = r.randrange(2) * S + r.randrange(S - wout + 1)
        self.p.add(q.name, op.mnemonic, *[a[f.name] for f in op.fields])

    def vxm(self, q, side):
        """A random VXM instruction, sometimes repeated."""
        r = self.r
        op = r.choice(self.vx_ops)
        d = dt.get(r.choice(op.dtypes))
        to = dt.get(r.choice([x.name for x in dt.ALL]))
        self.p.add(q.name, op.mnemonic, *self.vxm_args(op, d, to, side))
        if r.random() < 0.2:
            self.p.add(q.name, "Repeat", r.randrange(1, 4), r.randrange(1, 3), 0)

    def vxm_args(self, op, d, to, side):
        """Random operands for VXM op with dtypes d (and to), in field order."""
        r = self.r
        args = []
        for f in op.fields:
            if f.kind == "dtype":
                args.append(d.code if f.name == "dtype" else to.code)
            elif f.kind == "src":
                args.append(self.src(side, 4 if op.cls == "requant" else d.nbytes))
            elif f.kind == "dst":
                w = to.nbytes if op.cls == "cvt" else (1 if op.cls == "requant" else d.nbytes)
                args.append(isa.NONE if r.random() < 0.2 else self.stream(side, w, dst=True))
            elif f.kind == "imm":
                args.append(r.randrange(-2 ** 31, 2 ** 31))
            elif f.kind == "shift":
                args.append(r.randrange(0, 40))
            else:
                args.append(r.randrange(-128, 128))
        return args


def busy_program(cfg: Optional[ChipConfig] = None, seed: int = 0, length: Optional[int] = None) -> Program:
    """A random program that keeps streams full for a while, so that most reads find
    values and runs last long enough to reuse every ring in the fast engine, but whose
    random extra instructions may still break any rule (conflicts, empty reads, bank
    conflicts, bad gather addresses, deadlocks).  For comparing engines, errors included.

    Background producers: the outermost West slices stream onto E0/E1 and the outermost
    East slices onto W0/W1 every cycle; ALU 0 and 1 put constants on E4..E7 and W4..W7.
    Needs >= 3 MEM slices per hemisphere, >= 8 streams per direction and >= 3 ALUs.
    """
    cfg = cfg or ChipConfig.tiny()
    if cfg.mem_slices_per_hemisphere < 3 or cfg.streams_per_direction < 8 or cfg.vxm_alus_per_lane < 3:
        raise ValueError("busy_program needs >= 3 MEM slices per hemisphere, >= 8 streams and >= 3 ALUs")
    r = random.Random(seed)
    T = length or r.randrange(20, 60)
    b = _BusyBuilder(cfg, r, Program(cfg))
    b.background(T)
    b.early_weights()
    for q in cfg.queues:
        if q.name in b.p.queues or r.random() < 0.1:
            continue
        b.fill_queue(q)
    return b.p
