"""The model's fused operations: a C++ CPU kernel where one is loaded, else
the PyTorch reference written next to it.

The references are the eager code the model always ran (op for op what
transformers does, so float32 greedy outputs match it); the kernels compute
the same thing in one pass (``cpu_ops.cpp``). Which one runs is decided per
call: the kernel when :func:`use_cpu_kernels` loaded it and the tensors live
on the CPU, the reference otherwise (CUDA, or kernels off). The choice is
process-wide, like ``torch.backends`` flags: every engine in a process (and
each TP rank process, which sets it for itself) uses the same.

``linear`` uses the kernel only where it beats the BLAS: float32 inputs of at
most :data:`KERNEL_MAX_ROWS_FP32` rows (decode batches; MKL wins on prefill
chunks) and bfloat16 at every size (PyTorch's bf16 GEMM on CPUs without
AVX-512 BF16 converts at a crawl).
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

#: float32 rows up to which the kernel's linear beats MKL (measured on the 2-core EPYC)
KERNEL_MAX_ROWS_FP32 = 16

_ext: ModuleType | None = None


def use_cpu_kernels(enabled: bool) -> bool:
    """Turn the C++ CPU kernels on (building them if needed) or off; True if on."""
    global _ext
    if enabled:
        from disagg.kernels.cpu import load_cpu_ops
        _ext = load_cpu_ops()
    else:
        _ext = None
    return _ext is not None


def cpu_kernels() -> ModuleType | None:
    """The loaded C++ extension while the kernels are on, else ``None``."""
    return _ext


def _kernel_for(x: torch.Tensor) -> ModuleType | None:
    if _ext is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
        return _ext
    return None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T + b -> (..., N)."""
    ext = _kernel_for(x)
    if ext is not None and w.is_contiguous() and w.dtype == x.dtype and (
            x.dtype == torch.bfloat16 or x.numel() // x.shape[-1] <= KERNEL_MAX_ROWS_FP32):
        return ext.linear(x, w, b)
    return F.linear(x, w, b)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, cast back before the weight (HF's order). x (..., H)."""
    ext = _kernel_for(x)
    if ext is not None and x.is_contiguous():
        return ext.rms_norm(x, w, eps)
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + x`` and its RMSNorm: returns (normed, new residual).

    The kernel updates ``residual`` in place; the reference returns a new sum.
    """
    ext = _kernel_for(x)
    if ext is not None and x.is_contiguous() and residual.is_contiguous():
        return ext.add_rms_norm(x, residual, w, eps), residual
    residual = residual + x
    return rms_norm(residual, w, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(..., 2I) -> (..., I): ``silu(gate) * up`` on the two halves."""
    ext = _kernel_for(x)
    if ext is not None and x.is_contiguous():
        return ext.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D): ``[x1, x2] -> [-x2, x1]``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
           sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style RoPE. positions (T,); q (T, H, D); k (T, Hkv, D); caches (P, D) fp32.

    The kernel rotates ``q`` and ``k`` in place; the reference returns new tensors.
    """
    ext = _kernel_for(q)
    if ext is not None and q.stride(-1) == 1 and k.stride(-1) == 1:
        ext.rotary(positions, q, k, cos_cache, sin_cache)
        return q, k
    cos = cos_cache[positions].to(q.dtype)[:, None, :]    # (T, 1, D)
    sin = sin_cache[positions].to(q.dtype)[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
