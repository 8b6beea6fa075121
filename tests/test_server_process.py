"""A benchmark's server process group is stopped whole: a child that outlives the
server's main process (as vLLM's engine process can) is waited for, or killed."""

from __future__ import annotations

import sys
import textwrap
import time

import psutil
import pytest

from disagg.bench.server_process import Server, free_port, group_members

_CHILD = textwrap.dedent("""\
    import os, signal, sys, time
    def late(*_):
        time.sleep(1.5)
        sys.exit(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[2] == "ignore" else late)
    with open(sys.argv[1], "w") as f:
        f.write(str(os.getpid()))
    while True:
        time.sleep(1)
    """)

_LEADER = textwrap.dedent("""\
    import functools, http.server, subprocess, sys
    port, directory, child, on_term = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    subprocess.Popen([sys.executable, "-c", child, directory + "/child.pid", on_term])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    http.server.HTTPServer(("127.0.0.1", port), handler).serve_forever()
    """)


def _server(tmp_path, on_term: str) -> tuple[Server, int]:
    (tmp_path / "health").write_text("ok")
    port = free_port()
    server = Server("http", [sys.executable, "-c", _LEADER, str(port), str(tmp_path), _CHILD,
                             on_term], {}, port, tmp_path / "server.log")
    server.start(30)
    deadline = time.monotonic() + 10
    while not (tmp_path / "child.pid").exists() or not (tmp_path / "child.pid").read_text():
        if time.monotonic() > deadline:
            raise TimeoutError("the server's child never started")
        time.sleep(0.05)
    return server, int((tmp_path / "child.pid").read_text())


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("on_term", ["late", "ignore"])
def test_stop_returns_once_the_whole_group_is_gone(tmp_path, capsys, on_term):
    server, child = _server(tmp_path, on_term)
    pgid = server.proc.pid
    try:
        assert sorted(group_members(pgid)) == sorted([pgid, child])
        t0 = time.monotonic()
        server.stop(timeout_s=3.0)
        took = time.monotonic() - t0
    finally:
        for pid in (child, pgid):
            if _alive(pid):
                psutil.Process(pid).kill()
    assert not _alive(child) and group_members(pgid) == []
    if on_term == "late":        # the child outlived its parent by 1.5 s: waited for
        assert 1.4 <= took < 3.0
    else:                        # it ignored SIGTERM: killed after the bound
        assert 3.0 <= took < 10.0
        assert "still running 3 s after SIGTERM: SIGKILL" in capsys.readouterr().err
    server.stop()                # idempotent
