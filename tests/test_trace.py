"""Traces: chip.run(trace=...) and the lpucore.trace converters, on both engines."""

import csv
import json

import numpy as np
import pytest

from lpucore import Chip, ChipConfig, LpuError
from lpucore import trace as tr
from lpucore.compiler import gemm_program
from lpucore.testing.programs import generate

SMALL = ChipConfig.small()


def gemm_chip(engine):
    g = gemm_program(40, 130, 70, "int8", config=SMALL)
    rng = np.random.default_rng(0)
    A = rng.integers(-128, 128, (40, 130), dtype=np.int8)
    B = rng.integers(-128, 128, (130, 70), dtype=np.int8)
    chip = Chip(SMALL, engine=engine)
    chip.load(g.program)
    for name, arr in g.pack(A, B).items():
        chip.write_tensor(name, arr)
    return g, chip, A.astype(np.int64) @ B.astype(np.int64)


def issues(path):
    _, rows = tr.read(path)
    return [r for r in rows if r[1] == "issue"]


def test_one_record_per_issued_instruction_on_both_engines(engine, tmp_path):
    g, chip, C = gemm_chip(engine)
    st = chip.run(trace=tmp_path / "t.csv")
    np.testing.assert_array_equal(g.unpack(chip), C)                       # tracing changes nothing
    _, plain, _ = gemm_chip(engine)
    ref = plain.run()
    assert st.to_dict() == ref.to_dict()
    recs = issues(tmp_path / "t.csv")
    per_queue = {}
    for _c, _, q, unit, _what in recs:
        per_queue[q] = per_queue.get(q, 0) + 1
        assert q.split(".")[0] == unit
    assert per_queue == st.issued
    # the records are the program's instructions, Repeats unrolled, in issue order and cycle order
    for q, n in list(st.issued.items())[:6]:
        texts = [w for _, _, qq, _, w in recs if qq == q]
        assert texts == [i.text(SMALL) for i in tr._expanded(g.program, q)][:n]
    cycles = [int(r[0]) for r in recs]
    assert cycles == sorted(cycles) and cycles[-1] < st.cycles


def test_window_and_identical_traces_on_both_engines(tmp_path):
    texts = []
    for engine in ("reference", "fast"):
        _, chip, _ = gemm_chip(engine)
        full = gemm_chip(engine)[1].run()
        st = chip.run(trace=tmp_path / f"{engine}.csv", trace_window=(40, 90))
        assert st.cycles == full.cycles and st.issued == full.issued
        recs = issues(tmp_path / f"{engine}.csv")
        assert recs and all(40 <= int(r[0]) < 90 for r in recs)
        texts.append(recs)
    assert texts[0] == texts[1]


def test_perfetto_json_csv_and_vcd(tmp_path):
    g, chip, _ = gemm_chip("fast")
    st = chip.run(trace=tr.Recorder(tmp_path / "t.csv", bucket=16))
    n_issue = sum(st.issued.values())
    n = tr.to_perfetto(tmp_path / "t.csv", tmp_path / "t.json")
    doc = json.loads((tmp_path / "t.json").read_text())
    ev = doc["traceEvents"]
    assert len(ev) == n
    assert sum(e["ph"] == "X" for e in ev) == n_issue
    threads = {e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert threads == set(st.issued)
    util = [e["args"]["busy"] for e in ev if e["ph"] == "C" and e["name"] == "MXM utilisation"]
    assert util and all(0 <= u <= 1 for u in util) and max(util) > 0
    # the counters add up to the run's totals
    u = tr.utilisation(tmp_path / "t.csv")
    assert int(round(sum(u["mxm"][i] * SMALL.mxm_planes * (u["cycle"][i] - (u["cycle"][i - 1] if i else 0))
                         for i in range(len(u["cycle"]))))) == sum(st.mxm_busy_cycles.values())
    assert u["sram_bytes"].sum() == sum(st.mem_bytes_read.values()) + sum(st.mem_bytes_written.values())
    assert tr.to_csv(tmp_path / "t.csv", tmp_path / "plain.csv") == n_issue
    with open(tmp_path / "plain.csv") as f:
        assert next(csv.reader(f)) == ["cycle", "queue", "unit", "instruction"]
    sig = tr.to_vcd(tmp_path / "t.csv", tmp_path / "t.vcd", signals=["MXM.W0.ABC", "MEM.W0"])
    vcd = (tmp_path / "t.vcd").read_text()
    assert sig == ["MXM.W0.ABC", "MEM.W0"] and vcd.count("$var wire 1") == 2 and "$enddefinitions" in vcd
    abc = sum(1 for r in issues(tmp_path / "t.csv") if r[2] == "MXM.W0.ABC")
    assert vcd.count("\n1!\n") == len({int(r[0]) for r in issues(tmp_path / "t.csv") if r[2] == "MXM.W0.ABC"})
    assert abc > 0


def test_png(tmp_path):
    pytest.importorskip("matplotlib")
    _, chip, _ = gemm_chip("fast")
    chip.run(trace=tmp_path / "t.csv")
    tr.plot_utilisation(tmp_path / "t.csv", tmp_path / "u.png")
    assert (tmp_path / "u.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors(tmp_path):
    gen = generate(ChipConfig.tiny(), seed=1)
    chip = Chip(gen.program.config)
    chip.load(gen.program)
    with pytest.raises(LpuError, match="window"):
        chip.run(trace=tmp_path / "t.csv", trace_window=(10, 5))
    (tmp_path / "x.csv").write_text("hello\n")
    with pytest.raises(LpuError, match="not an lpucore trace"):
        tr.to_perfetto(tmp_path / "x.csv", tmp_path / "y.json")
    with pytest.raises(LpuError, match="no trace file"):
        tr.to_csv(tmp_path / "missing.csv", tmp_path / "y.csv")


def test_watcher_sees_issues_and_mem_writes(engine, tmp_path):
    g, chip, C = gemm_chip(engine)
    ext = g.program.tensors["C_W0"].planes[0][0]              # where the first plane's results land
    sl, first = SMALL.slice_name(ext.slice), ext.address
    issued, writes = [], []
    w = tr.Watcher(on_issue=lambda c, q, ins: issued.append((c, q, ins.mnemonic)), units=["MXM"],
                   watch=[(sl, first, first + 4)], on_write=lambda c, s, a, old, new: writes.append((c, s, a)))
    st = chip.run(events=w)
    np.testing.assert_array_equal(g.unpack(chip), C)
    assert len(issued) == sum(v for q, v in st.issued.items() if q.startswith("MXM."))
    assert {m for _, _, m in issued} >= {"LW", "IW", "ABC", "ACC"}
    assert writes and all(s == sl and first <= a < first + 4 for _, s, a in writes)
    cycles = [c for c, _, _ in writes]
    assert cycles == sorted(cycles) and cycles[-1] < st.cycles
    # the same record on the trace: every ABC the watcher saw is a trace record at the same cycle
    _, plain, _ = gemm_chip(engine)
    plain.run(trace=tmp_path / "t.csv")
    abc = sorted((int(r[0]), r[2]) for r in issues(tmp_path / "t.csv") if r[4].startswith("ABC"))
    assert abc == sorted((c, q) for c, q, m in issued if m == "ABC")


def test_watcher_errors():
    gen = generate(ChipConfig.tiny(), seed=1)
    chip = Chip(gen.program.config)
    chip.load(gen.program)
    with pytest.raises(LpuError, match="on_write"):
        tr.Watcher(watch=[("W0", 0, 4)])
    with pytest.raises(LpuError, match="no MEM slice"):
        chip.run(events=tr.Watcher(watch=[("Q9", 0, 4)], on_write=print))
    with pytest.raises(LpuError, match="outside"):
        chip.run(events=tr.Watcher(watch=[("W0", 0, 10 ** 6)], on_write=print))
