"""Regression tests for the bugs the socket fuzz (``tests/test_fuzz_sockets.py``) found.

1. A msgpack nesting bomb (thousands of nested arrays or maps) made msgspec raise
   ``RecursionError``, which neither the control-message decoder nor the KV wire
   decoder caught: it killed the router's receive loop (the router kept answering
   HTTP but never heard a node again), a node process, and a KV receiver (raised
   again inside its own error reply).
2. A ``FirstToken`` whose id is outside the vocabulary crashed the decode node
   (the embedding lookup) once the request ran: after its KV arrived, or at once
   after a fallback.
3. A ``Prefill`` target naming an endpoint ZeroMQ cannot parse (``"garbage"``)
   crashed the prefill node: ``ZMQError`` escaped the KV sender's connect.
4. A heartbeat with a negative KV byte counter made the router's handler raise
   (a Prometheus counter cannot go down), skipping the rest of the heartbeat.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry

from conftest import hf_greedy
from disagg.config import EngineConfig
from disagg.control import messages as m
from disagg.engine import LLMEngine
from disagg.sampling_params import SamplingParams
from transport.base import TransportConfig
from transport.messages import ErrorCode, WireError
from transport.wire import decode_header, header_ids

DEPTH = 5000
BOMBS = [b"\x91" * DEPTH + b"\xc0",                                     # [[[[...]]]]
         b"\x81\xa1a" * DEPTH + b"\xc0",                                # {"a": {"a": ...}}
         b"\x82\xa4type\xa8Generate\xa6params" + b"\x81\xa1a" * DEPTH + b"\xc0",
         b"\x82\xa4kind\xa5hello\xa4pool" + b"\x81\xa1a" * DEPTH + b"\xc0"]


@pytest.mark.parametrize("bomb", BOMBS)
def test_nesting_bombs_are_malformed_frames(bomb):
    with pytest.raises(m.ControlError):
        m.decode(bomb)
    with pytest.raises(WireError) as info:
        decode_header(bomb)
    assert info.value.code == ErrorCode.DECODE
    assert header_ids(bomb) == ("", "", -1)


def _register(node_id: str) -> m.Register:
    return m.Register(node_id, "decode", 1, 16, "m", 128, 256, 8, 64, "zmq",
                      ["tcp://127.0.0.1:1"], 1, "host")


def test_router_keeps_receiving_after_a_nesting_bomb_and_a_negative_counter(caplog):
    from router.dispatch import Dispatcher
    from router.metrics import RouterMetrics
    from router.nodes import NodeRegistry
    from router.policy import make_policy

    async def main():
        d = Dispatcher(NodeRegistry("m"), make_policy("local"),
                       RouterMetrics(CollectorRegistry()), "tcp://127.0.0.1:*")
        d.start()
        ctx = zmq.asyncio.Context()
        node = ctx.socket(zmq.DEALER)
        node.setsockopt(zmq.IDENTITY, b"n1")
        node.connect(d.address)
        try:
            for bomb in BOMBS:
                await node.send(bomb)
            await node.send(m.encode(_register("n1")))
            reply = m.decode(await asyncio.wait_for(node.recv(), 10))
            assert isinstance(reply, m.Registered)
            await node.send(m.encode(m.Heartbeat("n1", {}, [], 0, -1)))
            await node.send(m.encode(m.Heartbeat("n1", {}, [], 0, 5)))
            for _ in range(100):
                if d.metrics.kv_transfer_bytes._value.get() == 5:
                    break
                await asyncio.sleep(0.02)
            assert d.metrics.kv_transfer_bytes._value.get() == 5
        finally:
            node.close(0)
            ctx.term()
            await d.close()

    with caplog.at_level(logging.ERROR, logger="disagg.router"):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.exc_info], "a handler raised"


def _engine(model: str, role: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model, role=role, num_kv_blocks=32, block_size=4,
                                  kv_transfer=TransportConfig()))


@pytest.mark.parametrize("token", [-5, 256, 2**63 - 1])
def test_decode_node_prefills_itself_after_a_first_token_outside_the_vocabulary(tiny_llama,
                                                                                token):
    from decode_node.handler import DecodeHandler
    engine = _engine(tiny_llama, "decode")
    sent = []
    handler = DecodeHandler(engine, sent.append)
    prompt = [5, 9, 2, 77, 31, 8, 100]
    try:
        params = SamplingParams(max_tokens=5, temperature=0).to_dict()
        handler.on_message(m.Generate("r", prompt, params, True))
        handler.on_message(m.FirstToken("r", token, None, 0.1, 0.0))
        for _ in range(50):
            if not engine.has_unfinished():
                break
            handler.on_outputs(engine.step())
        items = [t for s in sent if isinstance(s, m.StepTokens) for t in s.items]
        assert [t for item in items for t in item.new_token_ids] == hf_greedy(tiny_llama, prompt, 5)
        assert items[-1].finished and items[-1].route == "fallback"
        assert engine.load()["num_requests"] == 0
    finally:
        engine.shutdown()


def test_prefill_node_reports_a_malformed_kv_endpoint_as_a_failed_send(tiny_llama):
    from prefill_node.handler import PrefillHandler
    engine = _engine(tiny_llama, "prefill")
    sent = []
    handler = PrefillHandler(engine, sent.append)
    prompt = [5, 9, 2, 77, 31]
    target = {"block_ids": [3, 4], "epochs": [1, 1], "num_local_tokens": 0, "num_tokens": 5,
              "request_id": "r", "endpoints": ["garbage"]}
    try:
        handler.on_message(m.Prefill("r", prompt, SamplingParams(max_tokens=1).to_dict(), target))
        for _ in range(50):
            if not engine.has_unfinished():
                break
            handler.on_outputs(engine.step())
            for event in engine.pop_kv_events():
                handler.on_kv_event(event)
        (kv_sent,) = [s for s in sent if isinstance(s, m.KVSent)]
        assert "cannot connect" in kv_sent.error and "garbage" in kv_sent.error
        assert engine.load()["num_requests"] == 0 and engine.load()["num_used_blocks"] == 0
    finally:
        engine.shutdown()
