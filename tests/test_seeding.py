"""One seed rule: a stream depends on its whole key and on nothing else."""

import random

import pytest
import torch

from sfpp_ray.seeding import generator, rng, seed_for


def test_each_key_has_its_own_stream_and_the_same_key_the_same_stream():
    seed = random.randrange(2**31)
    keys = [("rollout", w) for w in range(8)] + [("dmd", r, s) for r in range(4) for s in range(50)] + \
           [("teacher", r, s) for r in range(4) for s in range(50)] + [("grpo", 0, 1), ("grpo", 1, 0)]
    seeds = [seed_for(seed, *k) for k in keys]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert seed_for(seed + 1, "rollout", 0) != seed_for(seed, "rollout", 0)
    a, b = generator(seed, "dmd", 2, 7), generator(seed, "dmd", 2, 7)
    assert torch.equal(torch.randn(16, generator=a), torch.randn(16, generator=b))
    assert not torch.equal(torch.randn(16, generator=generator(seed, "dmd", 7, 2)),
                           torch.randn(16, generator=generator(seed, "dmd", 2, 7)))
    assert rng(seed, "world", 3).integers(2**62) == rng(seed, "world", 3).integers(2**62)


def test_negative_seeds_or_indices_are_refused():
    with pytest.raises(ValueError):
        seed_for(-1, "rollout", 0)
    with pytest.raises(ValueError):
        seed_for(0, "rollout", -3)
