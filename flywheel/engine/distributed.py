"""The tensor-parallel group: rank, size, all-reduce and all-gather.

The group is built from a TCPStore directly (Gloo on CPU, NCCL on GPU) and never touches
torch.distributed's default process group, so an engine can live inside a trainer that has one.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


class TensorParallelGroup:
    def __init__(self, rank: int, size: int, process_group=None) -> None:
        self.rank = rank
        self.size = size
        self.process_group = process_group

    @classmethod
    def single(cls) -> TensorParallelGroup:
        return cls(0, 1)

    @classmethod
    def connect(
        cls, host: str, port: int, rank: int, size: int, device: torch.device, timeout_s: float = 300.0
    ) -> TensorParallelGroup:
        store = dist.TCPStore(host, port, size, is_master=rank == 0, timeout=timedelta(seconds=timeout_s))
        return cls(rank, size, new_process_group(store, rank, size, device, timeout_s))

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            self.process_group.allreduce([tensor]).wait()
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return tensor
        pieces = [torch.empty_like(tensor) for _ in range(self.size)]
        self.process_group.allgather([pieces], [tensor.contiguous()]).wait()
        return torch.cat(pieces, dim=-1)


def new_process_group(store, rank: int, size: int, device: torch.device, timeout_s: float):
    """A process group over ``store`` (NCCL for CUDA tensors, Gloo otherwise), outside the default group."""
    prefix = dist.PrefixStore("flywheel", store)
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefix, rank, size, options)
    return dist.ProcessGroupGloo(prefix, rank, size, timeout)
