"""Padding token lists into tensors, and cutting a generation batch into micro-batches."""

from __future__ import annotations

from array import array
from itertools import chain
from typing import Any

import torch

# Rows into one C array, then one tensor over its buffer: a fraction of the time of torch.tensor(list).
_ARRAY_TYPECODES = {torch.long: "q", torch.float32: "f", torch.float64: "d"}


def left_pad(sequences: list[list[int]], pad_value: float, device: torch.device | str,
             dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded values [B, L] and mask (1 on real entries)."""
    return _pad(sequences, pad_value, device, dtype, left=True)


def right_pad(sequences: list[list[float]], pad_value: float, device: torch.device | str,
              dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded values [B, L] and mask (1 on real entries)."""
    return _pad(sequences, pad_value, device, dtype, left=False)


def _pad(sequences: list[list[float]], pad_value: float, device: torch.device | str, dtype: torch.dtype,
         left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    width = int(lengths.max()) if len(sequences) else 0
    columns = torch.arange(width)
    mask = columns >= width - lengths[:, None] if left else columns < lengths[:, None]
    code = _ARRAY_TYPECODES.get(dtype)
    if code is None or not width:
        values = torch.full((len(sequences), width), pad_value, dtype=dtype)
        values[mask] = torch.tensor(list(chain.from_iterable(sequences)), dtype=dtype)
        return values.to(device), mask.long().to(device)
    # Row by row into one C array, padding included. A row given as a C array of this type is copied
    # as bytes; a list is converted once even when the next rows are the same list (a group's prompt).
    filler = array(code, [pad_value])
    flat = array(code)
    previous = converted = None
    for row in sequences:
        if row is not previous:
            same_type = isinstance(row, array) and row.typecode == code
            previous, converted = row, row if same_type else array(code, row)
        padding = filler * (width - len(row))
        if left:
            flat.extend(padding)
        flat.extend(converted)
        if not left:
            flat.extend(padding)
    values = torch.frombuffer(flat, dtype=dtype).view(len(sequences), width)
    return values.to(device), mask.long().to(device)


def split_batch(batch: dict[str, Any], num_chunks: int) -> list[dict[str, Any]]:
    """Cut every tensor of `batch` along dim 0 into `num_chunks` equal micro-batches; other values are shared.

    Padding columns that no row of a micro-batch uses are dropped (prompt padding is on the left,
    completion padding on the right).
    """
    size = len(batch["prompt_ids"])
    if size % num_chunks:
        raise ValueError(f"a batch of {size} rows does not split into {num_chunks} equal micro-batches")
    rows = size // num_chunks
    chunks = []
    for index in range(num_chunks):
        part = slice(index * rows, (index + 1) * rows)
        chunk = {k: v[part] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
        chunks.append(trim_padding(chunk))
    return chunks


def trim_padding(batch: dict[str, Any]) -> dict[str, Any]:
    """Drop all-padding prompt columns (left) and completion columns (right) of `batch`."""
    prompt_width = int(batch["prompt_mask"].sum(-1).max().item()) if batch["prompt_mask"].numel() else 0
    completion_width = int(batch["completion_mask"].sum(-1).max().item()) if batch["completion_mask"].numel() else 0
    trimmed = dict(batch)
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            continue
        if key.startswith("prompt_"):
            trimmed[key] = value[:, value.size(1) - prompt_width :]
        else:  # every other per-token tensor is aligned with the completions
            trimmed[key] = value[:, :completion_width]
    return trimmed
