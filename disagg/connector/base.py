"""The KV connector: how an engine's KV blocks meet the outside world.

Modelled on vLLM v1's connector: one connector, two halves that never share
state directly::

      driver process                          every TP rank
    ┌──────────────────────┐  per-step   ┌───────────────────────┐
    │ KVConnectorScheduler │──metadata──▶│ KVConnectorWorker     │
    │ owns block ids and   │ (msgpack-   │ touches device memory │
    │ request lifetimes    │  able dict) │ layer by layer        │
    └──────────────────────┘             └───────────────────────┘
              ▲                                     │
              └──── finished sending / receiving ◀──┘

The scheduler itself implements the three role hooks (prefill-only requests
whose blocks stay pinned, requests whose KV is filled from outside, prefix
look-ups); a connector only moves bytes and reports completions. The default
:class:`NoOpConnector` moves nothing: KV readiness is then signalled through
``LLMEngine.notify_kv_ready`` by whatever data plane the caller uses.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field

import torch


@dataclass
class KVConnectorMetadata:
    """What the worker half must do this step, built by the scheduler half.

    ``loads`` / ``saves`` map request id → block ids (in request order) whose
    KV this step receives / sends. It crosses process boundaries to the TP
    ranks as a plain dict (msgpack), never pickled.
    """

    loads: dict[str, list[int]] = field(default_factory=dict)
    saves: dict[str, list[int]] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"loads": self.loads, "saves": self.saves, "extra": self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> "KVConnectorMetadata":
        return cls(loads=dict(d.get("loads", {})), saves=dict(d.get("saves", {})),
                   extra=dict(d.get("extra", {})))


class KVConnectorScheduler(ABC):
    """Driver-side half: consulted by the scheduler about block lifetimes."""

    def on_blocks_allocated_for_load(self, request_id: str, block_ids: list[int],
                                     num_local_tokens: int) -> None:
        """Blocks were reserved for a request whose KV comes from outside.

        ``block_ids`` cover the whole prompt; the first
        ``num_local_tokens // block_size`` of them are already valid here
        (local prefix-cache hits) and need not be received.
        """

    def on_prefill_finished(self, request_id: str, block_ids: list[int]) -> None:
        """A prefill-only request finished; its blocks stay pinned until released."""

    def on_request_freed(self, request_id: str) -> None:
        """A request's blocks went back to the pool (finished, aborted, released)."""

    def build_metadata(self, scheduled_request_ids: list[str]) -> KVConnectorMetadata:
        """Build this step's metadata for the worker half."""
        return KVConnectorMetadata()


class KVConnectorWorker(ABC):
    """Rank-side half: runs inside every TP rank's forward pass."""

    def register_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        """Called once with the rank's per-layer KV tensors (HND layout)."""

    def bind_metadata(self, meta: KVConnectorMetadata) -> None:
        """Called before each forward pass with the step's metadata."""

    def wait_for_layer_load(self, layer_idx: int) -> None:
        """Block until layer ``layer_idx``'s incoming KV is in place."""

    def save_kv_layer(self, layer_idx: int, kv_cache: torch.Tensor, attn_meta) -> None:
        """Layer ``layer_idx`` was computed; its blocks may be sent now."""

    def wait_for_save(self) -> None:
        """Called after the forward pass: all sends of this step are issued."""

    def get_finished(self) -> tuple[set[str], set[str]]:
        """Request ids whose (sending, receiving) completed since the last call."""
        return set(), set()


class NoOpConnector(KVConnectorScheduler, KVConnectorWorker):
    """The default: both halves do nothing."""


def make_connector(name: str) -> tuple[KVConnectorScheduler, type[KVConnectorWorker]]:
    """Return the scheduler half and the worker-half class for ``name``."""
    if name in ("", "none", "noop"):
        return NoOpConnector(), NoOpConnector
    raise ValueError(f"unknown KV connector {name!r}; available: 'noop'")
