"""Serving benchmark: N concurrent clients against ``python -m lpucore serve`` (LLMPerf's two figures).

    python bench/bench_serve.py [--models tiny:8,gpt2:2] [--clients 1,4,16] [--prompt 8] [--tokens 8]
                                [--capacity 32] [--json OUT.json]

For each model (``NAME:MAX_BATCH``; a named shape, int8, random weights, one simulated GroqChip, fast engine) a
server process is started on a free port; for each N, N client threads send one streamed ``/v1/completions``
request each at the same moment (``--prompt`` random token ids, ``--tokens`` greedy new tokens, EOS ignored),
through the ``openai`` client. The server batches them (at most MAX_BATCH rows; the rest queue and join as rows
free up). Printed per N, from each response's ``usage``:

* simulated time to first token (mean and max over the clients; from the request's arrival, queueing included),
* simulated output tokens/s per user (mean: new tokens over the request's simulated end-to-end time; LLMPerf's
  ``request_output_throughput_token_per_s``) and simulated time per output token,
* the server's host overhead per request (``host_overhead_s``: parsing, sampling, text, JSON, not the chip's
  simulation), and the host's wall time per request seen by the client, for scale.

Every client's tokens are checked against the NumPy reference decoding its prompt alone. The last line is one
JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from typing import List

import numpy as np


def start_server(name: str, max_batch: int, capacity: int):
    """A server process of ``name``: (process, base URL, startup seconds)."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "lpucore", "serve", "--model", name, "--precision", "int8", "--capacity",
           str(capacity), "--max-batch", str(max_batch), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = ""
    while " at http://" not in line:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"the server of {name} did not start (exit status {proc.wait()})")
    m = re.search(r"at (http://\S+/v1)", line)
    assert m is not None
    return proc, m.group(1), time.perf_counter() - t0


def one_client(client, name: str, prompt: List[int], tokens: int, out: list, i: int, start) -> None:
    start.wait()
    t0 = time.perf_counter()
    ids: List[int] = []
    usage = None
    wall_first = None
    for chunk in client.completions.create(model=name, prompt=prompt, max_tokens=tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            got = c.model_extra["token_ids"]
            if got and wall_first is None:
                wall_first = time.perf_counter() - t0
            ids += got
        if chunk.usage is not None:
            usage = chunk.usage.model_extra
    out[i] = dict(ids=ids, usage=usage, wall_first=wall_first, wall=time.perf_counter() - t0)


def point(client, name: str, n: int, prompts: List[List[int]], tokens: int) -> List[dict]:
    """N clients at once; each one's token ids, usage and wall times."""
    out: list = [None] * n
    start = threading.Barrier(n)
    threads = [threading.Thread(target=one_client, args=(client, name, prompts[i], tokens, out, i, start))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def summarise(res: List[dict], same: bool) -> dict:
    u = [r["usage"] for r in res]
    ttft = [x["simulated_time_to_first_token_s"] for x in u]
    return dict(clients=len(res), ttft_mean_us=statistics.mean(ttft) * 1e6, ttft_max_us=max(ttft) * 1e6,
                tokens_per_s_per_user=statistics.mean(x["simulated_tokens_per_s"] for x in u),
                tpot_us=statistics.mean(x["simulated_time_per_output_token_s"] for x in u) * 1e6,
                queue_max_us=max(x["simulated_queue_s"] for x in u) * 1e6,
                host_overhead_ms=statistics.mean(x["host_overhead_s"] for x in u) * 1e3,
                wall_first_s=statistics.mean(r["wall_first"] for r in res),
                wall_s=statistics.mean(r["wall"] for r in res), tokens_identical=same)


def run_model(spec: str, args) -> List[dict]:
    import openai

    from lpucore.llm import Decoder
    name, _, b = spec.partition(":")
    max_batch = int(b or 8)
    ref = Decoder.random(name, precision="int8", capacity=args.capacity).reference()
    rng = np.random.default_rng(0)
    proc, url, startup = start_server(name, max_batch, args.capacity)
    print(f"{name}: max batch {max_batch}, server up in {startup:.1f} s (load + compile) at {url}", flush=True)
    print(f"{'clients':>7} {'TTFT mean us':>12} {'TTFT max us':>11} {'tok/s/user':>10} {'TPOT us':>8} "
          f"{'queue max us':>12} {'host ms/req':>11} {'wall s/req':>10}  tokens = reference", flush=True)
    rows = []
    try:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=3600)
        for n in args.clients:
            prompts = [[int(t) for t in rng.integers(1, ref.cfg.vocab_size, args.prompt)] for _ in range(n)]
            res = point(client, name, n, prompts, args.tokens)
            same = all(r["ids"] == [int(t) for t in ref.generate(p, args.tokens)[0]] for p, r in zip(prompts, res))
            s = dict(summarise(res, same), model=name, max_batch=max_batch, startup_s=startup)
            rows.append(s)
            print(f"{n:>7} {s['ttft_mean_us']:>12.1f} {s['ttft_max_us']:>11.1f} {s['tokens_per_s_per_user']:>10,.0f} "
                  f"{s['tpot_us']:>8.1f} {s['queue_max_us']:>12.1f} {s['host_overhead_ms']:>11.2f} "
                  f"{s['wall_s']:>10.2f}  {same}", flush=True)
    finally:
        proc.terminate()
        proc.wait()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny:8,gpt2:2", help="NAME:MAX_BATCH, comma-separated (default tiny:8,gpt2:2)")
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 4, 16])
    p.add_argument("--prompt", type=int, default=8, help="prompt tokens per request (default 8)")
    p.add_argument("--tokens", type=int, default=8, help="new tokens per request (default 8)")
    p.add_argument("--capacity", type=int, default=32, help="KV cache positions per row (default 32)")
    p.add_argument("--json", metavar="OUT.json", help="also write the figures here")
    args = p.parse_args(argv)
    rows = []
    for spec in args.models.split(","):
        rows += run_model(spec, args)
    text = json.dumps(rows)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0 if all(r["tokens_identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
