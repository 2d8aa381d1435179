"""Batched decode (lpucore.llm.batch): B sequences in one step program, each as if decoded alone."""

import numpy as np
import pytest
from helpers import check_close

from lpucore.llm import Decoder, ModelConfig, ModelDoesNotFit
from lpucore.llm.batch import BatchResult, BatchStats

PROMPTS = [[200, 3, 7], [5], [9, 8, 7, 6, 5]]     # different lengths: rows prefill while others decode
NEW = 6
CAPACITY = 12
SEED = 1

_cache = {}


# a llama with one query head per kv head (as Llama-2-7B): its batch keeps the B caches as one state
TINY_MHA = ModelConfig("tiny-mha", "llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                       d_ff=128, max_positions=128, rope_theta=10000.0)


def decoder(name, precision, engine="fast"):
    """One decoder per model, precision and engine for the module (compiling takes seconds)."""
    key = (name, precision, engine)
    if key not in _cache:
        cfg = TINY_MHA if name == "tiny-mha" else name
        _cache[key] = Decoder.random(cfg, seed=SEED, precision=precision, capacity=CAPACITY, engine=engine)
    return _cache[key]


@pytest.mark.parametrize("name,precision", [("tiny", "fp16"), ("tiny-gpt2", "int8"), ("tiny-moe", "int8"),
                                            ("tiny-mha", "int8")])
def test_each_sequence_as_if_decoded_alone(name, precision):
    dec = decoder(name, precision)
    res = dec.generate(PROMPTS, max_new_tokens=NEW)
    assert isinstance(res, BatchResult) and len(res) == len(PROMPTS) and isinstance(res.stats, BatchStats)
    for prompt, r in zip(PROMPTS, res):
        alone = dec.generate(prompt, max_new_tokens=NEW)
        tokens, ref_logits = dec.reference().generate(prompt, NEW)
        np.testing.assert_array_equal(r.tokens, alone.tokens)
        np.testing.assert_array_equal(r.tokens, tokens)
        check_close(r.logits, alone.logits)
        check_close(r.logits, ref_logits)
        assert r.finish_reason == "length" and list(r.prompt_ids) == prompt
        assert [s.phase for s in r.stats.steps] == ["prefill"] * len(prompt) + ["decode"] * (NEW - 1)
        assert [s.position for s in r.stats.steps] == list(range(len(prompt) + NEW - 1))
    st = res.stats
    assert {s.cycles for s in st.steps} == {st.step_cycles} and st.step_cycles == st.predicted_cycles
    # the longest prompt decides the number of steps; shorter rows finish first and then idle
    assert len(st.steps) == max(len(p) for p in PROMPTS) + NEW - 1
    assert st.new_tokens == [NEW] * 3 and st.prompt_tokens == [len(p) for p in PROMPTS]
    assert [s.prefill + s.decode + s.idle for s in st.steps] == [3] * len(st.steps)
    assert sum(s.new_tokens for s in st.steps) == 3 * NEW
    assert st.steps[0].prefill == 3 and st.steps[-1].idle == 2 and st.steps[-1].decode == 1


def test_one_cache_state_per_layer_when_heads_are_not_grouped():
    """G == 1 (GPT-2, Llama-2-7B): the B caches are one [B * capacity, D] state per layer, and sequence
    b's keys are its rows b * capacity + position; G > 1: a state per sequence."""
    dec = decoder("tiny-gpt2", "int8")
    dec.generate(PROMPTS, max_new_tokens=2)
    prog = dec.batch_program(3)
    k = prog.compiled.read_state(prog.chip, "k0")
    assert k.shape == (3 * CAPACITY, dec.cfg.d_model)
    ref = dec.reference()
    ref.prefill(PROMPTS[2][:4])
    rows = k[2 * CAPACITY:2 * CAPACITY + 4].reshape(4, dec.cfg.n_heads, dec.cfg.head_dim).transpose(1, 0, 2)
    np.testing.assert_allclose(rows.astype(np.float32), ref.cache.keys(0)[:, :4], rtol=0.02, atol=0.02)
    g = decoder("tiny", "fp16")
    g.generate(PROMPTS, max_new_tokens=1)
    assert g.batch_program(3).compiled.read_state(g.batch_program(3).chip, "k1_b2").shape == (CAPACITY, 32)


def test_sequences_finish_on_their_own_at_eos():
    dec = decoder("tiny", "fp16")
    alone = [dec.generate(p, max_new_tokens=NEW).tokens for p in PROMPTS]
    eos = int(alone[1][2])          # the third new token of the second sequence ends it
    res = dec.generate(PROMPTS, max_new_tokens=NEW, eos_id=eos)
    for prompt, r in zip(PROMPTS, res):
        want = dec.generate(prompt, max_new_tokens=NEW, eos_id=eos)
        np.testing.assert_array_equal(r.tokens, want.tokens)
        assert r.finish_reason == want.finish_reason
    assert res[1].finish_reason == "eos" and len(res[1].tokens) <= 3
    assert res.stats.new_tokens == [len(r.tokens) for r in res]


def test_reference_engine_gives_identical_steps():
    fast = decoder("tiny-gpt2", "int8")
    slow = Decoder.random("tiny-gpt2", seed=SEED, precision="int8", capacity=CAPACITY, engine="reference")
    slow.batch_program(2, like=fast.batch_program(2))       # the same program, only the engine differs
    a = fast.generate(PROMPTS[:2], max_new_tokens=2)
    b = slow.generate(PROMPTS[:2], max_new_tokens=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.logits, y.logits)
    assert [s.cycles for s in a.stats.steps] == [s.cycles for s in b.stats.steps]
    assert a.stats.mxm_utilisation == b.stats.mxm_utilisation


def test_batch_of_one_is_the_single_sequence_program():
    dec = decoder("tiny", "fp16")
    res = dec.generate([PROMPTS[0]], max_new_tokens=3)
    assert dec.batch_program(1).compiled is dec.compile()
    np.testing.assert_array_equal(res[0].tokens, dec.generate(PROMPTS[0], max_new_tokens=3).tokens)


def test_stats_table_and_rates():
    dec = decoder("tiny", "fp16")
    seen = []
    res = dec.generate(PROMPTS, max_new_tokens=3, on_token=lambda *a: seen.append(a))
    st = res.stats
    assert sorted((b, t) for b, t, _ in seen) == sorted((b, t) for b, r in enumerate(res) for t in r.tokens.tolist())
    single = dec.generate(PROMPTS[0], max_new_tokens=1).stats
    assert st.tokens_per_second_per_user == pytest.approx(st.clock_hz / st.step_cycles)
    assert st.peak_tokens_per_second == pytest.approx(3 * st.tokens_per_second_per_user)
    # three rows cost less than three single steps: the weights stream once
    assert single.step_cycles < st.step_cycles < 3 * single.step_cycles
    assert st.peak_tokens_per_second > single.tokens_per_second
    assert 0 < st.mxm_utilisation < 1 and st.sram_bytes <= st.sram_capacity
    assert st.kv_cache_bytes == 3 * dec.cfg.kv_cache_bytes(CAPACITY)
    text = st.table()
    for key in ("tokens/s per user", "tokens/s aggregate", "MXM utilisation", "SRAM in use", f"{st.step_cycles:,}"):
        assert key in text
    assert len(text.splitlines()) > len(st.steps)
    assert st.to_dict()["peak_tokens_per_second"] == st.peak_tokens_per_second
    assert res[0].stats.step_cycles == st.step_cycles and res[0].stats.prompt_tokens == len(PROMPTS[0])


def test_a_batch_that_does_not_fit_says_how_many_chips():
    dec = Decoder.random("gpt2", precision="int8", capacity=32)
    with pytest.raises(ModelDoesNotFit, match=r"64 sequences of gpt2 \(int8\) need .* at least 2 chips.*at most \d+"):
        dec.generate([[1]] * 64, max_new_tokens=1)


def test_bad_batches():
    dec = decoder("tiny", "fp16")
    with pytest.raises(ValueError, match="out of range"):
        dec.generate([[1], [300]], max_new_tokens=1)
    with pytest.raises(ValueError, match="cache"):
        dec.generate([[1], list(range(12))], max_new_tokens=2)
    with pytest.raises(ValueError, match="on_text"):
        dec.generate([[1], [2]], max_new_tokens=1, on_text=print)


def test_long_prompts_are_prefilled_in_chunks_into_their_rows():
    """A batch's rows whose prompts fill a chunk are prefilled by a chunk program of their own row's cache
    (compiled against the batch's program, on its chip), one row after the other, before the batch steps;
    the others prefill token by token in the steps. Every row's tokens and logits are those of the same batch
    token by token, bit for bit, and a chunked row's those of decoding it alone."""
    prompts = [[200, 3, 7, 11, 5, 9, 1], [5, 6], [9, 8, 7, 6, 5]]      # 2 chunks of 4, token by token, 2 chunks
    dec = Decoder.random("tiny", seed=SEED, precision="int8", capacity=CAPACITY, prefill_chunk=4)
    res = dec.generate(prompts, max_new_tokens=3)
    prog = dec.batch_program(3)
    st = res.stats
    assert st.prefill_chunk == 4 and st.prefill_route == "one chip" and sorted(prog.chunks) == [0, 2]
    assert all(c.chip is prog.chip and c.shared for c in prog.chunks.values())
    assert st.chunk_cycles == st.chunk_predicted_cycles and st.step_cycles == st.predicted_cycles
    assert [s.chunk_tokens for s in st.steps[:4]] == [4, 3, 4, 1] and not any(s.chunk_tokens for s in st.steps[4:])
    # each row's chunk program is placed on its own (cycles may differ a little), each as predicted
    c0, c2, s = prog.chunks[0].cycles, prog.chunks[2].cycles, st.step_cycles
    assert [x.cycles for x in st.steps[:4]] == [c0, c0, c2, c2] and st.chunk_cycles == c0
    # the clock: row 0's first token after its 2 chunks, row 2's after all 4, row 1's after 2 more steps
    assert st.ttft_cycles == [2 * c0, 2 * c0 + 2 * c2 + 2 * s, 2 * c0 + 2 * c2] == [r.stats.ttft_cycles for r in res]
    assert [r.stats.prefill_route for r in res] == ["one chip", "", "one chip"]
    assert [s.tokens for s in res[0].stats.steps] == [4, 3, 1, 1]
    assert "prompt chunks of 4 positions, one chip" in st.table()
    for b in (0, 2):
        alone = dec.generate(prompts[b], max_new_tokens=3)
        np.testing.assert_array_equal(res[b].logits, alone.logits)
    dec.prefill_chunk = 1
    one = dec.generate(prompts, max_new_tokens=3)
    assert one.stats.prefill_chunk == 1 and one.stats.ttft_cycles == [7 * s, 2 * s, 5 * s]
    for a, b in zip(res, one):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.logits, b.logits)


def test_one_stacked_cache_state_prefills_token_by_token():
    """G == 1: the rows' caches are one stacked state, which a chunk program cannot address by row: the batch
    prefills token by token (documented limitation)."""
    dec = Decoder.random("tiny-gpt2", seed=SEED, precision="int8", capacity=CAPACITY, prefill_chunk=4)
    res = dec.generate([[200, 3, 7, 11, 5], [5, 6]], max_new_tokens=2)
    assert res.stats.prefill_chunk == 1 and dec.batch_program(2).chunks == {0: None}
    assert res.stats.ttft_cycles == [5 * res.stats.step_cycles, 2 * res.stats.step_cycles]


def test_the_server_engine_prefills_admitted_prompts_in_chunks():
    """lpucore.llm.serve.Engine: an admitted prompt that fills a chunk is prefilled by its row's chunk program
    before the next step; its tokens are those of decoding it alone and its simulated time to first token is
    its chunks' cycles; a short prompt still goes token by token."""
    from lpucore.llm.sampling import SamplingParams
    from lpucore.llm.serve import Engine
    dec = Decoder.random("tiny", seed=SEED, precision="int8", capacity=CAPACITY, prefill_chunk=4)
    engine = Engine(dec, 2).start()
    try:
        long = engine.submit([200, 3, 7, 11, 5, 9, 1], 3, SamplingParams())
        toks = [d[0] for k, d in long.events(timeout=300) if k == "token"]
        short = engine.submit([5, 6], 2, SamplingParams())
        list(short.events(timeout=300))
    finally:
        engine.stop()
    chunk = engine.prog.chunks[0]
    assert chunk.shared and chunk.chip is engine.prog.chip and engine.chunks == 2
    assert toks == dec.generate([200, 3, 7, 11, 5, 9, 1], max_new_tokens=3).tokens.tolist()
    assert long.first - long.arrival == 2 * chunk.cycles
    assert short.first - short.arrival == 2 * engine.prog.compiled.expected_cycles
