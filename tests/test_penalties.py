"""Penalties and logit_bias in the sampler, against reference implementations:
transformers' ``RepetitionPenaltyLogitsProcessor`` and a plain-Python loop of
OpenAI's documented formula (presence/frequency penalty, logit_bias)."""

from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from disagg.engine.penalties import TokenHistory, apply_penalties
from disagg.engine.sampler import Sampler, make_generator
from disagg.sampling_params import SamplingParams

VOCAB = 40


def _case(seed: int, batch: int = 6):
    """Random logits (batch, VOCAB) and histories with many repeated tokens."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, VOCAB, generator=g) * 4.0
    hist = []
    for _ in range(batch):
        n_prompt, n_out = torch.randint(1, 15, (2,), generator=g).tolist()
        ids = torch.randint(0, VOCAB // 2, (n_prompt + n_out - 1,), generator=g).tolist()
        hist.append(TokenHistory(ids, n_prompt))
    return logits, hist, g


def _openai_reference(row: list[float], output: list[int], p: SamplingParams) -> list[float]:
    """OpenAI's formula, one token at a time:
    mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty + bias[j]."""
    out = list(row)
    for j in range(len(out)):
        c = output.count(j)
        out[j] -= c * p.frequency_penalty + (1.0 if c > 0 else 0.0) * p.presence_penalty
    for tid, b in p.logit_bias or ():
        out[tid] += b
    return out


@pytest.mark.parametrize("seed", range(8))
def test_repetition_penalty_matches_transformers(seed):
    logits, hist, g = _case(seed)
    penalties = (torch.rand(len(hist), generator=g) * 2.5 + 0.2).tolist()
    params = [SamplingParams(temperature=0, repetition_penalty=r) for r in penalties]
    got = apply_penalties(logits, params, hist)
    for i, (h, r) in enumerate(zip(hist, penalties)):
        ids = torch.tensor([list(h.token_ids)])
        ref = RepetitionPenaltyLogitsProcessor(r)(ids, logits[i:i + 1].clone())[0]
        torch.testing.assert_close(got[i], ref, rtol=1e-6, atol=1e-6)
    out = Sampler()(logits, params, [None] * len(params), hist)
    assert out.token_ids == got.argmax(-1).tolist()


@pytest.mark.parametrize("seed", range(8))
def test_presence_frequency_and_bias_match_openai_formula(seed):
    logits, hist, g = _case(seed)
    params = []
    for _ in hist:
        pres, freq = (torch.rand(2, generator=g) * 4 - 2).tolist()
        ids = torch.randperm(VOCAB, generator=g)[:3].tolist()
        bias = dict(zip(ids, (torch.rand(3, generator=g) * 20 - 10).tolist()))
        params.append(SamplingParams(temperature=0, presence_penalty=pres,
                                     frequency_penalty=freq, logit_bias=bias))
    got = apply_penalties(logits, params, hist)
    for i, (h, p) in enumerate(zip(hist, params)):
        ref = _openai_reference(logits[i].tolist(), list(h.output), p)
        torch.testing.assert_close(got[i], torch.tensor(ref), rtol=1e-5, atol=1e-5)


def test_all_penalties_compose_in_order_and_other_rows_are_untouched():
    logits, hist, _ = _case(100, batch=4)
    p = SamplingParams(temperature=0, repetition_penalty=1.7, presence_penalty=0.5,
                       frequency_penalty=0.3, logit_bias={1: 3.0, 5: -2.0})
    params = [SamplingParams(temperature=0), p, SamplingParams(temperature=0.8), p]
    got = apply_penalties(logits, params, [None, hist[1], None, hist[3]])
    for i in (1, 3):
        ids = torch.tensor([list(hist[i].token_ids)])
        rep = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits[i:i + 1].clone())[0]
        ref = _openai_reference(rep.tolist(), list(hist[i].output), p)
        torch.testing.assert_close(got[i], torch.tensor(ref), rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2])


def test_rows_without_penalties_cost_nothing():
    logits = torch.randn(3, VOCAB)
    params = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(logprobs=2)]
    assert apply_penalties(logits, params, None) is logits    # no copy, no history needed


def test_greedy_and_sampled_rows_honour_bias_but_logprobs_stay_raw():
    logits = torch.zeros(2, VOCAB)
    logits[:, 3] = 10.0
    bias = {17: 100.0}
    params = [SamplingParams(temperature=0, logit_bias=bias, logprobs=1),
              SamplingParams(temperature=1.0, logit_bias=bias, logprobs=1)]
    hist = [TokenHistory([3, 4], 2)] * 2
    gens = [None, make_generator(0, "cpu")]
    raw = torch.log_softmax(logits, dim=-1)
    for _ in range(20):
        out = Sampler()(logits, params, gens, hist)
        assert out.token_ids == [17, 17]
        for i, lp in enumerate(out.logprobs):
            assert lp.logprob == pytest.approx(raw[i, 17].item())
            assert lp.top[0][0] == 3                           # raw argmax, not the biased one


def test_repetition_counts_prompt_but_frequency_only_output():
    logits = torch.full((2, VOCAB), 2.0)
    hist = [TokenHistory([7, 7, 8], 2)] * 2                    # prompt 7 7, output 8
    rep = apply_penalties(logits, [SamplingParams(repetition_penalty=2.0)] * 2, hist)
    assert rep[0, 7] == rep[0, 8] == 1.0 and rep[0, 9] == 2.0
    freq = apply_penalties(logits, [SamplingParams(frequency_penalty=1.0)] * 2, hist)
    assert freq[0, 7] == 2.0 and freq[0, 8] == 1.0


def test_bad_histories_and_ids_raise():
    logits = torch.randn(2, VOCAB)
    p = SamplingParams(presence_penalty=1.0)
    with pytest.raises(ValueError, match="TokenHistory"):
        apply_penalties(logits, [p, p], None)
    with pytest.raises(ValueError, match="TokenHistory"):
        apply_penalties(logits, [p, p], [TokenHistory([1], 1), None])
    with pytest.raises(ValueError, match="output token ids"):
        apply_penalties(logits, [p, p], [TokenHistory([1, VOCAB], 1)] * 2)
    with pytest.raises(ValueError, match="logit_bias"):
        apply_penalties(logits, [SamplingParams(logit_bias={VOCAB: 1.0})] * 2,
                        [TokenHistory([1], 1)] * 2)


@pytest.mark.parametrize("penalty", [5e-324, 1e-300, 1e300, 1.7e308])
def test_extreme_repetition_penalties_keep_logits_finite_and_sample(penalty):
    # found by schemathesis: 5e-324 is a valid double > 0 but 0 in float32; the division
    # made inf logits, the softmax NaN, and the sampler's error killed the decode node
    logits = torch.randn(2, VOCAB) * 4.0
    logits[:, 0] = 0.0                                          # 0 * inf would be NaN
    hist = [TokenHistory([0, 5, 6, 7], 2)] * 2
    params = [SamplingParams(repetition_penalty=penalty, temperature=0),
              SamplingParams(repetition_penalty=penalty, temperature=1.0, top_p=0.9)]
    out = apply_penalties(logits, params, hist)
    assert torch.isfinite(out).all()
    sampled = Sampler()(logits, params, [None, make_generator(0, "cpu")], hist)
    assert all(0 <= t < VOCAB for t in sampled.token_ids)
