"""Tensor-parallel worker ranks of one engine.

With TP > 1 the driver process only schedules and samples; ranks 0..p-1 are
spawned processes that loop on one thing: receive the step (a msgpack blob
over a pipe, empty = shut down), execute it. Activations are all-reduced
inside the forward pass over the torch.distributed group (gloo on CPU, NCCL
on CUDA), so every rank runs every step. Rank 0 sends the logits back (or
only their argmax when every row is greedy); every rank also reports the KV
transfers its connector finished::

    driver                 rank 0                  rank 1 .. p-1
    schedule()
    send step ──pipe──▶    execute ◀─all-reduce─▶  execute
    sample    ◀──pipe──    logits + KV report      KV report (every rank)

Keeping every rank out of the driver keeps the driver free of process-group
state, so engines of different TP degrees can live in one process.
With TP = 1 the driver runs the model itself and none of this is used.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import socket
import sys
import traceback
from pathlib import Path

import msgpack
import torch

from disagg.config import EngineConfig
from disagg.cpus import usable_cpus
from disagg.distributed import destroy_tensor_parallel, init_tensor_parallel
from disagg.engine.step_input import StepInput

STARTUP_TIMEOUT_S = 600.0


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port chosen by the OS (no hard-coded ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def threads_per_rank(config: EngineConfig) -> int:
    """Split the usable cores between the engine's ranks."""
    if config.torch_threads:
        return config.torch_threads
    return max(1, len(usable_cpus()) // config.tensor_parallel_size)


def _worker_main(config: EngineConfig, model_cfg, model_dir: Path | None, rank: int,
                 num_blocks: int, init_method: str, conn, connector_cls) -> None:
    from disagg.engine.model_runner import ModelRunner
    # A terminal's Ctrl-C reaches the whole process group: the driver decides when its
    # ranks stop (a node drains first), so a rank ignores SIGINT and ends when the
    # driver closes its pipe (or dies: the pipe closes then too). SIGTERM still ends a
    # rank (a rank stuck in a collective must stay killable by a process-group signal).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        torch.set_num_threads(threads_per_rank(config))
        init_tensor_parallel(rank, config.tensor_parallel_size, init_method, config.device)
        runner = ModelRunner(config, model_cfg, model_dir, num_blocks,
                             connector_cls() if connector_cls else None)
        conn.send_bytes(msgpack.packb({"ready": True, "info": runner.handshake_info()}))
    except Exception:
        conn.send_bytes(msgpack.packb({"ready": False, "error": traceback.format_exc()}))
        return
    try:
        while True:
            data = conn.recv_bytes()
            if not data:
                break
            step = StepInput.from_bytes(data)
            logits, plp = runner.execute(step)
            report = runner.kv_report(step.poll_timeout_s)
            conn.send_bytes(encode_reply(logits if rank == 0 else None, step.return_argmax, report,
                                         plp))
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception:
        traceback.print_exc(file=sys.stderr)
        raise
    finally:
        runner.close()
        destroy_tensor_parallel()


def encode_reply(logits: torch.Tensor | None, argmax: bool, kv_report: dict,
                 prompt_logprobs: dict | None = None) -> bytes:
    """A rank's reply: its KV-connector report, and on rank 0 fp32 logits (N, V)
    or, when ``argmax``, int64 ids (N,), plus the step's prompt logprobs (plain
    lists, :func:`disagg.engine.prompt_logprobs.compute`) if any."""
    if logits is None:
        return msgpack.packb({"kind": "none", "kv": kv_report, "plp": prompt_logprobs})
    if argmax:
        ids = logits.argmax(dim=-1).cpu()
        return msgpack.packb({"kind": "ids", "data": ids.numpy().tobytes(), "kv": kv_report,
                              "plp": prompt_logprobs})
    arr = logits.float().cpu().contiguous()
    return msgpack.packb({"kind": "logits", "shape": list(arr.shape), "data": arr.numpy().tobytes(),
                          "kv": kv_report, "plp": prompt_logprobs})


def decode_reply(data: bytes) -> tuple[torch.Tensor | None, dict | None, dict]:
    """Inverse of :func:`encode_reply`: (logits or argmax ids as int64, prompt
    logprobs, KV report)."""
    msg = msgpack.unpackb(data)
    if msg["kind"] == "none":
        return None, msg["plp"], msg["kv"]
    if msg["kind"] == "ids":
        return torch.frombuffer(bytearray(msg["data"]), dtype=torch.int64), msg["plp"], msg["kv"]
    logits = torch.frombuffer(bytearray(msg["data"]), dtype=torch.float32).view(*msg["shape"])
    return logits, msg["plp"], msg["kv"]


class TPWorkers:
    """Driver-side handle on ranks 0..p-1: start them, feed them steps, stop them."""

    def __init__(self, config: EngineConfig, model_cfg, model_dir: Path | None, num_blocks: int,
                 connector_cls=None) -> None:
        self.size = config.tensor_parallel_size
        self.init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        for rank in range(self.size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, daemon=True, name=f"disagg-tp{rank}",
                            args=(config, model_cfg, model_dir, rank, num_blocks,
                                  self.init_method, child, connector_cls))
            p.start()
            self.procs.append(p)
            self.conns.append(parent)

    def wait_ready(self) -> list[dict]:
        """Block until every rank loaded its shard; return each rank's handshake info."""
        infos = []
        for rank, conn in enumerate(self.conns):
            if not conn.poll(STARTUP_TIMEOUT_S):
                raise TimeoutError(f"TP rank {rank} did not start within {STARTUP_TIMEOUT_S:.0f} s")
            msg = msgpack.unpackb(conn.recv_bytes())
            if not msg["ready"]:
                raise RuntimeError(f"TP rank {rank} failed to start:\n{msg['error']}")
            infos.append(msg["info"])
        return infos

    def execute(self, step: StepInput) -> tuple[torch.Tensor | None, dict | None, list[dict]]:
        """Run the step on every rank; rank 0's logits (or argmax ids) and prompt
        logprobs, and every rank's KV-connector report come back."""
        data = step.to_bytes()
        for rank, (p, conn) in enumerate(zip(self.procs, self.conns)):
            if not p.is_alive():
                raise RuntimeError(f"TP rank {rank} died (exit code {p.exitcode})")
            conn.send_bytes(data)
        logits, plp, reports = None, None, []
        for rank, conn in enumerate(self.conns):
            while not conn.poll(1.0):
                for r, p in enumerate(self.procs):
                    if not p.is_alive():
                        raise RuntimeError(f"TP rank {r} died during a step (exit code {p.exitcode})")
            out, rank_plp, report = decode_reply(conn.recv_bytes())
            if rank == 0:
                logits, plp = out, rank_plp
            reports.append(report)
        return logits, plp, reports

    def shutdown(self) -> None:
        for conn in self.conns:
            try:
                conn.send_bytes(b"")
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.procs, self.conns = [], []
