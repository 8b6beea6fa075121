"""``OutputText``: a request's output text, decoded incrementally as its tokens arrive.

The router holds the tokenizer, so it turns output ids into text itself. Each
:meth:`OutputText.add` feeds only the new ids to a ``tokenizers``
``DecodeStream``, which re-decodes just the few ids since its last complete
character: the cost per token does not grow with the output (re-decoding all
ids every event was quadratic per request). Two things are held back from a
stream until the request ends:

- an incomplete UTF-8 character (bytes split across tokens): the stream
  yields text only once it no longer ends in ``U+FFFD``;
- when the request has stop strings, the last ``len(longest stop) - 1``
  characters: a stop string may still complete there, and the node's final
  text (stop strings cut) must extend what was sent.

:meth:`OutputText.end` / :meth:`OutputText.finish` then send the rest of the
node's final text (or of the full decode when the node sent none).
"""

from __future__ import annotations

from disagg.model.tokenizer import ModelTokenizer


class OutputText:
    """Incremental output text of one request (see the module docstring)."""

    def __init__(self, tokenizer: ModelTokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        #: every output id so far
        self.ids: list[int] = []
        self.hold = max((len(s) for s in stop), default=1) - 1
        self._stream = tokenizer.decode_stream(skip_special_tokens=True)
        self._sent: list[str] = []      # the pieces sent, in order
        self._held = ""                 # decoded but held back (at most ``hold`` characters)

    @property
    def sent(self) -> str:
        """All text sent so far."""
        if len(self._sent) > 1:
            self._sent = ["".join(self._sent)]
        return self._sent[0] if self._sent else ""

    def add(self, ids: list[int]) -> str:
        """Append ``ids``; the text that may be sent now."""
        if not ids:
            return ""
        self.ids += ids
        piece = self._stream.step(self.tokenizer.tokenizer, ids)
        if not piece:
            return ""
        held = self._held + piece
        cut = len(held) - self.hold
        if cut <= 0:
            self._held = held
            return ""
        delta, self._held = held[:cut], held[cut:]
        self._sent.append(delta)
        return delta

    def end(self, ids: list[int], final_text: str | None) -> str:
        """The request ended with ``ids`` (they may complete a stop string): the rest of its
        final text."""
        self.ids += ids
        return self.finish(final_text)

    def finish(self, final_text: str | None) -> str:
        """The request ended: the rest of its final text (``final_text``, else the full
        decode). Empty if that text does not extend what was sent."""
        text = final_text if final_text is not None else \
            self.tokenizer.decode(self.ids, skip_special_tokens=True)
        sent = self.sent
        delta = text[len(sent):] if text.startswith(sent) else ""
        self._sent, self._held = [text], ""
        return delta

    def token_text(self, token_id: int) -> str:
        """One token's own text, special tokens kept (for logprobs)."""
        return self.tokenizer.token_text(token_id)
