"""Prefill on one engine, KV over a real transport, decode on another: outputs
identical to a single engine, for different TP degrees on each side."""

from __future__ import annotations

import pytest

from conftest import needs_smollm2, random_prompts
from disagg.config import EngineConfig
from disagg.engine import LLMEngine
from disagg.engine.request import KVMode
from disagg.sampling_params import SamplingParams
from transport.base import TransportConfig

PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def run_disaggregated(prefill: LLMEngine, decode: LLMEngine, prompts, params=PARAMS,
                      timeout_s: float = 60.0) -> dict[str, list[int]]:
    """Drive both engines in this thread: decode reserves blocks, prefill computes
    and sends them, the first token goes from prefill's output to decode."""
    import time
    rids = [decode.add_request(p, params, kv_mode=KVMode.LOAD_REMOTE) for p in prompts]
    by_rid = dict(zip(rids, prompts))
    done: dict[str, list[int]] = {}
    deadline = time.monotonic() + timeout_s
    while len(done) < len(rids) or prefill.has_unfinished():
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(done)}/{len(rids)} finished")
        for out in decode.step():
            if out.kv_load is not None:
                prefill.add_request(by_rid[out.request_id], params, request_id="p-" + out.request_id,
                                    kv_target=out.kv_load)
            if out.finished:
                done[out.request_id] = out.output_token_ids
        for out in prefill.step():
            if out.finished and out.kv_export is not None:
                decode.notify_kv_ready(out.request_id[2:], out.kv_export.first_token_id)
    return {r: done[r] for r in rids}


def _cfg(model, role, tp, kind="zmq", **kw):
    address = "ipc://*" if kind == "zmq-ipc" else "tcp://127.0.0.1:*"
    transfer = TransportConfig(kind="zmq" if kind.startswith("zmq") else kind, address=address,
                               timeout_s=10, lease_s=10)
    base = dict(block_size=4, num_kv_blocks=128, max_num_batched_tokens=64, torch_threads=1)
    base.update(kw)
    return EngineConfig(model=model, role=role, tensor_parallel_size=tp, kv_transfer=transfer, **base)


@pytest.fixture(scope="module")
def expected(tiny_llama):
    prompts = random_prompts(6, 256, 5, 40, seed=3)
    with LLMEngine(EngineConfig(model=tiny_llama, block_size=4, num_kv_blocks=128)) as single:
        outs = single.generate(prompts, PARAMS)
    return prompts, [o.output_token_ids for o in outs]


@pytest.mark.parametrize("p,d,kind,layerwise", [
    (1, 1, "zmq", True), (1, 1, "zmq-ipc", False), (1, 1, "shm", True),
    (2, 1, "zmq", True), (1, 2, "zmq", False), (2, 1, "shm", False), (1, 2, "shm", True)])
def test_disaggregated_matches_single_engine(tiny_llama, expected, p, d, kind, layerwise):
    prompts, want = expected
    with LLMEngine(_cfg(tiny_llama, "prefill", p, kind, kv_layerwise=layerwise)) as pe, \
            LLMEngine(_cfg(tiny_llama, "decode", d, kind)) as de:
        got = run_disaggregated(pe, de, prompts)
        assert list(got.values()) == want
        assert pe.scheduler.blocks.pool.num_free_blocks == 128      # every pin released
        assert de.scheduler.num_kv_load_timeouts == 0
        assert {e.direction for e in pe.pop_kv_events()} == {"sent"}
        assert all(e.error is None for e in pe.pop_kv_events())
        if not kind == "shm":
            assert pe.kv_stats["bytes_sent"] == de.kv_stats["bytes_received"] > 0


def test_only_missing_blocks_move(tiny_llama):
    """A decode engine holding a 4-block prefix receives only the other blocks."""
    prompt = random_prompts(1, 256, 30, 31, seed=21)[0]              # 30 tokens: 8 blocks of 4
    with LLMEngine(EngineConfig(model=tiny_llama, block_size=4, num_kv_blocks=128)) as single:
        want = single.generate([prompt], PARAMS)[0].output_token_ids
    with LLMEngine(_cfg(tiny_llama, "prefill", 1)) as pe, LLMEngine(_cfg(tiny_llama, "decode", 1)) as de:
        de.generate([prompt[:17] + [3]], PARAMS)                    # caches 4 leading blocks
        got = run_disaggregated(pe, de, [prompt])
        assert list(got.values()) == [want]
        per_block = 3 * 2 * 2 * 4 * 16 * 4        # layers, K/V, kv heads, block, head_dim, fp32
        assert de.kv_stats["bytes_received"] == (8 - 4) * per_block
        assert pe.kv_stats["bytes_sent"] == (8 - 4) * per_block


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("p,d", [(3, 1), (1, 3)])
def test_smollm2_heterogeneous_tp(smollm2_dir, p, d):
    """The embedded model, prefill TP p → decode TP d, heads re-sharded on the way."""
    prompts = [list(x) for x in random_prompts(4, 49152, 20, 70, seed=5)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    kw = dict(block_size=16, num_kv_blocks=64, max_num_batched_tokens=512)
    with LLMEngine(EngineConfig(model=smollm2_dir, **kw)) as single:
        want = [o.output_token_ids for o in single.generate(prompts, params)]
    with LLMEngine(_cfg(smollm2_dir, "prefill", p, torch_threads=None, **kw)) as pe, \
            LLMEngine(_cfg(smollm2_dir, "decode", d, torch_threads=None, **kw)) as de:
        got = run_disaggregated(pe, de, prompts, params, timeout_s=300)
        assert de.scheduler.num_kv_load_timeouts == 0
        assert pe.kv_stats["bytes_sent"] == de.kv_stats["bytes_received"]
    assert list(got.values()) == want
