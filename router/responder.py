"""Turn one HTTP request's token events into an OpenAI response: whole, or streamed as SSE.

A response covers one or more sequences (``n`` > 1, ``best_of``, several
prompts), each an :class:`router.inflight.Inflight` putting ``(index, event)``
on one shared queue. Sequence ``index`` is prompt-major: prompt ``p``'s copies
are ``p * copies ... p * copies + copies - 1``; with ``best_of`` the ``n``
copies of highest cumulative logprob become choices ``p * n ...``, otherwise
choice index = sequence index. A stream interleaves the choices' chunks, each
carrying its ``index``; :meth:`Responder.render` makes them, and
:class:`router.streaming.SSEResponse` writes them as the events arrive.

Text is decoded by the router (it holds the tokenizer) incrementally, with
what a stream must hold back (incomplete characters, possible stop-string
starts), by :class:`router.detokenizer.OutputText`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from router.detokenizer import OutputText
from router.dispatch import Dispatcher
from router.errors import ProtocolError
from router.inflight import Event, Inflight
from router.openai_responses import (
    SSE_DONE, chat_choice, chat_chunk, chat_logprobs, chat_response, chat_usage_chunk,
    completion_choice, completion_chunk, completion_logprobs, completion_response,
    completion_usage_chunk, concat_logprobs, prompt_logprobs, sse)


@dataclass(frozen=True)
class ResponseSpec:
    """What a response holds: ``copies`` sequences per prompt of which ``n`` are
    returned per prompt (``copies`` > ``n`` only with ``best_of``); ``logprobs``
    the client's ask (None: no logprobs in the response, whatever the engine was
    asked for); ``echo_texts`` the prompts' texts to prepend (completions' ``echo``),
    else None."""

    chat: bool
    n: int = 1
    copies: int = 1
    logprobs: int | None = None
    echo_texts: tuple[str, ...] | None = None
    include_usage: bool = False
    timing: bool = False


@dataclass
class _Sequence:
    """One sequence's progress."""

    req: Inflight
    text: OutputText
    logprobs: list = field(default_factory=list)        # TokenLogprobs per output token
    prompt_logprobs: list | None = None
    finish: str | None = None
    offset: int = 0                                     # completions' next text_offset
    first: bool = True                                  # no chunk sent yet
    timed: bool = False                                 # a chunk carried the request's times

    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for lp in self.logprobs if lp is not None)


class Responder:
    """Builds one HTTP request's response over its sequences ``reqs`` (index order)."""

    def __init__(self, dispatcher: Dispatcher, reqs: list[Inflight], tokenizer, model: str,
                 spec: ResponseSpec) -> None:
        if not reqs or len(reqs) % spec.copies:
            raise ValueError(f"{len(reqs)} sequences is not a multiple of copies={spec.copies}")
        self.d, self.model, self.spec = dispatcher, model, spec
        self.seqs = [_Sequence(r, OutputText(tokenizer, r.params.stop)) for r in reqs]
        self.events: asyncio.Queue = reqs[0].events
        self.id = ("chatcmpl-" if spec.chat else "cmpl-") + reqs[0].rid
        self.created = int(time.time())
        self.prompt_tokens = sum(len(r.prompt) for r in reqs[::spec.copies])
        self.live = len(reqs)            # sequences not yet ended (streaming)
        self.ended = False               # the stream's last bytes were rendered
        if spec.echo_texts is not None:
            for i, seq in enumerate(self.seqs):
                seq.offset = len(spec.echo_texts[i // spec.copies])

    def abort(self) -> None:
        """Free every sequence still running (no-op for those that ended)."""
        for seq in self.seqs:
            self.d.abort(seq.req.rid)

    def _usage(self) -> tuple[int, int]:
        return self.prompt_tokens, sum(len(seq.text.ids) for seq in self.seqs)

    def _logprobs(self, seq: _Sequence, ids: list[int], lps: list) -> dict | None:
        """The response's logprobs for ``ids`` (advances the completion text offset)."""
        if self.spec.logprobs is None or not ids:
            return None
        texts = [seq.text.token_text(t) for t in ids]
        if self.spec.chat:
            return chat_logprobs(texts, lps, seq.text.token_text)
        out = completion_logprobs(texts, lps, seq.offset, seq.text.token_text)
        seq.offset += sum(map(len, texts))
        return out

    def _echo(self, i: int, seq: _Sequence) -> tuple[str, dict | None]:
        """Sequence ``i``'s echoed prompt text and, when logprobs were asked for, its
        prompt logprobs object."""
        text = self.spec.echo_texts[i // self.spec.copies]
        if self.spec.logprobs is None:
            return text, None
        prompt = seq.req.prompt
        if seq.prompt_logprobs is None or len(seq.prompt_logprobs) != len(prompt):
            raise ProtocolError(500, "the serving node did not return the prompt logprobs "
                                     "that echo with logprobs needs", type="server_error")
        return text, prompt_logprobs([seq.text.token_text(t) for t in prompt],
                                     seq.prompt_logprobs, seq.text.token_text)

    def _take(self, seq: _Sequence, event: Event) -> None:
        if event.prompt_logprobs is not None:
            seq.prompt_logprobs = event.prompt_logprobs

    async def whole(self) -> dict:
        """Wait for every sequence; the complete response body (raises ``ProtocolError``).
        Whatever is left running when it returns or raises is aborted."""
        try:
            live = len(self.seqs)
            while live:
                i, event = await self.events.get()
                seq = self.seqs[i]
                if event.error is not None:
                    raise event.error
                self._take(seq, event)
                seq.text.add(event.token_ids)
                seq.logprobs += event.logprobs
                if event.finished:
                    seq.finish = _finish(event)
                    seq.text.finish(event.text)
                    live -= 1
            return self._whole_body()
        finally:
            self.abort()

    def _whole_body(self) -> dict:
        spec, choices = self.spec, []
        for p in range(len(self.seqs) // spec.copies):
            group = list(enumerate(self.seqs))[p * spec.copies:(p + 1) * spec.copies]
            if spec.copies > spec.n:          # best_of: the n most likely, best first
                group = sorted(group, key=lambda s: s[1].cumulative_logprob(),
                               reverse=True)[:spec.n]
            for j, (i, seq) in enumerate(group):
                lps = self._logprobs(seq, seq.text.ids, seq.logprobs)
                if spec.chat:
                    choices.append(chat_choice(p * spec.n + j, seq.text.sent, seq.finish, lps))
                    continue
                text = seq.text.sent
                if spec.echo_texts is not None:
                    echo, echo_lps = self._echo(i, seq)
                    text = echo + text
                    lps = concat_logprobs(echo_lps, lps) if echo_lps is not None else lps
                choices.append(completion_choice(p * spec.n + j, text, seq.finish, lps))
        make = chat_response if spec.chat else completion_response
        return make(self.id, self.model, self.created, choices, *self._usage())

    def render(self, batch: list[tuple[int, Event]]) -> tuple[bytes, list[float]]:
        """The SSE bytes for ``batch`` (``(index, event)`` pairs, in arrival order) and
        the node's send times of the tokens they carry (for the egress metric).

        The bytes after the last sequence's end (or after an error, which ends the
        stream) also carry the usage chunk, when asked for, and ``[DONE]``, and set
        :attr:`ended`: the caller renders nothing more.
        """
        out, sent = [], []
        for i, event in batch:
            chunk, error = self._chunk_or_error(i, event)
            if error is not None:
                out += [sse(error.body()), SSE_DONE]
                self.ended = True
                return b"".join(out), sent
            if chunk is not None:
                out.append(sse(chunk))
            if event.sent_at is not None and event.token_ids:
                sent.append(event.sent_at)
            self.live -= event.finished
        if not self.live:
            if self.spec.include_usage:
                make = chat_usage_chunk if self.spec.chat else completion_usage_chunk
                out.append(sse(make(self.id, self.model, self.created, *self._usage())))
            out.append(SSE_DONE)
            self.ended = True
        return b"".join(out), sent

    def _chunk_or_error(self, i: int, event: Event) -> tuple[dict | None, ProtocolError | None]:
        """Sequence ``i``'s chunk for ``event``, or the error that ends the stream."""
        if event.finish_reason == "abort":
            event.error = _aborted()
        if event.error is None:
            try:
                return self._stream_chunk(i, self.seqs[i], event), None
            except ProtocolError as exc:
                event.error = exc
        return None, event.error

    def _stream_chunk(self, i: int, seq: _Sequence, event: Event) -> dict | None:
        """The chunk for one event of sequence ``i`` (None when there is nothing to send)."""
        self._take(seq, event)
        echo, echo_lps = ("", None)
        if seq.first and self.spec.echo_texts is not None:
            echo, echo_lps = self._echo(i, seq)
        delta = seq.text.end(event.token_ids, event.text) if event.finished \
            else seq.text.add(event.token_ids)
        lps = self._logprobs(seq, event.token_ids, event.logprobs)
        if echo_lps is not None:
            lps = concat_logprobs(echo_lps, lps)
        if not (echo or delta or event.finished or lps is not None):
            return None
        finish = _finish(event) if event.finished else None
        if self.spec.chat:
            chunk = chat_chunk(self.id, self.model, self.created, delta, finish, lps,
                               role_first=seq.first, index=i)
        else:
            chunk = completion_chunk(self.id, self.model, self.created, echo + delta, finish,
                                     lps, index=i)
        seq.first = False
        if self.spec.timing:      # opt-in latency accounting (x-disagg-timing header)
            chunk["disagg_timing"] = self._timing(seq, event)
        return chunk

    @staticmethod
    def _timing(seq: _Sequence, event: Event) -> dict:
        """A chunk's ``disagg_timing``: when the node sent its tokens (None without
        tokens) and, until a chunk has carried the decode node's receipt, the request's
        own times (``time.monotonic()`` of the router and node processes). Later chunks
        carry ``sent_at`` alone: at one chunk per token the instrument should not weigh
        on the fan-out it measures."""
        timing = {"sent_at": event.sent_at if event.token_ids else None}
        if not seq.timed:
            req = seq.req
            timing.update(arrival=req.arrival, ingress_s=req.ingress_s,
                          dispatch_s=req.dispatch_s)
            seq.timed = req.ingress_s is not None
        return timing


def _finish(event: Event) -> str:
    """OpenAI's finish reason for the engine's."""
    if event.finish_reason == "abort":
        raise _aborted()
    return event.finish_reason or "stop"


def _aborted() -> ProtocolError:
    return ProtocolError(503, "the request was aborted by the serving node",
                         code="aborted", type="server_error")


async def wait_or_disconnect(coro, is_disconnected, on_disconnect, poll_s: float = 0.5):
    """Await ``coro`` while polling ``is_disconnected``; call ``on_disconnect`` and
    raise ``asyncio.CancelledError`` if the client left first."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await is_disconnected():
                on_disconnect()
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()
