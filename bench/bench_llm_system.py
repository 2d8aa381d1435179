"""Decode benchmark on a system of chips: Llama-2-7B (int8, random weights) as pipeline stages over
as many simulated GroqChips as it takes, in one process and in two MPI processes, against the NumPy
reference doing the same decode.

    python bench/bench_llm_system.py [--model llama2-7b] [--tokens 3] [--capacity 32] [--procs 2]

Steps: ``Decoder.random(model, precision, chips="auto")`` plans the stages
(:func:`lpucore.llm.pipeline.plan_stages`), compiles each distinct stage once and loads every chip
(timed, not in the ratios); then a prompt of two tokens and ``--tokens`` greedy tokens are decoded
(one simulated step per token fed in) and the host's wall seconds per step are measured (the mean of
the steps after the first, which also pays for first touches of the chips' memory; the first is
reported too). The NumPy reference (:class:`lpucore.llm.Reference`, float32 arithmetic) decodes the
same tokens in the same process first (timed once its weights are made). Its weights are kept as
int8 and expanded to float32 per use, because 28 GB of float32 weights do not fit a 24 GB machine,
so the script also times the floor of any float32 NumPy decode: the matrix-vector products alone,
with one layer's float32 weights resident, times the layer count. The same run under ``mpiexec -n
--procs`` (each process simulates a contiguous share of the chips and drops its host copy of each
chip's weights once loaded) goes first, while this process holds nothing (both at once do not fit 24
GB); its tokens and cycles must equal the single-process ones.

Prints the plan, the simulated cycles and tokens/s per user, the wall seconds per simulated token
(one process, MPI), the ratios to the reference and to the matmul floor (goal: at most 3x the
reference), the token agreement and the logit error, the schedule bound (each chip's largest
``compiled.bounds()``, summed: at batch 1 the chips work one after another) and its efficiency,
tokens/s per chip (of whole 8-chip nodes) and Groq's published figure. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lpucore.llm import Decoder, model_config
from lpucore.llm.decoder import LOGIT_TOLERANCE
from lpucore.llm.predict import PUBLISHED

PROMPT = [1, 2]


def decode(a, comm=None, log=print, before=None):
    """Build, compile and run the model; returns the decoder and a dict of figures. ``before(decoder)``
    runs first (the reference)."""
    t0 = time.perf_counter()
    dec = Decoder.random(a.model, seed=0, precision=a.precision, capacity=a.capacity, chips="auto", comm=comm)
    extra = before(dec) if before is not None else {}
    t0 = time.perf_counter()
    pd = dec.pipeline
    log(f"{pd}: {len(set(pd.signatures))} distinct stages compiled once each")
    shown = ("compiled", f"loaded chip 1 of {pd.n_chips}", f"loaded chip {pd.n_chips} of {pd.n_chips}")
    # each chip's host copy of its weights is dropped once the chip holds them: the reference has
    # already run, and the chips' SRAM and a second copy of 7 GB would not fit 24 GB with the rest
    pd.compile(progress=lambda m: log(f"  [{time.perf_counter() - t0:6.0f} s] {m}")
               if m.startswith(shown[0]) or m in shown[1:] else None, release_weights=True)
    setup = time.perf_counter() - t0
    walls = []
    tokens, logits, stats = pd.generate(PROMPT, a.tokens,
                                        on_step=lambda i, tok, st, w: (walls.append(w),
                                                                       log(f"  step {i}: token {tok}, {st.cycles:,} "
                                                                           f"cycles, {w:.1f} s")))
    return dec, dict(extra, tokens=[int(t) for t in tokens], logits=logits, cycles=[int(s.cycles) for s in stats],
                     wall_per_step=float(np.mean(walls[1:] if len(walls) > 1 else walls)),
                     wall_first_step=float(walls[0]), walls=[float(w) for w in walls], setup_seconds=setup,
                     compile_seconds=pd.compile_seconds, load_seconds=pd.load_seconds,
                     predicted_cycles=int(pd.step_cycles), chips=pd.n_chips,
                     # at batch 1 the chips work one after another: their programs' largest bounds add up
                     bound_cycles=int(sum(max(pd.compiled[s].bounds().as_dict().values()) for s in pd.signatures)),
                     stage_cycles=pd.stage_cycles, link_bytes=int(sum(s.c2c_bytes for s in stats[-1:])))


def matmul_floor(cfg, reps: int = 3) -> float:
    """Seconds for the float32 matrix-vector products of one decode step, one layer's weights resident
    (every layer has the same shapes), plus the head."""
    rng = np.random.default_rng(0)
    d, f, kv = cfg.d_model, cfg.d_ff, cfg.n_kv_heads * cfg.head_dim
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]
    ws = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    head = rng.standard_normal((cfg.vocab_size, d), dtype=np.float32)
    x = rng.standard_normal((1, d), dtype=np.float32)
    xf = rng.standard_normal((1, f), dtype=np.float32)
    best = None
    for _ in range(reps):
        t = time.perf_counter()
        for w in ws:
            (xf if w.shape[1] == f else x) @ w.T
        layer = time.perf_counter() - t
        t = time.perf_counter()
        x @ head.T
        h = time.perf_counter() - t
        total = layer * cfg.n_layers + h
        best = total if best is None else min(best, total)
    return best


def child(a):
    from lpucore.mpi import comm_world
    comm = comm_world()
    rank = comm.Get_rank()
    log = (lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None)
    _, r = decode(a, comm, log)
    if rank == 0:
        r.pop("logits")
        print(json.dumps(r), flush=True)


def mpiexec():
    exe = Path(sys.executable).parent / "mpiexec"
    return str(exe) if exe.exists() else shutil.which("mpiexec")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--precision", default="int8", choices=("fp16", "int8"))
    ap.add_argument("--tokens", type=int, default=3, help="new tokens (the prompt is two tokens)")
    ap.add_argument("--capacity", type=int, default=32, help="KV cache positions")
    ap.add_argument("--procs", type=int, default=2, help="MPI processes for the second run (0: skip it)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a)

    def log(m):
        print(m, flush=True)

    cfg = model_config(a.model)
    two = None
    if a.procs > 1:           # first, while this process holds nothing: both runs together do not fit 24 GB
        exe = mpiexec()
        if not exe:
            raise SystemExit("mpiexec not found: pip install -e '.[mpi]'")
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        cmd = [exe, "-n", str(a.procs), sys.executable, __file__, "--child", "--model", a.model,
               "--precision", a.precision, "--tokens", str(a.tokens), "--capacity", str(a.capacity)]
        log(f"{a.procs} MPI processes: {' '.join(cmd[:3])} ...")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        for line in r.stdout.strip().splitlines()[:-1]:
            log("  " + line)
        if r.returncode:
            raise SystemExit(f"the MPI run failed (status {r.returncode}; killed for memory?):\n"
                             f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        two = json.loads(r.stdout.strip().splitlines()[-1])
    log("1 process:")

    def reference(dec):
        """The NumPy reference's decode, timed after its weights are prepared (int8, in memory)."""
        t = time.perf_counter()
        dec.ref.w.prepare()
        log(f"  reference weights made and quantised in {time.perf_counter() - t:.0f} s")
        ref = dec.reference()
        t = time.perf_counter()
        ref_tokens, ref_logits = ref.generate(PROMPT, a.tokens)
        per = (time.perf_counter() - t) / (len(PROMPT) + a.tokens - 1)
        log(f"  reference: {per:.2f} s per token, tokens {[int(x) for x in ref_tokens]}")
        return dict(ref_tokens=[int(x) for x in ref_tokens], ref_logits=ref_logits, ref_per_step=per)

    dec, one = decode(a, None, log, before=reference)
    ref_per_step, ref_logits = one["ref_per_step"], one["ref_logits"]
    same = one["ref_tokens"] == one["tokens"]
    err = float(np.max(np.abs(one["logits"] - ref_logits)))
    bound = LOGIT_TOLERANCE * (1 + float(np.max(np.abs(ref_logits))))
    del dec, ref_logits
    gc.collect()
    floor = matmul_floor(cfg)
    clock = 900e6
    out = dict(model=a.model, precision=a.precision, capacity=a.capacity, chips=one["chips"],
               step_cycles=one["cycles"][-1], predicted_cycles=one["predicted_cycles"],
               tokens_per_s_per_user=clock / one["cycles"][-1], bound_cycles=one["bound_cycles"],
               schedule_efficiency=one["bound_cycles"] / one["cycles"][-1], nodes=-(-one["chips"] // 8),
               tokens_per_s_per_chip=clock / one["cycles"][-1] / (8 * -(-one["chips"] // 8)),
               wall_s_per_token_1proc=one["wall_per_step"], wall_s_first_step_1proc=one["wall_first_step"],
               reference_s_per_token=ref_per_step,
               matmul_floor_s_per_token=floor,
               ratio_to_reference_1proc=one["wall_per_step"] / ref_per_step,
               ratio_to_matmul_floor_1proc=one["wall_per_step"] / floor,
               tokens=one["tokens"], tokens_match_reference=same, max_logit_error=err, logit_bound=bound,
               setup_seconds_1proc=one["setup_seconds"], compile_seconds=one["compile_seconds"],
               load_seconds=one["load_seconds"])
    one.pop("ref_logits")
    if two is not None:
        out.update(procs=a.procs, wall_s_per_token_mpi=two["wall_per_step"],
                   wall_s_first_step_mpi=two["wall_first_step"],
                   ratio_to_reference_mpi=two["wall_per_step"] / ref_per_step,
                   mpi_matches_1proc=two["tokens"] == one["tokens"] and two["cycles"] == one["cycles"],
                   setup_seconds_mpi=two["setup_seconds"])
    rows = [
        ("system", f"{out['chips']} x groqchip1 as pipeline stages ({a.model}, {a.precision}, cache {a.capacity})"),
        ("cycles per token", f"{out['step_cycles']:,} (predicted {out['predicted_cycles']:,})"),
        ("tokens/s per user", f"{out['tokens_per_s_per_user']:,.0f} at 900 MHz; "
                              f"{out['tokens_per_s_per_chip']:.2f} per chip of {out['nodes']} 8-chip nodes"),
        ("schedule bound", f"{out['bound_cycles']:,} cycles (the chips' largest bounds, summed): efficiency "
                           f"{100 * out['schedule_efficiency']:.1f} %"),
        ("published", "; ".join(f"{k}: {v} tokens/s" for k, v in PUBLISHED.get(a.model, {}).items()) or "-"),
        ("host s per token, 1 process", f"{out['wall_s_per_token_1proc']:.2f}"),
        ("NumPy reference s per token", f"{ref_per_step:.2f} (float32 matvecs alone: {floor:.2f})"),
        ("ratio to reference / floor", f"{out['ratio_to_reference_1proc']:.2f} / "
                                       f"{out['ratio_to_matmul_floor_1proc']:.1f} (goal <= 3 to the reference)"),
        ("tokens vs reference", f"{'identical' if same else 'DIFFERENT'}; max logit error {err:.2g} "
                                f"(bound {bound:.2g})"),
    ]
    if two is not None:
        rows += [(f"host s per token, {a.procs} MPI procs", f"{out['wall_s_per_token_mpi']:.2f} "
                  f"(ratio {out['ratio_to_reference_mpi']:.2f}); same tokens and cycles: {out['mpi_matches_1proc']}")]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
