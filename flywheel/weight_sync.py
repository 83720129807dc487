"""The trainer ↔ server weight-sync group: rendezvous, bucketed flat broadcasts, engine-side receivers.

The group spans every tensor-parallel rank of every data-parallel engine of the server (ranks
`0 .. tp*dp-1`, rank `dp_rank*tp + tp_rank`) and the client (the last rank, `tp*dp`). Server rank 0
hosts the TCPStore; the process group (Gloo on CPU, NCCL on GPU) is built directly from that store,
so torch.distributed's default process group is never created or touched.

Tensors travel as raw bytes in a few flat `uint8` buckets: both sides compute the same bucket plan
from the list of `{name, dtype, shape}` the client announced over HTTP.

The client counts up a key of the rendezvous store every `HEARTBEAT_INTERVAL_S` while its group is
open, so that the server can tell a client that died without closing the group (its count stands
still for `CLIENT_SILENCE_S`) from a live one, and let the next client in.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist

from flywheel.engine.distributed import new_process_group

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_BUCKET_BYTES = 256 * 2**20
# Offsets inside a bucket are aligned so that every slice can be viewed as its dtype.
_ALIGN = 16
HEARTBEAT_INTERVAL_S = 0.5
# The server takes a client whose heartbeat count stood still this long to be gone.
CLIENT_SILENCE_S = 4 * HEARTBEAT_INTERVAL_S
_HEARTBEAT_KEY = "flywheel_client_heartbeats"


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a tensor dtype ("float32", "bfloat16", "float16")."""
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"weight sync sends floating-point tensors of {sorted(DTYPES)}, got {dtype}")


@dataclass(frozen=True)
class ParamSpec:
    """What the client announces for one tensor before broadcasting it."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Bucket:
    """Tensors packed back to back (aligned) in one flat byte buffer."""

    specs: tuple[ParamSpec, ...]
    offsets: tuple[int, ...]
    nbytes: int


def plan_buckets(specs: Iterable[ParamSpec], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[Bucket]:
    """Pack specs in order into buckets of at most `bucket_bytes` (a larger tensor gets its own)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[Bucket] = []
    current: list[ParamSpec] = []
    offsets: list[int] = []
    size = 0
    for spec in specs:
        start = -(-size // _ALIGN) * _ALIGN
        if current and start + spec.nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(current), tuple(offsets), size))
            current, offsets, start = [], [], 0
        current.append(spec)
        offsets.append(start)
        size = start + spec.nbytes
    if current:
        buckets.append(Bucket(tuple(current), tuple(offsets), size))
    return buckets


def flatten_bucket(bucket: Bucket, tensors: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Copy `tensors` (in the bucket's order) into the flat uint8 buffer `out`; returns its used part."""
    buffer = out[: bucket.nbytes]
    for spec, offset, tensor in zip(bucket.specs, bucket.offsets, tensors):
        raw = tensor.detach().contiguous().view(-1).view(torch.uint8)
        buffer[offset : offset + spec.nbytes].copy_(raw, non_blocking=True)
    return buffer


def unflatten_bucket(bucket: Bucket, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views of `buffer` as the bucket's named tensors (no copy)."""
    return [
        (spec.name, buffer[offset : offset + spec.nbytes].view(DTYPES[spec.dtype]).view(spec.shape))
        for spec, offset in zip(bucket.specs, bucket.offsets)
    ]


class WeightSyncGroup:
    """One rank's membership of the weight-sync process group (no default process group involved)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str, device: torch.device,
                 timeout_s: float) -> None:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        self.rank, self.world_size, self.backend, self.device = rank, world_size, backend, device
        self.client_rank = world_size - 1
        if backend == "nccl":
            torch.cuda.set_device(device)  # NCCL binds to the current device, which is per thread
        self._staging: tuple[torch.Tensor, torch.Tensor] | None = None
        self._heartbeat: tuple[threading.Thread, threading.Event] | None = None
        timeout = timedelta(seconds=timeout_s)
        where = f"{host}:{port}"
        try:
            self.store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout,
                                       wait_for_workers=False)
        except Exception as error:
            role = "host the rendezvous on" if rank == 0 else "reach the rendezvous at"
            raise RuntimeError(
                f"weight sync: rank {rank} could not {role} {where} within {timeout_s:.0f}s ({error}); "
                "check that the port is free on the server and reachable from the client"
            ) from error
        self.group = None
        failure = None
        try:
            self.group = new_process_group(self.store, rank, world_size, self._wire_device(), timeout_s)
            # A handshake, so that a missing rank shows up here rather than at the first update.
            count = torch.ones(1, device=self._wire_device())
            self.group.allreduce([count]).wait()
            if int(count.item()) != world_size:
                failure = f"weight sync: handshake counted {int(count.item())} ranks, expected {world_size}"
        except Exception as error:
            failure = (
                f"weight sync: rank {rank} of {world_size} did not meet every rank at {where} within "
                f"{timeout_s:.0f}s ({error}); world_size must be tensor_parallel_size x "
                "data_parallel_size + 1 and every rank must use the same backend (NCCL when the client "
                "is on a GPU, Gloo when it is on the CPU)"
            )
        if failure is not None:
            # Raised outside the handler, without the original error: its traceback would keep the
            # half-built group, and so the store listening on the port, alive until a garbage collection.
            self.close()
            raise RuntimeError(failure)

    def _wire_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def start_broadcast(self, buffer: torch.Tensor):
        """Begin filling `buffer` on every rank with the client's copy; returns the work to wait on."""
        return self.group.broadcast([buffer], _broadcast_options(self.client_rank))

    def broadcast_from_client(self, buffer: torch.Tensor) -> None:
        """Fill `buffer` on every rank with the client's copy."""
        self.start_broadcast(buffer).wait()

    def sum_flags(self, flag: int) -> int:
        """All-reduce one integer flag per rank; used to report failures to the client."""
        value = torch.tensor([float(flag)], device=self._wire_device())
        self.group.allreduce([value]).wait()
        return int(value.item())

    def receive_buffer(self, nbytes: int) -> torch.Tensor:
        """An empty byte buffer on the device this backend broadcasts on."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self._wire_device())

    def staging_buffers(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two byte buffers of at least `nbytes`, kept between updates (fresh memory is slow to touch)."""
        if self._staging is None or self._staging[0].numel() < nbytes:
            self._staging = (self.receive_buffer(nbytes), self.receive_buffer(nbytes))
        return self._staging

    def start_heartbeat(self, interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        """Count up the store's heartbeat key every `interval_s` from a daemon thread until `close()`, or
        until this object is dropped without it (its owner was dropped: the server may then let another in).

        A failed count is retried at the next interval over a fresh connection (a store client does not
        reconnect by itself). The beats end early only once the store at that address is another group's:
        the server closed this one, and this client's next update will fail."""
        owner, stopped = weakref.ref(self), threading.Event()
        address, timeout = (self.store.host, self.store.port), self.store.timeout
        # Marks this group's store, so that a fresh connection can tell it from a later group's at that address.
        group_key = f"flywheel_group_{uuid.uuid4().hex}"
        self.store.set(group_key, "")

        def beat(store: dist.TCPStore | None) -> None:
            failures = _HeartbeatFailures(interval_s)
            while not stopped.wait(interval_s) and owner() is not None:
                try:
                    if store is None:
                        store = _store_client(address, timeout, interval_s)
                        if not store.check([group_key]):
                            logger.warning("weight sync: the server closed this client's group and hosts another "
                                           "one; heartbeats stop, and updates fail until a new init_communicator")
                            return
                    store.add(_HEARTBEAT_KEY, 1)
                except Exception as error:
                    store = None
                    failures.record(error)
                else:
                    failures.clear()

        thread = threading.Thread(target=beat, args=(self.store,), name="weight-sync-heartbeat", daemon=True)
        thread.start()
        self._heartbeat = (thread, stopped)

    def heartbeats(self) -> int:
        """How many heartbeats the client has sent so far."""
        return self.store.add(_HEARTBEAT_KEY, 0)

    def close(self) -> None:
        if self._heartbeat is not None:
            thread, stopped = self._heartbeat
            stopped.set()
            thread.join(5)
            self._heartbeat = None
        group, self.group, self._staging = self.group, None, None
        if group is not None and hasattr(group, "shutdown"):
            try:
                group.shutdown()
            except Exception:  # a peer already gone; nothing left to release
                logger.debug("weight sync: group shutdown raised", exc_info=True)
        self.store = None


class _HeartbeatFailures:
    """A run of failed heartbeats, logged: its first failure at debug level, a warning once it outlasts what
    the server takes for a dead client, and its end after such a warning."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.since: float | None = None
        self.warned = False

    def record(self, error: Exception) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
            logger.debug("weight sync: a heartbeat failed; retrying every %.2fs", self.interval_s, exc_info=error)
        elif not self.warned and now - self.since > CLIENT_SILENCE_S:
            self.warned = True
            logger.warning("weight sync: heartbeats have failed for %.1fs (%s); the server takes a client silent "
                           "for %.0fs to be gone and may close its group; retrying every %.2fs",
                           now - self.since, error, CLIENT_SILENCE_S, self.interval_s)

    def clear(self) -> None:
        if self.warned:
            logger.info("weight sync: heartbeats resumed after %.1fs", time.monotonic() - self.since)
        self.since, self.warned = None, False


def _store_client(address: tuple[str, int], timeout: timedelta, connect_timeout_s: float) -> dist.TCPStore:
    """A fresh client connection to the store at `address`."""
    # A plain connection first: where nothing listens it fails at once and quietly, where the store's
    # client would retry for a second and log every attempt as an error.
    socket.create_connection(address, timeout=connect_timeout_s).close()
    return dist.TCPStore(*address, is_master=False, timeout=timeout, wait_for_workers=False)


def _broadcast_options(root: int) -> dist.BroadcastOptions:
    options = dist.BroadcastOptions()
    options.rootRank = root
    options.rootTensor = 0
    return options


def send_buckets(group: WeightSyncGroup, named_tensors: list[tuple[str, torch.Tensor]],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """The client's side of an update: broadcast the tensors bucket by bucket, then check the result.

    Two staging buffers alternate: bucket i+1 is packed while bucket i is on the wire.
    """
    by_name = dict(named_tensors)
    specs = [ParamSpec(name, dtype_name(t.dtype), tuple(t.shape)) for name, t in named_tensors]
    buckets = plan_buckets(specs, bucket_bytes)
    staging = group.staging_buffers(max(bucket.nbytes for bucket in buckets))
    in_flight = None
    for index, bucket in enumerate(buckets):
        buffer = flatten_bucket(bucket, [by_name[s.name] for s in bucket.specs], staging[index % 2])
        if in_flight is not None:
            in_flight.wait()
        in_flight = group.start_broadcast(buffer)
    in_flight.wait()
    failures = group.sum_flags(0)
    if failures:
        raise RuntimeError(
            f"weight sync: {failures} server rank(s) failed to load the update; the server log says why"
        )


# ---- engine side: module-level functions run on every tensor-parallel rank by collective_rpc ----

_state: dict[str, object] = {}


def rpc_start_join(model_runner, host: str, port: int, world_size: int, rank_offset: int, backend: str,
                   timeout_s: float) -> None:
    """Start joining the group in a thread (every rank must be joining at once), return at once."""
    if "group" in _state or "joining" in _state:
        raise RuntimeError("weight sync: a communicator is already open; close it first")
    rank = rank_offset + model_runner.tp_rank
    device = torch.device(model_runner.device)
    outcome: dict[str, object] = {}

    def join() -> None:
        try:
            outcome["group"] = WeightSyncGroup(host, port, rank, world_size, backend, device, timeout_s)
        except Exception as error:  # reported by rpc_finish_join
            outcome["error"] = error

    thread = threading.Thread(target=join, name="weight-sync-join", daemon=True)
    thread.start()
    _state["joining"] = (thread, outcome)


def rpc_finish_join(model_runner, timeout_s: float) -> None:
    """Wait for the join started by `rpc_start_join`; raise what went wrong."""
    thread, outcome = _state.pop("joining")
    thread.join(timeout_s + 5)
    if thread.is_alive():
        raise TimeoutError(f"weight sync: rank {model_runner.tp_rank} still joining after {timeout_s:.0f}s")
    if "error" in outcome:
        raise outcome["error"]
    _state["group"] = outcome["group"]


def rpc_receive_and_load(model_runner, buckets: list[Bucket]) -> str | None:
    """Receive every bucket and load it into this rank's shard; returns an error message or None.

    Two buffers alternate: bucket i+1 arrives while bucket i is being loaded.
    """
    group: WeightSyncGroup = _state.get("group")
    if group is None:
        return "no communicator is open on this rank"
    staging = group.staging_buffers(max(bucket.nbytes for bucket in buckets))
    error = None
    in_flight = group.start_broadcast(staging[0][: buckets[0].nbytes])
    for index, bucket in enumerate(buckets):
        in_flight.wait()
        if index + 1 < len(buckets):
            in_flight = group.start_broadcast(staging[(index + 1) % 2][: buckets[index + 1].nbytes])
        if error is not None:
            continue  # keep receiving so that the client's broadcasts complete
        try:
            received = unflatten_bucket(bucket, staging[index % 2])
            model_runner.model.load_weights([(name, t.to(model_runner.device)) for name, t in received])
        except Exception as failure:
            logger.exception("weight sync: loading a bucket failed")
            error = f"{type(failure).__name__}: {failure}"
    return error


def rpc_report(model_runner, failed: bool) -> int:
    """Tell the client (and every rank) how many ranks failed the update."""
    group: WeightSyncGroup = _state["group"]
    return group.sum_flags(1 if failed else 0)


def rpc_close(model_runner) -> None:
    """Leave the group (a no-op when none is open)."""
    group = _state.pop("group", None)
    if group is not None:
        group.close()


def rpc_client_heartbeats(model_runner) -> int | None:
    """How many heartbeats the open group's client has sent (None when no group is open)."""
    group: WeightSyncGroup | None = _state.get("group")
    return None if group is None else group.heartbeats()


def rpc_device_uuid(model_runner) -> str | None:
    """This rank's GPU UUID (None on the CPU), to refuse a client that shares a server GPU."""
    device = torch.device(model_runner.device)
    if device.type != "cuda":
        return None
    return str(torch.cuda.get_device_properties(device).uuid)


def validate_specs(specs: list[ParamSpec], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise ValueError naming the first announced tensor that the served model cannot take."""
    seen = set()
    for index, spec in enumerate(specs):
        where = f"params[{index}] ({spec.name!r})"
        if spec.name in seen:
            raise ValueError(f"{where}: the name appears twice in one update")
        seen.add(spec.name)
        if spec.name not in expected:
            close = [n for n in expected if n.rsplit(".", 1)[-1] == spec.name.rsplit(".", 1)[-1]][:3]
            raise ValueError(f"{where}: the served model has no parameter of that name"
                             + (f"; similar names: {close}" if close else ""))
        if spec.dtype not in DTYPES:
            raise ValueError(f"{where}: dtype must be one of {sorted(DTYPES)}, got {spec.dtype!r}")
        if tuple(spec.shape) != tuple(expected[spec.name]):
            raise ValueError(f"{where}: shape {list(spec.shape)} does not match the served model's "
                             f"{list(expected[spec.name])}")
