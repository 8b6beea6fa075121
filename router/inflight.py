"""A request in flight in the router, and the events its HTTP handler receives.

One HTTP request may own several :class:`Inflight` (``n`` > 1, ``best_of``,
several prompts): they share one ``events`` queue and each puts
``(index, event)`` on it, ``index`` being its sequence number in the response.
A streamed response replaces that queue, once its headers are out, with itself
(:class:`router.streaming.SSEResponse`, which writes each event as it comes).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from disagg.sampling_params import SamplingParams
from router.errors import ProtocolError


@dataclass
class Event:
    """What an HTTP handler receives: new tokens, the end, or an error."""

    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)     # TokenLogprobs | None per token
    finished: bool = False
    finish_reason: str | None = None
    text: str | None = None                          # final text (stop strings applied)
    error: ProtocolError | None = None
    sent_at: float | None = None                     # when the node sent these tokens
    prompt_logprobs: list | None = None              # TokenLogprobs | None per prompt token
                                                     # (first event, when asked for)


@dataclass
class Inflight:
    """One request between admission and its end."""

    rid: str
    prompt: list
    params: SamplingParams
    hashes: list
    arrival: float
    decode: str
    prefill: str | None
    route: str                                   # the decision: "local" | "remote"
    events: asyncio.Queue = field(default_factory=asyncio.Queue)   # or an SSEResponse
    num_output: int = 0                          # tokens handed to the client so far
    output_ids: list = field(default_factory=list)   # those tokens (a migration resumes them)
    migrations: int = 0                          # times moved off a lost decode node
    parked_until: float | None = None            # waiting for a decode node until then
                                                 # (monotonic; ``decode`` is "" meanwhile)
    first_token_at: float | None = None
    last_token_at: float | None = None
    transfer_bytes: int = 0
    kv_done: bool = False                        # remote KV delivered (or no longer needed)
    fell_back: bool = False
    ingress_s: float | None = None               # arrival → decode node got it
    dispatch_s: float | None = None              # arrival → Generate left the router
    index: int = 0                               # sequence number within its HTTP response

    def deliver(self, event: Event) -> None:
        """Hand ``event`` to the HTTP handler, as ``(self.index, event)``."""
        self.events.put_nowait((self.index, event))
