"""Same-host GPU transport over CUDA IPC (its test skips without CUDA).

Checked on an H100 with one test: a second process exports a pool and this
one copies two blocks bit-exactly (``scripts/gpu_verify_transport.sh``).
Bandwidth, layer-wise transfers and multi-GPU peers are not yet measured.
Opening a handle in the process that exported it is not supported by CUDA.

Like :mod:`transport.shm_transport`, but the sender's pool is its GPU KV cache:
each layer's storage is exported once as a CUDA IPC handle (the same fields
``torch.multiprocessing.reductions.reduce_tensor`` produces, re-encoded as
plain msgpack values, never pickled) in the HELLO, the receiver opens the
handles once per peer and copies device-to-device::

    sender: compute → stream.synchronize() → KV_BLOCKS(src_pool=name, lease) ──▶
    receiver: opened peer layers → gather/scatter on its stream →
              stream.synchronize() → ACK ◀── (sender may now reuse the blocks)

Ordering is by full stream synchronisation on both sides: simple and safe,
not the fastest (interprocess CUDA events would let the copy overlap).
"""

from __future__ import annotations

import uuid

import torch

from .shm_transport import ShmKVReceiver, ShmKVSender
from .wire import DTYPES, dtype_name

_GEOMETRY = ("num_layers", "num_blocks", "num_kv_heads", "block_size", "head_dim")


def cuda_available() -> bool:
    """True when torch sees a CUDA device (imports nothing CUDA-specific otherwise)."""
    return torch.cuda.is_available()


def export_layer(t: torch.Tensor) -> list:
    """A CUDA tensor's IPC description as msgpack-safe values (no classes, no pickle)."""
    from torch.multiprocessing.reductions import reduce_tensor
    _, args = reduce_tensor(t)
    # (tensor_cls, size, stride, offset, storage_cls, dtype, device, handle, size_bytes,
    #  offset_bytes, requires_grad, ref_counter_handle, ref_counter_offset, event_handle,
    #  event_sync_required)
    return [None, list(args[1]), list(args[2]), args[3], None, dtype_name(args[5]), *args[6:]]


def open_layer(desc: list) -> torch.Tensor:
    """Open a tensor exported by :func:`export_layer` in another process."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor
    if not isinstance(desc, list) or len(desc) != 15 or desc[5] not in DTYPES:
        raise ValueError("malformed CUDA IPC layer description")
    args = list(desc)
    args[0], args[1], args[2] = torch.Tensor, tuple(args[1]), tuple(args[2])
    args[4], args[5] = torch.UntypedStorage, DTYPES[args[5]]
    with torch.cuda.device(args[6]):                  # open on the exporter's device
        return rebuild_cuda_tensor(*args)


class CudaIpcPool:
    """Exports a rank's existing per-layer CUDA KV caches for a peer to open."""

    def __init__(self, kv_caches: list[torch.Tensor]) -> None:
        if not kv_caches or not all(t.is_cuda for t in kv_caches):
            raise ValueError("CudaIpcPool needs the rank's per-layer CUDA KV tensors")
        self.layers = kv_caches
        self.name = f"disagg-kv-{uuid.uuid4().hex}"
        n, _, h, b, d = kv_caches[0].shape
        self._info = {"kind": "cuda_ipc", "name": self.name, "dtype": dtype_name(kv_caches[0].dtype),
                      **dict(zip(_GEOMETRY, (len(kv_caches), n, h, b, d))),
                      "layers": [export_layer(t) for t in kv_caches]}

    def info(self) -> dict:
        """The HELLO ``pool`` field: geometry plus one IPC description per layer."""
        return self._info


class CudaIpcKVSender(ShmKVSender):
    """Announces blocks of a :class:`CudaIpcPool` once their KV is complete on the device."""

    def send(self, *args, **kwargs) -> str:
        torch.cuda.current_stream(self.kv_caches[0].device).synchronize()
        return super().send(*args, **kwargs)


class CudaIpcKVReceiver(ShmKVReceiver):
    """Opens each peer's CUDA pool once and copies blocks device-to-device."""

    pool_kind = "cuda_ipc"

    def _open_pool(self, info: dict) -> list[torch.Tensor]:
        layers = info.get("layers")
        if not isinstance(layers, list) or not layers:
            raise ValueError("CUDA IPC pool description has no layers")
        return [open_layer(desc) for desc in layers]

    def _sync(self) -> None:
        torch.cuda.current_stream(self.kv_caches[0].device).synchronize()
