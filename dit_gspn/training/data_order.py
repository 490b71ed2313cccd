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

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator)
        for b in range(self.start, self.batches_per_epoch):
            begin = b * self.global_batch + self.rank * self.micro_batch_size
            yield order[begin: begin + self.micro_batch_size].tolist()
