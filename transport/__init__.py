"""KV-block transport between prefill and decode ranks.

Moves the KV of a request's blocks from a prefill rank's paged pool
(``[num_blocks, 2, H_kv, block_size, head_dim]`` per layer, HND) into a decode
rank's pool, re-sharding heads when the TP degrees differ, sending only the
blocks the receiver lacks, pinning source blocks until ACK or lease expiry and
checking block epochs so a reused block is never filled with someone else's KV.

Modules:
    wire / messages  versioned msgpack headers + raw frames, full validation
    resharding       which prefill rank sends which KV head to which decode rank
    base             TransportConfig, KVSender / KVReceiver, errors, missing_blocks
    pins / pending   sender pin table with leases; receiver arrival tracking
    zmq_transport    ZeroMQ (tcp:// or ipc://) sender and receiver
    shm_transport    same-host CPU: receiver copies out of a shared-memory pool
    cuda_ipc         same-host GPU via CUDA IPC handles (two-process transfer checked on an H100)

Whole-request transfers travel as messages of about 4 MiB (whole layers) so the
receiver's copy overlaps the wire; layer-wise transfers send one per layer.

Inside the engine the connector halves in ``disagg/connector/transfer_*.py``
drive these classes on every TP rank (``EngineConfig.kv_transfer``); used on
their own (decode rank q, prefill rank r; each name imported from its module,
``transport_classes(kind)`` picks a kind's pair)::

    rx = ZmqKVReceiver(TransportConfig(), kv_caches, tp_rank=q, tp_size=d)
    rx.expect(rid, load.block_ids[skip:], load.epochs[skip:]); rx.wait_ready(rid)

    tx = ZmqKVSender(TransportConfig(), kv_caches, ReshardPlan(K, p, d), tp_rank=r)
    tx.connect(q, rx.endpoint)
    tid = tx.send(rid, q, src_ids, dst_ids, dst_epochs); tx.wait(tid)
"""


def transport_classes(kind: str) -> tuple[type, type]:
    """``(sender class, receiver class)`` of a ``TransportConfig.kind`` (one of
    :data:`transport.base.KINDS`).

    Pool-reading senders (shm, cuda_ipc) take a pool object, the zmq sender
    the per-layer caches; every receiver takes the per-layer caches.
    """
    if kind == "zmq":
        from .zmq_transport import ZmqKVReceiver, ZmqKVSender
        return ZmqKVSender, ZmqKVReceiver
    if kind == "shm":
        from .shm_transport import ShmKVReceiver, ShmKVSender
        return ShmKVSender, ShmKVReceiver
    if kind == "cuda_ipc":
        from .cuda_ipc import CudaIpcKVReceiver, CudaIpcKVSender
        return CudaIpcKVSender, CudaIpcKVReceiver
    raise ValueError(f"unknown transport kind {kind!r}")


__all__ = ["transport_classes"]
