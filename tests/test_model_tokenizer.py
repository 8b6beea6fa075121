"""The router's torch-free tokenizer: the same ids as transformers' AutoTokenizer (text and
chat templates), tokenizing off the event loop, and a router process without torch."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jinja2
import pytest

from disagg.model.tokenizer import ModelTokenizer

TEXTS = ["Hello, world!", "  leading and trailing spaces  ", "naïve café costs 5€ — ok",
         "日本語のテキスト", "emoji 🎉🚀👩‍👩‍👧 and flags 🇫🇷", "tabs\tand\nnewlines\r\n",
         "special tokens inline: <|im_start|>user\nhi<|im_end|>", "", "a" * 300,
         "def f(x):\n    return x ** 2  # code"]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one, in 日本語 with an emoji 🎨?"}],
    [{"role": "user", "content": "first"}, {"role": "assistant", "content": "second"},
     {"role": "user", "content": "third"}, {"role": "assistant", "content": "fourth"}],
]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return ModelTokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    for skip in (False, True):
        assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.decode(ids) == hf.decode(ids)                        # the same default


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf, chat, add_generation_prompt):
    assert tok.render_chat(chat, add_generation_prompt) == hf.apply_chat_template(
        chat, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    want = hf.apply_chat_template(chat, add_generation_prompt=add_generation_prompt,
                                  tokenize=True)
    assert ids == list(want["input_ids"] if hasattr(want, "keys") else want)


# Exercises what transformers' environment adds: named special tokens as variables,
# raise_exception, a non-escaping tojson, loop controls and trimmed blocks.
TEMPLATE = """{{ bos_token }}{% for m in messages %}
  {% if m['role'] not in ['user', 'assistant'] %}
{{ raise_exception('bad role ' + m['role']) }}
  {% endif %}
  {% if m['content'] == 'skip' %}{% continue %}{% endif %}
  <{{ m['role'] }}>{{ m['content'] | tojson }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}"""


@pytest.fixture(scope="module")
def custom_dir(smollm2_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("custom-template")
    shutil.copy(Path(smollm2_dir) / "tokenizer.json", d / "tokenizer.json")
    config = json.loads((Path(smollm2_dir) / "tokenizer_config.json").read_text())
    config["bos_token"] = {"__type": "AddedToken", "content": "<|endoftext|>",  # older form
                           "lstrip": False, "rstrip": False, "normalized": False,
                           "single_word": False, "special": True}
    config["chat_template"] = TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def test_template_from_tokenizer_config_renders_like_transformers(custom_dir):
    from transformers import AutoTokenizer
    mine, hf = ModelTokenizer.from_dir(custom_dir), AutoTokenizer.from_pretrained(custom_dir)
    chat = [{"role": "user", "content": 'say "<b>" & 日本'},
            {"role": "assistant", "content": "skip"}, {"role": "user", "content": "end"}]
    text = mine.render_chat(chat)
    assert text == hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|endoftext|>") and '"say \\"<b>\\" & 日本"' in text
    assert "skip" not in text
    want = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    assert mine.apply_chat_template(chat) == list(want["input_ids"] if hasattr(want, "keys")
                                                  else want)
    with pytest.raises(jinja2.TemplateError, match="bad role tool"):
        mine.apply_chat_template([{"role": "tool", "content": "x"}])


def test_without_a_template_or_tokenizer(custom_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((custom_dir / "tokenizer.json").read_bytes())
    bare = ModelTokenizer.from_dir(tmp_path)
    assert bare.chat_template is None and bare.special_tokens == {}
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="no tokenizer.json"):
        ModelTokenizer.from_dir(tmp_path / "missing")


def test_tokenizing_in_a_thread_leaves_the_event_loop_free(tok):
    """A long prompt tokenizes in a worker thread (as router/app.py does for long
    prompts) while the loop keeps ticking (plain ``Tokenizer.encode`` would hold the
    GIL and freeze the loop meanwhile)."""
    text = "The café costs 5€ — naïve 日本語 🎉 done. " * 3000

    async def main():
        ticks = 0
        task = asyncio.ensure_future(asyncio.to_thread(tok.encode, text))
        t0 = time.monotonic()
        while not task.done():
            await asyncio.sleep(0.001)
            ticks += 1
        elapsed = time.monotonic() - t0
        chat = await asyncio.to_thread(tok.apply_chat_template, CHATS[1])
        return await task, ticks, elapsed, chat

    ids, ticks, elapsed, chat = asyncio.run(main())
    assert ids == tok.encode(text) and chat == tok.apply_chat_template(CHATS[1])
    # one tick per ~1 ms sleep while encoding; a blocked loop manages one or two in total
    assert elapsed > 0.02 and ticks >= elapsed / 0.001 / 10, (ticks, elapsed)


ROUTER_PROCESS = """
import sys
from prometheus_client import CollectorRegistry
from disagg.model.resolve import served_model_name
from router.app import create_app
from router.detokenizer import OutputText
from router.dispatch import Dispatcher
from router.launch import serve_router
from router.metrics import RouterMetrics
from router.nodes import NodeRegistry
from router.policy import make_policy
from disagg.model.tokenizer import load_model_tokenizer

tok = load_model_tokenizer("default")
registry = CollectorRegistry()
name = served_model_name("default")
dispatcher = Dispatcher(NodeRegistry(name, 3.0), make_policy("local"), RouterMetrics(registry),
                        "tcp://127.0.0.1:*")
app = create_app(dispatcher, registry, tok, name)
ids = tok.apply_chat_template([{"role": "user", "content": "hi 🎉"}]) + tok.encode("héllo")
out = OutputText(tok, ("STOP",))
text = "".join(out.add([i]) for i in ids) + out.finish(None)
assert text == tok.decode(ids, skip_special_tokens=True), text
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")
                or m.startswith(("disagg.engine", "disagg.model.loader")))
print("LOADED", loaded)
"""


def test_router_process_loads_no_torch(smollm2_dir):
    """Building the router (tokenizer, dispatcher, app) imports neither torch nor
    transformers nor the engine."""
    done = subprocess.run([sys.executable, "-c", ROUTER_PROCESS], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED []" in done.stdout, done.stdout[-3000:]
