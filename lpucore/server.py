"""An OpenAI-compatible HTTP server for a language model on the simulated chip (``python -m lpucore serve``).

Routes: ``GET /v1/models`` (and ``/v1/models/<id>``), ``POST /v1/completions`` and ``POST
/v1/chat/completions``, each streamed as server-sent events (``"stream": true``) or not. Built on the standard
library alone (:class:`http.server.ThreadingHTTPServer`, HTTP/1.1 keep-alive, chunked event streams): one thread
per connection parses the request and waits for its tokens; the :class:`~lpucore.llm.serve.Engine`'s scheduler
thread owns the chip and batches every request that has arrived (continuous batching: a new request joins at
the next step).

Each response's ``usage`` carries, beside ``prompt_tokens``, ``completion_tokens`` and ``total_tokens``, what the
chip would have delivered, in simulated seconds (:mod:`lpucore.llm.serve`): ``simulated_queue_s``,
``simulated_time_to_first_token_s`` (from the request's arrival, queueing included),
``simulated_time_per_output_token_s`` (after the first), ``simulated_e2e_s`` and ``simulated_tokens_per_s`` (new
tokens over ``simulated_e2e_s``), and ``host_overhead_s``: the host's own work for the request (parsing,
tokenising, sampling, text, JSON), the simulation of the chip's steps and the waiting left out.

Bad requests get OpenAI's error body ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status:
bad JSON 400, an unknown model 404 ``model_not_found``, a prompt too long for the KV cache 400
``context_length_exceeded``, a bad or unsupported parameter 400 with ``param`` naming it.

A model without a tokenizer (a named shape with random weights) takes prompts of token ids (OpenAI's
``prompt: [1, 2, 3]``) and answers with the new ids as text, separated by spaces; text and chats need a model
directory with a tokenizer. Every choice also carries ``token_ids``, the new token ids (an extension).
"""

from __future__ import annotations

import json
import numbers
import queue
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from .errors import LpuError
from .llm.sampling import SamplingError, SamplingParams
from .llm.serve import Engine, Request
from .llm.text import check_stop

if TYPE_CHECKING:
    from .llm.decoder import Decoder

MAX_BODY = 4 << 20          # bytes of a request body
MAX_PROMPTS = 64            # prompts in one completions request
DEFAULT_MAX_TOKENS = 16     # OpenAI's default for /v1/completions
# accepted and ignored: they do not change what is generated
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# accepted at their neutral value only (anything else is a 400 naming the parameter)
NEUTRAL: Dict[str, Tuple[Any, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False, 0),
    "top_logprobs": (None, 0), "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]),
}
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
          "ignore_eos"}
COMPLETION_KEYS = COMMON | {"prompt"}
CHAT_KEYS = COMMON | {"messages", "max_completion_tokens"}


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message[:500], param, code)


class Params:
    """A generation request's checked parameters (one or more prompts of token ids)."""

    def __init__(self, prompts: List[List[int]], max_tokens: int, sampling: SamplingParams, stop, eos_ids,
                 stream: bool, include_usage: bool):
        self.prompts, self.max_tokens, self.sampling, self.stop = prompts, max_tokens, sampling, stop
        self.eos_ids, self.stream, self.include_usage = eos_ids, stream, include_usage


class Api:
    """The OpenAI routes of one model served by an :class:`~lpucore.llm.serve.Engine` (no HTTP here: the
    handler hands it parsed bodies). ``name`` is the model id clients give."""

    def __init__(self, engine: Engine, name: str):
        self.engine, self.model, self.name = engine, engine.model, name
        self.created = int(time.time())

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "lpucore",
                "max_model_len": self.model.capacity}

    # ---- parameters ----------------------------------------------------------------------------------------
    def _check_keys(self, body: Mapping[str, Any], known: set) -> None:
        for k, v in body.items():
            if k in NEUTRAL:
                if not (v is None or any(v == a and isinstance(v, bool) == isinstance(a, bool) for a in NEUTRAL[k])):
                    raise _bad(k, f"{k}={v!r} is not supported by this server", "unsupported_parameter")
            elif k not in known and k not in IGNORED:
                raise _bad(k, f"unrecognized request argument supplied: {k}", "unrecognized_parameter")
        model = body.get("model")
        if not isinstance(model, str):
            raise _bad("model", "model must be given, as a string (GET /v1/models lists it)", "missing_model")
        if model != self.name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.name!r}", "model",
                           "model_not_found")

    def _sampling(self, body: Mapping[str, Any]) -> SamplingParams:
        temperature = body.get("temperature")
        top_p, top_k, seed = body.get("top_p"), body.get("top_k"), body.get("seed")
        if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k == -1:
            top_k = 0                       # vLLM's spelling of "all tokens"
        kw: Dict[str, Any] = {"temperature": 1.0 if temperature is None else temperature,   # OpenAI's default
              "top_p": 1.0 if top_p is None else top_p, "top_k": 0 if top_k is None else top_k, "seed": seed}
        for name, v in kw.items():
            try:
                SamplingParams(**{name: v})
            except SamplingError as e:
                raise _bad(name, str(e)) from None
        return SamplingParams(**kw)

    def _max_tokens(self, body: Mapping[str, Any], n_prompt: int, param: str, default: int) -> int:
        """``max_tokens`` (or ``max_completion_tokens``), checked against the KV cache's capacity."""
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        v = body.get(name)
        cap = self.model.capacity
        room = cap - n_prompt + 1           # the last new token is chosen, never fed
        if v is None:
            v = min(default, room)
        elif isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise _bad(name, f"{name} must be an integer >= 1, not {v!r}")
        if n_prompt + max(int(v) - 1, 0) > cap or room < 1:
            raise _bad(param, f"this model's KV cache holds {cap} tokens: a prompt of {n_prompt} tokens and "
                              f"{v} new tokens need {n_prompt + max(int(v) - 1, 0)}; shorten the prompt or "
                              f"lower {name}", "context_length_exceeded")
        return int(v)

    def _params(self, body: Mapping[str, Any], prompts: List[List[int]], param: str, default: int) -> Params:
        sampling = self._sampling(body)
        try:
            stop = check_stop(body.get("stop"))
        except LpuError as e:
            raise _bad("stop", str(e)) from None
        if stop and self.model.tokenizer is None:
            raise _bad("stop", f"stop strings need a tokenizer; {self.model.cfg.name} has none "
                               f"({self.model.no_text})", "tokenizer_needed")
        max_tokens = max(self._max_tokens(body, len(p), param, default) for p in prompts)
        stream, opts = body.get("stream", False), body.get("stream_options")
        if stream is not None and not isinstance(stream, bool):
            raise _bad("stream", f"stream must be true or false, not {stream!r}")
        if opts is not None and (not isinstance(opts, dict) or set(opts) - {"include_usage"}
                                 or not isinstance(opts.get("include_usage", False), bool)):
            raise _bad("stream_options", f"stream_options must be {{'include_usage': bool}}, not {opts!r}")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise _bad("ignore_eos", f"ignore_eos must be true or false, not {ignore_eos!r}")
        return Params(prompts, max_tokens, sampling, list(stop) or None,
                      () if ignore_eos else self.model.eos_ids, bool(stream), bool((opts or {}).get("include_usage")))

    def _ids(self, prompt, param: str) -> List[int]:
        """One prompt (text, or a list of token ids) as checked token ids."""
        if isinstance(prompt, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise _bad(param, "a prompt is a string, a list of token ids, or a list of those")
        if isinstance(prompt, str) and self.model.tokenizer is None:
            raise _bad(param, f"text needs a tokenizer; {self.model.cfg.name} has none ({self.model.no_text})",
                       "tokenizer_needed")
        try:
            ids, _ = self.model._prompt_ids(prompt)
        except (LpuError, ValueError) as e:
            raise _bad(param, str(e)) from None
        return [int(t) for t in ids]

    def completion_params(self, body: Mapping[str, Any]) -> Params:
        """The checked parameters of a ``/v1/completions`` body."""
        self._check_keys(body, COMPLETION_KEYS)
        p = body.get("prompt")
        if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p)):
            p = [p]
        if not isinstance(p, list) or not p or len(p) > MAX_PROMPTS:
            raise _bad("prompt", f"prompt must be a string, a list of token ids, or a list of 1 to {MAX_PROMPTS} "
                                 f"of those, not {p!r}")
        return self._params(body, [self._ids(x, "prompt") for x in p], "prompt", DEFAULT_MAX_TOKENS)

    def chat_params(self, body: Mapping[str, Any]) -> Params:
        """The checked parameters of a ``/v1/chat/completions`` body: the chat rendered and encoded."""
        self._check_keys(body, CHAT_KEYS)
        tk = self.model.tokenizer
        if tk is None:
            raise _bad("messages", f"chats need a tokenizer and a chat template; {self.model.cfg.name} has none "
                                   f"({self.model.no_text})", "tokenizer_needed")
        messages = body.get("messages")
        try:
            rendered = tk.apply_chat_template(_plain_messages(messages))
            ids = tk.encode(rendered, add_special_tokens=False)     # the template writes the special tokens
        except LpuError as e:
            raise _bad("messages", str(e)) from None
        if not ids:
            raise _bad("messages", "the chat template rendered no tokens")
        return self._params(body, [self._ids(ids, "messages")], "messages", self.model.capacity)

    # ---- running -------------------------------------------------------------------------------------------
    def submit(self, p: Params, sink: "queue.Queue") -> List[Request]:
        """Queue the request's prompts on the engine (events to ``sink``, tagged with the prompt's index)."""
        reqs: List[Request] = []
        try:
            for i, ids in enumerate(p.prompts):
                reqs.append(self.engine.submit(ids, p.max_tokens, p.sampling, tokenizer=self.model.tokenizer,
                                               stop=p.stop, eos_ids=p.eos_ids, sink=sink, tag=i))
        except BaseException:
            for r in reqs:
                r.cancel()
            raise
        return reqs

    def usage(self, reqs: List[Request], host_seconds: float) -> dict:
        """The ``usage`` of a finished response: token counts and simulated figures (see the module)."""
        figs = [r.figures(self.engine.clock_hz) for r in reqs]
        prompt = sum(len(r.ids) for r in reqs)
        new = sum(len(r.seq.tokens) for r in reqs)
        tpots = [f["tpot"] for f, r in zip(figs, reqs) if len(r.seq.tokens) > 1]
        e2e = max(f["e2e"] for f in figs)
        return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new,
                "simulated_queue_s": min(f["queue"] for f in figs),
                "simulated_time_to_first_token_s": min(f["ttft"] for f in figs),
                "simulated_time_per_output_token_s": sum(tpots) / len(tpots) if tpots else 0.0,
                "simulated_e2e_s": e2e, "simulated_tokens_per_s": new / e2e if e2e > 0 else 0.0,
                "host_overhead_s": host_seconds + sum(r.host_seconds for r in reqs)}


def _plain_messages(messages):
    """OpenAI's message content given as a list of parts (``[{"type": "text", "text": ...}]``) joined into one
    string, as chat templates expect; anything else is left for the template's own checks."""
    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, list):
            if not all(isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str) for x in c):
                raise _bad("messages", "message content parts must be {'type': 'text', 'text': ...} (text only)")
            m = dict(m, content="".join(x["text"] for x in c))
        out.append(m)
    return out


def _finish_reason(r: Request) -> str:
    return "length" if r.seq.finish_reason == "length" else "stop"      # eos and stop strings: "stop"


def _text(r: Request) -> str:
    """A finished request's new text (its token ids, spaced, for a model without a tokenizer)."""
    text = r.seq.text
    return text if text is not None else " ".join(str(t) for t in r.seq.tokens)


class _Response:
    """The OpenAI objects of one response (``chat`` or completion), chunks and whole."""

    def __init__(self, api: Api, chat: bool):
        self.api, self.chat = api, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.api.name,
                "system_fingerprint": None}

    def whole(self, reqs: List[Request], usage: dict) -> dict:
        choices = []
        for i, r in enumerate(reqs):
            c: Dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": _finish_reason(r),
                                 "token_ids": list(r.seq.tokens)}
            if self.chat:
                c["message"] = {"role": "assistant", "content": _text(r)}
            else:
                c["text"] = _text(r)
            choices.append(c)
        return dict(self._head("chat.completion" if self.chat else "text_completion"), choices=choices, usage=usage)

    def chunk(self, index: int, text: Optional[str], token_ids: List[int], finish: Optional[str] = None,
              role: bool = False) -> dict:
        c: Dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish, "token_ids": token_ids}
        if self.chat:
            delta: Dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            c["delta"] = delta
        else:
            c["text"] = text or ""
        return dict(self._head("chat.completion.chunk" if self.chat else "text_completion"), choices=[c])

    def usage_chunk(self, usage: dict) -> dict:
        return dict(self._head("chat.completion.chunk" if self.chat else "text_completion"), choices=[],
                    usage=usage)


class Handler(BaseHTTPRequestHandler):
    """One connection's requests (HTTP/1.1 keep-alive); the server's :class:`Api` does the work."""

    protocol_version = "HTTP/1.1"
    server: "Server"
    server_version = "lpucore"

    def log_message(self, format, *args):      # noqa: A002 (http.server's name)
        if self.server.verbose:
            super().log_message(format, *args)

    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def do_GET(self):
        api, path = self.server.api, self._path()
        if path == "/v1/models":
            self._send_json(200, api.models())
        elif path == "/v1/models/" + api.name:
            self._send_json(200, api.model_card())
        elif path.startswith("/v1/models/"):
            self._send_json(404, ApiError(404, f"the model {path[len('/v1/models/'):]!r} does not exist", "model",
                                          "model_not_found").body())
        elif path == "/health":
            self._send_json(200, {"status": "ok", "simulated_clock_s": api.engine.seconds, "steps": api.engine.steps})
        elif path in ROUTES:
            self._send_json(405, ApiError(405, f"{path} takes POST", None, "method_not_allowed").body())
        else:
            self._send_json(404, ApiError(404, f"no route {path}", None, "not_found").body())

    def _not_allowed(self):
        try:
            if self.headers.get("Content-Length") is not None:
                self._body()
        except ApiError:
            pass                        # close_connection is set: the unread body goes with the connection
        self._send_json(405, ApiError(405, f"{self.command} is not served: GET /v1/models, POST "
                                           f"{' or '.join(ROUTES)}", None, "method_not_allowed").body())

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def do_POST(self):
        path = self._path()
        self._streaming = False
        try:
            if path not in ROUTES:
                self._body()            # read, so that the connection stays in step
                raise ApiError(404 if path not in ("/v1/models", "/health") else 405, f"no POST route {path}", None,
                               "not_found")
            t0 = time.perf_counter()
            body = self._body()
            chat = ROUTES[path]
            api = self.server.api
            params = api.chat_params(body) if chat else api.completion_params(body)
            self._generate(api, params, chat, t0)
        except ApiError as e:
            self._refuse(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:          # a bug: say so, keep serving
            import traceback
            print(f"lpucore serve: {path} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            self._refuse(ApiError(500, f"the server failed: {type(e).__name__}: {e}", None, "internal_error",
                                  "server_error"))

    def _refuse(self, e: ApiError) -> None:
        if self._streaming:             # the stream has begun: the error is its last event
            self._event(e.body())
            self._end_stream()
        else:
            self._send_json(e.status, e.body())

    def _body(self) -> dict:
        """The request's JSON object (ApiError 400 / 411 / 413 otherwise)."""
        n = self.headers.get("Content-Length")
        if n is None or not n.strip().isdigit():
            self.close_connection = True
            raise ApiError(411, "a request body needs a Content-Length", None, "length_required")
        if int(n) > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, f"the request body is {int(n):,} bytes; at most {MAX_BODY:,}", None,
                           "request_too_large")
        raw = self.rfile.read(int(n))
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}"[:300], None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        return body

    # ---- event streams -------------------------------------------------------------------------------------
    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._streaming = True

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _event(self, obj) -> None:
        self._write_chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

    def _end_stream(self) -> None:
        self._event(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        self._streaming = False

    def _generate(self, api: Api, p: Params, chat: bool, t0: float) -> None:
        """Run the request's prompts on the engine and answer, streamed or whole."""
        sink: queue.Queue = queue.Queue()
        reqs = api.submit(p, sink)
        res = _Response(api, chat)
        waited = 0.0
        counts = [0] * len(reqs)
        try:
            if p.stream:
                self._start_stream()
                if chat:
                    for i in range(len(reqs)):
                        self._event(res.chunk(i, "", [], role=True))
            pending = len(reqs)
            while pending:
                w0 = time.perf_counter()
                i, kind, data = sink.get()
                waited += time.perf_counter() - w0
                if kind == "error":
                    raise ApiError(500, f"generation failed: {data}", None, "generation_failed", "server_error")
                if kind == "done":
                    pending -= 1
                if p.stream:
                    self._stream_event(res, reqs, i, kind, data, counts, pending, p, t0, waited)
            if not p.stream:
                self._send_json(200, res.whole(reqs, api.usage(reqs, time.perf_counter() - t0 - waited)))
        finally:
            for r in reqs:              # a client gone, or an error: free the rows
                if not r.done:
                    r.cancel()

    def _stream_event(self, res: _Response, reqs: List[Request], i: int, kind: str, data, counts: List[int],
                      pending: int, p: Params, t0: float, waited: float) -> None:
        """Send one engine event of prompt ``i`` as a chunk; after the last ``done``, the usage and [DONE]."""
        if kind == "token":
            tok, piece = data
            if piece is None:           # no tokenizer: the ids are the text
                piece = (" " if counts[i] else "") + str(tok)
            counts[i] += 1
            self._event(res.chunk(i, piece, [tok]))
            return
        last = pending == 0
        usage: Optional[dict] = None
        api_usage: dict = {}
        if last:
            api_usage = res.api.usage(reqs, time.perf_counter() - t0 - waited)
            usage = None if p.include_usage else api_usage
        chunk = res.chunk(i, data or ("" if res.chat else None), [], _finish_reason(reqs[i]))
        if usage is not None:
            chunk["usage"] = usage      # the simulated figures even when the client did not ask
        self._event(chunk)
        if last:
            if p.include_usage:
                self._event(res.usage_chunk(api_usage))
            self._end_stream()


ROUTES = {"/v1/completions": False, "/v1/chat/completions": True}     # path -> is a chat


class Server(ThreadingHTTPServer):
    """The HTTP server of an :class:`Api` (one thread per connection)."""

    daemon_threads = True
    request_queue_size = 128        # connections waiting to be accepted: many clients may arrive at once

    def __init__(self, api: Api, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False):
        self.api, self.verbose = api, verbose
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if isinstance(host, bytes):         # typeshed allows it; an AF_INET server has a str
            host = host.decode()
        return f"http://{host}:{port}/v1"


def serve(model: "Decoder", name: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
          verbose: bool = False, out=None) -> None:
    """Serve ``model`` as ``name`` until interrupted: compile its step program of ``max_batch`` rows, bind
    ``host``:``port`` (0: a free port), print the URL on ``out`` (stdout) and answer requests."""
    out = out if out is not None else sys.stdout
    engine = Engine(model, max_batch)
    server = Server(Api(engine, name), host, port, verbose)
    engine.start()
    progs = engine.chunk_programs
    chunks = (f", prompt chunks of {progs[0].rows} rows: " + " / ".join(f"{c.cycles:,}" for c in progs)
              + " cycles by row" if progs else "")
    print(f"lpucore serve: {name} ({model.precision}, {max_batch} rows of {model.capacity} positions, step "
          f"{engine.prog.compiled.expected_cycles:,} cycles{chunks} on {model.chip_config.name}) at {server.url}",
          file=out, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        engine.stop()


__all__ = ["Api", "ApiError", "Params", "Server", "Handler", "serve"]
