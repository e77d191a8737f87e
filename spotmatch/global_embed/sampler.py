"""P identities × K images per batch: every batch holds positives for every identity in it."""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator

import numpy as np
from torch.utils.data import Sampler


class PKBatchSampler(Sampler[list[int]]):
    def __init__(self, labels: list[int], identities_per_batch: int, images_per_identity: int, seed: int = 0):
        self.rows_of: dict[int, list[int]] = defaultdict(list)
        for row, label in enumerate(labels):
            self.rows_of[label].append(row)
        self.p, self.k = min(identities_per_batch, len(self.rows_of)), images_per_identity
        self.num_batches = max(1, len(labels) // (self.p * self.k))
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Each epoch draws differently but reproducibly (also after a resume)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        identities = np.array(sorted(self.rows_of))
        for _ in range(self.num_batches):
            batch = []
            for identity in rng.choice(identities, size=self.p, replace=False):
                rows = self.rows_of[identity]
                batch.extend(rng.choice(rows, size=self.k, replace=len(rows) < self.k).tolist())
            yield batch
