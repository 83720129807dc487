"""The pool of data-parallel engine processes, seen from the HTTP process: start them, spread each
request's prompts over them (least loaded first), gather results in order or stream their progress,
run commands on all.

Each of the `data_parallel_size` processes (engine_worker.py) owns one engine, which itself drives
its `tensor_parallel_size` ranks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from typing import Any, AsyncIterator

from flywheel.server.engine_worker import IDLE_POLL_S, worker_main
from flywheel.server.options import ServerOptions

logger = logging.getLogger(__name__)


class WorkerDied(RuntimeError):
    """An engine process exited; the server cannot serve until it is restarted."""


class EngineRejected(ValueError):
    """The engine refused a request (for instance a prompt longer than the model allows)."""


class EngineFailed(RuntimeError):
    """The engine failed while running a request (its step raised); the server itself still serves."""


class WorkerPool:
    """Starts the worker processes and routes requests and commands to them from asyncio code."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.context = mp.get_context("spawn")
        self.outbox = self.context.Queue()
        self.inboxes = [self.context.Queue() for _ in range(options.data_parallel_size)]
        self.processes: list[mp.Process] = []
        self.param_shapes: dict[str, tuple[int, ...]] = {}
        self.max_model_len: int | None = None
        self.dead_reason: str | None = None
        self.on_gpu = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[int, asyncio.Future | asyncio.Queue]] = {}  # request id -> (worker, sink)
        self._calls: dict[int, tuple[int, asyncio.Future]] = {}
        self._load = [0] * options.data_parallel_size
        self._reader: threading.Thread | None = None
        self._stopping = False

    # -- lifecycle

    def start(self) -> None:
        """Spawn the workers and wait until every engine has loaded (or raise why not)."""
        slices = self._device_slices()
        self.on_gpu = slices[0] is not None
        for dp_rank, devices in enumerate(slices):
            process = self.context.Process(
                target=worker_main, name=f"flywheel-dp{dp_rank}", daemon=False,
                args=(dp_rank, self.options, devices, self.inboxes[dp_rank], self.outbox),
            )
            process.start()
            self.processes.append(process)
        waiting = set(range(len(self.processes)))
        deadline = time.monotonic() + self.options.startup_timeout
        while waiting:
            try:
                message = self.outbox.get(timeout=1.0)
            except queue.Empty:
                dead = [i for i in waiting if not self.processes[i].is_alive()]
                if dead:
                    self.shutdown()
                    raise RuntimeError(f"engine worker dp{dead[0]} exited while loading; see its log above")
                if time.monotonic() > deadline:
                    self.shutdown()
                    raise TimeoutError(f"the engines did not load within {self.options.startup_timeout:.0f}s")
                continue
            if message[0] == "fatal":
                self.shutdown()
                raise RuntimeError(f"engine worker dp{message[1]}: {message[2]}")
            if message[0] == "ready":
                waiting.discard(message[1])
                info = message[2]
                self.max_model_len = info.get("max_model_len") or self.max_model_len
                self.param_shapes = info.get("param_shapes") or self.param_shapes
        self._reader = threading.Thread(target=self._read_outbox, name="flywheel-outbox", daemon=True)
        self._reader.start()
        threading.Thread(target=self._watch_processes, name="flywheel-watchdog", daemon=True).start()

    def _device_slices(self) -> list[str | None]:
        tp, dp = self.options.tensor_parallel_size, self.options.data_parallel_size
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            devices = [d.strip() for d in visible.split(",") if d.strip()]
        else:
            import torch

            devices = [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        if not devices:
            return [None] * dp
        if len(devices) < tp * dp:
            raise ValueError(f"tensor_parallel_size x data_parallel_size = {tp * dp} GPUs are needed, but only "
                             f"{len(devices)} are visible (CUDA_VISIBLE_DEVICES={visible!r})")
        return [",".join(devices[i * tp:(i + 1) * tp]) for i in range(dp)]

    def shutdown(self, timeout_s: float = 15.0) -> None:
        """Ask every worker to exit, then terminate any that do not within `timeout_s`."""
        self._stopping = True
        for inbox, process in zip(self.inboxes, self.processes):
            if process.is_alive():
                inbox.put(("shutdown",))
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                logger.warning("worker %s did not exit; terminating it", process.name)
                process.terminate()
                process.join(5)
        self._fail_all(WorkerDied("the server is shutting down"))

    @property
    def healthy(self) -> bool:
        self._check_processes()
        return self.dead_reason is None and not self._stopping

    # -- generation

    async def generate(self, prompts: list[list[int]], params: dict[str, Any]) -> list[dict[str, Any]]:
        """Run every prompt (spread over the workers, least loaded first) and return outputs in order."""
        loop = self._bind_loop()
        futures = [loop.create_future() for _ in prompts]
        request_ids = self._submit(prompts, params, futures, stream=False)
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            # gather() has cancelled the futures by now: abort every request that has no result.
            self.abort([rid for rid, future in zip(request_ids, futures) if future.cancelled() or not future.done()])
            raise
        finally:
            self._release(request_ids, params)

    async def stream(self, prompts: list[list[int]], params: dict[str, Any]) -> AsyncIterator[tuple[int, dict]]:
        """Run every prompt and yield `(prompt index, progress)` as the engines step: a progress lists
        the completions that moved on, each with its new token ids, logprobs and text, and its finish
        reason once it has one; `progress["finished"]` ends that prompt. Closing early aborts the rest."""
        self._bind_loop()
        progress: asyncio.Queue = asyncio.Queue()
        request_ids = self._submit(prompts, params, [progress] * len(prompts), stream=True)
        index_of = {request_id: index for index, request_id in enumerate(request_ids)}
        running = set(request_ids)
        try:
            while running:
                item = await progress.get()
                if isinstance(item, BaseException):
                    raise item
                if item["finished"]:
                    running.discard(item["request_id"])
                yield index_of[item["request_id"]], item
        finally:
            self.abort(list(running))
            self._release(request_ids, params)

    def _submit(self, prompts: list[list[int]], params: dict[str, Any], sinks: list, stream: bool) -> list[str]:
        """Send each prompt to the least loaded worker; its results go to its sink (a future, or a
        queue that gets every progress). Returns the request ids."""
        self._check_processes()
        base = f"r{next(self._ids)}"
        weight = params.get("n", 1)
        batches: dict[int, list] = {}
        request_ids = []
        with self._lock:
            self._check_alive()
            for index, (prompt_ids, sink) in enumerate(zip(prompts, sinks)):
                worker = min(range(len(self._load)), key=self._load.__getitem__)
                self._load[worker] += weight
                request_id = f"{base}-{index}"
                self._pending[request_id] = (worker, sink)
                request_ids.append(request_id)
                batches.setdefault(worker, []).append((request_id, prompt_ids, params, stream))
        for worker, batch in batches.items():
            self.inboxes[worker].put(("add", batch))
        return request_ids

    def abort(self, request_ids: list[str]) -> None:
        """Stop generating for these requests (a client went away or timed out)."""
        by_worker: dict[int, list[str]] = {}
        with self._lock:
            for request_id in request_ids:
                if request_id in self._pending:
                    by_worker.setdefault(self._pending[request_id][0], []).append(request_id)
        for worker, ids in by_worker.items():
            self.inboxes[worker].put(("abort", ids))

    def _release(self, request_ids: list[str], params: dict[str, Any]) -> None:
        with self._lock:
            for request_id in request_ids:
                entry = self._pending.pop(request_id, None)
                if entry is not None:
                    self._load[entry[0]] = max(0, self._load[entry[0]] - params.get("n", 1))

    # -- commands

    async def call_all(self, name: str, *args: Any) -> list[Any]:
        """Run a command on every worker and wait for all of them; raises the first failure."""
        return list(await asyncio.gather(*self.start_call_all(name, *args)))

    def start_call_all(self, name: str, *args: Any) -> list[asyncio.Future]:
        """Send a command to every worker; returns one future per worker."""
        self._check_processes()
        loop = self._bind_loop()
        futures = []
        with self._lock:
            self._check_alive()
            for worker, inbox in enumerate(self.inboxes):
                call_id = next(self._ids)
                future = loop.create_future()
                self._calls[call_id] = (worker, future)
                futures.append(future)
                inbox.put(("call", call_id, name, args))
        return futures

    # -- plumbing

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        self.loop = asyncio.get_running_loop()
        return self.loop

    def _check_alive(self) -> None:
        # Called under self._lock, where _mark_dead sets dead_reason before it fails the pending
        # work: what is added here is either refused or failed with the rest, never left waiting.
        if self.dead_reason is not None:
            raise WorkerDied(self.dead_reason)
        if self._stopping:
            raise WorkerDied("the server is shutting down")

    def _read_outbox(self) -> None:
        while not self._stopping:
            try:
                message = self.outbox.get(timeout=IDLE_POLL_S)
            except (queue.Empty, EOFError, OSError):
                continue
            kind = message[0]
            if kind == "outputs":
                for output in message[2]:
                    self._resolve(self._pending.get(output["request_id"]), output)
            elif kind == "rejected":
                self._resolve(self._pending.get(message[2]), EngineRejected(message[3]))
            elif kind == "failed":
                self._resolve(self._pending.get(message[2]), EngineFailed(message[3]))
            elif kind == "reply":
                _, _, call_id, ok, payload = message
                with self._lock:
                    entry = self._calls.pop(call_id, None)
                self._resolve(entry, payload if ok else RuntimeError(payload))
            elif kind == "fatal":
                self._mark_dead(f"engine worker dp{message[1]} failed: {message[2]}")

    def _watch_processes(self) -> None:
        # Its own thread: under load the outbox is never idle, and a worker killed while writing to it
        # can leave the reader blocked on a half-written message; either way its requests must fail.
        while not self._stopping and self.dead_reason is None:
            self._check_processes()
            time.sleep(IDLE_POLL_S)

    def _check_processes(self) -> None:
        for process in self.processes:
            if not process.is_alive() and not self._stopping:
                self._mark_dead(f"engine worker {process.name} exited (code {process.exitcode}); restart the server")
                return

    def _mark_dead(self, reason: str) -> None:
        with self._lock:
            first = self.dead_reason is None
            if first:
                self.dead_reason = reason
        if first:
            logger.error(reason)
            self._fail_all(WorkerDied(reason))

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            entries = list(self._pending.values()) + list(self._calls.values())
            self._calls.clear()
        for entry in entries:
            self._resolve(entry, error)

    def _resolve(self, entry: tuple[int, asyncio.Future | asyncio.Queue] | None, value: Any) -> None:
        if entry is None or self.loop is None:
            return
        sink = entry[1]

        def settle() -> None:
            if isinstance(sink, asyncio.Queue):
                sink.put_nowait(value)
            elif sink.done():
                return
            elif isinstance(value, BaseException):
                sink.set_exception(value)
            else:
                sink.set_result(value)

        self.loop.call_soon_threadsafe(settle)
