"""A tiny model directory that takes text, made in-process (no downloads): for tests, examples and benchmarks.

>>> write_text_model("tiny-chat")           # config.json, model.safetensors, tokenizer.json, tokenizer_config.json
>>> model = Decoder.from_pretrained("tiny-chat", capacity=48)                   # doctest: +SKIP

Needs the ``llm`` and ``text`` extras (safetensors, tokenizers, jinja2).
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional, Sequence, Union

CORPUS = ("hello world", "the cat sat on the mat", "héllo wörld", "a b c d e f g")
# A Llama-2-like template: the BOS, a system prompt in <<SYS>>, one line per turn, the EOS after each.
# trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before one.
TEMPLATE = """{{ bos_token }}{% for message in messages %}
  {% if message['role'] == 'system' %}
<<SYS>>{{ message['content'] }}<</SYS>>
  {% else %}
[{{ message['role'] }}] {{ message['content'] }}{{ eos_token }}
  {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[assistant]
{% endif %}"""


def byte_level_tokenizer(vocab_size: int = 300, corpus: Sequence[str] = CORPUS):
    """A byte-level BPE (GPT-2's scheme, a ``tokenizers.Tokenizer``) trained on ``corpus``: ``<s>`` (0, added
    before every encoded text), ``</s>`` (1), the 256 bytes, and merges up to ``vocab_size`` tokens (as
    many as the corpus gives). Characters outside the corpus are several byte tokens each."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(list(corpus) * 10, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tk


def llama_style_tokenizer():
    """A hand-made tokenizer laid out as Llama-2's ``tokenizer.json`` is (a ``tokenizers.Tokenizer``): BPE over
    ``▁`` and a-z with byte fallback (``<0xE6>`` ...) for everything else, a normaliser that turns spaces into
    ``▁`` and prepends one, and a decoder that turns them back and strips the first space of every decode.
    ``<unk>`` 0, ``<s>`` 1 (added before every encoded text), ``</s>`` 2; 291 tokens."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{i:02X}>": 3 + i for i in range(256)})
    for c in ["\u2581"] + list(string.ascii_lowercase):
        vocab[c] = len(vocab)
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("\u2581", "c"), ("a", "t")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens(["<unk>", "<s>", "</s>"])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tk


def write_text_model(path: Union[str, pathlib.Path], seed: int = 1, template: Optional[str] = TEMPLATE,
                     vocab_size: int = 300, **tokenizer_config) -> pathlib.Path:
    """Write a tiny llama (2 layers, d_model 64, 64 positions, random weights from ``seed``) with
    :func:`byte_level_tokenizer` and a ``tokenizer_config.json`` (``<s>`` / ``</s>``, ``template``; more keys
    from ``tokenizer_config``) into the directory ``path``; returns it."""
    from ..llm import ModelConfig, random_weights, save_pretrained

    d = pathlib.Path(path)
    cfg = ModelConfig("tiny-text", "llama", vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      d_ff=128, max_positions=64)
    save_pretrained(d, cfg, random_weights(cfg, seed))
    byte_level_tokenizer(vocab_size).save(str(d / "tokenizer.json"))
    tc = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "chat_template": template}
    tc.update(tokenizer_config)
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return d


__all__ = ["byte_level_tokenizer", "llama_style_tokenizer", "write_text_model", "TEMPLATE"]
