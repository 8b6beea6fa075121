"""Per-request state (nano-vllm's ``Sequence``): tokens, progress, blocks.

Token bookkeeping for one request::

    token_ids:  | prompt .......... | output ..... |
                0        num_prompt_tokens       num_tokens
    computed:   |<--- num_computed_tokens --->|
                 KV of these is in the cache; the next step computes
                 [num_computed_tokens, num_tokens) (a chunk, or 1 token)

A token is sampled only by the step whose chunk reaches ``num_tokens``.
Preemption by recompute resets ``num_computed_tokens`` to 0 and keeps the
tokens, so the request later recomputes prompt + output and carries on.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from disagg.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"     # KV being filled from outside (remote prefill)
    RUNNING = "running"
    PREEMPTED = "preempted"
    PINNED = "pinned"                     # prefill-only, finished, blocks kept for export
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


class KVMode(str, enum.Enum):
    """How a request's KV cache relates to other engines (the role hooks)."""

    LOCAL = "local"                       # ordinary request
    PREFILL_ONLY = "prefill_only"         # hook 1: prefill, sample one token, pin blocks
    LOAD_REMOTE = "load_remote"           # hook 2: KV filled from outside, then decode


@dataclass(eq=False)
class Request:
    """Mutable state of one request, owned by the scheduler."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    kv_mode: KVMode = KVMode.LOCAL
    generator: torch.Generator | None = None
    arrival_time: float = field(default_factory=time.monotonic)

    status: RequestStatus = RequestStatus.WAITING
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1           # prefix-cache hit at first admission (-1 = not yet)
    blocks: list = field(default_factory=list)   # disagg.kv_cache.block_pool.Block
    block_hashes: list[int] = field(default_factory=list)   # of full blocks, chained
    num_preemptions: int = 0
    stop_reason: str | int | None = None
    first_token_time: float | None = None
    deadline: float | None = None         # KV wait or pin lease ends (monotonic seconds)
    kv_target: object | None = None       # prefill-only: KVLoadTarget to send the KV to
    kv_received: bool = False             # load-remote: every rank has its KV
    # prompt logprobs being gathered (disagg.engine.prompt_logprobs), indexed by
    # prompt position (entry 0 stays None); None when not asked for or delivered
    prompt_logprobs: list | None = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.prompt_logprobs = (None if self.params.prompt_logprobs is None
                                else [None] * len(self.prompt_token_ids))

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs were asked for and not yet delivered: prefill computes
        logits at every prompt position and skips the prefix cache."""
        return self.prompt_logprobs is not None

    def take_prompt_logprobs(self) -> list | None:
        """The gathered prompt logprobs, once (for the first output); None after."""
        out, self.prompt_logprobs = self.prompt_logprobs, None
        return out

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]

    @property
    def has_output(self) -> bool:
        """At least one token was generated (for a remote prefill: its first token arrived)."""
        return len(self.token_ids) > self.num_prompt_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
