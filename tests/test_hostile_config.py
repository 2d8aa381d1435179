"""Hostile configurations and run arguments: every one is a clear LpuError, quickly, on both engines.

Configurations are untrusted input (a program file embeds one, so does ``.config json:`` in
assembly text): out-of-range or mistyped fields raise ConfigError naming the field, in the
constructor, in Program.from_bytes (as ProgramError) and in the assembler; a configuration that
is valid but would need too much host memory is refused by Chip before anything is allocated.
"""

import dataclasses
import json
import struct
import time
import zlib

import numpy as np
import pytest

from lpucore import Chip, ChipConfig, LpuError, Program, assemble
from lpucore.chip import MAX_CYCLE
from lpucore.config import MAX_CHIP_MEMORY, MEMORY_ENV
from lpucore.errors import ConfigError, ProgramError

# (field, value): each out of its documented range or of the wrong type
BAD = [
    ("mxm_planes", 100000004),
    ("sxm_queues_per_hemisphere", 2 ** 31),
    ("mem_slices_per_hemisphere", 10 ** 400),
    ("mxm_accumulators", int(1e8)),
    ("mxm_accumulators", 1e8),
    ("superlanes", 0),
    ("superlanes", True),
    ("superlanes", 2.0),
    ("superlanes", "2"),
    ("lanes_per_superlane", -1),
    ("addresses_per_slice", 65537),
    ("banks_per_slice", 65),
    ("streams_per_direction", 128),
    ("vxm_alus_per_lane", 65),
    ("stagger", 2 ** 40),
    ("mem_slices_per_hop", 10 ** 9),
    ("sxm_hops", 2 ** 63),
    ("mxm_hops", 65),
    ("mem_read_delay", 1025),
    ("vxm_transcendental_delay", 2 ** 32),
    ("notify_delay", 0),
    ("mxm_install_delay", 10 ** 6),
    ("mxm_delay", 4097),
    ("mxm_fp16_interval", 65),
    ("sxm_shifters", 2 ** 31),
    ("sxm_delay", 2 ** 32),
    ("c2c_links", 2 ** 20),
    ("c2c_latency", 2 ** 40),
    ("c2c_deskew_delay", 2 ** 40),
    ("c2c_receive_delay", 2 ** 31),
    ("clock_hz", float("inf")),
    ("clock_hz", float("nan")),
    ("clock_hz", 0.5),
    ("clock_hz", -900e6),
    ("clock_hz", 1e13),
    ("clock_hz", True),
    ("clock_hz", "900e6"),
    ("c2c_link_bytes_per_s", 0.4),
    ("c2c_link_bytes_per_s", float("inf")),
    ("c2c_link_bytes_per_s", 1e16),
    ("hemispheres", 3),
    ("bank_select", "middle"),
    ("bank_select", ["msb"]),
    ("name", None),
    ("name", "x" * 10000),
    ("mem_hop_map", (1, 2, 3, 2 ** 40)),
    ("mem_hop_map", (1, True, 2, 2)),
    ("mem_hop_map", "1234"),
    ("mem_hop_map", 5),
]


def _id(case):
    field, value = case
    text = repr(value)
    return f"{field}={text if len(text) < 20 else text[:16] + '...'}"


def _field_named(err, field):
    assert field in str(err), str(err)


@pytest.mark.parametrize("case", BAD, ids=_id)
def test_bad_field_is_config_error(case):
    field, value = case
    t = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        ChipConfig.from_dict({**ChipConfig.tiny().to_dict(), field: value})
    assert time.perf_counter() - t < 1
    _field_named(e.value, field)
    with pytest.raises(ConfigError):
        dataclasses.replace(ChipConfig.tiny(), **{field: value})


def _doctored(config_dict, queues=None):
    """A saved tiny program whose embedded configuration (and queue list) is replaced, with
    its CRC recomputed so that the change reaches the parser."""
    p = Program(ChipConfig.tiny())
    p.add("MEM.W0", "Read", 0, "E0")
    data = p.to_bytes()
    magic, version, nf, mlen = struct.unpack_from("<4sHHI", data, 0)
    meta = json.loads(data[12:12 + mlen])
    meta["config"] = config_dict
    if queues is not None:
        meta["queues"] = queues
    mj = json.dumps(meta).encode()
    body = struct.pack("<4sHHI", magic, version, nf, len(mj)) + mj + data[12 + mlen:-4]
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


@pytest.mark.parametrize("case", [c for c in BAD if isinstance(c[1], (int, float, str, type(None), list, tuple))
                                  and not (isinstance(c[1], float) and not np.isfinite(c[1]))], ids=_id)
def test_bad_field_in_program_file(case):
    field, value = case
    if isinstance(value, tuple):
        value = list(value)
    t = time.perf_counter()
    with pytest.raises(ProgramError) as e:
        Program.from_bytes(_doctored({**ChipConfig.tiny().to_dict(), field: value}))
    assert time.perf_counter() - t < 1
    _field_named(e.value, field)


@pytest.mark.parametrize("case", [c for c in BAD if not (isinstance(c[1], float) and not np.isfinite(c[1]))],
                         ids=_id)
def test_bad_field_in_assembly(case):
    field, value = case
    cfg = {**ChipConfig.tiny().to_dict(), field: list(value) if isinstance(value, tuple) else value}
    t = time.perf_counter()
    with pytest.raises(ProgramError) as e:
        assemble(".config json:" + json.dumps(cfg) + "\n.queue MEM.W0\n    Read 0, E0\n")
    assert time.perf_counter() - t < 1
    assert "line 1" in str(e.value)
    _field_named(e.value, field)


def test_describe_shows_ranges():
    """describe() (the table of docs/reference/chip-parameters.md) shows every field's range."""
    text = ChipConfig.describe()
    assert "| range |" in text
    for f in dataclasses.fields(ChipConfig):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| `{f.name}` |"))
        assert ".." in line or f.name in ("bank_select", "name"), line


# ---- host memory -------------------------------------------------------------------------------
# valid configurations (every field in range) whose engines would need too much host memory
HUGE = [
    ({"mxm_planes": 64, "mxm_accumulators": 32768, "superlanes": 256, "lanes_per_superlane": 16,
      "mxm_size": 4096, "streams_per_direction": 64, "mxm_lw_streams": 16}, "mxm_planes"),
    ({"mem_slices_per_hemisphere": 1024, "mem_slices_per_hop": 1, "sxm_delay": 1024, "streams_per_direction": 64},
     "mem_slices_per_hemisphere"),
    ({"mxm_accumulators": 32768, "superlanes": 64, "lanes_per_superlane": 16, "mxm_size": 1024,
      "streams_per_direction": 16, "mxm_planes": 64}, "mxm_accumulators"),
]


@pytest.mark.parametrize("case", HUGE, ids=lambda c: c[1])
def test_host_memory_limit(engine, case, monkeypatch):
    changes, field = case
    monkeypatch.delenv(MEMORY_ENV, raising=False)
    cfg = dataclasses.replace(ChipConfig.tiny(), **changes)     # a valid configuration
    assert sum(cfg.host_memory().values()) > MAX_CHIP_MEMORY
    t = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        Chip(cfg, engine=engine)
    assert time.perf_counter() - t < 1
    assert field in str(e.value) and MEMORY_ENV in str(e.value)


def test_host_memory_limit_can_be_lowered_and_raised(engine, monkeypatch):
    cfg = ChipConfig.tiny()
    need = sum(cfg.host_memory().values())
    with pytest.raises(ConfigError):
        Chip(cfg, engine=engine, max_memory=need // 2)
    Chip(cfg, engine=engine, max_memory=need)
    monkeypatch.setenv(MEMORY_ENV, str(need // 2))
    with pytest.raises(ConfigError):
        Chip(cfg, engine=engine)
    Chip(cfg, engine=engine, max_memory=0)                   # 0: no limit
    monkeypatch.setenv(MEMORY_ENV, "1G")
    Chip(cfg, engine=engine)
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(ConfigError, match=MEMORY_ENV):
        Chip(cfg, engine=engine)
    for bad in (-1, 1.5, True, "1G"):
        with pytest.raises(ConfigError, match="max_memory"):
            Chip(cfg, engine=engine, max_memory=bad)


def test_host_memory_estimate_covers_fast_engine():
    """The estimate is an upper bound of what the fast engine allocates besides SRAM."""
    import tracemalloc
    for cfg in (ChipConfig.tiny(), ChipConfig.small(), dataclasses.replace(ChipConfig.tiny(), sxm_delay=1024)):
        tracemalloc.start()
        try:
            chip = Chip(cfg, engine="fast")
            used = tracemalloc.get_traced_memory()[0] - cfg.sram_bytes
        finally:
            tracemalloc.stop()
        del chip
        est = sum(cfg.host_memory().values())
        assert used <= est <= 2 * used + (1 << 20), (cfg, used, est)


def test_groqchip_is_far_below_the_limit():
    assert sum(ChipConfig.groqchip1().host_memory().values()) < MAX_CHIP_MEMORY / 64


# ---- configurations the engines used to disagree on ------------------------------------------
@pytest.mark.parametrize("changes", [{"c2c_link_bytes_per_s": 0.4}, {"clock_hz": float("inf")},
                                     {"sxm_delay": 2 ** 32}, {"clock_hz": 1e300}], ids=str)
def test_engines_agree_on_odd_configs(engine, changes):
    with pytest.raises(ConfigError):
        cfg = dataclasses.replace(ChipConfig.tiny(), **changes)
        Chip(cfg, engine=engine)


@pytest.mark.parametrize("changes", [{"c2c_link_bytes_per_s": 1.0}, {"clock_hz": 1.0},
                                     {"c2c_link_bytes_per_s": 1e15, "clock_hz": 1e12}, {"sxm_delay": 1024},
                                     {"c2c_latency": 1 << 24}], ids=str)
def test_extreme_valid_configs_run_alike(changes):
    cfg = dataclasses.replace(ChipConfig.tiny(), **changes)
    p = Program(cfg)
    p.add("MEM.W0", "Read", 0, "E0")
    out = []
    for engine in ("reference", "fast"):
        chip = Chip(cfg, engine=engine)
        chip.load(p)
        out.append(chip.run().cycles)
    assert out[0] == out[1]
    assert cfg.c2c_send_interval >= 1


# ---- run arguments ---------------------------------------------------------------------------
def _loaded(engine):
    cfg = ChipConfig.tiny()
    p = Program(cfg)
    p.add("MEM.W0", "Read", 0, "E0")
    chip = Chip(cfg, engine=engine)
    chip.load(p)
    return chip


@pytest.mark.parametrize("kw", [{"until": 2 ** 64}, {"max_cycles": 2 ** 70}, {"until": -1}, {"max_cycles": -1},
                                {"until": "5"}, {"until": 3.5}, {"max_cycles": 2.0}, {"until": True},
                                {"max_cycles": np.float64(3)}, {"until": MAX_CYCLE + 1}], ids=str)
def test_bad_run_arguments(engine, kw):
    chip = _loaded(engine)
    with pytest.raises(LpuError):
        chip.run(**kw)
    assert chip.cycle == 0


@pytest.mark.parametrize("n", [2 ** 63, MAX_CYCLE + 1, -1, 1.5, "3", True, None, np.float32(2), np.bool_(True)],
                         ids=repr)
def test_bad_step_arguments(engine, n):
    chip = _loaded(engine)
    with pytest.raises(LpuError):
        chip.step(n)
    assert chip.cycle == 0


def test_step_may_not_pass_the_last_cycle(engine):
    chip = _loaded(engine)
    chip.step(MAX_CYCLE - 5)
    with pytest.raises(LpuError, match="past cycle"):
        chip.step(6)
    chip.step(5)
    assert chip.cycle == MAX_CYCLE


@pytest.mark.parametrize("kw", [{"until": MAX_CYCLE}, {"max_cycles": MAX_CYCLE}, {"until": np.int64(3)},
                                {"max_cycles": np.uint8(1)}, {}], ids=str)
def test_good_run_arguments_agree(kw):
    res = []
    for engine in ("reference", "fast"):
        chip = _loaded(engine)
        st = chip.run(**kw)
        res.append((st.cycles, chip.cycle, st.finished))
    assert res[0] == res[1]


@pytest.mark.parametrize("call", ["run", "step", "run_until", "trace"])
def test_run_without_program(engine, call, tmp_path):
    chip = Chip(ChipConfig.tiny(), engine=engine)
    with pytest.raises(LpuError, match="no program"):
        if call == "run":
            chip.run()
        elif call == "step":
            chip.step(3)
        elif call == "run_until":
            chip.run(until=5)
        else:
            chip.run(trace=str(tmp_path / "t.csv"))
    assert chip.cycle == 0


# ---- the smaller holes -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mEM.W0", "mem.w0", " MEM.W0 "])
def test_queue_names_normalised_in_program_file(engine, name):
    cfg = ChipConfig.tiny()
    prog = Program.from_bytes(_doctored(cfg.to_dict(), queues=[[name, 1]]))
    assert list(prog.queues) == ["MEM.W0"]
    chip = Chip(cfg, engine=engine)
    chip.load(prog)
    assert chip.run().finished


@pytest.mark.parametrize("queues", [[["MEM.W\u0660", 1]], [["\u017fXM.W0", 1]], [["MEM.W0", 1.0]],
                                    [["MEM.W0", True]], [["MEM.W0", "1"]], [[3, 1]], [["MEM.W0", 1], ["mem.w0", 0]]],
                         ids=str)
def test_bad_queue_entries_in_program_file(queues):
    with pytest.raises(ProgramError):
        Program.from_bytes(_doctored(ChipConfig.tiny().to_dict(), queues=queues))


def test_non_canonical_queue_key_rejected_by_validate(engine):
    p = Program(ChipConfig.tiny())
    p.add("MEM.W0", "Read", 0, "E0")
    p.queues["mem.w0"] = p.queues.pop("MEM.W0")
    with pytest.raises(ProgramError, match="MEM.W0"):
        p.validate()
    with pytest.raises(ProgramError):
        Chip(p.config, engine=engine).load(p)


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_config_json(depth):
    t = time.perf_counter()
    with pytest.raises(ProgramError):
        assemble(".config json:" + "[" * depth + "\n")
    with pytest.raises(ProgramError):
        assemble(".config json:" + "[" * depth + "]" * depth + "\n")
    with pytest.raises(ProgramError):
        assemble('.config json:{"name": ' + "[" * depth + "]" * depth + "}\n")
    assert time.perf_counter() - t < 5


def test_huge_integer_in_config_json():
    with pytest.raises(ProgramError):
        assemble('.config json:{"superlanes": ' + "9" * 5000 + "}\n")


@pytest.mark.parametrize("text", [
    ".config tiny\n.queue MEM.W0\n    Read \u0663, E0\n",            # Arabic-Indic three
    ".config tiny\n.queue MEM.W0\n    Read 0, E\u0663\n",
    ".config tiny\n.queue MEM.W0\n    NOP \uff13\n",                  # fullwidth three
    ".config tiny\n.queue MEM.W\u0663\n    NOP 3\n",
    ".config tiny\n.queue VXM.0\n    const float16, -, \u0663.5\n",
    ".config tiny\n.tensor x int8 (\u0663, 16) W0:0x0\n",
    ".config tiny\n.tensor x int8 (1, 16) W0:\u0663\n",
    ".config tiny\n.tensor x int8 (1, 16) W\u0663:0\n",
    ".config tiny\n.tensor x int8 (1, 16) [W0:0+\u0661]\n",
    ".config tiny\n.tensor x int8 (1, 16) {W0:\u0660}\n",
], ids=repr)
def test_assembler_reads_ascii_digits_only(text):
    with pytest.raises(ProgramError):
        assemble(text)


def test_assembler_still_reads_ascii_numbers():
    p = assemble(".config tiny\n.tensor x int8 (1, 16) [W0:0x0+1]\n.queue MEM.W0\n    Read 0x3, E0\n    NOP 1_0\n"
                 ".queue VXM.0\n    const float16, -, 3.5\n")
    assert p.queues["MEM.W0"][0]["addr"] == 3


# ---- the command line ------------------------------------------------------------------------
@pytest.mark.parametrize("changes", [{"mxm_planes": 100000004}, {"sxm_delay": 2 ** 32}, HUGE[0][0]], ids=str)
def test_cli_run_reports_bad_config(engine, changes, tmp_path, capsys, monkeypatch):
    from lpucore.cli import main
    monkeypatch.delenv(MEMORY_ENV, raising=False)
    path = tmp_path / "bad.lpu"
    path.write_bytes(_doctored({**ChipConfig.tiny().to_dict(), **changes}))
    t = time.perf_counter()
    assert main(["run", str(path), "--engine", engine]) == 1
    assert time.perf_counter() - t < 2
    err = capsys.readouterr().err
    assert err.startswith("lpucore: error:") and next(iter(changes)) in err, err
