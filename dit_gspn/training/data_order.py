"""The order in which a run visits its data: seeded per epoch, split over processes, resumable at any batch.

Epoch e shuffles the dataset with a generator seeded by (seed, e). Global micro-batch b of that
epoch is positions [b * G, (b + 1) * G) of the shuffle (G = micro-batch size x processes), and
process r reads its r-th slice of it. The position (epoch, b) is all a checkpoint needs to continue
the exact same stream, and it stays valid when the number of processes changes (G fixed).
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochBatchSampler(Sampler[list[int]]):
    """Yields this process's micro-batches of epoch ``epoch`` from micro-batch ``start`` on (last partial batch dropped)."""

    def __init__(self, dataset_size: int, micro_batch_size: int, num_processes: int, rank: int, seed: int,
                 epoch: int = 0, start: int = 0):
        self.global_batch = micro_batch_size * num_processes
        if dataset_size < self.global_batch:
            raise ValueError(f"the dataset has {dataset_size} items, fewer than one global micro-batch "
                             f"({micro_batch_size} x {num_processes} processes)")
        self.dataset_size = dataset_size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.seed = seed
        self.epoch = epoch
        self.start = start

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start)

    def _order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.dataset_size, generator=generator)

    def _slice(self, order: torch.Tensor, batch: int) -> list[int]:
        begin = batch * self.global_batch + self.rank * self.micro_batch_size
        return order[begin: begin + self.micro_batch_size].tolist()

    def batch_indices(self, batch: int) -> list[int]:
        """The dataset indices of this process's micro-batch ``batch`` of the epoch (what ``__iter__`` yields)."""
        return self._slice(self._order(), batch)

    def __iter__(self):
        order = self._order()
        for b in range(self.start, self.batches_per_epoch):
            yield self._slice(order, b)
