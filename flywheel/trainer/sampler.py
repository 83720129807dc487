"""RepeatSampler: each prompt index repeated once per completion, each generation batch repeated per update."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler


class RepeatSampler(Sampler[int]):
    """Yields chunks of `batch_size` prompt indices, each index `mini_repeat_count` times in a row, each
    chunk `repeat_count` times.

    With the Trainer's data loader cutting this stream into per-process batches, one generation batch
    holds `batch_size` distinct prompts × `mini_repeat_count` completions spread over the processes,
    and it comes back `repeat_count` times (once per micro-step that trains on it). Incomplete
    chunks at the end are dropped so every group is whole. Every process draws the same order.

    Example: RepeatSampler(range(4), mini_repeat_count=2, batch_size=2, repeat_count=2, shuffle=False)
    yields 0 0 1 1 0 0 1 1 2 2 3 3 2 2 3 3.
    """

    def __init__(self, data_source: Sized, mini_repeat_count: int, batch_size: int = 1, repeat_count: int = 1,
                 shuffle: bool = True, seed: int = 0) -> None:
        self.num_samples = len(data_source)
        self.mini_repeat_count = mini_repeat_count
        self.batch_size = batch_size
        self.repeat_count = repeat_count
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)
        if self.num_samples < batch_size:
            raise ValueError(
                f"the dataset has {self.num_samples} prompts but one generation batch needs {batch_size} distinct "
                "prompts; use a larger dataset or a smaller generation batch"
            )

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=self.generator).tolist()
        else:
            order = list(range(self.num_samples))
        usable = self.num_samples - self.num_samples % self.batch_size
        for start in range(0, usable, self.batch_size):
            chunk = order[start : start + self.batch_size]
            for _ in range(self.repeat_count):
                for index in chunk:
                    yield from [index] * self.mini_repeat_count

    def __len__(self) -> int:
        return (self.num_samples // self.batch_size) * self.batch_size * self.mini_repeat_count * self.repeat_count
