"""Continuous batching for a server: requests join a running batch at the next step, on a simulated clock.

>>> engine = Engine(model, max_batch=8)          # compiles and loads the step program of 8 rows   # doctest: +SKIP
>>> engine.start()                               # the scheduler thread                              # doctest: +SKIP
>>> req = engine.submit(ids, 16, SamplingParams(temperature=0.7, seed=1))                           # doctest: +SKIP
>>> for event in req.events(): ...               # ("token", (id, text)) ... ("done", None)        # doctest: +SKIP
>>> req.figures()                                # simulated TTFT, time per output token, tokens/s   # doctest: +SKIP

One scheduler thread owns the chip and the :class:`~lpucore.llm.batch.BatchProgram` of ``max_batch`` rows.
Before each step it admits the queued requests into the free rows (a row whose request has finished or was
cancelled is free at once), prefills each admitted prompt that fills a prompt chunk by its row's chunk program
(:mod:`lpucore.llm.prefill`, on the same chip; the clock advances by every chunk, and the request chooses its
first token from the chunk's logits), then runs one step of the whole batch: each live row feeds its next prompt token
or its last new token at its own position, exactly as :func:`~lpucore.llm.batch.run_batch` does, so a request's
tokens are those of decoding it alone (greedy: identical; sampled: its own seeded random stream). A new request
starts at position 0 of its row's cache; the step program masks attention by position, so what the row's
previous request left in the cache is never read. A free row runs a dummy token (id 0 at position 0).

The simulated clock (``Engine.cycles``) is the sum of the steps' chip cycles; it stands still while the
batch is empty. A request's simulated arrival is the clock when it is submitted (a step then running ends
before the request joins: the queueing a real server would have), and its figures count from there: the time
to first token is the end of the step that chose its first token, less its arrival. Wall time on the host
plays no part in these figures; ``Request.host_seconds`` is the host's own work for the request
(sampling, text, and what the caller adds), the simulation of the chip's steps left out.
"""

from __future__ import annotations

import collections
import queue
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import LpuError
from .continuation import Continuation
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .decoder import Decoder


class ServeError(LpuError):
    """A request the engine could not finish (the chip step or the sampling failed), or an engine stopped."""


class Request:
    """One sequence submitted to an :class:`Engine`: its prompt, its :class:`~lpucore.llm.Continuation`, its
    events and its simulated times (in cycles of the engine's clock; :meth:`figures` in seconds).

    Events (:meth:`events`, in order): ``("token", (token_id, text_piece))`` for each new token (the piece is
    the text the token lets through, perhaps empty; without a tokenizer, None), then ``("done", text_rest)``
    (text held back until the end, e.g. part of a stop string that never completed) or ``("error", exc)``."""

    def __init__(self, ids: Sequence[int], seq: Continuation, sink: Optional["queue.Queue"] = None, tag=None):
        self.ids = [int(t) for t in ids]
        self.seq = seq
        self.tag = tag                      # the caller's label, passed along with every event
        self.sink: queue.Queue = sink if sink is not None else queue.Queue()
        self.fed = 0                        # tokens fed so far (= the position of the next one)
        self.next = self.ids[0]
        self.arrival: int = 0               # engine cycles when submitted
        self.admitted: Optional[int] = None  # cycles when its first step started
        self.first: Optional[int] = None    # cycles when its first token was chosen (end of that step)
        self.finished: Optional[int] = None  # cycles when its last token was chosen
        self.host_seconds = 0.0             # host work for this request (not the chip simulation)
        self.cancelled = False
        self.error: Optional[BaseException] = None
        self._piece: List[str] = []
        seq.on_text = self._piece.append

    @property
    def done(self) -> bool:
        return self.finished is not None or self.error is not None

    def events(self, timeout: Optional[float] = None) -> Iterator[Tuple[str, object]]:
        """This request's events until ``done`` or ``error`` (only when it has a sink of its own)."""
        while True:
            _, kind, data = self.sink.get(timeout=timeout)
            yield kind, data
            if kind in ("done", "error"):
                return

    def cancel(self) -> None:
        """Stop generating (its client has gone): the engine frees its row before the next step."""
        self.cancelled = True

    def _emit(self, kind: str, data) -> None:
        self.sink.put((self.tag, kind, data))

    def figures(self, clock_hz: float) -> Dict[str, float]:
        """The simulated figures of a finished request, in seconds: ``queue`` (arrival to its first step),
        ``ttft`` (arrival to its first token), ``tpot`` (time per output token after the first; 0 for one
        token), ``e2e`` (arrival to its last token) and ``tokens_per_s`` (its new tokens over ``e2e``)."""
        if self.finished is None:
            raise ServeError("the request has not finished")
        n = len(self.seq.tokens)
        admitted = self.finished if self.admitted is None else self.admitted
        first = self.finished if self.first is None else self.first
        e2e = (self.finished - self.arrival) / clock_hz
        return {"queue": (admitted - self.arrival) / clock_hz, "ttft": (first - self.arrival) / clock_hz,
                "tpot": (self.finished - first) / clock_hz / (n - 1) if n > 1 else 0.0, "e2e": e2e,
                "tokens_per_s": n / e2e if e2e > 0 else 0.0}


class Engine:
    """Serves :class:`Request` s of ``model`` (a one-chip :class:`~lpucore.llm.Decoder`) in a batch of
    ``max_batch`` rows: :meth:`submit` queues one, the scheduler thread (:meth:`start`) admits it into a free
    row before the next step. Raises :class:`~lpucore.errors.ModelDoesNotFit` when ``max_batch`` caches do not
    fit the chip."""

    def __init__(self, model: "Decoder", max_batch: int = 8):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, not {max_batch!r}")
        self.model = model
        self.prog = model.batch_program(max_batch)
        # every row's prompt-chunk program compiled now, before serving: no request waits for a compile
        self.chunk_programs = [c for c in (self.prog.chunk_program(model, b) for b in range(max_batch)) if c]
        self.max_batch = max_batch
        self.clock_hz = float(model.chip_config.clock_hz)
        self.cycles = 0                     # the simulated clock: every step's chip cycles
        self.steps = 0
        self.chunks = 0                     # prompt chunks run (lpucore.llm.prefill), in the clock too
        self.step_wall = 0.0                # host seconds simulating steps
        self.rows: List[Optional[Request]] = [None] * max_batch
        self._queue: Deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None

    @property
    def seconds(self) -> float:
        """The simulated clock in seconds."""
        return self.cycles / self.clock_hz

    def start(self) -> "Engine":
        """Start the scheduler thread (a daemon: it ends with the process, or at :meth:`stop`)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lpucore-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """End the scheduler thread; requests still queued or running get an ``error`` event."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        for r in list(self._queue) + [r for r in self.rows if r is not None]:
            self._fail(r, ServeError("the server is shutting down"))
        self._queue.clear()
        self.rows = [None] * self.max_batch

    def submit(self, ids: Sequence[int], max_new_tokens: int, sampling: SamplingParams, *, tokenizer=None,
               stop=None, eos_ids=(), sink: Optional["queue.Queue"] = None, tag=None) -> Request:
        """Queue a sequence (prompt ``ids``, checked by the caller against the model's vocabulary and
        capacity); it joins the batch at the next step. Returns its :class:`Request`. ``sink``: a queue its
        events go to as ``(tag, kind, data)`` (several requests may share one), else its own."""
        if self._stop:
            raise ServeError("the engine has stopped")
        seq = Continuation(ids, max_new_tokens, sampling, tokenizer=tokenizer, stop=stop, eos_ids=eos_ids)
        req = Request(ids, seq, sink, tag)
        with self._cond:
            req.arrival = self.cycles
            if seq.finished:                # max_new_tokens 0: nothing to run
                req.finished = self.cycles
                req._emit("done", "")
            else:
                self._queue.append(req)
                self._cond.notify()
        return req

    def _admit(self) -> bool:
        """Wait for work, then move queued requests into free rows; False when stopping. Holds the lock."""
        with self._cond:
            while not self._stop and not self._queue and not any(self.rows):
                self._cond.wait()
            if self._stop:
                return False
            for b, r in enumerate(self.rows):
                if r is not None and r.cancelled:
                    self.rows[b] = r = None
                while r is None and self._queue:
                    cand = self._queue.popleft()
                    if not cand.cancelled:
                        cand.admitted = self.cycles
                        self.rows[b] = r = cand
            return True

    def _run(self) -> None:
        while self._admit():
            try:
                self._prefill_admitted()
                if not any(r is not None for r in self.rows):
                    continue
                self._step()
            except Exception as e:          # a step or a sampling failed: fail its requests, keep serving
                print(f"lpucore serve: a step failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                err = e if isinstance(e, LpuError) else ServeError(f"the step failed: {type(e).__name__}: {e}")
                for b, r in enumerate(self.rows):
                    if r is not None and not r.done:
                        self._fail(r, err)
                    self.rows[b] = None

    def _prefill_admitted(self) -> None:
        """Rows admitted since the last step whose prompts fill a prompt chunk: each prefilled by its row's chunk
        program (:meth:`~lpucore.llm.batch.BatchProgram.prefill_row`, compiled on the row's first such prompt,
        on the batch's chip), one row after the other, the clock advancing by every chunk's cycles (the other
        rows wait, as they would on the one chip); each then chooses its first token."""
        for b, r in enumerate(self.rows):
            if r is None or r.fed or r.done:
                continue
            steps: list = []
            t0 = time.perf_counter()
            got = self.prog.prefill_row(self.model, b, np.asarray(r.ids), steps)
            self.step_wall += time.perf_counter() - t0
            if got is None:         # a short prompt: token by token in the steps
                continue
            with self._cond:
                self.cycles += sum(int(s.cycles) for s in steps)
                self.chunks += len(steps)
                now = self.cycles
            r.fed = len(r.ids)
            t1 = time.perf_counter()
            self._advance(r, got[0], now)
            r.host_seconds += time.perf_counter() - t1
            if r.done:
                self.rows[b] = None

    def _step(self) -> None:
        """One step of the batch: feed every live row, advance the clock, hand out the new tokens."""
        rows = self.rows
        toks = np.array([r.next if r is not None else 0 for r in rows], np.int32)
        pos = np.array([r.fed if r is not None else 0 for r in rows], np.int32)
        t0 = time.perf_counter()
        logits, st = self.prog.step(toks, pos)
        self.step_wall += time.perf_counter() - t0
        with self._cond:
            self.cycles += int(st.cycles)
            self.steps += 1
            now = self.cycles
        for b, r in enumerate(rows):
            if r is None:
                continue
            r.fed += 1
            if r.fed < len(r.ids):          # still prefilling
                r.next = r.ids[r.fed]
                continue
            t1 = time.perf_counter()
            self._advance(r, logits[b], now)
            r.host_seconds += time.perf_counter() - t1
            if r.done:
                rows[b] = None

    def _advance(self, r: Request, logits: np.ndarray, now: int) -> None:
        """Choose row ``r``'s next token from ``logits`` at clock ``now``; emit it, and finish ``r`` if done."""
        r.next = tok = r.seq.step(logits)
        if r.first is None:
            r.first = now
        piece = "".join(r._piece) if r.seq.stream is not None else None
        r._piece.clear()
        r._emit("token", (tok, piece))
        if r.seq.finished:
            r.seq.close()
            rest = "".join(r._piece)
            r._piece.clear()
            r.finished = now
            r._emit("done", rest)

    def _fail(self, r: Request, err: BaseException) -> None:
        if not r.done:
            r.error = err
            r._emit("error", err)


__all__ = ["Engine", "Request", "ServeError"]
