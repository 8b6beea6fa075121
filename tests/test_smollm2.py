"""The embedded SmolLM2-135M-Instruct: greedy output token-identical to
transformers ``generate`` at TP 1 and TP 3, stop strings, chat prompts."""

from __future__ import annotations

import functools

import pytest

from conftest import hf_greedy, needs_smollm2
from disagg.config import EngineConfig
from disagg.engine import LLMEngine
from disagg.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, needs_smollm2]

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
                                cpu_kernels=kernels, dtype="float32")) as engine:
        outs = engine.generate([list(p) for p in prompts],
                               SamplingParams(max_tokens=32, temperature=0.0))
    ops.use_cpu_kernels(True)
    assert [tuple(o.output_token_ids) for o in outs] == list(expected)


def test_smollm2_text_prompt_and_stop_string(smollm2_dir):
    with LLMEngine(EngineConfig(model=smollm2_dir)) as engine:
        full = engine.generate(["The capital of France is"],
                               SamplingParams(max_tokens=24, temperature=0.0))[0]
        assert full.text and full.finish_reason in ("length", "stop")
        words = full.text.split()
        stop = words[2] if len(words) > 2 else words[-1]
        cut = engine.generate(["The capital of France is"],
                              SamplingParams(max_tokens=24, temperature=0.0, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert stop not in cut.text and full.text.startswith(cut.text)
