"""Paged attention: one interface; a PyTorch reference backend, a CPU backend with
C++ decode kernels, and FlashInfer (CUDA)."""

from __future__ import annotations

import torch

from disagg.attention.base import AttentionBackend
from disagg.attention.torch_paged import TorchPagedAttention

BACKENDS = ("auto", "torch", "cpu", "flashinfer")


def make_backend(name: str, *, num_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int, dtype: torch.dtype, device: torch.device) -> AttentionBackend:
    """Build the backend ``name``.

    "auto" = FlashInfer on CUDA; on the CPU the C++ kernels when
    :func:`disagg.kernels.ops.use_cpu_kernels` loaded them, else the PyTorch one.
    """
    from disagg.kernels import ops
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
    if name == "auto":
        if device.type == "cuda":
            name = "flashinfer"
        else:
            name = "cpu" if ops.cpu_kernels() is not None else "torch"
    kwargs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                  block_size=block_size, dtype=dtype, device=device)
    if name == "flashinfer":
        if device.type != "cuda":
            raise ValueError("the flashinfer attention backend needs a CUDA device")
        from disagg.attention.flashinfer_backend import FlashInferAttention
        return FlashInferAttention(**kwargs)
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError("the cpu attention backend needs device='cpu'")
        if ops.cpu_kernels() is None:
            from disagg.kernels.cpu import failure
            raise ValueError("the cpu attention backend needs the C++ CPU kernels, which are "
                             f"off or failed to build ({failure() or 'turned off'})")
        from disagg.attention.cpu_paged import CpuPagedAttention
        return CpuPagedAttention(**kwargs, kernels=ops.cpu_kernels())
    return TorchPagedAttention(**kwargs)


__all__ = ["BACKENDS", "make_backend"]
