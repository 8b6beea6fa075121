"""Stop-string detection over incrementally decoded output text."""

from __future__ import annotations


class StopStringChecker:
    """Finds the first stop string in a request's output text.

    The text is re-decoded from the output token ids each time (tokenizers
    merge bytes across token boundaries, so per-token decoding is wrong), but
    only the tail that could contain a new match is searched.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._searched: dict[str, int] = {}

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def check(self, request_id: str, token_ids: list[int], stops: tuple[str, ...]) -> tuple[str, int] | None:
        """Return ``(stop_string, index_in_text)`` of the earliest match, if any."""
        text = self.decode(token_ids)
        start = max(0, self._searched.get(request_id, 0) - max(len(s) for s in stops) + 1)
        best = None
        for s in stops:
            i = text.find(s, start)
            if i >= 0 and (best is None or i < best[1]):
                best = (s, i)
        self._searched[request_id] = len(text)
        return best

    def final_text(self, request_id: str, token_ids: list[int], stop: tuple[str, int] | None,
                   include_stop: bool) -> str:
        """The output text, cut at the stop string (kept when ``include_stop``)."""
        self._searched.pop(request_id, None)
        text = self.decode(token_ids)
        if stop is not None:
            s, i = stop
            text = text[: i + len(s)] if include_stop else text[:i]
        return text

    def forget(self, request_id: str) -> None:
        self._searched.pop(request_id, None)
