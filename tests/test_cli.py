"""The command line (python -m lpucore): asm, disasm, run, info, bench and its error reporting."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import one_error_line

from lpucore import ChipConfig, LpuError, Program, assemble, cli
from lpucore.cli import main

ROOT = Path(__file__).resolve().parent.parent

# x * 3 through the VXM, relu, written back: the README's first program on the tiny chip.
SRC = """\
.config tiny
.tensor x int8 (1, 16) W0:0x0          ; input
.tensor y int8 (1, 16) E0:0x0          ; output
.queue MEM.W0
    Read 0x0, E0
.queue VXM.1
    const int8, -, 3
.queue VXM.0
    NOP 3
    mul int8, -, E0, A1
.queue VXM.2
    NOP 5
    relu int8, E1, A0
.queue MEM.E0
    NOP 8
    Write 0x0, E1
"""

# what disasm must print for SRC: canonical operands, queues in the chip's order
DISASM = """\
.config tiny
.tensor x int8 (1, 16) [W0:0x0+1]
.tensor y int8 (1, 16) [E0:0x0+1]
.queue MEM.W0
    Read 0x0, E0
.queue MEM.E0
    NOP 8
    Write 0x0, E1
.queue VXM.0
    NOP 3
    mul int8, -, E0, A1
.queue VXM.1
    const int8, -, 3
.queue VXM.2
    NOP 5
    relu int8, E1, A0
"""


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A temporary working directory holding prog.s and x.npy."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prog.s").write_text(SRC)
    x = (np.arange(16) * 17 % 256 - 128).astype(np.int8).reshape(1, 16)
    np.save(tmp_path / "x.npy", x)
    return tmp_path


def expected_y(x):
    return np.maximum(x * np.int8(3), 0)          # int8 wraps, as on the chip


def value_of(out, key):
    """The value column of the `info` row named key."""
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == key:
            return parts[1]
    raise AssertionError(f"no row {key!r} in:\n{out}")


# ---- asm / disasm ----------------------------------------------------------------------------
def test_asm_then_disasm(work, capsys):
    assert main(["asm", "prog.s", "-o", "prog.lpup"]) == 0
    out = capsys.readouterr().out
    assert "prog.lpup: 8 instructions in 5 queues, 2 tensors, chip tiny" in out
    assert Program.load("prog.lpup") == assemble(SRC)

    assert main(["disasm", "prog.lpup"]) == 0
    assert capsys.readouterr().out == DISASM

    assert main(["disasm", "prog.lpup", "-o", "back.s"]) == 0
    assert (work / "back.s").read_text() == DISASM
    assert assemble(DISASM) == assemble(SRC)


def test_asm_default_output_and_config(work, capsys):
    (work / "plain.s").write_text("MEM.W1: Read 5, E2\n")        # no .config line
    assert main(["asm", "plain.s", "--config", "tiny"]) == 0
    p = Program.load("plain.lpup")
    assert p.config == ChipConfig.tiny() and len(p) == 1
    assert main(["asm", "plain.s", "-o", "big.lpup"]) == 0
    assert Program.load("big.lpup").config == ChipConfig.groqchip1()


# ---- run -------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_run_binary_with_input_and_output(work, capsys, engine):
    assert main(["asm", "prog.s"]) == 0
    capsys.readouterr()
    assert main(["run", "prog.lpup", "--input", "x=x.npy", "--output", "y=y.npy", "--engine", engine]) == 0
    out = capsys.readouterr().out
    # last bank write at cycle 10, + the tiny chip's stagger of 2
    assert out.splitlines()[0].startswith("12 cycles = 13.33 ns at 900 MHz (finished); 5 vector instructions, "
                                          f"{engine} engine, chip tiny")
    assert "wrote y (int8 (1, 16)) to y.npy" in out
    y = np.load("y.npy")
    x = np.load("x.npy")
    assert y.dtype == np.int8 and y.shape == (1, 16)
    assert np.array_equal(y, expected_y(x))
    assert y.min() == 0 and y.max() > 0                    # the test data exercises relu and wrap


def test_run_source_directly_with_stats_json(work, capsys):
    assert main(["run", "prog.s", "-i", "x=x.npy", "-o", "y=out.npy", "--json", "stats.json"]) == 0
    assert np.array_equal(np.load("out.npy"), expected_y(np.load("x.npy")))
    stats = json.loads((work / "stats.json").read_text())
    assert stats["cycles"] == 12 and stats["finished"] and stats["engine"] == "fast"
    assert stats["instructions"] == 5 and stats["config"] == "tiny"
    assert capsys.readouterr().out.startswith("12 cycles")

    assert main(["run", "prog.s", "-i", "x=x.npy", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["cycles"] == 12          # stdout is only the JSON


def test_run_max_cycles(work, capsys):
    assert main(["run", "prog.s", "--max-cycles", "3"]) == 0
    assert capsys.readouterr().out.startswith("3 cycles = 3.333 ns at 900 MHz (stopped by --max-cycles")


def test_load_npy_native_byte_order(work):
    np.save("be.npy", np.arange(-3, 3, dtype=">i2"))
    a = cli.load_npy("be.npy")
    assert a.dtype == np.int16 and a.tolist() == list(range(-3, 3))


# ---- info ------------------------------------------------------------------------------------
def test_info_groqchip(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("chip configuration groqchip1")
    assert value_of(out, "mxm_int8_macs_per_cycle") == "409,600"
    assert value_of(out, "int8_tops") == "737.28"            # 2 x 409,600 x 900 MHz
    assert value_of(out, "mxm_fp16_macs_per_cycle") == "102,400"
    assert value_of(out, "fp16_tflops") == "184.32"
    assert value_of(out, "sram_bytes") == "230,686,720"      # 88 x 8,192 x 320 B
    assert value_of(out, "sram_mib") == "220.00"
    assert value_of(out, "mem_port_tb_per_s") == "50.69"     # 88 slices x 2 banks x 320 B x 900 MHz
    assert value_of(out, "clock_hz") == "900,000,000"
    assert "derived peaks at 900 MHz" in out


def test_info_tiny(capsys):
    assert main(["info", "--config", "tiny"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("chip configuration tiny")
    assert value_of(out, "mxm_int8_macs_per_cycle") == "1,024"     # 4 planes x 16 x 16
    assert value_of(out, "int8_tops") == "1.84"
    assert value_of(out, "mxm_fp16_macs_per_cycle") == "256"
    assert value_of(out, "fp16_tflops") == "0.4608"
    assert value_of(out, "sram_bytes") == "8,192"                  # 8 slices x 64 x 16 B
    assert value_of(out, "mem_port_bytes_per_cycle") == "256"
    assert value_of(out, "lanes") == "16"


@pytest.mark.parametrize("name", ChipConfig.PRESETS)
def test_info_json_agrees_with_config_peaks(capsys, name):
    assert main(["info", "--config", name, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    cfg = ChipConfig.named(name)
    peaks = cfg.peaks()
    derived = {k: v["value"] for k, v in d["derived"].items()}
    assert d["config"] == name and d["fields"]["mxm_size"]["value"] == cfg.mxm_size
    assert derived["mxm_int8_macs_per_cycle"] == peaks["int8_macs_per_cycle"]
    assert derived["int8_tops"] == pytest.approx(peaks["int8_tops"])
    assert derived["fp16_tflops"] == pytest.approx(peaks["fp16_tflops"])
    assert derived["sram_bytes"] == peaks["sram_bytes"] == cfg.sram_bytes
    assert derived["mem_port_tb_per_s"] == pytest.approx(peaks["sram_tb_per_s"])
    if name == "groqchip1":
        assert derived["mxm_int8_macs_per_cycle"] == 409_600


# ---- errors: one line, non-zero status, no traceback ---------------------------------------------
@pytest.fixture
def binaries(work):
    assert main(["asm", "prog.s"]) == 0
    data = (work / "prog.lpup").read_bytes()
    (work / "corrupt.lpup").write_bytes(data[:-3] + b"xyz")
    np.save("f32.npy", np.zeros((1, 16), np.float32))
    np.save("wide.npy", np.zeros((2, 16), np.int8))
    np.savez("arch.npz", x=np.zeros((1, 16), np.int8))
    (work / "junk.npy").write_text("not numpy")
    (work / "bad.s").write_text(".config tiny\nMEM.W0: Read 99, E0\n")
    (work / "sched.s").write_text(".config tiny\nMEM.E0: Write 0, E1\n")
    return work


@pytest.mark.parametrize("argv,status,fragments", [
    (["run", "missing.s"], 1, ["cannot read missing.s"]),
    (["asm", "missing.s"], 1, ["cannot read missing.s"]),
    (["disasm", "missing.lpup"], 1, ["cannot read missing.lpup"]),
    (["run", "prog.lpup", "--input", "x=nope.npy"], 1, ["cannot read nope.npy"]),
    (["run", "prog.lpup", "--input", "x=f32.npy"], 1, ["--input x=f32.npy", "int8", "float32"]),
    (["run", "prog.lpup", "--input", "x=wide.npy"], 1, ["shape (1, 16)", "(2, 16)"]),
    (["run", "prog.lpup", "--input", "x=arch.npz"], 1, [".npz"]),
    (["run", "prog.lpup", "--input", "x=junk.npy"], 1, ["junk.npy is not a .npy file"]),
    (["run", "prog.lpup", "--input", "q=x.npy"], 1, ["no tensor 'q'", "x, y"]),
    (["run", "prog.lpup", "--output", "z=z.npy"], 1, ["no tensor 'z'"]),
    (["run", "prog.lpup", "--output", "y=nodir/y.npy"], 1, ["cannot write nodir/y.npy"]),
    (["run", "prog.lpup", "--input", "x"], 2, ["NAME=FILE.npy"]),
    (["run", "prog.lpup", "-i", "x=x.npy", "-i", "x=x.npy"], 2, ["given twice"]),
    (["run", "prog.lpup", "--engine", "turbo"], 2, ["--engine", "turbo"]),
    (["run", "prog.lpup", "--max-cycles", "-1"], 2, [">= 0"]),
    (["run", "prog.lpup", "--config", "small"], 1, ["'tiny', not 'small'"]),
    (["run", "prog.lpup", "--bogus"], 2, ["unrecognized arguments: --bogus"]),
    (["run", "bad.s"], 1, ["bad.s: line 2", "addr", "0..63"]),
    (["run", "sched.s"], 1, ["cycle 0, MEM.E0", "holds no value"]),
    (["run", "corrupt.lpup"], 1, ["corrupt.lpup", "checksum"]),
    (["disasm", "prog.s"], 1, ["prog.s: not an lpucore program"]),
    (["asm", "prog.lpup"], 1, ["already a binary program"]),
    (["asm", "bad.s"], 1, ["line 2"]),
    (["info", "--config", "huge"], 2, ["unknown chip configuration 'huge'", "tiny"]),
    (["frobnicate"], 2, ["invalid choice: 'frobnicate'"]),
    ([], 2, ["COMMAND"]),
    (["bench", "nope"], 2, ["unknown benchmark 'nope'"]),
])
def test_user_mistakes(binaries, capsys, argv, status, fragments):
    assert main(argv) == status
    one_error_line(capsys, *fragments)
    assert capsys.readouterr().out == ""


def test_failed_run_writes_no_output(binaries, capsys):
    assert main(["run", "sched.s", "--output", "y=y.npy"]) == 1
    assert not (binaries / "y.npy").exists()


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("asm", "disasm", "run", "info", "bench"):
        assert cmd in out
    assert main(["run", "--help"]) == 0
    assert "--input" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("lpucore ")


# ---- the extension point ------------------------------------------------------------------------
def test_a_command_is_one_registration(capsys, monkeypatch):
    seen = {}

    def _cmd_echo(args):
        if args.fail == "lpu":
            raise LpuError("model file\nis broken")
        if args.fail == "usage":
            raise cli.UsageError("echo needs a word")
        seen.update(word=args.word, config=args.config, engine=args.engine)
        print(args.word)
        return 0

    def _echo_command(sub):
        p = cli.add_command(sub, "echo", _cmd_echo, "print a word")
        p.add_argument("word")
        p.add_argument("--fail")
        cli.add_config_option(p)
        cli.add_engine_option(p)

    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + (_echo_command,))
    assert main(["echo", "hi", "--config", "tiny", "--engine", "reference"]) == 0
    assert capsys.readouterr().out == "hi\n"
    assert seen == {"word": "hi", "config": ChipConfig.tiny(), "engine": "reference"}
    assert main(["echo", "hi", "--fail", "lpu"]) == 1
    assert one_error_line(capsys) == "lpucore: error: model file is broken"
    assert main(["echo", "hi", "--fail", "usage"]) == 2
    one_error_line(capsys, "echo needs a word")
    assert main(["info"]) == 0                        # the others are still there


# ---- bench ---------------------------------------------------------------------------------------
def test_bench_without_bench_dir(capsys, monkeypatch):
    monkeypatch.setattr(cli, "bench_dir", lambda: None)
    assert main(["bench"]) == 1
    one_error_line(capsys, "bench/ not found", "source checkout")


@pytest.mark.skipif(cli.bench_dir() is None, reason="not a source checkout")
def test_bench_engine_runs_the_script(capsys):
    argv = sys.argv[:]
    assert main(["bench", "engine", "--cycles", "200", "--ref-cycles", "50", "--idle-cycles", "1000"]) == 0
    assert sys.argv == argv
    out = capsys.readouterr().out
    assert "(a) streaming, fast:" in out
    result = json.loads(out.splitlines()[-1])
    assert result["config"] == "groqchip1" and result["idle_fast"]["cycles"] > 1000
    assert main(["bench", "gemm", "--help"]) == 0
    assert "bench_gemm.py" in capsys.readouterr().out


# ---- a real process --------------------------------------------------------------------------------
def test_python_dash_m(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, "-m", "lpucore", "info"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert value_of(r.stdout, "mxm_int8_macs_per_cycle") == "409,600"
    assert r.stderr == ""


# ---------------------------------------------------------------------- decode

def test_decode_prints_the_reference_tokens_and_the_table(tmp_path, capsys):
    from lpucore.llm import Reference, model_config, random_weights
    stats = tmp_path / "steps.json"
    assert main(["decode", "--model", "tiny", "--prompt-ids", "200,3,7", "--tokens", "5", "--precision", "int8",
                 "--capacity", "8", "--json", str(stats)]) == 0
    out = capsys.readouterr().out
    cfg = model_config("tiny")
    tokens, _ = Reference(cfg, random_weights(cfg, 0), "int8").generate([200, 3, 7], 5)
    assert f"tokens: {','.join(map(str, tokens.tolist()))}" in out
    assert "tokens/s per user" in out and "cycles by part" in out
    d = json.loads(stats.read_text())
    assert d["new_tokens"] == 5 and len(d["steps"]) == 3 + 4 and d["step_cycles"] == d["predicted_cycles"]
    assert f"{d['step_cycles']:,}" in out


def test_decode_from_a_directory(tmp_path, capsys):
    pytest.importorskip("safetensors")
    from lpucore.llm import model_config, random_weights, save_pretrained
    cfg = model_config("tiny-gpt2")
    save_pretrained(tmp_path, cfg, random_weights(cfg, 4))
    assert main(["decode", "--model", str(tmp_path), "--prompt-ids", "1", "--tokens", "2", "--capacity", "4",
                 "-q"]) == 0
    assert "tokens: " in capsys.readouterr().out


@pytest.mark.parametrize("argv,fragments", [
    (["--model", "llama2-7b"], ("needs at least", "chips")),
    (["--model", "nonesuch"], ("neither a directory nor a known shape",)),
    (["--model", "tiny", "--prompt-ids", "1,x"], ("integers separated by commas",)),
    (["--model", "tiny", "--prompt-ids", "999"], ("out of range",)),
    (["--model", "tiny", "--capacity", "100000"], ("capacity",)),
])
def test_decode_errors_are_one_line(capsys, argv, fragments):
    assert main(["decode"] + argv) != 0
    one_error_line(capsys, *fragments)


def test_console_script_is_installed():
    """`pip install` puts an `lpucore` command on the PATH that runs cli.main."""
    from importlib.metadata import entry_points
    eps = entry_points()
    scripts = eps.select(group="console_scripts") if hasattr(eps, "select") else eps.get("console_scripts", [])
    assert any(ep.name == "lpucore" and ep.value == "lpucore.cli:main" for ep in scripts)


def test_run_with_a_perfetto_trace(work, capsys, engine):
    assert main(["run", "prog.s", "--input", "x=x.npy", "--output", "y=y.npy", "--engine", engine,
                 "--trace", "out.json"]) == 0
    assert np.array_equal(np.load("y.npy"), expected_y(np.load("x.npy")))
    ev = json.loads(Path("out.json").read_text())["traceEvents"]
    assert sum(e["ph"] == "X" for e in ev) == 5                 # the program's 5 vector instructions
    assert main(["run", "prog.s", "--input", "x=x.npy", "--trace", "w.json", "--trace-window", "3", "6"]) == 0
    ev = json.loads(Path("w.json").read_text())["traceEvents"]
    assert all(3 <= e["args"]["cycle"] < 6 for e in ev if e["ph"] == "X")
    capsys.readouterr()
    assert main(["run", "prog.s", "--input", "x=x.npy", "--trace", "nodir/t.json"]) != 0
    one_error_line(capsys, "nodir")
