"""Deterministic, resumable data order and per-sample augmentation randomness.

* :class:`ResumableBatchSampler` yields batches of ``(epoch, index)`` keys. The index order of an epoch is
  ``DistributedSampler(shuffle=True, seed=seed, drop_last=True)`` with ``set_epoch(epoch)`` (one replica when
  not distributed), cut into full batches (drop_last: fixed shapes for ``torch.compile``). ``start_batch``
  skips the batches a resumed run already trained.
* :class:`SeededSampleDataset` wraps a map-style dataset: before ``dataset[index]`` it seeds python's
  ``random``, numpy and torch from ``(seed, epoch, index)``, so an item's augmentation is a pure function of
  its key -- independent of worker count, worker assignment and resume point. The caller's global RNG
  states are restored afterwards (in the main process with ``num_workers=0`` the trainer's RNG stream is
  not disturbed).

Together they make ``--resume`` reproduce exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import random
from typing import Iterator, List, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

Key = Tuple[int, int]  # (epoch, dataset index)


class ResumableBatchSampler(Sampler):
    """Batches of (epoch, index) keys; see module docstring. ``len`` = batches per epoch (for this rank)."""

    def __init__(self, dataset_len: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.dataset_len = int(dataset_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0
        per_rank = self.dataset_len // self.world_size
        if per_rank < self.batch_size:
            raise ValueError(f"dataset of {self.dataset_len} items gives {per_rank} per process "
                             f"(world size {self.world_size}), fewer than --batch-size {self.batch_size}; "
                             f"no full batch can be made (drop_last)")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def epoch_indices(self, epoch: int) -> List[int]:
        sampler = DistributedSampler(range(self.dataset_len), num_replicas=self.world_size, rank=self.rank,
                                     shuffle=self.shuffle, seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        return list(sampler)

    def __len__(self) -> int:
        return (self.dataset_len // self.world_size) // self.batch_size

    def __iter__(self) -> Iterator[List[Key]]:
        indices = self.epoch_indices(self.epoch)
        for b in range(self.start_batch, len(self)):
            chunk = indices[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(self.epoch, i) for i in chunk]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixing (seed, epoch, index) (SplitMix64-style finaliser; stable across runs)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(index) * 0x94D049BB133111EB)
    x &= (1 << 64) - 1
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 27
    return x & ((1 << 63) - 1)


class SeededSampleDataset(Dataset):
    """``dataset[(epoch, index)]`` with all RNGs seeded from (seed, epoch, index); see module docstring."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Key):
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
        random.seed(s)
        np.random.seed(s % (2 ** 32))
        torch.manual_seed(s)
        try:
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.random.set_rng_state(torch_state)
