"""Hostile snapshots: every index, counter, pointer and flag a snapshot carries is checked
against the configuration and the program before it reaches an engine's state, so a
corrupted snapshot gives a SnapshotError, never a crash or a silent heap overflow."""

import functools
import io
import json
import os
import zipfile

import numpy as np
import pytest
from helpers import TINY, make_chip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_mxm_sxm import int8_setup

from lpucore import Chip, LpuError, Snapshot, SnapshotError
from lpucore.testing import generate

NQ = len(TINY.queues)
QW = 10      # fields per queue in the fast engine's 'qs' (_state.pxi)


@functools.lru_cache(maxsize=None)
def mxm_case():
    text, mem, *_ = int8_setup(second_pass=True)
    return text, tuple(mem.items())


@functools.lru_cache(maxsize=None)
def vxm_gen():
    return generate(TINY, seed=11, n_transactions=10, sync=True)


def make(kind, engine):
    """A chip on TINY with its program loaded and inputs written: 'mxm' (MEM reads, LW/IW,
    ABC batches, ACC, writes, Repeats) or 'vxm' (random MEM/VXM/SXM traffic with Sync/Notify)."""
    if kind == "mxm":
        text, mem = mxm_case()
        return make_chip(engine, text, mem=dict(mem))
    gen = vxm_gen()
    chip = Chip(TINY, engine=engine)
    chip.load(gen.program)
    gen.load_inputs(chip)
    return chip


# snapshot points: mxm@17 an install pending, @24 a batch of 4 rows, a Repeat under way and products in flight,
# vxm@21 stream values, latch results and bank writes pending and a Notify issued, vxm@25 banks written
POINTS = {"mxm17": ("mxm", 17), "mxm24": ("mxm", 24), "vxm21": ("vxm", 21), "vxm25": ("vxm", 25)}


@functools.lru_cache(maxsize=None)
def _snap(point, engine):
    kind, at = POINTS[point]
    chip = make(kind, engine)
    chip.run(until=at)
    return chip.snapshot()


def snapshot(point, engine):
    """A private copy of the snapshot at ``point`` (arrays and scalars may be edited)."""
    s = _snap(point, engine)
    return Snapshot(s.engine, s.config, s.fp16_mxm, s.program_bytes, dict(s.scalars),
                    {k: v.copy() for k, v in s.arrays.items()})


def fresh(point, engine):
    return make(POINTS[point][0], engine)


def qs(a):
    return a["qs"].reshape(NQ, QW)


def repeating_queue(a, engine):
    rl = qs(a)[:, 2] if engine == "fast" else a["queues"][:, 3]
    return int(np.flatnonzero(rl > 0)[0])


def finished_queue(a, engine):
    if engine == "fast":
        q = qs(a)
        return int(np.flatnonzero((q[:, 0] == q[:, 1]) & (q[:, 2] == 0))[0])
    gen = vxm_gen()
    lens = [len(x) for x in gen.program.queue_lists()]
    return int(next(i for i, r in enumerate(a["queues"]) if r[0] == lens[i] and r[3] == 0))


def first(mask):
    return int(np.flatnonzero(np.asarray(mask).reshape(-1))[0])


def set_at(arr, i, v):
    arr.reshape(-1)[i] = v


# ---- fast engine: (case id, snapshot point, mutation) -------------------------------------------
def _f_repeat(a, field, delta):
    q = repeating_queue(a, "fast")
    qs(a)[q, field] += delta


def _f_qf(a):
    q = repeating_queue(a, "fast")
    a["qf"].reshape(NQ, -1)[q, 0] += 1


def _f_bacc(a):
    a["mx_bn"][0] = 1
    a["mx_bacc"][int(a["mx_bhead"][0])] = 99


FAST = [
    ("mx_an=65536", "mxm24", lambda a, s: set_at(a["mx_an"], 0, 65536)),
    ("mx_an=-1", "mxm24", lambda a, s: set_at(a["mx_an"], 0, -1)),
    ("mx_an_no_weights", "mxm24", lambda a, s: (set_at(a["mx_arr_slot"], 0, -1), set_at(a["mx_arr_dt"], 0, -1))),
    ("mx_bn", "mxm24", lambda a, s: set_at(a["mx_bn"], 0, 2 ** 31 - 1)),
    ("mx_bhead", "mxm24", lambda a, s: set_at(a["mx_bhead"], 0, -1)),
    ("mx_aacc", "mxm24", lambda a, s: set_at(a["mx_aacc"], 1, 99)),
    ("mx_aadd", "mxm24", lambda a, s: set_at(a["mx_aadd"], 1, 2)),
    ("mx_aland", "mxm24", lambda a, s: set_at(a["mx_aland"], 0, -5)),
    ("mx_bacc", "mxm24", lambda a, s: _f_bacc(a)),
    ("mx_arr_slot", "mxm24", lambda a, s: set_at(a["mx_arr_slot"], 0, 99)),
    ("mx_arr_slot_vs_dt", "mxm24", lambda a, s: set_at(a["mx_arr_slot"], 0, -1)),
    ("mx_arr_dt", "mxm24", lambda a, s: set_at(a["mx_arr_dt"], 0, 7)),
    ("mx_buf_slot", "mxm24", lambda a, s: set_at(a["mx_buf_slot"], 0, 2 ** 31 - 1)),
    ("mx_row_src", "mxm24", lambda a, s: set_at(a["mx_row_src"], 5, -1)),
    ("mx_xbuf", "mxm24", lambda a, s: set_at(a["mx_xbuf"], 0, 3)),
    ("mx_inst_slot", "mxm17", lambda a, s: set_at(a["mx_inst_slot"], first(a["mx_inst_T"] >= 0), 99)),
    ("mx_inst_dt", "mxm17", lambda a, s: set_at(a["mx_inst_dt"], first(a["mx_inst_T"] >= 0), 5)),
    ("mx_inst_T", "mxm17", lambda a, s: set_at(a["mx_inst_T"], 0, -2)),
    ("mx_busy_until", "mxm24", lambda a, s: set_at(a["mx_busy_until"], 0, -1)),
    ("mx_peak", "mxm24", lambda a, s: set_at(a["mx_peak"], 0, -1)),
    ("qs_pc_huge", "vxm21", lambda a, s: set_at(a["qs"], 0, 2 ** 63 - 1)),
    ("qs_pc_other_queue", "vxm21", lambda a, s: set_at(a["qs"], QW, 0) if qs(a)[1, 1] > 0 else None),
    ("qs_end", "vxm21", lambda a, s: set_at(a["qs"], 1, 10 ** 6)),
    ("qs_rep_left_neg", "vxm21", lambda a, s: set_at(a["qs"], 2, -1)),
    ("qs_rep_left", "mxm24", lambda a, s: _f_repeat(a, 2, 1000)),
    ("qs_rep_k", "mxm24", lambda a, s: _f_repeat(a, 3, 1)),
    ("qs_rep_d", "mxm24", lambda a, s: _f_repeat(a, 4, 1)),
    ("qs_rep_stride", "mxm24", lambda a, s: _f_repeat(a, 5, 1)),
    ("qs_rep_row", "mxm24", lambda a, s: _f_repeat(a, 6, 2 ** 40)),
    ("qs_syncs", "vxm21", lambda a, s: set_at(a["qs"], 7, -5)),
    ("qs_wait", "vxm21", lambda a, s: set_at(a["qs"], 8, 2 ** 31)),
    ("qs_sync_cycle", "vxm21", lambda a, s: set_at(a["qs"], 9, -1)),
    ("qf", "mxm24", lambda a, s: _f_qf(a)),
    ("qn_done_queue", "vxm21", lambda a, s: set_at(a["qn"], finished_queue(a, "fast"), 0)),
    ("qn_negative", "vxm21", lambda a, s: set_at(a["qn"], 0, -1)),
    ("wr_addr", "vxm21", lambda a, s: set_at(a["wr_addr"].reshape(-1, TINY.superlanes)[first(a["wr_tag"] >= 0)],
                                             0, 2 ** 31 - 1)),
    ("wr_tag", "vxm21", lambda a, s: set_at(a["wr_tag"], 0, -7)),
    ("wr_uniform", "vxm21", lambda a, s: set_at(a["wr_uniform"], 0, 2)),
    ("dg_n", "vxm21", lambda a, s: set_at(a["dg_n"], 0, 65536)),
    ("sg_start", "vxm21", lambda a, s: set_at(a["sg_start"], first(a["dg_n"] > 0) * TINY.positions, -1)),
    ("sg_pool", "vxm21", lambda a, s: set_at(a["sg_pool"], first(a["dg_n"] > 0) * TINY.positions, 2 ** 31 - 1)),
    ("sg_writer", "vxm21", lambda a, s: set_at(a["sg_writer"], first(a["dg_n"] > 0) * TINY.positions, NQ)),
    ("latch_valid", "vxm21", lambda a, s: set_at(a["latch_valid"], 0, 255)),
    ("lt_tag", "vxm21", lambda a, s: set_at(a["lt_tag"], 0, -2)),
    ("ib_head", "vxm21", lambda a, s: set_at(a["ib_head"], 0, 10 ** 9)),
    ("ib_n", "vxm21", lambda a, s: set_at(a["ib_n"], 0, -1)),
    ("ob_n", "vxm21", lambda a, s: set_at(a["ob_n"], 0, 10 ** 6)),
    ("lk_ready", "vxm21", lambda a, s: set_at(a["lk_ready"], 0, -2)),
    ("sx_use", "vxm21", lambda a, s: set_at(a["sx_use"], 0, -1)),
    ("st_issued", "vxm21", lambda a, s: set_at(a["st_issued"], 0, -1)),
    ("notifies", "vxm21", lambda a, s: set_at(a["notifies"], 0, -1)),
    ("perr_kind", "vxm21", lambda a, s: set_at(a["perr"], 0, 7)),
    ("perr_stream", "vxm21", lambda a, s: a["perr"].__setitem__(slice(0, 7), [1, 30, 0, 999, 0, 0, 0])),
    ("cycle", "vxm21", lambda a, s: s.__setitem__("cycle", -1)),
    ("t_not_before_cycle", "vxm21", lambda a, s: s.__setitem__("t", s["cycle"])),
    ("last_effect", "vxm21", lambda a, s: s.__setitem__("last_effect", -2)),
    ("done", "vxm21", lambda a, s: s.__setitem__("done", 2)),
    ("mx_cycle", "mxm24", lambda a, s: s.__setitem__("mx_cycle", 2 ** 63 - 1)),
    ("mx_cycle_macs", "mxm24", lambda a, s: s.__setitem__("mx_cycle_macs", -1)),
    ("sx_cycle", "vxm21", lambda a, s: s.__setitem__("sx_cycle", -2)),
]


# ---- reference engine --------------------------------------------------------------------------
def _r_col(name, col, v, row=0):
    def f(a, s):
        assert len(a[name]) > row, f"no {name} entries at this point"
        a[name][row, col] = v
    return f


def _r_q(col, v, q=0):
    def f(a, s):
        a["queues"][q, col] = v
    return f


def _r_rep(col, delta):
    def f(a, s):
        a["queues"][repeating_queue(a, "reference"), col] += delta
    return f


REFERENCE = [
    ("mx_pmeta_plane=65536", "mxm24", _r_col("mx_pmeta", 1, 65536)),
    ("mx_pmeta_acc", "mxm24", _r_col("mx_pmeta", 2, 99)),
    ("mx_pmeta_add", "mxm24", _r_col("mx_pmeta", 3, 2)),
    ("mx_pmeta_dtype", "mxm24", _r_col("mx_pmeta", 4, 7)),
    ("mx_pmeta_cycle", "mxm24", _r_col("mx_pmeta", 0, -1)),
    ("mx_imeta_plane", "mxm17", _r_col("mx_imeta", 0, -1)),
    ("mx_imeta_dtype", "mxm17", _r_col("mx_imeta", 2, 5)),
    ("mx_array_dt", "mxm24", lambda a, s: set_at(a["mx_array_dt"], 0, 7)),
    ("mx_busy_until", "mxm24", lambda a, s: set_at(a["mx_busy_until"], 0, -1)),
    ("mx_macs_in_cycle", "mxm24", lambda a, s: set_at(a["mx_macs"], 0, -1)),
    ("mx_peak", "mxm24", lambda a, s: s.__setitem__("mx_peak", -1)),
    ("queues_pc_huge", "vxm21", _r_q(0, 2 ** 63 - 1)),
    ("queues_pc_neg", "vxm21", _r_q(0, -1)),
    ("queues_next", "vxm21", _r_q(1, -2)),
    ("queues_rep", "vxm21", _r_q(2, -5)),
    ("queues_rep_left_neg", "vxm21", _r_q(3, -1)),
    ("queues_rep_left", "mxm24", _r_rep(3, 1000)),
    ("queues_rep_k", "mxm24", _r_rep(4, 1)),
    ("queues_rep_d", "mxm24", _r_rep(5, 1)),
    ("queues_rep_stride", "mxm24", _r_rep(6, 1)),
    ("queues_rep_row", "mxm24", _r_rep(2, -1)),
    ("queues_syncs", "vxm21", _r_q(7, -5)),
    ("queues_wait", "vxm21", _r_q(8, 2 ** 31)),
    ("queues_sync_cycle", "vxm21", _r_q(9, -1)),
    ("queues_next_done_queue", "vxm21", lambda a, s: a["queues"].__setitem__((finished_queue(a, "reference"), 1), 0)),
    ("st_pmeta_direction", "vxm21", _r_col("st_pmeta", 1, 2)),
    ("st_pmeta_position", "vxm21", _r_col("st_pmeta", 2, 2 ** 31)),
    ("st_pmeta_stream", "vxm21", _r_col("st_pmeta", 3, -1)),
    ("st_pmeta_writer", "vxm21", _r_col("st_pmeta", 4, NQ)),
    ("mem_pmeta_slice", "vxm21", _r_col("mem_pmeta", 1, 2 ** 63 - 1)),
    ("mem_paddr", "vxm21", _r_col("mem_paddr", 0, TINY.addresses_per_slice)),
    ("lt_pmeta_alu", "vxm21", _r_col("lt_pmeta", 1, 99)),
    ("sx_use_resource", "vxm21", _r_col("sx_use", 2, 99)),
    ("sx_use_hemisphere", "vxm21", _r_col("sx_use", 1, 2)),
    ("sx_use_count", "vxm21", _r_col("sx_use", 3, -1)),
    ("mem_banks_bank", "vxm25", _r_col("mem_banks", 1, -1)),
    ("mem_banks_slice", "vxm25", _r_col("mem_banks", 0, 99)),
    ("lk_state_ready", "vxm21", lambda a, s: set_at(a["lk_state"][1], 0, -2)),
    ("stats_issued", "vxm21", lambda a, s: set_at(a["stats_issued"], 0, -1)),
    ("notifies", "vxm21", lambda a, s: set_at(a["notifies"], 0, -1)),
    # found by the fuzz campaign: a 2-D 'notifies' raised TypeError in the reference engine's restore
    # (the fast engine reads it flat)
    ("notifies_2d", "vxm21", lambda a, s: a.__setitem__("notifies", a["notifies"][None])),
    ("cycle", "vxm21", lambda a, s: s.__setitem__("cycle", -1)),
    ("t_not_before_cycle", "vxm21", lambda a, s: s.__setitem__("t", s["cycle"])),
    ("last_effect", "vxm21", lambda a, s: s.__setitem__("last_effect", -2)),
    ("done", "vxm21", lambda a, s: s.__setitem__("done", 2)),
]


def _restore_corrupted(engine, point, mutate):
    snap = snapshot(point, engine)
    mutate(snap.arrays, snap.scalars)
    chip = fresh(point, engine)
    with pytest.raises(SnapshotError) as e:
        chip.restore(snap)
    return str(e.value)


@pytest.mark.parametrize("case", FAST, ids=[c[0] for c in FAST])
def test_fast_engine_rejects_corrupted_field(case):
    _, point, mutate = case
    msg = _restore_corrupted("fast", point, mutate)
    assert msg.startswith(("snapshot array", "snapshot scalar"))


@pytest.mark.parametrize("case", REFERENCE, ids=[c[0] for c in REFERENCE])
def test_reference_engine_rejects_corrupted_field(case):
    _, point, mutate = case
    msg = _restore_corrupted("reference", point, mutate)
    assert msg.startswith(("snapshot array", "snapshot scalar"))


def test_mx_an_65536_names_the_array_and_range():
    msg = _restore_corrupted("fast", "mxm24", lambda a, s: set_at(a["mx_an"], 0, 65536))
    assert msg == "snapshot array 'mx_an'[0] (batch rows, the batch holds 512) is 65536, allowed 0..512"


def test_a_rejected_snapshot_leaves_the_chip_as_it_was(engine):
    chip = fresh("mxm24", engine)
    chip.run(until=20)
    before = chip.snapshot()
    bad = snapshot("mxm24", engine)
    bad.scalars["cycle"] = -1
    with pytest.raises(SnapshotError):
        chip.restore(bad)
    after = chip.snapshot()
    assert after.scalars == before.scalars
    assert all(np.array_equal(after.arrays[k], before.arrays[k]) for k in before.arrays)


@pytest.mark.parametrize("point", ["mxm24", "vxm21"])
def test_has_program_must_match_the_state(engine, point, tmp_path):
    """A snapshot whose header says no program was loaded, with queues part way through one."""
    s = snapshot(point, engine)
    bare = Snapshot(s.engine, s.config, s.fp16_mxm, None, s.scalars, s.arrays)
    with pytest.raises(SnapshotError):
        Chip(TINY, engine=engine).restore(bare)
    bare.save(tmp_path / "s.lpusnap")
    with pytest.raises(SnapshotError):
        Chip(TINY, engine=engine).restore(Snapshot.load(tmp_path / "s.lpusnap"))


def test_has_program_flag_in_the_file_header(engine, tmp_path):
    s = snapshot("vxm21", engine)
    s.save(tmp_path / "s.lpusnap")
    for flag, want in ((False, "holds a program"), ("yes", "has_program"), (2, "has_program")):
        src = zipfile.ZipFile(tmp_path / "s.lpusnap")
        out = tmp_path / f"bad{flag}.lpusnap"
        with zipfile.ZipFile(out, "w") as z:
            for n in src.namelist():
                data = src.read(n)
                if n == "__meta__.npy":
                    arr = np.load(src.open(n))
                    meta = json.loads(arr.tobytes().decode())
                    meta["has_program"] = flag
                    buf = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
                    f = io.BytesIO()
                    np.save(f, buf)
                    data = f.getvalue()
                z.writestr(n, data)
        src.close()
        with pytest.raises(SnapshotError, match=want):
            Snapshot.load(out)


def test_genuine_snapshots_still_restore_and_finish_the_same(engine):
    for point in POINTS:
        whole = fresh(point, engine)
        whole.run()
        chip = fresh(point, engine)
        chip.restore(snapshot(point, engine))
        chip.run()
        assert chip.cycle == whole.cycle
        assert chip.stats().to_dict() == whole.stats().to_dict()


# ---- random single-value mutations --------------------------------------------------------------
EXAMPLES = int(os.environ.get("LPUCORE_HOSTILE_EXAMPLES", "150"))
EDGES = [-1, 0, 1, 2, 3, 5, 16, 255, 65536, 2 ** 31 - 1, 2 ** 31, 2 ** 62, 2 ** 63 - 1, -2 ** 63]


def _cast(v, dtype):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return bool(v & 1)
    if dtype.kind == "f":
        return dtype.type(v)
    bits = dtype.itemsize * 8
    v %= 2 ** bits
    if dtype.kind == "i" and v >= 2 ** (bits - 1):
        v -= 2 ** bits
    return dtype.type(v)


def outcome(chip):
    """What a run leaves: (error text or None, cycle, memory)."""
    try:
        chip.run()
        err = None
    except LpuError as e:
        err = f"{type(e).__name__}: {e}"
    mem = chip.memory()
    return err, chip.cycle, mem


def _mutate_and_run(engine, point, name, idx, value):
    snap = snapshot(point, engine)
    if name in snap.scalars:
        snap.scalars[name] = value
    else:
        arr = snap.arrays[name]
        if arr.size == 0:
            return "empty"
        flat = arr.reshape(-1)
        flat[idx % arr.size] = _cast(value, arr.dtype)
    chip = fresh(point, engine)
    try:
        chip.restore(snap)
    except SnapshotError:
        return "rejected"
    return outcome(chip)


# fields the two engines keep in the same form: a mutation of one gives the same run on both
COMMON = {"sram": "sram", "notifies": "notifies", "st_issued": "stats_issued", "cycle": "cycle",
          "last_effect": "last_effect"}


def _fields(engine):
    names = set()
    for p in POINTS:
        s = _snap(p, engine)
        names |= set(s.arrays) | set(s.scalars)
    return sorted(names)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_single_value_mutations_never_crash(data):
    engine = data.draw(st.sampled_from(["fast", "reference"]))
    point = data.draw(st.sampled_from(sorted(POINTS)))
    name = data.draw(st.sampled_from(_fields(engine)))
    idx = data.draw(st.integers(0, 2 ** 20))
    value = data.draw(st.sampled_from(EDGES) | st.integers(-4, 80))
    _mutate_and_run(engine, point, name, idx, value)     # SnapshotError or a run; never a crash


@settings(max_examples=max(1, EXAMPLES // 2), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_common_field_mutations_give_the_same_outcome_on_both_engines(data):
    point = data.draw(st.sampled_from(sorted(POINTS)))
    fast_name = data.draw(st.sampled_from(sorted(COMMON)))
    idx = data.draw(st.integers(0, 2 ** 20))
    value = data.draw(st.sampled_from(EDGES) | st.integers(-4, 80))
    f = _mutate_and_run("fast", point, fast_name, idx, value)
    r = _mutate_and_run("reference", point, COMMON[fast_name], idx, value)
    if isinstance(f, str) or isinstance(r, str):
        assert f == r
        return
    assert f[0] == r[0] and f[1] == r[1]
    assert np.array_equal(f[2], r[2])


# ---- damaged zip containers (found by the fuzz campaign: zipfile's NotImplementedError and RuntimeError) ----
def _central_record(data):
    return data.index(b"PK\x01\x02")


@pytest.mark.parametrize("what,offset,value,local", [
    ("zip version 15.9", 6, 0x9F, False),
    ("an encrypted member", 8, 1, True),
    ("an unknown compression method", 10, 99, True),
    ("deflate", 10, 8, True),
    ("bzip2", 10, 12, True),
    ("lzma", 10, 14, True),
])
def test_damaged_zip_container_is_a_snapshot_error(tmp_path, what, offset, value, local):
    path = tmp_path / "s.lpusnap"
    snapshot("vxm21", "fast").save(path)
    data = bytearray(path.read_bytes())
    at = _central_record(data)
    data[at + offset:at + offset + 2] = value.to_bytes(2, "little")
    if local:                                        # the member's local header says the same
        data[offset - 2:offset] = value.to_bytes(2, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="corrupted or truncated"):
        Snapshot.load(path)


def test_an_array_header_asking_for_too_much_memory_is_a_snapshot_error(tmp_path):
    src = tmp_path / "s.lpusnap"
    snapshot("vxm21", "reference").save(src)
    out = tmp_path / "huge.lpusnap"
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(out, "w") as w:
        for n in z.namelist():
            data = z.read(n)
            if n == "a__sram.npy":
                f = io.BytesIO()
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                         "shape": (2 ** 62,)})
                data = f.getvalue() + b"\0" * 64
            w.writestr(n, data)
    with pytest.raises(SnapshotError, match="corrupted"):
        Snapshot.load(out)


def _rewrite(src, out, member, data_fn):
    """Copy snapshot file ``src`` to ``out`` with member ``member``'s bytes replaced by data_fn(bytes)."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(out, "w") as w:
        for n in z.namelist():
            data = z.read(n)
            w.writestr(n, data_fn(data) if n == member else data)


def test_a_garbled_array_header_is_a_snapshot_error(tmp_path):
    """A NUL and an unclosed bracket in an .npy header made NumPy's reader raise tokenize.TokenError."""
    src = tmp_path / "s.lpusnap"
    snapshot("vxm21", "fast").save(src)
    head = b"{'descr': '<i8', 'shape': (\x00"
    head += b" " * (118 - len(head)) + b"\n"
    _rewrite(src, tmp_path / "bad.lpusnap", "a__sram.npy",
             lambda d: b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head + b"\0" * 64)
    with pytest.raises(SnapshotError, match="corrupted or truncated"):
        Snapshot.load(tmp_path / "bad.lpusnap")


@pytest.mark.parametrize("value", [2 ** 63 + 2, -2 ** 64, 10 ** 30])
def test_scalars_beyond_int64_are_a_snapshot_error(engine, value):
    """Scalars come from the file's JSON header as Python ints of any size (OverflowError before)."""
    for key in sorted(snapshot("vxm21", engine).scalars):
        snap = snapshot("vxm21", engine)
        snap.scalars[key] = value
        with pytest.raises(SnapshotError, match=f"scalar {key}"):
            fresh("vxm21", engine).restore(snap)


def test_a_non_finite_scalar_in_the_header_is_a_snapshot_error(tmp_path):
    src = tmp_path / "s.lpusnap"
    snapshot("vxm21", "reference").save(src)

    def infinite_cycle(data):
        meta = json.loads(np.load(io.BytesIO(data)).tobytes().decode())
        meta["scalars"]["cycle"] = float("inf")
        f = io.BytesIO()
        np.save(f, np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        return f.getvalue()

    _rewrite(src, tmp_path / "inf.lpusnap", "__meta__.npy", infinite_cycle)
    with pytest.raises(SnapshotError, match="bad header"):
        Snapshot.load(tmp_path / "inf.lpusnap")
