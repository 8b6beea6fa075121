"""The one error type of the OpenAI-compatible API: :class:`ProtocolError`."""

from __future__ import annotations

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
