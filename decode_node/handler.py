"""What a decode node does with the router's messages and its engine's outputs."""

from __future__ import annotations

import logging
import time

from disagg.control import messages as m
from disagg.engine.outputs import KVTransferEvent, RequestOutput
from disagg.engine.request import KVMode
from disagg.node.server import RoleHandler
from disagg.sampling_params import SamplingParams

log = logging.getLogger("disagg.decode")


class DecodeHandler(RoleHandler):
    """``Generate`` → a local or load-remote request (a migrated one resumes with the
    output its client already has); outputs → ``KVTarget`` / ``StepTokens``.

    Where a request's prefill ran is reported with its last tokens: "remote"
    when its KV arrived (or its first token alone finished it), "fallback"
    when it was meant to be remote but was prefilled here, else "local".
    """

    role = "decode"

    def __init__(self, engine, send) -> None:
        super().__init__(engine, send)
        self._received_at: dict[str, float] = {}   # rid → Generate arrival, until first sent
        self._remote: dict[str, str] = {}          # rid → "remote" | "fallback" (pending: "")

    def on_message(self, msg) -> None:
        """Admit, feed, fall back or abort a request."""
        if isinstance(msg, m.Generate):
            self._generate(msg)
        elif isinstance(msg, m.FirstToken):
            if not 0 <= msg.token_id < self.engine.model_config.vocab_size:
                # a broken prefill's token would crash the model's embedding: prefill here
                log.error("first token %d for %s is outside the vocabulary; prefilling it here",
                          msg.token_id, msg.rid)
                self.engine.fall_back_to_local(msg.rid)
                return
            try:
                self.engine.notify_kv_ready(msg.rid, msg.token_id)
            except KeyError:        # fell back or aborted meanwhile: computed here instead
                log.info("first token for %s came after it left the KV wait", msg.rid)
        elif isinstance(msg, m.Fallback):
            if self.engine.fall_back_to_local(msg.rid):
                log.info("falling back to local prefill for %s: %s", msg.rid, msg.reason)
        elif isinstance(msg, m.Abort):
            self.engine.abort_request(msg.rid)
            self.forget(msg.rid)
        else:
            log.error("a decode node does not handle %s", type(msg).__name__)

    def _generate(self, msg: m.Generate) -> None:
        now = time.monotonic()
        if self.engine.abort_request(msg.rid):
            # the router presumed this node lost and moved the request back here: its
            # word is the newest, so the copy still running here goes
            log.warning("request %s came again; dropped the copy running here", msg.rid)
            self.forget(msg.rid)
        try:
            # a resumed request (migrated from a lost node) with remote=True is refused
            # by the engine: it prefills its prompt + resumed output here
            self.engine.add_request(msg.prompt_token_ids, SamplingParams.from_dict(msg.params),
                                    request_id=msg.rid,
                                    kv_mode=KVMode.LOAD_REMOTE if msg.remote else KVMode.LOCAL,
                                    resume_token_ids=msg.resume_token_ids)
        except (ValueError, TypeError) as exc:
            log.warning("refused request %s: %s", msg.rid, exc)
            self.send(m.Rejected(msg.rid, str(exc)))
            return
        self._received_at[msg.rid] = now
        if msg.remote:
            self._remote[msg.rid] = ""
            # reserve its blocks now: the KVTarget leaves before the next step, not after it
            self.on_outputs(self.engine.reserve_kv_loads())

    def on_kv_event(self, event: KVTransferEvent) -> None:
        """A remote request's KV landed on every rank."""
        if event.direction == "received" and event.request_id in self._remote:
            self._remote[event.request_id] = "remote"

    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Reserved blocks → ``KVTarget``; the step's tokens → one ``StepTokens``."""
        now = time.monotonic()
        items = []
        for out in outputs:
            rid = out.request_id
            if out.kv_load is not None:
                self.send(m.KVTarget(rid, out.kv_load.to_dict(), out.kv_load.num_local_tokens,
                                     self._received_at.get(rid, now)))
                continue
            if not out.new_token_ids and not out.finished:
                continue
            route = self._route(out) if out.finished else ""
            items.append(m.Tokens(
                rid, list(out.new_token_ids), len(out.output_token_ids),
                [m.logprobs_to_wire(lp) for lp in out.logprobs] if out.logprobs else [],
                out.finished, out.finish_reason, out.text, out.num_cached_tokens, route, now,
                self._received_at.pop(rid, None),
                [m.logprobs_to_wire(lp) for lp in out.prompt_logprobs]
                if out.prompt_logprobs is not None else None))
            if out.finished:
                self.forget(rid)
        if items:
            self.send(m.StepTokens(items))

    def _route(self, out: RequestOutput) -> str:
        """Where a finished request's prefill ran."""
        state = self._remote.get(out.request_id)
        if state is None:
            return "local"
        if state == "remote" or len(out.output_token_ids) <= 1:
            return "remote"
        return "fallback"

    def forget(self, rid: str) -> None:
        """Drop the arrival time and remote state of ``rid``."""
        self._received_at.pop(rid, None)
        self._remote.pop(rid, None)
