"""What a prefill node does with the router's messages and its engine's outputs."""

from __future__ import annotations

import logging
import time

from disagg.control import messages as m
from disagg.engine.outputs import KVTransferEvent, RequestOutput
from disagg.node.server import RoleHandler
from disagg.sampling_params import SamplingParams

log = logging.getLogger("disagg.prefill")


class PrefillHandler(RoleHandler):
    """``Prefill`` → a prefill-only request sending its KV to the message's target;
    its first token → ``FirstToken``; the end of its transfer → ``KVSent``."""

    role = "prefill"

    def __init__(self, engine, send) -> None:
        super().__init__(engine, send)
        self._received: dict[str, float] = {}      # rid → when the Prefill arrived
        self._first_token: dict[str, float] = {}   # rid → when its first token left

    def on_message(self, msg) -> None:
        """Start a prefill, or abort one."""
        if isinstance(msg, m.Prefill):
            try:
                self.engine.add_request(msg.prompt_token_ids, SamplingParams.from_dict(msg.params),
                                        request_id=msg.rid, kv_target=msg.target)
            except (ValueError, TypeError) as exc:
                log.warning("refused prefill %s: %s", msg.rid, exc)
                self.send(m.Rejected(msg.rid, str(exc)))
                return
            self._received[msg.rid] = time.monotonic()
        elif isinstance(msg, m.Abort):
            self.engine.abort_request(msg.rid)
            self._received.pop(msg.rid, None)
        else:
            log.error("a prefill node does not handle %s", type(msg).__name__)

    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Send each finished prefill's first token to the router."""
        now = time.monotonic()
        for out in outputs:
            started = self._received.pop(out.request_id, None)
            if started is None or out.kv_export is None:
                continue                     # aborted, or an abort's final output
            self._first_token[out.request_id] = now
            self.send(m.FirstToken(out.request_id, out.kv_export.first_token_id,
                                   m.logprobs_to_wire(out.logprobs[0] if out.logprobs else None),
                                   now - started, now))

    def forget(self, rid: str) -> None:
        """Drop the timings kept for ``rid``."""
        self._received.pop(rid, None)
        self._first_token.pop(rid, None)

    def on_kv_event(self, event: KVTransferEvent) -> None:
        """Report the end of a send (an error makes the router fall back)."""
        if event.direction != "sent":
            return
        now = time.monotonic()
        first = self._first_token.pop(event.request_id, now)
        self._received.pop(event.request_id, None)
        if event.error:
            log.warning("KV send for %s failed: %s", event.request_id, event.error)
        self.send(m.KVSent(event.request_id, event.error, now - first))
