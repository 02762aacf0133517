"""One rule for every stream of randomness: derived from `run.seed` by role and index, never by arithmetic.

`seed_for(seed, "rollout", worker)` and `seed_for(seed, "dmd", row)` hash their whole key with numpy's
SeedSequence, so no two roles, ranks, workers or rows share a stream, and a stream depends only on its key
(a resumed run draws what the uninterrupted one would have drawn at the same step or row).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def seed_for(seed: int, role: str, *index: int) -> int:
    """A 63-bit seed for the stream (seed, role, *index)."""
    if seed < 0 or any(i < 0 for i in index):
        raise ValueError(f"seeds and indices must be >= 0, got {seed}, {index}")
    key = [int(seed), zlib.crc32(role.encode()), *map(int, index)]
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> np.uint64(1))


def generator(seed: int, role: str, *index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on `device` for the stream (seed, role, *index)."""
    return torch.Generator(device=device).manual_seed(seed_for(seed, role, *index))


def rng(seed: int, role: str, *index: int) -> np.random.Generator:
    """A numpy generator for the stream (seed, role, *index)."""
    return np.random.default_rng(seed_for(seed, role, *index))
