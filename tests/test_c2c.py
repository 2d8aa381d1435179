"""Chip-to-chip links (Send / Receive / Deskew) and lpucore.System, on both engines.

Tiny geometry: SXM W at position 1, MEM W0/W1 at 3 (see test_mxm_sxm.py); C2C: 4 links,
latency 12 cycles, one vector per 2 cycles per link, Deskew ready 4 cycles after issue.
A MEM.W0 Read issued in cycle 10 puts its vector on W1 at position 3 in cycle 12; it
passes the SXM (position 1) in cycle 14.  A Receive's vector on E2 in cycle c + 2 at
position 1 reaches MEM.W1 (position 3) two cycles later.
"""

import dataclasses

import numpy as np
import pytest
from helpers import TINY, make_chip, timed

import lpucore
from lpucore import LpuError, ProgramError, ScheduleError, System, assemble
from lpucore.system import topology_wires

VEC = np.arange(TINY.lanes, dtype=np.uint8)
SEND = {"SXM.W0": [(0, "Deskew 0"), (14, "Send 0, W1")], "MEM.W0": [(10, "Read 5, W1")]}


def prog(events, cfg=TINY):
    header = ".config tiny\n" if cfg == TINY else ".config json:" + cfg.to_json() + "\n"
    return assemble(header + timed(events))


def test_config_and_isa():
    g = lpucore.ChipConfig()
    assert g.c2c_links == 16 and g.c2c_send_interval == 21      # 320 B at 14 GB/s and 900 MHz
    assert TINY.c2c_send_interval == 2
    assert len(g.queues) == 144                                   # C2C runs on the SXM queues
    for m in ("Send", "Receive", "Deskew"):
        op = lpucore.isa.lookup(m, "SXM")
        assert op.unit == "C2C" and op.queue_kind == "SXM"
    with pytest.raises(ProgramError, match="link"):
        assemble(".config tiny\nSXM.W0: Send 4, W1")
    with pytest.raises(lpucore.ConfigError, match="even"):
        dataclasses.replace(TINY, c2c_links=3)


def test_send_to_the_host_and_receive_from_it(engine):
    text = timed({**SEND, "SXM.W0": SEND["SXM.W0"] + [(40, "Receive 0, E2")], "MEM.W1": [(44, "Write 7, E2")]})
    chip = make_chip(engine, text, mem={("W0", 5): VEC})
    st = chip.run(until=20)
    sent = chip.c2c_take_outbox()
    assert [(lk, c, a) for lk, c, a, _ in sent] == [(0, 14, 14 + TINY.c2c_latency)]
    assert np.array_equal(sent[0][3], VEC) and chip.c2c_take_outbox() == []
    chip.c2c_deliver(0, 30, VEC[::-1])
    st = chip.run()
    assert np.array_equal(chip.read_mem("W", 1, 7)[0], VEC[::-1])
    assert st.finished and st.cycles == 44 + TINY.mem_write_delay + TINY.stagger
    assert st.c2c_vectors_sent == {0: 1} and st.c2c_vectors_received == {0: 1}
    assert st.by_unit["C2C"]["bytes_sent"] == TINY.lanes


def test_deliveries_are_checked(engine):
    chip = make_chip(engine, timed(SEND), mem={("W0", 5): VEC})
    chip.run(until=20)
    with pytest.raises(LpuError, match="too late"):
        chip.c2c_deliver(1, chip.cycle - 1, VEC)
    with pytest.raises(LpuError, match="no link 4"):
        chip.c2c_deliver(4, 30, VEC)
    with pytest.raises(LpuError, match="16-byte"):
        chip.c2c_deliver(1, 30, VEC[:8])
    chip.c2c_deliver(1, 30, VEC)
    with pytest.raises(LpuError, match="in order"):
        chip.c2c_deliver(1, 29, VEC)
    for k in range(100):                       # the inbox grows as needed
        chip.c2c_deliver(2, 30 + k, VEC)


@pytest.mark.parametrize("case", ["no-deskew", "too-soon", "busy", "empty", "early", "empty-stream"])
def test_link_rules_are_schedule_errors(engine, case):
    ev = {k: list(v) for k, v in SEND.items()}
    want = {"no-deskew": ("link-skew", 14, "not been deskewed"),
            "too-soon": ("link-skew", 2, "before its Deskew completes (cycle 4)"),
            "busy": ("link-busy", 15, "busy until cycle 16"),
            "empty": ("link-empty", 20, "nothing has arrived"),
            "early": ("link-empty", 20, "arrives in cycle 26"),
            "empty-stream": ("empty-read", 16, "holds no value")}[case]
    if case == "no-deskew":
        ev["SXM.W0"] = [(14, "Send 0, W1")]
    elif case == "too-soon":
        ev["SXM.W0"] = [(0, "Deskew 0"), (2, "Receive 0, E2")]
    elif case == "busy":
        ev["MEM.W0"] = [(10, "Read 5, W1"), (11, "Read 5, W1")]
        ev["SXM.W0"] = [(0, "Deskew 0"), (14, "Send 0, W1"), (15, "Send 0, W1")]
    elif case in ("empty", "early"):
        ev["SXM.W0"] = [(0, "Deskew 0"), (20, "Receive 0, E2")]
    else:
        ev["SXM.W0"] = [(0, "Deskew 0"), (16, "Send 0, W1")]
    chip = make_chip(engine, timed(ev), mem={("W0", 5): VEC})
    if case == "early":
        chip.run(until=6)
        chip.c2c_deliver(0, 26, VEC)
    with pytest.raises(ScheduleError) as e:
        chip.run()
    e = e.value
    assert (e.kind, e.cycle, e.unit) == want[:2] + ("SXM.W0",)
    assert want[2] in str(e)
    if e.kind.startswith("link"):
        assert e.link == 0


def test_a_link_at_full_rate(engine):
    """Eight vectors, one per c2c_send_interval cycles, over a two-chip system."""
    n, iv = 8, TINY.c2c_send_interval
    a = prog({"SXM.W0": [(0, "Deskew 2"), (14, "Send 2, W1"), (15, f"Repeat {n - 1}, {iv}")],
              "MEM.W0": [(10, "Read 0, W1"), (11, f"Repeat {n - 1}, {iv}, 1")]})
    r0 = 14 + TINY.c2c_latency
    b = prog({"SXM.W0": [(0, "Deskew 3"), (r0, "Receive 3, E2"), (r0 + 1, f"Repeat {n - 1}, {iv}")],
              "MEM.W1": [(r0 + 4, "Write 0, E2"), (r0 + 5, f"Repeat {n - 1}, {iv}, 1")]})
    s = System(2, [(0, 2, 1, 3)], config=TINY, engine=engine)
    data = np.random.default_rng(0).integers(0, 256, (n, TINY.lanes)).astype(np.uint8)
    s.chips[0].write_mem("W", 0, 0, data)
    s.load([a, b])
    st = s.run()
    assert np.array_equal(s.chips[1].read_mem("W", 1, 0, n), data)
    assert st.link_vectors == {(0, 2, 1, 3): n} and st.c2c_bytes == n * TINY.lanes
    assert st.cycles == r0 + 4 + (n - 1) * iv + TINY.mem_write_delay + TINY.stagger


def ping_pong(engine, window=None, rounds=3):
    """Chip 0 sends a vector to chip 1, which stores it and sends it back, three times
    round; each chip stores what it receives (MEM.W1 writes and re-reads it)."""
    lat = TINY.c2c_latency
    ev0 = {"SXM.W0": [(0, "Deskew 0")], "MEM.W0": [(10, "Read 5, W1")], "MEM.W1": []}
    ev1 = {"SXM.W0": [(0, "Deskew 1")], "MEM.W1": []}
    t = 14
    for r in range(rounds):
        ev0["SXM.W0"].append((t, "Send 0, W1"))
        t1 = t + lat                                       # chip 1 receives, stores, reads back, sends
        ev1["SXM.W0"].append((t1, "Receive 1, E2"))
        ev1["MEM.W1"].append((t1 + 4, f"Write {10 + r}, E2"))
        ev1["MEM.W1"].append((t1 + 7, f"Read {10 + r}, W1"))
        ev1["SXM.W0"].append((t1 + 11, "Send 1, W1"))
        t0 = t1 + 11 + lat
        ev0["SXM.W0"].append((t0, "Receive 0, E2"))
        ev0["MEM.W1"].append((t0 + 4, f"Write {20 + r}, E2"))
        if r + 1 < rounds:
            ev0["MEM.W1"].append((t0 + 7, f"Read {20 + r}, W1"))
        t = t0 + 11
    s = System(2, [(0, 0, 1, 1)], config=TINY, engine=engine)
    if window is not None:
        s.__class__ = type("Windowed", (System,), {"window": property(lambda self: window)})
    s.chips[0].write_mem("W", 0, 5, VEC[None])
    s.load([prog(ev0), prog(ev1)])
    st = s.run()
    got = [s.chips[0].read_mem("W", 1, 20, rounds), s.chips[1].read_mem("W", 1, 10, rounds)]
    return st, got


def test_system_results_do_not_depend_on_engine_or_window():
    base_st, base = ping_pong("reference")
    assert all(np.array_equal(v, np.tile(VEC, (3, 1))) for v in base)
    for engine, window in [("fast", None), ("fast", 1), ("fast", 5), ("reference", 7)]:
        st, got = ping_pong(engine, window)
        assert st.cycles == base_st.cycles and all(np.array_equal(a, b) for a, b in zip(got, base))
        assert [c.cycles for c in st.chips] == [c.cycles for c in base_st.chips]


def test_schedule_errors_name_the_chip(engine):
    s = System(2, [(0, 0, 1, 1)], config=TINY, engine=engine)
    s.load([prog(SEND), prog({"SXM.W0": [(0, "Deskew 1"), (20, "Receive 1, E2")]})])
    with pytest.raises(ScheduleError, match="chip 1: cycle 20, SXM.W0") as e:
        s.run()
    assert e.value.chip == 1 and e.value.kind == "link-empty"


def test_system_refuses_unconnected_links():
    s = System(2, [(0, 1, 1, 1)], config=TINY, engine="reference")
    with pytest.raises(ProgramError, match="chip 0: Send on link 0"):
        s.load([prog(SEND), None])


def test_snapshot_keeps_link_state(engine):
    text = timed({**SEND, "SXM.W0": SEND["SXM.W0"] + [(40, "Receive 0, E2")], "MEM.W1": [(44, "Write 7, E2")]})
    chip = make_chip(engine, text, mem={("W0", 5): VEC})
    chip.run(until=20)
    chip.c2c_deliver(0, 30, VEC[::-1])
    snap = chip.snapshot()
    sent = chip.c2c_take_outbox()
    chip.run()
    other = make_chip(engine, text)
    other.restore(snap)
    assert [(lk, c, a) for lk, c, a, _ in other.c2c_take_outbox()] == [(lk, c, a) for lk, c, a, _ in sent]
    st = other.run()
    assert np.array_equal(other.read_mem("W", 1, 7)[0], VEC[::-1]) and st.cycles == chip.stats().cycles


CFG16 = dataclasses.replace(TINY, c2c_links=16)


@pytest.mark.parametrize("topology, n, wires", [("node", 8, 28), ("rack", 72, 9 * 28 + 36 * 4),
                                                ("dragonfly", 576, 8 * 396 + 28 * (5 * 72 // 7))])
def test_topologies(topology, n, wires):
    w = topology_wires(topology, n, lpucore.ChipConfig())
    assert len(w) == wires
    ends = [e for a, la, b, lb in w for e in ((a, la), (b, lb))]
    assert len(ends) == len(set(ends)) and all(0 <= lk < 16 and 0 <= c < n for c, lk in ends)
    # nodes are fully connected by links 0..6; racks join every pair of nodes, dragonflies every pair of racks
    pairs = {frozenset((a // 8, b // 8)) for a, _, b, _ in w if a // 8 != b // 8}
    racks = {frozenset((a // 72, b // 72)) for a, _, b, _ in w if a // 72 != b // 72}
    local = {frozenset((a, b)) for a, la, b, lb in w if a // 8 == b // 8}
    assert len(local) == 28 * (n // 8)
    if topology != "node":
        assert len(pairs) >= 36 * (n // 72)
    if topology == "dragonfly":
        assert len(racks) == 28


def test_topology_errors():
    with pytest.raises(lpucore.ConfigError, match="a node has 8 chips"):
        System(7, "node", config=CFG16)
    with pytest.raises(lpucore.ConfigError, match="needs 7 C2C links"):
        System(topology="node", config=TINY)
    with pytest.raises(lpucore.ConfigError, match="wired twice"):
        System(3, [(0, 0, 1, 0), (0, 0, 2, 0)], config=TINY)
    with pytest.raises(lpucore.ConfigError, match="chips 0..1"):
        System(2, [(0, 0, 2, 0)], config=TINY)
    with pytest.raises(lpucore.ConfigError, match="dragonfly"):
        System(100, "dragonfly", config=CFG16)
    s = System(topology="node", config=CFG16)
    assert len(s) == 8 and s.window == CFG16.c2c_latency and "8 x tiny" in repr(s)


def test_a_vector_crosses_every_node_of_a_rack():
    """A vector hops from node to node of a 72-chip rack over the wires that join them (and
    over a node's local links to reach the chip holding the next wire); every chip on the
    way stores and forwards it.  Tiny chips with 16 links, fast engine."""
    s = System(topology="rack", config=CFG16)
    lat = CFG16.c2c_latency
    hop = {}
    for a, la, b, lb in s.wires:
        hop.setdefault((a, b), (la, lb))
        hop.setdefault((b, a), (lb, la))
    path, cur = [], 0
    for node in range(1, 9):
        nxt = [y for (x, y) in hop if x == cur and y // 8 == node]
        if not nxt:             # hand over inside the node to a chip wired to the next node
            via = next(x for (x, y) in hop if x // 8 == cur // 8 and x != cur and y // 8 == node)
            path.append((cur, via))
            cur = via
            nxt = [y for (x, y) in hop if x == cur and y // 8 == node]
        path.append((cur, nxt[0]))
        cur = nxt[0]
    progs = {}

    def ev(c):
        return progs.setdefault(c, {"SXM.W0": [(k, f"Deskew {k}") for k in range(16)], "MEM.W0": [], "MEM.W1": []})

    t = 30
    ev(path[0][0])["MEM.W0"].append((t - 4, "Read 5, W1"))
    for a, b in path:
        la, lb = hop[(a, b)]
        ev(a)["SXM.W0"].append((t, f"Send {la}, W1"))
        r = t + lat
        ev(b)["SXM.W0"].append((r, f"Receive {lb}, E2"))
        ev(b)["MEM.W1"].append((r + 4, "Write 7, E2"))
        ev(b)["MEM.W1"].append((r + 7, "Read 7, W1"))
        t = r + 11
    s.chips[path[0][0]].write_mem("W", 0, 5, VEC[None])
    s.load({c: prog({k: v for k, v in e.items() if v}, CFG16) for c, e in progs.items()})
    st = s.run()
    assert len({b // 8 for _, b in path}) == 8
    for _, b in path:
        assert np.array_equal(s.chips[b].read_mem("W", 1, 7)[0], VEC)
    assert sum(st.link_vectors.values()) == len(path) and st.finished


@pytest.mark.parametrize("topology, n", [("node", 8), ("rack", 72)])
def test_relay_programs_reach_every_chip(engine, topology, n):
    from lpucore.compiler.c2c import chip_path, relay_programs
    s = System(n, topology, config=CFG16, engine=engine)
    progs, path, land = relay_programs(CFG16, n, s.wires, 5)
    assert sorted({path[0][0]} | {b for _, _, b, _ in path}) == list(range(n))
    assert path == chip_path(n, s.wires)
    slot = CFG16.mem_slices_per_hemisphere - 1
    block = np.random.default_rng(3).integers(0, 256, (5, CFG16.lanes)).astype(np.uint8)
    s.chips[path[0][0]].write_mem("W", slot, 0, block)
    s.load(progs)
    st = s.run()
    for _, _, b, _ in path:
        assert np.array_equal(s.chips[b].read_mem("W", slot, 0, 5), block)
    assert st.cycles == land + CFG16.stagger and sum(st.link_vectors.values()) == 5 * (n - 1)


def test_relay_errors():
    from lpucore.compiler.c2c import chip_path, relay_programs
    with pytest.raises(lpucore.CompileError, match="does not fit"):
        relay_programs(CFG16, 2, [(0, 0, 1, 0)], TINY.addresses_per_slice + 1)
    with pytest.raises(lpucore.CompileError, match="no path"):
        chip_path(3, [(0, 0, 1, 0)])


def test_relay_command(capsys):
    from lpucore.cli import main
    assert main(["relay", "--config", "tiny", "--links", "16", "--engine", "reference"]) == 0
    out = capsys.readouterr().out
    assert "relay of 4 vectors over 7 hops" in out and '"correct": true' in out
    assert main(["relay", "--config", "tiny"]) == 1
    assert "needs 7 C2C links" in capsys.readouterr().err


@pytest.mark.parametrize("cfg", [CFG16, lpucore.ChipConfig()], ids=["tiny16", "groqchip1"])
def test_allgather_over_a_node(engine, cfg):
    from lpucore.compiler.c2c import allgather_programs
    s = System(topology="node", config=cfg, engine=engine)
    nv, sl = 3, cfg.mem_slices_per_hemisphere
    progs, end = allgather_programs(cfg, 8, s.wires, nv, address=2)
    blocks = np.random.default_rng(5).integers(0, 256, (8, nv, cfg.lanes)).astype(np.uint8)
    for i in range(8):
        s.chips[i].write_mem("W", sl - 1, 2, blocks[i])
    s.load(progs)
    st = s.run()
    for i in range(8):
        assert np.array_equal(s.chips[i].read_mem("W", sl - 2, 2, 8 * nv), blocks.reshape(-1, cfg.lanes))
    assert st.cycles == end + cfg.stagger                      # the schedule's own prediction
    assert st.c2c_bytes == 8 * 7 * nv * cfg.lanes and len(st.link_vectors) == 28


def test_allgather_errors():
    from lpucore.compiler.c2c import allgather_programs
    with pytest.raises(lpucore.CompileError, match="no direct link"):
        allgather_programs(CFG16, 3, [(0, 0, 1, 0), (1, 1, 2, 1)], 1)
    with pytest.raises(lpucore.CompileError, match="do not fit"):
        allgather_programs(CFG16, 2, [(0, 0, 1, 0)], TINY.addresses_per_slice)


def _run_two_chips(cfg, engine, first, second, inputs):
    """(system, stats): chips 0 and 1 wired link 3 to link 5, each (program, its Compiled) loaded with its
    constants, ``inputs`` written into chip 0, run."""
    s = System(2, [(0, 3, 1, 5)], config=cfg, engine=engine)
    for chip, (prog, comp) in zip(s.chips, (first, second)):
        chip.load(prog)
        for name, a in comp.constants.items():
            comp.write_constant(chip, name, a)
    first[1].write_inputs(s.chips[0], inputs)
    return s, s.run()


def test_an_early_hand_over_leaves_when_the_output_is_written(engine):
    """hand_over(early=True): the output leaves as soon as it is written, in idle cycles of the first
    chip's queues, while the first chip's later work (a state written in place, which no output
    reads) runs on: the second chip gets the same bits and finishes sooner, the first chip's state is
    written as when it runs alone, and each chip takes the cycles predicted."""
    from lpucore.compiler.emit import expected_cycles
    from lpucore.compiler.pipeline import hand_over
    cfg = lpucore.ChipConfig.small()
    r = np.random.default_rng(1)
    w1 = (r.standard_normal((64, 96)) * 0.1).astype(np.float16)
    w2 = (r.standard_normal((96, 64)) * 0.1).astype(np.float16)
    x = r.standard_normal((1, 64)).astype(np.float16)
    g1 = lpucore.Graph("stage0")
    xin = g1.input("x", (1, 64), "float16")
    g1.output("h", g1.relu(xin @ g1.constant("w1", w1)))
    S = g1.state("s", (64, 200), "float16")
    big = g1.mul(g1.matmul(g1.reshape(g1.cast(g1.transpose(g1.cast(xin, "float32"), (1, 0)), "float16"), (64, 1)),
                           g1.constant("ones", np.ones((1, 200), np.float16))), S)
    g1.assign(S, g1.scatter(S, g1.constant("row", np.array([3], np.int32)), g1.slice(big, (slice(0, 1), slice(None)))))
    g2 = lpucore.Graph("stage1")
    g2.output("y", g2.input("h", (1, 96), "float16") @ g2.constant("w2", w2))
    c1, c2 = lpucore.compile(g1, cfg), lpucore.compile(g2, cfg)
    o1, _ = lpucore.execute(c1, {"x": x}, engine=engine)
    o2, _ = lpucore.execute(c2, {"h": o1["h"]}, engine=engine)
    late = [(n, last) for _, n, last in c1.kernels if last is not None]
    assert max(last for n, last in late if n == "h") < c1.expected_cycles
    info = {}
    pa, pb, end = hand_over(c1, "h", c2, "h", 3, 5, early=True, info=info)
    _, _, end_after = hand_over(c1, "h", c2, "h", 3, 5)
    assert info["send"] < c1.expected_cycles and end < end_after
    s, st = _run_two_chips(cfg, engine, (pa, c1), (pb, c2), {"x": x})
    assert np.array_equal(s.chips[1].read_tensor("y").reshape(1, 64).view(np.uint16), o2["y"].view(np.uint16))
    assert [c.cycles for c in st.chips] == [expected_cycles(pa), end]
    alone = lpucore.Chip(cfg, engine=engine)
    c1.load(alone)
    lpucore.execute(c1, {"x": x}, chip=alone)
    assert np.array_equal(s.chips[0].read_tensor("s").view(np.uint16), alone.read_tensor("s").view(np.uint16))


def test_an_early_hand_over_weaves_through_a_busy_tail(engine):
    """The output handed over while the first chip writes a tiled KV cache (lpucore.llm.tiled: MEM Gather and
    Scatter on every stripe, VXM blends, MXM products, after the output in graph order): the hand-over's
    reads and sends find idle queue cycles and free stream trajectories among them, the second chip gets
    the first chip's output bit for bit and the first chip's cache is what it writes alone, both engines,
    in the predicted cycles."""
    from lpucore.compiler.emit import expected_cycles
    from lpucore.compiler.pipeline import hand_over
    from lpucore.llm import tiled
    cfg = lpucore.ChipConfig.groqchip1()       # the small chip has too few slices for the cache's stripes
    r = np.random.default_rng(2)
    D, T = 64, 2
    w1 = (r.standard_normal((64, 96)) * 0.1).astype(np.float16)
    x = r.standard_normal((1, 64)).astype(np.float16)
    g1 = lpucore.Graph("stage0")
    xin = g1.input("x", (1, 64), "float16")
    g1.output("h", g1.relu(xin @ g1.constant("w1", w1)))
    pos = g1.input("pos", (1,), "int32")
    K = g1.state("k", (T * D, tiled.TILE), "float16",
                 init=r.standard_normal((T * D, tiled.TILE)).astype(np.float16))
    consts = {}
    tl = tiled.tile_values(g1, consts, pos, g1.cast(pos, "float32"), T * tiled.TILE, D)
    g1.assign(K, tiled.write_keys(g1, consts, K, xin, tl))
    g2 = lpucore.Graph("stage1")
    g2.output("y", g2.mul(g2.input("h", (1, 96), "float16"), 2.0))
    c1, c2 = lpucore.compile(g1, cfg), lpucore.compile(g2, cfg)
    info = {}
    pa, pb, end = hand_over(c1, "h", c2, "h", 3, 5, early=True, info=info)
    assert info["send"] < c1.expected_cycles
    inputs = {"x": x, "pos": np.array([400], np.int32)}
    o1, _ = lpucore.execute(c1, inputs, engine=engine)
    alone = lpucore.Chip(cfg, engine=engine)
    c1.load(alone)
    lpucore.execute(c1, inputs, chip=alone)
    s, st = _run_two_chips(cfg, engine, (pa, c1), (pb, c2), inputs)
    assert [c.cycles for c in st.chips] == [expected_cycles(pa), end]
    want = (o1["h"].astype(np.float32) * 2).astype(np.float16)
    assert np.array_equal(s.chips[1].read_tensor("y").reshape(1, 96).view(np.uint16), want.view(np.uint16))
    assert np.array_equal(s.chips[0].read_tensor("k").view(np.uint16), alone.read_tensor("k").view(np.uint16))


def test_pipeline_stages_on_two_chips_match_one_chip(engine):
    """A compiled graph's output handed over a link to the next stage's input (hand_over):
    the second chip's result is bit-identical to running the stages one after the other on
    one chip, and the system's cycles are what hand_over predicts."""
    from lpucore.compiler.pipeline import hand_over
    cfg = lpucore.ChipConfig.small()
    r = np.random.default_rng(0)
    w1 = (r.standard_normal((64, 96)) * 0.1).astype(np.float16)
    w2 = (r.standard_normal((96, 64)) * 0.1).astype(np.float16)
    x = r.standard_normal((1, 64)).astype(np.float16)
    g1 = lpucore.Graph("stage0")
    g1.output("h", g1.relu(g1.input("x", (1, 64), "float16") @ g1.constant("w1", w1)))
    g2 = lpucore.Graph("stage1")
    g2.output("y", g2.input("h", (1, 96), "float16") @ g2.constant("w2", w2))
    c1, c2 = lpucore.compile(g1, cfg), lpucore.compile(g2, cfg)
    o1, _ = lpucore.execute(c1, {"x": x}, engine=engine)
    o2, _ = lpucore.execute(c2, {"h": o1["h"]}, engine=engine)
    s = System(2, [(0, 3, 1, 5)], config=cfg, engine=engine)
    pa, pb, end = hand_over(c1, "h", c2, "h", 3, 5)
    for chip, prog, comp in ((s.chips[0], pa, c1), (s.chips[1], pb, c2)):
        chip.load(prog)
        for name, a in comp.constants.items():
            comp.write_constant(chip, name, a)
    c1.write_inputs(s.chips[0], {"x": x})
    st = s.run()
    y = s.chips[1].read_tensor("y").reshape(1, 64)
    assert np.array_equal(y.view(np.uint16), o2["y"].view(np.uint16))
    assert st.cycles == end and st.link_vectors == {(0, 3, 1, 5): len(pa.tensors["h"].locations(0, cfg.lanes))
                                                    * len(pa.tensors["h"].planes)}
    with pytest.raises(lpucore.CompileError, match="is float16"):
        hand_over(c1, "h", c1, "x", 0, 0)


@pytest.mark.parametrize("early", [True, False])
def test_a_fan_out_and_a_fan_in_over_several_links(engine, early):
    """plan_sends puts one copy of an output on each of several links (early: in idle cycles while the chip
    still works; else after its program), plan_receives takes vectors from several links into one chip,
    each Receive and Write at the first free cycles after its vector arrives: three chips get the first
    chip's output, a fifth adds their results, bit for bit, in the predicted cycles, both engines."""
    from lpucore.compiler.emit import expected_cycles
    from lpucore.compiler.pipeline import _with, check_pair, plan_receives, plan_sends
    cfg = lpucore.ChipConfig.small()
    r = np.random.default_rng(3)
    w1 = (r.standard_normal((64, 96)) * 0.1).astype(np.float16)
    x = r.standard_normal((1, 64)).astype(np.float16)
    g1 = lpucore.Graph("first")
    xin = g1.input("x", (1, 64), "float16")
    h = g1.relu(xin @ g1.constant("w1", w1))
    g1.output("h", h)
    S = g1.state("s", (8, 96), "float16")
    g1.assign(S, g1.add(S, g1.mul(h, 3.0)))           # work after the output, which nothing reads
    g2 = lpucore.Graph("middle")
    g2.output("y", g2.mul(g2.input("h", (1, 96), "float16"), g2.constant("c", np.full((1, 96), 2, np.float16))))
    g3 = lpucore.Graph("last")
    a, b, c = (g3.input(n, (1, 96), "float16") for n in "abc")
    g3.output("z", g3.add(g3.add(a, b), c))
    c1, c2, c3 = (lpucore.compile(g, cfg) for g in (g1, g2, g3))
    wires = [(0, 0, 1, 0), (0, 1, 2, 0), (0, 2, 3, 0), (1, 1, 4, 0), (2, 1, 4, 1), (3, 1, 4, 2)]
    tail, times, first = plan_sends(c1, "h", [0, 1, 2], early=early)
    assert (first < c1.expected_cycles) == early and len(times) == 3
    progs, sent = [_with(c1.program, {}, 0, tail)], []
    for k in (1, 2, 3):
        check_pair(c1, "h", c2, "h")
        head, shift = plan_receives(c2, [("h", 0, times[k - 1])])
        pk = _with(c2.program, head, shift, {})
        mid = dataclasses.replace(c2, program=pk, expected_cycles=shift + c2.expected_cycles)
        t_k, ts, _ = plan_sends(mid, "y", [1], early=early, start=shift)
        progs.append(_with(pk, {}, 0, t_k))
        sent.append(ts[0])
    head, shift = plan_receives(c3, [(n, j, ts) for j, (n, ts) in enumerate(zip("abc", sent))])
    progs.append(_with(c3.program, head, shift, {}))
    s = System(5, wires, config=cfg, engine=engine)
    consts = [c1, c2, c2, c2, c3]
    for k, (chip, prog, comp) in enumerate(zip(s.chips, progs, consts)):
        chip.load(prog)
        for name, arr in comp.constants.items():
            comp.write_constant(chip, name, arr * (k if name == "c" else 1))
    c1.write_inputs(s.chips[0], {"x": x})
    st = s.run()
    o1, _ = lpucore.execute(c1, {"x": x}, engine=engine)
    want = sum(o1["h"].astype(np.float16) * np.float16(2 * k) for k in (1, 2, 3)).astype(np.float16)
    got = s.chips[4].read_tensor("z").reshape(1, 96)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    assert [ch.cycles for ch in st.chips] == [expected_cycles(p) for p in progs]
    with pytest.raises(lpucore.CompileError, match="distinct"):
        plan_sends(c1, "h", [0, 0])
    with pytest.raises(lpucore.CompileError, match="2 vectors sent for 'a'"):
        plan_receives(c3, [("a", 0, [5, 6])])
