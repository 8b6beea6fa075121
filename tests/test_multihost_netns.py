"""Three "hosts" on one machine: router, prefill node and decode node each in its own network
namespace, joined by a bridge, started with the launch scripts the way their headers say.

- remote prefill over zmq tcp between the namespaces is token-identical to transformers;
- then the prefill<->decode path is cut with blackhole routes (the router still reaches
  both): every request still completes exactly, each within 3 s more than an uncut one
  (the KV transfer notices the dead link by itself: ZeroMQ heartbeats, handshake deadline),
  not after the 30 s KV timeouts;
- the path restored, remote prefill works again.

Needs root and ``ip netns`` (CI runs as root); skips with the reason otherwise. Namespaces,
the bridge and the veth pairs are made in private namespaces only: the host's own network
is not touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import needs_smollm2, random_prompts
from serving_helpers import MODEL, reference

pytestmark = [needs_smollm2, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SUBNET = "10.231.77"                 # private: lives only inside the test's namespaces
HOSTS = {"router": 1, "prefill": 2, "decode": 3}
HTTP_PORT, CONTROL_PORT = 8000, 7100  # fixed ports are safe: each namespace is empty
CUT_MARGIN_S = 3.0


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(("-n", ns) if ns else ()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def _netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here (None if they can)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root)"
    if shutil.which("ip") is None:
        return "needs the 'ip' command (iproute2)"
    probe = f"dgprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"'ip netns add' failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Namespaces:
    """A bridge namespace and one namespace per role, each with a veth on the bridge."""

    def __init__(self) -> None:
        tag = f"dg{os.getpid() % 100000}"
        self.bridge = f"{tag}br"
        self.ns = {role: f"{tag}{role[0]}" for role in HOSTS}
        self.made: list[str] = []

    def addr(self, role: str) -> str:
        return f"{SUBNET}.{HOSTS[role]}"

    def create(self) -> None:
        for name in (self.bridge, *self.ns.values()):
            _ip("netns", "add", name)
            self.made.append(name)
            _ip("link", "set", "lo", "up", ns=name)
        _ip("link", "add", "br0", "type", "bridge", ns=self.bridge)
        _ip("link", "set", "br0", "up", ns=self.bridge)
        for role, ns in self.ns.items():
            # created inside the bridge namespace, one end then moved into the role's
            _ip("link", "add", f"v{role}", "type", "veth", "peer", "name", "eth0", ns=self.bridge)
            _ip("link", "set", "eth0", "netns", ns, ns=self.bridge)
            _ip("link", "set", f"v{role}", "master", "br0", ns=self.bridge)
            _ip("link", "set", f"v{role}", "up", ns=self.bridge)
            _ip("addr", "add", f"{self.addr(role)}/24", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)

    def cut(self, a: str, b: str, on: bool = True) -> None:
        """Blackhole the path between roles ``a`` and ``b`` (both directions), or restore it."""
        for src, dst in ((a, b), (b, a)):
            _ip("route", "add" if on else "del", "blackhole", f"{self.addr(dst)}/32",
                ns=self.ns[src])

    def destroy(self) -> None:
        for name in reversed(self.made):
            _ip("netns", "del", name, check=False)
        self.made.clear()


def _spawn(ns: str, script: str, env: dict, log: Path, *args: str) -> subprocess.Popen:
    """A launch script inside ``ns`` (``ip netns exec`` and the script both exec: the pid
    is the role's Python process)."""
    full = dict(os.environ, **env)
    return subprocess.Popen(["ip", "netns", "exec", ns, str(REPO / "scripts" / script), *args],
                            env=full, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


CLIENT = """
import json, sys, time, urllib.request, urllib.error
url, body = sys.argv[1], sys.argv[2]
t0 = time.monotonic()
try:
    if body == "GET":
        with urllib.request.urlopen(url, timeout=120) as r:
            status, text = r.status, r.read().decode()
    else:
        req = urllib.request.Request(url, body.encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text = r.status, r.read().decode()
except urllib.error.HTTPError as exc:
    status, text = exc.code, exc.read().decode()
except OSError as exc:
    status, text = 0, str(exc)
print(json.dumps({"status": status, "body": text, "seconds": time.monotonic() - t0}))
"""


class Deployment:
    """The three roles started with the launch scripts, one per namespace."""

    def __init__(self, nets: Namespaces, logs: Path) -> None:
        self.nets, self.logs = nets, logs
        self.procs: dict[str, subprocess.Popen] = {}
        router = nets.addr("router")
        self.url = f"http://{router}:{HTTP_PORT}"
        self.control = f"tcp://{router}:{CONTROL_PORT}"

    def start(self) -> None:
        n = self.nets
        self.procs["router"] = _spawn(n.ns["router"], "launch_router.sh", {
            "DISAGG_HOST": "0.0.0.0", "DISAGG_PORT": str(HTTP_PORT),
            "DISAGG_CONTROL_ADDRESS": f"tcp://0.0.0.0:{CONTROL_PORT}", "DISAGG_POLICY": "remote",
        }, self.logs / "router.log")
        common = {"DISAGG_ROUTER": self.control, "DISAGG_KV_TRANSPORT": "zmq",
                  "DISAGG_KV_CACHE_MEMORY": "64MiB"}
        self.procs["decode"] = _spawn(n.ns["decode"], "launch_decode.sh", dict(
            common, DISAGG_NODE_ID="decode-ns", DISAGG_KV_ADDRESS=f"tcp://{n.addr('decode')}:*"),
            self.logs / "decode.log")
        self.procs["prefill"] = _spawn(n.ns["prefill"], "launch_prefill.sh", dict(
            common, DISAGG_NODE_ID="prefill-ns", DISAGG_KV_ADDRESS=f"tcp://{n.addr('prefill')}:*"),
            self.logs / "prefill.log")
        deadline = time.monotonic() + 240
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}: "
                                       f"{(self.logs / f'{name}.log').read_text()[-3000:]}")
            h = self.get("/health")
            if h["status"] == 200 and json.loads(h["body"]).get("prefill_nodes") == 1:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready: {h}")
            time.sleep(0.5)

    def _client(self, path: str, body: str) -> dict:
        out = subprocess.run(["ip", "netns", "exec", self.nets.ns["router"], sys.executable, "-c",
                              CLIENT, self.url + path, body],
                             capture_output=True, text=True, timeout=180, check=True)
        return json.loads(out.stdout)

    def get(self, path: str) -> dict:
        return self._client(path, "GET")

    def complete(self, prompt: list[int], max_tokens: int) -> tuple[list[str], str, float]:
        """A greedy completion from inside the router's namespace: tokens, text, seconds."""
        r = self._client("/v1/completions", json.dumps({
            "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "logprobs": 0}))
        assert r["status"] == 200, r
        choice = json.loads(r["body"])["choices"][0]
        return choice["logprobs"]["tokens"], choice["text"], r["seconds"]

    def counter(self, name: str, **labels) -> float:
        from prometheus_client.parser import text_string_to_metric_families
        text = self.get("/metrics")["body"]
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    why = _netns_unavailable()
    if why:
        pytest.skip(why)
    nets = Namespaces()
    dep = Deployment(nets, tmp_path_factory.mktemp("netns-logs"))
    try:
        nets.create()
        dep.start()
        yield dep
    finally:
        dep.stop()
        nets.destroy()


def test_remote_prefill_across_namespaces_is_exact(deployment, smollm2_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    before = deployment.counter("disagg_requests_total", route="remote", status="ok")
    for prompt in random_prompts(2, 49152, 60, 120, seed=31):
        tokens, text, _ = deployment.complete(prompt, 10)
        assert (tokens, text) == reference(smollm2_dir, tok, prompt, 10)
    assert deployment.counter("disagg_requests_total", route="remote", status="ok") == before + 2
    assert deployment.counter("disagg_kv_transfer_bytes_total") > 0


def test_cut_kv_path_falls_back_within_3_s_and_recovers(deployment, smollm2_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = random_prompts(4, 49152, 60, 120, seed=32)
    # the uncut latency of this size of request (best of two: the machine is shared)
    uncut = min(deployment.complete(p, 10)[2] for p in prompts[:2])
    fallbacks = deployment.counter("disagg_fallbacks_total")
    deployment.nets.cut("prefill", "decode")
    try:
        for prompt in prompts:
            tokens, text, seconds = deployment.complete(prompt, 10)
            assert (tokens, text) == reference(smollm2_dir, tok, prompt, 10)
            assert seconds <= uncut + CUT_MARGIN_S, (
                f"a request over the cut path took {seconds:.2f} s, uncut {uncut:.2f} s")
            print(f"cut path: {seconds:.2f} s (uncut {uncut:.2f} s)")
    finally:
        deployment.nets.cut("prefill", "decode", on=False)
    assert deployment.counter("disagg_fallbacks_total") >= fallbacks + len(prompts)
    # the path back: remote prefill is used again (the sender reconnects)
    remote = deployment.counter("disagg_requests_total", route="remote", status="ok")
    deadline = time.monotonic() + 30
    prompt = random_prompts(1, 49152, 60, 61, seed=33)[0]
    while deployment.counter("disagg_requests_total", route="remote", status="ok") == remote:
        tokens, text, _ = deployment.complete(prompt, 6)
        assert (tokens, text) == reference(smollm2_dir, tok, prompt, 6)
        assert time.monotonic() < deadline, "remote prefill not used again after the path came back"
