"""Choosing the next token from a step's logits: greedy, or seeded sampling with temperature, top-k and top-p.

Sampling happens on the host, from the float32 logits the chip's step program writes out: it costs no chip
cycles (the step program is the same static program whatever the sampling parameters, and the cycles, latency
and tokens/s of :class:`~lpucore.llm.DecodeStats` are those of the chip alone). A real deployment could sample on
the chip (a top-k over the vocabulary on the VXM/SXM); this simulator does not model that.

>>> params = SamplingParams(temperature=0.8, top_p=0.9, seed=7)      # validated once
>>> sampler = params.sampler()                                      # one per sequence: its own random stream
>>> token = sampler.choose(logits)                                  # doctest: +SKIP

Determinism: a :class:`Sampler` draws from ``np.random.default_rng(seed)`` (PCG64, whose stream NumPy keeps
stable across releases), one uniform number per sampled token, and orders tokens by a stable sort (ties go to
the lowest id). The same logits and seed therefore give the same tokens in every run, and both chip engines
(``"reference"`` and ``"fast"``, whose logits are bit-identical) give the same tokens. With ``top_k=0`` and
``top_p=1`` the draw is the one :func:`lpucore.llm.reference.choose_token` makes, so sequences sampled before
top-k/top-p existed are unchanged.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import LpuError
from .reference import softmax

MAX_SEED = 2 ** 63 - 1


class SamplingError(LpuError, ValueError):
    """Bad sampling parameters (an :class:`~lpucore.LpuError` and ``ValueError``), or logits that cannot be
    sampled (NaN)."""


def _number(name: str, v, lo: float, hi: float, lo_open: bool, hi_open: bool = False) -> float:
    """``v`` as a finite float within the interval, or SamplingError naming the parameter."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise SamplingError(f"{name} must be a number, not {v!r}")
    f = float(v)
    low_ok = f > lo if lo_open else f >= lo
    high_ok = f < hi if hi_open else f <= hi
    if not (math.isfinite(f) and low_ok and high_ok):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise SamplingError(f"{name} must be finite and in {interval}, not {v!r}")
    return f


def _integer(name: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not lo <= int(v) <= hi:
        raise SamplingError(f"{name} must be an integer in [{lo}, {hi}], not {v!r}")
    return int(v)


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen; validated when made (:class:`SamplingError` naming the parameter).

    Fields::

        ``temperature``  0 (the default) is greedy: the argmax, lowest id on ties. Above 0, tokens are drawn from
                         ``softmax(logits / temperature)`` restricted by ``top_k`` and ``top_p``. Finite, >= 0.
        ``top_k``        keep the ``top_k`` most likely tokens (0: all). ``top_k=1`` is greedy.
        ``top_p``        nucleus sampling: keep the fewest most likely tokens whose probabilities (after
                         ``top_k``) sum to at least ``top_p`` (always at least one token). 0 < top_p <= 1.
        ``seed``         the random stream's seed (an int >= 0), or None for fresh entropy (not reproducible).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = 0

    def __post_init__(self):
        object.__setattr__(self, "temperature", _number("temperature", self.temperature, 0.0, math.inf,
                                                        lo_open=False, hi_open=True))
        object.__setattr__(self, "top_k", _integer("top_k", self.top_k, 0, 2 ** 31 - 1))
        object.__setattr__(self, "top_p", _number("top_p", self.top_p, 0.0, 1.0, lo_open=True))
        if self.seed is not None:
            object.__setattr__(self, "seed", _integer("seed", self.seed, 0, MAX_SEED))

    @property
    def greedy(self) -> bool:
        """True when every choice is the argmax (temperature 0 or top_k 1): no random numbers are drawn."""
        return self.temperature == 0.0 or self.top_k == 1

    def sampler(self) -> "Sampler":
        """A new :class:`Sampler` (its own random stream, seeded with ``seed``): one per sequence."""
        return Sampler(self)

    @classmethod
    def resolve(cls, greedy: Optional[bool] = None, temperature: Optional[float] = None, top_k: int = 0,
                top_p: float = 1.0, seed: Optional[int] = 0) -> "SamplingParams":
        """The parameters :meth:`Decoder.generate`'s arguments stand for.

        ``greedy=True`` is the argmax (``temperature`` is then ignored, ``top_k`` and ``top_p`` must be left
        unset);
        ``greedy=False`` samples at ``temperature`` (1.0 when None); ``greedy=None`` (the default) samples when
        ``temperature`` > 0 is given and is greedy otherwise."""
        if greedy is not None and not isinstance(greedy, (bool, np.bool_)):
            raise SamplingError(f"greedy must be True, False or None, not {greedy!r}")
        if greedy:
            # a temperature with greedy=True was accepted (and ignored) before sampling had other parameters;
            # top_k / top_p with greedy=True contradict it
            if top_k not in (0, 1) or top_p != 1.0:
                raise SamplingError("greedy=True takes no top_k or top_p (greedy=False or a temperature > 0 "
                                    "samples)")
            return cls(0.0, 0, 1.0, seed)
        if greedy is False and temperature is None:
            temperature = 1.0
        if greedy is False and temperature == 0:
            raise SamplingError("temperature must be > 0 for sampling (greedy=False), not 0")
        return cls(0.0 if temperature is None else temperature, top_k, top_p, seed)


class Sampler:
    """Chooses the tokens of one sequence (:meth:`choose`), drawing from its own seeded random stream.

    Made by :meth:`SamplingParams.sampler`; a batch of sequences has one sampler per sequence, so each
    sequence's tokens do not depend on the others'."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def choose(self, logits: np.ndarray) -> int:
        """The next token id from ``logits`` (float [vocab]), on the host."""
        row = np.asarray(logits).reshape(-1)
        if self.params.greedy:
            return int(np.argmax(row))
        x = row.astype(np.float64)
        t = self.params.temperature
        with np.errstate(over="ignore", invalid="ignore"):
            z = x / t
            if not np.isfinite(z).all():        # a tiny temperature: shift before dividing
                z = (x - x.max()) / t
            p = softmax(z)
        if not np.isfinite(p).all():
            raise SamplingError("the logits hold NaN or infinity: cannot sample (greedy decoding takes the argmax)")
        keep = self._kept(x, p)
        if keep is not None:
            p = np.where(keep, p, 0.0)
            p /= p.sum()
        return int(self.rng.choice(len(p), p=p))

    def _kept(self, x: np.ndarray, p: np.ndarray) -> Optional[np.ndarray]:
        """Mask of the tokens top_k and top_p keep (None: all), from logits ``x`` and probabilities ``p``."""
        k, top_p = self.params.top_k, self.params.top_p
        if (k == 0 or k >= x.size) and top_p >= 1.0:
            return None
        order = np.argsort(-x, kind="stable")                # most likely first, lowest id first on ties
        n = x.size if k == 0 else min(k, x.size)
        if top_p < 1.0:
            head = p[order[:n]]
            c = np.cumsum(head / head.sum())
            n = min(n, int(np.searchsorted(c, top_p, side="left")) + 1)
        keep = np.zeros(x.size, dtype=bool)
        keep[order[:n]] = True
        return keep


__all__ = ["SamplingParams", "Sampler", "SamplingError"]
