"""A prefill node stopped while it holds its compute turn: how long do the decode node's
streams stall?

    .venv/bin/python scripts/stopped_turn.py [--turn-wait-s 10] [--stop-s 20] [--json]

Starts the deployment ``disagg serve`` makes on a machine too small to split (router,
one prefill and one decode node on the same cores, taking turns at compute; here with
``--policy remote`` so every prompt goes through the prefill node), its decode node
given ``--compute-turn-wait-s TURN_WAIT_S``. One stream decodes a short prompt; then a
long prompt goes to the prefill node, which is SIGSTOPped at the moment it is seen
holding the turn (``/proc/locks``) and continued ``--stop-s`` later. A process that is
stopped, or hung in a step, keeps its lock: without a bound on the wait, every step of
the decode node waits for it.

Prints (JSON with ``--json``) the running stream's longest gap between two tokens and
its end, the stopped prefill's request and a request sent during the stop (each from
its send to its last token, seconds), and how many times the decode node gave up waiting
for its turn (its log). ``--turn-wait-s 1e9`` is the behaviour before the bound.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from disagg.chaos import stop_in_turn
from disagg.cluster import ClusterConfig, LocalCluster
from disagg.config import DEFAULT_COMPUTE_TURN_WAIT_S, check_wait_s
from disagg.model.resolve import served_model_name


def _stream(url: str, model: str, prompt: list[int], max_tokens: int, out: dict) -> None:
    """Stream a greedy completion; ``out`` gets its send time, token times and status."""
    out["sent"], out["tokens"] = time.monotonic(), []
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    out["tokens"].append(time.monotonic())
    except httpx.HTTPError as exc:
        out["status"] = repr(exc)


def _seconds(out: dict) -> float | None:
    return round(out["tokens"][-1] - out["sent"], 3) if out.get("tokens") else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--turn-wait-s", type=float, default=DEFAULT_COMPUTE_TURN_WAIT_S,
                   help="the decode node's --compute-turn-wait-s")
    p.add_argument("--stop-s", type=float, default=20.0, help="how long the prefill node stays stopped")
    p.add_argument("--long-prompt", type=int, default=900, help="tokens of the stopped prefill's prompt")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        check_wait_s("--turn-wait-s", a.turn_wait_s)
    except ValueError as exc:
        p.error(str(exc))
    if not a.stop_s > 0 or not a.long_prompt > 0:
        p.error("--stop-s and --long-prompt must be > 0")
    rng = random.Random(0)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, 49152) for _ in range(n)]
    logs = tempfile.mkdtemp(prefix="stopped-turn-")
    cfg = ClusterConfig(policy="remote", compute_turns=True, node_timeout_s=1.5, log_dir=logs,
                        decode_args=("--compute-turn-wait-s", repr(a.turn_wait_s)))
    print(f"[stopped turn] starting router + prefill + decode on shared cores (logs in {logs})",
          file=sys.stderr, flush=True)
    with LocalCluster(cfg) as cluster:
        cluster.start()
        url, model = cluster.http_url, served_model_name(cfg.model)
        prefill, path = cluster.procs["prefill-0"], cluster.turns_path
        running, held, during = {}, {}, {}
        threads = [threading.Thread(target=_stream, args=(url, model, prompt(16), 256, running))]
        threads[0].start()
        while not running.get("tokens"):           # the stream is decoding
            time.sleep(0.01)
        caught = False
        for _ in range(5):                         # until a prefill is seen in its turn
            held.clear()
            t = threading.Thread(target=_stream, args=(url, model, prompt(a.long_prompt), 8, held))
            t.start()
            threads.append(t)
            caught = stop_in_turn(prefill, path, t.is_alive)
            if caught:
                break
        if not caught:
            print("[stopped turn] never caught the prefill node in its turn", file=sys.stderr)
            return 1
        print(f"[stopped turn] prefill node stopped in its turn; continuing it in {a.stop_s:g} s",
              file=sys.stderr, flush=True)
        time.sleep(1.0)
        t = threading.Thread(target=_stream, args=(url, model, prompt(16), 16, during))
        t.start()
        threads.append(t)
        time.sleep(max(a.stop_s - 1.0, 0.0))
        prefill.send_signal(signal.SIGCONT)
        for t in threads:
            t.join()
    times = running["tokens"]
    gaps = [b - a_ for a_, b in zip(times, times[1:])]
    skipped = (Path(logs) / "decode-0.log").read_text().count("not granted in")
    report = {
        "turn_wait_s": a.turn_wait_s, "stop_s": a.stop_s,
        "running_stream": {"status": running.get("status"), "tokens": len(times),
                           "longest_gap_s": round(max(gaps), 3) if gaps else None,
                           "seconds": _seconds(running)},
        "stopped_prefill_request": {"status": held.get("status"), "seconds": _seconds(held)},
        "request_sent_during_the_stop": {"status": during.get("status"),
                                         "seconds": _seconds(during)},
        "decode_turn_waits_given_up": skipped, "logs": logs,
    }
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
