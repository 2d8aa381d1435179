"""Caches longer than a tile of positions: keys kept in tiles with the positions on the lanes
(lpucore.llm.program.tiled_cache, lpucore.llm.tiled), with the same guarantees as the short-cache path:
tokens and logits against the reference, prompt chunks and batches bit for bit the token-by-token."""

import dataclasses

import numpy as np
import pytest
from helpers import check_close

from lpucore.llm import Decoder, model_config
from lpucore.llm.program import KEY_BLOCK, tiled_cache

CAPACITY = KEY_BLOCK + 16
PROMPT = [200, 3, 7, 11, 5]
NEW = 4


def long_config(name):
    """A tiny model whose positions reach past one block of lanes."""
    return dataclasses.replace(model_config(name), max_positions=2 * KEY_BLOCK)


def test_the_path_is_chosen_by_the_cache_length():
    assert tiled_cache(CAPACITY) and not tiled_cache(KEY_BLOCK) and not tiled_cache(32)


@pytest.mark.parametrize("name,precision,route", [("tiny", "fp16", "chunks"), ("tiny-gpt2", "int8", "batch")])
def test_long_cache_decodes_like_the_reference_and_chunks_and_batches_give_its_bits(name, precision, route,
                                                                                    monkeypatch):
    cfg = long_config(name)
    dec = Decoder.random(cfg, seed=1, precision=precision, capacity=CAPACITY, prefill_chunk=4)
    res = dec.generate(PROMPT, max_new_tokens=NEW)
    tokens, ref_logits = dec.reference().generate(PROMPT, NEW)
    np.testing.assert_array_equal(res.tokens, tokens)
    check_close(res.logits, ref_logits)
    assert res.stats.step_cycles == res.stats.predicted_cycles
    if route == "chunks":
        # chunks are used whatever their predicted cycles (here: the bits are what is tested)
        monkeypatch.setattr(type(dec.prefill_program()), "cycles", property(lambda self: 1))
        chunked = dec.generate(PROMPT, max_new_tokens=NEW)
        assert chunked.stats.prefill_chunk == 4
        np.testing.assert_array_equal(chunked.logits, res.logits)
    else:
        # a batch (one stacked cache state: G == 1): each sequence's bits as if decoded alone
        prompts = [PROMPT, [9, 4]]
        batch = dec.generate(prompts, max_new_tokens=NEW)
        for p, r in zip(prompts, batch):
            alone = res if p == PROMPT else dec.generate(p, max_new_tokens=NEW)
            np.testing.assert_array_equal(r.tokens, alone.tokens)
            np.testing.assert_array_equal(r.logits, alone.logits)


def test_pipeline_stages_hand_over_before_their_cache_writes():
    """Over a tiled cache an attention stage writes its new key and value last, and its residual leaves as
    soon as it is written (lpucore.compiler.pipeline.hand_over, early), whatever comes after it: every
    unit on a chip of its own gives the single chip's bits, in the predicted cycles. (The tiny model's
    writes fit before its residual; on Llama-2-7B's attention chip they run about 10,000 cycles past it.)"""
    from lpucore.llm import PipelineDecoder
    cfg = long_config("tiny")
    dec = Decoder.random(cfg, seed=1, precision="fp16", capacity=CAPACITY, prefill_chunk=1)
    res = dec.generate(PROMPT[:2], max_new_tokens=2)
    pd = PipelineDecoder(dec, 6)
    tokens, logits, stats = pd.generate(PROMPT[:2], 2)
    np.testing.assert_array_equal(tokens, res.tokens)
    np.testing.assert_array_equal(logits.view(np.uint32), res.logits.view(np.uint32))
    assert all(s.cycles == pd.step_cycles for s in stats)
    attn = [k for k, (a, _) in enumerate(pd.stages) if pd.units[a][0] == "attn"]
    for k in attn:
        c = pd.compiled[pd.signatures[k]]
        written = max(last for _, name, last in c.kernels if name == "x_out" and last is not None)
        assert pd.stage_sends[k] == pd.stage_starts[k] + written + 1
    assert attn and pd.step_cycles == max(pd.stage_cycles)


def test_attention_shards_side_by_side_over_a_tiled_cache():
    """Attention cut by kv heads (each shard its heads' key tiles and value column tiles, on a chip of its own)
    and experts side by side: the reference's tokens, logits within the bound, the predicted cycles."""
    from lpucore.llm import PipelineDecoder
    dec = Decoder.random(long_config("tiny-moe"), seed=2, precision="int8", capacity=CAPACITY)
    pd = PipelineDecoder(dec, None, shards=2, parallel_shards=True, attn=2)
    assert pd.attn == 2 and pd.n_chips == 10
    tokens, logits, stats = pd.generate(PROMPT[:3], NEW)
    ref_tokens, ref_logits = dec.reference().generate(PROMPT[:3], NEW)
    np.testing.assert_array_equal(tokens, ref_tokens)
    check_close(logits, ref_logits)
    assert all(s.cycles == pd.step_cycles for s in stats)
