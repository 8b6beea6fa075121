"""Command-line flags that configure an engine, declared once for every command.

``disagg generate``, ``disagg bench engine`` and the node commands take every
engine flag (:func:`add_engine_args`, turned into an :class:`EngineConfig` by
:func:`engine_config_from_args`); ``disagg serve`` and ``disagg experiment``
pass some of them on to the nodes they start, so :func:`add_dtype_arg` and
:func:`add_kv_transport_arg` declare those two on their own. The choices come
from where each one is defined: dtypes and load formats in :mod:`disagg.config`,
attention backends in :mod:`disagg.attention`, transport kinds in
:mod:`transport.base`.
"""

from __future__ import annotations

import argparse
import os

from disagg.attention import BACKENDS
from disagg.config import DTYPE_CHOICES, LOAD_FORMATS, EngineConfig
from transport.base import KINDS


def add_dtype_arg(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """``--dtype`` on ``p`` (a parser or an argument group): one of
    :data:`~disagg.config.DTYPE_CHOICES`; ``default=None`` leaves it to the nodes."""
    p.add_argument("--dtype", default=default, choices=DTYPE_CHOICES,
                   help="auto: bfloat16 on CUDA and on CPUs with AVX-512 BF16 or AMX, "
                        "float32 on other CPUs (or $DISAGG_DTYPE)")


def add_kv_transport_arg(p: argparse.ArgumentParser, default: str,
                         kinds: tuple[str, ...] = KINDS,
                         note: str = "zmq: any two hosts; shm / cuda_ipc: prefill and decode "
                                     "on one host") -> None:
    """``--kv-transport``: how KV moves from prefill to decode, one of ``kinds``
    (a subset of :data:`transport.base.KINDS`; a bad ``default``, e.g. from the
    environment, is refused when the transport is configured)."""
    if not set(kinds) <= set(KINDS):
        raise ValueError(f"transport kinds {kinds} are not all in {KINDS}")
    p.add_argument("--kv-transport", default=default, choices=kinds,
                   help=f"how KV moves from prefill to decode; {note}")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that starts an engine."""
    d = EngineConfig()
    p.add_argument("--model", default=d.model,
                   help="'default' (embedded SmolLM2-135M-Instruct), a local HF directory, or a hub id")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tensor_parallel_size", type=int,
                   default=d.tensor_parallel_size, help="tensor-parallel degree (must divide the heads)")
    add_dtype_arg(p)
    p.add_argument("--device", default=d.device, help="cpu or cuda[:N]")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--kv-cache-memory", default="auto",
                   help="KV cache budget per rank, e.g. 512MiB; auto (default): "
                        "$DISAGG_KV_CACHE_MEMORY, else 1/8 of the host's memory (or "
                        "container limit) up to 4GiB on CPU, 1/8 of the GPU's on CUDA")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="override the block count")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="per-step token budget (decodes + prefill chunks)")
    p.add_argument("--max-prefill-chunk", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--attention-backend", default=d.attention_backend, choices=BACKENDS,
                   help="auto: FlashInfer on CUDA, the C++ kernels on a CPU (torch if they are off)")
    p.add_argument("--no-cpu-kernels", action="store_true",
                   help="run the PyTorch reference path instead of the C++ CPU kernels")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="CPU threads per rank (default: this process's usable cores / TP)")
    p.add_argument("--load-format", default=d.load_format, choices=LOAD_FORMATS,
                   help="'dummy' = random weights at the model's real shapes (speed tests only)")
    p.add_argument("--compute-turns", default=os.environ.get("DISAGG_COMPUTE_TURNS"),
                   metavar="PATH",
                   help="take turns at compute with the other engines on these cores that "
                        "name the same PATH (lock files PATH.door and PATH.turn): one step's "
                        "forward pass at a time, alternating when both are busy. disagg "
                        "serve sets it when its nodes share cores (env DISAGG_COMPUTE_TURNS; "
                        "default: no turns)")
    p.add_argument("--compute-turn-wait-s", type=float, default=d.compute_turn_wait_s,
                   metavar="SECONDS",
                   help="with --compute-turns: a step that has waited this long for its "
                        "turn computes without it, and later steps do not wait until the "
                        "holder lets go (a stopped or hung engine must not freeze this one)")


def engine_config_from_args(a: argparse.Namespace, **overrides) -> EngineConfig:
    """Build an :class:`EngineConfig` from parsed :func:`add_engine_args` flags."""
    kw = dict(model=a.model, tensor_parallel_size=a.tensor_parallel_size, dtype=a.dtype,
              device=a.device, block_size=a.block_size, kv_cache_memory=a.kv_cache_memory,
              num_kv_blocks=a.num_kv_blocks, max_num_seqs=a.max_num_seqs,
              max_num_batched_tokens=a.max_num_batched_tokens,
              max_prefill_chunk=a.max_prefill_chunk, max_model_len=a.max_model_len,
              enable_prefix_caching=not a.no_prefix_caching,
              attention_backend=a.attention_backend, load_format=a.load_format,
              torch_threads=a.torch_threads, cpu_kernels=not a.no_cpu_kernels,
              compute_turns=a.compute_turns, compute_turn_wait_s=a.compute_turn_wait_s)
    kw.update(overrides)
    return EngineConfig(**kw)
