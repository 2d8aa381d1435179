"""Untrusted model directories (config.json + safetensors) never reach the chip: every malformed, oversized or
escaping file raises ModelError (an LpuError) naming the file and the key or tensor, quickly; and the command
line reports it, and every other user mistake of every subcommand, as one ``lpucore: error:`` line."""

import json
import math
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import one_error_line

from lpucore import LpuError, ModelError
from lpucore.cli import main
from lpucore.llm import (
    Decoder,
    ModelConfig,
    load_config,
    load_pretrained,
    model_config,
    random_weights,
    save_pretrained,
)
from lpucore.llm.shapes import LIMITS
from lpucore.llm.weights import MAX_BYTES_ENV, host_memory_bytes

st = pytest.importorskip("safetensors")

FAST = 2.0          # seconds: the caps, not a timeout, keep every refusal quick


@pytest.fixture(scope="module")
def tiny():
    cfg = model_config("tiny")
    return cfg, random_weights(cfg, 0)


@pytest.fixture
def model(tmp_path, tiny):
    """A valid one-file tiny llama directory."""
    d = tmp_path / "model"
    save_pretrained(d, *tiny)
    return d


@pytest.fixture
def sharded(tmp_path, tiny):
    """A valid sharded tiny llama directory (index + shards)."""
    d = tmp_path / "sharded"
    save_pretrained(d, *tiny, max_shard_bytes=60_000)
    assert (d / "model.safetensors.index.json").is_file()
    return d


def refused(d, *fragments, **kw):
    """load_pretrained(d) raises a ModelError containing every fragment, in under FAST seconds."""
    t = time.perf_counter()
    with pytest.raises(ModelError) as info:
        load_pretrained(d, **kw)
    assert time.perf_counter() - t < FAST
    e = info.value
    assert isinstance(e, LpuError) and isinstance(e, ValueError)
    for f in fragments:
        assert f in str(e), (f, str(e))
    return e


def edit_config(d, **changes):
    hf = json.loads((d / "config.json").read_text())
    hf.update(changes)
    (d / "config.json").write_text(json.dumps(hf))


# ---------------------------------------------------------------------- config.json

def test_valid_directories_still_load(model, sharded, tiny):
    for d in (model, sharded):
        cfg, w = load_pretrained(d)
        assert cfg == tiny[0] and all(np.array_equal(w[k], tiny[1][k]) for k in w)


@pytest.mark.parametrize("text,fragments", [
    ("[1, 2, 3]", ("config.json", "JSON object", "list")),
    ('"llama"', ("config.json", "JSON object", "str")),
    ("{not json", ("config.json", "not valid JSON")),
    ("", ("config.json", "not valid JSON")),
    ("[" * 100_000 + "]" * 100_000, ("config.json", "not valid JSON")),
    (b"\xff\xfe{}", ("config.json", "not valid JSON")),
])
def test_config_json_that_is_not_an_object(model, text, fragments):
    p = model / "config.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(model, *fragments)


@pytest.mark.parametrize("changes,fragments", [
    ({"rope_scaling": [1, 2]}, ("'rope_scaling'", "JSON object")),
    ({"rope_parameters": "x"}, ("'rope_parameters'",)),
    ({"rope_scaling": {"rope_type": "yarn"}}, ("'rope_scaling'", "not supported")),
    ({"sliding_window": "4096"}, ("'sliding_window'", "integer")),
    ({"sliding_window": 16}, ("'sliding_window'", "not supported")),
    ({"num_hidden_layers": 10 ** 9}, ("'num_hidden_layers'", "limit", f"{LIMITS['n_layers']:,}")),
    ({"num_hidden_layers": 1e9}, ("'num_hidden_layers'", "positive integer")),
    ({"hidden_size": 1 << 40}, ("'hidden_size'", "limit")),
    ({"vocab_size": 10 ** 12}, ("'vocab_size'", "limit")),
    ({"intermediate_size": -5}, ("'intermediate_size'", "positive integer")),
    ({"num_attention_heads": None}, ("'num_attention_heads'", "lacks")),
    ({"num_attention_heads": True}, ("'num_attention_heads'",)),
    ({"rms_norm_eps": "1e-5"}, ("'rms_norm_eps'", "finite number")),
    ({"rope_theta": float("inf")}, ("'rope_theta'", "finite number")),
    ({"tie_word_embeddings": "no"}, ("'tie_word_embeddings'", "true or false")),
    ({"architectures": 5, "model_type": None}, ("'architectures'",)),
    ({"architectures": [{"a": 1}], "model_type": None}, ("'architectures'",)),
    ({"model_type": ["llama"], "architectures": None}, ("'model_type'", "unsupported model")),
    ({"_name_or_path": {"x": 1}, "num_key_value_heads": 3}, ("'num_attention_heads'", "multiple")),
    ({"num_local_experts": 10 ** 6, "model_type": "mixtral"}, ("'num_local_experts'", "limit")),
])
def test_bad_config_fields_are_named(model, changes, fragments):
    edit_config(model, **changes)
    e = refused(model, "config.json", *fragments)
    assert e.path == str(model.resolve() / "config.json")
    with pytest.raises(ModelError):
        load_config(model)
    with pytest.raises(ModelError):
        Decoder.from_pretrained(model)


def test_huge_shapes_are_refused_before_any_tensor_is_enumerated():
    t = time.perf_counter()
    for f, cap in LIMITS.items():
        kw = dict(name="x", family="mixtral" if f in ("n_experts", "top_k") else "llama", vocab_size=256,
                  d_model=64, n_layers=2, n_heads=4, d_ff=128, max_positions=128)
        if f in ("n_experts", "top_k"):
            kw.update(n_experts=4, top_k=2)
        kw[f] = cap + 1
        with pytest.raises(ModelError, match=f"{f} .* exceeds"):
            ModelConfig(**kw)
    assert time.perf_counter() - t < FAST


def test_missing_or_escaping_config(tmp_path, model):
    (model / "config.json").unlink()
    refused(model, "has no config.json")
    refused(tmp_path / "nonesuch", "no such directory")
    # a config.json symlinked from elsewhere is the directory owner's choice (Hugging Face's cache
    # links every file of a snapshot into ../../blobs): followed
    secret = tmp_path / "elsewhere.json"
    secret.write_text(json.dumps(model_config("tiny").to_hf()))
    (model / "config.json").symlink_to(secret)
    load_pretrained(model)


# ---------------------------------------------------------------------- the index

@pytest.mark.parametrize("doc,fragments", [
    ({"metadata": {}}, ("'weight_map'", "missing")),
    ({"weight_map": ["a"]}, ("'weight_map'", "list")),
    ([1], ("index.json", "JSON object")),
    ({"weight_map": {"model.norm.weight": 7}}, ("weight_map['model.norm.weight']", "non-empty string")),
    ({"weight_map": {"model.norm.weight": "/etc/passwd"}}, ("absolute path",)),
    ({"weight_map": {"model.norm.weight": "nonesuch.safetensors"}}, ("'nonesuch.safetensors'", "does not exist")),
])
def test_bad_index(sharded, doc, fragments):
    (sharded / "model.safetensors.index.json").write_text(json.dumps(doc))
    refused(sharded, "model.safetensors.index.json", *fragments)


def test_index_cannot_leave_the_directory(tmp_path, sharded, tiny):
    other = tmp_path / "other"
    save_pretrained(other, *tiny)
    index = sharded / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    first = next(iter(doc["weight_map"]))
    doc["weight_map"][first] = "../other/model.safetensors"
    index.write_text(json.dumps(doc))
    refused(sharded, "../other/model.safetensors", "outside the model directory")


def test_symlinks_are_followed_as_in_the_hugging_face_cache(tmp_path, model, sharded, tiny):
    """Paths an index names must stay inside the directory; symlinks the directory's owner made
    are followed (a snapshot of Hugging Face's cache links every file into ../../blobs)."""
    other = tmp_path / "other"
    save_pretrained(other, *tiny)
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").symlink_to(other / "model.safetensors")
    load_pretrained(model)
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.rename(tmp_path / "moved.safetensors")
    shard.symlink_to(tmp_path / "moved.safetensors")
    load_pretrained(sharded)
    shard.unlink()
    shard.symlink_to(shard.name)                                  # a loop
    refused(sharded, shard.name)


# ---------------------------------------------------------------------- safetensors files

def header_file(path, header, data=b""):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.mark.parametrize("how,fragments", [
    ("empty", ("too short", "truncated or empty")),
    ("short", ("too short",)),
    ("truncated", ("truncated",)),
    ("garbage", ("header length",)),
    ("header-not-json", ("header is not valid JSON",)),
    ("header-list", ("header is not a JSON object",)),
    ("bad-dtype", ("unsupported dtype",)),
    ("bad-shape", ("shape must be",)),
    ("bad-offsets", ("data_offsets",)),
    ("huge-shape", ("data_offsets", "truncated")),
    ("size-mismatch", ("needs",)),
])
def test_bad_safetensors(model, how, fragments):
    p = model / "model.safetensors"
    raw = p.read_bytes()
    if how == "empty":
        p.write_bytes(b"")
    elif how == "short":
        p.write_bytes(raw[:5])
    elif how == "truncated":
        p.write_bytes(raw[: len(raw) // 2])
    elif how == "garbage":
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif how == "header-not-json":
        p.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    elif how == "header-list":
        header_file(p, [1, 2])
    elif how == "bad-dtype":
        header_file(p, {"model.norm.weight": {"dtype": "F99", "shape": [64], "data_offsets": [0, 128]}}, b"\0" * 128)
    elif how == "bad-shape":
        header_file(p, {"model.norm.weight": {"dtype": "F16", "shape": "64", "data_offsets": [0, 128]}}, b"\0" * 128)
    elif how == "bad-offsets":
        header_file(p, {"model.norm.weight": {"dtype": "F16", "shape": [64], "data_offsets": [0]}}, b"\0" * 128)
    elif how == "huge-shape":
        n = 10 ** 6
        header_file(p, {"model.norm.weight": {"dtype": "F16", "shape": [n, n], "data_offsets": [0, 2 * n * n]}})
    elif how == "size-mismatch":
        header_file(p, {"model.norm.weight": {"dtype": "F16", "shape": [64], "data_offsets": [0, 100]}}, b"\0" * 128)
    e = refused(model, "model.safetensors", *fragments)
    assert e.path is not None and e.path.endswith("model.safetensors")


def test_tensor_names_and_shapes_are_checked_from_the_headers(model, tiny):
    from safetensors.numpy import save_file
    cfg, w = tiny
    gone = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in w.items() if k != gone}, str(model / "model.safetensors"))
    refused(model, gone, "missing tensor")
    save_file(dict(w, **{"model.layers.1.mlp.up_proj.weight": np.zeros((3, 3), np.float16)}),
              str(model / "model.safetensors"))
    e = refused(model, "model.safetensors", "up_proj", "shape")
    assert e.field == gone
    save_file(dict(w, **{"model.norm.weight": np.zeros(64, np.int32)}), str(model / "model.safetensors"))
    refused(model, "model.norm.weight", "float type")


def test_a_tensor_in_two_shards(sharded):
    shards = sorted(sharded.glob("model-*.safetensors"))
    (sharded / "model.safetensors.index.json").unlink()
    (sharded / "copy.safetensors").write_bytes(shards[0].read_bytes())
    refused(sharded, "more than one file")


# ---------------------------------------------------------------------- host memory

def test_weights_bigger_than_the_limit_are_refused_before_reading(model, monkeypatch):
    total = sum(a.nbytes for a in load_pretrained(model)[1].values())
    refused(model, "need", f"{total:,} bytes", "max_bytes", max_bytes=total - 1)
    load_pretrained(model, max_bytes=total)
    monkeypatch.setenv(MAX_BYTES_ENV, "1000")
    assert host_memory_bytes() == 1000
    refused(model, MAX_BYTES_ENV)
    with pytest.raises(ModelError):
        Decoder.from_pretrained(model)
    monkeypatch.setenv(MAX_BYTES_ENV, "lots")
    refused(model, MAX_BYTES_ENV, "number of bytes")
    monkeypatch.delenv(MAX_BYTES_ENV)
    assert host_memory_bytes() == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_a_header_claiming_more_than_the_host_has(model, monkeypatch):
    """Shapes within the file but beyond host memory: refused from the header, nothing allocated."""
    monkeypatch.setenv(MAX_BYTES_ENV, str(4096))
    p = model / "model.safetensors"
    header_file(p, {"model.norm.weight": {"dtype": "F16", "shape": [64], "data_offsets": [0, 128]},
                    "pad": {"dtype": "U8", "shape": [8192], "data_offsets": [128, 128 + 8192]}}, b"\0" * (128 + 8192))
    refused(model)      # missing / unexpected tensors are named before the memory check


# ---------------------------------------------------------------------- non-finite weights

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_by_name(tmp_path, tiny, bad):
    cfg, w = tiny
    w = dict(w)
    name = "model.layers.0.self_attn.k_proj.weight"
    w[name] = w[name].copy()
    w[name][3, 5] = bad
    d = tmp_path / "nan"
    save_pretrained(d, cfg, w, max_shard_bytes=60_000)
    e = refused(d, name, "non-finite", "allow_nonfinite=True")
    assert e.field == name and e.path.endswith(".safetensors")
    with pytest.raises(ModelError, match="non-finite"):
        Decoder.from_pretrained(d)
    _, loaded = load_pretrained(d, allow_nonfinite=True)
    assert not math.isfinite(float(loaded[name][3, 5]))
    assert Decoder.from_pretrained(d, allow_nonfinite=True, capacity=4).cfg == cfg


# ---------------------------------------------------------------------- the command line

def corrupt(d, how):
    if how == "config-list":
        (d / "config.json").write_text("[1]")
    elif how == "rope-list":
        edit_config(d, rope_scaling=[1])
    elif how == "window-str":
        edit_config(d, sliding_window="x")
    elif how == "layers":
        edit_config(d, num_hidden_layers=10 ** 9)
    elif how == "truncated":
        p = d / "model.safetensors"
        p.write_bytes(p.read_bytes()[:100])
    elif how == "empty":
        (d / "model.safetensors").write_bytes(b"")
    elif how == "garbage":
        (d / "model.safetensors").write_bytes(b"\x07" * 1000)
    elif how == "index-no-map":
        (d / "model.safetensors.index.json").write_text("{}")
    elif how == "index-missing":
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "b.safetensors"}}))
    elif how == "index-escape":
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"a": "../other/model.safetensors"}}))
    elif how == "nan":
        from safetensors.numpy import load_file, save_file
        w = load_file(str(d / "model.safetensors"))
        w["model.norm.weight"][0] = np.nan
        save_file(w, str(d / "model.safetensors"))


@pytest.mark.parametrize("how,fragment", [
    ("config-list", "config.json"), ("rope-list", "rope_scaling"), ("window-str", "sliding_window"),
    ("layers", "num_hidden_layers"), ("truncated", "model.safetensors"), ("empty", "model.safetensors"),
    ("garbage", "model.safetensors"), ("index-no-map", "weight_map"), ("index-missing", "b.safetensors"),
    ("index-escape", "outside the model directory"), ("nan", "model.norm.weight"),
])
def test_decode_reports_a_bad_model_directory_in_one_line(tmp_path, model, tiny, capsys, how, fragment):
    save_pretrained(tmp_path / "other", *tiny)
    corrupt(model, how)
    t = time.perf_counter()
    assert main(["decode", "--model", str(model), "--tokens", "1", "--capacity", "4", "-q"]) == 1
    assert time.perf_counter() - t < FAST
    one_error_line(capsys, fragment)


def test_decode_allow_nonfinite(model, capsys):
    corrupt(model, "nan")
    assert main(["decode", "--model", str(model), "--tokens", "1", "--capacity", "4", "-q",
                 "--allow-nonfinite"]) == 0
    assert "tokens: " in capsys.readouterr().out


GARBAGE = b"\x00\xffgarbage\x93" * 10


@pytest.mark.parametrize("argv,status,fragments", [
    # asm
    (["asm", "nonesuch.s"], 1, ("nonesuch.s",)),
    (["asm", "garbage.bin"], 1, ("garbage.bin",)),
    (["asm", "."], 1, ("Is a directory",)),
    (["asm", "prog.s", "--bogus"], 2, ("--bogus",)),
    # disasm
    (["disasm", "garbage.bin"], 1, ("garbage.bin",)),
    (["disasm", "nonesuch.lpup"], 1, ("nonesuch.lpup",)),
    (["disasm"], 2, ("required",)),
    # run
    (["run", "garbage.lpup"], 1, ("garbage.lpup",)),
    (["run", "prog.s", "--input", "x=garbage.bin"], 1, ("garbage.bin",)),
    (["run", "prog.s", "--max-cycles", "-1"], 2, ("--max-cycles",)),
    (["run", "prog.s", "--engine", "warp"], 2, ("--engine",)),
    # info
    (["info", "--config", "nonesuch"], 2, ("nonesuch",)),
    (["info", "extra.json"], 2, ("unrecognized",)),
    # bench
    (["bench", "nonesuch"], 2, ("unknown benchmark",)),
    (["bench", "engine", "--bogus"], 2, ("bench_engine.py", "--bogus")),
    (["bench", "engine", "--cycles", "many"], 2, ("--cycles",)),
    # decode
    (["decode", "--model", "garbage.bin"], 1, ("neither a directory",)),
    (["decode", "--model", "tiny", "--tokens", "x"], 2, ("--tokens",)),
    (["decode", "--model", "tiny", "--precision", "fp8"], 2, ("--precision",)),
    (["decode", "--model", "tiny", "--seed", "-1"], 2, ("--seed", ">= 0")),
    # relay
    (["relay", "--topology", "torus"], 2, ("--topology",)),
    (["relay", "--config", "tiny", "--chips", "0"], 1, ("at least one chip",)),
    (["relay", "--config", "tiny", "--links", "8", "--vectors", "0"], 1, ("0 vectors",)),
    (["relay", "--config", "tiny", "--links", "8", "--seed", "-1"], 2, ("--seed", ">= 0")),  # was a traceback
    (["relay", "--config", "tiny", "--links", "8", "--seed", "x"], 2, ("--seed", "integer seed")),
    # no command / unknown command
    ([], 2, ("required",)),
    (["frobnicate"], 2, ("frobnicate",)),
])
def test_every_subcommand_reports_bad_files_and_flags_in_one_line(tmp_path, monkeypatch, capsys, argv, status,
                                                                   fragments):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.bin").write_bytes(GARBAGE)
    (tmp_path / "garbage.lpup").write_bytes(GARBAGE)
    (tmp_path / "prog.s").write_text(".config tiny\n.tensor x int8 (1, 16) W0:0x0\n")
    assert main(argv) == status
    one_error_line(capsys, *fragments)


def test_os_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    import lpucore.cli as cli

    def denied(args):
        raise PermissionError(13, "Permission denied", "/some/model")
    monkeypatch.setattr(cli, "_cmd_info", denied)
    assert main(["info"]) == 1
    one_error_line(capsys, "/some/model", "Permission denied")

    def bug(args):
        raise KeyError("internal")
    monkeypatch.setattr(cli, "_cmd_info", bug)
    with pytest.raises(KeyError):
        main(["info"])


def test_model_directory_paths_stay_relative_to_their_directory(tmp_path, model):
    """A relative model path and one through a symlinked directory load the same."""
    link = tmp_path / "link"
    link.symlink_to(model, target_is_directory=True)
    cwd = Path.cwd()
    try:
        os.chdir(tmp_path)
        assert load_pretrained("model")[0] == load_pretrained(link)[0]
    finally:
        os.chdir(cwd)
