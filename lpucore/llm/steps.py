"""One step's figures and the attribution of a step program's cycles to model parts (shared by
:mod:`lpucore.llm.decoder` and :mod:`lpucore.llm.batch`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Tuple

if TYPE_CHECKING:
    from ..compiler.lower import Compiled


@dataclass
class StepStats:
    """One step: the token fed in at ``position``; ``cycles`` of the chip, ``seconds`` at its clock."""

    index: int
    phase: str                  # "prefill" or "decode"
    position: int
    token: int
    cycles: int
    seconds: float
    mxm_utilisation: float      # fraction of MXM plane-cycles busy
    macs: int
    wall_seconds: float         # host time to simulate the step



def _breakdown(compiled: Compiled, spans: List[Tuple[str, int, int]]) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Cycles of one step attributed to model parts and graph operations.

    A kernel's share is how far it pushes the latest result-landing cycle beyond every earlier kernel's
    (kernels overlap, so a kernel hidden under an earlier one costs nothing); what follows the last kernel
    (the cache write-back and the pipeline drain) goes to ``kv`` / ``writeback``. An operation fused into
    its consumer (landing cycle None, :mod:`lpucore.compiler.fuse`) has no kernel: the consumer's op
    and part get its cycles."""
    label_of: Dict[int, str] = {}
    for label, a, b in spans:
        for i in range(a, b):
            label_of[i] = label
    by_part: Dict[str, int] = {}
    by_op: Dict[str, int] = {}
    front = 0
    for i, (op, _name, last) in enumerate(compiled.kernels):
        if last is None or last <= front:
            continue
        d = int(last - front)
        front = int(last)
        lab = label_of.get(i, "other")
        by_part[lab] = by_part.get(lab, 0) + d
        by_op[op] = by_op.get(op, 0) + d
    rest = int(compiled.expected_cycles - front)
    if rest > 0:
        by_part["kv"] = by_part.get("kv", 0) + rest
        by_op["writeback"] = by_op.get("writeback", 0) + rest
    return by_part, by_op
