"""World training clips: the batch of a step is a function of (seed, rank, step) alone, however it is rendered."""

import numpy as np
import pytest
import torch

from sfpp_ray.seeding import seed_for
from sfpp_ray.world.clips import SPRITE_RIM, WorldClipStream, sprite_loss_weight
from sfpp_ray.world.sprites import WorldSpec, prompt, render, render_layers, sample_scenes

WORLD = WorldSpec(height=16, width=16, fps=8)


def _stream(seed, **kw):
    return WorldClipStream(WORLD, num_video_frames=5, batch_size=3, seed=seed, first=1, steps=5, prompt_dropout=0.5, **kw)


def test_batches_arrive_in_step_order_and_match_with_any_number_of_workers():
    seed = int(np.random.default_rng().integers(1000))
    inline = list(_stream(seed).loader(0))
    parallel = list(_stream(seed).loader(2))
    assert [b["step"] for b in inline] == [b["step"] for b in parallel] == [1, 2, 3, 4, 5]
    for a, b in zip(inline, parallel):
        assert torch.equal(a["frames"], b["frames"]) and a["prompts"] == b["prompts"] and torch.equal(a["drop"], b["drop"])
    assert inline[0]["frames"].shape == (3, 5, 16, 16, 3) and inline[0]["frames"].dtype == torch.uint8
    assert not torch.equal(inline[0]["frames"], inline[1]["frames"])  # every step draws new clips


def test_ranks_split_each_steps_scenes():
    seed = int(np.random.default_rng().integers(1000))
    scenes = sample_scenes(seed_for(seed, "teacher_scenes", 2), 6, "train", WORLD)
    ranks = [_stream(seed, rank=r, world_size=2).batch(2) for r in range(2)]
    assert ranks[0]["prompts"] + ranks[1]["prompts"] != [prompt(s) for s in scenes]  # interleaved, not halves
    assert ranks[0]["prompts"] == [prompt(s) for s in scenes[0::2]]
    assert ranks[1]["prompts"] == [prompt(s) for s in scenes[1::2]]
    start = int(np.random.default_rng(seed_for(seed, "teacher_clips", 1, 2)).integers(0, 100_000, size=3)[0])
    assert np.array_equal(ranks[1]["frames"][0].numpy(), render(scenes[1], start, 5))  # clip starts drawn per rank


def test_coverage_comes_with_the_clips_when_asked():
    seed = int(np.random.default_rng().integers(1000))
    plain, covered = _stream(seed).batch(3), _stream(seed, coverage=True).batch(3)
    assert "coverage" not in plain and torch.equal(plain["frames"], covered["frames"])
    scene = sample_scenes(seed_for(seed, "teacher_scenes", 3), 3, "train", WORLD)[0]
    start = int(np.random.default_rng(seed_for(seed, "teacher_clips", 0, 3)).integers(0, 100_000, size=3)[0])
    frames, coverage = render_layers(scene, start, 5)
    assert covered["coverage"].shape == (3, 5, 16, 16) and covered["coverage"].dtype == torch.uint8
    assert torch.equal(covered["coverage"][0], torch.from_numpy(np.rint(coverage * 255).astype(np.uint8)))


def test_sprite_loss_weight_covers_sprites_and_their_rim_on_the_latent_grid():
    rng = np.random.default_rng()
    f, y, x = (int(v) for v in rng.integers([0, 3, 3], [4, 13, 13]))
    coverage = torch.zeros(2, 4, 16, 16)
    coverage[1, f, y, x] = float(rng.uniform(0.1, 1.0))  # one partly covered pixel
    w = float(rng.uniform(0.5, 5.0))
    weight = sprite_loss_weight(coverage, (2, 12, 4, 8, 8), w)  # a factor-2 spatial codec's grid
    assert weight.shape == (2, 1, 4, 8, 8)
    expected = torch.ones(2, 1, 4, 8, 8)
    for yy in range(y - SPRITE_RIM, y + SPRITE_RIM + 1):
        for xx in range(x - SPRITE_RIM, x + SPRITE_RIM + 1):
            expected[1, 0, f, yy // 2, xx // 2] = 1 + w
    torch.testing.assert_close(weight, expected)
    with pytest.raises(ValueError, match="coverage"):
        sprite_loss_weight(coverage[0], (2, 12, 4, 8, 8), w)
