"""Paged attention: one interface, a PyTorch backend (CPU) and FlashInfer (CUDA)."""

from __future__ import annotations

import torch

from disagg.attention.base import AttentionBackend, AttentionMetadata
from disagg.attention.torch_paged import TorchPagedAttention

BACKENDS = ("auto", "torch", "flashinfer")


def make_backend(name: str, *, num_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int, dtype: torch.dtype, device: torch.device) -> AttentionBackend:
    """Build the backend ``name`` ("auto" = FlashInfer on CUDA, PyTorch elsewhere)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
    if name == "auto":
        name = "flashinfer" if device.type == "cuda" else "torch"
    kwargs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                  block_size=block_size, dtype=dtype, device=device)
    if name == "flashinfer":
        if device.type != "cuda":
            raise ValueError("the flashinfer attention backend needs a CUDA device")
        from disagg.attention.flashinfer_backend import FlashInferAttention
        return FlashInferAttention(**kwargs)
    return TorchPagedAttention(**kwargs)


__all__ = ["AttentionBackend", "AttentionMetadata", "make_backend"]
