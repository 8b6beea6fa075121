"""Control messages between the router and the nodes: frozen ``msgspec`` structs ↔ msgpack.

One ZeroMQ ROUTER socket on the router, one DEALER per node (its identity is
the node id). A frame is ``msgpack({"type": NAME, **fields})``: the messages
form one tagged union (tag field ``type``, tag = the class name), and
:func:`decode` runs one typed ``msgspec`` decoder over it, which checks the
type name and every field's type (bools are not ints, ints are floats, no
missing or extra fields) while it parses, and raises :class:`ControlError` on
anything malformed (never pickle). The contents of the dict fields (targets,
sampling params) are checked again by whoever uses them
(``KVLoadTarget.from_dict``, ``SamplingParams.from_dict``), so new sampling
fields travel without codec changes.

The request flows (``rid`` is the router's request id)::

    local:   router ─Generate(remote=False)─▶ decode ─StepTokens…─▶ router
    remote:  router ─Generate(remote=True)──▶ decode ─KVTarget─▶ router
             router ─Prefill(target)────────▶ prefill ─FirstToken─▶ router ─FirstToken─▶ decode
             prefill ═══ KV blocks (transport) ═══▶ decode ─StepTokens…─▶ router
             prefill ─KVSent(error?)─▶ router   (an error → Fallback to the decode node)
    any:     router ─Abort─▶ node;   router ─Fallback─▶ decode (prefill node lost)

A decode node sends one ``StepTokens`` per engine step, holding a ``Tokens``
per request that got tokens (or ended) in that step: one frame, one receive
and one wakeup on the router per step instead of one per request.

Node life: ``Register`` → ``Registered``; then, when the router has an uplink
listener, the node opens its uplink (``UplinkHello`` on it; the router answers
``UplinkReady``; ``UplinkSwitch`` on the control socket) and sends everything but
``Register`` and heartbeats there (``router.uplinks``: a plain TCP stream, without
ZeroMQ's I/O threads in between); a node that says so in its hello also gets the
router's messages on it, after ``DownlinkSwitch`` (the control socket's last message
from the router); ``Heartbeat`` every
``heartbeat_s``; a router that does not know a heartbeating node answers
``RegisterAgain`` (it restarted, or dropped the node as dead). On SIGTERM a
node sends ``Drain``, finishes its requests, then ``Deregister`` and exits.
Times (``*_at``) are ``time.monotonic()`` seconds — comparable between
processes of one host only, used for latency accounting.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

import msgspec

from disagg.logprobs import TokenLogprobs


def logprobs_to_wire(lp) -> list | None:
    """A ``TokenLogprobs`` as ``[token_id, logprob, [[id, logprob], ...]]`` (or None)."""
    if lp is None:
        return None
    return [lp.token_id, float(lp.logprob), [[int(t), float(v)] for t, v in lp.top]]


def logprobs_from_wire(entry):
    """Inverse of :func:`logprobs_to_wire` (a ``TokenLogprobs``, or None)."""
    if entry is None:
        return None
    token_id, logprob, top = entry
    return TokenLogprobs(int(token_id), float(logprob), [(int(t), float(v)) for t, v in top])


class ControlError(ValueError):
    """A control frame that is not a well-formed message."""


class ControlMessage(msgspec.Struct, frozen=True, tag_field="type", tag=True,
               forbid_unknown_fields=True):
    """Base of every control message (a frozen struct; the tag ``type`` is the class name)."""


class Register(ControlMessage):
    """Node → router: who I am, what I can hold and what I compute on.

    The compute fields (added later, so with defaults: an older node omits them
    and is taken to share compute with nobody) let the router's cost model see
    when a prefill node competes with a decode node for the same cores or GPU:
    ``boot_id``: the kernel's /proc/sys/kernel/random/boot_id (one per machine,
    the same in every container on it; ``host`` is the hostname, which is not);
    ``cpus``: the cores the node may run on (its affinity after ``--cpus``);
    ``device``: "cpu" | "cuda"; ``gpus``: the UUIDs of the GPUs its ranks use.
    """

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
    kv_endpoints: list[str]       # decode ranks' receive endpoints (empty on prefill)
    pid: int
    host: str
    boot_id: str = ""
    cpus: list[int] = []
    device: str = ""
    gpus: list[str] = []


class Registered(ControlMessage):
    """Router → node: registration accepted.

    ``router_id``: this router process's instance id (new on every start). A node
    that sees it change was registered with a router that is gone: it aborts every
    request it holds (that router's), so no blocks or pins are left behind.
    ``uplink_port``: the TCP port of the router's uplink listener, on the host the
    node reached the control socket at (0: none; added later, so with a default).
    """

    node_id: str
    router_id: str = ""
    uplink_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0


class UplinkHello(ControlMessage):
    """Node → router, the first frame on a new uplink (``router.uplinks``): whose
    connection it is (``pid`` tells a restarted node's uplink from its old one's).
    ``downlink``: the node also reads the router's messages on it (added later, so
    with a default: the router keeps writing to an older node's control socket)."""

    node_id: str
    pid: int
    downlink: bool = False


class UplinkReady(ControlMessage):
    """Router → node: the ``UplinkHello`` of the node's process ``pid`` arrived; the node
    may switch to that uplink (it never sends on one the router has not confirmed)."""

    node_id: str
    pid: int


class UplinkSwitch(ControlMessage):
    """Node → router on the control socket: the last message there before the node's
    messages move to the uplink it opened (``pid``). The router handles what that
    uplink brings only after this, so messages sent before the switch come first."""

    node_id: str
    pid: int


class DownlinkSwitch(ControlMessage):
    """Router → node on the control socket: the last message there before the router's
    messages to the node move to its uplink, the connection from the node's local
    ``port``. The node handles what that uplink brings only after this, so messages
    sent before the switch come first."""

    node_id: str
    port: int


class Refused(ControlMessage):
    """Router → node: registration refused for good (``reason`` says why); the node exits."""

    node_id: str
    reason: str


class RegisterAgain(ControlMessage):
    """Router → node: I do not know you (restarted, or dropped you); send Register."""

    node_id: str


class Heartbeat(ControlMessage):
    """Node → router: alive, with its load and what it measured since the last one.

    ``load``: ``LLMEngine.load()``. ``steps``: ``[prefill_tokens, decode_seqs,
    seconds]`` per engine step (calibrates the router's cost model).
    ``kv_bytes_*``: cumulative KV bytes this node sent / received.
    """

    node_id: str
    load: dict[str, int | float]
    steps: list[tuple[int, int, float]]
    kv_bytes_sent: int
    kv_bytes_received: int


class Generate(ControlMessage):
    """Router → decode: run this request; ``remote`` = its KV comes from a prefill node.

    ``resume_token_ids``: output tokens the client already has (a request migrated
    from a lost decode node). The engine starts the request with them as its output
    (prefilling prompt + them, as after a preemption), so ``max_tokens``, penalties,
    stop strings and ``Tokens.output_len`` count them; such a request is never remote.
    """

    rid: str
    prompt_token_ids: list[int]
    params: dict[str, Any]        # SamplingParams.to_dict()
    remote: bool
    resume_token_ids: list[int] = []


class KVTarget(ControlMessage):
    """Decode → router: blocks reserved for a remote request (``KVLoadTarget.to_dict()``).

    ``num_cached_tokens`` of the prompt were already in the decode node's
    prefix cache and will not move.
    """

    rid: str
    target: dict[str, Any]
    num_cached_tokens: int
    received_at: float            # when the decode node got the Generate


class Prefill(ControlMessage):
    """Router → prefill: compute this prompt's KV and send it to ``target``."""

    rid: str
    prompt_token_ids: list[int]
    params: dict[str, Any]
    target: dict[str, Any]


class FirstToken(ControlMessage):
    """Prefill → router → decode: the remote prefill's first token.

    ``logprobs``: ``[token_id, logprob, [[id, logprob], ...]]`` or None.
    ``prefill_s``: seconds from the prefill node receiving the request to this token.
    """

    rid: str
    token_id: int
    logprobs: list | None
    prefill_s: float
    sent_at: float


class KVSent(ControlMessage):
    """Prefill → router: the KV transfer ended (``error`` None = delivered).

    ``seconds``: from the first token to the end of the transfer (the part not
    hidden behind compute).
    """

    rid: str
    error: str | None
    seconds: float


class Tokens(ControlMessage):
    """Decode → router: new tokens of a request (and its end when ``finished``).

    ``output_len`` is the request's output length after ``new_token_ids``
    (a remote request's first token, already streamed, is not resent twice).
    ``route``: "local" | "remote" | "fallback", where its prefill ran.
    ``received_at``: when the node got the Generate (first message only).
    ``prompt_logprobs``: per prompt token ``[id, logprob, [[id, lp], ...]]`` (None for
    the first), on the request's first message when its params asked for them.
    """

    rid: str
    new_token_ids: list[int]
    output_len: int
    logprobs: list[list | None]   # per new token: [id, logprob, [[id, lp], ...]] or None
    finished: bool
    finish_reason: str | None
    text: str | None              # final text (stop strings applied) when finished
    num_cached_tokens: int
    route: str
    sent_at: float
    received_at: float | None
    prompt_logprobs: list[list | None] | None = None


class StepTokens(ControlMessage):
    """Decode → router: every request's ``Tokens`` from one engine step (in output order).

    Each item is a whole ``Tokens`` (its own ``sent_at``, the same for all of
    one step); the router handles them one by one, exactly as if each had come
    alone.
    """

    items: list[Tokens]


class Fallback(ControlMessage):
    """Router → decode: the remote prefill failed; prefill this request locally."""

    rid: str
    reason: str


class Abort(ControlMessage):
    """Router → node: forget this request and free its blocks (client gone)."""

    rid: str


class Drain(ControlMessage):
    """Node → router: I am shutting down (SIGTERM); route nothing new to me. The node
    finishes what it holds (up to its grace period), then sends ``Deregister``."""

    node_id: str


class Deregister(ControlMessage):
    """Node → router: I am leaving now. Requests I still hold are recovered as for a
    lost node (remote prefills fall back, decodes migrate)."""

    node_id: str


class Rejected(ControlMessage):
    """Node → router: a request could not be taken or ended in error (``error`` says why).

    ``error == DRAINING``: the node is draining (it sent ``Drain``, the request crossed
    it): nothing is wrong with the request, the router routes it to another node.
    """

    rid: str
    error: str


DRAINING = "the node is draining"
"""``Rejected.error`` of a request refused because its node is draining."""


MESSAGES = {cls.__name__: cls for cls in (
    Register, Registered, Refused, RegisterAgain, Heartbeat, Generate, KVTarget, Prefill, FirstToken,
    KVSent, Tokens, StepTokens, Fallback, Abort, Drain, Deregister, Rejected, UplinkHello,
    UplinkReady, UplinkSwitch, DownlinkSwitch)}

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Union[tuple(MESSAGES.values())])


def encode(msg: ControlMessage) -> bytes:
    """One frame for ``msg`` (a control message)."""
    if MESSAGES.get(type(msg).__name__) is not type(msg):
        raise TypeError(f"{type(msg).__name__} is not a control message")
    return _ENCODER.encode(msg)


def decode(frame: bytes) -> ControlMessage:
    """The message in ``frame``; :class:`ControlError` if it is malformed."""
    try:
        return _DECODER.decode(frame)
    # ValidationError is a DecodeError (wrong shape or type); msgspec raises
    # UnicodeDecodeError for a string that is not UTF-8, and RecursionError for
    # nesting deeper than its limit (a nesting bomb in an ``Any`` field).
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ControlError(f"malformed control frame: {exc}") from None
