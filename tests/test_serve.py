"""The OpenAI-compatible server (``python -m lpucore serve``, lpucore.server and lpucore.llm.serve): a real
server process on a free local port, spoken to by the ``openai`` client. Tokens are checked against the NumPy
reference, batched requests against the same requests alone, the simulated figures against the step program's
cycles, and every bad request gets an OpenAI error body without killing the server."""

import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")
pytest.importorskip("safetensors")
openai = pytest.importorskip("openai")

from lpucore import ChipConfig  # noqa: E402
from lpucore.llm import Decoder  # noqa: E402
from lpucore.testing.text import write_text_model  # noqa: E402

CAPACITY = 48           # the most a batch of 2 of the text model fits on a 'small' chip
CHIP = ChipConfig.small()
STARTUP = 180           # seconds: import, load and compile (step and chunk programs; about 15 s alone, more busy)


class Served:
    """A ``python -m lpucore serve`` process: its URL, client, step cycles; stopped by :meth:`close`."""

    def __init__(self, tmp, model, *options):
        self.log = open(tmp / "stderr.txt", "w+")
        cmd = [sys.executable, "-m", "lpucore", "serve", "--model", str(model), "--port", "0", "--config", "small",
               *options]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.name = str(model)
        line = ""
        timer = threading.Timer(STARTUP, self.proc.kill)
        timer.start()
        try:
            while " at http://" not in line:
                line = self.proc.stdout.readline()
                if not line:
                    self.log.seek(0)
                    raise RuntimeError(f"the server did not start: {self.log.read()}")
        finally:
            timer.cancel()
        self.url = re.search(r"at (http://\S+/v1)", line).group(1)
        self.step_cycles = int(re.search(r"step ([\d,]+) cycles", line).group(1).replace(",", ""))
        # prompt chunks (lpucore.llm.prefill): rows per chunk and row 0's chunk cycles (a request alone runs there)
        m = re.search(r"prompt chunks of (\d+) rows: ([\d,]+)", line)
        self.chunk = (int(m.group(1)), int(m.group(2).replace(",", ""))) if m else None
        self.client = openai.OpenAI(base_url=self.url, api_key="x", max_retries=0, timeout=60)

    def get(self, path):
        with urllib.request.urlopen(self.url.replace("/v1", "") + path, timeout=30) as r:
            return json.loads(r.read())

    def post_raw(self, path, data: bytes, headers=None):
        """(status, JSON body) of a POST of ``data`` as it is."""
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {"Content-Type": "x"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.proc.stdout.close()
        self.log.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_text_model(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("server"), model_dir, "--capacity", str(CAPACITY), "--max-batch", "2")
    yield s
    s.close()


@pytest.fixture(scope="module")
def local(model_dir):
    """The same model in this process (not compiled: its tokenizer and NumPy reference)."""
    return Decoder.from_pretrained(model_dir, capacity=CAPACITY, config=CHIP)


def reference_tokens(local, ids, n):
    tokens, _ = local.reference().generate(list(ids), n)
    return [int(t) for t in tokens]


def check_figures(server, usage, prompt_tokens, new):
    """The simulated figures of a request that ran alone (no queue): one step per prompt token to the
    first token, or its prompt chunks when it fills one and they are faster, then one step per token after
    it, at the step program's cycles."""
    step = server.step_cycles / CHIP.clock_hz
    assert usage.prompt_tokens == prompt_tokens and usage.completion_tokens == new
    assert usage.total_tokens == prompt_tokens + new
    u = usage.model_extra
    assert u["simulated_queue_s"] == 0.0
    ttft = prompt_tokens * step
    if server.chunk is not None and prompt_tokens >= server.chunk[0]:       # prefilled in chunks when faster
        ttft = min(ttft, -(-prompt_tokens // server.chunk[0]) * server.chunk[1] / CHIP.clock_hz)
    assert u["simulated_time_to_first_token_s"] == pytest.approx(ttft, rel=1e-9)
    assert u["simulated_time_per_output_token_s"] == pytest.approx(step, rel=1e-9)
    assert u["simulated_e2e_s"] == pytest.approx(ttft + (new - 1) * step, rel=1e-9)
    assert u["simulated_tokens_per_s"] == pytest.approx(new / u["simulated_e2e_s"], rel=1e-9)
    assert 0 < u["host_overhead_s"] < 5


def test_models_and_a_completion(server, local):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [server.name] and models.data[0].model_extra["max_model_len"] == CAPACITY
    r = server.client.completions.create(model=server.name, prompt="hello world", max_tokens=6, temperature=0)
    ids = local.tokenizer.encode("hello world")
    expected = reference_tokens(local, ids, 6)
    c = r.choices[0]
    assert c.model_extra["token_ids"] == expected and c.finish_reason == "length"
    assert c.text == local.tokenizer.decode(ids + expected)[len(local.tokenizer.decode(ids)):]
    check_figures(server, r.usage, len(ids), 6)


def test_a_streamed_chat_completion(server, local):
    messages = [{"role": "user", "content": "the cat"}]
    whole = server.client.chat.completions.create(model=server.name, messages=messages, max_tokens=8, temperature=0)
    stream = server.client.chat.completions.create(model=server.name, messages=messages, max_tokens=8,
                                                   temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    ids = local.tokenizer.encode(local.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    expected = reference_tokens(local, ids, 8)
    assert whole.choices[0].model_extra["token_ids"] == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = [t for ch in chunks for c in ch.choices for t in c.model_extra["token_ids"]]
    assert streamed == expected
    assert "".join(c.delta.content or "" for ch in chunks for c in ch.choices) == whole.choices[0].message.content
    assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None    # include_usage: a last chunk of usage
    check_figures(server, chunks[-1].usage, len(ids), 8)
    check_figures(server, whole.usage, len(ids), 8)


def run_together(server, kwargs):
    """The completions of ``kwargs`` (one per client), sent at once from threads."""
    out = [None] * len(kwargs)
    start = threading.Barrier(len(kwargs))

    def client(i):
        start.wait()
        out[i] = server.client.completions.create(model=server.name, **kwargs[i])
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(kwargs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=5)])
def test_two_clients_batched_get_the_tokens_they_get_alone(server, sampling):
    # prompts shorter than a prompt chunk: every token is a step (chunks: tests/test_llm_batch.py's engine test)
    kwargs = [dict(prompt=[3, 1, 4], max_tokens=24, **sampling),
              dict(prompt=[0, 7, 9], max_tokens=20, **dict(sampling, seed=sampling.get("seed", 0) + 1))]
    h0 = server.get("/health")
    alone = [server.client.completions.create(model=server.name, **kw) for kw in kwargs]
    h1 = server.get("/health")
    together = run_together(server, kwargs)
    h2 = server.get("/health")
    for a, b in zip(alone, together):
        assert b.choices[0].model_extra["token_ids"] == a.choices[0].model_extra["token_ids"]
        assert b.choices[0].text == a.choices[0].text
    # alone: one request's steps after the other's; together: the two share steps (one joins at the next step)
    steps_alone, steps_together = h1["steps"] - h0["steps"], h2["steps"] - h1["steps"]
    assert steps_alone == sum(a.usage.prompt_tokens + a.usage.completion_tokens - 1 for a in alone)
    assert steps_together < steps_alone
    assert h2["simulated_clock_s"] - h1["simulated_clock_s"] == pytest.approx(
        steps_together * server.step_cycles / CHIP.clock_hz, rel=1e-9)
    # the later of the two waited for the step running when it arrived, if any
    queued = [r.usage.model_extra["simulated_queue_s"] for r in together]
    assert min(queued) == 0.0 and max(queued) <= server.step_cycles / CHIP.clock_hz * (1 + 1e-9)


BAD = [
    (dict(model="nope"), 404, "model", "model_not_found"),
    (dict(temperature=-1), 400, "temperature", None),
    (dict(top_p=0), 400, "top_p", None),
    (dict(top_p=1.5), 400, "top_p", None),
    (dict(n=2), 400, "n", "unsupported_parameter"),
    (dict(max_tokens=0), 400, "max_tokens", None),
    (dict(max_tokens=CAPACITY), 400, "prompt", "context_length_exceeded"),
    (dict(prompt="hello " * CAPACITY), 400, "prompt", "context_length_exceeded"),
    (dict(prompt=[1, 2, 300]), 400, "prompt", None),
    (dict(prompt=[]), 400, "prompt", None),
    (dict(seed=-3), 400, "seed", None),
    (dict(stop=5), 400, "stop", None),
    (dict(extra_body={"frobnicate": 1}), 400, "frobnicate", "unrecognized_parameter"),
]


def test_bad_requests_get_openai_errors(server):
    for kw, status, param, code in BAD:
        args = dict(model=server.name, prompt="hello", max_tokens=3)
        args.update(kw)
        with pytest.raises(openai.APIStatusError) as e:
            server.client.completions.create(**args)
        assert e.value.status_code == status, kw
        err = e.value.body
        assert set(err) == {"message", "type", "param", "code"} and err["message"], kw
        assert err["param"] == param and (code is None or err["code"] == code), (kw, err)
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model=server.name, messages=[{"content": "no role"}])
    assert e.value.body["param"] == "messages"
    for data, code in ((b"{not json", "invalid_json"), (b"[1, 2]", "invalid_json"),
                       (b'{"model": ' * 100_000, "invalid_json")):
        status, body = server.post_raw("/completions", data)
        assert status == 400 and body["error"]["code"] == code
    status, body = server.post_raw("/nowhere", b"{}")
    assert status == 404 and body["error"]["message"]
    # a client that leaves mid-stream frees its row; the server still answers
    stream = server.client.completions.create(model=server.name, prompt="hello", max_tokens=40, temperature=0,
                                              stream=True)
    next(iter(stream))
    stream.close()
    assert server.client.completions.create(model=server.name, prompt=[5], max_tokens=2).usage.completion_tokens == 2
    assert server.proc.poll() is None


def test_a_named_shape_takes_token_ids(tmp_path):
    s = Served(tmp_path, "tiny", "--capacity", "16", "--max-batch", "1")
    try:
        r = s.client.completions.create(model="tiny", prompt=[[3, 1, 4], [1, 5]], max_tokens=4, temperature=0)
        ref = Decoder.random("tiny", capacity=16, config=CHIP)
        for c, p in zip(r.choices, ([3, 1, 4], [1, 5])):
            expected = reference_tokens(ref, p, 4)
            assert c.model_extra["token_ids"] == expected and c.text == " ".join(map(str, expected))
        assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 8
        chat = [{"role": "user", "content": "x"}]
        for call in (lambda: s.client.completions.create(model="tiny", prompt="text", max_tokens=2),
                     lambda: s.client.chat.completions.create(model="tiny", messages=chat)):
            with pytest.raises(openai.BadRequestError) as e:
                call()
            assert e.value.body["code"] == "tokenizer_needed"
        assert np.isfinite(s.get("/health")["simulated_clock_s"])
    finally:
        s.close()


def test_a_failed_step_fails_its_requests_and_the_server_goes_on():
    """In process: a step that raises gives its requests a 500 (a streamed one, an error event), and the
    next request is served as if nothing happened; a stopped engine fails what it still holds."""
    from lpucore import LpuError
    from lpucore.llm.sampling import SamplingParams
    from lpucore.llm.serve import Engine, ServeError
    from lpucore.server import Api, Server

    model = Decoder.random("tiny", capacity=16, config=CHIP)
    with pytest.raises(ValueError, match="max_batch"):
        Engine(model, 0)
    engine = Engine(model, 1).start()
    server = Server(Api(engine, "tiny"), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=60)
    step = engine.prog.step

    def broken(tokens, positions):
        raise LpuError("an injected failure")
    try:
        engine.prog.step = broken
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="tiny", prompt=[1, 2], max_tokens=2)
        assert e.value.body["code"] == "generation_failed" and "injected" in e.value.body["message"]
        with pytest.raises(openai.APIError, match="injected"):
            list(client.completions.create(model="tiny", prompt=[1, 2], max_tokens=2, stream=True))
        engine.prog.step = step
        r = client.completions.create(model="tiny", prompt=[1, 2], max_tokens=3, temperature=0)
        assert r.choices[0].model_extra["token_ids"] == reference_tokens(model, [1, 2], 3)
    finally:
        server.shutdown()
        server.server_close()
    engine.stop()
    idle = Engine(model, 1)         # never started (the same compiled program): stop() fails what it holds
    req = idle.submit([1], 2, SamplingParams())
    idle.stop()
    assert [k for k, _ in req.events(timeout=10)] == ["error"] and isinstance(req.error, ServeError)
    with pytest.raises(ServeError, match="stopped"):
        idle.submit([1], 2, SamplingParams())
