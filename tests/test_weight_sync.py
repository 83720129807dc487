"""Weight-sync building blocks: bucket plans, flat packing, spec checks, and a real Gloo group
between an engine-side rank (the functions collective_rpc runs) and the client."""

from __future__ import annotations

import gc
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import torch.distributed as dist

from flywheel import weight_sync
from flywheel.server.launch import free_port
from flywheel.weight_sync import (
    ParamSpec,
    WeightSyncGroup,
    flatten_bucket,
    plan_buckets,
    send_buckets,
    unflatten_bucket,
    validate_specs,
)


def named_tensors() -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        ("a", torch.randn(3, 5, generator=generator)),
        ("b", torch.randn(7, generator=generator).to(torch.bfloat16)),
        ("c", torch.randn(2, 3, generator=generator).to(torch.float16)),
        ("d", torch.randn(40, 10, generator=generator)),
    ]


def specs_of(tensors) -> list[ParamSpec]:
    return [ParamSpec(name, weight_sync.dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors]


def test_buckets_keep_order_respect_the_size_and_give_big_tensors_their_own():
    buckets = plan_buckets(specs_of(named_tensors()), bucket_bytes=128)

    assert [s.name for b in buckets for s in b.specs] == ["a", "b", "c", "d"]
    assert [[s.name for s in b.specs] for b in buckets] == [["a", "b", "c"], ["d"]]
    assert all(offset % 16 == 0 for b in buckets for offset in b.offsets)
    assert buckets[1].nbytes == 40 * 10 * 4


def test_flatten_then_unflatten_gives_back_every_tensor_bit_for_bit():
    tensors = named_tensors()
    (bucket,) = plan_buckets(specs_of(tensors))

    buffer = torch.empty(bucket.nbytes + 100, dtype=torch.uint8)
    restored = unflatten_bucket(bucket, flatten_bucket(bucket, [t for _, t in tensors], buffer))

    for (name, original), (restored_name, copy) in zip(tensors, restored):
        assert restored_name == name and copy.dtype == original.dtype
        assert torch.equal(copy, original)


@pytest.mark.parametrize("spec,message", [
    (ParamSpec("model.nope", "float32", (4,)), "no parameter of that name"),
    (ParamSpec("v", "float32", (4, 3)), "does not match"),
    (ParamSpec("v", "int8", (3, 4)), "dtype must be one of"),
])
def test_specs_the_model_cannot_take_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        validate_specs([ParamSpec("w", "float32", (3, 4)), spec], {"w": (3, 4), "v": (3, 4)})


def test_a_name_twice_in_one_update_is_refused():
    with pytest.raises(ValueError, match="twice"):
        validate_specs([ParamSpec("w", "float32", (2,))] * 2, {"w": (2,)})


class RecordingModel(torch.nn.Module):
    """Stands in for the engine model: records what load_weights receives, or fails on demand."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.loaded: dict[str, torch.Tensor] = {}
        self.fail = fail

    def load_weights(self, weights) -> None:
        if self.fail:
            raise ValueError("cannot load")
        self.loaded.update({name: tensor.clone() for name, tensor in weights})


def joined_group(model: RecordingModel, port: int, client_port: int | None = None
                 ) -> tuple[SimpleNamespace, WeightSyncGroup]:
    """Engine rank 0 (a stand-in runner) and the client (rank 1) joined in one Gloo group at `port`; the
    client may reach the store through another port (a relay)."""
    runner = SimpleNamespace(tp_rank=0, device="cpu", model=model)
    weight_sync.rpc_start_join(runner, "127.0.0.1", port, 2, 0, "gloo", 30.0)
    client = WeightSyncGroup("127.0.0.1", client_port or port, 1, 2, "gloo", torch.device("cpu"), 30.0)
    weight_sync.rpc_finish_join(runner, 30.0)
    return runner, client


def run_update(model: RecordingModel, tensors, bucket_bytes: int) -> None:
    """One engine rank (rank 0) and the client (rank 1) in two threads of this process."""
    port = free_port()
    runner, client = joined_group(model, port)
    buckets = plan_buckets(specs_of(tensors), bucket_bytes)

    def engine_side() -> None:
        error = weight_sync.rpc_receive_and_load(runner, buckets)
        weight_sync.rpc_report(runner, error is not None)

    engine = threading.Thread(target=engine_side)
    engine.start()
    try:
        send_buckets(client, tensors, bucket_bytes)
    finally:
        engine.join(30)
        weight_sync.rpc_close(runner)
        client.close()


def test_tensors_broadcast_in_buckets_arrive_intact():
    tensors = named_tensors()
    model = RecordingModel()

    run_update(model, tensors, bucket_bytes=100)

    assert list(model.loaded) == [name for name, _ in tensors]
    for name, tensor in tensors:
        assert torch.equal(model.loaded[name], tensor)


def test_a_rank_that_fails_to_load_is_reported_to_the_client():
    with pytest.raises(RuntimeError, match="failed to load"):
        run_update(RecordingModel(fail=True), named_tensors(), bucket_bytes=100)


def test_the_engine_ranks_see_the_client_heartbeat_until_the_client_closes():
    port = free_port()
    runner, client = joined_group(RecordingModel(), port)
    try:
        client.start_heartbeat(interval_s=0.02)
        first = weight_sync.rpc_client_heartbeats(runner)
        time.sleep(0.3)
        beating = weight_sync.rpc_client_heartbeats(runner)
        client.close()
        after_close = weight_sync.rpc_client_heartbeats(runner)
        time.sleep(0.2)
        later = weight_sync.rpc_client_heartbeats(runner)
    finally:
        weight_sync.rpc_close(runner)

    assert beating > first
    assert later == after_close
    assert weight_sync.rpc_client_heartbeats(runner) is None


def test_the_heartbeat_stops_when_the_client_group_is_dropped_without_closing():
    port = free_port()
    runner, client = joined_group(RecordingModel(), port)
    try:
        client.start_heartbeat(interval_s=0.02)
        time.sleep(0.1)
        del client
        gc.collect()
        time.sleep(0.1)
        after_drop = weight_sync.rpc_client_heartbeats(runner)
        time.sleep(0.2)
        assert weight_sync.rpc_client_heartbeats(runner) == after_drop
    finally:
        weight_sync.rpc_close(runner)


class StoreRelay:
    """A TCP relay to a local port, whose `cut()` ends every connection relayed so far as a network failure would."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.clients: list[socket.socket] = []
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # the relay was closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.clients.append(client)
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_forward, args=(source, sink), daemon=True).start()

    def cut(self) -> None:
        for client in self.clients:
            client.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in self.sockets:
            _shut(sock)
            sock.close()


def _forward(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    _shut(sink)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already shut or never connected
        pass


def test_the_heartbeat_goes_on_over_a_new_connection_when_the_store_connection_is_cut():
    port = free_port()
    relay = StoreRelay(port)
    runner, client = joined_group(RecordingModel(), port, client_port=relay.port)
    try:
        client.start_heartbeat(interval_s=0.02)
        time.sleep(0.1)
        connections_before_cut = len(relay.clients)
        relay.cut()
        time.sleep(0.1)
        after_cut = weight_sync.rpc_client_heartbeats(runner)
        time.sleep(0.2)
        later = weight_sync.rpc_client_heartbeats(runner)
    finally:
        client.close()
        weight_sync.rpc_close(runner)
        relay.close()

    assert len(relay.clients) > connections_before_cut  # the heartbeat connected anew
    assert later > after_cut


def test_the_heartbeat_never_counts_for_the_group_that_took_its_place():
    port = free_port()
    runner, client = joined_group(RecordingModel(), port)
    client.start_heartbeat(interval_s=0.02)
    time.sleep(0.1)
    weight_sync.rpc_close(runner)  # the server closes the group while its client lives
    time.sleep(0.1)
    next_store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False)
    try:
        time.sleep(0.3)
        assert not next_store.check([weight_sync._HEARTBEAT_KEY])
    finally:
        client.close()


def test_joining_a_rendezvous_nobody_hosts_times_out_with_advice():
    with pytest.raises(RuntimeError, match="reach the rendezvous"):
        WeightSyncGroup("127.0.0.1", free_port(), 1, 2, "gloo", torch.device("cpu"), timeout_s=1.0)


def test_a_failed_join_frees_the_rendezvous_port_at_once():
    # Ranks 0 and 1 meet, the last rank never comes: both fail, and the host's port is free again.
    port = free_port()
    failures = []

    def join(rank: int) -> None:
        try:
            WeightSyncGroup("127.0.0.1", port, rank, 3, "gloo", torch.device("cpu"), timeout_s=1.0)
        except RuntimeError as error:
            failures.append(error)

    joiners = [threading.Thread(target=join, args=(rank,)) for rank in (0, 1)]
    for joiner in joiners:
        joiner.start()
    for joiner in joiners:
        joiner.join(30)
    assert len(failures) == 2
    with socket.socket() as listener:
        # SO_REUSEADDR, as a store hosting the port sets: the closed connections' TIME_WAIT do not count,
        # a store still listening does (EADDRINUSE).
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
