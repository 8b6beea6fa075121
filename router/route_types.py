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
           "above_threshold", "uncalibrated_default", "prompt_logprobs",
           "shared_compute_local_faster")
DEVICES = ("", "cpu", "cuda")       # "" = not reported (an older node)


@dataclass(frozen=True)
class Compute:
    """What a node computes on, as it registered (all empty = not reported).

    machine: the kernel's boot id (else the hostname): equal for every
    container of one machine, so CPU numbers compare between them.
    cpus: the cores the node may run on; gpus: its ranks' GPU UUIDs;
    device: "cpu" | "cuda".
    """

    machine: str = ""
    cpus: frozenset[int] = frozenset()
    gpus: frozenset[str] = frozenset()
    device: str = ""

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        for cpu in self.cpus:
            check_count("cpu", cpu)

    def share_on(self, other: "Compute") -> float:
        """The fraction of this node's compute that runs on ``other``'s (0..1).

        GPU nodes: the share of this node's GPUs that ``other`` also uses. CPU
        nodes on one machine: the share of this node's cores in ``other``'s CPU
        set (its threads spread over its cores, so that share of its work
        competes with ``other``). 0 for different machines or devices, and
        whenever either side did not report (nothing is assumed shared)."""
        if self.device != other.device:
            return 0.0
        if self.device == "cuda" and self.gpus:
            return len(self.gpus & other.gpus) / len(self.gpus)
        if self.device == "cpu" and self.machine and self.machine == other.machine and self.cpus:
            return len(self.cpus & other.cpus) / len(self.cpus)
        return 0.0


@dataclass(frozen=True)
class NodeLoad:
    """A node's load as reported in its heartbeat, and its compute as registered.

    queued_prefill_tokens: prompt tokens waiting or still to compute.
    num_running: requests decoding; num_waiting: requests not yet scheduled.
    kv_usage: fraction of KV blocks in use (0..1); tp: tensor-parallel degree.
    compute: what the node computes on (:class:`Compute`).
    """

    node_id: str
    role: str
    queued_prefill_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    tp: int = 1
    compute: Compute = Compute()

    def __post_init__(self) -> None:
        if not isinstance(self.compute, Compute):
            raise ValueError(f"{self.node_id}: compute must be a Compute, got {self.compute!r}")
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
    def shared_compute(self) -> float:
        """The fraction of the prefill node's compute that runs on the decode
        node's cores or GPUs (0 = disjoint or unknown, 1 = all shared)."""
        return 0.0 if self.prefill is None else self.prefill.compute.share_on(self.decode.compute)

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

