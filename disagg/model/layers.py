"""Building blocks of the model: norms, activation and tensor-parallel linears.

Sharding follows Megatron: a *column*-parallel linear splits its output features
over the TP ranks (no communication), a *row*-parallel linear splits its input
features and all-reduces the partial sums. Attention and MLP are each one
column layer followed by one row layer, so a decoder layer costs two
all-reduces::

    x ─▶ QKV (column) ─▶ attention on local heads ─▶ o_proj (row) ─▶ all-reduce
    x ─▶ gate_up (column) ─▶ SiLU·mul ─▶ down_proj (row) ─▶ all-reduce

Every parameter carries ``weight_loader(param, full_tensor, shard_id=None)``,
which takes the *full* Hugging Face tensor and copies this rank's slice. Fused
layers take a ``shard_id`` naming the HF part ("q"/"k"/"v", or 0/1 for
gate/up). Embedding and lm_head are replicated on every rank.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from disagg.distributed import get_tp_rank, get_tp_size, tp_all_reduce
from disagg.kernels import ops


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
    """Copy a replicated tensor whole (shapes must match)."""
    if shard_id is not None:
        raise ValueError(f"this parameter is not fused; got shard_id={shard_id!r}")
    _check_shape(param, loaded)
    param.data.copy_(loaded)


def _check_shape(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} "
                         f"vs checkpoint slice {tuple(loaded.shape)}")


def _param(shape: tuple[int, ...], loader: Callable) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape), requires_grad=False)
    p.weight_loader = loader
    return p


def _split(total: int, tp: int, what: str) -> int:
    if total % tp:
        raise ValueError(f"{what} ({total}) is not divisible by the TP size {tp}")
    return total // tp


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, like HF.

    Called with a ``residual`` it first adds ``x`` to it (the decoder's skip
    connection, fused with the norm that follows it) and returns
    ``(normed, new_residual)``.
    """

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param((size,), default_weight_loader)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x (..., size) -> (..., size), or with ``residual`` -> (normed, x + residual)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class SiluAndMul(nn.Module):
    """(T, 2I) -> (T, I): ``silu(gate) * up`` on the two halves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)


class ReplicatedEmbedding(nn.Module):
    """Token embedding, the full table on every rank."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.weight = _param((num_embeddings, dim), default_weight_loader)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (T,) -> (T, dim)."""
        return F.embedding(ids, self.weight)


class ReplicatedLinear(nn.Module):
    """``y = x W^T`` with the full weight on every rank (the lm_head)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = _param((out_features, in_features), default_weight_loader)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) -> (N, out)."""
        return ops.linear(x, self.weight)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with the output features split over the TP ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.in_features = in_features
        self.out_per_rank = _split(out_features, self.tp_size, "output features")
        self.weight = _param((self.out_per_rank, in_features), self.weight_loader)
        self.bias = _param((self.out_per_rank,), self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Copy this rank's rows of the full HF weight (or bias)."""
        n = param.shape[0]
        if loaded.shape[0] != n * self.tp_size:
            raise ValueError(f"checkpoint has {loaded.shape[0]} output rows, expected {n * self.tp_size}")
        src = loaded.narrow(0, self.tp_rank * n, n)
        _check_shape(param, src)
        param.data.copy_(src)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, in) -> (T, out / tp)."""
        return ops.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with the input features split; partial sums all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.in_per_rank = _split(in_features, self.tp_size, "input features")
        self.weight = _param((out_features, self.in_per_rank), self.weight_loader)
        self.bias = _param((out_features,), default_weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Copy this rank's columns of the full HF weight."""
        n = self.in_per_rank
        if tuple(loaded.shape) != (param.shape[0], n * self.tp_size):
            raise ValueError(f"checkpoint weight {tuple(loaded.shape)} does not match "
                             f"{(param.shape[0], n * self.tp_size)}")
        param.data.copy_(loaded.narrow(1, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, in / tp) -> (T, out), summed over ranks; the bias is added once."""
        if self.tp_size == 1:
            return ops.linear(x, self.weight, self.bias)
        y = tp_all_reduce(ops.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused into one matmul (gate_up_proj).

    Rank-local layout: ``[part0 slice | part1 slice | ...]``; ``shard_id`` is the
    part's index.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool) -> None:
        tp = get_tp_size()
        self.local_sizes = [_split(s, tp, "output features") for s in output_sizes]
        super().__init__(in_features, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Copy this rank's slice of part ``shard_id`` into its place."""
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.local_sizes):
            raise ValueError(f"shard_id must be 0..{len(self.local_sizes) - 1}, got {shard_id!r}")
        n = self.local_sizes[shard_id]
        if loaded.shape[0] != n * self.tp_size:
            raise ValueError(f"checkpoint part {shard_id} has {loaded.shape[0]} rows, "
                             f"expected {n * self.tp_size}")
        dst = param.data.narrow(0, sum(self.local_sizes[:shard_id]), n)
        src = loaded.narrow(0, self.tp_rank * n, n)
        _check_shape(dst, src)
        dst.copy_(src)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k, v projection; each rank holds its query heads and KV heads.

    Rank-local layout: ``[q heads | k heads | v heads]``. When TP exceeds the KV
    head count each KV head is replicated: rank ``r`` holds KV head
    ``r * num_kv_heads // tp``.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool) -> None:
        tp = get_tp_size()
        self.head_dim, self.total_kv_heads = head_dim, num_kv_heads
        self.num_heads = _split(num_heads, tp, "attention heads")
        if tp <= num_kv_heads:
            self.num_kv_heads = _split(num_kv_heads, tp, "KV heads")
        elif tp % num_kv_heads:
            raise ValueError(f"TP size {tp} exceeds the {num_kv_heads} KV heads but is not a "
                             f"multiple of it, so KV heads cannot be replicated evenly")
        else:
            self.num_kv_heads = 1
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        super().__init__(hidden_size, (self.q_size + 2 * self.kv_size) * tp, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Copy this rank's heads of the full HF ``q_proj``/``k_proj``/``v_proj``."""
        d = self.head_dim
        if shard_id == "q":
            full, n, dst, first = self.num_heads * self.tp_size, self.num_heads, 0, self.tp_rank * self.num_heads
        elif shard_id in ("k", "v"):
            full, n = self.total_kv_heads, self.num_kv_heads
            dst = self.q_size + (0 if shard_id == "k" else self.kv_size)
            first = (self.tp_rank * n if self.tp_size <= self.total_kv_heads
                     else self.tp_rank * self.total_kv_heads // self.tp_size)
        else:
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        if loaded.shape[0] != full * d:
            raise ValueError(f"checkpoint {shard_id}_proj has {loaded.shape[0]} rows, "
                             f"expected {full} heads x {d}")
        target = param.data.narrow(0, dst, n * d)
        src = loaded.narrow(0, first * d, n * d)
        _check_shape(target, src)
        target.copy_(src)
