"""Tests for SamplingParams validation and the Sampler."""

from __future__ import annotations

import math

import pytest
import torch

from disagg.engine.sampler import Sampler, make_generator
from disagg.sampling_params import SamplingParams

VOCAB = 50


def _logits(batch: int, seed: int = 0) -> torch.Tensor:
    """Random (batch, VOCAB) logits with a wide spread."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, VOCAB, generator=g) * 3.0


def _draw(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int) -> list[int]:
    """n tokens sampled one step at a time from a single row with one generator."""
    sampler, gen = Sampler(), make_generator(seed, "cpu")
    return [sampler(logits_row[None], [params], [gen]).token_ids[0] for _ in range(n)]


# --- SamplingParams -------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", True), ("max_tokens", 1.5),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", True),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", "0.5"),
    ("top_k", -2), ("top_k", 2.0),
    ("seed", -1), ("seed", True), ("seed", 2**64),
    ("stop", 3), ("stop", ["ok", ""]), ("stop_token_ids", [1, -1]), ("stop_token_ids", 5),
    ("ignore_eos", 1), ("include_stop_str_in_output", None),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", False),
    ("presence_penalty", 2.01), ("presence_penalty", float("nan")), ("presence_penalty", "1"),
    ("frequency_penalty", -2.5), ("frequency_penalty", True),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("repetition_penalty", float("inf")),
    ("logit_bias", {-1: 1.0}), ("logit_bias", {3: 100.5}), ("logit_bias", {True: 1.0}),
    ("logit_bias", {"3": 1.0}), ("logit_bias", [[1, 2, 3]]), ("logit_bias", [(1, 1), (1, 2)]),
    ("logit_bias", 5), ("logit_bias", {3: float("nan")}),
    ("prompt_logprobs", -1), ("prompt_logprobs", 21), ("prompt_logprobs", True),
])
def test_invalid_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_stop_normalised_and_dict_round_trip():
    p = SamplingParams(stop="###", stop_token_ids=[2, 3], seed=7, logprobs=3, temperature=1)
    assert p.stop == ("###",) and p.stop_token_ids == (2, 3)
    assert isinstance(p.temperature, float)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    d = p.to_dict()
    assert d["stop"] == ["###"] and d["stop_token_ids"] == [2, 3]
    assert SamplingParams.from_dict(d) == p
    with pytest.raises(ValueError, match="bogus"):
        SamplingParams.from_dict({**d, "bogus": 1})


def test_penalty_fields_normalised_and_msgpack_round_trip():
    import msgspec
    p = SamplingParams(presence_penalty=1, frequency_penalty=-0.5, repetition_penalty=2,
                       logit_bias={7: 5, 2: -100}, prompt_logprobs=0)
    assert p.logit_bias == ((2, -100.0), (7, 5.0)) and isinstance(p.presence_penalty, float)
    assert SamplingParams(logit_bias=[[7, 5], [2, -100]]).logit_bias == p.logit_bias
    assert SamplingParams(logit_bias={}).logit_bias is None
    hash(p)                                         # stays hashable
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(p.to_dict()))
    assert wire["logit_bias"] == [[2, -100.0], [7, 5.0]]
    assert SamplingParams.from_dict(wire) == p
    assert p.has_penalties and p.needs_local_prefill
    assert not SamplingParams().has_penalties and not SamplingParams().needs_local_prefill
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(logit_bias={1: 0.5}).has_penalties


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.7, top_k=-1).greedy


# --- Sampler ----------------------------------------------------------------

def test_greedy_equals_argmax_and_ties_pick_lowest_id():
    logits = _logits(6)
    logits[0, 3] = logits[0, 17] = 100.0          # tie: argmax picks 3
    params = [SamplingParams(temperature=0)] * 6
    out = Sampler()(logits, params, [None] * 6)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.token_ids[0] == 3
    assert out.logprobs == [None] * 6


def test_same_seed_reproducible_and_independent_of_batch():
    logits = _logits(8, seed=1)
    target = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=1234)
    alone = _draw(logits[3], target, 30, seed=1234)
    assert alone == _draw(logits[3], target, 30, seed=1234)

    others = [SamplingParams(temperature=t, top_k=k, top_p=tp)
              for t, k, tp in [(0.0, 0, 1.0), (0.5, 5, 1.0), (1.3, 0, 0.5), (2.0, 0, 1.0),
                               (1.0, 40, 0.8), (0.8, -1, 1.0), (1.0, 0, 1.0)]]
    params = others[:3] + [target] + others[3:]
    gens = [make_generator(100 + i, "cpu") for i in range(8)]
    gens[3] = make_generator(1234, "cpu")
    sampler = Sampler()
    in_batch = [sampler(logits, params, gens).token_ids[3] for _ in range(30)]
    assert in_batch == alone


def test_different_seeds_differ():
    row = torch.zeros(VOCAB)                      # uniform: draws vary a lot
    p = SamplingParams(temperature=1.0)
    assert _draw(row, p, 20, seed=1) != _draw(row, p, 20, seed=2)


def test_top_k_one_equals_greedy():
    logits = _logits(5, seed=2)
    params = [SamplingParams(temperature=1.5, top_k=1)] * 5
    gens = [make_generator(i, "cpu") for i in range(5)]
    assert Sampler()(logits, params, gens).token_ids == logits.argmax(-1).tolist()


def test_top_k_restricts_support():
    row = torch.linspace(0.0, 1.0, VOCAB)         # nearly flat: all ids likely otherwise
    draws = _draw(row, SamplingParams(temperature=1.0, top_k=4), 400, seed=3)
    allowed = set(torch.topk(row, 4).indices.tolist())
    assert set(draws) == allowed


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    row = probs.log()
    draws = _draw(row, SamplingParams(temperature=1.0, top_p=0.75), 400, seed=4)
    assert set(draws) == {0, 1}                   # 0.5 < 0.75 <= 0.8


def test_tiny_top_p_and_tiny_temperature_give_argmax():
    logits = _logits(4, seed=5)
    gens = [make_generator(i, "cpu") for i in range(4)]
    expected = logits.argmax(-1).tolist()
    sampler = Sampler()
    for p in (SamplingParams(top_p=1e-6), SamplingParams(top_p=5e-324), SamplingParams(temperature=1e-3),
              SamplingParams(temperature=1e-7)):
        for _ in range(20):
            assert sampler(logits, [p] * 4, gens).token_ids == expected


def test_logprobs_are_raw_log_softmax():
    logits = _logits(3, seed=6)
    params = [SamplingParams(temperature=0.5, logprobs=5, seed=1),
              SamplingParams(temperature=0, logprobs=0),
              SamplingParams(temperature=2.0)]
    gens = [make_generator(1, "cpu"), None, make_generator(2, "cpu")]
    out = Sampler()(logits, params, gens)
    ref = torch.log_softmax(logits, dim=-1)
    for i in (0, 1):
        lp = out.logprobs[i]
        assert lp.token_id == out.token_ids[i]
        assert math.isclose(lp.logprob, ref[i, lp.token_id].item(), abs_tol=1e-5)
    assert out.logprobs[1].top == [] and out.logprobs[2] is None
    top = out.logprobs[0].top
    assert len(top) == 5
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert [t for t, _ in top] == torch.topk(ref[0], 5).indices.tolist()
    for t, v in top:
        assert math.isclose(v, ref[0, t].item(), abs_tol=1e-5)


def test_empirical_frequencies_match_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    draws = _draw(probs.log(), SamplingParams(temperature=1.0), 4000, seed=7)
    counts = torch.bincount(torch.tensor(draws), minlength=3).float() / 4000
    # 4000 draws: standard error <= 0.008, so 0.03 is about 4 sigma.
    assert torch.allclose(counts, probs, atol=0.03), counts


def test_bad_inputs_raise_value_error():
    sampler = Sampler()
    with pytest.raises(ValueError, match="one SamplingParams"):
        sampler(_logits(2), [SamplingParams()], [None, None])
    with pytest.raises(ValueError, match="2-D"):
        sampler(torch.zeros(VOCAB), [SamplingParams()], [None])
    bad = _logits(2)
    bad[1] = float("-inf")
    with pytest.raises(ValueError, match=r"\[1\]"):
        sampler(bad, [SamplingParams()] * 2, [None, None])


def test_make_generator_seeded_and_unseeded():
    a = torch.rand(4, generator=make_generator(9, "cpu"))
    b = torch.rand(4, generator=make_generator(9, "cpu"))
    assert torch.equal(a, b)
    c = torch.rand(4, generator=make_generator(None, "cpu"))
    d = torch.rand(4, generator=make_generator(None, "cpu"))
    assert not torch.equal(c, d)
