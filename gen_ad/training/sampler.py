"""A resumable, shard-aware infinite sampler: the data order is a pure function of the seed.

The global sample stream is the concatenation of seeded permutations of the dataset, one per
epoch. Process ``r`` of ``W`` takes stream positions ``r, r+W, r+2W, ...`` starting from
``start``; resuming after ``s`` steps of per-process batch ``b`` means ``start = s * b * W``,
which continues the exact same order as an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``range(n)`` used in ``epoch`` (independent of any global RNG)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63 - 1))
    return torch.randperm(n, generator=g)


class ResumableSampler(Sampler[int]):
    """Infinite sampler over ``n`` items for process ``rank`` of ``world``.

    Args:
        n: dataset length (> 0).
        seed: data-order seed.
        rank / world: this process and the number of processes.
        start: global stream position to start from (multiple of ``world``).
    """

    def __init__(self, n: int, *, seed: int, rank: int = 0, world: int = 1, start: int = 0) -> None:
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.seed, self.rank, self.world, self.start = n, seed, rank, world, start

    def __iter__(self) -> Iterator[int]:
        pos = self.start + self.rank
        epoch, perm = -1, torch.empty(0, dtype=torch.long)
        while True:
            e, i = divmod(pos, self.n)
            if e != epoch:
                epoch, perm = e, epoch_permutation(self.n, self.seed, e)
            yield int(perm[i])
            pos += self.world

    def __len__(self) -> int:  # an infinite stream; len() is the dataset size for tooling
        return self.n
