"""The embedded SmolLM2-135M-Instruct: greedy output token-identical to
transformers ``generate`` at TP 1 and TP 3, stop strings, chat prompts, output text
as transformers decodes it from an engine that never imports transformers."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest

from conftest import hf_greedy, needs_smollm2
from disagg.config import EngineConfig
from disagg.engine import LLMEngine
from disagg.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, needs_smollm2]

KV = "64MiB"            # per rank; the default (a share of the machine) takes seconds to fill

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List three primary colors:",
    "Translate to French: I would like a cup of coffee, please.",
    "In 1969, the first humans landed on the Moon. The mission was called",
    "Q: What is 12 times 7?\nA:",
    ("Large language models are trained on vast amounts of text. They learn statistical "
     "patterns of language, which lets them complete sentences, answer questions, write "
     "code and summarise documents. However, they can also produce confident mistakes, "
     "which is why evaluation matters. One common way to evaluate them is"),
]


@functools.lru_cache(maxsize=None)
def _expected(model_dir: str) -> tuple:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    return tuple(map(tuple, ids)), tuple(tuple(hf_greedy(model_dir, p, 32)) for p in ids)


@pytest.mark.parametrize("tp,kernels", [(1, True), (3, True), (1, False)],
                         ids=["tp1", "tp3", "tp1-reference-path"])
def test_smollm2_greedy_matches_transformers(smollm2_dir, tp, kernels):
    """float32 on the C++ CPU kernels (default) and on the PyTorch reference path."""
    from disagg.kernels import ops
    prompts, expected = _expected(smollm2_dir)
    with LLMEngine(EngineConfig(model=smollm2_dir, tensor_parallel_size=tp,
                                cpu_kernels=kernels, dtype="float32",
                                kv_cache_memory=KV)) as engine:
        outs = engine.generate([list(p) for p in prompts],
                               SamplingParams(max_tokens=32, temperature=0.0))
    ops.use_cpu_kernels(True)
    assert [tuple(o.output_token_ids) for o in outs] == list(expected)


def test_smollm2_text_prompt_and_stop_string(smollm2_dir):
    with LLMEngine(EngineConfig(model=smollm2_dir, kv_cache_memory=KV)) as engine:
        full = engine.generate(["The capital of France is"],
                               SamplingParams(max_tokens=24, temperature=0.0))[0]
        assert full.text and full.finish_reason in ("length", "stop")
        words = full.text.split()
        stop = words[2] if len(words) > 2 else words[-1]
        cut = engine.generate(["The capital of France is"],
                              SamplingParams(max_tokens=24, temperature=0.0, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert stop not in cut.text and full.text.startswith(cut.text)


def test_engine_text_is_transformers_text_without_importing_transformers(smollm2_dir):
    """The engine tokenizes and detokenizes with ``tokenizers`` (``ModelTokenizer``): the
    prompt's ids and the output text equal ``AutoTokenizer``'s, and the engine's process
    never imports transformers (seconds of every node's start-up)."""
    from transformers import AutoTokenizer
    prompt = "Q: What is 12 times 7?\nA: <|im_end|> caf\u00e9 \u2014 \U0001F600"
    code = f"""
import json, sys
from disagg.config import EngineConfig
from disagg.engine import LLMEngine
from disagg.sampling_params import SamplingParams
with LLMEngine(EngineConfig(model={smollm2_dir!r}, kv_cache_memory="16MiB")) as e:
    out = e.generate([{prompt!r}], SamplingParams(max_tokens=24, temperature=0.0,
                                                  ignore_eos=True, stop=("zzzz",)))[0]
    ids = e.tokenizer.encode({prompt!r})
print(json.dumps({{"prompt": ids, "num_prompt": out.num_prompt_tokens, "ids": out.output_token_ids,
                  "text": out.text, "loaded": sorted(m for m in sys.modules
                                                     if m.split(".")[0] == "transformers")}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert got["prompt"] == tok.encode(prompt, add_special_tokens=False)
    assert got["num_prompt"] == len(got["prompt"])
    assert len(got["ids"]) == 24
    assert got["text"] == tok.decode(got["ids"], skip_special_tokens=True)
