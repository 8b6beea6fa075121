"""The router's table of nodes: registration, health, load, and picking one.

A node is *up* while its heartbeats arrive; after ``node_timeout_s`` of
silence it is *down* (its requests fall back or fail, see
``router.dispatch``) and is forgotten; when it speaks again it is asked to
register and is used again. A node that said ``Drain`` is *draining*: still
registered and heartbeating, finishing its requests, but never picked for new
ones. Load is the node's last heartbeat, raised by the prompt tokens the router
sent it since (heartbeats lag by up to one period).

Picking (xPyD):
- decode node: least ``queued + uncached`` prompt tokens, where ``uncached``
  is what its prefix cache (as the router's :class:`PrefixIndex` guesses)
  lacks, plus ``RUNNING_TOKEN_WEIGHT`` tokens per running request;
- prefill node: least ``queued + prompt`` tokens (no prefix cache is assumed
  there: the transfer sends what the decode node lacks).

Each node's compute (machine, CPU set, GPUs: ``Register``'s compute fields)
reaches the routing policy in :meth:`Node.as_load`, so the cost model knows
when a prefill node competes with a decode node for the same cores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property

from disagg.control import messages as m
from router.prefix_index import PrefixIndex
from router.route_types import DEVICES, Compute, NodeLoad

RUNNING_TOKEN_WEIGHT = 32     # a running decode "costs" this many queued prompt tokens


@dataclass
class Node:
    """One registered node and what the router knows of it."""

    info: m.Register
    last_seen: float
    load: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)     # rid → prompt tokens sent, not yet prefilled
    kv_bytes_received: int = 0
    draining: bool = False                          # said Drain: no new requests

    @property
    def state(self) -> str:
        """``"up"`` or ``"draining"`` (a registered node is never ``"down"``)."""
        return "draining" if self.draining else "up"

    @property
    def node_id(self) -> str:
        return self.info.node_id

    @cached_property
    def compute(self) -> Compute:
        """What the node computes on, as registered (empty where it did not say)."""
        i = self.info
        return Compute(i.boot_id or i.host, frozenset(i.cpus), frozenset(i.gpus), i.device)

    def queued_tokens(self) -> int:
        """Prompt tokens queued here: the heartbeat's figure or what the router sent since."""
        return max(int(self.load.get("queued_prefill_tokens", 0)), sum(self.pending.values()))

    def as_load(self) -> NodeLoad:
        """This node's load for a routing policy."""
        return NodeLoad(self.node_id, self.info.role, self.queued_tokens(),
                        int(self.load.get("num_running", 0)), int(self.load.get("num_waiting", 0)),
                        min(max(float(self.load.get("kv_usage", 0.0)), 0.0), 1.0), self.info.tp,
                        self.compute)


class NodeRegistry:
    """Registered nodes by id, checked against the served model."""

    def __init__(self, served_model: str, node_timeout_s: float = 3.0) -> None:
        if node_timeout_s <= 0:
            raise ValueError(f"node_timeout_s must be > 0, got {node_timeout_s!r}")
        self.served_model = served_model
        self.node_timeout_s = node_timeout_s
        self.nodes: dict[str, Node] = {}
        self.prefixes = PrefixIndex()

    def register(self, info: m.Register) -> Node:
        """Add (or replace) a node; ``ValueError`` if it does not fit this deployment."""
        self.check(info)
        node = Node(info, time.monotonic())
        self.prefixes.add_node(info.node_id, info.num_kv_blocks)
        self.nodes[info.node_id] = node
        return node

    def check(self, info: m.Register) -> None:
        """``ValueError`` unless ``info`` fits this deployment (changes nothing)."""
        if info.role not in ("prefill", "decode"):
            raise ValueError(f"unknown role {info.role!r}")
        if info.model != self.served_model:
            raise ValueError(f"node serves model {info.model!r}, this router serves "
                             f"{self.served_model!r}")
        for other in self.nodes.values():
            if other.node_id != info.node_id and other.info.block_size != info.block_size:
                raise ValueError(f"block size {info.block_size} differs from node "
                                 f"{other.node_id}'s {other.info.block_size}")
            if other.node_id != info.node_id and other.info.kv_transport != info.kv_transport:
                raise ValueError(f"KV transport {info.kv_transport!r} differs from node "
                                 f"{other.node_id}'s {other.info.kv_transport!r}")
        if info.role == "decode" and not info.kv_endpoints:
            raise ValueError("a decode node must report its KV receive endpoints")
        if info.device not in DEVICES or any(c < 0 for c in info.cpus):
            raise ValueError(f"bad compute report: device {info.device!r}, cpus {info.cpus}")
        for name in ("tp", "block_size", "num_kv_blocks", "max_model_len", "vocab_size",
                     "kv_bytes_per_token"):
            if getattr(info, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(info, name)!r}")

    def heartbeat(self, beat: m.Heartbeat) -> Node | None:
        """Record a heartbeat; None if the node is not registered."""
        node = self.nodes.get(beat.node_id)
        if node is not None:
            node.last_seen = time.monotonic()
            node.load = beat.load
        return node

    def excuse(self, seconds: float) -> None:
        """Count the last ``seconds`` as heard from every node: the router was not running
        to hear them (each node's silence restarts from where it stood)."""
        for node in self.nodes.values():
            node.last_seen += seconds

    def expire(self, now: float) -> list[Node]:
        """Drop and return the nodes silent for longer than ``node_timeout_s``."""
        dead = [n for n in self.nodes.values() if now - n.last_seen > self.node_timeout_s]
        for n in dead:
            self.remove(n.node_id)
        return dead

    def remove(self, node_id: str) -> Node | None:
        """Forget a node (and the router's guess of its cache)."""
        self.prefixes.remove_node(node_id)
        return self.nodes.pop(node_id, None)

    def of_role(self, role: str) -> list[Node]:
        """The registered nodes of ``role`` (draining ones included)."""
        return [n for n in self.nodes.values() if n.info.role == role]

    def usable(self, role: str) -> list[Node]:
        """The registered nodes of ``role`` that take new requests (not draining)."""
        return [n for n in self.nodes.values() if n.info.role == role and not n.draining]

    def pick_decode(self, hashes: list[int], num_prompt_tokens: int) -> tuple[Node, int] | None:
        """The decode node to use and its guessed cached tokens; None if there is none
        (draining nodes are never picked)."""
        best = None
        for node in self.usable("decode"):
            cached = self.prefixes.match(node.node_id, hashes) * node.info.block_size
            cost = (node.queued_tokens() + num_prompt_tokens - cached
                    + RUNNING_TOKEN_WEIGHT * int(node.load.get("num_running", 0)))
            if best is None or (cost, -cached) < best[0]:
                best = ((cost, -cached), node, cached)
        return None if best is None else (best[1], best[2])

    def pick_prefill(self, num_prompt_tokens: int) -> Node | None:
        """The least-loaded prefill node that is not draining; None if there is none."""
        nodes = self.usable("prefill")
        return min(nodes, key=lambda n: n.queued_tokens() + num_prompt_tokens, default=None)

    def max_model_len(self) -> int | None:
        """The context length every decode node can serve (None without decode nodes)."""
        lens = [n.info.max_model_len for n in self.of_role("decode")]
        return min(lens) if lens else None

    def vocab_size(self) -> int | None:
        """The vocabulary every decode node accepts (None without decode nodes)."""
        sizes = [n.info.vocab_size for n in self.of_role("decode")]
        return min(sizes) if sizes else None

    def block_size(self) -> int | None:
        """The deployment's KV block size (None before any node registered)."""
        return next((n.info.block_size for n in self.nodes.values()), None)
