"""Prefill as matrix products (lpucore.llm.prefill): a prompt in chunks of P positions gives the token-by-token
cache and logits bit for bit, in fewer cycles."""

import numpy as np
import pytest
from helpers import check_close

from lpucore import Chip
from lpucore.llm import Decoder
from lpucore.llm.prefill import cache_copy_seconds, chunks

PROMPT = [200, 3, 7, 11, 5, 9, 1]       # longer than one chunk of 4 and not a multiple of it: chunks 4 + 3
CHUNK = 4
NEW = 3
CAPACITY = 12
SEED = 1
MODELS = [(n, p) for n in ("tiny", "tiny-moe", "tiny-gpt2") for p in ("fp16", "int8")]

_cache = {}


@pytest.fixture(scope="module", autouse=True)
def _free_decoders():
    """Two chips per decoder: let them go with the module."""
    yield
    _cache.clear()


def decoder(name, precision):
    """One decoder per model and precision for the module (compiling takes seconds)."""
    key = (name, precision)
    if key not in _cache:
        _cache[key] = Decoder.random(name, seed=SEED, precision=precision, capacity=CAPACITY, prefill_chunk=CHUNK)
    return _cache[key]


def cache(dec):
    """The decode chip's KV cache rows of the prompt, every layer."""
    c = dec.compile()
    return [c.read_state(dec.chip, f"{kv}{i}")[:len(PROMPT)].copy() for i in range(dec.cfg.n_layers) for kv in "kv"]


@pytest.mark.parametrize("name,precision", MODELS)
def test_chunks_give_the_token_by_token_bits(name, precision):
    dec = decoder(name, precision)
    res = dec.generate(PROMPT, max_new_tokens=NEW)
    chunked_cache = cache(dec)
    tokens, ref_logits = dec.reference().generate(PROMPT, NEW)
    np.testing.assert_array_equal(res.tokens, tokens)
    check_close(res.logits, ref_logits)
    st = res.stats
    pre = [s for s in st.steps if s.phase == "prefill"]
    assert st.prefill_chunk == CHUNK and [(s.position, s.token, s.tokens) for s in pre] == [(0, 200, 4), (4, 5, 3)]
    assert [s.phase for s in st.steps[2:]] == ["decode"] * (NEW - 1)
    # a static program: each chunk takes the cycles the compiler predicted, and the time to first token is theirs
    assert {s.cycles for s in pre} == {st.chunk_cycles} and st.chunk_cycles == st.chunk_predicted_cycles
    assert st.ttft_cycles == 2 * st.chunk_cycles and st.ttft_seconds == pytest.approx(st.ttft_cycles / 900e6)
    assert st.prefill_cycles_per_token == st.ttft_cycles / len(PROMPT)
    assert st.step_cycles == st.predicted_cycles and st.step_cycles < st.chunk_cycles
    assert 0 < st.chunk_mxm_utilisation < 1 and max(st.chunk_bounds.values()) <= st.chunk_cycles
    assert "2 chunks of 4 positions" in st.table()
    # one chip: the chunk program shares the decode chip, its weights and its cache (no copy)
    assert st.prefill_route == "one chip" and dec.prefill_program().chip is dec.chip
    assert "one chip" in st.table() and "prefill_chunk=4 (one chip)" in repr(dec)

    dec.prefill_chunk = 1           # the same decoder, token by token
    try:
        one = dec.generate(PROMPT, max_new_tokens=NEW)
    finally:
        dec.prefill_chunk = CHUNK
    assert one.stats.prefill_chunk == 1 and [s.tokens for s in one.stats.steps] == [1] * (len(PROMPT) + NEW - 1)
    np.testing.assert_array_equal(one.tokens, res.tokens)
    np.testing.assert_array_equal(one.logits, res.logits)
    for a, b in zip(cache(dec), chunked_cache):
        np.testing.assert_array_equal(a, b)
    # chunks are matrix products: fewer cycles than a step per token
    assert st.ttft_cycles < one.stats.ttft_cycles == len(PROMPT) * st.step_cycles


def test_both_engines_give_the_same_chunks():
    """The chunk program on a reference-engine chip: the fast engine's logits and cycles. (A decoder of its
    own: moving its chunk program to another chip leaves the decoder's cache behind.)"""
    dec = Decoder.random("tiny-gpt2", seed=SEED, precision="int8", capacity=CAPACITY, prefill_chunk=CHUNK)
    prog = dec.prefill_program()
    (tok, pos, _), = chunks(np.array(PROMPT[:4]), CHUNK)
    fast = prog.run(tok, pos)
    prog.chip = Chip(dec.chip_config, engine="reference")
    prog.compiled.load(prog.chip)
    ref = prog.run(tok, pos)
    np.testing.assert_array_equal(fast[0], ref[0])
    assert fast[1].cycles == ref[1].cycles == prog.cycles


def test_chunks_pad_the_last_with_the_last_token():
    got = chunks(np.array(PROMPT), CHUNK)
    assert [(t.tolist(), p.tolist(), n) for t, p, n in got] == [
        ([200, 3, 7, 11], [0, 1, 2, 3], 4), ([5, 9, 1, 1], [4, 5, 6, 6], 3)]
    assert [n for _, _, n in chunks(np.arange(8), 4)] == [4, 4]


def test_short_prompts_run_token_by_token(monkeypatch):
    dec = decoder("tiny-moe", "int8")
    for prompt in ([5], [5, 6, 7]):     # shorter than a chunk: the step program
        res = dec.generate(prompt, max_new_tokens=2)
        assert res.stats.prefill_chunk == 1 and res.stats.chunk_cycles == 0
        assert res.stats.ttft_cycles == len(prompt) * res.stats.step_cycles
    # a chunk predicted slower than a step per token is not used
    prog = dec.prefill_program()
    monkeypatch.setattr(type(prog), "cycles", property(lambda self: 4 * dec.compile().expected_cycles))
    res = dec.generate(PROMPT[:4], max_new_tokens=2)
    assert res.stats.prefill_chunk == 1 and [s.tokens for s in res.stats.steps] == [1] * 5
    assert cache_copy_seconds(10 ** 6, dec.chip_config) == pytest.approx(1e6 / (16 * 14e9))


@pytest.mark.parametrize("chunk", [0, CAPACITY + 1, 2.5, True, "4"])
def test_bad_chunk_sizes(chunk):
    with pytest.raises(ValueError, match="prefill_chunk must be 1..12"):
        Decoder.random("tiny", capacity=CAPACITY, prefill_chunk=chunk)


def test_default_chunk_is_capped_by_the_capacity():
    assert Decoder.random("tiny", capacity=CAPACITY).prefill_chunk == CAPACITY
    assert Decoder.random("tiny", capacity=100).prefill_chunk == 16


def test_a_chunk_that_does_not_fit_is_halved(monkeypatch):
    """chunk_program retries with half the rows while the compiler says the program does not fit, first
    sharing the decode program's chip, then on a chip of its own; with none left the decoder prefills token by
    token."""
    from lpucore.errors import CompileError
    from lpucore.llm import prefill
    tried = []

    class Fake:
        def __init__(self, dec, rows, base=None, chip=None, cache_row=None):
            tried.append((rows, base is not None))
            if rows > 2 or base is not None:
                raise CompileError("tensor 'x' needs 9 bytes: the graph does not fit on this chip")
            self.rows = rows

    monkeypatch.setattr(prefill, "ChunkProgram", Fake)
    assert prefill.chunk_program(None, 16).rows == 2 and tried == [(16, False), (8, False), (4, False), (2, False)]
    tried.clear()
    assert prefill.chunk_program(None, 8, base="decode program").rows == 2
    assert tried == [(8, True), (4, True), (2, True), (8, False), (4, False), (2, False)]
    monkeypatch.setattr(Fake, "__init__", lambda self, dec, rows, *a, **k: (_ for _ in ()).throw(
        CompileError("does not fit")))
    monkeypatch.setattr("lpucore.llm.decoder.chunk_program", prefill.chunk_program)
    dec = Decoder.random("tiny", capacity=CAPACITY, prefill_chunk=8)
    assert dec.prefill_program() is None and dec.prefill_chunk == 1
    # another compile error is not swallowed
    monkeypatch.setattr(Fake, "__init__", lambda self, dec, rows, *a, **k: (_ for _ in ()).throw(
        CompileError("bad graph")))
    with pytest.raises(CompileError, match="bad graph"):
        prefill.chunk_program(None, 4)


def test_own_chip_route_when_sharing_does_not_fit(monkeypatch):
    """When the chunk program does not fit beside the decode program's constants and cache, it runs on a chip
    of its own and the cache is copied: the same tokens and logits as the one-chip route, bit for bit."""
    from lpucore.errors import CompileError
    shared = decoder("tiny", "int8").generate(PROMPT, max_new_tokens=NEW)

    def no_room(graph, base):
        raise CompileError("tensor 'x' needs 9 bytes: the graph does not fit on this chip")
    monkeypatch.setattr("lpucore.compiler.api.compile_sharing", no_room)
    dec = Decoder.random("tiny", seed=SEED, precision="int8", capacity=CAPACITY, prefill_chunk=CHUNK)
    own = dec.generate(PROMPT, max_new_tokens=NEW)
    assert own.stats.prefill_route == "own chip + copy" and dec.prefill_program().chip is not dec.chip
    assert shared.stats.prefill_route == "one chip" and "own chip + copy" in repr(dec)
    np.testing.assert_array_equal(own.tokens, shared.tokens)
    np.testing.assert_array_equal(own.logits, shared.logits)
    # each placement its own static program: measured == predicted on either route
    for st in (own.stats, shared.stats):
        assert st.ttft_cycles == 2 * st.chunk_cycles == 2 * st.chunk_predicted_cycles


def test_one_chip_prefill_on_the_reference_engine():
    """The one-chip route on a reference-engine decoder: the fast engine's tokens, logits and cycles."""
    fast = decoder("tiny-gpt2", "int8").generate(PROMPT, max_new_tokens=NEW)
    dec = Decoder.random("tiny-gpt2", seed=SEED, precision="int8", capacity=CAPACITY, prefill_chunk=CHUNK,
                         engine="reference")
    ref = dec.generate(PROMPT, max_new_tokens=NEW)
    assert ref.stats.prefill_route == "one chip"
    np.testing.assert_array_equal(ref.tokens, fast.tokens)
    np.testing.assert_array_equal(ref.logits, fast.logits)
    assert [s.cycles for s in ref.stats.steps] == [s.cycles for s in fast.stats.steps]


def test_bucketed_decoder_prefills_in_chunks():
    """Cache buckets and the chunk program on one chip: the chunks fill the full cache in place, then each
    step runs its bucket's program (whose private constants are written again after the chunks); the tokens,
    logits and cache are those of the same decoder token by token."""
    dec = Decoder.random("tiny", seed=SEED, precision="int8", capacity=16, prefill_chunk=CHUNK, buckets=[8])
    res = dec.generate(PROMPT, max_new_tokens=NEW)
    chunked_cache = cache(dec)
    assert res.stats.prefill_route == "one chip" and res.stats.prefill_chunk == CHUNK
    assert [s.bucket for s in res.stats.steps if s.phase == "decode"] == [8, 16]
    assert all(s.cycles == res.stats.bucket_cycles[s.bucket] for s in res.stats.steps if s.phase == "decode")
    dec.prefill_chunk = 1
    one = dec.generate(PROMPT, max_new_tokens=NEW)
    np.testing.assert_array_equal(one.tokens, res.tokens)
    np.testing.assert_array_equal(one.logits, res.logits)
    for a, b in zip(cache(dec), chunked_cache):
        np.testing.assert_array_equal(a, b)


def test_a_decode_program_from_the_compile_cache_is_placed_again(monkeypatch, tmp_path):
    """A step program read from the compile cache has no placements to share: the decoder compiles it again
    (the same program) before compiling the chunk program against it, and prefills on one chip."""
    monkeypatch.setenv("LPUCORE_CACHE", "1")
    monkeypatch.setenv("LPUCORE_CACHE_DIR", str(tmp_path))
    Decoder.random("tiny-gpt2", seed=SEED, precision="int8", capacity=CAPACITY).compile()   # fills the cache
    dec = Decoder.random("tiny-gpt2", seed=SEED, precision="int8", capacity=CAPACITY, prefill_chunk=CHUNK)
    cached = dec.compile()
    assert not cached.layout
    res = dec.generate(PROMPT, max_new_tokens=NEW)
    assert dec.compiled is not cached and dec.compiled.layout and res.stats.prefill_route == "one chip"
    assert dec.compiled.expected_cycles == cached.expected_cycles == res.stats.step_cycles
    want = decoder("tiny-gpt2", "int8").generate(PROMPT, max_new_tokens=NEW)
    np.testing.assert_array_equal(res.logits, want.logits)
