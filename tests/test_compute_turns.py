"""Engines sharing cores take turns at compute: real processes on one turn lock
never overlap, alternate when both want the next turn, a dead holder never
blocks the others and a stopped one only for the wait bound; an engine given a
turn lock waits for its turn to step and generates the same tokens."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import hf_greedy, random_prompts
from disagg.config import EngineConfig
from disagg.engine import LLMEngine
from disagg.engine.compute_turns import ComputeTurns, turn_holders
from disagg.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]

# A process that takes `n` turns of `hold_s` each on the lock at `path`: it says
# "ready" once it has the lock open, starts on a line on stdin, and prints one
# JSON line per turn: [start, end] (time.time, comparable across processes).
WORKER = """
import json, sys, time
from disagg.engine.compute_turns import ComputeTurns
path, n, hold_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
turns = ComputeTurns(path)
print("ready", flush=True)
sys.stdin.readline()
for _ in range(n):
    with turns:
        start = time.time()
        time.sleep(hold_s)
        end = time.time()
    print(json.dumps([start, end]), flush=True)
"""


def _workers(path: str, count: int, n: int, hold_s: float) -> list[list[list[float]]]:
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, path, str(n), str(hold_s)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=ROOT) for _ in range(count)]
    for p in procs:                    # every process has imported and opened the lock
        assert p.stdout.readline().strip() == "ready"
    for p in procs:                    # then all start asking at once
        p.stdin.write("go\n")
        p.stdin.flush()
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        out.append([json.loads(line) for line in stdout.splitlines()])
    return out


def test_turns_never_overlap_and_busy_processes_alternate(tmp_path):
    runs = _workers(str(tmp_path / "turns"), 2, 12, 0.02)
    turns = sorted((start, end, who) for who, run in enumerate(runs) for start, end in run)
    assert len(turns) == 24
    for (_, end, _), (start, _, _) in zip(turns, turns[1:]):
        assert start >= end, "two processes held the turn at once"
    owners = [who for _, _, who in turns]
    # both ask again at once after every turn: a holder never takes the next turn
    # while the other waits, so the two alternate (the first turns may race the
    # second process's start, hence the slack of one repeat)
    repeats = sum(1 for a, b in zip(owners, owners[1:]) if a == b)
    assert repeats <= 2, owners


def test_a_killed_holder_does_not_block_the_others(tmp_path):
    path = str(tmp_path / "turns")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from disagg.engine.compute_turns import ComputeTurns\n"
         "t = ComputeTurns(sys.argv[1]); t.__enter__(); print('held', flush=True); time.sleep(600)",
         path], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        turns = ComputeTurns(path)
        got = threading.Event()

        def take():
            with turns:
                got.set()

        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        assert not got.wait(0.5), "took the turn while another process held it"
        holder.send_signal(signal.SIGKILL)
        assert got.wait(10), "a dead process's turn was never freed"
        taker.join(10)                 # it has ended its turn: the files may close
        turns.close()
    finally:
        holder.kill()
        holder.wait()


def _turn_is_free(path: str) -> bool:
    fd = os.open(path + ".turn", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)                     # (drops the lock if this took it)
    return True


def test_a_stopped_holder_is_passed_over_after_the_bound_then_turns_resume(tmp_path, caplog):
    path = str(tmp_path / "turns")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\n"
         "from disagg.engine.compute_turns import ComputeTurns\n"
         "t = ComputeTurns(sys.argv[1]); t.__enter__(); print('held', flush=True)\n"
         "sys.stdin.readline(); t.__exit__(None, None, None); print('let go', flush=True)\n"
         "sys.stdin.readline()", path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    turns = ComputeTurns(path, max_wait_s=1.0)
    caplog.set_level(logging.WARNING, logger="disagg.engine")
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGSTOP)          # alive, holding the turn, going nowhere
        t0 = time.monotonic()
        with turns:                                 # waits the bound, then goes without
            assert holder.pid in turn_holders(path)
        assert 1.0 <= time.monotonic() - t0 < 6 and turns.skipped == 1
        t0 = time.monotonic()
        with turns:                                 # still stuck: no second wait
            pass
        assert time.monotonic() - t0 < 0.5 and turns.skipped == 2
        assert "not granted in 1 s" in caplog.text

        holder.send_signal(signal.SIGCONT)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "let go"
        deadline = time.monotonic() + 10            # the waiter thread takes the freed turn
        while True:                                 # and hands it back: turns resume
            skipped = turns.skipped
            with turns:
                if turns.skipped == skipped:
                    assert os.getpid() in turn_holders(path) and not _turn_is_free(path)
                    break
            assert time.monotonic() < deadline, "turns never resumed after the holder let go"
            time.sleep(0.02)
        assert _turn_is_free(path)                  # and the turn ends with the step
        assert "free again: taking turns again" in caplog.text
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.wait()
        turns.close()


def test_bad_paths_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ComputeTurns(str(tmp_path / "missing" / "turns"))
    with pytest.raises(ValueError, match="path prefix"):
        ComputeTurns("")
    with pytest.raises(ValueError, match="compute_turns"):
        EngineConfig(compute_turns="")
    for bad in (0, -1.0, float("inf"), float("nan"), True, "5"):
        with pytest.raises(ValueError, match="max_wait_s"):
            ComputeTurns(str(tmp_path / "turns"), max_wait_s=bad)
        with pytest.raises(ValueError, match="compute_turn_wait_s"):
            EngineConfig(compute_turn_wait_s=bad)


def test_an_engine_steps_only_in_its_turn_and_tokens_are_unchanged(tiny_llama, tmp_path):
    path = str(tmp_path / "turns")
    prompts = random_prompts(2, 256, 5, 20, seed=3)
    expected = [hf_greedy(tiny_llama, p, 6, ignore_eos=True) for p in prompts]
    other = ComputeTurns(path)          # the other engine on these cores
    with LLMEngine(EngineConfig(model=tiny_llama, num_kv_blocks=64, block_size=4,
                                compute_turns=path)) as engine:
        rids = [engine.add_request(p, SamplingParams(max_tokens=6, temperature=0.0,
                                                    ignore_eos=True)) for p in prompts]
        tokens: dict[str, list[int]] = {r: [] for r in rids}

        def collect(outputs) -> None:
            for out in outputs:
                tokens[out.request_id] += out.new_token_ids

        with other:
            done = threading.Event()
            threading.Thread(target=lambda: (collect(engine.step()), done.set()),
                             daemon=True).start()
            assert not done.wait(1.0), "the engine computed while the other held the turn"
        assert done.wait(30)
        assert engine.executor.compute_turns.waited_s >= 0.5
        while engine.has_unfinished():
            collect(engine.step())
    other.close()
    assert [tokens[r] for r in rids] == expected
