"""P identities × K images per batch: every batch holds positives for every identity in it."""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator

import numpy as np
from torch.utils.data import Sampler


class PKBatchSampler(Sampler[list[int]]):
    """`identity_weights` (label -> weight) draws some identities more often than others; without it every
    identity is as likely."""

    def __init__(self, labels: list[int], identities_per_batch: int, images_per_identity: int, seed: int = 0,
                 identity_weights: dict[int, float] | None = None):
        self.rows_of: dict[int, list[int]] = defaultdict(list)
        for row, label in enumerate(labels):
            self.rows_of[label].append(row)
        self.p, self.k = min(identities_per_batch, len(self.rows_of)), images_per_identity
        self.num_batches = max(1, len(labels) // (self.p * self.k))
        self.seed, self.epoch = seed, 0
        self.identities = np.array(sorted(self.rows_of))
        self.probabilities = None
        if identity_weights is not None:
            weights = np.array([identity_weights[identity] for identity in self.identities], float)
            self.probabilities = weights / weights.sum()

    def set_epoch(self, epoch: int) -> None:
        """Each epoch draws differently but reproducibly (also after a resume)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        for _ in range(self.num_batches):
            batch = []
            for identity in rng.choice(self.identities, size=self.p, replace=False, p=self.probabilities):
                rows = self.rows_of[identity]
                batch.extend(rng.choice(rows, size=self.k, replace=len(rows) < self.k).tolist())
            yield batch
