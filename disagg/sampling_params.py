"""Per-request sampling parameters (the OpenAI ``/v1/completions`` knobs we honour).

A :class:`SamplingParams` is immutable and validated on construction, so every
layer below the HTTP front end (router, wire protocol, scheduler, sampler) can
trust it. It crosses process boundaries as a plain dict (:meth:`to_dict` /
:meth:`from_dict`), never pickled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

MAX_LOGPROBS = 20
"""The largest ``logprobs`` a request may ask for (OpenAI's limit)."""

GREEDY_TEMPERATURE_EPS = 1e-5
"""Temperatures below this are treated as greedy: it is the T→0 limit of
sampling, and dividing float32 logits by a tinier number can overflow."""

_SEED_MAX = 2**64 - 1


def _is_int(value: Any) -> bool:
    """True for real ints; ``bool`` is deliberately not accepted as an int."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """True for ints and floats, excluding ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next tokens of one request.

    ``temperature == 0`` (or ``top_k == 1``) means greedy decoding. ``top_k`` of
    0 or -1 disables top-k; ``top_p == 1`` disables nucleus sampling.
    ``logprobs=None`` returns no log-probabilities, ``0`` the sampled token's
    only, ``k > 0`` also the ``k`` most likely alternatives. ``stop`` may be
    given as a string or a list; it is stored as a tuple.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if (not _is_number(self.temperature) or not math.isfinite(self.temperature)
                or self.temperature < 0):
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        object.__setattr__(self, "temperature", float(self.temperature))
        if not _is_number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "top_p", float(self.top_p))
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(
                f"top_k must be an int >= -1 (0 or -1 = disabled), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= _SEED_MAX):
            raise ValueError(f"seed must be None or an int in [0, 2**64 - 1], got {self.seed!r}")
        object.__setattr__(self, "stop", self._normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", self._normalise_stop_ids(self.stop_token_ids))
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.logprobs is not None and (
                not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(
                f"logprobs must be None or an int in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
            object.__setattr__(self, name, float(value))
        if (not _is_number(self.repetition_penalty) or not math.isfinite(self.repetition_penalty)
                or self.repetition_penalty <= 0):
            raise ValueError(
                f"repetition_penalty must be a finite number > 0 (1 = off), "
                f"got {self.repetition_penalty!r}")
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))
        object.__setattr__(self, "logit_bias", self._normalise_logit_bias(self.logit_bias))
        if self.prompt_logprobs is not None and (
                not _is_int(self.prompt_logprobs)
                or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise ValueError(
                f"prompt_logprobs must be None or an int in [0, {MAX_LOGPROBS}], "
                f"got {self.prompt_logprobs!r}")

    @staticmethod
    def _normalise_stop(stop: Any) -> tuple[str, ...]:
        """Accept a str, list or tuple of non-empty strings; return a tuple."""
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a str or a list of str, got {type(stop).__name__}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain only non-empty strings, got {s!r}")
        return tuple(stop)

    @staticmethod
    def _normalise_stop_ids(ids: Any) -> tuple[int, ...]:
        """Accept a list or tuple of non-negative ints; return a tuple."""
        if not isinstance(ids, (list, tuple)):
            raise ValueError(
                f"stop_token_ids must be a list of int, got {type(ids).__name__}")
        for t in ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must contain ints >= 0, got {t!r}")
        return tuple(ids)

    @staticmethod
    def _normalise_logit_bias(bias: Any) -> tuple[tuple[int, float], ...] | None:
        """Accept None, a mapping or ``(id, bias)`` pairs; return sorted pairs or None.

        An empty mapping becomes None (no bias), so "no bias" has one form.
        """
        if bias is None:
            return None
        if isinstance(bias, dict):
            items = list(bias.items())
        elif isinstance(bias, (list, tuple)):
            items = []
            for pair in bias:
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise ValueError(f"logit_bias pairs must be [token_id, bias], got {pair!r}")
                items.append((pair[0], pair[1]))
        else:
            raise ValueError(
                f"logit_bias must be a mapping token_id -> bias, got {type(bias).__name__}")
        out: dict[int, float] = {}
        for tid, b in items:
            if not _is_int(tid) or tid < 0:
                raise ValueError(f"logit_bias token ids must be ints >= 0, got {tid!r}")
            if not _is_number(b) or not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {b!r}")
            if tid in out:
                raise ValueError(f"logit_bias lists token id {tid} twice")
            out[tid] = float(b)
        return tuple(sorted(out.items())) or None

    @property
    def has_penalties(self) -> bool:
        """True when the sampler must adjust this row's logits before picking."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0 or self.logit_bias is not None)

    @property
    def needs_local_prefill(self) -> bool:
        """True when the prompt must be prefilled by the engine that decodes it.

        Prompt logprobs come from the prefill's logits, which a decode node that
        loads KV from a remote prefill node never sees.
        """
        return self.prompt_logprobs is not None

    @property
    def greedy(self) -> bool:
        """True when the next token is simply the argmax of the logits."""
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    @property
    def top_k_enabled(self) -> bool:
        """True when top-k filtering is active (``top_k`` > 0)."""
        return self.top_k > 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-typed dict (lists instead of tuples) for msgpack."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["stop"] = list(self.stop)
        out["stop_token_ids"] = list(self.stop_token_ids)
        out["logit_bias"] = (None if self.logit_bias is None
                             else [[tid, b] for tid, b in self.logit_bias])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"SamplingParams.from_dict needs a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SamplingParams field(s): {', '.join(map(str, unknown))}")
        return cls(**data)
