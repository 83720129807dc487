"""The model runners of one engine: rank 0 in this process, ranks 1..N-1 in spawned processes.

Rank 0 sends every runner call to the other ranks through a pipe, then makes it itself; the
tensor collectives inside the forward pass keep the ranks in step.
"""

from __future__ import annotations

import logging
import socket
import traceback

import torch
import torch.multiprocessing as mp

from flywheel.engine.config import EngineConfig
from flywheel.engine.distributed import TensorParallelGroup
from flywheel.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_devices(config: EngineConfig) -> list[torch.device]:
    base = torch.device(config.device)
    if base.type != "cuda":
        return [base] * config.tensor_parallel_size
    first = base.index or 0
    if first + config.tensor_parallel_size > torch.cuda.device_count():
        raise ValueError(
            f"tensor_parallel_size {config.tensor_parallel_size} from {base} needs more GPUs than the "
            f"{torch.cuda.device_count()} visible"
        )
    return [torch.device("cuda", first + rank) for rank in range(config.tensor_parallel_size)]


def _worker_main(config: EngineConfig, rank: int, port: int, device: torch.device, conn) -> None:
    try:
        torch.set_num_threads(max(1, torch.get_num_threads() // config.tensor_parallel_size))
        tp = TensorParallelGroup.connect("127.0.0.1", port, rank, config.tensor_parallel_size, device)
        runner = ModelRunner(config, tp, device)
        conn.send(("ready", None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        kind, target, args = conn.recv()
        if kind == "stop":
            return
        try:
            result = target(runner, *args) if kind == "rpc" else getattr(runner, target)(*args)
            conn.send(("ok", result if kind == "rpc" else None))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class RankGroup:
    def __init__(self, config: EngineConfig) -> None:
        devices = rank_devices(config)
        self.connections = []
        self.processes = []
        if config.tensor_parallel_size == 1:
            self.runner = ModelRunner(config, TensorParallelGroup.single(), devices[0])
            return
        port = free_port()
        context = mp.get_context("spawn")
        for rank in range(1, config.tensor_parallel_size):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_worker_main, args=(config, rank, port, devices[rank], child_end), daemon=True
            )
            process.start()
            self.connections.append(parent_end)
            self.processes.append(process)
        tp = TensorParallelGroup.connect("127.0.0.1", port, 0, config.tensor_parallel_size, devices[0])
        self.runner = ModelRunner(config, tp, devices[0])
        self._replies()

    def _send(self, message) -> None:
        for conn in self.connections:
            conn.send(message)

    def _replies(self) -> list:
        results = []
        for rank, conn in enumerate(self.connections, start=1):
            if not conn.poll(600):
                raise RuntimeError(f"tensor-parallel rank {rank} did not answer within 600 s")
            status, value = conn.recv()
            if status == "error":
                raise RuntimeError(f"tensor-parallel rank {rank} failed:\n{value}")
            results.append(value)
        return results

    def call(self, method: str, *args):
        """Call a ModelRunner method on every rank; rank 0's result."""
        self._send(("call", method, args))
        result = getattr(self.runner, method)(*args)
        self._replies()
        return result

    def execute(self, inputs):
        return self.call("execute", inputs)

    def load_weights(self, weights) -> None:
        if self.connections:
            weights = [(name, tensor.detach().cpu()) for name, tensor in weights]
        self.call("load_weights", weights)

    def collective_rpc(self, fn, *args) -> list:
        self._send(("rpc", fn, args))
        first = fn(self.runner, *args)
        return [first, *self._replies()]

    def shutdown(self) -> None:
        self._send(("stop", None, ()))
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
        self.connections, self.processes = [], []
