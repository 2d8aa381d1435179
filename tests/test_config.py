import dataclasses

import pytest

from lpucore import ChipConfig, ConfigError


def test_groqchip1_matches_tsp_md():
    c = ChipConfig.groqchip1()
    assert c == ChipConfig()
    assert c.lanes == 320 and c.superlanes == 20 and c.lanes_per_superlane == 16
    assert c.mem_slices == 88 and c.addresses_per_slice == 8192
    assert c.sram_bytes == 88 * 8192 * 320 == 230_686_720 == 220 * 2 ** 20
    assert c.streams_per_direction == 32 and c.streams == 64
    assert c.clock_hz == 900e6
    assert c.mxm_planes == 4 and c.mxm_size == 320 and c.vxm_alus_per_lane == 16
    p = c.peaks()
    assert p["int8_macs_per_cycle"] == 409_600
    assert round(p["int8_tops"]) == 737            # TSP.md s3: 737 TOPS at 900 MHz
    assert round(p["fp16_tflops"]) == 184
    assert p["sram_bytes_per_cycle"] == 56_320
    assert p["vxm_alus"] == 5120


def test_queues_and_positions():
    c = ChipConfig.groqchip1()
    names = [q.name for q in c.queues]
    assert names[:2] == ["MEM.W0", "MEM.W1"] and names[44] == "MEM.E0" and names[103] == "VXM.15"
    assert names[104:107] == ["MXM.W0.LW", "MXM.W0.ABC", "MXM.W0.ACC"] and names[-1] == "SXM.E13"
    # TSP.md s6: 144 queues = 88 MEM + 16 VXM + 4 planes x 3 MXM + 2 x 14 SXM
    assert len(names) == 88 + 16 + 12 + 28 == 144
    assert c.mxm_position(0) == 0 and c.mxm_position(1) == c.positions - 1
    assert c.sxm_position(0) == 1 and c.mem_position(0, 43) == 2
    # West slices lie west of the VXM, East slices east, further out = further away
    assert c.mem_position(0, 43) < c.mem_position(0, 0) < c.vxm_position < c.mem_position(1, 0) < c.mem_position(1, 43)
    assert c.positions == 2 * c.vxm_position + 1
    assert c.hops == tuple(1 + i // 4 for i in range(44))


def test_tiny_is_small_and_valid():
    t = ChipConfig.tiny()
    assert t.lanes == 16 and t.mem_slices == 8 and t.streams_per_direction == 8
    assert ChipConfig.named("tiny") == t


@pytest.mark.parametrize("change", [
    {"superlanes": 0}, {"lanes_per_superlane": -1}, {"hemispheres": 1}, {"addresses_per_slice": 7},
    {"streams_per_direction": 6}, {"mxm_planes": 3}, {"bank_select": "middle"}, {"clock_hz": 0},
    {"mem_read_delay": 0}, {"mem_hop_map": (1, 2)}, {"mem_hop_map": tuple([2, 1] + [3] * 42)},
    {"superlanes": 2.5}, {"addresses_per_slice": 1 << 17}, {"stagger": True},
])
def test_invalid_configs_raise(change):
    with pytest.raises(ConfigError):
        dataclasses.replace(ChipConfig.groqchip1(), **change)


def test_explicit_hop_map():
    c = dataclasses.replace(ChipConfig.tiny(), mem_hop_map=(1, 2, 3, 4))
    assert c.hops == (1, 2, 3, 4)
    assert c.vxm_position == 4 + c.sxm_hops + c.mxm_hops


def test_dict_round_trip_and_unknown_preset():
    c = dataclasses.replace(ChipConfig.tiny(), mem_hop_map=(1, 1, 2, 3))
    assert ChipConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError):
        ChipConfig.from_dict({"lanes": 3})
    with pytest.raises(ConfigError):
        ChipConfig.named("groqchip9")


def test_every_parameter_is_documented_with_a_source():
    for f in dataclasses.fields(ChipConfig):
        assert f.metadata["doc"] and f.metadata["unit"] and f.metadata["source"], f.name
        if f.name.endswith("_delay") or f.name in ("stagger", "mem_slices_per_hop"):
            assert "TSP.md" in f.metadata["source"] or "estimate" in f.metadata["source"], f.name
    table = ChipConfig.describe()
    assert all(f"`{f.name}`" in table for f in dataclasses.fields(ChipConfig))


def test_digest_names_every_field():
    import dataclasses
    a = ChipConfig.groqchip1()
    assert a.digest() == ChipConfig.groqchip1().digest() and len(a.digest()) == 12
    assert all(c in "0123456789abcdef" for c in a.digest())
    assert dataclasses.replace(a, mxm_delay=a.mxm_delay + 1).digest() != a.digest()
    assert ChipConfig.tiny().digest() != a.digest()
