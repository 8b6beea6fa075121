"""The decode node's hot path: a remote request's blocks are reserved when its
``Generate`` is handled, so its ``KVTarget`` leaves before the next engine step
(not after it), the output stays token-identical, and the reservation never
takes blocks the running requests need for their next chunk."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from conftest import make_tiny_model, random_prompts, run_until_finished
from decode_node.handler import DecodeHandler
from disagg.config import EngineConfig
from disagg.control import messages as m
from disagg.engine import LLMEngine
from disagg.engine.request import KVMode
from disagg.node.server import NodeServer
from disagg.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def test_reserved_at_admission_and_token_identical(tiny_llama):
    prompt = random_prompts(1, 256, 30, 31, seed=5)[0]
    other = random_prompts(1, 256, 20, 21, seed=6)[0]
    cfg = dict(model=tiny_llama, block_size=4, num_kv_blocks=64)
    with LLMEngine(EngineConfig(**cfg)) as single:
        expected = single.generate([prompt], PARAMS)[0].output_token_ids
    with LLMEngine(EngineConfig(role="prefill", **cfg)) as p, \
            LLMEngine(EngineConfig(role="decode", **cfg)) as d:
        d.add_request(other, PARAMS)                 # a running local request
        d.step()
        drid = d.add_request(prompt, PARAMS, kv_mode=KVMode.LOAD_REMOTE)
        (out,) = d.reserve_kv_loads()                # no step ran
        target = out.kv_load
        assert out.request_id == drid and target.num_tokens == 30 and len(target.block_ids) == 8
        assert d.reserve_kv_loads() == []
        assert all(o.kv_load is None for o in d.step())   # the step does not announce it again

        prid = p.add_request(prompt, PARAMS, kv_mode=KVMode.PREFILL_ONLY)
        exp = run_until_finished(p, prid).kv_export
        for src, dst in zip(p.executor.kv_caches, d.executor.kv_caches):
            for s, t in zip(exp.block_ids, target.block_ids):
                dst[t].copy_(src[s])
        d.notify_kv_ready(drid, exp.first_token_id)
        assert run_until_finished(d, drid).output_token_ids == expected


def test_reservation_leaves_running_growth_and_keeps_arrival_order(tiny_llama):
    cfg = EngineConfig(model=tiny_llama, role="decode", block_size=4, num_kv_blocks=10)
    with LLMEngine(cfg) as d:
        d.add_request(list(range(1, 33)), PARAMS)          # 32 tokens: 8 blocks
        first = d.add_request([100, 101, 102, 103], PARAMS, kv_mode=KVMode.LOAD_REMOTE)
        assert d.reserve_kv_loads() == []                  # a local request is first in line
        assert [o.request_id for o in d.step() if o.kv_load is not None] == [first]
        assert d.scheduler.blocks.num_free_blocks == 1
        # one free block would hold this prompt, but the running request's 33rd token
        # needs it in the next step: reserving it now would preempt that request
        late = d.add_request([110, 111, 112, 113], PARAMS, kv_mode=KVMode.LOAD_REMOTE)
        assert d.reserve_kv_loads() == []
        d.step()
        assert d.scheduler.num_preemptions == 0 and d.scheduler.requests[late].blocks == []


def test_while_the_model_runs_admissions_pass_and_frees_wait(tiny_llama):
    """``step(overlap=...)``: new requests are admitted and remote ones reserved while the
    model runs; what would free blocks it computes on is refused; tokens stay the same."""
    cfg = dict(model=tiny_llama, block_size=4, num_kv_blocks=64)
    prompts = random_prompts(2, 256, 20, 21, seed=8)
    with LLMEngine(EngineConfig(**cfg)) as single:
        expected = [o.output_token_ids for o in single.generate(prompts, PARAMS)]
    with LLMEngine(EngineConfig(role="decode", **cfg)) as d:
        first = d.add_request(prompts[0], PARAMS)
        seen = {}

        def overlap(future):
            d.add_request([7, 8, 9], PARAMS, request_id="remote", kv_mode=KVMode.LOAD_REMOTE)
            seen["loads"] = [o.request_id for o in d.reserve_kv_loads()]
            seen["second"] = d.add_request(prompts[1], PARAMS)
            for refused in (lambda: d.abort_request(first), lambda: d.fall_back_to_local("remote"),
                            lambda: d.notify_kv_ready("remote", 5)):
                with pytest.raises(RuntimeError, match="between steps"):
                    refused()
            future.result()

        outs = {}
        for o in d.step(overlap=overlap):
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert seen["loads"] == ["remote"]
        d.abort_request("remote")                         # between steps: allowed
        while d.has_unfinished():
            for o in d.step(overlap=lambda f: f.result()):
                outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert [outs[first], outs[seen["second"]]] == expected


def test_reservation_during_a_step_counts_the_tokens_it_computes(tiny_llama):
    """Reserving while a step runs leaves the block the running request's next token
    needs (its token from this step is not appended yet, but will be)."""
    cfg = EngineConfig(model=tiny_llama, role="decode", block_size=4, num_kv_blocks=9)
    with LLMEngine(cfg) as d:
        d.add_request(list(range(1, 32)), PARAMS)          # 31 tokens: 8 blocks
        d.step()                                           # prefill; its token is the 32nd
        got = []

        def overlap(future):                               # the 32nd token is computed now
            d.add_request([100, 101, 102, 103], PARAMS, request_id="remote",
                          kv_mode=KVMode.LOAD_REMOTE)      # 1 block; 1 is free
            got.extend(d.reserve_kv_loads())
            future.result()

        d.step(overlap=overlap)
        assert got == [] and d.scheduler.blocks.num_free_blocks == 1
        d.step()                                           # the 33rd token takes that block
        assert d.scheduler.num_preemptions == 0


class _TimedEngine(LLMEngine):
    """The real engine, recording each step's (start, end) for the test."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.step_times: list[list[float]] = []

    def step(self, overlap=None):
        span = [time.monotonic(), float("inf")]
        self.step_times.append(span)
        try:
            return super().step(overlap)
        finally:
            span[1] = time.monotonic()


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> str:
    """Wide enough that one 384-token prefill chunk takes a visible time on a CPU."""
    return make_tiny_model(tmp_path_factory.mktemp("wide-llama"), "llama", hidden_size=512,
                           intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
                           num_key_value_heads=2, max_position_embeddings=4096)


def test_kv_target_leaves_while_the_step_in_progress_runs(wide_llama):
    """A remote Generate that arrives while a long step runs gets its KVTarget before
    that step ends (the node receives while the model runs); an Abort arriving then
    waits for the step's end, and a Generate after it keeps its place in line."""
    engine = _TimedEngine(EngineConfig(model=wide_llama, role="decode", block_size=16,
                                       num_kv_blocks=512, max_prefill_chunk=384,
                                       max_num_batched_tokens=384))
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    server = NodeServer(engine, DecodeHandler, f"tcp://127.0.0.1:{port}", "decode-0", "m",
                        heartbeat_s=5.0)
    stop = threading.Event()
    node = threading.Thread(target=server.run, args=(stop,), daemon=True)
    node.start()

    def recv(kind, timeout_s=60.0, where=lambda msg: True):
        deadline = time.monotonic() + timeout_s
        while router.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            ident, frame = router.recv_multipart()
            msg = m.decode(frame)
            if isinstance(msg, kind) and where(msg):
                return msg, time.monotonic()
        raise AssertionError(f"no {kind.__name__} within {timeout_s} s")

    def send(msg):
        router.send_multipart([b"decode-0", m.encode(msg)])

    def early_in_a_step(n):
        while len(engine.step_times) < n:
            time.sleep(0.001)
        time.sleep(0.002)
        return time.monotonic()

    params = {"max_tokens": 4, "ignore_eos": True}
    try:
        recv(m.Register)
        send(m.Registered("decode-0"))
        long_prompt = random_prompts(1, 256, 3000, 3001, seed=1)[0]    # 8 chunks of 384
        send(m.Generate("local-0", long_prompt, params, False))
        sent_at = early_in_a_step(3)                                   # well into the chunks
        send(m.Generate("remote-0", random_prompts(1, 256, 40, 41, seed=2)[0], params, True))
        target, got_at = recv(m.KVTarget)
        assert target.rid == "remote-0"
        running = next(s for s in engine.step_times if s[0] <= sent_at < s[1])
        while running[1] == float("inf"):         # that step has not ended yet
            time.sleep(0.001)
        step_s = running[1] - running[0]
        print(f"\nstep {step_s * 1e3:.1f} ms; Generate -> KVTarget {(got_at - sent_at) * 1e3:.1f} ms;"
              f" KVTarget {(running[1] - got_at) * 1e3:.1f} ms before the step in progress ended")
        assert step_s > 0.02                       # a step long enough to tell the two apart
        assert got_at < running[1]                 # during that step (was: after it)

        aborted_at = early_in_a_step(len(engine.step_times) + 1)
        send(m.Abort("local-0"))                   # frees blocks: waits for the step's end
        send(m.Generate("local-1", random_prompts(1, 256, 20, 21, seed=3)[0], params, False))
        done, _ = recv(m.StepTokens, where=lambda msg: any(
            t.rid == "local-1" and t.finished for t in msg.items))
        assert node.is_alive()
        assert "local-0" not in engine.scheduler.requests
        assert "local-0" not in {t.rid for t in done.items}
        step = next(s for s in engine.step_times if s[0] <= aborted_at < s[1])
        assert step[1] < float("inf")              # that step ended normally
    finally:
        stop.set()
        node.join(30)
        server.close()
        router.close(0)
        ctx.term()
