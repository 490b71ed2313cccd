"""The order in which a run visits its data: seeded per epoch, split over processes, resumable at any batch.

Epoch e shuffles the dataset with the generator of (seed, e, ``Stream.DATA_ORDER``). Global micro-batch
b of that epoch is positions [b * G, (b + 1) * G) of the shuffle (G = micro-batch size x processes), and
process r reads its r-th slice of it. The position (epoch, b) is all a checkpoint needs to continue
the exact same stream, and it stays valid when the number of processes changes (G fixed).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler

from dit_gspn.seeding import Stream, index_generator


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
        generator = index_generator(self.seed, self.epoch, stream=Stream.DATA_ORDER)
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


def micro_batches(dataset, micro_batch: int, acc, seed: int, epoch: int, start: int, num_workers: int):
    """Yields (x, y, position after this batch) forever, epoch after epoch, from (epoch, start)."""
    while True:
        sampler = EpochBatchSampler(len(dataset), micro_batch, acc.num_processes, acc.process_index, seed,
                                    epoch=epoch, start=start)
        # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG, which
        # would shift the label-dropout stream of a resumed run by one draw.
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                            pin_memory=acc.device.type == "cuda",
                            generator=index_generator(seed, epoch, stream=Stream.LOADER))
        for b, (x, y) in enumerate(loader, start=start):
            yield x, y, (epoch, b + 1)
        epoch, start = epoch + 1, 0


def non_finite_sources(step_inputs, dataset, micro_batch: int, acc, seed: int) -> list[str]:
    """Where the non-finite values among this step's micro-batches come from (dataset rows), if any."""
    found = []
    for x, (epoch, after) in step_inputs:
        bad_rows = (~x.isfinite()).flatten(1).any(1).nonzero().flatten().tolist()
        if not bad_rows:
            continue
        order = EpochBatchSampler(len(dataset), micro_batch, acc.num_processes, acc.process_index, seed,
                                  epoch=epoch).batch_indices(after - 1)
        locate = getattr(dataset, "locate", lambda i: f"item {i}")
        found += [locate(order[r]) for r in bad_rows]
    return found
