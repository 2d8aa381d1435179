"""Text in and out (lpucore.llm.text) and sampling (lpucore.llm.sampling) on a tiny model directory with a
tokenizer trained here (no downloads): round trips, chat templates, streaming, stop strings, end-of-sequence
tokens, seeded sampling on both engines, hostile tokenizer files and templates."""

import json
import shutil
import sys
import time

import numpy as np
import pytest
from helpers import one_error_line

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")
pytest.importorskip("safetensors")

from lpucore import LpuError, ModelError  # noqa: E402
from lpucore.cli import main  # noqa: E402
from lpucore.llm import Continuation, Decoder  # noqa: E402
from lpucore.llm import text as text_mod  # noqa: E402
from lpucore.llm.reference import choose_token  # noqa: E402
from lpucore.llm.sampling import SamplingError, SamplingParams  # noqa: E402
from lpucore.llm.text import TextError, TextStream, load_text  # noqa: E402
from lpucore.testing.text import TEMPLATE, llama_style_tokenizer, write_text_model  # noqa: E402

VOCAB = 300
CAPACITY = 64
FAST = 5.0          # seconds: every refusal, and a runaway template, ends well within this
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}]
# TEMPLATE rendered by hand: trim_blocks drops the newline after each {% ... %}, lstrip_blocks the indentation
# before it, so only the text lines' own newlines remain
RENDERED = "<s><<SYS>>be brief<</SYS>>\n[user] héllo</s>\n[assistant]\n"


def write_model(d, template=TEMPLATE, **config):
    return write_text_model(d, template=template, vocab_size=VOCAB, **config)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("text") / "model")


_models = {}


@pytest.fixture(scope="module")
def models(model_dir):
    """(engine, capacity) -> the directory's Decoder (compiled once per module)."""
    def get(engine="fast", capacity=CAPACITY):
        if (engine, capacity) not in _models:
            _models[engine, capacity] = Decoder.from_pretrained(model_dir, capacity=capacity, engine=engine)
        return _models[engine, capacity]
    return get


def continuation(tk, prompt, tokens):
    """The text ``tokens`` add after ``prompt``, decoded as a whole."""
    whole = tk.decode(list(prompt) + list(tokens))
    head = tk.decode(list(prompt))
    assert whole.startswith(head)
    return whole[len(head):]


# ---------------------------------------------------------------------------------------------- text
def test_the_directory_gives_a_tokenizer_and_eos(models):
    m = models()
    assert m.tokenizer is not None and m.eos_ids == frozenset({1})         # tokenizer_config's "</s>"
    text = "héllo 日本 wörld 🙂"
    ids = m.tokenizer.encode(text)
    assert ids[0] == 0 and m.tokenizer.decode(ids) == text                 # BOS added, skipped when decoded
    assert m.tokenizer.encode(text, add_special_tokens=False) == ids[1:]


def test_a_text_prompt_gives_text(models):
    m = models()
    res = m.generate("hello world", max_new_tokens=12, ignore_eos=True)
    ids = m.tokenizer.encode("hello world")
    np.testing.assert_array_equal(res.prompt_ids, ids)
    assert res.prompt_text == "hello world" and res.finish_reason == "length"
    assert res.text == continuation(m.tokenizer, ids, res.tokens)
    same = m.generate(ids, max_new_tokens=12, ignore_eos=True)            # ids: the same tokens, and text
    np.testing.assert_array_equal(same.tokens, res.tokens)
    assert same.text == res.text and same.prompt_text is None


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_streamed_text_equals_the_whole(models, seed):
    """Random weights sampled hot give stray bytes and split characters: the pieces still add up."""
    m = models()
    pieces = []
    res = m.generate("日本", max_new_tokens=16, temperature=1.5, seed=seed, ignore_eos=True, on_text=pieces.append)
    assert "".join(pieces) == res.text == continuation(m.tokenizer, res.prompt_ids, res.tokens)
    assert all(pieces)


def test_multibyte_characters_split_across_tokens_stream_whole(models):
    tk = models().tokenizer
    text = "日本 🙂 héllo"
    ids = tk.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)                      # some characters span several tokens
    stream = TextStream(tk, [0])
    pieces = [stream.push(t) for t in ids] + [stream.close()]
    assert "".join(pieces) == stream.text == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[0] == "" and pieces[1] == "" and pieces[2] == "日"      # 日 is three byte tokens


@pytest.mark.parametrize("prompt,new", [("the", " cat 日本 é the cat"), ("", "the cat 日 x"), ("日", "本 the")])
def test_streaming_with_a_llama_style_tokenizer(tmp_path, prompt, new):
    """Llama's decoder strips the first space of every decode and spells other characters as byte tokens:
    decoded one at a time, " cat" would lose its space and 日 would be three U+FFFD."""
    tk = text_mod.Tokenizer(llama_style_tokenizer(), {}, tmp_path / "tokenizer_config.json", None)
    ids = tk.encode(prompt + new)
    head = tk.encode(prompt)
    n = len(head) if prompt else 1
    assert ids[:n] == head[:n]
    stream = TextStream(tk, ids[:n])
    pieces = [stream.push(t) for t in ids[n:]] + [stream.close()]
    assert "".join(pieces) == stream.text == tk.decode(ids)[len(tk.decode(ids[:n])):] == new
    assert not any("\ufffd" in p for p in pieces)
    assert [tk.decode([t]) for t in ids[n:]] != [p for p in pieces if p]          # one at a time would differ


def test_stop_strings_are_held_back_and_cut(models):
    tk = models().tokenizer
    ids = tk.encode("the cat sat on the mat", add_special_tokens=False)
    stream = TextStream(tk, [0], stop=["sat on the rug", "mat"])
    pieces = []
    for t in ids:
        pieces.append(stream.push(t))
        if stream.stopped:
            break
    assert stream.stop_string == "mat" and stream.text == "the cat sat on the "
    assert "".join(pieces) + stream.close() == stream.text
    # "sat on the " could begin the first stop string: it was held until "mat" ended it
    assert "".join(pieces[:-1]) == "the cat "


def test_stop_strings_end_generation(models):
    m = models()
    whole = m.generate("hello", max_new_tokens=20, ignore_eos=True)
    assert len(whole.text) > 8
    # two characters of the text from the sixth on, neither a replacement character (a random model's
    # bytes need not be UTF-8: a token that ends inside a character shows one for a moment)
    at = next(i for i in range(5, len(whole.text) - 1) if "\ufffd" not in whole.text[i:i + 2])
    stop = whole.text[at:at + 2]
    pieces = []
    res = m.generate("hello", max_new_tokens=20, ignore_eos=True, stop=["never there", stop], on_text=pieces.append)
    assert res.finish_reason == "stop" and res.stop_string == stop
    assert res.text == whole.text[:whole.text.find(stop)] == "".join(pieces)
    n = len(res.tokens)
    np.testing.assert_array_equal(res.tokens, whole.tokens[:n])
    assert stop in continuation(m.tokenizer, res.prompt_ids, res.tokens)
    assert stop not in continuation(m.tokenizer, res.prompt_ids, res.tokens[:-1])


def test_end_of_sequence_tokens(models, model_dir, tmp_path):
    m = models()
    greedy = m.generate("hello", max_new_tokens=10, ignore_eos=True)
    eos = int(greedy.tokens[3])
    first = greedy.tokens.tolist().index(eos)
    res = m.generate("hello", max_new_tokens=10, eos_id=eos)
    assert res.finish_reason == "eos" and res.tokens.tolist() == greedy.tokens[:first + 1].tolist()
    assert res.text == continuation(m.tokenizer, res.prompt_ids, res.tokens[:-1])     # EOS adds no text
    # generation_config.json's eos_token_id is the model's too
    d = tmp_path / "gen"
    shutil.copytree(model_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 1]}))
    _, eos_ids, _ = load_text(d, VOCAB)
    assert eos_ids == frozenset({eos, 1})


def test_chat_template_renders_as_transformers_does(models):
    m = models()
    assert m.tokenizer.apply_chat_template(CHAT) == RENDERED
    assert m.tokenizer.apply_chat_template(CHAT, add_generation_prompt=False) == RENDERED[:-len("[assistant]\n")]
    res = m.chat(CHAT, max_new_tokens=4, ignore_eos=True)
    assert res.prompt_text == RENDERED
    ids = m.tokenizer.encode(RENDERED, add_special_tokens=False)           # the template has the BOS
    np.testing.assert_array_equal(res.prompt_ids, ids)
    assert ids[0] == 0 and ids.count(0) == 1 and ids.count(1) == 1         # "<s>", "</s>" as special tokens
    np.testing.assert_array_equal(res.tokens, m.generate(ids, max_new_tokens=4, ignore_eos=True).tokens)


def test_template_helpers_of_transformers(tmp_path):
    d = write_model(tmp_path / "m", template=(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be the user\\'s') }}"
        "{% endif %}{% for m in messages %}{{ m|tojson }}{% if loop.last %}{% break %}{% endif %}{% endfor %}"
        "{% generation %}!{% endgeneration %}"))
    tk, _, _ = load_text(d, VOCAB)
    assert tk.apply_chat_template([{"role": "user", "content": "é"}]) == '{"role": "user", "content": "é"}!'
    with pytest.raises(ModelError, match=r"tokenizer_config.json: 'chat_template': raised: .*the user's"):
        tk.apply_chat_template([{"role": "assistant", "content": "x"}])


# ------------------------------------------------------------------------------------------ sampling
def test_sampling_is_reproducible_on_both_engines(models):
    """The same seed gives the same tokens on the chip's two engines (bit-identical logits) and in every run."""
    fast, ref = models("fast", 8), models("reference", 8)
    kw = dict(max_new_tokens=5, temperature=1.3, top_k=40, top_p=0.9, seed=11, ignore_eos=True)
    a, b, again = fast.generate("the cat", **kw), ref.generate("the cat", **kw), fast.generate("the cat", **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.tokens, again.tokens)
    np.testing.assert_array_equal(a.logits, b.logits)
    assert a.text == b.text
    other = fast.generate("the cat", **dict(kw, seed=12))
    assert other.tokens.tolist() != a.tokens.tolist()


def test_top_k_one_is_greedy(models):
    m = models()
    greedy = m.generate("hello", max_new_tokens=8, ignore_eos=True)
    hot = m.generate("hello", max_new_tokens=8, ignore_eos=True, temperature=5.0, top_k=1, seed=4)
    np.testing.assert_array_equal(greedy.tokens, hot.tokens)
    sampled = m.generate("hello", max_new_tokens=8, ignore_eos=True, temperature=5.0, seed=4)
    assert sampled.tokens.tolist() != greedy.tokens.tolist()


def test_sampler_choices():
    x = np.random.default_rng(1).normal(size=256).astype(np.float32) * 3
    # no top-k / top-p: the draw choose_token makes (sequences sampled before top-k/top-p are unchanged)
    s, rng = SamplingParams(temperature=0.7, seed=5).sampler(), np.random.default_rng(5)
    assert [s.choose(x) for _ in range(20)] == [choose_token(x, False, 0.7, rng) for _ in range(20)]
    top3 = set(np.argsort(-x)[:3].tolist())
    s = SamplingParams(temperature=2.0, top_k=3, seed=0).sampler()
    assert {s.choose(x) for _ in range(300)} == top3
    p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    order = np.argsort(-p)
    nucleus = set(order[:int(np.searchsorted(np.cumsum(p[order]), 0.5)) + 1].tolist())
    s = SamplingParams(temperature=1.0, top_p=0.5, seed=0).sampler()
    assert {s.choose(x) for _ in range(500)} == nucleus
    ties = np.zeros(8, np.float32)
    assert SamplingParams(temperature=1.0, top_k=1).sampler().choose(ties) == 0           # lowest id on ties
    assert SamplingParams(temperature=1e-300, seed=1).sampler().choose(x) == int(np.argmax(x))
    with pytest.raises(SamplingError, match="NaN"):
        SamplingParams(temperature=1.0).sampler().choose(np.array([0.0, np.nan]))


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature="hot"), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_k=True), "top_k"), (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"),
])
def test_bad_sampling_parameters(kw, match):
    with pytest.raises(SamplingError, match=match) as e:
        SamplingParams(**kw)
    assert isinstance(e.value, LpuError) and isinstance(e.value, ValueError)


def test_generate_resolves_its_sampling_arguments():
    assert SamplingParams.resolve() == SamplingParams()                                 # greedy
    assert SamplingParams.resolve(temperature=0.5).temperature == 0.5                   # samples
    assert SamplingParams.resolve(greedy=False).temperature == 1.0                      # as before
    assert SamplingParams.resolve(greedy=True, temperature=2.0).greedy                  # as before
    for kw in (dict(greedy=True, top_k=5), dict(greedy=False, temperature=0.0), dict(greedy="yes")):
        with pytest.raises(SamplingError):
            SamplingParams.resolve(**kw)


def test_continuations_of_a_batch_are_independent(models):
    """Interleaved sequences (as a batch steps them) choose what each chooses alone, and finish on their own."""
    tk = models().tokenizer
    rows = np.random.default_rng(0).normal(size=(12, VOCAB)).astype(np.float32)
    rows[:, 1] = -10.0                                         # no EOS until row 9
    rows[9, 1] = 100.0

    def run(seeds, n):
        cs = [Continuation([0, 5], n, SamplingParams(temperature=1.0, seed=sd), tokenizer=tk, eos_ids=[1])
              for sd in seeds]
        for row in rows:
            for c in cs:
                if not c.finished:
                    c.step(row)
        for c in cs:
            c.close()
        return cs
    a, b = run([1, 2], 20)
    assert a.tokens == run([1], 20)[0].tokens and b.tokens == run([2], 20)[0].tokens != a.tokens
    assert a.finish_reason == b.finish_reason == "eos" and len(a.tokens) == 10 and a.tokens[-1] == 1
    short = run([1], 4)[0]
    assert short.finish_reason == "length" and short.tokens == a.tokens[:4]
    assert Continuation([0], 0, SamplingParams()).finished
    with pytest.raises(TextError, match="need a tokenizer"):
        Continuation([0], 4, SamplingParams(), stop=["x"])


def test_models_without_a_tokenizer_say_so():
    m = Decoder.random("tiny", capacity=8)
    for call in (lambda: m.generate("hello"), lambda: m.chat([{"role": "user", "content": "x"}]),
                 lambda: m.generate([1, 2], stop=["x"]), lambda: m.generate([1], on_text=print)):
        with pytest.raises(ModelError, match="no tokenizer: give token ids"):
            call()
    assert m.compiled is None                        # refused before compiling
    with pytest.raises(SamplingError, match="top_p"):
        m.generate([1], top_p=2.0)


@pytest.mark.parametrize("messages", [[], "hi", [{"content": "x"}], [{"role": 1, "content": "x"}], [["user", "x"]]])
def test_bad_chat_messages(models, messages):
    with pytest.raises(TextError, match="messages"):
        models().chat(messages)


@pytest.mark.parametrize("stop", ["", [""], [1], ["x"] * 65, ["x" * 1001], {"x": 1}])
def test_bad_stop_strings(models, stop):
    with pytest.raises(TextError, match="stop"):
        models().generate("hello", stop=stop)


# ------------------------------------------------------------------------------------------ hostile files
def refused(d, *fragments):
    t = time.perf_counter()
    with pytest.raises(ModelError) as e:
        load_text(d, VOCAB)
    assert time.perf_counter() - t < FAST
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))
    return e.value


@pytest.fixture
def copy(model_dir, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(model_dir, d)
    return d


@pytest.mark.parametrize("content,fragments", [
    (b"{not json", ("tokenizer.json", "not valid JSON")),
    (b"[1, 2]", ("tokenizer.json", "must be a JSON object")),
    (b'{"model": 5}', ("tokenizer.json", "not a tokenizer")),
    (b'{"version": "1.0", "model": {"type": "BPE", "vocab": "x", "merges": []}}', ("tokenizer.json",)),
    (b"\xff\xfe{}", ("tokenizer.json", "not UTF-8")),
    (b"[" * 100_000 + b"]" * 100_000, ("tokenizer.json", "not valid JSON")),
])
def test_bad_tokenizer_json(copy, content, fragments):
    (copy / "tokenizer.json").write_bytes(content)
    refused(copy, *fragments)


def test_tokenizer_beyond_the_vocabulary_and_huge_files(copy, monkeypatch):
    doc = json.loads((copy / "tokenizer.json").read_text())
    doc["model"]["vocab"]["zz"] = 5000
    (copy / "tokenizer.json").write_text(json.dumps(doc))
    refused(copy, "tokenizer.json", "token id 5000", "vocab_size 300")
    monkeypatch.setattr(text_mod, "MAX_TOKENIZER_BYTES", 1000)
    refused(copy, "tokenizer.json", "lpucore reads at most 1,000")
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").mkdir()
    refused(copy, "tokenizer.json", "not a regular file")


@pytest.mark.parametrize("changes,fragments", [
    ({"chat_template": 5}, ("'chat_template'", "must be a string")),
    ({"chat_template": [{"name": "tool_use", "template": "x"}]}, ("'chat_template'", "'default'")),
    ({"chat_template": [5]}, ("'chat_template'", "chat templates must hold")),
    ({"chat_template": "{% for %}"}, ("'chat_template'", "does not compile")),
    ({"eos_token": ["</s>"]}, ("'eos_token'", "must be a string")),
    ({"eos_token": "<nope>"}, ("'eos_token'", "not a token")),
    ({"bos_token": {"content": 3}}, ("'bos_token'",)),
])
def test_bad_tokenizer_config(copy, changes, fragments):
    tc = json.loads((copy / "tokenizer_config.json").read_text())
    tc.update(changes)
    (copy / "tokenizer_config.json").write_text(json.dumps(tc))
    refused(copy, "tokenizer_config.json", *fragments)


@pytest.mark.parametrize("name,content,fragments", [
    ("tokenizer_config.json", "[]", ("must be a JSON object",)),
    ("tokenizer_config.json", "{", ("not valid JSON",)),
    ("config.json", None, ("'eos_token_id'", "token id")),
    ("generation_config.json", '{"eos_token_id": [1, -3]}', ("'eos_token_id'", "token id")),
    ("generation_config.json", '{"eos_token_id": 300}', ("'eos_token_id'", "[0, 300)")),
])
def test_bad_files_beside_the_tokenizer(copy, name, content, fragments):
    if content is None:
        hf = json.loads((copy / name).read_text())
        hf["eos_token_id"] = "2"
        content = json.dumps(hf)
    (copy / name).write_text(content)
    refused(copy, name, *fragments)


@pytest.mark.parametrize("template,fragments", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", ("longer than",)),
    ("{% set r = range(100000)|list %}{% for i in r %}{% for j in r %}{% for k in r %}{% endfor %}{% endfor %}"
     "{% endfor %}", ("longer than",)),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", ("an output",)),
    ("{{ 'x' * 10**10 }}", ("a repetition",)),
    ("{% set l = ['x' * 1000000] * 1000 %}{{ l|tojson }}", ("a repetition",)),
    ("{% set s = 'x' * 1000000 %}{{ s|replace('x', s) }}", ("a replacement",)),
    ("{% set s = 'x' * 1000000 %}{{ s.replace('x', s) }}", ("a replacement",)),
    ("{% set s = '\\n' * 1000000 %}{{ s|indent(1000000) }}", ("an indentation",)),
    ("{% set s = '\\t' * 1000000 %}{{ s.expandtabs(1000000) }}", ("an indentation",)),
    ("{{ lipsum(1000000) }}", ("failed", "lipsum")),
    ("{{ 'x' * 2**40 }}", ("a repetition",)),
    ("{{ 7 ** 99999999 }}", ("a power",)),
    ("{{ 'x'|center(10**9) }}", ("a filter argument",)),
    ("{{ '%0999999999d' % 1 }}", ("format width",)),
    ("{{ '{:>999999999}'.format(1) }}", ("format width",)),
    ("{{ '%s'|format('x') }}{{ '%099999999d'|format(1) }}", ("format width",)),
    ("{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     ("a concatenation",)),
    ("{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     ("a concatenation",)),
    ("{% set l = ['x' * 1000000, 'y' * 1000000] %}{{ l|join }}", ("a join",)),
    ("{% set l = ['x' * 1000000, 'y' * 1000000] %}{{ ''.join(l) }}", ("a join",)),
    ("{% set l = ['x' * 1000000, 'y' * 1000000] %}{{ l }}", ("an output",)),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", ("RecursionError",)),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", ("failed",)),
    ("{{ cycler.__init__.__globals__.os.system('true') }}", ("failed",)),
    ("{{ messages.append(1) }}", ("failed", "SecurityError")),
    ("{{ messages[0].update(role='x') }}", ("failed", "SecurityError")),
    ("{{ undefined_function() }}", ("failed",)),
    ("{{ raise_exception('no') }}", ("raised", "no")),
])
def test_hostile_templates_are_stopped(tmp_path, monkeypatch, template, fragments):
    monkeypatch.setattr(text_mod, "TEMPLATE_SECONDS", 0.5)
    d = write_model(tmp_path / "m", template=template)
    tk, _, _ = load_text(d, VOCAB)
    t = time.perf_counter()
    with pytest.raises(ModelError) as e:
        tk.apply_chat_template([{"role": "user", "content": "x"}])
    assert time.perf_counter() - t < FAST
    for f in ("tokenizer_config.json", "'chat_template'") + fragments:
        assert f in str(e.value), (f, str(e.value))


def test_a_tokenizer_failing_at_work_is_a_model_error(tmp_path):
    class Failing:
        def encode(self, *a, **k):
            raise Exception("a panic in Rust")
        decode = encode

    tk = text_mod.Tokenizer(Failing(), {}, tmp_path / "tokenizer_config.json", None)
    for call in (lambda: tk.encode("x"), lambda: tk.decode([1])):
        with pytest.raises(ModelError, match=r"tokenizer.json: the tokenizer failed to (en|de)code: .*a panic"):
            call()


def test_no_tokenizer_json_means_ids_only(copy):
    (copy / "tokenizer.json").unlink()
    tk, eos, why = load_text(copy, VOCAB)
    assert tk is None and eos == frozenset() and "no tokenizer.json" in why
    m = Decoder.from_pretrained(copy, capacity=8)
    with pytest.raises(ModelError, match="no tokenizer.json"):
        m.generate("hello")


def test_template_file_missing_template_and_missing_packages(copy, monkeypatch):
    tc = json.loads((copy / "tokenizer_config.json").read_text())
    del tc["chat_template"]
    (copy / "tokenizer_config.json").write_text(json.dumps(tc))
    tk, _, _ = load_text(copy, VOCAB)
    with pytest.raises(TextError, match="no chat template"):
        tk.apply_chat_template(CHAT)
    (copy / "chat_template.jinja").write_text(TEMPLATE)          # newer directories keep it apart
    tk, _, _ = load_text(copy, VOCAB)
    assert tk.apply_chat_template(CHAT) == RENDERED
    monkeypatch.setitem(sys.modules, "jinja2", None)             # import jinja2 now fails
    tk, _, _ = load_text(copy, VOCAB)
    assert tk.encode("hello")                                    # text works, the template says what it needs
    with pytest.raises(TextError, match=r"needs jinja2: pip install 'lpucore\[text\]'"):
        tk.apply_chat_template(CHAT)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    tk, eos, why = load_text(copy, VOCAB)
    assert tk is None and "needs the tokenizers package" in why


# ------------------------------------------------------------------------------------------ command line
def test_decode_streams_text(models, model_dir, capsys):
    want = models("fast", 8).generate("hello", max_new_tokens=6, temperature=0.9, top_k=20, seed=3)
    assert main(["decode", "--model", str(model_dir), "--prompt", "hello", "--tokens", "6", "--capacity",
                 "8", "--temperature", "0.9", "--top-k", "20", "--sample-seed", "3"]) == 0
    out = capsys.readouterr().out
    assert f"tokens: {','.join(map(str, want.tokens.tolist()))} (finished: {want.finish_reason})" in out
    assert "\n" + want.text + "\n" in out
    chat = models().chat([{"role": "user", "content": "hi"}], 3)
    assert main(["decode", "--model", str(model_dir), "--chat", "hi", "--tokens", "3", "--capacity", "32",
                 "-q"]) == 0
    assert f"tokens: {','.join(map(str, chat.tokens.tolist()))}" in capsys.readouterr().out


@pytest.mark.parametrize("argv,fragments", [
    (["--model", "tiny", "--prompt", "hello"], ("--prompt needs a model with a tokenizer", "give token ids")),
    (["--model", "tiny", "--chat", "hello"], ("--chat needs a model with a tokenizer",)),
    (["--model", "tiny", "--stop", "x"], ("--stop needs a model with a tokenizer",)),
    (["--model", "tiny", "--top-p", "0"], ("top_p",)),
    (["--model", "tiny", "--temperature", "-1"], ("temperature",)),
    (["--model", "tiny", "--temperature", "nan"], ("temperature",)),
    (["--model", "tiny", "--top-k", "-2"], ("top_k",)),
    (["--model", "tiny", "--prompt", "x", "--prompt-ids", "1"], ("not allowed with",)),
])
def test_decode_text_errors_are_one_line(capsys, argv, fragments):
    assert main(["decode", "--capacity", "8"] + argv) != 0
    one_error_line(capsys, *fragments)
