"""The data a routing policy sees and returns (:mod:`router.policy`).

The router fills a :class:`RouteInput` from the nodes' latest heartbeats
(:class:`NodeLoad`) and its prefix-cache look-ups; a policy answers with a
:class:`Decision` whose ``reason`` is one of :data:`REASONS` (the fixed
/metrics label vocabulary) and whose ``route`` is one of :data:`ROUTES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .estimates import check_count, check_measure

ROUTES = ("local", "remote")
REASONS = ("cost_local_faster", "cost_remote_faster", "fully_cached", "no_prefill_node",
           "always_local", "always_remote", "below_threshold", "prefill_queue_full",
           "above_threshold", "uncalibrated_default", "prompt_logprobs")


@dataclass(frozen=True)
class NodeLoad:
    """A node's load as reported in its heartbeat.

    queued_prefill_tokens: prompt tokens waiting or still to compute.
    num_running: requests decoding; num_waiting: requests not yet scheduled.
    kv_usage: fraction of KV blocks in use (0..1); tp: tensor-parallel degree.
    """

    node_id: str
    role: str
    queued_prefill_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    tp: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise ValueError(f"node_id must be a non-empty string, got {self.node_id!r}")
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"role must be 'prefill' or 'decode', got {self.role!r}")
        for name in ("queued_prefill_tokens", "num_running", "num_waiting"):
            check_count(f"{self.node_id}: {name}", getattr(self, name))
        check_count(f"{self.node_id}: tp", self.tp, 1)
        if check_measure(f"{self.node_id}: kv_usage", self.kv_usage) > 1.0:
            raise ValueError(f"{self.node_id}: kv_usage must be in [0, 1], got {self.kv_usage!r}")


@dataclass(frozen=True)
class RouteInput:
    """Everything a policy sees about one request.

    Cached counts are prefix hits (whole blocks) on the chosen decode and
    prefill nodes; ``prefill=None`` means no healthy prefill node.
    """

    num_prompt_tokens: int
    num_cached_tokens_decode: int
    num_cached_tokens_prefill: int
    kv_bytes_per_token: int
    decode: NodeLoad
    prefill: NodeLoad | None
    block_size: int = 16

    def __post_init__(self) -> None:
        check_count("num_prompt_tokens", self.num_prompt_tokens, 1)
        for name in ("num_cached_tokens_decode", "num_cached_tokens_prefill"):
            check_count(name, getattr(self, name))
            if getattr(self, name) > self.num_prompt_tokens:
                raise ValueError(f"{name}={getattr(self, name)} exceeds "
                                 f"num_prompt_tokens={self.num_prompt_tokens}")
        check_count("kv_bytes_per_token", self.kv_bytes_per_token, 1)
        check_count("block_size", self.block_size, 1)
        if not isinstance(self.decode, NodeLoad) or self.decode.role != "decode":
            raise ValueError(f"decode must be a NodeLoad with role 'decode', got {self.decode!r}")
        if self.prefill is not None and (not isinstance(self.prefill, NodeLoad)
                                         or self.prefill.role != "prefill"):
            raise ValueError(f"prefill must be None or a NodeLoad with role 'prefill', got {self.prefill!r}")

    @property
    def uncached_decode(self) -> int:
        """Tokens a local prefill computes (at least the last one, for its logits)."""
        return max(self.num_prompt_tokens - self.num_cached_tokens_decode, 1)

    @property
    def uncached_prefill(self) -> int:
        """Tokens a remote prefill computes."""
        return max(self.num_prompt_tokens - self.num_cached_tokens_prefill, 1)

    @property
    def transfer_bytes(self) -> int:
        """KV bytes a remote prefill moves: only what the decode node lacks."""
        return (self.num_prompt_tokens - self.num_cached_tokens_decode) * self.kv_bytes_per_token


@dataclass(frozen=True)
class Decision:
    """A routing decision: ``route``, a metrics-label ``reason``, the predicted
    TTFT of each path (``None`` where not predicted) and a debug-log line."""

    route: str
    reason: str
    predicted_local_s: float | None = None
    predicted_remote_s: float | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {self.route!r}")
        if not self.reason:
            raise ValueError("reason must be a non-empty string")

