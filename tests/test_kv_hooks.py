"""The role hooks: prefill-only with pinned blocks, KV filled from outside,
prefix look-up. The data plane here is a plain tensor copy between two
engines in one process; the transport issue replaces it with real links."""

from __future__ import annotations

import time

import pytest

from conftest import random_prompts, run_until_finished
from disagg.config import EngineConfig
from disagg.engine import LLMEngine
from disagg.engine.request import KVMode
from disagg.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def test_prefill_export_then_remote_decode_matches_single_engine(tiny_llama):
    prompt = random_prompts(1, 256, 30, 31, seed=21)[0]             # 30 tokens, 7.5 blocks
    cfg = dict(model=tiny_llama, block_size=4, num_kv_blocks=64)
    with LLMEngine(EngineConfig(**cfg)) as single:
        expected = single.generate([prompt], PARAMS)[0].output_token_ids

    with LLMEngine(EngineConfig(role="prefill", **cfg)) as p, \
            LLMEngine(EngineConfig(role="decode", **cfg)) as d:
        d.generate([prompt[:17] + [3]], PARAMS)                     # d now caches 4 leading blocks
        assert len(d.cached_prefix(prompt)) == 4

        prid = p.add_request(prompt, PARAMS, kv_mode=KVMode.PREFILL_ONLY)
        exported = run_until_finished(p, prid)
        exp = exported.kv_export
        assert exp is not None and exp.num_tokens == 30 and len(exp.block_ids) == 8
        assert len(exp.block_hashes) == 7 and exp.first_token_id == expected[0]
        assert p.scheduler.blocks.pool.num_free_blocks == 64 - 8     # pinned

        drid = d.add_request(prompt, PARAMS, kv_mode=KVMode.LOAD_REMOTE)
        target = next(o.kv_load for o in d.step() if o.request_id == drid)
        assert target.num_local_tokens == 16
        skip = target.num_local_tokens // 4
        moved = 0
        for src_layer, dst_layer in zip(p.executor.kv_caches, d.executor.kv_caches):
            for s, t in zip(exp.block_ids[skip:], target.block_ids[skip:]):
                dst_layer[t].copy_(src_layer[s])
                moved += 1
        assert moved == (8 - 4) * len(p.executor.kv_caches)                   # only missing blocks
        assert d.step() == []                                        # still waiting for KV
        d.notify_kv_ready(drid, exp.first_token_id)
        assert p.release_kv(prid) and not p.release_kv(prid)
        assert p.scheduler.blocks.pool.num_free_blocks == 64
        out = run_until_finished(d, drid)
    assert out.output_token_ids == expected


def test_abort_while_waiting_for_kv_frees_blocks(tiny_llama):
    with LLMEngine(EngineConfig(model=tiny_llama, block_size=4, num_kv_blocks=32)) as d:
        rid = d.add_request(list(range(3, 23)), PARAMS, kv_mode=KVMode.LOAD_REMOTE)
        d.step()
        assert d.scheduler.blocks.pool.num_free_blocks == 32 - 5
        assert d.abort_request(rid)
        assert d.scheduler.blocks.pool.num_free_blocks == 32
        assert not d.has_unfinished()


def test_prefill_role_defaults_to_prefill_only(tiny_llama):
    cfg = EngineConfig(model=tiny_llama, role="prefill", block_size=4, num_kv_blocks=32)
    with LLMEngine(cfg) as p:
        out = p.generate([list(range(3, 13))], PARAMS)[0]
        assert out.kv_export is not None and len(out.output_token_ids) == 1
        assert out.kv_export.first_token_id == out.output_token_ids[0]
        assert p.scheduler.blocks.pool.num_free_blocks == 32 - 3
        assert p.release_kv(out.request_id)
        assert p.scheduler.blocks.pool.num_free_blocks == 32


def test_kv_load_timeout_falls_back_to_local_prefill(tiny_llama):
    prompt = random_prompts(1, 256, 22, 23, seed=5)[0]
    cfg = dict(model=tiny_llama, block_size=4, num_kv_blocks=32)
    with LLMEngine(EngineConfig(**cfg)) as single:
        expected = single.generate([prompt], PARAMS)[0].output_token_ids
    with LLMEngine(EngineConfig(kv_load_timeout_s=0.05, **cfg)) as d:
        rid = d.add_request(prompt, PARAMS, kv_mode=KVMode.LOAD_REMOTE)
        target = next(o.kv_load for o in d.step() if o.request_id == rid)
        assert len(target.epochs) == len(target.block_ids) == 6
        time.sleep(0.1)
        out = run_until_finished(d, rid)                            # nobody filled the KV
        assert d.scheduler.num_kv_load_timeouts == 1
        with pytest.raises(KeyError):
            d.notify_kv_ready(rid, 5)                                # too late: harmless
        assert d.scheduler.blocks.pool.num_free_blocks == 32
    assert out.output_token_ids == expected


def test_pin_lease_expiry_frees_blocks(tiny_llama):
    cfg = EngineConfig(model=tiny_llama, role="prefill", block_size=4, num_kv_blocks=32,
                       pin_lease_s=0.05)
    with LLMEngine(cfg) as p:
        out = p.generate([list(range(3, 13))], PARAMS)[0]
        assert p.scheduler.blocks.pool.num_free_blocks == 32 - 3
        time.sleep(0.1)
        p.step()
        assert p.scheduler.num_pin_expiries == 1
        assert p.scheduler.blocks.pool.num_free_blocks == 32
        assert not p.release_kv(out.request_id)                      # late release: harmless


def test_remote_first_token_can_finish_the_request(tiny_llama):
    cfg = EngineConfig(model=tiny_llama, block_size=4, num_kv_blocks=32)
    with LLMEngine(cfg) as d:
        rid = d.add_request(list(range(3, 12)), SamplingParams(max_tokens=1, temperature=0.0),
                            kv_mode=KVMode.LOAD_REMOTE)
        d.step()
        d.notify_kv_ready(rid, 42)
        (out,) = d.step()
        assert out.finished and out.finish_reason == "length" and out.output_token_ids == [42]
        assert d.scheduler.blocks.pool.num_free_blocks == 32 and not d.has_unfinished()
