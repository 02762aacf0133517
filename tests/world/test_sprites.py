import random
import time

import numpy as np
import pytest

from sfpp_ray.algorithm.optical_flow import farneback_flow, luma
from sfpp_ray.world.sprites import (HELDOUT_COMBOS, PALETTE, Background, SceneSpec, Sprite, WorldSpec, background,
                                    positions, prompt, render, render_layers, sample_scenes, stream)


@pytest.fixture
def seed():
    s = random.SystemRandom().randrange(2**31)
    print(f"seed={s}")
    return s


def test_same_seed_same_pixels(seed):
    a, b = sample_scenes(seed, 3), sample_scenes(seed, 3)
    assert a == b
    assert all(np.array_equal(render(x, 5, 16), render(y, 5, 16)) for x, y in zip(a, b))
    assert not np.array_equal(render(a[0], 0, 16), render(sample_scenes(seed + 1, 1)[0], 0, 16))


def test_random_access_and_stream_agree(seed):
    scene = sample_scenes(seed, 1)[0]
    full = render(scene, 0, 60)
    assert full.shape == (60, 64, 64, 3) and full.dtype == np.uint8
    assert np.array_equal(render(scene, 37, 23), full[37:])
    chunks = stream(scene, 12)
    assert np.array_equal(np.concatenate([next(chunks) for _ in range(5)]), full)


def test_statistics_are_stationary(seed):
    # Statistics of one 64-frame window depend on its phase (a lone sprite grazing a wall moves less
    # flow), so the short clip is eight windows long and the long one 12.5 times that.
    world = WorldSpec(32, 32, 16)
    scene = sample_scenes(seed, 1, world=world)[0]
    n = 8 * 64
    short, long = render(scene, 0, n), render(scene, 0, 100 * 64)

    def stats(video):
        q = (video // 64).astype(np.int64)
        hist = np.bincount(((q[..., 0] * 4 + q[..., 1]) * 4 + q[..., 2]).ravel(), minlength=64) / q[..., 0].size
        return luma(video / 255.0).mean(), hist, np.linalg.norm(farneback_flow(video), axis=-1).mean()

    true_speed = lambda start: np.linalg.norm(np.diff(positions(scene, start, n + 1), axis=0), axis=-1).mean()
    b0, h0, s0 = stats(short)
    for clip in (long[-n:], long):
        b, h, s = stats(clip)
        assert abs(b - b0) < 0.02
        assert 0.5 * np.abs(h - h0).sum() < 0.15
        assert abs(s / s0 - 1) < 0.3  # flow is noisy under occlusion; the exact speeds are checked next
    assert abs(true_speed(len(long) - n) / true_speed(0) - 1) < 0.05


def test_prompt_describes_the_scene():
    world = WorldSpec()
    slow = (0.1 + 0.05) * world.short_side / world.fps  # inside the first third of the speed range
    sprites = tuple(Sprite(shape, colour, 6.0, (x, 20.0), (slow, 0.0))
                    for shape, colour, x in [("square", "red", 10), ("square", "red", 30), ("circle", "blue", 50)])
    scene = SceneSpec(world, sprites, Background("gradient", "dark", 0.0))
    assert prompt(scene) == "two red squares and a blue circle bouncing slowly on a dark gradient background"
    fast = SceneSpec(world, (Sprite("circle", "blue", 6.0, (50.0, 20.0), (0.0, 0.55 * world.short_side / world.fps)),),
                     Background("texture", "navy", 0.0))
    assert prompt(fast) == "a blue circle bouncing quickly on a navy textured background"


def test_heldout_prompts_are_disjoint_from_train(seed):
    train, heldout = sample_scenes(seed, 300, "train"), sample_scenes(seed, 300, "heldout")
    combos = lambda s: {(x.colour, x.shape) for x in s.sprites}
    assert all(not combos(s) & HELDOUT_COMBOS for s in train)
    assert all(combos(s) & HELDOUT_COMBOS for s in heldout)
    assert not {prompt(s) for s in train} & {prompt(s) for s in heldout}


def test_coverage_marks_the_sprite_pixels_and_nothing_else(seed):
    scene = sample_scenes(seed, 1, world=WorldSpec(sprite_count=(2, 4)))[0]
    frames, coverage = render_layers(scene, seed % 1000, 6)
    assert np.array_equal(frames, render(scene, seed % 1000, 6)) and coverage.shape == frames.shape[:3]
    assert 0 <= coverage.min() and coverage.max() == 1
    bare = np.clip(np.rint(background(scene)), 0, 255).astype(np.uint8)
    assert np.array_equal(frames[coverage == 0], np.broadcast_to(bare, frames.shape)[coverage == 0])
    # the sprites' area, each frame (anti-aliased edges count in part; overlaps count once)
    area = lambda s: 4 * s.radius ** 2 * {"circle": np.pi / 4, "square": 1, "triangle": 3 ** 0.5 / 4}[s.shape]
    assert (coverage.sum(axis=(1, 2)) <= 1.02 * sum(area(s) for s in scene.sprites)).all()
    lone = sample_scenes(seed + 1, 1, world=WorldSpec(sprite_count=(1, 1)))[0]
    frames, coverage = render_layers(lone, 0, 6)  # a wholly covered pixel holds the sprite's own colour
    assert (np.abs(frames[coverage == 1].astype(int) - PALETTE[lone.sprites[0].colour]).max(axis=1) <= 1).all()
    assert coverage.sum(axis=(1, 2)) == pytest.approx(np.full(6, area(lone.sprites[0])), rel=0.02)


def test_render_is_fast(seed):
    scene = sample_scenes(seed, 1, world=WorldSpec(sprite_count=(4, 4)))[0]
    start = time.perf_counter()
    render(scene, 0, 256)
    assert time.perf_counter() - start < 1.0


def test_bad_input_is_refused():
    scene = sample_scenes(0, 1)[0]
    with pytest.raises(ValueError, match="num_frames"):
        render(scene, 0, 0)
    with pytest.raises(ValueError, match="size"):
        WorldSpec(size=(0.1, 0.6))
    with pytest.raises(ValueError, match="split"):
        sample_scenes(0, 1, split="test")
    with pytest.raises(ValueError, match="outside"):
        SceneSpec(WorldSpec(), (Sprite("circle", "red", 6.0, (2.0, 30.0), (1.0, 0.0)),), Background("gradient", "dark", 0.0))
