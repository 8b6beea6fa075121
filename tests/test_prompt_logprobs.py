"""Prompt logprobs against transformers' forward pass (float32 log-softmax):
chunked prefill, a shared cached prefix, mixed batches, preemption, TP 2."""

from __future__ import annotations

import pytest
import torch

from conftest import _hf_model, random_prompts
from disagg.config import EngineConfig
from disagg.engine import LLMEngine
from disagg.engine.request import KVMode
from disagg.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _engine(model_dir: str, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("block_size", 4)
    return LLMEngine(EngineConfig(model=model_dir, **kw))


def _hf_logprobs(model_dir: str, prompt: list[int]) -> torch.Tensor:
    """(len(prompt), vocab) log-softmax of transformers' logits at each position."""
    with torch.inference_mode():
        logits = _hf_model(model_dir)(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _check(model_dir: str, prompt: list[int], entries: list, k: int) -> None:
    """Entry i (i >= 1) is prompt[i]'s logprob given prompt[:i], plus the top k."""
    ref = _hf_logprobs(model_dir, prompt)
    assert len(entries) == len(prompt) and entries[0] is None
    for i in range(1, len(prompt)):
        e = entries[i]
        assert e.token_id == prompt[i]
        assert e.logprob == pytest.approx(ref[i - 1, prompt[i]].item(), abs=1e-4)
        vals, ids = torch.topk(ref[i - 1], k)
        assert [t for t, _ in e.top] == ids.tolist()
        assert [v for _, v in e.top] == pytest.approx(vals.tolist(), abs=1e-4)


def _run(engine: LLMEngine, prompts, params) -> dict[str, list]:
    """Step to completion; every output of each request, in order."""
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    seen: dict[str, list] = {r: [] for r in rids}
    while engine.has_unfinished():
        for o in engine.step():
            seen[o.request_id].append(o)
    return [seen[r] for r in rids]


def test_chunked_prefill_in_a_mixed_batch_matches_transformers(tiny_llama):
    long, short, plain = random_prompts(3, 256, 30, 45, seed=31)
    params = [SamplingParams(max_tokens=4, prompt_logprobs=5, **GREEDY),
              SamplingParams(max_tokens=4, prompt_logprobs=0, **GREEDY),
              SamplingParams(max_tokens=4, **GREEDY)]
    with _engine(tiny_llama, max_num_batched_tokens=16, max_prefill_chunk=7) as engine:
        outs = _run(engine, [long, short[:9], plain], params)
        alone = engine.generate([long], SamplingParams(max_tokens=4, **GREEDY))[0]
    _check(tiny_llama, long, outs[0][0].prompt_logprobs, 5)
    _check(tiny_llama, short[:9], outs[1][0].prompt_logprobs, 0)
    assert all(o.prompt_logprobs is None for o in outs[2])
    assert all(o.prompt_logprobs is None for out in outs[:2] for o in out[1:])   # first only
    assert outs[0][-1].output_token_ids == alone.output_token_ids


def test_cached_prefix_is_recomputed_for_prompt_logprobs(tiny_llama):
    shared = random_prompts(1, 256, 33, 34, seed=12)[0]
    a, b, c = shared + [5, 6], shared + [9, 10, 11], shared + [12]
    with _engine(tiny_llama, max_prefill_chunk=8) as engine:
        engine.generate([a], SamplingParams(max_tokens=2, **GREEDY))
        out_b = engine.generate([b], SamplingParams(max_tokens=2, prompt_logprobs=3, **GREEDY))[0]
        out_c = engine.generate([c], SamplingParams(max_tokens=2, **GREEDY))[0]
    assert out_b.num_cached_tokens == 0                  # no reuse: every position computed
    _check(tiny_llama, b, out_b.prompt_logprobs, 3)
    assert out_c.num_cached_tokens == 32                 # the cache itself still works


def test_preempted_requests_still_get_exact_prompt_logprobs(tiny_llama):
    prompts = random_prompts(6, 256, 20, 40, seed=13)
    params = SamplingParams(max_tokens=20, prompt_logprobs=2, **GREEDY)
    with _engine(tiny_llama, num_kv_blocks=36, max_prefill_chunk=6) as engine:
        outs = _run(engine, prompts, [params] * len(prompts))
        assert engine.scheduler.num_preemptions > 0
    for p, out in zip(prompts, outs):
        assert sum(o.prompt_logprobs is not None for o in out) == 1
        _check(tiny_llama, p, out[0].prompt_logprobs, 2)


def test_one_token_prompt_and_tensor_parallel(tiny_llama):
    prompt = random_prompts(1, 256, 14, 15, seed=14)[0]
    with _engine(tiny_llama, tensor_parallel_size=2, max_prefill_chunk=5) as engine:
        one, many = engine.generate([[7], prompt],
                                    SamplingParams(max_tokens=2, prompt_logprobs=4, **GREEDY))
    assert one.prompt_logprobs == [None]
    _check(tiny_llama, prompt, many.prompt_logprobs, 4)


def test_remote_kv_load_is_rejected(tiny_llama):
    params = SamplingParams(max_tokens=2, prompt_logprobs=1)
    assert params.needs_local_prefill
    with _engine(tiny_llama) as engine:
        with pytest.raises(ValueError, match="prompt_logprobs"):
            engine.add_request([5, 6, 7], params, kv_mode=KVMode.LOAD_REMOTE)
        assert not engine.has_unfinished()


def test_generate_keeps_prompt_logprobs_and_all_logprobs(tiny_llama):
    prompt = random_prompts(1, 256, 10, 11, seed=15)[0]
    with _engine(tiny_llama) as engine:
        out = engine.generate([prompt], SamplingParams(max_tokens=3, logprobs=1, prompt_logprobs=1,
                                                       **GREEDY))[0]
    _check(tiny_llama, prompt, out.prompt_logprobs, 1)
    assert [lp.token_id for lp in out.logprobs] == out.output_token_ids
