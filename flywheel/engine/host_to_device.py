"""A step's host tensors to the GPU in one copy, through pinned memory.

A copy from pageable host memory may wait for the work already queued on the stream, which would
keep the host from preparing a step while the previous one runs. The tensors are packed into one
pinned buffer and sent with a single asynchronous copy; PyTorch's pinned-memory cache hands the
buffer out again only after that copy has completed.
"""

from __future__ import annotations

import torch

# Every tensor starts at a multiple of this many bytes, so that its slice can be viewed as its dtype.
_ALIGNMENT = 16


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGNMENT) * _ALIGNMENT


def to_device(tensors: list[torch.Tensor | None], device: torch.device) -> list[torch.Tensor | None]:
    """``tensors`` on ``device``: the host ones copied together, the others (and None) as they are."""
    if device.type != "cuda":
        return [None if t is None else t.to(device) for t in tensors]
    offsets, total = [], 0
    for tensor in tensors:
        offsets.append(total)
        if tensor is not None and tensor.device.type == "cpu":
            total += _aligned(tensor.nbytes)
    if total == 0:
        return tensors
    staged = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    for tensor, offset in zip(tensors, offsets):
        if tensor is not None and tensor.device.type == "cpu":
            _bytes(staged, offset, tensor).copy_(tensor.contiguous().view(-1).view(torch.uint8))
    on_device = staged.to(device, non_blocking=True)
    return [
        tensor if tensor is None or tensor.device.type != "cpu"
        else _bytes(on_device, offset, tensor).view(tensor.dtype).view(tensor.shape)
        for tensor, offset in zip(tensors, offsets)
    ]


def _bytes(buffer: torch.Tensor, offset: int, tensor: torch.Tensor) -> torch.Tensor:
    return buffer[offset : offset + tensor.nbytes]
