"""Strict field readers for already-JSON-decoded OpenAI request bodies.

Every reader takes the body (a dict) and a field name, returns a validated
Python value and raises :class:`ProtocolError` (HTTP 400, ``param`` = the
field's name) for anything else, so a malformed body can never surface as a
``TypeError`` or ``KeyError``. JSON ``null`` means "use the default", as it
does for OpenAI. ``bool`` is never accepted where an int or number is
expected (``True`` is an ``int`` in Python, not in the API).
"""

from __future__ import annotations

import math
from typing import Any


class ProtocolError(Exception):
    """A request the OpenAI-compatible API must refuse, with its HTTP status.

    ``param`` names the offending field (``"max_tokens"``,
    ``"messages[1].role"``) or is ``None``; ``code`` is a machine-readable
    reason such as ``"context_length_exceeded"``. :meth:`body` is the JSON
    error object OpenAI clients understand.
    """

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}`` as a plain dict."""
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return (f"ProtocolError(status={self.status}, message={self.message!r}, "
                f"param={self.param!r}, code={self.code!r})")


def bad(param: str | None, message: str) -> ProtocolError:
    """A 400 ``invalid_request_error`` about ``param``."""
    return ProtocolError(400, message, param=param)


def type_name(value: Any) -> str:
    """JSON-flavoured type name of a decoded value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def is_int(value: Any) -> bool:
    """True for real ints; ``bool`` is not an int here."""
    return isinstance(value, int) and not isinstance(value, bool)


def read_int(body: dict, name: str, default: int | None, lo: int | None = None,
             hi: int | None = None) -> int | None:
    """An optional integer field within ``[lo, hi]``.

    A float with an integral value (``5.0``) is not accepted: OpenAI's schema
    says "integer" and silently truncating would hide client bugs.
    """
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value):
        raise bad(name, f"'{name}' must be an integer, got {type_name(value)} {value!r}")
    if lo is not None and value < lo:
        raise bad(name, f"'{name}' must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise bad(name, f"'{name}' must be <= {hi}, got {value}")
    return value


def read_number(body: dict, name: str, default: float, lo: float, hi: float,
                lo_open: bool = False) -> float:
    """An optional finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise bad(name, f"'{name}' must be a number, got {type_name(value)} {value!r}")
    value = float(value)
    too_low = value <= lo if lo_open else value < lo
    if not math.isfinite(value) or too_low or value > hi:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise bad(name, f"'{name}' must be in {interval}, got {value!r}")
    return value


def read_bool(body: dict, name: str, default: bool) -> bool:
    """An optional boolean field (``0``/``1`` are not booleans)."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"'{name}' must be a boolean, got {type_name(value)} {value!r}")
    return value


def read_str(body: dict, name: str, required: bool = False,
             allow_empty: bool = True) -> str | None:
    """A string field; ``required`` turns a missing or null value into an error."""
    value = body.get(name)
    if value is None:
        if required:
            raise bad(name, f"'{name}' is required")
        return None
    if not isinstance(value, str):
        raise bad(name, f"'{name}' must be a string, got {type_name(value)}")
    if not allow_empty and not value:
        raise bad(name, f"'{name}' must not be empty")
    return value


def read_stop(body: dict, max_count: int = 4) -> tuple[str, ...]:
    """``stop``: null, one non-empty string, or a list of up to ``max_count``."""
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise bad("stop", f"'stop' must be a string or an array of strings, "
                          f"got {type_name(value)}")
    if len(items) > max_count:
        raise bad("stop", f"'stop' accepts at most {max_count} sequences, got {len(items)}")
    for i, s in enumerate(items):
        param = "stop" if isinstance(value, str) else f"stop[{i}]"
        if not isinstance(s, str):
            raise bad(param, f"'{param}' must be a string, got {type_name(s)}")
        if not s:
            raise bad(param, f"'{param}' must not be an empty string")
    return tuple(items)


def read_include_usage(body: dict, stream: bool) -> bool | None:
    """``stream_options.include_usage``; ``None`` when no stream_options given.

    Like OpenAI and vLLM, ``stream_options`` is refused unless ``stream`` is true.
    """
    opts = body.get("stream_options")
    if opts is None:
        return None
    if not isinstance(opts, dict):
        raise bad("stream_options", f"'stream_options' must be an object, "
                                    f"got {type_name(opts)}")
    if not stream:
        raise bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
    value = opts.get("include_usage")
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad("stream_options.include_usage",
                  f"'stream_options.include_usage' must be a boolean, got {type_name(value)}")
    return value


def read_prompt(body: dict) -> str | tuple[int, ...]:
    """``prompt``: a string, a list of token ids, or a one-element list of either.

    Batches (several prompts in one request) are refused: the router streams
    and routes one sequence per request.
    """
    value = body.get("prompt")
    if value is None:
        raise bad("prompt", "'prompt' is required")
    if isinstance(value, list) and value and isinstance(value[0], (str, list)):
        if len(value) != 1:
            raise bad("prompt", f"only one prompt per request is supported, got a batch of "
                                f"{len(value)}; send one request per prompt")
        return _one_prompt(value[0], "prompt[0]")
    return _one_prompt(value, "prompt")


def _one_prompt(value: Any, param: str) -> str | tuple[int, ...]:
    """A single prompt: non-empty text or a non-empty list of token ids >= 0."""
    if isinstance(value, str):
        if not value:
            raise bad(param, f"'{param}' must not be empty")
        return value
    if not isinstance(value, list):
        raise bad(param, f"'{param}' must be a string or an array of token ids, "
                         f"got {type_name(value)}")
    if not value:
        raise bad(param, f"'{param}' must not be empty")
    for i, tok in enumerate(value):
        if not is_int(tok) or tok < 0:
            raise bad(f"{param}[{i}]", f"'{param}[{i}]' must be a token id (an integer >= 0), "
                                       f"got {type_name(tok)} {tok!r}")
    return tuple(value)
