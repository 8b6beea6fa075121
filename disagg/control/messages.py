"""Control messages between the router and the nodes: small dataclasses ↔ msgpack.

One ZeroMQ ROUTER socket on the router, one DEALER per node (its identity is
the node id). A frame is ``msgpack({"type": NAME, **fields})``; :func:`decode`
checks the type name and every field's type before building the dataclass,
and raises :class:`ControlError` on anything malformed (never pickle). Token
ids, targets and sampling params are checked again by whoever uses them
(``LLMEngine.add_request``, ``KVLoadTarget.from_dict``, ``SamplingParams``).

The request flows (``rid`` is the router's request id)::

    local:   router ─Generate(remote=False)─▶ decode ─Tokens…─▶ router
    remote:  router ─Generate(remote=True)──▶ decode ─KVTarget─▶ router
             router ─Prefill(target)────────▶ prefill ─FirstToken─▶ router ─FirstToken─▶ decode
             prefill ═══ KV blocks (transport) ═══▶ decode ─Tokens…─▶ router
             prefill ─KVSent(error?)─▶ router   (an error → Fallback to the decode node)
    any:     router ─Abort─▶ node;   router ─Fallback─▶ decode (prefill node lost)

Node life: ``Register`` → ``Registered``; ``Heartbeat`` every
``heartbeat_s``; a router that does not know a heartbeating node answers
``RegisterAgain`` (it restarted, or dropped the node as dead).
Times (``*_at``) are ``time.monotonic()`` seconds — comparable between
processes of one host only, used for latency accounting.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, fields

import msgpack


def logprobs_to_wire(lp) -> list | None:
    """A ``TokenLogprobs`` as ``[token_id, logprob, [[id, logprob], ...]]`` (or None)."""
    if lp is None:
        return None
    return [lp.token_id, float(lp.logprob), [[int(t), float(v)] for t, v in lp.top]]


def logprobs_from_wire(entry):
    """Inverse of :func:`logprobs_to_wire` (a ``TokenLogprobs``, or None)."""
    from disagg.engine.sampler import TokenLogprobs
    if entry is None:
        return None
    token_id, logprob, top = entry
    return TokenLogprobs(int(token_id), float(logprob), [(int(t), float(v)) for t, v in top])


class ControlError(ValueError):
    """A control frame that is not a well-formed message."""


@dataclass(frozen=True)
class Register:
    """Node → router: who I am and what I can hold."""

    node_id: str
    role: str                     # "prefill" | "decode"
    tp: int
    block_size: int
    model: str                    # served model name (checked against the router's)
    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    kv_bytes_per_token: int       # over all ranks
    kv_transport: str             # zmq | shm | cuda_ipc
    kv_endpoints: list            # decode ranks' receive endpoints (empty on prefill)
    pid: int
    host: str


@dataclass(frozen=True)
class Registered:
    """Router → node: registration accepted."""

    node_id: str


@dataclass(frozen=True)
class Refused:
    """Router → node: registration refused for good (``reason`` says why); the node exits."""

    node_id: str
    reason: str


@dataclass(frozen=True)
class RegisterAgain:
    """Router → node: I do not know you (restarted, or dropped you); send Register."""

    node_id: str


@dataclass(frozen=True)
class Heartbeat:
    """Node → router: alive, with its load and what it measured since the last one.

    ``load``: ``LLMEngine.load()``. ``steps``: ``[prefill_tokens, decode_seqs,
    seconds]`` per engine step (calibrates the router's cost model).
    ``kv_bytes_*``: cumulative KV bytes this node sent / received.
    """

    node_id: str
    load: dict
    steps: list
    kv_bytes_sent: int
    kv_bytes_received: int


@dataclass(frozen=True)
class Generate:
    """Router → decode: run this request; ``remote`` = its KV comes from a prefill node."""

    rid: str
    prompt_token_ids: list
    params: dict                  # SamplingParams.to_dict()
    remote: bool


@dataclass(frozen=True)
class KVTarget:
    """Decode → router: blocks reserved for a remote request (``KVLoadTarget.to_dict()``).

    ``num_cached_tokens`` of the prompt were already in the decode node's
    prefix cache and will not move.
    """

    rid: str
    target: dict
    num_cached_tokens: int
    received_at: float            # when the decode node got the Generate


@dataclass(frozen=True)
class Prefill:
    """Router → prefill: compute this prompt's KV and send it to ``target``."""

    rid: str
    prompt_token_ids: list
    params: dict
    target: dict


@dataclass(frozen=True)
class FirstToken:
    """Prefill → router → decode: the remote prefill's first token.

    ``logprobs``: ``[token_id, logprob, [[id, logprob], ...]]`` or None.
    ``prefill_s``: seconds from the prefill node receiving the request to this token.
    """

    rid: str
    token_id: int
    logprobs: list | None
    prefill_s: float
    sent_at: float


@dataclass(frozen=True)
class KVSent:
    """Prefill → router: the KV transfer ended (``error`` None = delivered).

    ``seconds``: from the first token to the end of the transfer (the part not
    hidden behind compute).
    """

    rid: str
    error: str | None
    seconds: float


@dataclass(frozen=True)
class Tokens:
    """Decode → router: new tokens of a request (and its end when ``finished``).

    ``output_len`` is the request's output length after ``new_token_ids``
    (a remote request's first token, already streamed, is not resent twice).
    ``route``: "local" | "remote" | "fallback", where its prefill ran.
    ``received_at``: when the node got the Generate (first message only).
    """

    rid: str
    new_token_ids: list
    output_len: int
    logprobs: list                # per new token: [id, logprob, [[id, lp], ...]] or None
    finished: bool
    finish_reason: str | None
    text: str | None              # final text (stop strings applied) when finished
    num_cached_tokens: int
    route: str
    sent_at: float
    received_at: float | None


@dataclass(frozen=True)
class Fallback:
    """Router → decode: the remote prefill failed; prefill this request locally."""

    rid: str
    reason: str


@dataclass(frozen=True)
class Abort:
    """Router → node: forget this request and free its blocks (client gone)."""

    rid: str


@dataclass(frozen=True)
class Rejected:
    """Node → router: a request could not be taken or ended in error (``error`` says why)."""

    rid: str
    error: str


MESSAGES = {cls.__name__: cls for cls in (
    Register, Registered, Refused, RegisterAgain, Heartbeat, Generate, KVTarget, Prefill, FirstToken,
    KVSent, Tokens, Fallback, Abort, Rejected)}

_SIMPLE = {str: str, int: int, float: (int, float), bool: bool, list: list, dict: dict,
           type(None): type(None)}


def _allowed(cls) -> dict[str, tuple]:
    """Field name → accepted Python types, from the dataclass annotations."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        args = typing.get_args(hints[f.name]) or (hints[f.name],)
        out[f.name] = tuple(t for a in args for t in (_SIMPLE[a] if isinstance(_SIMPLE[a], tuple)
                                                       else (_SIMPLE[a],)))
    return out


_FIELD_TYPES = {name: _allowed(cls) for name, cls in MESSAGES.items()}


def encode(msg) -> bytes:
    """One frame for ``msg`` (a message dataclass)."""
    name = type(msg).__name__
    if MESSAGES.get(name) is not type(msg):
        raise TypeError(f"{name} is not a control message")
    return msgpack.packb({"type": name, **asdict(msg)}, use_bin_type=True)


def decode(frame: bytes):
    """The message in ``frame``; :class:`ControlError` if it is malformed."""
    try:
        data = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ControlError(f"control frame is not msgpack: {exc}") from None
    if not isinstance(data, dict):
        raise ControlError(f"control frame must be a map, got {type(data).__name__}")
    if not all(isinstance(k, str) for k in data):
        raise ControlError("control message field names must be strings")
    name = data.pop("type", None)
    if not isinstance(name, str) or name not in MESSAGES:
        raise ControlError(f"unknown control message type {name!r}")
    types = _FIELD_TYPES[name]
    if set(data) != set(types):
        raise ControlError(f"{name}: fields {sorted(data)} != expected {sorted(types)}")
    for key, value in data.items():
        if not isinstance(value, types[key]) or (isinstance(value, bool) and bool not in types[key]):
            raise ControlError(f"{name}.{key} has type {type(value).__name__}")
    return MESSAGES[name](**data)
