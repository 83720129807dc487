"""Stopping `flywheel serve` while its engines load: SIGTERM (what `launch_server` sends on a timeout)
and Ctrl+C stop the engine workers and exit with one line; a server killed outright leaves no worker
behind. (Stopping a server that is up is shown in test_server_parallel.py.)"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from flywheel.server.launch import ServerProcess


def descendants(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    direct = [int(p) for p in path.read_text().split()] if path.exists() else []
    return direct + [grandchild for child in direct for grandchild in descendants(child)]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited


def survivors(processes: list[int], within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while any(alive(pid) for pid in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in processes if alive(pid)]


def loading_workers(server_pid: int) -> list[int]:
    """The engine workers that have started loading: torch is the first thing they import."""
    workers = [pid for pid in descendants(server_pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return [pid for pid in workers if b"libtorch" in Path(f"/proc/{pid}/maps").read_bytes()]


@pytest.fixture
def loading_server(tiny_checkpoints, tmp_path):
    """A server whose engine worker has just started loading: it has seconds of loading ahead."""
    # A shell's background job ignores SIGINT, and so would the server; a Python handler here is reset
    # to the default in the child, where Python turns SIGINT into KeyboardInterrupt as in a terminal.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server = ServerProcess(tiny_checkpoints["qwen2"], log_path=tmp_path / "server.log", kv_cache_memory_gb=0.05)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 60
    while not loading_workers(server.process.pid):
        assert server.process.poll() is None and time.monotonic() < deadline, server.log_tail()
        time.sleep(0.05)
    processes = descendants(server.process.pid)
    yield server, processes
    server.stop(timeout_s=5)
    for pid in processes:  # what a failed test left running
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_the_engines_load_stops_the_workers_and_exits_with_one_line(loading_server, signum):
    server, processes = loading_server
    server.process.send_signal(signum)
    code = server.process.wait(60)  # the workers stop once they have loaded and read their inbox

    log = server.log_tail()
    assert code == 128 + signum, log  # exited by itself, having stopped its workers
    assert "ready; serving" not in log  # the signal came while the engines loaded
    assert "interrupted" in log and "Traceback" not in log, log
    assert survivors(processes, within_s=5) == []


def test_a_server_killed_while_the_engines_load_leaves_no_worker_behind(loading_server):
    server, processes = loading_server
    server.process.kill()
    server.process.wait()

    assert survivors(processes, within_s=10) == []
