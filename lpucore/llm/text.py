"""Text in and out of a model directory: its tokenizer, chat template, end-of-sequence tokens, and streamed text.

    load_text(path, vocab_size)  -> (Tokenizer or None, eos ids, why there is no tokenizer)
    Tokenizer                     ``tokenizer.json`` read with the ``tokenizers`` package, plus the special tokens
                                  and chat template of ``tokenizer_config.json`` (``pip install lpucore[text]``)
    TextStream                    one sequence's new tokens as text, streamed: incremental detokenisation that
                                  waits for whole UTF-8 characters, and ``stop`` strings held back until they
                                  can no longer begin one (what is streamed equals the final text)

The directory is untrusted: a missing, oversized, non-JSON or mistyped file raises
:class:`~lpucore.errors.ModelError` naming the file (and the key), and the chat template runs in jinja2's
``ImmutableSandboxedEnvironment`` (as Hugging Face transformers renders it: ``trim_blocks``, ``lstrip_blocks``,
``raise_exception``, ``tojson``, ``strftime_now``, the ``loopcontrols`` extension and the ``generation``
tag) with bounds on its running time (:data:`TEMPLATE_SECONDS`, checked at every template line) and on the
size of every string it builds and of its output (:data:`MAX_TEMPLATE_CHARS`); a template that fails, raises,
loops or grows without bound raises a ModelError naming ``tokenizer_config.json`` and ``chat_template``.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import sys
import time
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import LpuError, ModelError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"          # newer Hugging Face directories keep the template apart
GENERATION_CONFIG_FILE = "generation_config.json"
MAX_TOKENIZER_BYTES = 64 << 20
"""Largest tokenizer file read (64 MiB; the largest real ``tokenizer.json`` files are about 35 MB)."""
MAX_TEMPLATE_CHARS = 1 << 20
"""Longest string a chat template may build or render (characters)."""
TEMPLATE_SECONDS = 2.0
"""Longest a chat template may run (host seconds)."""
MAX_STOP = (64, 1000)
"""At most 64 stop strings of at most 1000 characters each."""
TEXT_EXTRA = "pip install 'lpucore[text]' (the tokenizers and jinja2 packages)"


class TextError(LpuError, ValueError):
    """A text request the model cannot serve: text given to a model without a tokenizer, malformed chat
    messages or stop strings (an :class:`~lpucore.LpuError` and ``ValueError``)."""


# ---------------------------------------------------------------------------------------------- files
def _read_text(path: pathlib.Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_TOKENIZER_BYTES:
            raise ModelError(f"is {size:,} bytes; lpucore reads at most {MAX_TOKENIZER_BYTES:,} "
                             f"(lpucore.llm.text.MAX_TOKENIZER_BYTES)", path=path)
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ModelError(f"cannot read: {e.strerror or e}", path=path) from None
    except UnicodeDecodeError as e:
        raise ModelError(f"is not UTF-8 text: {e}", path=path) from None


def _read_object(path: pathlib.Path) -> Tuple[str, Dict[str, Any]]:
    """(text, JSON object) of ``path``; ModelError unless it is a JSON object."""
    text = _read_text(path)
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ModelError(f"is not valid JSON: {str(e)[:200]}", path=path) from None
    if not isinstance(doc, dict):
        raise ModelError(f"must be a JSON object, not a {type(doc).__name__}", path=path)
    return text, doc


def _optional_file(root: pathlib.Path, name: str) -> Optional[pathlib.Path]:
    from .weights import _inside
    p = root / name
    if not (p.exists() or p.is_symlink()):
        return None
    p = _inside(root, p, name)
    if not p.is_file():
        raise ModelError("is not a regular file", path=p)
    return p


def _token_ids(value, path: pathlib.Path, field: str, vocab_size: int) -> List[int]:
    """An ``eos_token_id``-style value (null, an id or a list of ids) as a list of ids below ``vocab_size``."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab_size:
            raise ModelError(f"must be a token id in [0, {vocab_size}) or a list of them, not {value!r}"[:300],
                             path=path, field=field)
    return list(items)


def model_eos_ids(root: pathlib.Path, vocab_size: int) -> List[int]:
    """The end-of-sequence ids ``config.json`` and ``generation_config.json`` name (``eos_token_id``)."""
    from .weights import CONFIG_FILE
    ids: List[int] = []
    for name in (CONFIG_FILE, GENERATION_CONFIG_FILE):
        p = _optional_file(root, name)
        if p is not None:
            ids += _token_ids(_read_object(p)[1].get("eos_token_id"), p, "eos_token_id", vocab_size)
    return ids


def load_text(path, vocab_size: int) -> Tuple[Optional["Tokenizer"], FrozenSet[int], Optional[str]]:
    """The text side of the model directory ``path``: ``(tokenizer, eos_ids, no_text)``.

    ``tokenizer`` is a :class:`Tokenizer`, or None when the directory has no ``tokenizer.json`` or the
    ``tokenizers`` package is missing (``no_text`` then says which); ``eos_ids`` are the end-of-sequence
    token ids of ``config.json``, ``generation_config.json`` and the tokenizer's ``eos_token``. Files are
    checked whether or not ``tokenizers`` is installed; a bad one raises ModelError naming it."""
    from .weights import _model_root
    root = _model_root(path)
    eos = model_eos_ids(root, vocab_size)
    tfile = _optional_file(root, TOKENIZER_FILE)
    if tfile is None:
        return None, frozenset(eos), f"{root} has no {TOKENIZER_FILE}"
    cfile = _optional_file(root, TOKENIZER_CONFIG_FILE)
    config = _read_object(cfile)[1] if cfile is not None else {}
    template = _template_source(root, cfile, config)
    text, _ = _read_object(tfile)
    try:
        import tokenizers
    except ImportError:
        return None, frozenset(eos), f"reading {TOKENIZER_FILE} needs the tokenizers package: {TEXT_EXTRA}"
    tk = Tokenizer(_from_str(tokenizers, text, tfile, vocab_size), config, cfile or root / TOKENIZER_CONFIG_FILE,
                   template)
    if tk.eos_token_id is not None:
        eos.append(tk.eos_token_id)
    return tk, frozenset(eos), None


def _from_str(tokenizers, text: str, path: pathlib.Path, vocab_size: int):
    """``tokenizers.Tokenizer.from_str(text)``; any failure (a Rust panic too) becomes a ModelError."""
    try:
        tk = tokenizers.Tokenizer.from_str(text)
        top = max(tk.get_vocab(with_added_tokens=True).values(), default=-1)
    except BaseException as e:                  # pyo3's PanicException derives from BaseException
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        raise ModelError(f"is not a tokenizer the tokenizers package reads: {str(e)[:300]}", path=path) from None
    if top >= vocab_size:
        raise ModelError(f"has token id {top}, beyond the model's vocab_size {vocab_size}", path=path)
    return tk


def _template_source(root: pathlib.Path, cfile: Optional[pathlib.Path], config: Mapping[str, Any]) -> Optional[str]:
    """The chat template: ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates,
    of which ``default`` is taken), else ``chat_template.jinja``; None if neither."""
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {}
        for t in value:
            if not (isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)):
                raise ModelError("a list of chat templates must hold {\"name\": ..., \"template\": ...} objects",
                                 path=cfile, field="chat_template")
            named[t["name"]] = t["template"]
        if "default" not in named:
            raise ModelError(f"names no 'default' template (it has {sorted(named)[:8]})", path=cfile,
                             field="chat_template")
        value = named["default"]
    if value is not None and not isinstance(value, str):
        raise ModelError(f"must be a string, not a {type(value).__name__}", path=cfile, field="chat_template")
    if value is None:
        jfile = _optional_file(root, CHAT_TEMPLATE_FILE)
        value = _read_text(jfile) if jfile is not None else None
    if value is not None and len(value) > MAX_TEMPLATE_CHARS:
        raise ModelError(f"is {len(value):,} characters; at most {MAX_TEMPLATE_CHARS:,}", path=cfile,
                         field="chat_template")
    return value


def _special(config: Mapping[str, Any], key: str, path: pathlib.Path) -> Optional[str]:
    """A special token of ``tokenizer_config.json``: a string, ``{"content": ...}`` (an AddedToken), or null."""
    v = config.get(key)
    if isinstance(v, dict):
        v = v.get("content")
    if v is not None and not isinstance(v, str):
        raise ModelError(f"must be a string, an object with a string 'content', or null, not {config.get(key)!r}"
                         [:300], path=path, field=key)
    return v


# ------------------------------------------------------------------------------------------ tokenizer
class Tokenizer:
    """A model directory's tokenizer: ``encode`` / ``decode`` (the ``tokenizers`` package), the special
    tokens of ``tokenizer_config.json``, and its chat template (:meth:`apply_chat_template`)."""

    def __init__(self, tk, config: Mapping[str, Any], config_path: pathlib.Path, template: Optional[str]):
        self.tk = tk
        self.config_path = config_path
        self.special_tokens = {k: _special(config, k, config_path)
                               for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.eos_token_id: Optional[int] = None
        eos = self.special_tokens["eos_token"]
        if eos is not None:
            self.eos_token_id = tk.token_to_id(eos)
            if self.eos_token_id is None:
                raise ModelError(f"{eos!r} is not a token of {TOKENIZER_FILE}", path=config_path, field="eos_token")
        self.chat_template = template
        self._template: Optional[ChatTemplate] = None
        if template is not None:
            try:
                self._template = ChatTemplate(template, config_path)      # compiled now: errors at load
            except ImportError:
                pass                     # no jinja2: apply_chat_template says so

    @property
    def vocab_size(self) -> int:
        return int(self.tk.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """Token ids of ``text`` (with the tokenizer's own special tokens, e.g. a BOS, unless
        ``add_special_tokens=False``)."""
        if not isinstance(text, str):
            raise TextError(f"text must be a str, not {type(text).__name__}")
        return list(self._run("encode", self.tk.encode, text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return str(self._run("decode", self.tk.decode, [int(i) for i in ids], skip_special_tokens=skip_special_tokens))

    def _run(self, what: str, f, *args, **kwargs):
        """``f(*args, **kwargs)``; a failure of the tokenizer (a Rust panic too) becomes a ModelError."""
        try:
            return f(*args, **kwargs)
        except BaseException as e:
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise
            raise ModelError(f"the tokenizer failed to {what}: {type(e).__name__}: {str(e)[:300]}",
                             path=self.config_path.parent / TOKENIZER_FILE) from None

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """The chat rendered as text by the model's template (as transformers' ``apply_chat_template(...,
        tokenize=False)`` renders it: ``messages``, ``add_generation_prompt``, the special tokens
        ``bos_token``, ``eos_token``, ... and ``kwargs`` are the template's variables)."""
        if self._template is None and self.chat_template is not None:
            raise TextError(f"rendering the chat template needs jinja2: {TEXT_EXTRA}")
        if self._template is None:
            raise TextError(f"this model's tokenizer has no chat template ({self.config_path.name} has no "
                            f"'chat_template' and there is no {CHAT_TEMPLATE_FILE})")
        check_messages(messages)
        variables: Dict[str, Any] = {k: v for k, v in self.special_tokens.items() if v is not None}
        variables.update(kwargs, tools=kwargs.get("tools"), documents=kwargs.get("documents"))
        return self._template.render(messages=list(messages), add_generation_prompt=bool(add_generation_prompt),
                                     **variables)

    def stream(self, prompt_ids: Sequence[int] = (), stop: Sequence[str] = ()) -> "TextStream":
        """A :class:`TextStream` for the tokens that follow ``prompt_ids``."""
        return TextStream(self, prompt_ids, stop)

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, chat_template={self.chat_template is not None})"


def check_messages(messages) -> None:
    """TextError unless ``messages`` is a list of {"role": str, "content": ...} objects."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TextError(f"messages must be a non-empty list of {{'role': ..., 'content': ...}}, not {messages!r}"
                        [:300])
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
            raise TextError(f"messages[{i}] must be an object with a string 'role' and a 'content', not {m!r}"[:300])


# ------------------------------------------------------------------------------------------ templates
class TemplateLimit(Exception):
    """A chat template went past :data:`TEMPLATE_SECONDS` or :data:`MAX_TEMPLATE_CHARS`."""


def _check_size(n: int, what: str) -> None:
    if n > MAX_TEMPLATE_CHARS:
        raise TemplateLimit(f"{what} of {n:,} items or characters (at most {MAX_TEMPLATE_CHARS:,})")


_NUMBER = re.compile(r"\d+")


def _check_format(fmt: str) -> None:
    """A format string (``%`` or ``str.format``) with a width or precision above the bound is refused."""
    for m in _NUMBER.finditer(fmt):
        if len(m.group()) > 7 or int(m.group()) > MAX_TEMPLATE_CHARS:
            raise TemplateLimit(f"a format width or precision of {m.group()[:20]}")


def _weight(x, depth: int = 0) -> int:
    """About how many characters ``x`` prints as: a string's length, a list's items' (stops past the bound)."""
    if isinstance(x, str):
        return len(x)
    if isinstance(x, (list, tuple, dict)) and depth < 32:
        total = len(x)
        for item in (x.items() if isinstance(x, dict) else x):
            total += _weight(item, depth + 1)
            if total > MAX_TEMPLATE_CHARS:
                break
        return total
    return 1


def _check_binop(op: str, a, b) -> None:
    """Bound the size of ``a op b`` before computing it."""
    seq = (str, list, tuple)
    if op == "*":
        for x, n in ((a, b), (b, a)):
            if isinstance(x, seq) and isinstance(n, int):
                _check_size(_weight(x) * max(n, 0), "a repetition")
    elif op == "+" and isinstance(a, seq) and isinstance(b, seq):
        _check_size(_weight(a) + _weight(b), "a concatenation")
    elif op == "**" and isinstance(a, int) and isinstance(b, int) and abs(a) > 1 and b > 0:
        _check_size(int(b * math.log2(abs(a)) / 8), "a power (bytes)")
    elif op == "%" and isinstance(a, str):
        _check_format(a)


def _check_growth(name: str, s, args: Sequence[Any]) -> Tuple[Any, List[Any]]:
    """Bound what string operation ``name`` (a filter, ``do_...``, or a ``str`` method of ``s``) makes;
    returns ``(s, args)``, with the iterable to join read into a list (so that it is read once)."""
    a = list(args)
    if name in ("format", "format_map", "do_format") and isinstance(s, str):
        _check_format(s)
    elif name == "join" and a:                  # sep.join(items)
        a[0] = list(a[0])
        _check_size(_weight(a[0]) + len(s) * len(a[0]), "a join")
    elif name == "do_join":                     # items|join(sep)
        s = list(s)
        _check_size(_weight(s) + len(str(a[0] if a else "")) * len(s), "a join")
    elif name in ("replace", "do_replace") and isinstance(s, str) and len(a) >= 2:
        old, new = str(a[0]), str(a[1])
        _check_size(len(s) + (len(s) // max(len(old), 1) + 1) * len(new), "a replacement")
    elif name in ("do_indent", "expandtabs") and isinstance(s, str) and a:
        width = a[0] if isinstance(a[0], int) else len(str(a[0]))
        _check_size(len(s) + (s.count("\n") + s.count("\t") + 1) * width, "an indentation")
    return s, a


def _checked_filter(f):
    """Filter ``f`` with its integer arguments bounded (``center(10**9)``) and its growth checked."""
    import functools

    skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0     # the context it takes first

    @functools.wraps(f)
    def g(*args, **kwargs):
        for v in list(args[skip:]) + list(kwargs.values()):
            if isinstance(v, int) and not isinstance(v, bool):
                _check_size(abs(v), "a filter argument")
        if len(args) > skip:
            value, rest = _check_growth(f.__name__, args[skip], args[skip + 1:])
            args = args[:skip] + (value,) + tuple(rest)
        return f(*args, **kwargs)
    return g


def _environment():
    """Hugging Face's chat-template environment, with the bounds above."""
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers marks assistant tokens with it): its body."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class Generator(CodeGenerator):
        def visit_Concat(self, node, frame):       # ``a ~ b``: sized before it is built
            self.write("environment.lpu_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(("*", "+", "**", "%"))
        code_generator_class = Generator

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
            for v in list(args) + list(kwargs.values()):
                if isinstance(v, int) and not isinstance(v, bool):
                    _check_size(abs(v), "a call argument")
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str):
                args = tuple(_check_growth(getattr(__obj, "__name__", ""), owner, args)[1])
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value):           # ``'...'.format``, bound at attribute access (jinja2 3.1.5)
            owner = getattr(value, "__self__", None)
            if isinstance(owner, str) and getattr(value, "__name__", "") in ("format", "format_map"):
                _check_format(owner)
            return super().wrap_str_format(value)

        @staticmethod
        def lpu_concat(parts):
            strs = [str(p) for p in parts]
            _check_size(sum(map(len, strs)), "a concatenation")
            return "".join(strs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters = {k: _checked_filter(f) for k, f in env.filters.items()}
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    env.globals.pop("lipsum", None)             # lipsum(10**6) would run unbounded outside the template's lines
    return env


class _Deadline:
    """A trace function that stops template code running past ``seconds`` (checked at each template line)."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def __call__(self, frame, event, arg):
        if frame.f_code.co_filename != "<template>":
            return None
        return self.line

    def line(self, frame, event, arg):
        if time.monotonic() > self.end:
            raise TemplateLimit(f"ran longer than {TEMPLATE_SECONDS} s (lpucore.llm.text.TEMPLATE_SECONDS)")
        return self.line


class ChatTemplate:
    """A chat template compiled in the bounded sandbox (:func:`_environment`); ModelError naming ``path``
    and ``chat_template`` if it does not compile (here) or fails when rendered (:meth:`render`)."""

    def __init__(self, source: str, path: pathlib.Path):
        self.path = path
        try:
            import jinja2
        except ImportError:
            raise ImportError(f"a chat template needs jinja2: {TEXT_EXTRA}") from None
        try:
            self.template = _environment().from_string(source)
        except (jinja2.TemplateError, RecursionError, MemoryError, ValueError) as e:
            raise self._error("does not compile", e) from None

    def _error(self, what: str, e: BaseException) -> ModelError:
        msg = " ".join(str(e).split())[:300]
        return ModelError(f"{what}: {type(e).__name__}: {msg}" if msg else f"{what}: {type(e).__name__}",
                          path=self.path, field="chat_template")

    def render(self, **variables) -> str:
        """The template's text for ``variables``, within the time and size bounds."""
        out: List[str] = []
        size = 0
        previous = sys.gettrace()
        sys.settrace(_Deadline(TEMPLATE_SECONDS))
        try:
            for chunk in self.template.generate(**variables):
                size += len(chunk)
                _check_size(size, "an output")
                out.append(chunk)
        except TemplateLimit as e:
            raise self._error("went past a bound", e) from None
        except Exception as e:          # raise_exception, undefined names, sandbox refusals, type errors, ...
            what = "raised" if type(e).__name__ == "TemplateError" else "failed"
            raise self._error(what, e) from None
        finally:
            sys.settrace(previous)
        return "".join(out)


# --------------------------------------------------------------------------------------- text stream
class TextStream:
    """One sequence's new tokens as text, as they come (:meth:`push`, then :meth:`close`).

    Each token's text is decoded within a window of the tokens before it (the prompt's last few too), so
    a tokenizer that drops a leading space at the start of a decode does not drop it mid-sequence; text that
    ends in an incomplete UTF-8 character (the replacement character U+FFFD) is held until the character is
    whole. With ``stop`` strings, text that could still begin a stop string is held back; when one appears,
    the text ends before it (:attr:`stop_string`). The pieces :meth:`push` and :meth:`close` return add
    up to :attr:`text`. Special tokens (an EOS) add no text.
    """

    CONTEXT = 5         # tokens of earlier text decoded with each new one

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), stop: Union[str, Sequence[str]] = ()):
        self.tokenizer = tokenizer
        self.stops = check_stop(stop)
        self.ids: List[int] = [int(i) for i in prompt_ids]
        self.read = len(self.ids)                            # tokens decoded into self._text
        self.prefix = max(0, self.read - self.CONTEXT)       # where the decode window starts
        self._text = ""                                      # decoded so far (cut at a stop string)
        self.emitted = 0                                     # characters of self._text handed out
        self.stop_string: Optional[str] = None

    @property
    def text(self) -> str:
        """The text so far (all of it after :meth:`close`)."""
        return self._text

    @property
    def stopped(self) -> bool:
        return self.stop_string is not None

    def push(self, token: int) -> str:
        """Add ``token``; returns the text that can be shown now ('' while waiting)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        now = self.tokenizer.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._add(now[len(before):])
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def close(self) -> str:
        """The text still held (an incomplete character as U+FFFD, a partial stop string as it is)."""
        if not self.stopped and self.read < len(self.ids):
            before = self.tokenizer.decode(self.ids[self.prefix:self.read])
            now = self.tokenizer.decode(self.ids[self.prefix:])
            self._add(now[len(before):])
            self.read = len(self.ids)
        return self._release(final=True)

    def _add(self, piece: str) -> None:
        start = max(0, len(self._text) - max((len(s) for s in self.stops), default=0) + 1)
        self._text += piece
        hits = [(i, s) for s in self.stops for i in [self._text.find(s, start)] if i >= 0]
        if hits:
            i, s = min(hits)
            self._text, self.stop_string = self._text[:i], s

    def _release(self, final: bool) -> str:
        end = len(self._text)
        if not final and not self.stopped:
            end -= _held(self._text, self.stops)
        piece = self._text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece


def _held(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins a stop string (it cannot be shown yet)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def check_stop(stop) -> Tuple[str, ...]:
    """``stop`` (None, a string or a list of strings) as a tuple; TextError if malformed."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise TextError(f"stop must be a non-empty string or a list of them, not {stop!r}"[:300])
    if len(items) > MAX_STOP[0] or any(len(s) > MAX_STOP[1] for s in items):
        raise TextError(f"at most {MAX_STOP[0]} stop strings of at most {MAX_STOP[1]} characters")
    return tuple(items)


__all__ = ["Tokenizer", "TextStream", "TextError", "ChatTemplate", "load_text", "check_stop", "check_messages",
           "TOKENIZER_FILE", "TOKENIZER_CONFIG_FILE"]
