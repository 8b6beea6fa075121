"""OpenAI-shaped response bodies, stream chunks, SSE framing and logprobs.

Everything returns plain dicts with OpenAI's field names, ready for a JSON
encoder or :func:`sse`. A whole response is ``*_response(...)`` over
``*_choice(...)`` dicts (``index`` 0..k-1). A streamed response is
``sse(chunk)`` per piece of text of one choice (its ``index`` in the chunk),
optionally ``sse(*_usage_chunk(...))`` when the client asked for
``stream_options.include_usage``, then :data:`SSE_DONE`.
"""

from __future__ import annotations

import math
import uuid
from typing import Any, Callable, Sequence

import msgspec

from disagg.logprobs import TokenLogprobs

FINISH_REASONS = ("stop", "length")
"""Finish reasons a response may carry. The engine's ``"abort"`` has no OpenAI
equivalent: an aborted request gets an error body (or stream event) instead."""

SSE_DONE = b"data: [DONE]\n\n"
"""The last event of every OpenAI stream."""

MIN_LOGPROB = -9999.0
"""OpenAI's stand-in for "extremely unlikely"; -inf is not valid JSON."""


def new_request_id(prefix: str) -> str:
    """A unique id such as ``cmpl-3f2a...`` (``prefix`` + ``-`` + 32 hex digits)."""
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
    return f"{prefix}-{uuid.uuid4().hex}"


_JSON = msgspec.json.Encoder()


def sse(obj: Any) -> bytes:
    """One server-sent event: ``b"data: {json}\\n\\n"`` (compact UTF-8 JSON, keys in
    insertion order, by msgspec: ~10x faster than ``json.dumps``, which matters at one
    event per token per stream). A NaN or infinity becomes ``null`` (still valid JSON;
    logprobs are clamped to :data:`MIN_LOGPROB` before they get here)."""
    return b"data: " + _JSON.encode(obj) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _check_finish(finish_reason: str | None, allow_none: bool) -> None:
    """Only OpenAI finish reasons (or None mid-stream) may leave the server."""
    if finish_reason is None and allow_none:
        return
    if finish_reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS}"
                         f"{' or None' if allow_none else ''}, got {finish_reason!r}")


def _completion(id: str, model: str, created: int, choices: list, **extra: Any) -> dict:
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, **extra}


def completion_choice(index: int, text: str, finish_reason: str,
                      logprobs: dict | None = None) -> dict:
    """One choice of a whole ``/v1/completions`` response."""
    _check_finish(finish_reason, allow_none=False)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_response(id: str, model: str, created: int, choices: list[dict],
                        prompt_tokens: int, completion_tokens: int) -> dict:
    """A whole ``/v1/completions`` response (``object: text_completion``) over
    :func:`completion_choice` dicts."""
    return _completion(id, model, created, choices,
                       usage=usage(prompt_tokens, completion_tokens))


def completion_chunk(id: str, model: str, created: int, text: str,
                     finish_reason: str | None = None, logprobs: dict | None = None,
                     index: int = 0) -> dict:
    """One streamed ``/v1/completions`` piece of choice ``index``; ``finish_reason``
    only on that choice's last."""
    _check_finish(finish_reason, allow_none=True)
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return _completion(id, model, created, [choice])


def completion_usage_chunk(id: str, model: str, created: int, prompt_tokens: int,
                           completion_tokens: int) -> dict:
    """The usage-only chunk (no choices) sent before ``[DONE]`` when asked for."""
    return _completion(id, model, created, [], usage=usage(prompt_tokens, completion_tokens))


def chat_choice(index: int, text: str, finish_reason: str, logprobs: dict | None = None) -> dict:
    """One choice of a whole ``/v1/chat/completions`` response."""
    _check_finish(finish_reason, allow_none=False)
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": logprobs, "finish_reason": finish_reason}


def chat_response(id: str, model: str, created: int, choices: list[dict],
                  prompt_tokens: int, completion_tokens: int) -> dict:
    """A whole ``/v1/chat/completions`` response (``object: chat.completion``) over
    :func:`chat_choice` dicts."""
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(id: str, model: str, created: int, text: str | None,
               finish_reason: str | None = None, logprobs: dict | None = None,
               role_first: bool = False, index: int = 0) -> dict:
    """One streamed chat piece of choice ``index`` (``object: chat.completion.chunk``).

    ``role_first=True`` adds ``"role": "assistant"`` to the delta, as OpenAI
    does on a stream's first chunk. ``text=None`` leaves ``content`` out of
    the delta (e.g. a final chunk carrying only ``finish_reason``).
    """
    _check_finish(finish_reason, allow_none=True)
    delta: dict[str, Any] = {"role": "assistant"} if role_first else {}
    if text is not None:
        delta["content"] = text
    choice = {"index": index, "delta": delta, "logprobs": logprobs,
              "finish_reason": finish_reason}
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [choice]}


def chat_usage_chunk(id: str, model: str, created: int, prompt_tokens: int,
                     completion_tokens: int) -> dict:
    """The usage-only chat chunk (empty ``choices``) sent before ``[DONE]``."""
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def _finite(logprob: float) -> float:
    """Clamp -inf/NaN to :data:`MIN_LOGPROB` so the JSON stays valid."""
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


def _check_lengths(token_texts: Sequence[str], lps: Sequence[TokenLogprobs | None]) -> None:
    if len(token_texts) != len(lps):
        raise ValueError(f"{len(token_texts)} token texts but {len(lps)} logprob entries")
    for i, lp in enumerate(lps):
        if lp is None:
            raise ValueError(f"logprob entry {i} is None: the request did not ask for logprobs")


def completion_logprobs(token_texts: Sequence[str], token_logprobs_list: Sequence[TokenLogprobs],
                        text_offset_start: int, decode_token: Callable[[int], str]) -> dict:
    """Engine logprobs -> the ``/v1/completions`` ``logprobs`` object.

    ``token_texts[i]`` is the text the stream emitted for generated token
    ``i``; ``decode_token`` turns an alternative's token id into its text.
    ``top_logprobs[i]`` maps text -> logprob for the engine's top-k and, as
    vLLM does, the sampled token itself (so ``logprobs=0`` still gives one
    entry); where two ids decode to the same text the larger logprob wins.
    ``text_offset`` counts characters from ``text_offset_start``; the next
    streamed chunk starts at ``text_offset_start + sum(map(len, token_texts))``.
    """
    _check_lengths(token_texts, token_logprobs_list)
    offsets, tops, offset = [], [], text_offset_start
    for text, lp in zip(token_texts, token_logprobs_list):
        offsets.append(offset)
        offset += len(text)
        top: dict[str, float] = {}
        for tid, value in [*lp.top, (lp.token_id, lp.logprob)]:
            key = text if tid == lp.token_id else decode_token(tid)
            top[key] = max(top.get(key, MIN_LOGPROB), _finite(value))
        tops.append(top)
    return {"tokens": list(token_texts),
            "token_logprobs": [_finite(lp.logprob) for lp in token_logprobs_list],
            "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs(token_texts: Sequence[str], token_logprobs_list: Sequence[TokenLogprobs | None],
                    decode_token: Callable[[int], str]) -> dict:
    """Prompt logprobs (``echo`` with ``logprobs``) -> a ``/v1/completions`` ``logprobs``
    object for the echoed prompt: like :func:`completion_logprobs` from offset 0, but an
    entry may be None (the first token has no logprob: nothing precedes it), which
    gives ``null`` in ``token_logprobs`` and ``top_logprobs``. Join it with the
    completion's object by :func:`concat_logprobs`."""
    if len(token_texts) != len(token_logprobs_list):
        raise ValueError(f"{len(token_texts)} prompt token texts but "
                         f"{len(token_logprobs_list)} prompt logprob entries")
    present = [(i, lp) for i, lp in enumerate(token_logprobs_list) if lp is not None]
    known = completion_logprobs([token_texts[i] for i, _ in present], [lp for _, lp in present],
                                0, decode_token)
    out: dict[str, list] = {"tokens": list(token_texts),
                            "token_logprobs": [None] * len(token_texts),
                            "top_logprobs": [None] * len(token_texts), "text_offset": []}
    for j, (i, _) in enumerate(present):
        out["token_logprobs"][i] = known["token_logprobs"][j]
        out["top_logprobs"][i] = known["top_logprobs"][j]
    offset = 0
    for text in token_texts:
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def concat_logprobs(first: dict, second: dict | None) -> dict:
    """Two ``/v1/completions`` ``logprobs`` objects, one after the other (``second``'s
    ``text_offset`` must already continue ``first``'s text)."""
    if second is None:
        return first
    return {key: first[key] + second[key] for key in first}


def _chat_entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(token_texts: Sequence[str], token_logprobs_list: Sequence[TokenLogprobs],
                  decode_token: Callable[[int], str]) -> dict:
    """Engine logprobs -> the chat ``logprobs`` object ``{"content": [...]}``.

    Each entry is ``{"token", "logprob", "bytes", "top_logprobs"}`` with the
    engine's top-k alternatives (descending) in ``top_logprobs``. ``bytes``
    is the UTF-8 encoding of the token's text as decoded.
    """
    _check_lengths(token_texts, token_logprobs_list)
    content = []
    for text, lp in zip(token_texts, token_logprobs_list):
        entry = _chat_entry(text, lp.logprob)
        entry["top_logprobs"] = [
            _chat_entry(text if tid == lp.token_id else decode_token(tid), value)
            for tid, value in lp.top]
        content.append(entry)
    return {"content": content}
