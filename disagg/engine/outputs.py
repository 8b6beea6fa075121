"""What the engine reports to its caller after each step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class KVExport:
    """Hook 1: a prefill-only request finished; its blocks stay pinned.

    ``block_ids[i]`` holds tokens ``[i*block_size, (i+1)*block_size)`` of the
    prompt; ``epochs[i]`` is that block's allocation epoch, so a reader can
    tell a block that was freed and reused since. Release with
    ``LLMEngine.release_kv(request_id)``.
    """

    block_ids: list[int]
    block_hashes: list[int]      # full blocks only
    epochs: list[int]
    num_tokens: int              # prompt tokens whose KV the blocks hold
    first_token_id: int


@dataclass
class KVLoadTarget:
    """Hook 2: blocks reserved for a request whose KV will come from outside.

    The first ``num_local_tokens // block_size`` blocks are local prefix-cache
    hits and already valid; the rest must be filled before calling
    ``LLMEngine.notify_kv_ready``. If that does not happen within the
    engine's ``kv_load_timeout_s`` the request falls back to local prefill and
    the blocks may be reused: a writer must check ``epochs`` (each block's
    allocation epoch) is still current before touching a block.
    """

    block_ids: list[int]
    epochs: list[int]
    num_local_tokens: int
    num_tokens: int


@dataclass
class RequestOutput:
    """One request's progress in one step (or its final state)."""

    request_id: str
    new_token_ids: list[int]
    output_token_ids: list[int]
    num_prompt_tokens: int
    num_cached_tokens: int
    finished: bool = False
    finish_reason: str | None = None          # "stop" | "length" | "abort"
    stop_reason: str | int | None = None      # the stop string or token id that ended it
    text: str | None = None                   # full output text once finished (needs a tokenizer)
    logprobs: list = field(default_factory=list)   # disagg.engine.sampler.TokenLogprobs, new this step
    kv_export: KVExport | None = None
    kv_load: KVLoadTarget | None = None
