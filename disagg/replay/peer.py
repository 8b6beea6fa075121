"""``disagg experiment``'s peer series: the same shaped trace against what one would
run otherwise, in the same report.

``vllm`` in ``--modes`` adds it (it is not a default mode)::

    vllm serve      started once for every rate from the vLLM peer environment
                    (``make peers``; ``--vllm-python`` / ``$DISAGG_VLLM_PYTHON``),
                    the same model and dtype as the disagg nodes, pinned to the
                    same cores the other modes use in total; series ``vllm``
    --peer-url URL  instead: the OpenAI-compatible server already running at URL
                    (any server; ``--peer-url`` alone implies the peer series),
                    series ``--peer-name`` (default ``peer``)

Pinning sets vLLM's CPU affinity mask before it runs (see
:class:`disagg.bench.server_process.Server`); every process it starts inherits the
mask, and vLLM's default ``VLLM_CPU_OMP_THREADS_BIND=auto`` picks its OpenMP
cores from inside it (one per physical core, one reserved for its scheduler
process), so the peer uses exactly the experiment's cores. Otherwise vLLM runs
as ``disagg bench serve`` starts it (:func:`disagg.bench.serve.server_command`).
A peer that is not a disagg router has no server counters: its report columns
for routes and KV moved say ``n/a``.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PEER_MODE = "vllm"
PEER_START_TIMEOUT_S = 900.0     # vLLM's CPU backend compiles the model at start-up (minutes)
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def add_peer_args(p: argparse.ArgumentParser) -> None:
    """``--peer-url``, ``--peer-name`` and ``--vllm-python`` (see the module docstring)."""
    g = p.add_argument_group("peer series (mode vllm)")
    g.add_argument("--peer-url", default=None,
                   help="replay the peer series against this running OpenAI-compatible server "
                        "(http://host:port) instead of starting vllm serve; implies the series")
    g.add_argument("--peer-name", default=None,
                   help="the --peer-url series' name in the report (default: peer)")
    g.add_argument("--vllm-python", default=None,
                   help="Python of the vLLM peer environment (default: $DISAGG_VLLM_PYTHON, "
                        "else .peers/vllm/bin/python; `make peers` makes it)")


@dataclass(frozen=True)
class PeerConfig:
    """The peer series: its name, and either a running server's URL or the peer
    environment's Python that starts ``vllm serve``."""

    name: str
    url: str | None = None
    vllm_python: Path | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"the peer series name must be letters, digits, '.', '_' or '-', "
                             f"got {self.name!r}")
        if (self.url is None) == (self.vllm_python is None):
            raise ValueError("a peer needs exactly one of url and vllm_python")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--peer-url must be http(s)://host:port, got {self.url!r}")


def series_plan(a: argparse.Namespace, modes: tuple[str, ...]) -> tuple[list[str], PeerConfig | None]:
    """The series to run, in order, and the peer (None without one).

    ``modes`` are the disagg modes; ``vllm`` in ``--modes`` marks where the peer
    runs (``--peer-url`` without it appends it). The list holds the peer's series
    name. Refuses bad flags, and a missing peer environment, before anything starts.
    """
    names = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = [m for m in names if m not in (*modes, PEER_MODE)]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"--modes must be distinct names among {', '.join(modes)}, "
                         f"{PEER_MODE}; got {a.modes!r}")
    if a.peer_url and PEER_MODE not in names:
        names.append(PEER_MODE)
    if PEER_MODE not in names:
        if a.peer_name is not None:
            raise ValueError("--peer-name names the --peer-url series; add --peer-url")
        return names, None
    if a.peer_url:
        peer = PeerConfig(name=a.peer_name or "peer", url=a.peer_url.rstrip("/"))
        if peer.name in modes:
            raise ValueError(f"--peer-name {peer.name!r} is a disagg mode; pick another")
    else:
        if a.peer_name is not None:
            raise ValueError("--peer-name names the --peer-url series; vllm serve's is 'vllm'")
        from disagg.bench.engine import find_vllm_python      # imports torch: only when needed
        peer = PeerConfig(name=PEER_MODE, vllm_python=find_vllm_python(a.vllm_python))
    return [peer.name if n == PEER_MODE else n for n in names], peer


@contextmanager
def running_peer(peer: PeerConfig, model: str, dtype: str, cpus: list[int],
                 log_dir: Path) -> Iterator[str]:
    """The peer's base URL while it runs: a ``--peer-url`` as is, or ``vllm serve``
    started (``model`` and ``dtype`` as the nodes', pinned to ``cpus``) and stopped
    when the block ends."""
    if peer.url is not None:
        yield peer.url
        return
    from disagg.bench.serve import server_command
    from disagg.bench.server_process import Server, free_port
    from disagg.model.resolve import resolve_model_dir, served_model_name
    port = free_port()
    flags = argparse.Namespace(dtype=dtype, vllm_serve_args="")
    cmd, env = server_command(PEER_MODE, flags, port, resolve_model_dir(model),
                              served_model_name(model), peer.vllm_python)
    log_dir.mkdir(parents=True, exist_ok=True)
    server = Server(PEER_MODE, cmd, env, port, log_dir / "vllm-serve.log", cpus=set(cpus))
    try:
        server.start(PEER_START_TIMEOUT_S)
        yield server.url
    finally:
        server.stop()
