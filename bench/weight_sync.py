"""Weight-sync benchmark: a full parameter push to a running server against a raw broadcast of the
same bytes over the same kind of group, measured in one run.

CPU (Gloo):   python -m bench.weight_sync --shape tiny --device cpu
GPU (NCCL):   python -m bench.weight_sync --shape qwen2.5-1.5b --device cuda
              (server ranks on the first tp*dp GPUs, the client on the next one)

Prints a table last and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.shapes import SHAPES, write_checkpoint
from flywheel import GenerationClient
from flywheel.server.launch import free_port, launch_server
from flywheel.weight_sync import DEFAULT_BUCKET_BYTES, ParamSpec, WeightSyncGroup, dtype_name, plan_buckets


def receiver(rank: int, world_size: int, port: int, backend: str, device: str, bucket_sizes: list[int],
             repeats: int) -> None:
    """One stand-in server rank of the raw baseline: receive the buckets, nothing else."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    group = WeightSyncGroup("127.0.0.1", port, rank, world_size, backend, torch.device(device), 300.0)
    buffers = [group.receive_buffer(size) for size in bucket_sizes]
    for _ in range(repeats + 1):
        for buffer in buffers:
            group.broadcast_from_client(buffer)
        group.sum_flags(0)
    group.close()


def raw_broadcast_seconds(bucket_sizes: list[int], ranks: int, backend: str, server_devices: list[str],
                          client_device: torch.device, repeats: int) -> list[float]:
    """Broadcast buffers of the push's bucket sizes from the client to `ranks` receivers; one time per repeat."""
    port, world_size = free_port(), ranks + 1
    context = mp.get_context("spawn")
    processes = [context.Process(target=receiver, args=(rank, world_size, port, backend, server_devices[rank],
                                                        bucket_sizes, repeats)) for rank in range(ranks)]
    for process in processes:
        process.start()
    group = WeightSyncGroup("127.0.0.1", port, ranks, world_size, backend, client_device, 300.0)
    buffers = [torch.ones(size, dtype=torch.uint8, device=group._wire_device()) for size in bucket_sizes]
    times = []
    for repeat in range(repeats + 1):  # the first round warms the links up
        synchronize(client_device)
        start = time.perf_counter()
        for buffer in buffers:
            group.broadcast_from_client(buffer)
        group.sum_flags(0)
        synchronize(client_device)
        if repeat:
            times.append(time.perf_counter() - start)
    group.close()
    for process in processes:
        process.join(60)
    return times


def push_seconds(client: GenerationClient, model: torch.nn.Module, bucket_bytes: int, repeats: int,
                 device: torch.device) -> list[float]:
    times = []
    for repeat in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        client.update_model_params(model, bucket_bytes=bucket_bytes)
        synchronize(device)
        if repeat:
            times.append(time.perf_counter() - start)
    return times


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tp", type=int, default=1, help="server tensor_parallel_size")
    parser.add_argument("--dp", type=int, default=1, help="server data_parallel_size")
    parser.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_BYTES / 2**20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="weight_sync.json")
    args = parser.parse_args()

    ranks = args.tp * args.dp
    on_gpu = args.device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    backend = "nccl" if on_gpu else "gloo"
    # In this process (and the raw baseline's), cuda:i is the i-th visible GPU: the server's ranks
    # take the first tp*dp of them and the client the next one.
    client_device = torch.device(f"cuda:{ranks}") if on_gpu else torch.device("cpu")
    server_devices = [f"cuda:{i}" for i in range(ranks)] if on_gpu else ["cpu"] * ranks
    bucket_bytes = int(args.bucket_mb * 2**20)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / args.shape
        model = write_checkpoint(checkpoint, args.shape, dtype).to(client_device)
        named = list(model.named_parameters())
        specs = [ParamSpec(name, dtype_name(p.dtype), tuple(p.shape)) for name, p in named]
        bucket_sizes = [bucket.nbytes for bucket in plan_buckets(specs, bucket_bytes)]
        total_bytes = sum(p.numel() * p.element_size() for _, p in named)

        raw = raw_broadcast_seconds(bucket_sizes, ranks, backend, server_devices, client_device, args.repeats)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(torch.cuda.device_count())))
        env = {"CUDA_VISIBLE_DEVICES": ",".join(visible.split(",")[:ranks])} if on_gpu else {}
        server_options = dict(tensor_parallel_size=args.tp, data_parallel_size=args.dp, max_model_len=256)
        if not on_gpu:
            server_options["kv_cache_memory_gb"] = 0.05
        with launch_server(str(checkpoint), env=env, log_path=Path(tmp) / "server.log", timeout_s=900,
                           **server_options) as server:
            with GenerationClient(base_url=server.base_url, group_port=free_port()) as client:
                client.init_communicator(device=client_device)
                push = push_seconds(client, model, bucket_bytes, args.repeats, client_device)

    raw_s, push_s = statistics.median(raw), statistics.median(push)
    result = {
        "shape": args.shape, "device": args.device, "backend": backend, "tp": args.tp, "dp": args.dp,
        "dtype": str(dtype).removeprefix("torch."), "bytes": total_bytes, "buckets": len(bucket_sizes),
        "raw_broadcast_s": raw_s, "push_s": push_s, "push_over_raw": push_s / raw_s,
        "raw_GBps": total_bytes / raw_s / 1e9, "push_GBps": total_bytes / push_s / 1e9,
        "raw_all_s": raw, "push_all_s": push, "gpu": torch.cuda.get_device_name(0) if on_gpu else None,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'what':<28}{'seconds':>10}{'GB/s':>10}")
    print(f"{'raw broadcast (' + backend + ')':<28}{raw_s:>10.4f}{result['raw_GBps']:>10.2f}")
    print(f"{'full push (update_model_params)':<28}{push_s:>10.4f}{result['push_GBps']:>10.2f}")
    print(f"shape {args.shape}, {total_bytes / 2**20:.1f} MiB in {len(bucket_sizes)} bucket(s), tp={args.tp} "
          f"dp={args.dp}: push / raw = {result['push_over_raw']:.2f}x (median of {args.repeats})")


if __name__ == "__main__":
    main()
