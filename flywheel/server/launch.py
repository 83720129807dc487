"""Start `flywheel serve` as a child process on a free port (tests, benchmarks, notebooks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx


def free_port() -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A running `flywheel serve` child; `stop()` sends SIGTERM and waits for a clean exit."""

    def __init__(self, model: str, port: int | None = None, log_path: str | Path | None = None,
                 env: dict[str, str] | None = None, **options: Any) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "flywheel", "serve", "--model", str(model), "--port", str(self.port)]
        for name, value in options.items():
            argv += [f"--{name}", str(value)]
        self.log_path = Path(log_path) if log_path else None
        self._log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        environment = {**os.environ, **(env or {})}
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=environment)
        api_key = options.get("api_key") or environment.get("FLYWHEEL_API_KEY")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def wait_ready(self, timeout_s: float = 180.0) -> ServerProcess:
        """Wait for /health to answer 200; raise with the end of the log if the server died or stalled."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", headers=self.headers, timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"the server was not healthy within {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log; pass log_path)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after `timeout_s`; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.process.returncode


# `env=` for a server that must stay on the CPU on a machine with GPUs.
CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": ""}


@contextmanager
def launch_server(model: str, timeout_s: float = 180.0, **kwargs: Any) -> Iterator[ServerProcess]:
    """`with launch_server(path, tensor_parallel_size=2) as server: GenerationClient(base_url=server.base_url)`."""
    server = ServerProcess(model, **kwargs)
    try:
        yield server.wait_ready(timeout_s)
    finally:
        server.stop()
