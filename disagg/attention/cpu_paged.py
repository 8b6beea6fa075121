"""CPU paged attention with C++ kernels for the decode path.

Decode queries (one per sequence, the bulk of a serving step) attend straight
out of the paged cache with ``paged_attention`` from ``disagg/kernels/cpu_ops.cpp``:
one task per (sequence, KV head) walks that sequence's block table, scores the
query heads sharing the KV head against each cached K row once, softmaxes and
accumulates V — no per-step ``index_select`` of K/V into a padded batch, no
mask. New K/V rows are stored with the kernel's ``write_kv``. Prefill chunks
take the PyTorch path of :class:`~disagg.attention.torch_paged.TorchPagedAttention`,
whose ``scaled_dot_product_attention`` is already a fused flash kernel on the CPU
and which stays the reference these kernels are tested against.
"""

from __future__ import annotations

import torch

from disagg.attention.base import AttentionMetadata
from disagg.attention.torch_paged import TorchPagedAttention


class CpuPagedAttention(TorchPagedAttention):
    """:class:`TorchPagedAttention` with decode attention and KV writes in C++."""

    name = "cpu"
    gathers_decodes = False

    def __init__(self, *args, kernels, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kernels = kernels          # the loaded disagg_cpu_ops extension

    def write(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
        self.kernels.write_kv(kv_cache, k, v, slot_mapping)

    def attend_decodes(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                       scale: float) -> torch.Tensor:
        nd = q.shape[0]
        return self.kernels.paged_attention(q, kv_cache, meta.block_tables[:nd],
                                            meta.seq_lens[:nd], scale)
