"""The one error type of the OpenAI-compatible API, :class:`ProtocolError`, and the
mapping of a pydantic ``ValidationError`` onto it (:func:`validation_error`)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


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


def _param(loc: tuple) -> str | None:
    """``("messages", 1, "role")`` → ``"messages[1].role"``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _json_type(value: Any) -> str:
    for kind, name in ((type(None), "null"), (bool, "boolean"), ((int, float), "number"),
                       (str, "string"), (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def validation_error(exc: ValidationError) -> ProtocolError:
    """The 400 for a pydantic ``ValidationError`` (its first error, ``param`` = the field)."""
    err = exc.errors(include_url=False)[0]
    kind, loc, msg = err["type"], err["loc"], err["msg"]
    if kind == "json_invalid":
        return bad(None, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}")
    if kind == "model_type" and not loc:
        return bad(None, f"the request body must be a JSON object, got {_json_type(err['input'])}")
    param = (err.get("ctx") or {}).get("param") or _param(loc)
    if kind == "invalid_request":
        return bad(param, msg)
    if kind == "missing":
        return bad(param, f"'{param}' is required")
    got = err.get("input")
    shown = repr(got) if isinstance(got, (bool, int, float, str)) and len(repr(got)) < 60 else ""
    return bad(param, f"'{param}': {msg}" + (f" (got {_json_type(got)} {shown})" if shown else ""))
