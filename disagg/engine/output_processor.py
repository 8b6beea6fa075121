"""Turn request state into what the caller sees: stop checks, text, outputs."""

from __future__ import annotations

from disagg.engine.outputs import RequestOutput
from disagg.engine.request import Request, RequestStatus
from disagg.engine.stop_strings import StopStringChecker


class OutputProcessor:
    """Ends requests on stop tokens/strings and builds their :class:`RequestOutput`."""

    def __init__(self, scheduler, tokenizer) -> None:
        self.scheduler = scheduler
        self.stops = StopStringChecker(tokenizer) if tokenizer is not None else None
        self._stop_hits: dict[str, tuple[str, int]] = {}

    def finish_if_stopped(self, req: Request) -> bool:
        """Finish ``req`` if its newest token ends it; True when it did."""
        status = self.scheduler.check_stop(req) or self._check_stop_string(req)
        if status is not None:
            self.scheduler.finish(req, status)
        return status is not None

    def _check_stop_string(self, req: Request) -> RequestStatus | None:
        if not req.params.stop:
            return None
        hit = self.stops.check(req.request_id, req.output_token_ids, req.params.stop)
        if hit is None:
            return None
        self._stop_hits[req.request_id] = hit
        req.stop_reason = hit[0]
        return RequestStatus.FINISHED_STOPPED

    def build(self, req: Request, new: list[int], logprobs=None, kv_load=None) -> RequestOutput:
        """``req``'s output for this step; finished ones carry reason, text and KV export.

        The first output with a token also carries the prompt logprobs, if asked for.
        """
        done = req.status.finished or req.status is RequestStatus.PINNED
        out = RequestOutput(req.request_id, new, req.output_token_ids, req.num_prompt_tokens,
                            max(req.num_cached_tokens, 0), finished=done,
                            logprobs=logprobs or [], kv_load=kv_load)
        if new and req.needs_prompt_logprobs:
            out.prompt_logprobs = req.take_prompt_logprobs()
        if done:
            out.finish_reason = "length" if req.status is RequestStatus.PINNED else req.status.value
            out.stop_reason = req.stop_reason
            if req.status is RequestStatus.PINNED:
                out.kv_export = self.scheduler.kv_export(req)
            if self.stops is not None:
                out.text = self.stops.final_text(req.request_id, req.output_token_ids,
                                                 self._stop_hits.pop(req.request_id, None),
                                                 req.params.include_stop_str_in_output)
        return out

    def forget(self, request_id: str) -> None:
        """Drop per-request stop-string state (aborted requests)."""
        self._stop_hits.pop(request_id, None)
        if self.stops is not None:
            self.stops.forget(request_id)
