"""The model-side attention layer and the per-step forward context.

The model runner publishes a :class:`ForwardContext` for the duration of one
forward pass; every :class:`PagedAttention` layer reads its KV-cache tensor,
the step's metadata and the backend from there, so model code stays free of
cache plumbing. The worker half of the KV connector is called around each
layer: ``wait_for_layer_load`` before attending (KV arriving from a remote
prefill) and ``save_kv_layer`` after (KV leaving, layer by layer).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from disagg.attention.base import AttentionBackend, AttentionMetadata


@dataclass
class ForwardContext:
    """What a forward pass needs besides the token ids and positions."""

    attn_meta: AttentionMetadata
    kv_caches: list[torch.Tensor]   # one (num_blocks, 2, H_kv, block_size, D) per layer
    backend: AttentionBackend
    connector: object | None = None  # a disagg.connector.base.KVConnectorWorker


_CONTEXT: ForwardContext | None = None


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[None]:
    """Make ``ctx`` visible to the attention layers for one forward pass."""
    global _CONTEXT
    prev, _CONTEXT = _CONTEXT, ctx
    try:
        yield
    finally:
        _CONTEXT = prev


def get_forward_context() -> ForwardContext:
    """The context of the forward pass in progress (error outside one)."""
    if _CONTEXT is None:
        raise RuntimeError("attention called outside a forward_context(); "
                           "run the model through ModelRunner")
    return _CONTEXT


class PagedAttention(nn.Module):
    """Attention over the paged KV cache for one decoder layer."""

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (T, H, D); k, v: (T, H_kv, D) -> (T, H, D)."""
        ctx = get_forward_context()
        kv_cache = ctx.kv_caches[self.layer_idx]
        if ctx.connector is not None:
            ctx.connector.wait_for_layer_load(self.layer_idx)
        out = ctx.backend.forward(q, k, v, kv_cache, ctx.attn_meta, self.scale)
        if ctx.connector is not None:
            ctx.connector.save_kv_layer(self.layer_idx, kv_cache, ctx.attn_meta)
        return out
