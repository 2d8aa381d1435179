"""Chips kept loaded per compiled program, so that a repeated :func:`lpucore.execute` (and every
:mod:`lpucore.ops` call after the first) pays only the tensor copies and the run, not a new chip,
a program load and the constants' copy.

The cache holds at most ``LPUCORE_CHIP_CACHE`` chips (default 4; 0 turns it off), least recently
used first out, keyed by the compiled program (its identity), the engine and ``fp16_mxm``. It is
thread-safe: a chip is taken out of the cache while it runs, so two threads running the same
program at once get two chips. A reused chip restarts at cycle 0 with its SRAM kept (constants and
inputs are never overwritten by a run; only temporaries are), and its states are set back to their
initial values, so every call starts from the state a fresh load gives. A chip whose run raised is
dropped, not kept.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Mapping, Protocol, Tuple

import numpy as np

from ..chip import Chip
from ..config import ChipConfig
from ..errors import LpuError


class Compiled(Protocol):
    """What the cache uses of a :class:`~lpucore.compiler.Compiled` (a protocol, so that this
    module, which lower.py imports, does not import lower.py back)."""

    @property
    def config(self) -> ChipConfig: ...
    @property
    def states(self) -> Mapping[str, object]: ...
    @property
    def constants(self) -> Mapping[str, np.ndarray]: ...

    def load(self, chip: Chip) -> None: ...


DEFAULT_SIZE = 4
_Key = Tuple[int, str, str]
_LOCK = threading.Lock()
_CHIPS: "OrderedDict[_Key, Tuple[Compiled, Chip]]" = OrderedDict()


def cache_size() -> int:
    """Chips the cache may hold: ``LPUCORE_CHIP_CACHE`` (a whole number, 0: off) or 4."""
    text = os.environ.get("LPUCORE_CHIP_CACHE", "").strip()
    if not text:
        return DEFAULT_SIZE
    if not (text.isascii() and text.isdigit()):
        raise LpuError(f"LPUCORE_CHIP_CACHE must be a whole number of chips (0: no cache), not {text!r}")
    return int(text)


def clear() -> None:
    """Drop every cached chip."""
    with _LOCK:
        _CHIPS.clear()


def take(compiled: Compiled, engine: str, fp16_mxm: str) -> Chip:
    """A chip with ``compiled`` loaded and its states at their initial values: a cached one, or new."""
    key = (id(compiled), engine, fp16_mxm)
    with _LOCK:
        entry = _CHIPS.pop(key, None)
    if entry is not None and entry[0] is compiled:
        chip = entry[1]
        chip.reset(clear_memory=False)
        for name in compiled.states:
            chip.write_tensor(name, compiled.constants[name])
        return chip
    chip = Chip(compiled.config, engine=engine, fp16_mxm=fp16_mxm)
    compiled.load(chip)
    return chip


def give_back(compiled: Compiled, engine: str, fp16_mxm: str, chip: Chip) -> None:
    """Keep ``chip`` (which ran ``compiled`` without error) for the next call, evicting the least
    recently used chip beyond the cache's size."""
    size = cache_size()
    if size <= 0:
        return
    key = (id(compiled), engine, fp16_mxm)
    with _LOCK:
        _CHIPS[key] = (compiled, chip)
        _CHIPS.move_to_end(key)
        while len(_CHIPS) > size:
            _CHIPS.popitem(last=False)


def cached() -> int:
    """How many chips the cache holds now."""
    with _LOCK:
        return len(_CHIPS)
