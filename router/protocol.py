"""OpenAI request bodies for ``/v1/completions`` and ``/v1/chat/completions`` (pydantic).

:func:`parse_request` validates the raw body bytes with
``model_validate_json`` into a frozen :class:`CompletionRequest` or
:class:`ChatCompletionRequest`, or raises :class:`router.errors.ProtocolError`
(status 400, ``param`` naming the field) - never anything else, whatever the
bytes (invalid UTF-8, 100k nested ``[``...).

Types are strict where the API says so: ``true`` is not an integer, ``5.0`` is
not an integer, ``"1"`` is not a number, ``1`` is not a boolean. JSON ``null``
means "the default". Unknown fields are ignored (logged at DEBUG): SDKs and
benchmark tools send extras such as ``store`` or ``metadata``. Fields this
server cannot honour are refused with a message naming them
(:data:`REFUSED_FIELDS`, ``suffix``, non-text content parts, a non-text
``response_format``) rather than silently dropped.

``n`` > 1 and ``best_of`` become that many engine requests per prompt; a
seeded request's copy ``i`` samples with seed ``(seed + i) mod 2**64``, so the
choices differ yet the whole response is reproducible.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from disagg.sampling_params import MAX_LOGPROBS, SamplingParams
from router.errors import bad, validation_error

log = logging.getLogger("disagg.router")

CHAT_ROLES = ("system", "user", "assistant")
"""Message roles a chat request may use."""

MAX_STOP = 4
"""Stop sequences per request (OpenAI's limit)."""

MAX_N = 128
"""The largest ``n`` (OpenAI's limit); the router's ``max_inflight`` may be lower."""

MAX_BEST_OF = 20
"""The largest ``best_of`` (OpenAI's limit)."""

REFUSED_FIELDS = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "audio": "audio output is not supported",
}
"""Fields either endpoint refuses (when not null), with the reason."""

_SEED_SPACE = 2**64


def _refuse(param: str, message: str) -> PydanticCustomError:
    """A validation error that names its field (``ctx["param"]``) with our own message."""
    return PydanticCustomError("invalid_request", message, {"param": param})


TokenId = Annotated[int, Field(ge=0)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
LogprobCount = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class StreamOptions(BaseModel):
    """``stream_options``: only with ``stream: true``."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    include_usage: bool = False


class ResponseFormat(BaseModel):
    """``response_format``: only ``{"type": "text"}`` (no JSON mode or schemas)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    type: Literal["text"] = "text"

    @field_validator("type", mode="before")
    @classmethod
    def _only_text(cls, value: Any) -> Any:
        if value != "text":
            raise _refuse("response_format", f"'response_format' type {value!r} is not supported;"
                                             f" only 'text'")
        return value


class _Request(BaseModel):
    """Fields and rules both endpoints share (``null`` = default, unknown fields ignored)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, allow_inf_nan=False)

    model: NonEmptyStr
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1, description="-1 = off (vLLM extension)")] = -1
    seed: Annotated[int, Field(ge=0, le=_SEED_SPACE - 1)] | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, description="1 = off (vLLM)")] = 1.0
    logit_bias: dict[int, float] | None = None
    response_format: ResponseFormat | None = None
    ignore_eos: bool = False
    user: str | None = None
    _REFUSED: ClassVar[dict[str, str]] = {}         # endpoint-specific refused fields

    @model_validator(mode="before")
    @classmethod
    def _nulls_unknowns_refusals(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, why in {**REFUSED_FIELDS, **cls._REFUSED}.items():
            if data.get(name) is not None and not (name == "tool_choice"
                                                   and data[name] == "none"):
                raise _refuse(name, f"'{name}' is not supported: {why}")
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            log.debug("ignoring unknown request fields: %s", ", ".join(unknown))
        return {k: v for k, v in data.items() if v is not None and k in cls.model_fields}

    @field_validator("stop", mode="before", json_schema_input_type=Union[
        NonEmptyStr, Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP)]])
    @classmethod
    def _stop(cls, value: Any) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise _refuse("stop", "'stop' must be a string or an array of strings")
        if len(items) > MAX_STOP:
            raise _refuse("stop", f"'stop' accepts at most {MAX_STOP} sequences, got {len(items)}")
        for i, s in enumerate(items):
            param = "stop" if isinstance(value, str) else f"stop[{i}]"
            if not isinstance(s, str) or not s:
                raise _refuse(param, f"'{param}' must be a non-empty string")
        return tuple(items)

    @field_validator("logit_bias", mode="plain", json_schema_input_type=dict[
        Annotated[str, Field(pattern=r"^[0-9]+$")], Annotated[float, Field(ge=-100, le=100)]])
    @classmethod
    def _logit_bias(cls, value: Any) -> dict[int, float]:
        if not isinstance(value, dict):
            raise _refuse("logit_bias", "'logit_bias' must be an object {token id: bias}")
        out = {}
        for key, bias in value.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit()):
                raise _refuse("logit_bias", f"'logit_bias' key {key!r} is not a token id "
                                            f"(a non-negative integer)")
            if (isinstance(bias, bool) or not isinstance(bias, (int, float))
                    or not -100 <= bias <= 100):
                raise _refuse("logit_bias", f"'logit_bias' value for {key} must be a number "
                                            f"in [-100, 100], got {bias!r}")
            out[int(key)] = float(bias)
        return out

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise _refuse("stream_options",
                          "'stream_options' is only allowed when 'stream' is true")
        return self

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def copies(self) -> int:
        """Engine requests per prompt (``best_of`` where given, else ``n``)."""
        return self.n

    @property
    def response_logprobs(self) -> int | None:
        """Alternatives per token the response shows; None = no logprobs in the response."""
        raise NotImplementedError

    def _engine_logprobs(self) -> int | None:
        raise NotImplementedError

    def _prompt_logprobs(self) -> int | None:
        return None

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_tokens`` as the client gave it (None = "whatever context is left")."""
        raise NotImplementedError

    def sampling_params(self, max_tokens: int, copy: int = 0) -> SamplingParams:
        """The engine's :class:`SamplingParams` for copy ``copy`` of a prompt.

        ``max_tokens`` is the resolved budget (see :func:`default_max_tokens`);
        ``top_k=-1`` maps to SamplingParams' "off" value 0; copy ``i`` of a
        seeded request samples with ``(seed + i) mod 2**64``.
        """
        seed = None if self.seed is None else (self.seed + copy) % _SEED_SPACE
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=0 if self.top_k == -1 else self.top_k, seed=seed, stop=self.stop,
            ignore_eos=self.ignore_eos, logprobs=self._engine_logprobs(),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=self.logit_bias or None,
            prompt_logprobs=self._prompt_logprobs())


def _prompt(value: Any, param: str) -> str | tuple[int, ...]:
    """One prompt: non-empty text or a non-empty list of token ids >= 0."""
    if isinstance(value, str):
        if not value:
            raise _refuse(param, f"'{param}' must not be empty")
        return value
    if not isinstance(value, list) or not value:
        raise _refuse(param, f"'{param}' must be a non-empty string or array of token ids")
    for i, tok in enumerate(value):
        if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
            raise _refuse(f"{param}[{i}]", f"'{param}[{i}]' must be a token id (an integer "
                                           f">= 0), got {tok!r}")
    return tuple(value)


_TokenIds = Annotated[list[TokenId], Field(min_length=1)]
_PromptInput = Union[NonEmptyStr, _TokenIds, Annotated[list[NonEmptyStr], Field(min_length=1)],
                     Annotated[list[_TokenIds], Field(min_length=1)]]


class CompletionRequest(_Request):
    """A validated ``POST /v1/completions`` body.

    ``prompt`` is always a tuple of prompts, each text or a tuple of token
    ids; the response has ``len(prompt) * n`` choices, prompt-major.
    ``logprobs`` is OpenAI's integer form (alternatives per token, 0..20).
    ``echo`` prepends the prompt (and, with ``logprobs``, its tokens'
    logprobs, the first one null). ``best_of`` (>= ``n``, not with
    ``stream``) samples that many and returns the ``n`` with the highest
    cumulative logprob. Refused: ``suffix`` and :data:`REFUSED_FIELDS`.
    """

    prompt: tuple[str | tuple[int, ...], ...]
    max_tokens: Annotated[int, Field(ge=1)] = 16
    logprobs: LogprobCount | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1, le=MAX_BEST_OF)] | None = None

    _REFUSED: ClassVar[dict[str, str]] = {
        "suffix": "insertion (text after the completion) is not supported"}

    @field_validator("prompt", mode="plain", json_schema_input_type=_PromptInput)
    @classmethod
    def _prompts(cls, value: Any) -> tuple:
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            return tuple(_prompt(p, f"prompt[{i}]") for i, p in enumerate(value))
        return (_prompt(value, "prompt"),)

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None:
            if self.best_of < self.n:
                raise _refuse("best_of", f"'best_of' ({self.best_of}) must be >= 'n' ({self.n})")
            if self.stream and self.best_of > 1:
                raise _refuse("best_of", "'best_of' cannot be used with 'stream'")
        return self

    @property
    def copies(self) -> int:
        return self.best_of or self.n

    @property
    def requested_max_tokens(self) -> int:
        return self.max_tokens

    @property
    def response_logprobs(self) -> int | None:
        return self.logprobs

    def _engine_logprobs(self) -> int | None:
        if self.logprobs is None and self.copies > self.n:
            return 0                      # best_of ranks by cumulative logprob
        return self.logprobs

    def _prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None


class TextPart(BaseModel):
    """A ``{"type": "text", "text": ...}`` content part (the only kind accepted)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat turn: ``role`` in :data:`CHAT_ROLES`; ``content`` a string or a list of
    text parts (joined with newlines, as vLLM does). Other part types (``image_url``,
    ``input_audio``, ...) and ``tool_calls`` are refused."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    role: Literal["system", "user", "assistant"]
    content: str

    @model_validator(mode="before")
    @classmethod
    def _no_tool_calls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in ("tool_calls", "function_call"):
                if data.get(name) is not None:
                    raise PydanticCustomError("unsupported", f"'{name}' is not supported: "
                                                             f"tool calling is not supported")
        return data

    @field_validator("content", mode="plain",
                     json_schema_input_type=Union[str, Annotated[list[TextPart],
                                                                 Field(min_length=1)]])
    @classmethod
    def _content(cls, value: Any) -> str:
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise PydanticCustomError("content_type", "must be a string or a non-empty array "
                                                      "of text parts")
        texts = []
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise PydanticCustomError(
                    "content_part", f"content part {i} has type {kind!r}; only 'text' parts "
                    f"are supported (no images or audio)")
            if not isinstance(part.get("text"), str):
                raise PydanticCustomError("content_part", f"content part {i} needs a string "
                                                          f"'text'")
            texts.append(part["text"])
        return "\n".join(texts)


class ChatCompletionRequest(_Request):
    """A validated ``POST /v1/chat/completions`` body.

    ``max_completion_tokens`` and the deprecated ``max_tokens`` must agree
    when both are given; neither means "whatever context is left".
    ``logprobs`` is OpenAI's boolean and ``top_logprobs`` the number of
    alternatives (0..20, needs ``logprobs``). Refused: :data:`REFUSED_FIELDS`.
    """

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: LogprobCount | None = None

    @model_validator(mode="after")
    def _cross_checks(self):
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise _refuse("max_completion_tokens",
                          f"'max_tokens' and 'max_completion_tokens' disagree ({self.max_tokens} "
                          f"vs {self.max_completion_tokens}); send only one")
        if self.top_logprobs is not None and not self.logprobs:
            raise _refuse("top_logprobs", "'top_logprobs' requires 'logprobs' to be true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    @property
    def response_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def _engine_logprobs(self) -> int | None:
        return self.response_logprobs


def parse_request(raw: bytes | str, chat: bool) -> CompletionRequest | ChatCompletionRequest:
    """Validate a raw JSON body for one endpoint; raises :class:`ProtocolError` (400)."""
    model = ChatCompletionRequest if chat else CompletionRequest
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None
    except RecursionError:            # belt and braces: pydantic's parser caps depth itself
        raise bad(None, "the request body is nested too deeply") from None
