"""What happens when a KV transfer cannot complete: every wait ends, blocks
come back, and the decode side still answers by prefilling locally."""

from __future__ import annotations

import time

import pytest

from conftest import random_prompts
from disagg.config import EngineConfig
from disagg.engine import LLMEngine
from disagg.engine.request import KVMode
from disagg.sampling_params import SamplingParams
from transport.base import TransportConfig

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
BLOCKS = 64


def _engine(model, role, kv_load_timeout_s=30.0, lease_s=30.0, timeout_s=1.0, kind="zmq"):
    return LLMEngine(EngineConfig(
        model=model, role=role, block_size=4, num_kv_blocks=BLOCKS, torch_threads=1,
        kv_load_timeout_s=kv_load_timeout_s,
        kv_transfer=TransportConfig(kind=kind, timeout_s=timeout_s, lease_s=lease_s)))


def _drain(engine, limit_s=20.0):
    """Step until the engine has nothing left; return every output."""
    outs, deadline = [], time.monotonic() + limit_s
    while engine.has_unfinished():
        assert time.monotonic() < deadline, "engine did not settle"
        outs += engine.step()
    return outs


def _target(decode, prompt):
    rid = decode.add_request(prompt, PARAMS, kv_mode=KVMode.LOAD_REMOTE)
    return rid, next(o.kv_load for o in decode.step() if o.request_id == rid)


def test_kv_that_never_comes_falls_back_to_local_prefill(tiny_llama):
    prompt = random_prompts(1, 256, 21, 22, seed=4)[0]
    with LLMEngine(EngineConfig(model=tiny_llama, block_size=4, num_kv_blocks=BLOCKS)) as single:
        want = single.generate([prompt], PARAMS)[0].output_token_ids
    with _engine(tiny_llama, "decode", kv_load_timeout_s=0.5) as de:
        rid, _ = _target(de, prompt)
        t0 = time.monotonic()
        done = [o for o in _drain(de) if o.finished]
        assert time.monotonic() - t0 < 10
        assert [o.output_token_ids for o in done] == [want]
        assert de.scheduler.num_kv_load_timeouts == 1
        assert de.scheduler.blocks.pool.num_free_blocks == BLOCKS
        assert not de.scheduler.connector.has_pending()


def test_an_idle_node_still_falls_back_when_the_kv_wait_runs_out(tiny_llama):
    """Nothing moving (the KV is not coming, no transfer in flight, no other request): the
    node loop steps only while ``has_unfinished()``, so the overdue wait must count, or the
    request and its blocks stay held until some other request wakes the engine."""
    prompt = random_prompts(1, 256, 21, 22, seed=5)[0]
    with LLMEngine(EngineConfig(model=tiny_llama, block_size=4, num_kv_blocks=BLOCKS)) as single:
        want = single.generate([prompt], PARAMS)[0].output_token_ids
    with LLMEngine(EngineConfig(model=tiny_llama, role="decode", block_size=4,
                                num_kv_blocks=BLOCKS, kv_load_timeout_s=0.3)) as de:
        _target(de, prompt)
        assert not de.has_unfinished()                 # waiting for its first token
        time.sleep(0.4)
        assert de.has_unfinished()
        done = [o for o in _drain(de) if o.finished]
        assert [o.output_token_ids for o in done] == [want]
        assert de.is_idle() and de.scheduler.blocks.pool.num_free_blocks == BLOCKS


@pytest.mark.parametrize("lease_s,timeout_s,reason", [(1.0, 5.0, "lease"), (5.0, 1.0, "HELLO")])
def test_dead_receiver_ends_in_an_error_and_frees_blocks(tiny_llama, lease_s, timeout_s, reason):
    """No ACK ever comes: the link watch (nobody answers the connection: see
    transport/liveness.py), the lease or the handshake timeout, whichever comes first, ends
    the transfer with an error and frees its blocks."""
    prompt = random_prompts(1, 256, 21, 22, seed=4)[0]
    with _engine(tiny_llama, "prefill", lease_s=lease_s, timeout_s=timeout_s) as pe:
        with _engine(tiny_llama, "decode") as de:
            _, target = _target(de, prompt)
        # the decode engine and its sockets are gone; nothing will ever ACK
        pe.add_request(prompt, PARAMS, request_id="p0", kv_target=target)
        t0 = time.monotonic()
        outs = _drain(pe)
        assert time.monotonic() - t0 < 10
        assert any(o.finished and o.kv_export for o in outs)
        (event,) = pe.pop_kv_events()
        assert event.request_id == "p0" and event.direction == "sent"
        assert any(why in event.error for why in (reason, "connection", "handshake")), event.error
        assert pe.scheduler.blocks.pool.num_free_blocks == BLOCKS


def test_stale_target_is_rejected_after_the_decode_fell_back(tiny_llama):
    """A prefill that arrives after the decode gave up gets an error, not a write."""
    prompt = random_prompts(1, 256, 21, 22, seed=4)[0]
    with _engine(tiny_llama, "prefill") as pe, _engine(tiny_llama, "decode", 0.3) as de:
        rid, target = _target(de, prompt)
        first = [o for o in _drain(de) if o.finished]               # fell back, finished locally
        de.add_request(random_prompts(1, 256, 21, 22, seed=9)[0], PARAMS)   # reuses the blocks
        pe.add_request(prompt, PARAMS, request_id="late", kv_target=target)
        deadline = time.monotonic() + 20
        while pe.has_unfinished() or de.has_unfinished():
            assert time.monotonic() < deadline
            de.step()
            pe.step()
        (event,) = pe.pop_kv_events()
        assert event.error and "unknown_request" in event.error
        assert de.kv_stats["bytes_received"] == 0
        assert pe.scheduler.blocks.pool.num_free_blocks == BLOCKS
        assert len(first) == 1 and len(first[0].output_token_ids) == PARAMS.max_tokens


def test_first_token_can_finish_a_request_before_its_kv_arrives(tiny_llama):
    prompt = random_prompts(1, 256, 21, 22, seed=4)[0]
    with _engine(tiny_llama, "decode") as de:
        rid = de.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0),
                             kv_mode=KVMode.LOAD_REMOTE)
        de.step()
        de.notify_kv_ready(rid, 42)
        (out,) = [o for o in de.step() if o.finished]
        assert out.output_token_ids == [42] and out.finish_reason == "length"
        _drain(de)                                                  # the receiver forgets it
        assert de.scheduler.blocks.pool.num_free_blocks == BLOCKS
        assert not de.scheduler.connector.has_pending()


def test_bad_kv_targets_are_refused(tiny_llama):
    prompt = random_prompts(1, 256, 21, 22, seed=4)[0]
    with _engine(tiny_llama, "prefill") as pe:
        good = dict(block_ids=list(range(6)), epochs=[1] * 6, num_local_tokens=0, num_tokens=21,
                    request_id="d0", endpoints=["tcp://127.0.0.1:1"])
        for bad in (dict(good, num_tokens=20), dict(good, block_ids=[1, 2]),
                    dict(good, endpoints=[]), dict(good, endpoints=["a", "b", "c"]),
                    dict(good, epochs="x"), dict(good, request_id="")):
            try:
                pe.add_request(prompt, PARAMS, kv_target=bad)
            except ValueError:
                continue
            raise AssertionError(f"accepted {bad}")
        assert not pe.scheduler.requests


def test_explicit_fallback_after_the_first_token_continues_correctly(tiny_llama):
    """The router gave the client the remote first token, then the transfer failed:
    the decode engine prefills prompt + that token locally and carries on."""
    prompt = random_prompts(1, 256, 21, 22, seed=4)[0]
    with LLMEngine(EngineConfig(model=tiny_llama, block_size=4, num_kv_blocks=BLOCKS)) as single:
        want = single.generate([prompt], PARAMS)[0].output_token_ids
    with _engine(tiny_llama, "decode") as de:
        rid, _ = _target(de, prompt)
        assert de.load()["num_waiting_for_kv"] == 1
        de.notify_kv_ready(rid, want[0])
        assert de.fall_back_to_local(rid) and not de.fall_back_to_local(rid)
        assert de.load()["queued_prefill_tokens"] == len(prompt) + 1
        (out,) = [o for o in _drain(de) if o.finished]
        assert out.output_token_ids == want
        assert de.scheduler.blocks.pool.num_free_blocks == BLOCKS
