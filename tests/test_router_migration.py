"""The router moves a lost decode node's requests (router.migration): resumed elsewhere
with the tokens already delivered, parked while no decode node is up, capped, counted;
and it notices a node's connection ending at once (router.connections), on real sockets."""

from __future__ import annotations

import asyncio
import functools
import time

import pytest
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry

from disagg.control import messages as m
from disagg.kv_cache.hashing import hash_blocks
from disagg.sampling_params import SamplingParams
from router.dispatch import Dispatcher
from router.inflight import Inflight
from router.metrics import RouterMetrics
from router.migration import MigrationConfig
from router.nodes import NodeRegistry
from router.policy import make_policy
from router_helpers import recording_dispatcher, register_message

BLOCK = 4
PROMPT = list(range(10, 20))

reg = functools.partial(register_message, block_size=BLOCK)


@pytest.fixture
def dispatchers():
    """``make(*nodes, unreachable=(), **migration)``: a recording dispatcher (sends to a
    node in ``unreachable`` fail) with ``nodes`` registered (``p*``: prefill, else decode)
    and ``d.sent`` cleared; closed at the end."""
    made = []

    def make(*nodes, unreachable=(), **migration):
        d = recording_dispatcher(migration=MigrationConfig(**migration),
                                 unreachable=unreachable)
        for node in nodes:
            d.handlers.handle(node, reg(node, "prefill" if node.startswith("p") else "decode"),
                              b"")
        d.sent.clear()
        made.append(d)
        return d
    yield make
    for d in made:
        asyncio.run(d.close())


def submit(d: Dispatcher, params: SamplingParams | None = None, decode: str = "decode-0",
           prefill: str | None = None) -> Inflight:
    """A request in flight on ``decode`` (and remote from ``prefill``), as submit leaves it."""
    rid = f"r{len(d.inflight)}"
    req = Inflight(rid, list(PROMPT), params or SamplingParams(max_tokens=8), hash_blocks(
        PROMPT, BLOCK), 0.0, decode, prefill, "remote" if prefill else "local")
    d.inflight[rid] = req
    d.registry.nodes[decode].pending[rid] = len(PROMPT)
    if prefill:
        d.registry.nodes[prefill].pending[rid] = len(PROMPT)
    return req


def tokens(rid, ids, output_len, finished=False) -> m.StepTokens:
    return m.StepTokens([m.Tokens(rid, list(ids), output_len, [], finished,
                                  "length" if finished else None, "text" if finished else None,
                                  0, "local", 1.0, None)])


def events(req: Inflight) -> list:
    out = []
    while not req.events.empty():
        out.append(req.events.get_nowait()[1])
    return out


def sample(d: Dispatcher, name: str, **labels) -> float:
    return d.prom.get_sample_value(name, labels) or 0.0


def lose(d: Dispatcher, node_id: str, reason: str = "disconnected") -> None:
    d.node_lost(d.registry.remove(node_id), reason)


def test_lost_node_request_resumes_elsewhere_with_the_delivered_tokens(dispatchers):
    d = dispatchers("decode-0", "decode-1")
    req = submit(d)
    d.handlers.handle("decode-0", tokens(req.rid, [5, 6], 2), b"")
    assert [e.token_ids for e in events(req)] == [[5, 6]] and req.output_ids == [5, 6]
    lose(d, "decode-0")
    assert d.sent == [("decode-1", m.Generate(req.rid, PROMPT, req.params.to_dict(), False,
                                              resume_token_ids=[5, 6]))]
    assert req.decode == "decode-1" and req.migrations == 1 and req.parked_until is None
    assert d.registry.nodes["decode-1"].pending == {req.rid: len(PROMPT) + 2}
    assert d.registry.prefixes.match("decode-1", req.hashes) == len(req.hashes)
    assert sample(d, "disagg_migrations_total", reason="disconnected") == 1
    d.sent.clear()
    # the old node's late tokens are dropped (and it is told to forget the request)
    d.handlers.handle("decode-0", tokens(req.rid, [9], 3), b"")
    assert events(req) == [] and ("decode-0", m.Abort(req.rid)) in d.sent
    # the new node's first message counts the resumed tokens in output_len
    d.handlers.handle("decode-1", tokens(req.rid, [7], 3), b"")
    d.handlers.handle("decode-1", tokens(req.rid, [8], 4, finished=True), b"")
    assert [e.token_ids for e in events(req)] == [[7], [8]]
    assert req.output_ids == [5, 6, 7, 8] and req.rid not in d.inflight
    assert d.registry.nodes["decode-1"].pending == {}
    assert sample(d, "disagg_requests_total", route="local", status="ok") == 1


def test_a_gap_in_the_tokens_is_ignored(dispatchers):
    d = dispatchers("decode-0")
    req = submit(d)
    d.handlers.handle("decode-0", tokens(req.rid, [5], 1), b"")
    d.handlers.handle("decode-0", tokens(req.rid, [9], 5), b"")     # tokens 2..4 never came
    assert [e.token_ids for e in events(req)] == [[5]] and req.num_output == 1


def test_prompt_logprobs_are_not_asked_for_again_once_sent(dispatchers):
    d = dispatchers("decode-0", "decode-1", "decode-2")
    params = SamplingParams(max_tokens=8, prompt_logprobs=1)
    fresh, started = submit(d, params), submit(d, params)
    d.handlers.handle("decode-0", tokens(started.rid, [5], 1), b"")
    lose(d, "decode-0")
    sent = {msg.rid: msg for _, msg in d.sent}
    assert sent[fresh.rid].params["prompt_logprobs"] == 1 and sent[fresh.rid].resume_token_ids == []
    assert sent[started.rid].params["prompt_logprobs"] is None
    assert sent[started.rid].resume_token_ids == [5]


def test_remote_request_aborts_its_prefill_and_ignores_its_late_first_token(dispatchers):
    d = dispatchers("decode-0", "decode-1", "prefill-0")
    req = submit(d, prefill="prefill-0")
    lose(d, "decode-0")
    assert d.sent[0] == ("prefill-0", m.Abort(req.rid))
    assert d.sent[1][0] == "decode-1" and d.sent[1][1].remote is False
    assert req.prefill is None and req.route == "local"
    assert d.registry.nodes["prefill-0"].pending == {}
    d.sent.clear()
    late = m.FirstToken(req.rid, 42, None, 0.1, 1.0)
    d.handlers.handle("prefill-0", late, m.encode(late))
    assert events(req) == [] and d.sent == [] and req.num_output == 0


def test_parked_until_a_decode_node_registers(dispatchers):
    d = dispatchers("decode-0")
    req = submit(d)
    d.handlers.handle("decode-0", tokens(req.rid, [5, 6, 7], 3), b"")
    events(req)
    lose(d, "decode-0", "node_timeout")
    assert d.sent == [] and req.decode == "" and req.parked_until is not None
    assert sample(d, "disagg_parked_requests") == 1
    d.handlers.handle("decode-0", tokens(req.rid, [8], 4), b"")      # still running there
    assert events(req) == [] and ("decode-0", m.Abort(req.rid)) in d.sent
    d.sent.clear()
    d.handlers.handle("decode-3", reg("decode-3"), b"")
    assert d.sent[-1] == ("decode-3", m.Generate(req.rid, PROMPT, req.params.to_dict(), False,
                                                 resume_token_ids=[5, 6, 7]))
    assert req.decode == "decode-3" and req.parked_until is None
    assert sample(d, "disagg_parked_requests") == 0
    assert sample(d, "disagg_migrations_total", reason="node_timeout") == 1


def test_parked_request_fails_when_the_wait_runs_out(dispatchers):
    d = dispatchers("decode-0", wait_s=5.0)
    req = submit(d)
    lose(d, "decode-0")
    d.migrator.expire(time.monotonic() + 1.0)
    assert req.rid in d.inflight
    d.migrator.expire(time.monotonic() + 6.0)
    (e,) = events(req)
    assert e.finished and e.error.status == 502 and e.error.code == "node_lost"
    assert "within 5 s" in str(e.error.body())
    assert req.rid not in d.inflight
    assert sample(d, "disagg_migration_failures_total", reason="wait_timeout") == 1
    assert sample(d, "disagg_requests_total", route="local", status="error") == 1


def test_client_gone_while_parked_aborts_cleanly(dispatchers):
    d = dispatchers("decode-0")
    req = submit(d)
    lose(d, "decode-0")
    d.abort(req.rid)
    assert d.sent == [] and req.rid not in d.inflight
    assert sample(d, "disagg_requests_total", route="local", status="aborted") == 1
    d.handlers.handle("decode-1", reg("decode-1"), b"")
    assert [type(msg) for _, msg in d.sent] == [m.Registered]
    assert sample(d, "disagg_parked_requests") == 0


def test_moves_are_capped(dispatchers):
    d = dispatchers("decode-0", "decode-1", "decode-2", max_migrations=1)
    req = submit(d)
    lose(d, "decode-0")
    assert req.decode in ("decode-1", "decode-2") and req.migrations == 1
    lose(d, req.decode)
    (e,) = events(req)
    assert e.error.status == 502 and "moved 1 times already" in str(e.error.body())
    assert sample(d, "disagg_migration_failures_total", reason="max_migrations") == 1
    assert all(not n.pending for n in d.registry.nodes.values())


def test_zero_max_migrations_fails_at_once(dispatchers):
    d = dispatchers("decode-0", "decode-1", max_migrations=0)
    req = submit(d)
    lose(d, "decode-0")
    (e,) = events(req)
    assert e.error.status == 502 and d.sent == []


def test_an_unreachable_target_is_dropped_and_the_next_one_tried(dispatchers):
    d = dispatchers("decode-0", "decode-1", "decode-2", unreachable={"decode-1"})
    d.registry.nodes["decode-2"].load = {"queued_prefill_tokens": 1000}   # decode-1 first
    req = submit(d)
    lose(d, "decode-0")
    assert [n for n, msg in d.sent if isinstance(msg, m.Generate)] == ["decode-1", "decode-2"]
    assert req.decode == "decode-2" and req.migrations == 2
    assert "decode-1" not in d.registry.nodes
    assert sample(d, "disagg_migrations_total", reason="unreachable") == 1


@pytest.mark.parametrize("kw", [dict(max_migrations=-1), dict(max_migrations=1.5),
                                dict(max_migrations=True), dict(wait_s=0), dict(wait_s=-1.0),
                                dict(wait_s=float("nan")), dict(wait_s=float("inf"))])
def test_migration_config_is_checked(kw):
    with pytest.raises(ValueError, match="max_migrations|wait_s"):
        MigrationConfig(**kw)


# ------------------------------------------------------------------ real sockets

def dealer(ctx: zmq.Context, address: str, identity: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, identity.encode())
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    return s


async def until(cond, timeout_s: float = 10.0) -> float:
    """Wait (on the loop) until ``cond()``; the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError("timed out")
        await asyncio.sleep(0.001)
    return time.monotonic() - t0


async def recv(sock: zmq.Socket, timeout_s: float = 10.0):
    t0 = time.monotonic()
    while True:
        try:
            return m.decode(sock.recv(zmq.NOBLOCK))
        except zmq.Again:
            if time.monotonic() - t0 > timeout_s:
                raise AssertionError("nothing received") from None
            await asyncio.sleep(0.001)


def test_a_closed_node_connection_is_lost_at_once_and_its_request_moves():
    """Sockets speaking the node protocol: the heartbeat timeout is 60 s, so only the
    connection's end can drop a node here."""
    async def main():
        registry = CollectorRegistry()
        d = Dispatcher(NodeRegistry("m", node_timeout_s=60.0), make_policy("local"),
                       RouterMetrics(registry), "tcp://127.0.0.1:*")
        d.start()
        ctx = zmq.Context()
        try:
            n0, n1 = dealer(ctx, d.address, "decode-0"), dealer(ctx, d.address, "decode-1")
            hb = dealer(ctx, d.address, "hb:decode-0")
            for node_id, s in (("decode-0", n0), ("decode-1", n1)):
                s.send(m.encode(reg(node_id)))
                assert isinstance(await recv(s), m.Registered)
            hb.send(m.encode(m.Heartbeat("decode-0", {}, [], 0, 0)))
            req = submit(d)
            n0.send(m.encode(tokens(req.rid, [5, 6], 2)))
            await until(lambda: req.num_output == 2)
            hb.close()                                   # its heartbeat socket: nothing
            await asyncio.sleep(0.3)
            assert "decode-0" in d.registry.nodes
            n0.close()                                   # its main socket: lost now
            took = await until(lambda: "decode-0" not in d.registry.nodes)
            msg = await recv(n1)
            assert msg == m.Generate(req.rid, PROMPT, req.params.to_dict(), False,
                                     resume_token_ids=[5, 6])
            assert d.lost == {"decode-0": "decode"} and took < 1.0
            assert registry.get_sample_value("disagg_migrations_total",
                                             {"reason": "disconnected"}) == 1
            # restarted under the same id (its descriptor number may be reused): up again,
            # and only its own end drops it
            for pid in (2, 3):
                again = dealer(ctx, d.address, "decode-0")
                again.send(m.encode(reg("decode-0", pid=pid)))
                assert isinstance(await recv(again), m.Registered)
                await asyncio.sleep(0.1)
                assert "decode-0" in d.registry.nodes
                again.close()
                await until(lambda: "decode-0" not in d.registry.nodes)
            # its end and the next incarnation's Register arrive together: the new one stays
            for pid in (4, 5, 6):
                old = dealer(ctx, d.address, "decode-0")
                old.send(m.encode(reg("decode-0", pid=pid)))
                assert isinstance(await recv(old), m.Registered)
                old.close()
                new = dealer(ctx, d.address, "decode-0")
                new.send(m.encode(reg("decode-0", pid=pid + 10)))
                assert isinstance(await recv(new), m.Registered)
                await asyncio.sleep(0.1)
                assert d.registry.nodes["decode-0"].info.pid == pid + 10
                new.close()
                await until(lambda: "decode-0" not in d.registry.nodes)
            n1.close()
            await until(lambda: "decode-1" not in d.registry.nodes)
            assert req.parked_until is not None and req.rid in d.inflight
            return took
        finally:
            await d.close()
            ctx.destroy(linger=0)

    took = asyncio.run(main())
    print(f"connection end -> node dropped: {took * 1000:.1f} ms")
