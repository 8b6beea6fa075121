"""Tensor-parallel process state shared by the model layers.

One engine with TP degree ``p`` runs ``p`` ranks. Rank 0 lives in the driver
process (it also schedules); ranks 1..p-1 are worker processes started by
:mod:`disagg.engine.tp_worker`. All ranks execute the same model step.

Two process groups exist when TP > 1:

* the *tensor* group (gloo on CPU, NCCL on CUDA) carries activations
  (the all-reduce after every row-parallel linear);
* the *control* group (always gloo, CPU tensors) carries the per-step
  inputs the driver broadcasts to the other ranks.

With TP = 1 nothing is initialised and every helper here is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class _TPState:
    rank: int = 0
    size: int = 1
    control_group: object | None = None


_STATE = _TPState()


def init_tensor_parallel(rank: int, size: int, init_method: str, device: str) -> None:
    """Join the TP process groups; a no-op when ``size`` is 1."""
    _STATE.rank, _STATE.size = rank, size
    if size == 1:
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=init_method, world_size=size, rank=rank)
    _STATE.control_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD


def destroy_tensor_parallel() -> None:
    """Leave the process groups (safe to call when never joined)."""
    if _STATE.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _STATE.rank, _STATE.size, _STATE.control_group = 0, 1, None


def get_tp_rank() -> int:
    """This process's rank inside its engine's TP group."""
    return _STATE.rank


def get_tp_size() -> int:
    """The engine's tensor-parallel degree."""
    return _STATE.size


def control_group():
    """The gloo group used for driver→rank step broadcasts."""
    return _STATE.control_group


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the TP ranks in place and return it (identity at TP 1)."""
    if _STATE.size > 1:
        dist.all_reduce(x)
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's ``x`` along the last dim (identity at TP 1)."""
    if _STATE.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_STATE.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
