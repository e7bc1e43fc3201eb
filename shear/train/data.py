"""Data order as a pure function of (seed, step): resuming at step N reads exactly what an
uninterrupted run would, and any split of a global batch over processes sees the same samples."""
from __future__ import annotations

import torch


class StepSampler:
    """Epoch-wise seeded permutations of range(n); global batch k is positions [k*G, (k+1)*G)."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("train dataset is empty")
        self.n, self.seed = n, seed
        self._perm_epoch, self._perm = -1, None

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def global_batch(self, step: int, size: int) -> list[int]:
        out = []
        for pos in range(step * size, (step + 1) * size):
            out.append(int(self._perm_of(pos // self.n)[pos % self.n]))
        return out


def local_micro_batches(indices: list[int], batch_size: int, grad_accum: int, rank: int, world: int) -> list[list[int]]:
    """Split a global batch (batch_size*grad_accum*world indices) into this rank's micro-batches."""
    out = []
    for m in range(grad_accum):
        start = (m * world + rank) * batch_size
        out.append(indices[start:start + batch_size])
    return out


def collate(ds, idx: list[int]) -> dict[str, torch.Tensor]:
    """Stack items {"input_ids": [L], "labels": [L]} into [B, L] tensors."""
    items = [ds[i] for i in idx]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("input_ids", "labels")}
