import random

import numpy as np
import pytest

from sfpp_ray.algorithm.reward import batch_flow_rewards, flow_reward, flow_reward_terms
from sfpp_ray.world.sprites import render, sample_scenes

MIN_MOTION = 0.05


@pytest.fixture
def rng():
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def square_clip(xs, rng, size=16, side=64):
    """A textured square (so flow is defined inside it too) at integer x positions over a gradient."""
    texture = np.kron(rng.integers(120, 256, (size // 4, size // 4, 3)), np.ones((4, 4, 1))).astype(np.uint8)
    y, x = np.mgrid[0:side, 0:side]
    frame = np.stack([2 * x, 2 * y, np.full_like(x, 40)], -1).astype(np.uint8)
    clip = np.repeat(frame[None], len(xs), 0)
    for f, x0 in enumerate(xs):
        clip[f, 24:24 + size, x0:x0 + size] = texture
    return clip


def test_smooth_motion_beats_jitter_and_a_frozen_video(rng):
    t = np.arange(16)
    smooth = square_clip(8 + 2 * t, rng)
    jitter = square_clip(8 + 2 * t + rng.choice([-3, 3], len(t)), rng)
    frozen = square_clip(np.full(len(t), 20), rng)
    r_smooth, r_jitter, r_frozen = batch_flow_rewards([smooth, jitter, frozen], MIN_MOTION)
    assert r_smooth > r_jitter + 0.3
    assert r_smooth > r_frozen + 0.3
    terms = flow_reward_terms(frozen, MIN_MOTION)
    assert terms["smoothness"] == pytest.approx(0, abs=1e-3) and terms["motion_penalty"] > 0.9


def test_world_clip_beats_its_shuffled_frames(rng):
    clip = render(sample_scenes(int(rng.integers(2**31)), 1)[0], 0, 24)
    jittered = clip[np.clip(np.arange(24) + rng.choice([-1, 1], 24), 0, 23)]
    assert flow_reward(clip, MIN_MOTION) > flow_reward(jittered, MIN_MOTION)


def test_uint8_and_float_frames_agree(rng):
    clip = square_clip(8 + 2 * np.arange(8), rng)
    rewards = batch_flow_rewards(np.stack([clip, clip]), MIN_MOTION)
    assert rewards.shape == (2,) and rewards[0] == rewards[1]
    assert flow_reward(clip / 255.0, MIN_MOTION) == pytest.approx(rewards[0], abs=1e-6)


def test_bad_input_is_refused(rng):
    clip = square_clip(8 + 2 * np.arange(8), rng)
    with pytest.raises(ValueError, match="shape"):
        flow_reward(clip[..., 0], MIN_MOTION)
    with pytest.raises(ValueError, match="3 frames"):
        flow_reward(clip[:2], MIN_MOTION)
    with pytest.raises(ValueError, match="min_motion"):
        flow_reward(clip, 0.0)
    with pytest.raises(ValueError, match="unknown flow method"):
        flow_reward(clip, MIN_MOTION, method="lucas-kanade")
    with pytest.raises((ValueError, RuntimeError, FileNotFoundError), match="grpo.raft_weights"):
        flow_reward(clip, MIN_MOTION, method="raft")
    with pytest.raises((RuntimeError, FileNotFoundError), match="grpo.raft_weights"):
        flow_reward(clip, MIN_MOTION, method="raft", raft_weights="missing-raft.pt")
