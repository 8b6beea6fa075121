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
``LLMEngine.notify_kv_ready`` by whatever data plane the caller uses. With
``EngineConfig.kv_transfer`` set, :mod:`disagg.connector.transfer_scheduler`
and :mod:`disagg.connector.transfer_worker` move the blocks over
:mod:`transport`; :func:`disagg.connector.factory.make_connector` picks the
pair for a config. This module holds only the interfaces, so the
implementations import it and it imports none of them.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field

import torch


@dataclass
class KVConnectorMetadata:
    """What the worker half must do this step, built by the scheduler half.

    ``loads`` maps request id → what this step starts receiving, ``saves``
    request id → what it sends; the value shapes belong to the connector.
    It crosses process boundaries to the TP ranks as a plain dict (msgpack),
    never pickled.
    """

    loads: dict[str, dict] = field(default_factory=dict)
    saves: dict[str, dict] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"loads": self.loads, "saves": self.saves, "extra": self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> "KVConnectorMetadata":
        return cls(loads=dict(d.get("loads", {})), saves=dict(d.get("saves", {})),
                   extra=dict(d.get("extra", {})))


@dataclass
class KVTransferUpdate:
    """Transfers that completed on every rank since the last step (driver side)."""

    received: list[str] = field(default_factory=list)          # LOAD_REMOTE request ids
    sent: list[tuple[str, str | None]] = field(default_factory=list)   # (request id, error)


class KVConnectorScheduler(ABC):
    """Driver-side half: consulted by the scheduler about block lifetimes."""

    #: whether LOAD_REMOTE requests' KV arrives through this connector (else
    #: ``notify_kv_ready`` alone says the blocks are filled)
    receives_kv: bool = False

    def on_blocks_allocated_for_load(self, request_id: str, block_ids: list[int],
                                     epochs: list[int], num_local_tokens: int) -> None:
        """Blocks were reserved for a request whose KV comes from outside.

        ``block_ids`` cover the whole prompt; the first
        ``num_local_tokens // block_size`` of them are already valid here
        (local prefix-cache hits) and need not be received.
        """

    def on_prefill_finished(self, request_id: str, block_ids: list[int]) -> None:
        """A prefill-only request finished; its blocks stay pinned until released."""

    def on_request_freed(self, request_id: str) -> None:
        """A request's blocks went back to the pool (finished, aborted, released, fell back)."""

    def holds(self, request_id: str) -> bool:
        """Whether a transfer may still read the request's blocks (pins must not expire)."""
        return False

    def has_pending(self) -> bool:
        """Whether transfers are in flight, so the engine must keep polling its ranks."""
        return False

    def build_metadata(self, scheduled: list) -> KVConnectorMetadata:
        """This step's metadata for the worker half; ``scheduled`` is ``[(Request, n_tokens)]``."""
        return KVConnectorMetadata()

    def update(self, reports: list[dict]) -> KVTransferUpdate:
        """Fold one step's per-rank reports (``KVConnectorWorker.get_finished``)."""
        return KVTransferUpdate()


class KVConnectorWorker(ABC):
    """Rank-side half: runs inside every TP rank's forward pass."""

    def make_kv_caches(self, num_layers: int, shape: tuple[int, ...], dtype: torch.dtype,
                       device: torch.device) -> list[torch.Tensor] | None:
        """Allocate the rank's KV caches where the transport needs them (e.g. shared
        memory); ``None`` lets the model runner allocate ordinary tensors."""
        return None

    def register_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        """Called once with the rank's per-layer KV tensors (HND layout)."""

    def handshake_info(self) -> dict:
        """What the driver must know about this rank (e.g. where it receives KV)."""
        return {}

    def bind_metadata(self, meta: KVConnectorMetadata) -> None:
        """Called before each forward pass with the step's metadata."""

    def wait_for_layer_load(self, layer_idx: int) -> None:
        """Block until layer ``layer_idx``'s incoming KV is in place."""

    def save_kv_layer(self, layer_idx: int, kv_cache: torch.Tensor, attn_meta) -> None:
        """Layer ``layer_idx`` was computed; its blocks may be sent now."""

    def wait_for_save(self) -> None:
        """Called after the forward pass: all sends of this step are issued."""

    def get_finished(self, timeout_s: float = 0.0) -> dict:
        """Poll the links (up to ``timeout_s``) and report what completed: a msgpack-able
        dict the scheduler half's :meth:`KVConnectorScheduler.update` folds."""
        return {}

    def close(self) -> None:
        """Release sockets and shared memory."""


class NoOpConnector(KVConnectorScheduler, KVConnectorWorker):
    """The default: both halves do nothing."""

