"""One generated (or prompt) token's log-probability and its most likely alternatives.

A plain dataclass without torch, so the router can hold and render logprobs
without importing the engine; the sampler produces them, the control messages
carry them (``disagg.control.messages.logprobs_to_wire``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprobs:
    """Log-probability of the chosen token plus the ``k`` most likely ones."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # descending logprob
