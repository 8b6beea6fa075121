"""The hostile side of the KV socket fuzz, run in a child process (``tests/test_fuzz_sockets.py``).

:func:`send_hostile` connects three DEALERs (two named, one anonymous) to a KV
receiver, sends it ``frames`` seeded hostile messages (:func:`fuzz_messages.kv_messages`)
and reads every answer. Generating and sending here while the test process runs the
receiver puts the fuzz on both cores.
"""

from __future__ import annotations

import collections
import time

import zmq

from fuzz_frames import FrameFuzzer
from fuzz_messages import KVGeometry, kv_messages
from transport.messages import Ack, Error, Hello
from transport.wire import decode_header

KV_TAGS = ("hello", "kv_blocks", "ack", "error")
BATCH = 256


def _read(dealers: list, replies: collections.Counter, wait_ms: int = 0) -> int:
    """Read every answer that is there (waiting ``wait_ms`` for the first); count them by
    kind and error code."""
    n = 0
    poller = zmq.Poller()
    for d in dealers:
        poller.register(d, zmq.POLLIN)
    for d, _ in poller.poll(wait_ms):
        while True:
            try:
                reply = decode_header(d.recv(zmq.NOBLOCK), (Ack, Error, Hello))
            except zmq.Again:
                break
            replies[reply.code if isinstance(reply, Error) else type(reply).__name__] += 1
            n += 1
    return n


def send_hostile(seed: int, endpoint: str, frames: int, geometry: KVGeometry,
                 victims: dict, pools: list) -> dict:
    """Send ``frames`` hostile messages to the receiver at ``endpoint``; return the
    mutation counts (``kinds``), the answers by kind or code (``replies``) and how many
    messages were answered (``answered``)."""
    fuzzer = FrameFuzzer(seed, kv_messages(geometry, victims, pools), "kind", KV_TAGS)
    ctx = zmq.Context()
    dealers = []
    for ident in (b"fz-0", b"fz-1", None):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDTIMEO, 20_000)       # the receiver stopped reading: fail, not hang
        if ident:
            s.setsockopt(zmq.IDENTITY, ident)
        s.connect(endpoint)
        dealers.append(s)
    replies: collections.Counter = collections.Counter()
    answered = 0
    try:
        for i in range(frames):
            fuzzer.rng.choice(dealers).send_multipart(fuzzer.next())
            if i % BATCH == 0:
                answered += _read(dealers, replies)
        deadline = time.monotonic() + 30
        while answered < frames and time.monotonic() < deadline:
            answered += _read(dealers, replies, 100)
    finally:
        for d in dealers:
            d.close(0)
        ctx.term()
    return {"kinds": fuzzer.counts, "replies": dict(replies), "answered": answered}
