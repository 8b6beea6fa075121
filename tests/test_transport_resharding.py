"""Head mapping between prefill TP p and decode TP d (transport.resharding)."""

from __future__ import annotations

import pytest
import torch

from disagg.model.config import ModelConfig
from transport.resharding import ReshardPlan, gather_heads, kv_heads_of_rank, scatter_heads

PAIRS = [(1, 1), (2, 1), (1, 2), (3, 1), (1, 3), (9, 3), (1, 9), (3, 9), (2, 4), (4, 2), (4, 1)]


def _valid(k: int, tp: int) -> bool:
    return (k % tp == 0) if tp <= k else (tp % k == 0)


def _cases():
    for k in (2, 3, 4):
        for p, d in PAIRS:
            if _valid(k, p) and _valid(k, d):
                yield k, p, d


def _model(num_kv_heads: int) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", hidden_size=36 * 8, num_layers=1,
                       num_heads=36, num_kv_heads=num_kv_heads, head_dim=8, intermediate_size=8,
                       vocab_size=8, rms_norm_eps=1e-6)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_ownership_matches_model_config(k):
    cfg = _model(k)
    for tp in cfg.valid_tp_sizes():
        for r in range(tp):
            assert kv_heads_of_rank(k, tp, r) == cfg.kv_head_for_rank(r, tp)
            assert len(kv_heads_of_rank(k, tp, r)) == cfg.num_kv_heads_per_rank(tp)


@pytest.mark.parametrize("k,p,d", list(_cases()))
def test_every_decode_rank_gets_exactly_its_heads_once(k, p, d):
    plan = ReshardPlan(k, p, d)
    for q in range(d):
        want = kv_heads_of_rank(k, d, q)
        got = []                                    # (global head, dst local)
        for r in range(p):
            src_heads = kv_heads_of_rank(k, p, r)
            for s, t in plan.pairs(r, q):
                got.append((src_heads[s], t))
        assert sorted(got) == [(g, j) for j, g in enumerate(want)]      # each exactly once
        # replicated heads come from the lowest prefill rank holding them
        for src in plan.sources[q]:
            assert src.src_rank == min(r for r in range(p) if src.head in kv_heads_of_rank(k, p, r))
    # a head is sent to a decode rank by exactly one prefill rank
    total = sum(len(plan.pairs(r, q)) for r in range(p) for q in range(d))
    assert total == sum(len(kv_heads_of_rank(k, d, q)) for q in range(d))


def test_worked_examples_from_the_docstring():
    assert ReshardPlan(3, 3, 1).pairs(2, 0) == [(0, 2)]
    assert ReshardPlan(3, 1, 3).pairs(0, 1) == [(1, 0)]
    plan = ReshardPlan(3, 9, 3)
    assert [plan.src_ranks(q) for q in range(3)] == [[0], [3], [6]]
    assert [r for r in range(9) if plan.dst_ranks(r)] == [0, 3, 6]
    plan = ReshardPlan(3, 1, 9)
    assert [plan.pairs(0, q) for q in range(9)] == [[(q // 3, 0)] for q in range(9)]


def test_bad_tp_degrees_raise():
    with pytest.raises(ValueError, match="does not fit"):
        ReshardPlan(3, 2, 1)
    with pytest.raises(ValueError):
        ReshardPlan(4, 1, 3)
    with pytest.raises(ValueError, match="outside"):
        ReshardPlan(2, 1, 2).pairs(1, 0)


@pytest.mark.parametrize("k,p,d", [(3, 3, 1), (3, 1, 3), (2, 2, 4), (4, 4, 2)])
def test_gather_scatter_reassembles_global_heads(k, p, d):
    """Simulated p → d move through the gather/scatter helpers is exact."""
    torch.manual_seed(0)
    full = torch.randn(6, 2, k, 4, 8)                                 # global heads
    src = [full[:, :, list(kv_heads_of_rank(k, p, r))].contiguous() for r in range(p)]
    dst = [torch.zeros(6, 2, len(kv_heads_of_rank(k, d, q)), 4, 8) for q in range(d)]
    plan = ReshardPlan(k, p, d)
    for r in range(p):
        for q in plan.dst_ranks(r):
            pairs = plan.pairs(r, q)
            blocks = gather_heads(src[r], [5, 1, 2], [s for s, _ in pairs])
            scatter_heads(dst[q], [0, 3, 4], [t for _, t in pairs], blocks)
    for q in range(d):
        want = full[[5, 1, 2]][:, :, list(kv_heads_of_rank(k, d, q))]
        assert torch.equal(dst[q][[0, 3, 4]], want)
        assert not dst[q][[1, 2, 5]].any()
