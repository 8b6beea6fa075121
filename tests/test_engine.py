"""Engine behaviour on tiny random-weight models: parity with transformers,
batch invariance, prefix caching, preemption, abort, sampling and bad input."""

from __future__ import annotations

import pytest

from conftest import hf_greedy, random_prompts
from disagg.config import EngineConfig
from disagg.engine import LLMEngine
from disagg.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _engine(model_dir: str, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("block_size", 4)
    return LLMEngine(EngineConfig(model=model_dir, **kw))


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_matches_transformers(arch, tp, request):
    model_dir = request.getfixturevalue(arch)
    prompts = random_prompts(5, 256, 3, 40, seed=tp)
    expected = [hf_greedy(model_dir, p, 12, ignore_eos=True) for p in prompts]
    with _engine(model_dir, tensor_parallel_size=tp) as engine:
        outs = engine.generate(prompts, SamplingParams(max_tokens=12, **GREEDY))
    assert [o.output_token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)


def test_tp_with_replicated_kv_heads(tiny_llama):
    """TP 4 > 2 KV heads: each KV head lives on two ranks; outputs unchanged."""
    prompts = random_prompts(3, 256, 5, 30, seed=7)
    expected = [hf_greedy(tiny_llama, p, 8, ignore_eos=True) for p in prompts]
    with _engine(tiny_llama, tensor_parallel_size=4, torch_threads=1) as engine:
        outs = engine.generate(prompts, SamplingParams(max_tokens=8, **GREEDY))
    assert [o.output_token_ids for o in outs] == expected


def test_tp_ranks_ignore_a_terminal_ctrl_c(tiny_llama):
    """Ctrl-C reaches the whole process group; the ranks leave stopping to the driver
    (a node drains before it closes its engine)."""
    import os
    import signal
    prompt = random_prompts(1, 256, 5, 20, seed=9)
    params = SamplingParams(max_tokens=6, **GREEDY)
    with _engine(tiny_llama, tensor_parallel_size=2, torch_threads=1) as engine:
        for proc in engine.executor.workers.procs:
            os.kill(proc.pid, signal.SIGINT)
        outs = engine.generate(prompt, params)
        assert all(proc.is_alive() for proc in engine.executor.workers.procs)
    assert outs[0].output_token_ids == hf_greedy(tiny_llama, prompt[0], 6, ignore_eos=True)


def test_batch_invariance_with_small_chunks(tiny_llama):
    prompts = random_prompts(16, 256, 10, 60, seed=3)
    params = SamplingParams(max_tokens=10, **GREEDY)
    with _engine(tiny_llama, max_num_batched_tokens=24, max_prefill_chunk=7) as engine:
        alone = [engine.generate([p], params)[0].output_token_ids for p in prompts]
        batched = [o.output_token_ids for o in engine.generate(prompts, params)]
    assert batched == alone
    assert alone == [hf_greedy(tiny_llama, p, 10, ignore_eos=True) for p in prompts]


def test_prefix_cache_hit_skips_tokens_and_keeps_output(tiny_llama):
    shared = random_prompts(1, 256, 33, 34, seed=11)[0]          # 33 tokens
    a, b = shared + [5, 6, 7], shared + [9, 10]
    params = SamplingParams(max_tokens=8, **GREEDY)
    with _engine(tiny_llama) as engine:
        first = engine.generate([a], params)[0]
        assert first.num_cached_tokens == 0
        assert len(engine.cached_prefix(b)) == 33 // 4           # full shared blocks
        second = engine.generate([b], params)[0]
    assert second.num_cached_tokens == 32                        # 8 blocks of 4 skipped
    assert second.output_token_ids == hf_greedy(tiny_llama, b, 8, ignore_eos=True)


def test_full_prompt_cache_hit_still_samples(tiny_llama):
    prompt = random_prompts(1, 256, 16, 17, seed=5)[0]           # exactly 4 full blocks
    params = SamplingParams(max_tokens=6, **GREEDY)
    with _engine(tiny_llama) as engine:
        first = engine.generate([prompt], params)[0]
        again = engine.generate([prompt], params)[0]
    assert again.num_cached_tokens == 12                         # last block recomputed
    assert again.output_token_ids == first.output_token_ids


def test_preemption_finishes_every_request_correctly(tiny_llama):
    prompts = random_prompts(8, 256, 20, 40, seed=9)
    params = SamplingParams(max_tokens=24, **GREEDY)
    # 40 blocks of 4 tokens cannot hold 8 requests of up to 64 tokens at once.
    with _engine(tiny_llama, num_kv_blocks=40) as engine:
        outs = engine.generate(prompts, params)
        assert engine.scheduler.num_preemptions > 0
        assert engine.scheduler.blocks.pool.num_free_blocks == 40
    assert [o.output_token_ids for o in outs] == \
        [hf_greedy(tiny_llama, p, 24, ignore_eos=True) for p in prompts]
    assert all(o.finish_reason == "length" for o in outs)


def test_abort_frees_blocks_and_others_continue(tiny_llama):
    prompts = random_prompts(3, 256, 10, 20, seed=4)
    params = SamplingParams(max_tokens=20, **GREEDY)
    with _engine(tiny_llama, num_kv_blocks=64) as engine:
        rids = [engine.add_request(p, params) for p in prompts]
        engine.step()
        engine.step()
        assert engine.abort_request(rids[1])
        assert not engine.abort_request("no-such-request")
        done = {}
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = o
        assert set(done) == {rids[0], rids[2]}
        assert engine.scheduler.blocks.pool.num_free_blocks == 64
    assert done[rids[2]].output_token_ids == hf_greedy(tiny_llama, prompts[2], 20, ignore_eos=True)


def test_bad_input_raises_and_engine_keeps_serving(tiny_llama):
    with _engine(tiny_llama, max_model_len=64) as engine:
        inflight = engine.add_request([9, 8, 7, 6], SamplingParams(max_tokens=6, **GREEDY))
        engine.step()
        with pytest.raises(ValueError, match="context length"):
            engine.add_request(list(range(3, 70)), SamplingParams(max_tokens=4))
        with pytest.raises(ValueError, match="max_tokens"):
            engine.add_request([5, 6, 7], SamplingParams(max_tokens=0))
        with pytest.raises(ValueError, match="token ids"):
            engine.add_request([5, 9999], SamplingParams(max_tokens=4))
        with pytest.raises(ValueError, match="empty"):
            engine.add_request([], SamplingParams(max_tokens=4))
        with pytest.raises(ValueError, match="already in use"):
            engine.add_request([5, 6, 7], SamplingParams(max_tokens=4), request_id=inflight)
        good = engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, **GREEDY))
        done = {}
        while engine.has_unfinished():
            done.update((o.request_id, o) for o in engine.step() if o.finished)
        assert engine.scheduler.blocks.pool.num_free_blocks == 256
    assert done[good].output_token_ids == hf_greedy(tiny_llama, [5, 6, 7], 4, ignore_eos=True)
    assert done[inflight].output_token_ids == hf_greedy(tiny_llama, [9, 8, 7, 6], 6, ignore_eos=True)


def test_generation_stops_at_context_length(tiny_llama):
    with _engine(tiny_llama, max_model_len=20) as engine:
        out = engine.generate([list(range(3, 15))], SamplingParams(max_tokens=50, **GREEDY))[0]
    assert len(out.output_token_ids) == 20 - 12 and out.finish_reason == "length"


def test_tp_not_dividing_heads_is_rejected(tiny_llama):
    with pytest.raises(ValueError, match="valid TP degrees"):
        _engine(tiny_llama, tensor_parallel_size=3)


def test_unknown_model_is_rejected(tmp_path):
    with pytest.raises((ValueError, RuntimeError)):
        LLMEngine(EngineConfig(model=str(tmp_path / "nowhere")))


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_llama):
    prompt = random_prompts(1, 256, 12, 13, seed=1)[0]
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=42, ignore_eos=True)
    noise = SamplingParams(max_tokens=16, temperature=1.3, ignore_eos=True)
    with _engine(tiny_llama) as engine:
        a = engine.generate([prompt], seeded)[0].output_token_ids
        outs = engine.generate([prompt] * 4, [noise, seeded, noise, noise])
        other = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=1.0,
                                                         top_p=0.95, seed=7, ignore_eos=True))[0]
    assert outs[1].output_token_ids == a
    assert other.output_token_ids != a


def test_stop_token_ids_and_logprobs(tiny_llama):
    prompt = [5, 6, 7, 8]
    with _engine(tiny_llama) as engine:
        ref = engine.generate([prompt], SamplingParams(max_tokens=10, **GREEDY))[0].output_token_ids
        stop_at = ref[3]
        first = ref.index(stop_at)
        out = engine.generate([prompt], SamplingParams(max_tokens=10, stop_token_ids=(stop_at,),
                                                       logprobs=2, **GREEDY))[0]
        rid = engine.add_request(prompt, SamplingParams(max_tokens=3, logprobs=2, **GREEDY))
        lps = []
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id == rid:
                    lps += o.logprobs
    assert out.output_token_ids == ref[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert [lp.token_id for lp in lps] == ref[:3]
    assert all(len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in lps)


class _OpenAIPenalty:
    """transformers logits processor: OpenAI's presence/frequency formula on the
    tokens generated after ``prompt_len`` (the reference for the engine's)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        for b in range(scores.shape[0]):
            for tok in set(input_ids[b, self.prompt_len:].tolist()):
                count = input_ids[b, self.prompt_len:].tolist().count(tok)
                scores[b, tok] -= count * self.frequency + self.presence
        return scores


def _hf_greedy_processed(model_dir: str, prompt: list[int], n: int, **kw) -> list[int]:
    """transformers greedy ``generate`` with extra logits processing ``kw``."""
    import torch
    from transformers import LogitsProcessorList

    from conftest import _hf_model
    ids = torch.tensor([prompt])
    extra = kw.pop("processors", [])
    with torch.inference_mode():
        out = _hf_model(model_dir).generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
            logits_processor=LogitsProcessorList(extra), **kw)
    return out[0, len(prompt):].tolist()


def test_penalties_match_transformers_and_break_repetition(tiny_llama):
    prompts = random_prompts(6, 256, 4, 12, seed=21)
    n = 24
    with _engine(tiny_llama, max_prefill_chunk=5) as engine:
        plain = engine.generate(prompts, SamplingParams(max_tokens=n, **GREEDY))
        freq = engine.generate(prompts, SamplingParams(max_tokens=n, frequency_penalty=2.0,
                                                       presence_penalty=0.5, **GREEDY))
        rep = engine.generate(prompts, SamplingParams(max_tokens=n, repetition_penalty=1.5,
                                                      **GREEDY))
    for p, o in zip(prompts, freq):
        proc = _OpenAIPenalty(len(p), presence=0.5, frequency=2.0)
        assert o.output_token_ids == _hf_greedy_processed(tiny_llama, p, n, processors=[proc])
    for p, o in zip(prompts, rep):
        assert o.output_token_ids == _hf_greedy_processed(tiny_llama, p, n,
                                                          repetition_penalty=1.5)
    # Outputs agree until plain greedy first repeats a token; the penalty steers
    # away from (at least some of) those repetitions.
    steered = 0
    for o_plain, o_freq in zip(plain, freq):
        a, b = o_plain.output_token_ids, o_freq.output_token_ids
        j = next((j for j in range(n) if a[j] in a[:j]), None)
        if j is not None:
            assert b[:j] == a[:j]
            steered += b[j] != a[j]
    assert steered > 0


def test_strong_logit_bias_forces_a_token_and_bad_ids_are_rejected(tiny_llama):
    prompt = [5, 6, 7, 8]
    with _engine(tiny_llama) as engine:
        greedy = engine.generate([prompt], SamplingParams(max_tokens=6, logit_bias={42: 100},
                                                          **GREEDY))[0]
        sampled = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=1.0, seed=3,
                                                           logit_bias={42: 100},
                                                           ignore_eos=True))[0]
        banned = engine.generate([prompt], SamplingParams(max_tokens=6, **GREEDY))[0]
        avoid = banned.output_token_ids[0]
        other = engine.generate([prompt], SamplingParams(max_tokens=1, logit_bias={avoid: -100},
                                                         **GREEDY))[0]
        with pytest.raises(ValueError, match="logit_bias"):
            engine.add_request(prompt, SamplingParams(logit_bias={256: 1.0}))
    assert greedy.output_token_ids == [42] * 6 and sampled.output_token_ids == [42] * 6
    assert other.output_token_ids[0] != avoid
