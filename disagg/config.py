"""Engine configuration: one frozen dataclass shared by every node role.

A role (``"colocated"``, ``"prefill"`` or ``"decode"``) is configuration, not a
separate code path: it only selects which KV-connector half is active and how
the scheduler treats requests that carry KV-transfer parameters.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transport.base import TransportConfig

ROLES = ("colocated", "prefill", "decode")
DTYPES = ("float32", "bfloat16", "float16")
#: what ``--dtype`` accepts: a dtype, or "auto" (see :func:`resolve_dtype`)
DTYPE_CHOICES = ("auto", *DTYPES)
#: how weights are filled: "auto" reads the model's safetensors, "dummy" = random
#: weights at the model's real shapes (speed tests only)
LOAD_FORMATS = ("auto", "dummy")
#: how long a step waits for its compute turn before it computes without it: well
#: over the longest step the embedded model takes on a small machine (a 2,048-token
#: prefill chunk on 2 cores: a few seconds), so only a stuck holder is passed over
DEFAULT_COMPUTE_TURN_WAIT_S = 10.0


def resolve_dtype(dtype: str, device: str) -> str:
    """The concrete dtype for ``dtype`` on ``device``.

    "auto" is ``$DISAGG_DTYPE`` when set; otherwise bfloat16 on CUDA and on
    CPUs that compute it natively (AVX-512 BF16 or AMX), float32 on other CPUs,
    where bfloat16 is emulated and both slower and less exact.
    """
    if dtype != "auto":
        return dtype
    env = os.environ.get("DISAGG_DTYPE", "").strip()
    if env:
        if env not in DTYPES:
            raise ValueError(f"DISAGG_DTYPE must be one of {DTYPES}, got {env!r}")
        return env
    if device.startswith("cuda"):
        return "bfloat16"
    from disagg.cpus import has_native_bf16
    return "bfloat16" if has_native_bf16() else "float32"

AUTO_KV_SHARE = 8
"""``kv_cache_memory="auto"`` takes 1/AUTO_KV_SHARE of the device's memory per rank."""

AUTO_KV_CPU_CAP = 4 << 30
"""... and at most this much on a CPU, whose RAM also holds the weights and every other
process (vLLM's CPU build is run here with a 4 GiB KV cache)."""


def resolve_kv_cache_memory(value: str | int, device: str) -> int:
    """Bytes of KV cache per rank for ``value``: a size (``parse_size``) or "auto".

    "auto" is ``$DISAGG_KV_CACHE_MEMORY`` when set; otherwise on a CPU 1/8 of the
    host's memory limit (RAM, or a container's cgroup limit) up to 4 GiB, on CUDA
    1/8 of the GPU's memory. Every rank takes its own budget, so a host running
    several ranks (TP, a prefill and a decode node) gives each its share.
    """
    if value != "auto":
        return parse_size(value)
    env = os.environ.get("DISAGG_KV_CACHE_MEMORY", "").strip()
    if env:
        try:
            return parse_size(env)
        except ValueError:
            raise ValueError(f"DISAGG_KV_CACHE_MEMORY: cannot parse size {env!r}; use e.g. "
                             "512MiB or 2GiB") from None
    if device.startswith("cuda"):
        import torch
        index = int(device.partition(":")[2] or 0)
        return torch.cuda.get_device_properties(index).total_memory // AUTO_KV_SHARE
    from disagg.cpus import host_memory_limit
    return min(AUTO_KV_CPU_CAP, host_memory_limit() // AUTO_KV_SHARE)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse ``"512MiB"``, ``"2G"``, ``"1048576"`` into bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 512MiB, 2GiB or a byte count")
    unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    return int(float(m.group(1)) * mult)


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs to start.

    model: ``"default"`` (the embedded SmolLM2-135M-Instruct), a local Hugging
        Face directory, or a hub id (fetched only when named; fails offline).
    dtype: weights, activations and KV cache; "auto" is resolved when the
        config is made (:func:`resolve_dtype`), so ``config.dtype`` is always concrete.
    kv_cache_memory: bytes of KV cache per rank (or a size such as "2GiB"); the
        block count follows from it unless ``num_kv_blocks`` is given explicitly.
        "auto" is resolved when the config is made (:func:`resolve_kv_cache_memory`).
    max_num_batched_tokens: the per-step token budget shared by decodes and
        prefill chunks (continuous batching with chunked prefill).
    max_prefill_chunk: cap on the tokens one request may prefill in one step
        (``None`` = only the step budget limits it).
    kv_load_timeout_s: how long a request waits for KV from outside before it
        falls back to prefilling locally.
    pin_lease_s: how long a finished prefill-only request's blocks stay pinned
        without a ``release_kv`` before they are freed anyway.
    kv_transfer: how KV blocks travel between a prefill and a decode engine
        (a ``transport.base.TransportConfig``: zmq, shm or cuda_ipc, the address
        each rank binds, leases, timeouts); ``None`` = no transport, KV moves
        only through the hooks (``notify_kv_ready``). Needs role prefill or decode.
    kv_layerwise: a prefill sends each layer's blocks as soon as that layer is
        computed (overlapping the rest of the forward pass) instead of all
        layers after it.
    cpu_kernels: on a CPU device, run the hot path (small-batch linears,
        decode attention, norms, RoPE, SiLU) in the C++ kernels of
        ``disagg/kernels`` (built on first use); False = the PyTorch reference
        path throughout. A failed build falls back to the reference with a warning.
    compute_turns: path prefix of a turn lock (``disagg.engine.compute_turns``)
        shared with the other engines on these cores: each step's compute waits
        for its turn, so the engines' thread teams never run at once (``None``:
        no turns; for engines on cores of their own).
    compute_turn_wait_s: how long a step waits for its turn before it computes
        without it (a holder that is stopped or hung must not freeze this engine).
    """

    model: str = "default"
    tensor_parallel_size: int = 1
    role: str = "colocated"
    dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    kv_cache_memory: int | str = "auto"
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_prefill_chunk: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    load_format: str = "auto"
    seed: int = 0
    torch_threads: int | None = None
    kv_load_timeout_s: float = 30.0
    pin_lease_s: float = 30.0
    kv_transfer: "TransportConfig | None" = None
    kv_layerwise: bool = True
    cpu_kernels: bool = True
    compute_turns: str | None = None
    compute_turn_wait_s: float = DEFAULT_COMPUTE_TURN_WAIT_S

    def __post_init__(self) -> None:
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        object.__setattr__(self, "kv_cache_memory",
                           resolve_kv_cache_memory(self.kv_cache_memory, self.device))
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _positive("block_size", self.block_size)
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("kv_cache_memory", self.kv_cache_memory)
        for name in ("num_kv_blocks", "max_prefill_chunk", "max_model_len", "torch_threads"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name in ("kv_load_timeout_s", "pin_lease_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        check_wait_s("compute_turn_wait_s", self.compute_turn_wait_s)
        if self.compute_turns is not None and (not isinstance(self.compute_turns, str)
                                               or not self.compute_turns.strip()):
            raise ValueError(f"compute_turns must be None or a file path prefix, got "
                             f"{self.compute_turns!r}")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_transfer is not None:
            from transport.base import TransportConfig
            if not isinstance(self.kv_transfer, TransportConfig):
                raise ValueError(f"kv_transfer must be a transport.base.TransportConfig, got "
                                 f"{type(self.kv_transfer).__name__}")
            if self.role == "colocated":
                raise ValueError("kv_transfer needs role 'prefill' or 'decode'; a colocated "
                                 "engine moves no KV")
            if self.kv_transfer.kind == "cuda_ipc" and not self.device.startswith("cuda"):
                raise ValueError("the cuda_ipc transport needs device='cuda'")

    @property
    def torch_dtype(self):
        import torch
        return getattr(torch, self.dtype)


def check_wait_s(name: str, value) -> None:
    """``ValueError`` unless ``value`` is a finite number of seconds > 0 (a bound on a
    wait; ``name`` is what the message calls it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
