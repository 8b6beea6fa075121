"""Rank half of the transport connector: the sockets and pools of one TP rank.

A decode rank owns one receiver (bound once at start-up; its endpoint goes
to the driver in the rank's handshake info). A prefill rank owns one sender
per decode engine it sends to, keyed by that engine's rank endpoints, with
the re-sharding plan for ``p -> d = len(endpoints)``; a sender whose links all
died (the decode engine stopped or moved) is closed once its transfers are
reported, so a long-lived prefill rank holds none for departed engines.
Nothing here blocks: handshakes are queued ahead of the first transfer, and
every socket is polled in :meth:`TransferWorker.get_finished` at the end of
each step.

Layer-wise (default): ``save_kv_layer(l)`` sends layer ``l`` of every
request whose final prefill chunk runs in this step, right after that
layer's attention wrote it; the last layer's message is marked final.
Whole-request: ``wait_for_save`` sends all layers in one message per
decode rank after the forward pass.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from disagg.connector.base import KVConnectorMetadata, KVConnectorWorker
from disagg.distributed import get_tp_rank
from transport import transport_classes
from transport.base import TransportError, rank_address
from transport.resharding import ReshardPlan

log = logging.getLogger(__name__)


class TransferWorker(KVConnectorWorker):
    """Sends (prefill role) or receives (decode role) KV blocks for one rank."""

    def __init__(self, config, model_cfg) -> None:
        self.config, self.tcfg = config, config.kv_transfer
        self.role, self.layerwise = config.role, config.kv_layerwise
        self.num_kv_heads = model_cfg.num_kv_heads
        self.p = config.tensor_parallel_size
        self.rank = get_tp_rank()
        self.kv_caches: list[torch.Tensor] = []
        self.pool = None                 # shared pool (shm / cuda_ipc) that senders announce
        self.receiver = None
        self._senders: dict[tuple[str, ...], object] = {}
        self._bytes_sent_closed = 0                  # by senders closed since
        self._saves: dict[str, dict] = {}            # this step's sends
        self._sends: dict[str, dict] = {}            # rid -> {"tids": set, "errors": list}
        self._sent: list[list] = []                  # [rid, error] ready to report

    # ---- set-up -----------------------------------------------------------
    def make_kv_caches(self, num_layers, shape, dtype, device):
        if self.role != "prefill" or self.tcfg.kind != "shm":
            return None
        from transport.shm_transport import ShmKVPool
        from transport.wire import dtype_name
        n, _, h, b, d = shape
        self.pool = ShmKVPool.create(num_layers, n, h, b, d, dtype_name(dtype))
        return self.pool.layers

    def register_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        self.kv_caches = kv_caches
        if self.role == "decode":
            _, receiver_cls = transport_classes(self.tcfg.kind)
            cfg = dataclasses.replace(self.tcfg, address=rank_address(self.tcfg.address, self.rank))
            self.receiver = receiver_cls(cfg, kv_caches, tp_rank=self.rank, tp_size=self.p)
        elif self.tcfg.kind == "cuda_ipc":
            from transport.cuda_ipc import CudaIpcPool
            self.pool = CudaIpcPool(kv_caches)

    def handshake_info(self) -> dict:
        return {"endpoint": self.receiver.endpoint} if self.receiver is not None else {}

    def _sender(self, endpoints: tuple[str, ...]):
        """The sender towards one decode engine, connecting (without waiting) on first use."""
        tx = self._senders.get(endpoints)
        if tx is None:
            sender_cls, _ = transport_classes(self.tcfg.kind)
            plan = ReshardPlan(self.num_kv_heads, self.p, len(endpoints))
            tx = sender_cls(self.tcfg, self.pool if self.pool is not None else self.kv_caches,
                            plan, self.rank)
            self._senders[endpoints] = tx
        for q in tx.plan.dst_ranks(self.rank):
            if not tx.connected(q):
                tx.connect(q, endpoints[q], wait=False)
        return tx

    @property
    def num_senders(self) -> int:
        """How many decode engines this rank holds a sender to."""
        return len(self._senders)

    # ---- per step ---------------------------------------------------------
    def bind_metadata(self, meta: KVConnectorMetadata) -> None:
        for rid in meta.extra.get("cancel", ()):
            if self.receiver is not None:
                self.receiver.cancel(rid)
        for rid, load in meta.loads.items():
            self.receiver.expect(rid, load["blocks"], load["epochs"])
        self._saves = {}
        for rid, save in meta.saves.items():
            state = self._sends[rid] = {"tids": set(), "errors": []}
            try:
                tx = self._sender(tuple(save["endpoints"]))
            except (TransportError, ValueError) as exc:
                state["errors"].append(str(exc))
                continue
            if save["src"] and tx.plan.dst_ranks(self.rank):
                self._saves[rid] = {**save, "tx": tx}

    def save_kv_layer(self, layer_idx: int, kv_cache: torch.Tensor, attn_meta) -> None:
        if self.layerwise and self._saves:
            self._send_all((layer_idx, layer_idx + 1), final=layer_idx == len(self.kv_caches) - 1)

    def wait_for_save(self) -> None:
        if not self.layerwise and self._saves:
            self._send_all((0, len(self.kv_caches)), final=True)
        self._saves = {}

    def _send_all(self, layers: tuple[int, int], final: bool) -> None:
        for rid, save in self._saves.items():
            state, tx = self._sends[rid], save["tx"]
            if state["errors"]:
                continue
            for q in tx.plan.dst_ranks(self.rank):
                tid = f"{rid}/{self.rank}->{q}"
                try:
                    tx.send(save["to"], q, save["src"], save["dst"], save["epochs"], layers,
                            transfer_id=tid, final=final)
                    state["tids"].add(tid)
                except (TransportError, ValueError) as exc:
                    state["errors"].append(str(exc))

    def get_finished(self, timeout_s: float = 0.0) -> dict:
        report: dict = {"recv": [], "sent": [], "bytes_sent": 0, "bytes_received": 0}
        if self.receiver is not None:
            self.receiver.poll(timeout_s)
            report["recv"] = sorted(self.receiver.pop_ready())
            report["bytes_received"] = self.receiver.bytes_received
        ended: dict[str, str | None] = {}
        wait = 0.0 if self.receiver is not None else timeout_s
        for key, tx in list(self._senders.items()):
            tx.poll(wait)
            wait = 0.0                                # one idle wait per step, not per link
            for tid, _, error in tx.finished():
                ended[tid] = error
            if tx.idle():                             # every link died, nothing to report
                self._bytes_sent_closed += tx.bytes_sent
                tx.close()
                del self._senders[key]
        report["bytes_sent"] = self._bytes_sent_closed + sum(
            tx.bytes_sent for tx in self._senders.values())
        for rid in list(self._sends):
            state = self._sends[rid]
            for tid in [t for t in state["tids"] if t in ended]:
                state["tids"].discard(tid)
                if ended[tid]:
                    state["errors"].append(ended[tid])
            if not state["tids"]:
                del self._sends[rid]
                report["sent"].append([rid, "; ".join(state["errors"]) or None])
        return report

    def close(self) -> None:
        for tx in self._senders.values():
            tx.close()
        self._senders.clear()
        if self.receiver is not None:
            self.receiver.close()
        if self.pool is not None and hasattr(self.pool, "close"):
            self.pool.close()
