"""Well-typed messages with hostile values, one generator per fuzz target.

Each returns a :data:`fuzz_frames.Valid`: given a :class:`fuzz_frames.Hostile`,
one message as ``(header map, frames after the header)``; :class:`FrameFuzzer`
sends it as is (kind ``valid``) or mutates it. Most fields are right most of the
time, so a good share of messages passes decoding and reaches the handlers
(unknown and duplicate request ids, ids outside the vocabulary, targets that
do not fit, epochs of freed blocks ...), while each field goes hostile often
enough that every check sees it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from disagg.control import messages as m
from disagg.sampling_params import SamplingParams
from fuzz_frames import Hostile, Valid, builtins
from transport.messages import Hello, KVBlocks

#: request ids: the router's own ("r0"...), a pool that repeats (duplicates), and random
RIDS = tuple(f"r{i}" for i in range(8)) + tuple(f"fz{i}" for i in range(40))
ROUTER_SENDS = ("Registered", "Refused", "RegisterAgain", "Generate", "Prefill", "FirstToken",
                "Fallback", "Abort", "UplinkReady")
NODE_SENDS = ("Register", "Heartbeat", "KVTarget", "FirstToken", "KVSent", "Tokens",
              "StepTokens", "Rejected", "Drain", "Deregister", "UplinkSwitch")
BAD_ENDPOINTS = ("garbage", "tcp://127.0.0.1:1", "tcp://127.0.0.1", "ipc://", "inproc://x",
                 "tcp://[::1", "tcp://no-such-host.invalid:1")
LOAD_KEYS = ("queued_prefill_tokens", "num_running", "num_waiting", "num_waiting_for_kv",
             "num_pinned", "kv_usage", "num_requests", "num_used_blocks", "num_kv_sends")


def _rid(h: Hostile) -> str:
    return h.rng.choice(RIDS) if h.rng.random() < 0.85 else h.str()


def _maybe(h: Hostile, good, bad, p_good: float = 0.8):
    """``good()`` with probability ``p_good``, else ``bad()``."""
    return good() if h.rng.random() < p_good else bad()


def _logprobs(h: Hostile) -> list | None:
    return h.one_of(lambda: None, lambda: [h.int(), h.float(), [[h.int(), h.float()]]], h.ints,
                    lambda: [h.value()])


def _tokens(h: Hostile) -> m.Tokens:
    r = h.rng
    ids = _maybe(h, lambda: [r.randrange(256) for _ in range(r.randint(0, 3))], h.ints)
    return m.Tokens(_rid(h), ids, h.int(), [_logprobs(h) for _ in range(r.randint(0, 2))],
                    r.random() < 0.5,
                    h.one_of(lambda: None, lambda: "stop", lambda: "abort", h.str),
                    h.one_of(lambda: None, h.str), h.int(),
                    h.one_of(lambda: "local", lambda: "remote", h.str), h.float(),
                    h.one_of(lambda: None, h.float), h.one_of(lambda: None, lambda: [_logprobs(h)]))


def to_router(node_ids: Sequence[str], model: str) -> Valid:
    """What reaches a router's control socket: every message a node sends (about
    unknown requests, for nodes that are not registered, with hostile loads and
    timings) and those nodes never send. ``node_ids``: ids to claim (the real
    node's among them)."""

    def node_id(h: Hostile) -> str:
        return h.rng.choice(node_ids) if h.rng.random() < 0.8 else h.str()

    def gen(h: Hostile) -> tuple[dict, list[bytes]]:
        r = h.rng
        kind = r.choice(NODE_SENDS + NODE_SENDS + ROUTER_SENDS)
        if kind == "Register":
            msg = m.Register(
                node_id(h), h.one_of(lambda: "decode", lambda: "prefill", h.str),
                _maybe(h, lambda: 1, h.int), _maybe(h, lambda: 16, h.int),
                _maybe(h, lambda: model, h.str, 0.5), _maybe(h, lambda: 8192, h.int),
                _maybe(h, lambda: 49152, h.int), _maybe(h, lambda: 256, h.int),
                _maybe(h, lambda: 23040, h.int), h.one_of(lambda: "zmq", lambda: "shm", h.str),
                _maybe(h, lambda: ["tcp://127.0.0.1:1"], lambda: [h.str()]), h.int(), h.str(),
                h.str(), _maybe(h, lambda: [0], h.ints),
                h.one_of(lambda: "", lambda: "cpu", lambda: "cuda", h.str),
                h.one_of(list, lambda: [h.str()]))
        elif kind == "Heartbeat":
            load = {r.choice(LOAD_KEYS) if r.random() < 0.9 else h.str(): h.one_of(h.int, h.float)
                    for _ in range(r.randint(0, 6))}
            steps = [(h.int(), h.int(), h.float()) for _ in range(r.randint(0, 3))]
            msg = m.Heartbeat(node_id(h), load, steps, h.int(), h.int())
        elif kind == "KVTarget":
            msg = m.KVTarget(_rid(h), h.one_of(lambda: {"block_ids": h.ints()}, h.dict), h.int(),
                             h.float())
        elif kind == "FirstToken":
            msg = m.FirstToken(_rid(h), h.int(), _logprobs(h), h.float(), h.float())
        elif kind == "KVSent":
            msg = m.KVSent(_rid(h), h.one_of(lambda: None, h.str), h.float())
        elif kind == "Tokens":
            msg = _tokens(h)
        elif kind == "StepTokens":
            msg = m.StepTokens([_tokens(h) for _ in range(r.choice((0, 1, 3, 12)))])
        elif kind == "Rejected":
            msg = m.Rejected(_rid(h), h.str())
        elif kind in ("Drain", "Deregister", "Registered", "RegisterAgain"):
            msg = m.MESSAGES[kind](node_id(h))
        elif kind == "Refused":
            msg = m.Refused(node_id(h), h.str())
        elif kind == "UplinkSwitch":
            msg = m.UplinkSwitch(node_id(h), h.int())
        else:
            msg = to_node_message(h, kind, node_ids, 49152, 16, ())
        return builtins(msg), []

    return gen


def _params(h: Hostile) -> dict:
    """Sampling params: valid and short, one field hostile, or a hostile map."""
    r = h.rng
    good = SamplingParams(max_tokens=r.randint(1, 6), temperature=0).to_dict()
    pick = r.random()
    if pick < 0.6:
        return good
    if pick < 0.9:
        good[r.choice(list(good)) if r.random() < 0.9 else h.str()] = h.value()
        return good
    return h.dict()


def _target(h: Hostile, rid: str, prompt: list[int], block_size: int,
            endpoints: Sequence[str]) -> dict:
    """A KV target that fits the prompt (often), pointing at ``endpoints`` or worse."""
    r = h.rng
    nblk = -(-len(prompt) // block_size)
    t = {"block_ids": r.sample(range(64), min(nblk, 64)), "epochs": [1] * nblk,
         "num_local_tokens": 0, "num_tokens": len(prompt), "request_id": rid,
         "endpoints": [r.choice(endpoints)] if endpoints and r.random() < 0.5 else
         [r.choice(BAD_ENDPOINTS) if r.random() < 0.8 else h.str()]}
    if r.random() < 0.3:
        t[r.choice(list(t)) if r.random() < 0.9 else h.str()] = h.value()
    return t if r.random() < 0.9 else h.dict()


def to_node_message(h: Hostile, kind: str, node_ids: Sequence[str], vocab: int, block_size: int,
                    endpoints: Sequence[str]) -> m.ControlMessage:
    """One message of ``kind`` as a router would send it, with hostile values."""
    r = h.rng
    rid = _rid(h)
    prompt = _maybe(h, lambda: [r.randrange(vocab) for _ in range(r.randint(1, 40))], h.ints,
                    0.7)
    token = _maybe(h, lambda: r.randrange(vocab), h.int, 0.5)
    if kind == "Generate":
        resume = h.one_of(list, list, lambda: [token], h.ints)
        return m.Generate(rid, prompt, _params(h), r.random() < 0.5, resume)
    if kind == "Prefill":
        return m.Prefill(rid, prompt, _params(h), _target(h, rid, prompt, block_size, endpoints))
    if kind == "FirstToken":
        return m.FirstToken(rid, token, _logprobs(h), h.float(), h.float())
    if kind == "Fallback":
        return m.Fallback(rid, h.str())
    if kind == "Abort":
        return m.Abort(rid)
    if kind == "Registered":
        return m.Registered(r.choice(node_ids) if r.random() < 0.8 else h.str(),
                            h.one_of(lambda: "fuzz-router", h.str))
    if kind == "RegisterAgain":
        return m.RegisterAgain(r.choice(node_ids) if r.random() < 0.8 else h.str())
    if kind == "UplinkReady":
        return m.UplinkReady(r.choice(node_ids) if r.random() < 0.8 else h.str(), h.int())
    return m.Refused(h.str(), h.str())


def to_node(node_ids: Sequence[str], vocab: int, block_size: int,
            endpoints: Sequence[str] = ()) -> Valid:
    """What reaches a node's control socket: what routers send (``Refused`` aside: a
    node exits on it, by design) with hostile values, and what they never send.
    ``endpoints``: KV receivers a ``Prefill`` target may name besides bad ones."""
    kinds = [k for k in ROUTER_SENDS if k != "Refused"]
    others = to_router(node_ids, "SmolLM2-135M-Instruct")

    def gen(h: Hostile) -> tuple[dict, list[bytes]]:
        r = h.rng
        if r.random() < 0.15:          # messages a router never sends
            msg = others(h)[0]
            if msg["type"] != "Refused":
                return msg, []
        kind = r.choice(kinds + ["Generate", "Generate", "FirstToken", "Prefill"])
        return builtins(to_node_message(h, kind, node_ids, vocab, block_size, endpoints)), []

    return gen


# ---------------------------------------------------------------- KV headers
@dataclass(frozen=True)
class KVGeometry:
    """A receiver's pool: layers, blocks, KV heads, block size, head dim, dtype."""

    layers: int
    blocks: int
    heads: int
    block_size: int
    head_dim: int
    dtype: str = "float32"

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2


def kv_messages(g: KVGeometry, victims: dict[str, tuple[list[int], list[int]]],
                pools: Sequence[dict] = ()) -> Valid:
    """KV_BLOCKS headers and frames aimed at ``victims`` (request id → expected dst
    blocks and epochs) or at nothing, and HELLOs with hostile pools; ``pools``:
    shared pools (their ``info()``: a real one among them) a HELLO may announce
    and a header may copy from."""
    names = list(victims)
    pool_names = [p["name"] for p in pools]

    def gen(h: Hostile) -> tuple[dict, list[bytes]]:
        r = h.rng
        if r.random() < 0.08:
            pool = h.one_of(dict, lambda: dict(r.choice(pools)) if pools else {},
                            lambda: {**r.choice(pools), r.choice(["name", "num_blocks", "dtype"]):
                                     h.value()} if pools else {},
                            lambda: {"kind": r.choice(("shm", "cuda_ipc", h.str())),
                                     "name": h.str(), "num_layers": h.int(), "dtype": h.str()},
                            h.dict)
            hello = Hello(tp_rank=h.int(), tp_size=h.int(), num_layers=g.layers,
                          num_blocks=g.blocks, num_kv_heads=g.heads, block_size=g.block_size,
                          head_dim=g.head_dim, dtype=g.dtype, pool=pool)
            return builtins(hello), []
        rid = r.choice(names) if names and r.random() < 0.85 else h.str()
        blocks, epochs = victims.get(rid, ([r.randrange(g.blocks)], [1]))
        n = r.randint(1, len(blocks))
        start = r.randrange(len(blocks) - n + 1)
        dst = _maybe(h, lambda: blocks[start:start + n], h.ints, 0.85)
        ep = _maybe(h, lambda: epochs[start:start + n], lambda: [h.int() for _ in dst[:64]], 0.85)
        src = _maybe(h, lambda: [r.randrange(g.blocks) for _ in dst[:g.blocks]], h.ints, 0.9)
        first = r.randrange(g.layers)
        last = r.randint(first + 1, g.layers)
        layers = _maybe(h, lambda: [first, last], h.ints, 0.9)
        heads = _maybe(h, lambda: [[i, i] for i in range(g.heads)],
                       lambda: [[h.int(), h.int()] for _ in range(r.randint(0, 3))], 0.85)
        nb = len(dst)
        shape = _maybe(h, lambda: [nb, 2, len(heads), g.block_size, g.head_dim], h.ints, 0.9)
        # frames as the header implies (none past the pool's size: they would only be big)
        frame = nb * 2 * len(heads) * g.block_size * g.head_dim * g.itemsize \
            if nb <= g.blocks and len(heads) <= g.heads else 1
        nl = last - first
        pool = r.choice(pool_names) if pools and r.random() < 0.2 else ""
        header = builtins(KVBlocks(
            request_id=rid, transfer_id=_maybe(h, lambda: f"{rid}/0->0", h.str, 0.9),
            seq=_maybe(h, lambda: r.randint(0, 3), h.int, 0.9), final=r.random() < 0.7,
            layers=layers, dst_block_ids=dst, src_block_ids=src, epochs=ep, heads=heads,
            dtype=_maybe(h, lambda: g.dtype, lambda: r.choice(("float16", "bfloat16", h.str())),
                         0.9),
            frame_shape=shape, total_bytes=_maybe(h, lambda: frame * nl, h.int, 0.9),
            src_pool=pool, lease_deadline=_maybe(h, lambda: time.monotonic() + 5, h.float, 0.7)))
        count = 0 if pool else nl
        frames = _maybe(h, lambda: [r.randbytes(frame) for _ in range(count)],
                        lambda: [r.randbytes(r.choice((0, 1, max(frame - 1, 0), frame + 1, frame)))
                                 for _ in range(r.choice((0, 1, count, count + 1, 64)))], 0.85)
        return header, frames

    return gen
