"""OpenAI-compatible request shapes for ``/v1/completions`` and ``/v1/chat/completions``.

Bodies arrive already JSON-decoded; :func:`parse_completion_request` and
:func:`parse_chat_request` validate them strictly into frozen dataclasses or
raise :class:`ProtocolError` (status 400, ``param`` naming the field) - never
anything else. Unknown fields are ignored on purpose: OpenAI SDKs and
benchmark tools send extras (``presence_penalty``, ``logit_bias``,
``response_format``, ...) and refusing them would break those clients; they
have no effect here. Fields we know but cannot honour (``n`` != 1,
``echo``, prompt batches) are refused with a clear message instead.

The response builders, SSE framing and logprob converters live in
:mod:`router.openai_responses` and are re-exported here, so callers need only
``from router.protocol import ...``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from disagg.sampling_params import MAX_LOGPROBS
from router.openai_responses import (  # noqa: F401  (re-exported API)
    FINISH_REASONS, SSE_DONE, chat_chunk, chat_logprobs, chat_response, chat_usage_chunk,
    completion_chunk, completion_logprobs, completion_response, completion_usage_chunk,
    new_request_id, sse, usage)
from router.request_fields import (  # noqa: F401  (ProtocolError is re-exported)
    ProtocolError, bad, is_int, read_bool, read_include_usage, read_int, read_number,
    read_prompt, read_stop, read_str, type_name)

CHAT_ROLES = ("system", "user", "assistant")
"""Message roles a chat request may use."""


@dataclass(frozen=True, kw_only=True)
class _SamplingRequest:
    """Knobs shared by both endpoints. ``max_tokens=None`` means "caller decides"."""

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool | None = None   # stream_options.include_usage; None = no stream_options
    ignore_eos: bool = False
    user: str | None = None

    def _engine_logprobs(self) -> int | None:
        """The engine's ``logprobs`` value (None = none, k = top-k alternatives)."""
        raise NotImplementedError

    def sampling_kwargs(self, default_max_tokens: int | None = None) -> dict[str, Any]:
        """Keyword arguments for :class:`disagg.sampling_params.SamplingParams`.

        ``default_max_tokens`` is used when the request gave no ``max_tokens``
        (chat requests; see :func:`default_max_tokens`). ``top_k=-1`` maps to
        SamplingParams' "off" value 0.
        """
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        if max_tokens is None:
            raise ValueError("the request has no max_tokens; pass default_max_tokens "
                             "(e.g. default_max_tokens(num_prompt_tokens, max_model_len))")
        return {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": 0 if self.top_k == -1 else self.top_k, "seed": self.seed,
                "stop": self.stop, "ignore_eos": self.ignore_eos,
                "logprobs": self._engine_logprobs()}


@dataclass(frozen=True, kw_only=True)
class CompletionRequest(_SamplingRequest):
    """A validated ``POST /v1/completions`` body (one prompt, one choice).

    ``prompt`` is the text, or the token ids as a tuple. ``logprobs`` is
    OpenAI's integer form: None, or how many alternatives per token (0..20).
    """

    prompt: str | tuple[int, ...]
    max_tokens: int = 16
    logprobs: int | None = None

    def _engine_logprobs(self) -> int | None:
        return self.logprobs


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn: ``role`` in :data:`CHAT_ROLES`, plain-text ``content``."""

    role: str
    content: str


@dataclass(frozen=True, kw_only=True)
class ChatCompletionRequest(_SamplingRequest):
    """A validated ``POST /v1/chat/completions`` body (one choice).

    ``max_tokens`` merges ``max_completion_tokens`` and the deprecated
    ``max_tokens``; None when neither was given. ``logprobs`` is OpenAI's
    boolean and ``top_logprobs`` the number of alternatives (0..20).
    """

    messages: tuple[ChatMessage, ...]
    logprobs: bool = False
    top_logprobs: int = 0

    def _engine_logprobs(self) -> int | None:
        return self.top_logprobs if self.logprobs else None


def _require_dict(body: Any) -> dict:
    """The body must be a JSON object."""
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {type_name(body)}")
    return body


def _common(body: dict) -> dict[str, Any]:
    """Validate the fields both endpoints share; returns dataclass kwargs."""
    top_k = read_int(body, "top_k", -1, lo=-1)
    stream = read_bool(body, "stream", False)
    return dict(
        model=read_str(body, "model", required=True, allow_empty=False),
        temperature=read_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=read_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=top_k,
        seed=read_int(body, "seed", None, lo=0, hi=2**64 - 1),
        stop=read_stop(body),
        stream=stream,
        include_usage=read_include_usage(body, stream),
        ignore_eos=read_bool(body, "ignore_eos", False),
        user=read_str(body, "user"),
    )


def _refuse_n(body: dict) -> None:
    """Only one choice per request is supported."""
    if read_int(body, "n", 1) != 1:
        raise bad("n", "only n=1 is supported (one choice per request)")


def parse_completion_request(body: Any) -> CompletionRequest:
    """Validate a decoded ``/v1/completions`` body; raises :class:`ProtocolError`."""
    body = _require_dict(body)
    kwargs = _common(body)
    _refuse_n(body)
    if read_bool(body, "echo", False):
        raise bad("echo", "'echo' is not supported")
    return CompletionRequest(
        prompt=read_prompt(body),
        max_tokens=read_int(body, "max_tokens", 16, lo=1),
        logprobs=read_int(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS),
        **kwargs)


def _read_messages(body: dict) -> tuple[ChatMessage, ...]:
    """``messages``: a non-empty list of ``{"role", "content": str}`` objects."""
    value = body.get("messages")
    if value is None:
        raise bad("messages", "'messages' is required")
    if not isinstance(value, list) or not value:
        raise bad("messages", "'messages' must be a non-empty array of message objects")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise bad(f"messages[{i}]", f"'messages[{i}]' must be an object, "
                                        f"got {type_name(msg)}")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise bad(f"messages[{i}].role", f"'messages[{i}].role' must be one of "
                                             f"{', '.join(CHAT_ROLES)}; got {role!r}")
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"'messages[{i}].content' must be a string, "
                                                f"got {type_name(content)}")
        out.append(ChatMessage(role=role, content=content))
    return tuple(out)


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded ``/v1/chat/completions`` body; raises :class:`ProtocolError`."""
    body = _require_dict(body)
    kwargs = _common(body)
    _refuse_n(body)
    legacy = read_int(body, "max_tokens", None, lo=1)
    newer = read_int(body, "max_completion_tokens", None, lo=1)
    if legacy is not None and newer is not None and legacy != newer:
        raise bad("max_completion_tokens", "'max_tokens' and 'max_completion_tokens' disagree "
                                           f"({legacy} vs {newer}); send only one")
    logprobs = read_bool(body, "logprobs", False)
    top = read_int(body, "top_logprobs", None, lo=0, hi=MAX_LOGPROBS)
    if top is not None and not logprobs:
        raise bad("top_logprobs", "'top_logprobs' requires 'logprobs' to be true")
    return ChatCompletionRequest(
        messages=_read_messages(body), max_tokens=newer if newer is not None else legacy,
        logprobs=logprobs, top_logprobs=top or 0, **kwargs)


def _context_error(message: str, param: str) -> ProtocolError:
    return ProtocolError(400, message, param=param, code="context_length_exceeded")


def check_context(num_prompt_tokens: int, max_tokens: int, max_model_len: int,
                  param: str = "prompt") -> None:
    """Refuse a request whose prompt plus completion cannot fit the model's context.

    ``param`` is ``"prompt"`` for completions and ``"messages"`` for chat; it
    also picks the wording. Raises :class:`ProtocolError` (400,
    code ``context_length_exceeded``).
    """
    where = "in the messages" if param == "messages" else "in the prompt"
    if num_prompt_tokens < 1:
        raise bad(param, f"the {param} is empty after tokenisation; at least one token is needed")
    if num_prompt_tokens + max_tokens > max_model_len:
        raise _context_error(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} {where}, "
            f"{max_tokens} for the completion). Please reduce the length of the {param} or "
            f"completion.", param)


def default_max_tokens(num_prompt_tokens: int, max_model_len: int, param: str = "messages") -> int:
    """``max_tokens`` for a request that gave none: whatever context is left.

    Raises :class:`ProtocolError` when the prompt alone leaves no room.
    """
    if num_prompt_tokens >= max_model_len:
        raise _context_error(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {num_prompt_tokens} input tokens. Please reduce the length of the "
            f"{param}.", param)
    return max_model_len - num_prompt_tokens


def check_prompt_token_ids(token_ids: Sequence[int], vocab_size: int) -> None:
    """Refuse client-supplied token ids the model's vocabulary does not contain."""
    for i, tok in enumerate(token_ids):
        if tok >= vocab_size:
            raise bad("prompt", f"token id {tok} at position {i} is out of range "
                                f"(the vocabulary has {vocab_size} tokens)")


def check_model(requested: str, served: Sequence[str]) -> None:
    """404 ``model_not_found`` unless ``requested`` is one of the ``served`` names."""
    if requested not in served:
        raise ProtocolError(404, f"The model `{requested}` does not exist. Served: "
                                 f"{', '.join(served)}.", param="model", code="model_not_found")
