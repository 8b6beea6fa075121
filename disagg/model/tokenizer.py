"""A model directory's tokenizer: Hugging Face ``tokenizers`` plus the chat template, no
torch and no transformers; and the model's EOS ids.

The router tokenizes and detokenizes with it; the engine uses it for text prompts,
stop strings and output text (importing transformers for its ``AutoTokenizer``
cost every node several seconds of start-up).

Loaded from a model directory's ``tokenizer.json`` (a "fast" tokenizer) and
``tokenizer_config.json``; the chat template comes from ``chat_template.jinja``
or, failing that, ``tokenizer_config.json``'s ``chat_template``. The template
is rendered the way transformers' ``apply_chat_template`` does it (a sandboxed
jinja2 environment with ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols``
extension, ``raise_exception``, ``strftime_now``, a non-escaping ``tojson``,
the named special tokens as variables) and the result tokenized without
adding special tokens, so the ids equal ``AutoTokenizer``'s. Not applied:
transformers' ``clean_up_tokenization_spaces`` (off by default; transformers
itself ignores it for BPE tokenizers).

Tokenizing a long prompt takes milliseconds, so the HTTP handlers run long
prompts through these methods in a worker thread (``router/app.py``): ``encode``
goes through ``encode_batch``, inside which ``tokenizers`` releases the GIL (plain
``Tokenizer.encode`` holds it and would freeze the event loop anyway).
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from disagg.model.embedded import MARKER, embedded_model_dir
from disagg.model.resolve import EMBEDDED_ALIASES, resolve_model_dir

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
"""The named special tokens a chat template sees as variables (as in transformers)."""


class ModelTokenizer:
    """Encode, chat-template and decode for the router and the engine (see the module
    docstring)."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None,
                 special_tokens: dict[str, str]) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens)
        self._template = _compile(chat_template) if chat_template else None
        self._token_texts: dict[int, str] = {}

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelTokenizer":
        """Load ``model_dir``'s tokenizer (ValueError when it ships no ``tokenizer.json``)."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{model_dir} has no tokenizer.json; the router needs a fast "
                             "(Hugging Face tokenizers) tokenizer")
        config = _read_json(model_dir / "tokenizer_config.json")
        specials = {**_named_tokens(_read_json(model_dir / "special_tokens_map.json")),
                    **_named_tokens(config)}
        jinja_file = model_dir / "chat_template.jinja"
        template = jinja_file.read_text() if jinja_file.is_file() else \
            _config_template(config.get("chat_template"))
        return cls(Tokenizer.from_file(str(path)), template, specials)

    # ---- encoding (call the async forms from the event loop) -------------
    def encode(self, text: str) -> list[int]:
        """``text``'s token ids, no special tokens added (``add_special_tokens=False``)."""
        return self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` (ValueError without a template;
        ``jinja2.TemplateError`` from the template itself)."""
        if self._template is None:
            raise ValueError("the model ships no chat template")
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens)

    def apply_chat_template(self, messages: list[dict],
                            add_generation_prompt: bool = True) -> list[int]:
        """The token ids of ``messages`` through the chat template."""
        return self.encode(self.render_chat(messages, add_generation_prompt))

    # ---- decoding ---------------------------------------------------------
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (as transformers' ``decode``, whose default it keeps)."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> DecodeStream:
        """A fresh incremental decoder; feed it with ``stream.step(self.tokenizer, ids)``."""
        return DecodeStream(skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's own text, special tokens kept (cached: logprobs ask often)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.decode([token_id])
        return text

    def token_to_id(self, token: str) -> int | None:
        """The id of the vocabulary entry ``token`` (None if absent)."""
        return self.tokenizer.token_to_id(token)


def load_model_tokenizer(model: str) -> ModelTokenizer:
    """The tokenizer of ``model`` (a name as ``--model`` takes it), without loading torch
    (the engine, whose model directory is ready, calls :meth:`ModelTokenizer.from_dir`).

    The embedded model is converted on its first use anywhere; if the router is
    first, the conversion (torch + transformers) runs in a child process, so
    this process never imports them.
    """
    if model.lower() in EMBEDDED_ALIASES and not (embedded_model_dir() / MARKER).is_file():
        code = "from disagg.model.embedded import ensure_embedded_model; ensure_embedded_model()"
        done = subprocess.run([sys.executable, "-c", code])
        if done.returncode != 0:
            raise RuntimeError(f"converting the embedded model failed (exit {done.returncode})")
    return ModelTokenizer.from_dir(resolve_model_dir(model))


def eos_token_ids(model_dir: Path, eos_in_config: tuple[int, ...]) -> tuple[int, ...]:
    """The EOS ids: ``config.json``'s (``eos_in_config``) and ``generation_config.json``'s,
    as transformers' generation uses them."""
    ids = set(eos_in_config)
    eos = _read_json(Path(model_dir) / "generation_config.json").get("eos_token_id")
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return tuple(sorted(ids))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _named_tokens(config: dict) -> dict[str, str]:
    """``bos_token`` etc. as strings (a config may store ``{"content": ...}``)."""
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def _config_template(value) -> str | None:
    """``tokenizer_config.json``'s ``chat_template``: a string, or named templates."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return value if isinstance(value, str) else None


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body (transformers marks
    assistant tokens with it; serving only needs the text)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _compile(template: str) -> jinja2.Template:
    """The chat template in transformers' rendering environment."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
