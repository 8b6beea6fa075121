"""Driver half of the transport connector: what each rank sends or expects, and when it is done.

The driver never touches KV memory. Per step it tells the ranks (through
:class:`~disagg.connector.base.KVConnectorMetadata`) which requests start
loading, which prefill-only requests send in this step, and which loads were
cancelled; after the step it folds the ranks' reports::

    decode engine (d ranks)                      prefill engine (p ranks)
    admit LOAD_REMOTE → loads[rid] = blocks      add_request(kv_target=...)
      every rank: receiver.expect(...)           final prefill chunk scheduled →
                                                   saves[rid] = src/dst blocks, endpoints
                      ◀── KV_BLOCKS per layer ──   every rank sends its heads
      rank reports "recv rid"                      rank reports "sent rid" once ACKed
    all d ranks reported → KV received           all p ranks reported → unpin blocks

A load counts as received only when *every* rank has its heads; a send counts
as done only when every rank's transfers ended (acknowledged, rejected or
their lease ran out), because until then a rank may still read the blocks.
"""

from __future__ import annotations

from disagg.connector.base import KVConnectorMetadata, KVConnectorScheduler, KVTransferUpdate
from disagg.engine.outputs import KVLoadTarget
from disagg.engine.request import KVMode
from transport.resharding import ReshardPlan


def check_kv_target(target: KVLoadTarget | dict, num_tokens: int, block_size: int,
                    num_kv_heads: int, prefill_tp: int) -> KVLoadTarget:
    """Validate where a prefill-only request's KV goes (``ValueError`` on any mismatch)."""
    if isinstance(target, dict):
        target = KVLoadTarget.from_dict(target)
    nblk = -(-num_tokens // block_size)
    if target.num_tokens != num_tokens or len(target.block_ids) != nblk \
            or len(target.epochs) != nblk or not 0 <= target.num_local_tokens <= num_tokens:
        raise ValueError(f"kv_target does not fit this prompt: {num_tokens} tokens need "
                         f"{nblk} blocks, the target has {target.num_tokens} tokens, "
                         f"{len(target.block_ids)} blocks, {len(target.epochs)} epochs, "
                         f"{target.num_local_tokens} local tokens")
    if not target.request_id or not target.endpoints:
        raise ValueError("kv_target needs the decode request id and its ranks' endpoints")
    ReshardPlan(num_kv_heads, prefill_tp, len(target.endpoints))   # decode TP must fit the heads
    return target


class TransferScheduler(KVConnectorScheduler):
    """Tracks in-flight loads and sends for one engine across its TP ranks."""

    receives_kv = True

    def __init__(self, config) -> None:
        self.block_size = config.block_size
        self.num_ranks = config.tensor_parallel_size
        self._new_loads: dict[str, dict] = {}        # announced to ranks in the next step
        self._loading: dict[str, set[int]] = {}      # rid -> ranks that have all their heads
        self._cancel: list[str] = []
        self._sending: dict[str, tuple[set[int], list[str]]] = {}   # rid -> (ranks done, errors)
        self.num_received = 0
        self.num_sent = 0
        self.num_send_failures = 0

    # ---- scheduler hooks --------------------------------------------------
    def on_blocks_allocated_for_load(self, request_id: str, block_ids: list[int],
                                     epochs: list[int], num_local_tokens: int) -> None:
        skip = num_local_tokens // self.block_size
        self._new_loads[request_id] = {"blocks": list(block_ids[skip:]),
                                       "epochs": list(epochs[skip:])}

    def on_request_freed(self, request_id: str) -> None:
        self._new_loads.pop(request_id, None)
        if self._loading.pop(request_id, None) is not None:
            self._cancel.append(request_id)          # ranks forget it before the blocks are reused

    def holds(self, request_id: str) -> bool:
        return request_id in self._sending

    def has_pending(self) -> bool:
        return bool(self._new_loads or self._loading or self._cancel or self._sending)

    # ---- per step ---------------------------------------------------------
    def build_metadata(self, scheduled: list) -> KVConnectorMetadata:
        meta = KVConnectorMetadata(loads=self._new_loads)
        for rid in self._new_loads:
            self._loading[rid] = set()
        self._new_loads = {}
        if self._cancel:
            meta.extra["cancel"], self._cancel = self._cancel, []
        for req, n in scheduled:
            target = getattr(req, "kv_target", None)
            if target is None or req.kv_mode is not KVMode.PREFILL_ONLY \
                    or req.num_computed_tokens + n != req.num_tokens:
                continue                              # sends go with the final prefill chunk
            skip = target.num_local_tokens // self.block_size
            meta.saves[req.request_id] = {
                "to": target.request_id, "endpoints": list(target.endpoints),
                "src": req.block_ids[skip:len(target.block_ids)],
                "dst": list(target.block_ids[skip:]), "epochs": list(target.epochs[skip:])}
            self._sending[req.request_id] = (set(), [])
        return meta

    def update(self, reports: list[dict]) -> KVTransferUpdate:
        out = KVTransferUpdate()
        for rank, rep in enumerate(reports):
            for rid in rep.get("recv", ()):
                ranks = self._loading.get(rid)
                if ranks is None:
                    continue                          # cancelled meanwhile
                ranks.add(rank)
                if len(ranks) == self.num_ranks:
                    del self._loading[rid]
                    out.received.append(rid)
                    self.num_received += 1
            for rid, error in rep.get("sent", ()):
                entry = self._sending.get(rid)
                if entry is None:
                    continue
                entry[0].add(rank)
                if error:
                    entry[1].append(f"rank {rank}: {error}")
                if len(entry[0]) == self.num_ranks:
                    del self._sending[rid]
                    err = "; ".join(entry[1]) or None
                    out.sent.append((rid, err))
                    self.num_sent += err is None
                    self.num_send_failures += err is not None
        return out
