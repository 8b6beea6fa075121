"""The router's idle keep-alive connections: held for ``--keep-alive-timeout-s``, then
closed by the server — a real router process and a raw client socket."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest

from router.launch import add_router_args
from router_helpers import REPO, router_ready, start_router

REQUEST = b"GET /health HTTP/1.1\r\nHost: router\r\n\r\n"


def _answered(sock: socket.socket) -> bool:
    """Send one keep-alive request on ``sock``; True once a status line comes back,
    False when the server had closed the connection."""
    try:
        sock.sendall(REQUEST)
        reply = sock.recv(65536)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return reply.startswith(b"HTTP/1.1 ")


def _idle_then_ask(url: str, idle_s: float) -> bool:
    """One request, ``idle_s`` of silence on the same connection, then another: answered?"""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        assert _answered(sock)
        time.sleep(idle_s)
        return _answered(sock)


@pytest.mark.parametrize("timeout_s, idle_s, kept", [("3", 1.5, True), ("0.5", 1.5, False)])
def test_an_idle_connection_lives_until_the_keep_alive_timeout(tmp_path, timeout_s, idle_s,
                                                               kept):
    router, ready = start_router(tmp_path, "r", 0, "--keep-alive-timeout-s", timeout_s)
    try:
        url = router_ready(router, ready, tmp_path / "r.log")["http"]
        assert _idle_then_ask(url, idle_s) is kept
    finally:
        router.kill()
        router.wait()


def test_the_default_outlasts_the_clients_idle_timeouts():
    p = argparse.ArgumentParser()
    add_router_args(p)
    assert p.parse_args([]).keep_alive_timeout_s == 75.0     # vLLM's client keeps 60 s


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_a_keep_alive_timeout_that_is_not_seconds_is_refused(value):
    out = subprocess.run([sys.executable, "-m", "router", "--port", "0",
                          "--keep-alive-timeout-s", value],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--keep-alive-timeout-s must be seconds > 0" in out.stderr, out.stderr
