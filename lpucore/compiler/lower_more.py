"""Lowering of matmul, layout operations, gather and rope (see lower.py)."""

from __future__ import annotations

from ..errors import CompileError


def lower(c, n, ins, t, name, kind):
    raise CompileError(f"{n.op}: not supported by the compiler yet")
