"""One sequence's continuation, token by token: the host's side of a decode, apart from the chip.

A :class:`Continuation` takes each step's logits and chooses the next token (its own
:class:`~lpucore.llm.sampling.Sampler`), turns the tokens into text (its own
:class:`~lpucore.llm.text.TextStream`), and says when the sequence has finished: an end-of-sequence token, a
stop string, or ``max_new_tokens``. :meth:`Decoder.generate <lpucore.llm.Decoder.generate>` drives one; a batch
of sequences sharing a step program drives one each, so every sequence finishes on its own and samples from
its own random stream. Driving one by hand::

    c = Continuation(prompt_ids, 16, SamplingParams(temperature=0.7, seed=1), tokenizer=tk, stop=["\\n"])
    while not c.finished:
        token = c.step(logits)          # the logits of the last token fed; then feed ``token`` to the chip
    c.close()
    c.text, c.tokens, c.finish_reason
"""

from __future__ import annotations

from typing import Callable, FrozenSet, Iterable, List, Optional, Sequence, Union

import numpy as np

from .sampling import SamplingParams
from .text import TextError, Tokenizer, check_stop

FINISH_REASONS = ("length", "eos", "stop")


class Continuation:
    """The new tokens of one sequence after ``prompt_ids``.

    ``sampling`` chooses them; ``eos_ids`` end the sequence (the EOS is the last token, and adds no text);
    with a ``tokenizer`` the tokens become :attr:`text` as they come (``on_text(piece)`` with each piece that
    can be shown) and ``stop`` strings end it (the text ends before the stop string). :attr:`finish_reason`
    is None while it runs, then ``"length"``, ``"eos"`` or ``"stop"``.
    """

    def __init__(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingParams, *,
                 tokenizer: Optional[Tokenizer] = None, stop: Union[str, Sequence[str], None] = None,
                 eos_ids: Iterable[int] = (), on_text: Optional[Callable[[str], None]] = None):
        stops = check_stop(stop)
        if (stops or on_text is not None) and tokenizer is None:
            raise TextError("stop strings and on_text need a tokenizer")
        self.max_new_tokens = int(max_new_tokens)
        self.sampler = sampling.sampler()
        self.eos_ids: FrozenSet[int] = frozenset(int(i) for i in eos_ids)
        self.stream = None if tokenizer is None else tokenizer.stream(list(prompt_ids), stops)
        self.on_text = on_text
        self.tokens: List[int] = []
        self.logits: List[np.ndarray] = []
        self.finish_reason: Optional[str] = "length" if self.max_new_tokens <= 0 else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> Optional[str]:
        """The new text so far (all of it after :meth:`close`); None without a tokenizer."""
        return None if self.stream is None else self.stream.text

    @property
    def stop_string(self) -> Optional[str]:
        return None if self.stream is None else self.stream.stop_string

    def step(self, logits: np.ndarray) -> int:
        """Choose the next token from ``logits`` (the last fed token's), record it, and update
        :attr:`finish_reason`; returns the token (feed it to the model unless :attr:`finished`)."""
        if self.finished:
            raise RuntimeError("this sequence has finished")
        tok = self.sampler.choose(logits)
        self.tokens.append(tok)
        self.logits.append(logits)
        if tok in self.eos_ids:
            self.finish_reason = "eos"
        else:
            if self.stream is not None:
                self._emit(self.stream.push(tok))
                if self.stream.stopped:
                    self.finish_reason = "stop"
            if self.finish_reason is None and len(self.tokens) >= self.max_new_tokens:
                self.finish_reason = "length"
        return tok

    def close(self) -> None:
        """Hand out the text still held back (a partial stop string, an incomplete character)."""
        if self.stream is not None:
            self._emit(self.stream.close())

    def _emit(self, piece: str) -> None:
        if piece and self.on_text is not None:
            self.on_text(piece)


__all__ = ["Continuation", "FINISH_REASONS"]
