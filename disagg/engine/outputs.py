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
    hits and already valid; the rest must be filled before the request can
    decode. If that does not happen within the engine's ``kv_load_timeout_s``
    the request falls back to local prefill and the blocks may be reused: a
    writer must check ``epochs`` (each block's allocation epoch) is still
    current before touching a block.

    With a KV transport (``EngineConfig.kv_transfer``) ``endpoints`` lists
    where each decode rank receives; handing the whole target (``to_dict``)
    to a prefill engine's ``add_request(kv_target=...)`` makes that engine
    send the missing blocks there.
    """

    block_ids: list[int]
    epochs: list[int]
    num_local_tokens: int
    num_tokens: int
    request_id: str = ""
    endpoints: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain msgpack/JSON-able form (for node-to-node control messages)."""
        return {"block_ids": list(self.block_ids), "epochs": list(self.epochs),
                "num_local_tokens": self.num_local_tokens, "num_tokens": self.num_tokens,
                "request_id": self.request_id, "endpoints": list(self.endpoints)}

    @classmethod
    def from_dict(cls, d: dict) -> "KVLoadTarget":
        """Rebuild and type-check a target received from another process (``ValueError``)."""
        def ints(v, name):
            if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int)
                                              or x < 0 for x in v):
                raise ValueError(f"kv target field {name!r} must be a list of non-negative ints")
            return list(v)
        if not isinstance(d, dict):
            raise ValueError("kv target must be a mapping")
        try:
            t = cls(ints(d["block_ids"], "block_ids"), ints(d["epochs"], "epochs"),
                    d["num_local_tokens"], d["num_tokens"], d["request_id"], list(d["endpoints"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed kv target: {exc!r}") from None
        for name in ("num_local_tokens", "num_tokens"):
            v = getattr(t, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"kv target field {name!r} must be a non-negative int")
        if not isinstance(t.request_id, str) or not all(isinstance(e, str) for e in t.endpoints):
            raise ValueError("kv target request_id and endpoints must be strings")
        return t


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
    # on the first output of a request with SamplingParams.prompt_logprobs: one
    # entry per prompt position, None at 0, then TokenLogprobs (None when not asked)
    prompt_logprobs: list | None = None
    kv_export: KVExport | None = None
    kv_load: KVLoadTarget | None = None


@dataclass
class KVTransferEvent:
    """A KV transfer ended on every rank: ``direction`` "sent" (prefill side, the
    pinned blocks are released now) or "received" (decode side); ``error`` says
    why a send failed (the receiver then falls back to local prefill)."""

    request_id: str
    direction: str
    error: str | None = None
