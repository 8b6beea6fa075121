"""Checks of a validated request against the served model: name, context, vocabulary.

Each raises :class:`router.errors.ProtocolError` (404 for an unknown model,
400 with ``param`` otherwise; ``code`` ``context_length_exceeded`` when the
prompt and completion cannot fit).
"""

from __future__ import annotations

from typing import Sequence

from router.errors import ProtocolError, bad


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


def check_token_ids(token_ids: Sequence[int], vocab_size: int, param: str = "prompt") -> None:
    """Refuse client-supplied token ids (a prompt's, ``logit_bias`` keys) outside the
    model's vocabulary."""
    for i, tok in enumerate(token_ids):
        if tok >= vocab_size:
            raise bad(param, f"token id {tok} at position {i} of '{param}' is out of range "
                             f"(the vocabulary has {vocab_size} tokens)")


def check_model(requested: str, served: Sequence[str]) -> None:
    """404 ``model_not_found`` unless ``requested`` is one of the ``served`` names."""
    if requested not in served:
        raise ProtocolError(404, f"The model `{requested}` does not exist. Served: "
                                 f"{', '.join(served)}.", param="model", code="model_not_found")
