"""The attention-backend interface and the per-step metadata it consumes.

A step's batch is *flattened*: ``T`` new tokens from ``S`` sequences laid end to
end. Decode sequences (one new token each) come first, then prefill chunks::

    tokens:  | d0 | d1 | d2 | p0 p0 p0 p0 | p1 p1 |
    seq:        0    1    2        3          4        num_decodes = 3
    query_start_loc = [0, 1, 2, 3, 7, 9]

For sequence ``i`` the new tokens are the *last* ``q_len`` positions of a
context of ``seq_lens[i]`` tokens, so the causal mask is aligned to the bottom
right: query ``j`` (0-based in the chunk) sees keys ``0 .. seq_len - q_len + j``::

    keys ->        cached prefix | new chunk
    q0             x x x x x x x x
    q1             x x x x x x x x x
    q2             x x x x x x x x x x

The KV cache of one layer is ``[num_blocks, 2, num_kv_heads, block_size,
head_dim]`` (HND, DESIGN.md); token ``t`` of sequence ``i`` lives in block
``block_tables[i, t // block_size]`` at offset ``t % block_size``. A backend
first writes the new tokens' K/V at ``slot_mapping`` (``block * block_size +
offset``) and then attends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Everything a backend needs about one flattened step (see module doc)."""

    slot_mapping: torch.Tensor      # (T,) int64, block * block_size + offset
    query_start_loc: torch.Tensor   # (S+1,) int32
    seq_lens: torch.Tensor          # (S,) int32, context length after this step
    block_tables: torch.Tensor      # (S, max_blocks) int32, padded with 0
    num_decodes: int                # the first num_decodes sequences have q_len == 1
    query_lens_cpu: list[int]       # host copies, for loops and planning
    seq_lens_cpu: list[int]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    def to(self, device: torch.device | str) -> "AttentionMetadata":
        """Copy the tensor fields to ``device`` (host lists stay)."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping.to(device, non_blocking=True),
            query_start_loc=self.query_start_loc.to(device, non_blocking=True),
            seq_lens=self.seq_lens.to(device, non_blocking=True),
            block_tables=self.block_tables.to(device, non_blocking=True),
            num_decodes=self.num_decodes,
            query_lens_cpu=self.query_lens_cpu,
            seq_lens_cpu=self.seq_lens_cpu,
            block_size=self.block_size,
        )


class AttentionBackend(ABC):
    """Paged attention over the HND KV cache.

    One backend instance serves every layer of a model on one rank. ``plan`` is
    called once per step before the forward pass (FlashInfer builds its work
    plan there); ``forward`` is called once per layer.
    """

    name: str = "abstract"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_heads = num_heads          # query heads on this rank
        self.num_kv_heads = num_kv_heads    # KV heads on this rank
        self.head_dim = head_dim
        self.block_size = block_size
        self.dtype = dtype
        self.device = device

    def plan(self, meta: AttentionMetadata) -> None:
        """Prepare for one step's ``forward`` calls (default: nothing)."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Store ``k``/``v`` at ``meta.slot_mapping`` and attend.

        q: (T, num_heads, head_dim); k, v: (T, num_kv_heads, head_dim);
        kv_cache: (num_blocks, 2, num_kv_heads, block_size, head_dim).
        Returns (T, num_heads, head_dim).
        """


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows into their cache slots (no host sync)."""
    block_size = kv_cache.shape[3]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    kv_cache[blocks, 0, :, offsets] = k    # (T, H, D) into block rows
    kv_cache[blocks, 1, :, offsets] = v
