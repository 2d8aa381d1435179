"""The command line: ``python -m lpucore <command> ...``.

Commands::

    asm SOURCE.s [-o PROGRAM.lpup] [--config NAME]      assemble text to the binary format
    disasm PROGRAM.lpup [-o OUT.s]                       binary to text (stdout by default)
    run PROGRAM [--input NAME=FILE.npy ...] [--output NAME=FILE.npy ...] [--trace OUT.json]
        [--engine fast|reference] [--max-cycles N] [--json STATS.json] [--config NAME]
                                                         run a program (binary, or .s text)
    info [--config NAME] [--json]                        chip parameters and derived peaks
    bench [engine|gemm] [ARGS ...]                       the repository's benchmarks
    decode MODEL ...                                     generate tokens with lpucore.llm.Decoder
    dump --model MODEL [--stage STAGE] ...               a model's step program after a compiler stage
    relay [--topology node|rack|dragonfly] [--mpi] ...   pass vectors through every chip of a System
    serve --model MODEL [--port 8000] [--max-batch 8]   an OpenAI-compatible HTTP server (lpucore.server)
    vision [--model resnet50] [--precision int8|fp16] [--image-size N] [--chip NAME]
                                                         one random image through a ResNet

Every user mistake (a missing file, a bad option, a tensor of the wrong dtype,
a malformed model directory, any :class:`~lpucore.LpuError`, an ``OSError``
on a user's path) prints one line ``lpucore: error: ...`` on stderr and gives
exit status 2 for command-line usage errors (a bench script's bad option
too), 1 for the rest. Any other exception is a bug and shows its traceback.
:func:`main` takes the argument list and returns the exit status, so it can be
called in-process.

Adding a command (``decode`` is next) takes its handler ``_cmd_decode(args) -> int``,
one function declaring its parser with :func:`add_command` and its options, and one
line appending that function to :data:`COMMANDS`; nothing else changes::

    def _decode_command(sub):
        p = add_command(sub, "decode", _cmd_decode, "generate tokens with lpucore.llm.Decoder")
        p.add_argument("model", help="...")
        add_config_option(p)
        add_engine_option(p)

    COMMANDS = (..., _decode_command)

A handler reports a user mistake by raising :class:`UsageError` (exit 2),
:class:`CliError` or any :class:`~lpucore.LpuError` (exit 1); the helpers
:func:`load_npy`, :func:`save_npy` and :func:`load_program` already do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import runpy
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .asm import assemble, disassemble
from .chip import Chip, RunStats
from .config import ChipConfig
from .engine import ENGINES
from .errors import ConfigError, LpuError, ProgramError, TensorError
from .program import MAGIC, Program

PROG = "lpucore"
BENCHMARKS = {"engine": "bench_engine.py", "gemm": "bench_gemm.py", "decode": "bench_decode.py",
              "system": "bench_system.py", "llm-system": "bench_llm_system.py", "llm-predict": "bench_llm_predict.py",
              "load": "bench_load.py", "serve": "bench_serve.py"}
BINARY_SUFFIXES = (".lpup", ".lpu")


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------
class UsageError(Exception):
    """A command-line usage mistake (exit status 2)."""


class CliError(Exception):
    """Any other user mistake the command line reports itself (exit status 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and is returned by :func:`main`, not exited."""

    def error(self, message):  # argparse's hook for usage errors
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _report(message: str) -> None:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)


# ---------------------------------------------------------------------------------------
# option types (a ValueError / ArgumentTypeError here is a usage error)
# ---------------------------------------------------------------------------------------
def _config_arg(name: str) -> ChipConfig:
    try:
        return ChipConfig.named(name)
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"unknown chip configuration {name!r}; presets are {', '.join(ChipConfig.PRESETS)}") from None


def _tensor_file_arg(spec: str) -> Tuple[str, str]:
    name, sep, path = spec.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path or any(c.isspace() for c in name):
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.npy, got {spec!r}")
    return name, path


def _seed_arg(text: str) -> int:
    """A random seed: an int >= 0 (NumPy's generators take no negative seed)."""
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _cycles_arg(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of cycles, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _write_text(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror}") from None


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}") from None


def _assemble_text(path: str, data: bytes, config: Optional[ChipConfig]) -> Program:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CliError(f"{path} is neither an lpucore program file nor UTF-8 assembly text") from None
    try:
        return assemble(text, config)
    except ProgramError as e:
        raise ProgramError(f"{path}: {e}") from None


def _binary(path: str, data: bytes) -> Program:
    try:
        return Program.from_bytes(data)
    except ProgramError as e:
        raise ProgramError(f"{path}: {e}") from None


def load_program(path: str, config: Optional[ChipConfig] = None) -> Program:
    """A program from a binary file (magic ``LPUP`` or suffix .lpup/.lpu) or from assembly
    text (anything else).  ``config`` assembles text for that chip; for a binary file it
    must equal the program's own configuration."""
    data = _read_bytes(path)
    if data[:len(MAGIC)] == MAGIC or Path(path).suffix.lower() in BINARY_SUFFIXES:
        program = _binary(path, data)
        if config is not None and program.config != config:
            raise CliError(f"{path} is a program for chip configuration {program.config.name!r}, "
                           f"not {config.name!r} (--config applies to assembly sources)")
        return program
    return _assemble_text(path, data, config)


NPY_MAGIC = b"\x93NUMPY"


def load_npy(path: str) -> np.ndarray:
    """One array from a .npy file (no pickles), in native byte order; a user mistake is a
    :class:`CliError` naming the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
            if head != NPY_MAGIC:
                what = "an .npz archive; give one .npy file per tensor" if head[:4] == b"PK\x03\x04" \
                    else "not a .npy file (np.save writes one)"
                raise CliError(f"{path} is {what}")
            f.seek(0)
            a = np.load(f, allow_pickle=False)
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from None
    except CliError:
        raise
    except Exception as e:  # a truncated or object-dtype file: NumPy says ValueError, EOFError, ...
        raise CliError(f"{path} is not a valid .npy file: {e}") from None
    if a.dtype.byteorder not in ("=", "|") and a.dtype.kind in "iuf":
        a = a.astype(a.dtype.newbyteorder("="))     # same values, this machine's byte order
    return a


def save_npy(path: str, a: np.ndarray) -> None:
    """Write one array to exactly ``path`` (np.save would add a .npy suffix to a bare name)."""
    try:
        with open(path, "wb") as f:
            np.save(f, a, allow_pickle=False)
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror}") from None


def _check_writable(path: str) -> None:
    """Fail before a long run, not after it, when an output file cannot be created."""
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CliError(f"cannot write {path}: Is a directory")
    if not os.path.isdir(d):
        raise CliError(f"cannot write {path}: No such directory {d}")


def _duration(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:,.4g} {unit}"
    return f"{seconds / 1e-9:,.4g} ns"


def _hz(hz: float) -> str:
    for unit, scale in (("GHz", 1e9), ("MHz", 1e6), ("kHz", 1e3)):
        if hz >= scale:
            return f"{hz / scale:g} {unit}"
    return f"{hz:g} Hz"


def _number(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.6g}" if v != int(v) or abs(v) >= 1e15 else f"{int(v):,}"
    return str(v)


# ---------------------------------------------------------------------------------------
# info: parameters and derived peaks
# ---------------------------------------------------------------------------------------
def _fixed(v: float) -> str:
    """Two decimals, or four significant digits below 1 (the tiny chip's 0.4608 TFLOPS)."""
    return f"{v:,.2f}" if abs(v) >= 1 or v == 0 else f"{v:.4g}"


def config_fields(cfg: ChipConfig) -> Dict[str, dict]:
    """Every ChipConfig field: value, unit, meaning and source (from the field metadata)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, tuple):
            v = list(v)
        out[f.name] = {"value": v, "unit": f.metadata.get("unit", "-"), "doc": f.metadata.get("doc", ""),
                       "source": f.metadata.get("source", "")}
    return out


def derived_peaks(cfg: ChipConfig) -> Dict[str, dict]:
    """Peak figures derived from the configuration fields, each with its unit and formula.

    MXM: a plane takes one int8 [1 x size] x [size x size] product per cycle, or one
    float16 [1 x size/2] x [size/2 x size] product every ``mxm_fp16_interval`` cycles (a
    float16 weight takes two byte-rows); one MAC counts as two operations.  MEM: a slice's
    queue issues one Read or Write a cycle (the rate a program reaches); its banks take one
    read or write each a cycle (the port figure, ``ChipConfig.peaks()``'s ``sram_bytes_per_cycle``).  Streams: every
    stream register of both directions carries one vector past each position a cycle.
    """
    clock = cfg.clock_hz
    lanes = cfg.superlanes * cfg.lanes_per_superlane
    mem_slices = cfg.hemispheres * cfg.mem_slices_per_hemisphere
    sram = mem_slices * cfg.addresses_per_slice * lanes
    int8_macs = cfg.mxm_planes * cfg.mxm_size * cfg.mxm_size
    fp16_num = cfg.mxm_planes * (cfg.mxm_size // 2) * cfg.mxm_size
    fp16_macs = fp16_num // cfg.mxm_fp16_interval if fp16_num % cfg.mxm_fp16_interval == 0 \
        else fp16_num / cfg.mxm_fp16_interval
    mem_issue = mem_slices * lanes
    mem_ports = mem_slices * cfg.banks_per_slice * lanes
    streams = cfg.hemispheres * cfg.streams_per_direction
    stream_bytes = streams * lanes
    vxm = lanes * cfg.vxm_alus_per_lane
    rows = [
        ("lanes", lanes, "lanes", "superlanes x lanes_per_superlane"),
        ("mem_slices", mem_slices, "slices", "hemispheres x mem_slices_per_hemisphere"),
        ("sram_bytes", sram, "B", "mem_slices x addresses_per_slice x lanes"),
        ("sram_mib", sram / 2 ** 20, "MiB", "sram_bytes / 2^20"),
        ("queues", len(cfg.queues), "queues", "MEM slices + VXM ALUs + 3 x MXM planes + SXM queues"),
        ("mxm_int8_macs_per_cycle", int8_macs, "MAC/cycle", "mxm_planes x mxm_size x mxm_size"),
        ("int8_tops", 2 * int8_macs * clock / 1e12, "TOPS", "2 x mxm_int8_macs_per_cycle x clock_hz"),
        ("mxm_fp16_macs_per_cycle", fp16_macs, "MAC/cycle",
         "mxm_planes x (mxm_size / 2) x mxm_size / mxm_fp16_interval"),
        ("fp16_tflops", 2 * fp16_macs * clock / 1e12, "TFLOPS", "2 x mxm_fp16_macs_per_cycle x clock_hz"),
        ("mem_bytes_per_cycle", mem_issue, "B/cycle",
         "mem_slices x lanes (one Read or Write issued per slice per cycle)"),
        ("mem_tb_per_s", mem_issue * clock / 1e12, "TB/s", "mem_bytes_per_cycle x clock_hz"),
        ("mem_port_bytes_per_cycle", mem_ports, "B/cycle",
         "mem_slices x banks_per_slice x lanes (every bank busy each cycle)"),
        ("mem_port_tb_per_s", mem_ports * clock / 1e12, "TB/s", "mem_port_bytes_per_cycle x clock_hz"),
        ("stream_bytes_per_cycle", stream_bytes, "B/cycle",
         "2 x streams_per_direction x lanes (past any one position)"),
        ("stream_tb_per_s", stream_bytes * clock / 1e12, "TB/s", "stream_bytes_per_cycle x clock_hz"),
        ("vxm_alus", vxm, "ALUs", "lanes x vxm_alus_per_lane"),
        ("vxm_tops", vxm * clock / 1e12, "TOPS", "vxm_alus x clock_hz (one op per ALU per cycle)"),
    ]
    return {k: {"value": v, "unit": u, "formula": f} for k, v, u, f in rows}


def _cmd_info(args) -> int:
    cfg: ChipConfig = args.config or ChipConfig.groqchip1()
    fields, peaks = config_fields(cfg), derived_peaks(cfg)
    if args.json:
        print(json.dumps({"config": cfg.name, "clock_hz": cfg.clock_hz, "fields": fields, "derived": peaks},
                         indent=2))
        return 0
    print(f"chip configuration {cfg.name} (presets: {', '.join(ChipConfig.PRESETS)})")
    print()
    w = max(len(k) for k in list(fields) + list(peaks))
    vals = {k: _number(f["value"]) for k, f in fields.items()}
    vw = max(len(v) for v in vals.values())
    print(f"  {'parameter':<{w}}  {'value':>{vw}}  unit")
    for k, f in fields.items():
        print(f"  {k:<{w}}  {vals[k]:>{vw}}  {f['unit']}")
    print()
    print(f"derived peaks at {_hz(cfg.clock_hz)}")
    pvals = {}
    for k, p in peaks.items():
        v = p["value"]
        pvals[k] = _fixed(v) if isinstance(v, float) else _number(v)
    pw = max(len(v) for v in pvals.values())
    uw = max(len(p["unit"]) for p in peaks.values())
    for k, p in peaks.items():
        print(f"  {k:<{w}}  {pvals[k]:>{pw}}  {p['unit']:<{uw}}  = {p['formula']}")
    print()
    print("meaning and source of every parameter: --json, or ChipConfig.describe()")
    return 0


# ---------------------------------------------------------------------------------------
# asm / disasm
# ---------------------------------------------------------------------------------------
def _cmd_asm(args) -> int:
    data = _read_bytes(args.source)
    if data[:len(MAGIC)] == MAGIC:
        raise CliError(f"{args.source} is already a binary program ('{PROG} disasm' turns it into text)")
    program = _assemble_text(args.source, data, args.config)
    out = args.output or str(Path(args.source).with_suffix(".lpup"))
    if os.path.abspath(out) == os.path.abspath(args.source):
        raise UsageError(f"the output {out} would overwrite the source; give -o")
    data = program.to_bytes()
    try:
        with open(out, "wb") as f:
            f.write(data)
    except OSError as e:
        raise CliError(f"cannot write {out}: {e.strerror}") from None
    nq = sum(1 for lst in program.queues.values() if lst)
    print(f"{out}: {len(program):,} instructions in {nq} queues, {len(program.tensors)} tensors, "
          f"chip {program.config.name}, {len(data):,} bytes")
    return 0


def _cmd_disasm(args) -> int:
    program = _binary(args.program, _read_bytes(args.program))
    text = disassemble(program)
    if args.output and args.output != "-":
        _write_text(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


# ---------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------
def _pairs(specs: Optional[List[Tuple[str, str]]], option: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for name, path in specs or []:
        if name in out:
            raise UsageError(f"argument {option}: tensor {name!r} given twice")
        out[name] = path
    return out


def _check_names(program: Program, names, option: str) -> None:
    for name in names:
        if name not in program.tensors:
            have = ", ".join(program.tensors) or "none"
            raise TensorError(f"{option} {name}: no tensor {name!r} in the program's table (it has {have})")


def summary(stats: RunStats, chip: Chip) -> List[str]:
    """The few lines ``run`` prints."""
    cfg = chip.config
    state = "finished" if stats.finished else "stopped by --max-cycles, program not finished"
    lines = [f"{stats.cycles:,} cycles = {_duration(stats.seconds)} at {_hz(cfg.clock_hz)} ({state}); "
             f"{stats.instructions:,} vector instructions, {chip.engine_name} engine, chip {cfg.name}"]
    if stats.macs:
        lines.append(f"MXM: {stats.macs:,} MACs, planes busy {stats.mxm_utilisation:.1%} of plane-cycles, "
                     f"{stats.mxm_mac_utilisation:.1%} of the int8 MAC peak")
    return lines


def _cmd_run(args) -> int:
    inputs = _pairs(args.input, "--input")
    outputs = _pairs(args.output, "--output")
    program = load_program(args.program, args.config)
    _check_names(program, inputs, "--input")
    _check_names(program, outputs, "--output")
    for path in outputs.values():
        _check_writable(path)
    if args.json and args.json != "-":
        _check_writable(args.json)
    if args.trace:
        _check_writable(args.trace)
    arrays = {name: load_npy(path) for name, path in inputs.items()}
    chip = Chip(program.config, engine=args.engine)
    chip.load(program)
    for name, a in arrays.items():
        try:
            chip.write_tensor(name, a)
        except TensorError as e:
            raise TensorError(f"--input {name}={inputs[name]}: {e}") from None
    if args.trace:
        # records stream to FILE.csv beside the JSON, which is written from them
        from . import trace as tr
        rec_path = str(Path(args.trace).with_suffix(".csv"))
        stats = chip.run(args.max_cycles, trace=rec_path, trace_window=tuple(args.trace_window or (0, None)))
        tr.to_perfetto(rec_path, args.trace)
    else:
        stats = chip.run(args.max_cycles)
    for name, path in outputs.items():
        save_npy(path, chip.read_tensor(name))
    if args.json:
        d = {"program": args.program, "config": chip.config.name, "engine": chip.engine_name,
             "clock_hz": chip.config.clock_hz, **stats.to_dict()}
        text = json.dumps(d, indent=2, sort_keys=False) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            _write_text(args.json, text)
    if args.json != "-":
        for line in summary(stats, chip):
            print(line)
        for name, path in outputs.items():
            t = program.tensors[name]
            print(f"wrote {name} ({t.dtype.name} {tuple(t.shape)}) to {path}")
    return 0


# ---------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------
def bench_dir() -> Optional[Path]:
    """The repository's bench/ directory next to the package, or None (an installed wheel)."""
    d = Path(__file__).resolve().parent.parent / "bench"
    return d if d.is_dir() else None


def _cmd_bench(args) -> int:
    rest = list(args.args)
    if rest and rest[0] in BENCHMARKS:
        names, extra = [rest[0]], rest[1:]
    elif rest:
        raise UsageError(f"argument NAME: unknown benchmark {rest[0]!r} (choose from "
                         f"{', '.join(BENCHMARKS)}; its options go after the name)")
    else:
        names, extra = list(BENCHMARKS), []
    d = bench_dir()
    if d is None:
        raise CliError("bench/ not found: the benchmarks are in bench/ of the lpucore source repository, "
                       "not in an installed package; run from a source checkout (pip install -e .)")
    scripts = [d / BENCHMARKS[name] for name in names]
    for script in scripts:
        if not script.is_file():
            raise CliError(f"no benchmark script {script}")
    for script in scripts:
        saved, saved_error = sys.argv, argparse.ArgumentParser.error
        sys.argv = [str(script), *extra]

        def usage_error(parser, message, _name=script.name):     # the script's bad option: one line too
            raise UsageError(f"bench {_name}: {message} (see '{PROG} bench "
                             f"{names[0] if len(names) == 1 else 'NAME'} --help')")
        argparse.ArgumentParser.error = usage_error         # type: ignore[method-assign]
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as e:         # the script's own argparse (--help) or its exit status
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if code:
                return code
        finally:
            sys.argv = saved
            argparse.ArgumentParser.error = saved_error     # type: ignore[method-assign]
    return 0


# ---------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------
def _ids_arg(text: str) -> List[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"token ids must be integers separated by commas, not {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("give at least one prompt token id")
    return ids


def _load_model(args, **kw):
    """The Decoder the command's model options name (a model directory or a named shape with random
    weights); ``kw`` goes to its constructor too. CliError if --model is neither."""
    from .llm import SHAPES, Decoder

    kw.update(precision=args.precision, capacity=args.capacity)
    if args.config is not None:
        kw["config"] = args.config
    path = Path(args.model)
    if path.is_dir():
        try:
            return Decoder.from_pretrained(path, allow_nonfinite=args.allow_nonfinite, **kw)
        except ImportError as e:        # safetensors is not installed
            raise CliError(str(e)) from None
    if args.model in SHAPES:
        return Decoder.random(args.model, seed=args.seed, **kw)
    raise CliError(f"--model {args.model!r} is neither a directory nor a known shape ({', '.join(SHAPES)})")


def _model_options(d) -> None:
    """--model, --precision, --capacity, --seed, --allow-nonfinite and --config: the model a decode
    step is compiled for (decode, dump)."""
    d.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                   help="shape name (tiny, tiny-moe, tiny-gpt2, gpt2, ...) or model directory")
    d.add_argument("--precision", choices=("fp16", "int8"), default="fp16", help="weights (default fp16)")
    d.add_argument("--capacity", type=int, default=None, metavar="N",
                   help="KV cache positions (default: min(max_positions, 128))")
    d.add_argument("--seed", type=_seed_arg, default=0, help="random weights' seed (named shapes; >= 0)")
    d.add_argument("--allow-nonfinite", action="store_true",
                   help="load a model directory whose weights hold NaN or infinity (refused by default)")
    add_config_option(d)


def _sampling(args):
    """The decode command's SamplingParams (a usage error if out of range)."""
    from .llm.sampling import SamplingError, SamplingParams

    try:
        return SamplingParams(args.temperature, args.top_k, args.top_p, args.sample_seed)
    except SamplingError as e:
        raise UsageError(f"decode: {e}") from None


def _decode_prompt(args, model):
    """The prompt the decode command's options give: (token ids, what they are)."""
    option = "--prompt" if args.prompt is not None else "--chat" if args.chat is not None else "--stop"
    if model.tokenizer is None and (args.prompt is not None or args.chat is not None or args.stop):
        raise CliError(f"{option} needs a model with a tokenizer; {model.cfg.name} has none ({model.no_text})")
    if args.chat is not None:
        # as Decoder.chat: the template writes the special tokens
        rendered = model.tokenizer.apply_chat_template([{"role": "user", "content": args.chat}])
        return model.tokenizer.encode(rendered, add_special_tokens=False), "the rendered chat"
    if args.prompt is not None:
        return model.tokenizer.encode(args.prompt), "the prompt text"
    return (args.prompt_ids or [1]), "the prompt ids"


def _cmd_decode(args) -> int:
    sampling = _sampling(args)
    try:
        model = _load_model(args, engine=args.engine)
        ids, what = _decode_prompt(args, model)
        out = sys.stdout
        print(f"{model}: compiling the step program ...", file=out, flush=True)
        compiled = model.compile()
        print(f"compiled in {model.compile_seconds:.1f} s: {compiled.expected_cycles:,} cycles per step; "
              f"prefill {len(ids)} tokens ({what}), then decode", file=out, flush=True)
        bar = None
        if args.tokens >= 64 and not args.quiet:
            try:
                from tqdm import tqdm
                bar = tqdm(total=args.tokens, unit="tok", file=sys.stderr, leave=False)
            except ImportError:
                bar = None
        text = model.tokenizer is not None and not args.quiet

        def on_token(tok, step):
            if bar is not None:
                bar.update(1)
            if not args.quiet and not text:
                print(tok, end=" ", file=out, flush=True)

        def on_text(piece):
            print(piece, end="", file=out, flush=True)
        kw = dict(on_token=on_token, on_text=on_text if text else None, sampling=sampling, stop=args.stop or None,
                  ignore_eos=args.ignore_eos)
        res = model.generate(ids, max_new_tokens=args.tokens, **kw)
        if bar is not None:
            bar.close()
    except ValueError as e:
        raise CliError(str(e)) from None
    if not args.quiet:
        print(file=out)
    print(f"tokens: {','.join(str(t) for t in res.tokens.tolist())} (finished: {res.finish_reason})", file=out)
    print(res.stats.table(), file=out)
    if args.json:
        if args.json == "-":
            print(res.stats.to_json(), file=out)
        else:
            _check_writable(args.json)
            res.stats.to_json(args.json)
    return 0


def _decode_command(sub) -> None:
    d = add_command(sub, "decode", _cmd_decode, "generate tokens with a language model on the simulated chip",
                    "Compile one decode step of MODEL (a named shape with random weights, or a Hugging Face "
                    "directory of config.json + *.safetensors, with tokenizer.json for text) for the chip, "
                    "prefill the prompt (--prompt-ids, or --prompt / --chat text with a tokenizer), decode up to "
                    "--tokens tokens (greedy unless --temperature > 0; sampled on the host, costing no chip "
                    "cycles), print them as they come (text with a tokenizer), and print the timing table: cycles "
                    "and latency per step, time to first token, tokens/s per user, MXM utilisation, SRAM, and "
                    "where the cycles went. Decoding stops at the model's end-of-sequence token or a --stop "
                    "string.")
    _model_options(d)
    prompt = d.add_mutually_exclusive_group()
    prompt.add_argument("--prompt-ids", type=_ids_arg, default=None, metavar="1,2,3",
                        help="prompt token ids (default: 1)")
    prompt.add_argument("--prompt", metavar="TEXT", help="prompt text (a model directory with a tokenizer)")
    prompt.add_argument("--chat", metavar="TEXT", help="a user message, rendered by the model's chat template")
    d.add_argument("--tokens", type=int, default=32, metavar="N", help="new tokens to generate (default 32)")
    d.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature (default 0: greedy)")
    d.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the K most likely tokens (0: all)")
    d.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample from the most likely tokens whose probabilities sum to P (default 1: all)")
    d.add_argument("--sample-seed", type=_seed_arg, default=0, metavar="N",
                   help="the sampling's random seed (default 0; --seed is the random weights')")
    d.add_argument("--stop", action="append", metavar="TEXT", help="stop when the text holds TEXT (repeatable)")
    d.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    d.add_argument("--json", metavar="STATS.json", help="write the per-step statistics as JSON ('-': stdout)")
    d.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    add_engine_option(d)


def _cmd_dump(args) -> int:
    os.environ["LPUCORE_CACHE"] = "0"      # dump reads the compiler's record, which a cached program lacks
    try:
        text = _load_model(args).compile().dump(args.stage)
    except ValueError as e:
        raise CliError(str(e)) from None
    print(text, end="")
    return 0


def _dump_command(sub) -> None:
    from .compiler.dump import STAGES

    d = add_command(sub, "dump", _cmd_dump, "print a model's step program after a compiler stage",
                    "Compile one decode step of MODEL (as 'decode' does) and print the program after STAGE: "
                    "graph (operations, shapes, dtypes), fused (which operations run as one kernel), placed "
                    "(each tensor's MEM slices, addresses and hemisphere), scheduled (each kernel's cycles, "
                    "instructions and units), emitted (instructions per queue), or all (Compiled.dump).")
    _model_options(d)
    d.add_argument("--stage", choices=STAGES + ("all",), default="scheduled", help="stage (default scheduled)")


def _cmd_vision(args) -> int:
    from . import vision

    cfg = args.chip if args.chip is not None else ChipConfig.groqchip1()
    model = vision.resnet(args.model, precision=args.precision, seed=args.seed, config=cfg, stem=args.stem)
    image = np.random.default_rng(args.seed + 3).standard_normal((1, 3, args.image_size, args.image_size))
    print(f"{args.model} ({args.precision}, v1.5, random weights seed {args.seed}): compiling for "
          f"{args.image_size} x {args.image_size} on {cfg.name} ...", flush=True)
    logits, stats = model.run(image.astype(np.float32), engine=args.engine, stream=args.stream)
    ref = model.reference(image.astype(np.float32))
    top, ref_top = int(np.argmax(logits)), int(np.argmax(ref))
    same = "bit for bit" if logits.tobytes() == ref.tobytes() else f"max |diff| {np.abs(logits - ref).max():.3g}"
    print(f"top-1 class {top} (NumPy reference: {ref_top}; logits {same})")
    print(stats.table())
    if args.json:
        text = json.dumps(stats.to_dict(), indent=1)
        if args.json == "-":
            print(text)
        else:
            _check_writable(args.json)
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


def _image_size_arg(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 8 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"must be in 8..1024 pixels, got {n}")
    return n


def _vision_command(sub) -> None:
    from .vision import ARCHS

    v = add_command(sub, "vision", _cmd_vision, "classify one random image with a ResNet on the simulated chip",
                    "Build MODEL (torchvision's ResNet, v1.5, seeded random weights with measured batch-norm "
                    "statistics; int8 calibrated on seeded random images), compile it for one image of "
                    "--image-size pixels on the chip, run one random image and print its top-1 class beside "
                    "the NumPy reference's, and the table: cycles, latency, images/s, schedule bound and "
                    "efficiency, MXM utilisation, SRAM, cycles by part and by operation (lpucore.vision).")
    v.add_argument("--model", choices=tuple(ARCHS), default="resnet50", help="architecture (default resnet50)")
    v.add_argument("--precision", choices=("int8", "fp16"), default="int8", help="default int8")
    v.add_argument("--image-size", type=_image_size_arg, default=224, metavar="N",
                   help="N x N pixels (default 224)")
    v.add_argument("--chip", type=_config_arg, metavar="NAME",
                   help=f"chip configuration ({', '.join(ChipConfig.PRESETS)}; default groqchip1)")
    v.add_argument("--seed", type=_seed_arg, default=0, help="random weights' seed (default 0)")
    v.add_argument("--stem", choices=("auto", "s2d", "s2d4", "direct"), default="auto",
                   help="auto (default): s2d4 when 4 divides the image size, else s2d; s2d: the host writes the "
                        "image space-to-depth (2 x 2 blocks); s2d4: 4 x 4 blocks, the stem giving 2 x 2 output "
                        "pixels a position; direct: the 7x7 window on the chip")
    v.add_argument("--stream", action="store_true",
                   help="also compile two images as one program and report back-to-back images/s")
    v.add_argument("--json", metavar="STATS.json", help="write the figures as JSON ('-': stdout)")
    add_engine_option(v)


# ---------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------
def _cmd_serve(args) -> int:
    from .server import serve

    if not 0 <= args.port <= 65535:
        raise UsageError(f"serve: --port must be 0..65535, not {args.port}")
    if args.max_batch < 1:
        raise UsageError(f"serve: --max-batch must be >= 1, not {args.max_batch}")
    try:
        model = _load_model(args, engine=args.engine)
        print(f"{model}: compiling the step program of {args.max_batch} rows ...", flush=True)
        serve(model, args.name or args.model, args.host, args.port, args.max_batch, verbose=args.verbose)
    except ValueError as e:
        raise CliError(str(e)) from None
    except KeyboardInterrupt:           # the usual way to stop a server: not an error
        print("lpucore serve: stopped", flush=True)
    return 0


def _serve_command(sub) -> None:
    d = add_command(sub, "serve", _cmd_serve, "serve a language model over HTTP with OpenAI's API",
                    "Compile the step program of --max-batch sequences of MODEL (as 'decode' does) and answer "
                    "OpenAI requests (GET /v1/models, POST /v1/completions and /v1/chat/completions, streamed or "
                    "not) until interrupted, batching the requests of every client as they arrive (a new one joins "
                    "at the next step). Each response's usage gives the simulated time to first token, time per "
                    "output token and tokens/s: what the chip would deliver, not the host's time. The URL is "
                    "printed once the server listens.")
    _model_options(d)
    d.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    d.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one, printed)")
    d.add_argument("--max-batch", type=int, default=8, metavar="B",
                   help="sequences decoded together in one step program (default 8)")
    d.add_argument("--name", default=None, help="the model id clients give (default: --model as given)")
    d.add_argument("--verbose", action="store_true", help="log every request on stderr")
    add_engine_option(d)


# ---------------------------------------------------------------------------------------
# the parser: one registration function per command, listed in COMMANDS
# ---------------------------------------------------------------------------------------
def add_command(sub, name: str, handler: Callable[[argparse.Namespace], int], help: str,
                description: Optional[str] = None) -> argparse.ArgumentParser:
    """Add subcommand ``name`` run by ``handler(args) -> exit status``; returns its parser."""
    p = sub.add_parser(name, help=help, description=description or help)
    p.set_defaults(func=handler)
    return p


def add_config_option(p: argparse.ArgumentParser, help: Optional[str] = None) -> None:
    """``--config NAME``: a preset ChipConfig (``args.config``, None when not given)."""
    p.add_argument("--config", type=_config_arg, metavar="NAME",
                   help=help or f"chip configuration ({', '.join(ChipConfig.PRESETS)}; default groqchip1)")


def add_engine_option(p: argparse.ArgumentParser) -> None:
    """``--engine fast|reference`` (``args.engine``, default fast)."""
    p.add_argument("--engine", choices=ENGINES, default="fast", help="simulation engine (default: fast)")


def _asm_command(sub) -> None:
    a = add_command(sub, "asm", _cmd_asm, "assemble a text program into the binary format",
                    "Assemble SOURCE.s into a binary program file (lpucore.assemble, Program.save).")
    a.add_argument("source", metavar="SOURCE.s", help="assembly text")
    a.add_argument("-o", "--output", metavar="PROGRAM.lpup",
                   help="binary program to write (default: SOURCE with suffix .lpup)")
    add_config_option(a, f"chip configuration ({', '.join(ChipConfig.PRESETS)}); default: the source's "
                         ".config line, else groqchip1")


def _disasm_command(sub) -> None:
    d = add_command(sub, "disasm", _cmd_disasm, "turn a binary program back into assembly text",
                    "Disassemble a binary program file (lpucore.disassemble); assembling the text gives "
                    "the same program.")
    d.add_argument("program", metavar="PROGRAM.lpup", help="binary program file")
    d.add_argument("-o", "--output", metavar="OUT.s", help="text file to write (default: stdout)")


def _run_command(sub) -> None:
    r = add_command(sub, "run", _cmd_run, "run a program with tensors from and to .npy files",
                    "Load a program (binary, or assembly text assembled on the fly), write the --input "
                    "tensors through its tensor table (dtype and shape must match exactly), run it, write "
                    "the --output tensors and print the cycles, the simulated time at the configured clock "
                    "and the MXM utilisation.")
    r.add_argument("program", metavar="PROGRAM", help="binary program (.lpup) or assembly text (.s)")
    r.add_argument("-i", "--input", action="append", type=_tensor_file_arg, metavar="NAME=FILE.npy",
                   help="write this array into tensor NAME before the run (repeatable)")
    r.add_argument("-o", "--output", action="append", type=_tensor_file_arg, metavar="NAME=FILE.npy",
                   help="save tensor NAME after the run (repeatable)")
    add_engine_option(r)
    r.add_argument("--max-cycles", type=_cycles_arg, metavar="N",
                   help="stop after N cycles even if the program has not finished")
    r.add_argument("--json", metavar="STATS.json", help="write the run statistics as JSON ('-': stdout only)")
    r.add_argument("--trace", metavar="OUT.json",
                   help="write a Perfetto / Chrome trace of the run (records stream to OUT.csv; see lpucore.trace)")
    r.add_argument("--trace-window", type=_cycles_arg, nargs=2, metavar=("START", "END"),
                   help="trace only cycles START <= cycle < END")
    add_config_option(r, f"chip configuration for an assembly source ({', '.join(ChipConfig.PRESETS)})")


def _info_command(sub) -> None:
    i = add_command(sub, "info", _cmd_info, "chip parameters and derived peak figures",
                    "Print every ChipConfig field with its unit, and the peaks derived from them (lanes, "
                    "SRAM, MXM MACs per cycle, int8 TOPS, fp16 TFLOPS, MEM and stream bandwidth) at the "
                    "configured clock.")
    add_config_option(i)
    i.add_argument("--json", action="store_true", help="print JSON (with each field's meaning and source)")


def _bench_command(sub) -> None:
    b = add_command(sub, "bench", _cmd_bench, "run the repository's benchmarks (bench/)",
                    "Run bench/bench_engine.py, bench_gemm.py, bench_decode.py or bench_system.py (all when no "
                    "name is given) from "
                    "the source repository; arguments after the name go to the script ('bench engine "
                    "--help' shows them). An installed wheel has no bench/ directory.")
    b.add_argument("args", nargs=argparse.REMAINDER, metavar="[NAME [ARGS ...]]",
                   help=f"benchmark ({', '.join(BENCHMARKS)}; default: all) and its options")


def _cmd_relay(args) -> int:
    import dataclasses
    import hashlib
    import json
    import time

    import numpy as np

    from .compiler.c2c import relay_programs
    from .system import System

    cfg = args.config or ChipConfig.groqchip1()
    if args.links is not None:
        cfg = dataclasses.replace(cfg, c2c_links=args.links)
    comm = None
    if args.mpi:
        from .mpi import comm_world
        comm = comm_world()
    t0 = time.perf_counter()
    s = System(args.chips, args.topology, config=cfg, engine=args.engine, comm=comm)
    programs, path, _ = relay_programs(cfg, len(s), s.wires, args.vectors)
    slot = cfg.mem_slices_per_hemisphere - 1
    block = np.random.default_rng(args.seed).integers(0, 256, (args.vectors, cfg.lanes)).astype(np.uint8)
    first = s.chips[path[0][0]]
    if first is not None:
        first.write_mem("W", slot, 0, block)
    s.load(lambda i: programs.get(i))
    t1 = time.perf_counter()
    st = s.run()
    wall = time.perf_counter() - t1
    ok = all(np.array_equal(s.local_chip(b).read_mem("W", slot, 0, args.vectors), block)
             for _, _, b, _ in path if s.chips[b] is not None)
    if comm is not None:
        ok = all(comm.allgather(ok))
        wall = max(comm.allgather(wall))
    digest = hashlib.sha256(json.dumps([[c.cycles for c in st.chips], sorted(map(list, st.link_vectors.items()))])
                            .encode()).hexdigest()[:16]
    out = dict(chips=len(s), topology=args.topology, config=cfg.name, engine=args.engine,
               processes=s.size, vectors=args.vectors, hops=len(path), cycles=st.cycles,
               simulated_seconds=st.seconds, link_bytes=st.c2c_bytes, windows=st.windows, correct=ok,
               digest=digest, setup_seconds=t1 - t0, wall_seconds=wall)
    if s.rank == 0:
        print(f"{s}: relay of {args.vectors} vectors over {len(path)} hops: {st.cycles:,} cycles "
              f"({st.seconds * 1e6:.2f} us), {st.c2c_bytes:,} bytes over links, {st.windows} windows; "
              f"{'correct' if ok else 'WRONG DATA'}; wall {wall:.2f} s")
        print(json.dumps(out))
    return 0 if ok else 1


def _relay_command(sub) -> None:
    r = add_command(sub, "relay", _cmd_relay, "pass a block of vectors through every chip of a system",
                    "Build a System (lpucore.System), pass a block of vectors along a path through every chip "
                    "over the C2C links (lpucore.compiler.c2c.relay_programs), check every chip stored it, and "
                    "print the cycles and a digest of every chip's cycle count and link traffic; the last line "
                    "is JSON. With --mpi (under mpiexec -n N) the chips are spread over the processes; the "
                    "results and the digest are the same.")
    r.add_argument("--topology", default="node", choices=("node", "rack", "dragonfly"))
    r.add_argument("--chips", type=int, default=None, help="chips (dragonfly: a multiple of 72; default: the "
                                                           "topology's size)")
    r.add_argument("--vectors", type=int, default=4, help="vectors in the block (default 4)")
    r.add_argument("--links", type=int, default=None, help="override ChipConfig.c2c_links (tiny has 4)")
    r.add_argument("--seed", type=_seed_arg, default=0, help="the block's random seed (>= 0)")
    r.add_argument("--mpi", action="store_true", help="spread the chips over the MPI processes (needs mpi4py)")
    add_config_option(r)
    add_engine_option(r)


# Each entry adds one subcommand to the parser, in this order.
COMMANDS: Tuple[Callable, ...] = (_asm_command, _disasm_command, _run_command, _info_command, _bench_command,
                                  _decode_command, _dump_command, _relay_command, _serve_command,
                                  _vision_command)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog=PROG, description="lpucore: a functional, cycle-level simulator of Groq's TSP (LPU).",
                epilog=f"'{PROG} COMMAND --help' describes each command.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        parser = build_parser()
        args = parser.parse_args(None if argv is None else list(argv))
        return int(args.func(args) or 0)
    except SystemExit as e:            # --help, --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except UsageError as e:
        _report(str(e))
        return 2
    except (CliError, LpuError) as e:
        _report(str(e))
        return 1
    except KeyboardInterrupt:
        _report("interrupted")
        return 130
    except BrokenPipeError:            # `... | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1
    except OSError as e:               # a user's file or directory the helpers did not report themselves
        _report(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e))
        return 1
