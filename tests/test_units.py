"""One test (or more) per instruction, with exact cycle timing, on both engines.

Tiny geometry (ChipConfig.tiny()): stream positions W2,W3 = 2; W0,W1 = 3; VXM = 4;
E0,E1 = 5; E2,E3 = 6.  Delays: MEM read 2, MEM write 2, VXM ALU 2, conversions 2,
transcendental 4, Notify 4; stagger 2.
"""

import dataclasses

import numpy as np
import pytest

from lpucore import Chip, ChipConfig, ScheduleError, assemble, isa
from lpucore import dtypes as dt
from lpucore.testing import model

CFG = ChipConfig.tiny()
L = CFG.lanes
RNG = np.random.default_rng(7)


def vec(seed):
    return np.random.default_rng(seed).integers(0, 256, L, dtype=np.uint8)


def make_chip(engine, text, cfg=CFG, mem=()):
    chip = Chip(cfg, engine=engine)
    chip.load(assemble(".config json:" + cfg.to_json() + "\n" + text if cfg != CFG else ".config tiny\n" + text))
    for (s, a), v in dict(mem).items():
        chip.write_mem(s[0], int(s[1:]), a, v)
    return chip


def timed(events):
    """Assembly text from {queue: [(cycle, instruction text), ...]}, NOPs filled in."""
    lines = []
    for q, evs in events.items():
        t = 0
        for c, ins in sorted(evs):
            assert c >= t, (q, c, t)
            if c > t:
                lines.append(f"{q}: NOP {c - t}")
            lines.append(f"{q}: {ins}")
            t = c + 1
    return "\n".join(lines)


def run(engine, text, cfg=CFG, mem=()):
    chip = make_chip(engine, text, cfg, mem)
    stats = chip.run()
    return chip, stats


def schedule_error(engine, text, cfg=CFG, mem=()):
    chip = make_chip(engine, text, cfg, mem)
    with pytest.raises(ScheduleError) as e:
        chip.run()
    return e.value


# ---- MEM and streams -----------------------------------------------------------------------------
def test_read_travels_one_hop_per_cycle(engine):
    x = vec(1)
    text = "MEM.W2: Read 5, E0\nMEM.E0: NOP 5\nMEM.E0: Write 9, E0"
    chip, st = run(engine, text, mem={("W2", 5): x})
    assert np.array_equal(chip.read_mem("E", 0, 9)[0], x)
    # last effect: the bank write at 5 + 2 = 7; + stagger 2
    assert st.cycles == 9 and st.finished
    assert st.issued == {"MEM.W2": 1, "MEM.E0": 1} and st.icu_instructions == {"MEM.E0": 1}
    assert st.mem_bytes_read == {"W2": L} and st.mem_bytes_written == {"E0": L}


@pytest.mark.parametrize("when", [4, 6])
def test_a_consumer_off_by_one_cycle_reads_nothing(engine, when):
    e = schedule_error(engine, f"MEM.W2: Read 5, E0\nMEM.E0: NOP {when}\nMEM.E0: Write 9, E0")
    assert (e.kind, e.cycle, e.unit, e.stream) == ("empty-read", when, "MEM.E0", "E0")


def test_westward_streams_and_same_position(engine):
    x, y = vec(2), vec(3)
    text = """
MEM.E2: Read 1, W3          ; position 6 -> W0/W1 at position 3 three hops later
MEM.W0: NOP 5
MEM.W0: Write 2, W3
MEM.W0: Read 7, E1          ; cycle 6: lands at position 3 at cycle 8
MEM.W1: NOP 8
MEM.W1: Write 4, E1         ; same position: read where it lands
"""
    chip, _ = run(engine, text, mem={("E2", 1): x, ("W0", 7): y})
    assert np.array_equal(chip.read_mem("W", 0, 2)[0], x)
    assert np.array_equal(chip.read_mem("W", 1, 4)[0], y)


def test_a_value_lives_until_overwritten(engine):
    a, b = vec(4), vec(5)
    text = """
MEM.W2: Read 0, E0          ; a: (pos 2, cycle 2), (3, 3), (4, 4), (5, 5) ...
MEM.W0: NOP 1
MEM.W0: Read 0, E0          ; b lands at (3, 3): a is overwritten from position 3 on
MEM.W3: NOP 2
MEM.W3: Write 1, E0         ; position 2, cycle 2: still a
MEM.E1: NOP 5
MEM.E1: Write 1, E0         ; position 5, cycle 5: b
"""
    chip, _ = run(engine, text, mem={("W2", 0): a, ("W0", 0): b})
    assert np.array_equal(chip.read_mem("W", 3, 1)[0], a)
    assert np.array_equal(chip.read_mem("E", 1, 1)[0], b)


def test_two_producers_one_register_one_cycle(engine):
    e = schedule_error(engine, "MEM.W0: Read 0, E3\nMEM.W1: Read 1, E3")
    assert (e.kind, e.cycle, e.unit, e.stream) == ("stream-conflict", 2, "MEM.W1", "E3")
    assert "MEM.W0 and MEM.W1" in str(e)


@pytest.mark.parametrize("select,read_addr,conflict", [("msb", 1, True), ("msb", 40, False),
                                                        ("lsb", 2, True), ("lsb", 3, False)])
def test_bank_conflict(engine, select, read_addr, conflict):
    cfg = dataclasses.replace(CFG, bank_select=select)
    text = f"""
MEM.W2: Read 0, E0
MEM.W0: NOP 3
MEM.W0: Write 0, E0          ; samples E0 at cycle 3, writes bank(0) at cycle 5
MEM.W0: NOP 1
MEM.W0: Read {read_addr}, E5 ; cycle 5
"""
    if conflict:
        e = schedule_error(engine, text, cfg)
        assert (e.kind, e.cycle, e.unit, e.bank) == ("bank-conflict", 5, "MEM.W0", 0)
    else:
        run(engine, text, cfg)


def test_write_is_visible_after_its_delay(engine):
    x, old = vec(8), vec(9)
    text = """
MEM.W2: Read 0, E0
MEM.W0: NOP 3
MEM.W0: Write 40, E0         ; bank write at cycle 5
MEM.W0: Read 40, E1          ; cycle 4: old contents
MEM.W0: Read 40, E2          ; cycle 5 would conflict (same bank), so cycle 6 ...
"""
    e = schedule_error(engine, text, mem={("W2", 0): x, ("W0", 40): old})
    assert e.kind == "bank-conflict" and e.cycle == 5
    text = """
MEM.W2: Read 0, E0
MEM.W0: NOP 3
MEM.W0: Write 40, E0
MEM.W0: Read 40, E1          ; cycle 4: before the write lands
MEM.W0: NOP 1
MEM.W0: Read 40, E2          ; cycle 6: after
MEM.E0: NOP 8
MEM.E0: Write 1, E1          ; the cycle-4 read arrives at cycle 4 + 2 + 2
MEM.E0: NOP 1
MEM.E0: Write 2, E2          ; the cycle-6 read at 10
"""
    chip, _ = run(engine, text, mem={("W2", 0): x, ("W0", 40): old})
    assert np.array_equal(chip.read_mem("E", 0, 1)[0], old)
    assert np.array_equal(chip.read_mem("E", 0, 2)[0], x)


def _map_planes(addresses):
    lo = np.zeros(L, np.uint8)
    hi = np.zeros(L, np.uint8)
    for k, a in enumerate(addresses):
        lo[k * CFG.lanes_per_superlane] = a & 0xFF
        hi[k * CFG.lanes_per_superlane] = (a >> 8) & 0xFF
    return lo, hi


def test_gather_and_scatter(engine):
    lo, hi = _map_planes([3, 60])
    rows = {("W0", a): vec(100 + a) for a in (3, 60)}
    text = """
MEM.W2: Read 0, E0            ; map low bytes
MEM.W3: Read 0, E1            ; map high bytes
MEM.W0: NOP 3
MEM.W0: Gather E2, E0         ; superlane 0 from address 3, superlane 1 from 60
MEM.E0: NOP 7
MEM.E0: Write 5, E2
MEM.E1: NOP 5
MEM.E1: Scatter E1, E0        ; map (low, high) = E0, E1 pass position 5 at cycle 5
"""
    chip, st = run(engine, text, mem={("W2", 0): lo, ("W3", 0): hi, **rows})
    got = chip.read_mem("E", 0, 5)[0]
    n = CFG.lanes_per_superlane
    assert np.array_equal(got[:n], rows[("W0", 3)][:n]) and np.array_equal(got[n:], rows[("W0", 60)][n:])
    # Scatter wrote the map's own high-byte plane: superlane 0 to address 3, superlane 1 to 60
    assert np.array_equal(chip.read_mem("E", 1, 3)[0][:n], hi[:n])
    assert np.array_equal(chip.read_mem("E", 1, 60)[0][n:], hi[n:])
    assert st.mem_bytes_read["W0"] == L and st.mem_bytes_written["E1"] == L


def test_gather_address_out_of_range(engine):
    lo, hi = _map_planes([3, 64])
    text = "MEM.W2: Read 0, E0\nMEM.W3: Read 0, E1\nMEM.W0: NOP 3\nMEM.W0: Gather E2, E0"
    e = schedule_error(engine, text, mem={("W2", 0): lo, ("W3", 0): hi})
    assert (e.kind, e.cycle, e.unit) == ("address", 3, "MEM.W0") and "superlane 1 address 64" in str(e)


# ---- ICU ---------------------------------------------------------------------------------------------
def test_repeat_with_stride(engine):
    xs = {("W0", a): vec(20 + a) for a in range(10, 14)}
    text = """
MEM.W0: Read 10, E0
MEM.W0: Repeat 3, 1, 1        ; addresses 10..13 at cycles 0..3
MEM.E0: NOP 4
MEM.E0: Write 30, E0          ; arrives at position 5 two hops and two cycles later
MEM.E0: Repeat 3, 1, -1       ; addresses 30, 29, 28, 27
"""
    chip, st = run(engine, text, mem=xs)
    for i in range(4):
        assert np.array_equal(chip.read_mem("E", 0, 30 - i)[0], xs[("W0", 10 + i)])
    assert st.issued == {"MEM.W0": 4, "MEM.E0": 4}
    assert st.cycles == 7 + 2 + 2        # last write issued at 7, lands at 9, + stagger


def test_repeat_spacing_and_following_instruction(engine):
    text = """
MEM.W0: Read 0, E0
MEM.W0: Repeat 2, 3, 0        ; cycles 0, 3, 6
MEM.W0: Read 1, E1            ; cycle 7
MEM.E0: NOP 4
MEM.E0: Write 0, E0
MEM.E0: Repeat 2, 3, 1        ; cycles 4, 7, 10: two hops and two cycles after each read
MEM.E0: Write 9, E1           ; cycle 11
"""
    chip, st = run(engine, text, mem={("W0", 1): vec(31)})
    assert np.array_equal(chip.read_mem("E", 0, 9)[0], vec(31))


def test_sync_notify(engine):
    x = vec(40)
    text = """
MEM.W0: Sync
MEM.W0: Read 0, E0            ; released at Notify (cycle 6) + 4 = 10
MEM.E0: Sync
MEM.E0: NOP 2
MEM.E0: Write 0, E0           ; 10 + 2: arrives from position 3 at 10 + 2 + 2 = 14
VXM.0: NOP 6
VXM.0: Notify
"""
    chip = make_chip(engine, text, mem={("W0", 0): x})
    with pytest.raises(ScheduleError) as e:
        chip.run()
    assert (e.value.kind, e.value.cycle) == ("empty-read", 12)
    text = text.replace("NOP 2\nMEM.E0: Write", "NOP 4\nMEM.E0: Write")
    chip, st = run(engine, text, mem={("W0", 0): x})
    assert np.array_equal(chip.read_mem("E", 0, 0)[0], x)
    assert st.cycles == 14 + 2 + 2


def test_sync_after_notify_passes(engine):
    text = "VXM.0: Notify\nVXM.1: NOP 9\nVXM.1: Sync\nVXM.1: const int8, -, 1"
    chip, st = run(engine, text)
    # second queue's Sync (cycle 9) finds Notify 1 already issued: continues at max(10, 0 + 4)
    assert st.cycles == 10 + 2 + 2


def test_deadlock(engine):
    e = schedule_error(engine, "MEM.W0: NOP 3\nMEM.W0: Sync\nMEM.W0: Read 0, E0\nVXM.1: Sync")
    assert (e.kind, e.cycle, e.unit) == ("deadlock", 3, "MEM.W0")


def test_nop_prefix_shifts_by_n(engine):
    text = "MEM.W2: Read 5, E0\nMEM.E0: NOP 5\nMEM.E0: Write 9, E0"
    _, st = run(engine, text)
    shifted = "MEM.W2: NOP 1000\nMEM.W2: Read 5, E0\nMEM.E0: NOP 1000\nMEM.E0: NOP 5\nMEM.E0: Write 9, E0"
    _, st2 = run(engine, shifted)
    assert st2.cycles == st.cycles + 1000


def test_empty_program(engine):
    chip, st = run(engine, "")
    assert st.cycles == 0 and st.finished and st.instructions == 0


def test_idle_cycles_are_skipped(engine):
    _, st = run(engine, "VXM.0: NOP 1000000000\nVXM.0: const int8, -, 1")
    assert st.cycles == 1_000_000_000 + 2 + 2


# ---- VXM ----------------------------------------------------------------------------------------------
VX_CASES = [(op.mnemonic, d, to) for op in isa.TABLE if op.unit == "VXM" for d in op.dtypes
            for to in ([x.name for x in dt.ALL] if op.cls == "cvt" else [None])]

SPECIAL = {"float16": [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 6e-08, 1.0, -2.5, 0.5],
           "float32": [0.0, -0.0, np.inf, -np.inf, np.nan, 3e38, 1e-45, 1.0, -2.5, 0.5]}


def operand_values(d: dt.DType, seed):
    r = np.random.default_rng(seed)
    raw = r.integers(0, 256, (L, d.nbytes), dtype=np.uint8)
    vals = raw.view(d.numpy.newbyteorder("<")).reshape(L).astype(d.numpy)
    if d.is_float:
        vals[: len(SPECIAL[d.name])] = SPECIAL[d.name]
        vals[-4:] = r.normal(0, 3, 4)
    elif d.bits > 8:
        vals[:4] = [0, -1, np.iinfo(d.numpy).min, np.iinfo(d.numpy).max]
    return vals


@pytest.mark.parametrize("mn,dname,to", VX_CASES, ids=[f"{m}-{d}-{t}" if t else f"{m}-{d}" for m, d, t in VX_CASES])
def test_vxm_op_against_numpy(engine, mn, dname, to):
    """Operand a streams in from the West slices (eastward streams), b from the East
    slices (westward), the mask of select through a const in ALU latch A3; the result
    goes out on eastward streams E4.. to the East slices."""
    op = isa.lookup(mn, "VXM")
    d = dt.get(dname)
    to_d = dt.get(to) if to else None
    in_d = dt.INT32 if op.cls == "requant" else d
    out_d = to_d if op.cls == "cvt" else (dt.INT8 if op.cls == "requant" else d)
    tv = 12
    ev, mem = {}, {}
    srcs = {f.name for f in op.fields if f.kind == "src"}
    operands = {}
    if "a" in srcs:
        operands["a"] = operand_values(in_d, 1)
        for i, plane in enumerate(model.to_planes(operands["a"], in_d)):
            q = CFG.queues[i]                                  # W0..W3, eastward streams
            ev.setdefault(q.name, []).append((tv - 2 - (CFG.vxm_position - q.position), f"Read 0, E{i}"))
            mem[(f"W{i}", 0)] = plane
    if "b" in srcs:
        operands["b"] = operand_values(in_d, 2)
        for i, plane in enumerate(model.to_planes(operands["b"], in_d)):
            q = CFG.queues[4 + i]                              # E0..E3, westward streams
            ev.setdefault(q.name, []).append((tv - 2 - (q.position - CFG.vxm_position), f"Read 0, W{i}"))
            mem[(f"E{i}", 0)] = plane
    src_text = {"a": "E0", "b": "W0", "m": "A3"}
    if "m" in srcs:
        # the mask: latch A3 holds 1 in every lane, so select takes a
        ev["VXM.3"] = [(0, f"const {d.name}, -, 1")]
        operands["m"] = np.full(L, 1, dtype={1: np.uint8, 2: np.uint16, 4: np.uint32}[d.nbytes]).view(d.numpy)
    imm = {}
    if op.cls == "requant":
        imm = {"mult": 1_518_500_250, "shift": 37, "zp": -3}
    if op.cls == "const":
        imm = {"value": -123456789}
    args = []
    for f in op.fields:
        if f.name == "dtype":
            args.append(d.name)
        elif f.name == "to":
            args.append(to_d.name)
        elif f.kind == "dst":
            args.append("E4")
        elif f.kind == "src":
            args.append(src_text[f.name])
        else:
            args.append(str(imm[f.name]))
    ev["VXM.0"] = [(tv, f"{mn} {', '.join(args)}")]
    T = tv + op.delay(CFG)
    for i in range(out_d.nbytes):
        q = CFG.queues[4 + i]                                  # E0..E3 write result plane i
        ev.setdefault(q.name, []).append((T + q.position - CFG.vxm_position, f"Write 9, E{4 + i}"))
    text = timed(ev)
    chip, st = run(engine, text, mem=mem)
    got = model.from_planes([chip.read_mem("E", i, 9)[0] for i in range(out_d.nbytes)], out_d)
    want = model.vxm(op, d, to_d, operands, imm, L)
    if out_d.is_float and op.cls not in ("bits", "select", "const", "cmp"):
        ok = model.same_float(got, want, signed_zero=mn not in ("min", "max"))
        assert ok.all(), (got[~ok][:5], want[~ok][:5])
        # NaN results are the canonical quiet NaN
        bits = got.view({2: np.uint16, 4: np.uint32}[out_d.nbytes])
        assert set(bits[np.isnan(got)].tolist()) <= {0x7E00, 0x7FC00000}
    else:
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), (got[:6], want[:6])
    assert st.issued["VXM.0"] == 1


def cvt_vectors(engine, vals, src_d, to_d):
    """``cvt src_d -> to_d`` of up to 64 vectors (the tiny chip's addresses per slice), one per
    cycle: vector k from address k of W0.. (one slice per byte plane) to address k of E0.."""
    n = len(vals) // L
    assert n * L == len(vals) and 0 < n <= CFG.addresses_per_slice
    vals = vals.reshape(n, L)
    op = isa.lookup("cvt", "VXM")
    tv = 12
    ev, mem = {}, {}
    for k in range(n):
        for i, plane in enumerate(model.to_planes(vals[k], src_d)):
            mem[(f"W{i}", k)] = plane
    for i in range(src_d.nbytes):
        q = CFG.queues[i]
        ev[q.name] = [(tv - 2 - (CFG.vxm_position - q.position), f"Read 0, E{i}"),
                      (tv - 1 - (CFG.vxm_position - q.position), f"Repeat {n - 1}, 1, 1")] if n > 1 else \
                     [(tv - 2 - (CFG.vxm_position - q.position), f"Read 0, E{i}")]
    ev["VXM.0"] = [(tv, f"cvt {src_d.name}, {to_d.name}, E4, E0")]
    if n > 1:
        ev["VXM.0"].append((tv + 1, f"Repeat {n - 1}, 1, 0"))
    T = tv + op.delay(CFG)
    for i in range(to_d.nbytes):
        q = CFG.queues[4 + i]
        c = T + q.position - CFG.vxm_position
        ev[q.name] = [(c, f"Write 0, E{4 + i}")] + ([(c + 1, f"Repeat {n - 1}, 1, 1")] if n > 1 else [])
    chip, _ = run(engine, timed(ev), mem=mem)
    return np.concatenate([model.from_planes([chip.read_mem("E", i, k)[0] for i in range(to_d.nbytes)], to_d)
                           for k in range(n)])


def _f32(bits):
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def test_cvt_float16_float32_every_half_and_every_rounding_edge(engine):
    """float16 -> float32 for all 65,536 halves; float32 -> float16 at every tie and next to it
    (normal and subnormal halves), at the overflow threshold and for NaN payloads. Against
    NumPy's IEEE conversions (round to nearest even), with NaNs canonical (0x7E00, 0x7FC00000).
    The fast engine converts these 320 lanes at a time (lpu_h2f_n, lpu_f2h_n)."""
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    if engine == "reference":
        halves = halves[::16]                 # the reference engine's rules are the same code for all
    step = CFG.addresses_per_slice * L
    got = np.concatenate([cvt_vectors(engine, halves[i:i + step], dt.FLOAT16, dt.FLOAT32)
                          for i in range(0, len(halves), step)])
    want = halves.astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    assert np.all(got.view(np.uint32)[nan] == 0x7FC00000)

    # float32 -> float16: each finite positive half h and its successor: the midpoint (a tie),
    # one float32 ulp either side of it, and h itself; both signs; the overflow edge; NaNs
    hb = np.arange(0, 0x7C00, 7 if engine == "reference" else 1, dtype=np.uint32)
    lo = hb.astype(np.uint16).view(np.float16).astype(np.float32)
    hi = (hb + 1).astype(np.uint16).view(np.float16).astype(np.float32)   # 0x7C00 is +inf
    mid = np.where(np.isinf(hi), np.float32(65520.0), (lo.astype(np.float64) + hi) / 2).astype(np.float32)
    mb = mid.view(np.uint32)
    xs = np.concatenate([lo, mid, _f32(mb - 1), _f32(mb + 1)])
    xs = np.concatenate([xs, -xs, _f32([0x7F800001, 0xFFC12345, 0x7FFFFFFF, 0x7F800000, 0xFF800000,
                                        0x33000000, 0x33000001, 0x32FFFFFF, 0x477FEFFF, 0x477FF000, 1])])
    xs = np.concatenate([xs, np.zeros((-len(xs)) % L, np.float32)])
    got = np.concatenate([cvt_vectors(engine, xs[i:i + step], dt.FLOAT32, dt.FLOAT16)
                          for i in range(0, len(xs), step)])
    with np.errstate(over="ignore"):
        want = xs.astype(np.float16)
    nan = np.isnan(xs)
    assert np.array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
    assert np.all(got.view(np.uint16)[nan] == 0x7E00)


def test_chaining_through_latches_at_one_vector_per_cycle(engine):
    """multiply-add-relu over a stream of 4 vectors, one per cycle, three ALUs chained."""
    xs = [np.random.default_rng(50 + i).integers(-100, 100, L).astype(np.int8) for i in range(4)]
    mem = {("W2", i): x.view(np.uint8) for i, x in enumerate(xs)}
    text = """
VXM.3: const int8, -, 3          ; A3 = 3 from cycle 2
MEM.W2: Read 0, E0
MEM.W2: Repeat 3, 1, 1           ; x0..x3 pass the VXM at cycles 4..7
VXM.0: NOP 4
VXM.0: mul int8, -, E0, A3       ; A0 = 3x, cycles 6..9
VXM.0: Repeat 3, 1, 0
VXM.1: NOP 6
VXM.1: add int8, -, A0, A0       ; A1 = 6x, cycles 8..11
VXM.1: Repeat 3, 1, 0
VXM.2: NOP 8
VXM.2: relu int8, E1, A1         ; on E1 at cycles 10..13
VXM.2: Repeat 3, 1, 0
MEM.E0: NOP 11
MEM.E0: Write 20, E1
MEM.E0: Repeat 3, 1, 1
"""
    chip, st = run(engine, text, mem=mem)
    for i, x in enumerate(xs):
        want = np.maximum((x * np.int8(3)) * np.int8(2), 0).astype(np.int8)
        assert np.array_equal(chip.read_mem("E", 0, 20 + i)[0].view(np.int8), want)
    assert st.by_unit["VXM"]["issued"] == 13


def test_empty_latch(engine):
    e = schedule_error(engine, "VXM.0: neg int8, E0, A2")
    assert (e.kind, e.cycle, e.unit, e.stream) == ("empty-read", 0, "VXM.0", "A2")


def test_latch_conflict(engine):
    # exp (delay 4) at cycle 0 and neg (delay 2) at cycle 2 on one ALU both land at cycle 4
    e = schedule_error(engine, "VXM.1: const float32, -, 1.0\nVXM.0: NOP 2\nVXM.0: exp float32, -, A1\n"
                               "VXM.0: NOP 1\nVXM.0: neg float32, -, A1")
    assert (e.kind, e.cycle, e.unit, e.stream) == ("latch-conflict", 6, "VXM.0", "A0")


def test_vxm_stream_group_conflict_names_the_stream(engine):
    e = schedule_error(engine, "VXM.0: const int32, E4, 1\nVXM.1: const int8, E6, 2")
    assert (e.kind, e.cycle, e.stream) == ("stream-conflict", 2, "E6")


def test_determinism(engine):
    from lpucore.testing import generate
    g = generate(CFG, seed=11, n_transactions=15)
    outs = []
    for _ in range(2):
        chip = Chip(CFG, engine=engine)
        chip.load(g.program)
        g.load_inputs(chip)
        st = chip.run()
        outs.append((st.to_dict(), chip.engine.read_mem(0, 0, 64).tobytes(), chip.cycle))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("write,read,addresses,conflict", [
    ("Write 0, E6", "Gather E2, E0", [40, 1], True),    # the Gather's superlane 1 meets bank 0
    ("Write 40, E6", "Gather E2, E0", [40, 1], True),   # its superlane 0 meets bank 1
    ("Write 40, E6", "Gather E2, E0", [1, 2], False),   # bank 0 only
    ("Scatter E6, E0", "Read 3, E5", [40, 1], True),        # the Scatter's superlane 1 writes bank 0
    ("Scatter E6, E0", "Read 45, E5", [40, 1], True),       # its superlane 0 writes bank 1
    ("Scatter E6, E0", "Read 3, E5", [50, 60], False),      # bank 1 only
])
def test_bank_conflict_of_gather_and_scatter(engine, write, read, addresses, conflict):
    """A landing write and a read in one cycle conflict when any superlane of one meets any
    superlane of the other in a bank (msb bank select: addresses 0..31 bank 0, 32.. bank 1)."""
    cfg = dataclasses.replace(CFG, bank_select="msb")
    lo, hi = _map_planes(addresses)
    # the map passes MEM.W0 in the cycle that uses it: 3 for a Scatter, 5 for a Gather
    wait = "" if write.startswith("Scatter") else "MEM.W2: NOP 2\nMEM.W3: NOP 2"
    text = f"""
{wait}
MEM.W2: Read 0, E0
MEM.W3: Read 0, E1
MEM.W1: NOP 1
MEM.W1: Read 2, E6            ; lands at MEM.W0's position in cycle 3
MEM.W0: NOP 3
MEM.W0: {write}
MEM.W0: NOP 1
MEM.W0: {read}
"""
    mem = {("W2", 0): lo, ("W3", 0): hi, ("W1", 2): vec(3)}
    if conflict:
        e = schedule_error(engine, text, cfg, mem=mem)
        assert (e.kind, e.cycle, e.unit) == ("bank-conflict", 5, "MEM.W0")
    else:
        run(engine, text, cfg, mem=mem)
