"""Text assembler and disassembler.

Syntax (one statement per line; ``;`` or ``#`` starts a comment)::

    .config tiny                         ; a preset name, or json:{...}; default groqchip1
    .tensor x int8 (4, 16) W0:0x0        ; one extent per byte plane ...
    .tensor y float16 (2, 16) [W1:0+1, W2:0] [E1:0]   ; ... or a bracketed list per plane
    .tensor z int8 (8, 16) {W4:0x0, W5:0x0}           ; ... or stripes: row r in slice (r + chunk) % n
    .queue MEM.W0                        ; following instructions go to this queue
        Read 0x0, E0                     ; operands in table order ...
        Repeat n=3, d=1, stride=1        ; ... or by name
    VXM.0: add int8, E4, E0, W0          ; a queue prefix works on any line

Mnemonics are case-insensitive.  ``assemble(disassemble(p)) == p`` for every program.
"""

from __future__ import annotations

import json
import re
from typing import List, Optional, Tuple, Union

from . import isa
from .config import ChipConfig
from .errors import LpuError, ProgramError
from .layout import Stripes
from .program import Program

_TENSOR = re.compile(r"^\.tensor\s+(\S+)\s+(\S+)\s*\(([^)]*)\)\s*(.*)$", re.I | re.ASCII)
_EXTENT = re.compile(r"^([WEwe]\d+):(\w+)(?:\+(\w+))?$", re.ASCII)


def _config_from(arg: str) -> ChipConfig:
    arg = arg.strip()
    if arg.startswith("json:"):
        try:
            d = json.loads(arg[5:])
        except RecursionError:
            raise ProgramError("bad .config json: nested too deeply") from None
        except ValueError as e:       # JSONDecodeError, or an integer of too many digits
            raise ProgramError(f"bad .config json: {e}") from None
        return ChipConfig.from_dict(d)
    return ChipConfig.named(arg)


def _parse_planes(text: str, cfg: ChipConfig) -> List[Union[Stripes, List[Tuple[int, ...]]]]:
    """The byte planes of a ``.tensor`` line: Stripes, or lists of (slice, address[, count])."""
    text = text.strip()
    planes: List[Union[Stripes, List[Tuple[int, ...]]]] = []
    while text:
        if text.startswith("{"):
            end = text.find("}")
            if end < 0:
                raise ProgramError("unclosed { in .tensor")
            items = [x.strip() for x in text[1:end].split(",") if x.strip()]
            text = text[end + 1:].strip()
            parts = []
            for it in items:
                m = _EXTENT.match(it)
                if not m or m.group(3):
                    raise ProgramError(f"bad stripe {it!r} (expected SLICE:BASE, e.g. W3:0x10)")
                try:
                    parts.append((cfg.parse_slice(m.group(1)), isa.parse_int(m.group(2))))
                except LpuError as e:
                    raise ProgramError(str(e)) from None
                except ValueError:
                    raise ProgramError(f"bad number in stripe {it!r}") from None
            if not parts:
                raise ProgramError("empty { } in .tensor")
            planes.append(Stripes(tuple(parts)))
            continue
        if text.startswith("["):
            end = text.find("]")
            if end < 0:
                raise ProgramError("unclosed [ in .tensor")
            items = [s.strip() for s in text[1:end].split(",") if s.strip()]
            text = text[end + 1:].strip()
        else:
            words = text.split(None, 1)
            items = [words[0]]
            text = words[1].strip() if len(words) > 1 else ""
        plane: List[Tuple[int, ...]] = []
        for it in items:
            m = _EXTENT.match(it)
            if not m:
                raise ProgramError(f"bad extent {it!r} (expected SLICE:ADDR or SLICE:ADDR+COUNT, e.g. W3:0x10+4)")
            try:
                s = cfg.parse_slice(m.group(1))
                a = isa.parse_int(m.group(2))
                c = isa.parse_int(m.group(3)) if m.group(3) else None
            except LpuError as e:
                raise ProgramError(str(e)) from None
            except ValueError:
                raise ProgramError(f"bad number in extent {it!r}") from None
            plane.append((s, a) if c is None else (s, a, c))
        planes.append(plane)
    return planes


def _split_operands(text: str) -> List[str]:
    text = text.strip()
    return [t.strip() for t in text.split(",")] if text else []


def _config_line(line: str, prog: Optional[Program], config: Optional[ChipConfig]) -> Program:
    """Handle a ``.config`` line: the empty program it starts."""
    if prog is not None:
        raise ProgramError(".config must come before everything else")
    cfg = _config_from(line[len(".config"):])
    if config is not None and cfg != config:
        raise ProgramError(f".config {cfg.name} differs from the configuration passed to assemble()")
    return Program(cfg)


def _tensor_line(line: str, prog: Program) -> None:
    """Handle a ``.tensor`` line: add its tensor-table entry to ``prog``."""
    m = _TENSOR.match(line)
    if not m:
        raise ProgramError("expected .tensor NAME DTYPE (SHAPE) PLANES...")
    try:
        shape = tuple(isa.parse_int(s) for s in m.group(3).replace(" ", "").split(",") if s)
    except ValueError:
        raise ProgramError(f"bad shape ({m.group(3)})") from None
    prog.add_tensor(m.group(1), m.group(2), shape, _parse_planes(m.group(4), prog.config))


def _queue_line(line: str, cfg: ChipConfig) -> str:
    """Handle a ``.queue`` line: the (checked, upper-case) queue name it selects."""
    queue = line[len(".queue"):].strip()
    cfg.queue(queue)
    return queue.upper()


def _operands(text: str):
    """Split an instruction's operand text into positional and named (``k=v``) operands."""
    pos, kw = [], {}
    for tok in _split_operands(text):
        if not tok:
            raise ProgramError("empty operand")
        if "=" in tok:
            k, v = tok.split("=", 1)
            if k.strip() in kw:
                raise ProgramError(f"operand {k.strip()!r} given twice")
            kw[k.strip()] = v.strip()
        else:
            if kw:
                raise ProgramError("positional operand after a named one")
            pos.append(tok)
    return pos, kw


def _instruction_line(line: str, prog: Program, queue: Optional[str]) -> None:
    """Handle an instruction line (with an optional ``QUEUE:`` prefix): add it to ``prog``."""
    cfg = prog.config
    qname = queue
    m = re.match(r"^([A-Za-z][A-Za-z0-9]*(?:\.[A-Za-z0-9]+)+)\s*:\s*(.*)$", line)
    if m:
        qname = m.group(1).upper()
        cfg.queue(qname)
        line = m.group(2).strip()
    if qname is None:
        raise ProgramError("instruction outside any queue (use .queue NAME or NAME: prefix)")
    parts = line.split(None, 1)
    if not parts:
        raise ProgramError(f"no instruction after {qname}:")
    mnemonic = parts[0]
    op = isa.lookup(mnemonic, cfg.queue(qname).unit)
    if op is None:
        raise ProgramError(f"unknown instruction {mnemonic!r} for queue {qname}")
    pos, kw = _operands(parts[1] if len(parts) > 1 else "")
    # every operand is text, read by its field's kind in make_instruction
    prog.add(qname, op.mnemonic, *pos, **kw)


def _assemble_line(line: str, prog: Optional[Program], queue: Optional[str],
                   config: Optional[ChipConfig]) -> Tuple[Program, Optional[str]]:
    """Handle one non-empty statement: the program and current queue after it."""
    if line.lower().startswith(".config"):
        return _config_line(line, prog, config), queue
    if prog is None:
        prog = Program(config)
    if line.lower().startswith(".tensor"):
        _tensor_line(line, prog)
    elif line.lower().startswith(".queue"):
        queue = _queue_line(line, prog.config)
    elif line.startswith("."):
        raise ProgramError(f"unknown directive {line.split()[0]!r}")
    else:
        _instruction_line(line, prog, queue)
    return prog, queue


def assemble(text: str, config: Optional[ChipConfig] = None) -> Program:
    """Assemble program text into a validated :class:`Program`.

    ``config`` is used unless the text has a ``.config`` line, in which case the two
    must agree.  Errors raise :class:`~lpucore.ProgramError` naming the line.
    """
    if not isinstance(text, str):
        raise ProgramError("assembly text must be a str")
    prog: Optional[Program] = None
    queue: Optional[str] = None
    for ln, raw in enumerate(text.splitlines(), 1):
        line = re.split(r"[;#]", raw, maxsplit=1)[0].strip()
        if not line:
            continue
        try:
            prog, queue = _assemble_line(line, prog, queue, config)
        except ProgramError as e:
            if e.line is None:
                raise ProgramError(str(e), line=ln) from None
            raise
        except LpuError as e:
            raise ProgramError(str(e), line=ln) from None
    return prog if prog is not None else Program(config)


def disassemble(program: Program) -> str:
    """Program -> assembly text that :func:`assemble` turns back into an equal program."""
    cfg = program.config
    out = []
    preset = None
    for name in ChipConfig.PRESETS:
        if ChipConfig.named(name) == cfg:
            preset = name
    out.append(f".config {preset}" if preset else f".config json:{cfg.to_json()}")
    for t in program.tensors.values():
        planes = []
        for p in t.planes:
            if isinstance(p, Stripes):
                planes.append("{" + ", ".join(f"{cfg.slice_name(g)}:{a:#x}" for g, a in p.parts) + "}")
            else:
                planes.append("[" + ", ".join(f"{cfg.slice_name(e.slice)}:{e.address:#x}+{e.count}" for e in p) + "]")
        out.append(f".tensor {t.name} {t.dtype.name} ({', '.join(map(str, t.shape))}) {' '.join(planes)}")
    for q in cfg.queues:
        lst = program.queues.get(q.name)
        if not lst:
            continue
        out.append(f".queue {q.name}")
        for ins in lst:
            out.append("    " + ins.text(cfg))
    return "\n".join(out) + "\n"
