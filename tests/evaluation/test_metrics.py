import dataclasses
import random

import numpy as np
import pytest

from sfpp_ray.evaluation.metrics import frechet_distance, segment_metrics, summarise
from sfpp_ray.world.sprites import WorldSpec, positions, render, sample_scenes

SEGMENT, BLOCK, FRAMES = 32, 12, 192


@pytest.fixture(scope="module")
def seed():
    s = random.SystemRandom().randrange(2**31)
    print(f"seed={s}")
    return s


@pytest.fixture(scope="module")
def scene(seed):
    return sample_scenes(seed, 1, world=WorldSpec(sprite_count=(3, 4)))[0]


@pytest.fixture(scope="module")
def clips(scene):
    """One real clip and versions of it broken in one way each."""
    good = render(scene, 0, FRAMES) / 255.0
    ramp = np.linspace(0, 0.5, FRAMES)[:, None, None, None]
    jumps = np.repeat(np.resize([0.08, -0.08], FRAMES // BLOCK + 1), BLOCK)[:FRAMES, None, None, None]
    fewer = dataclasses.replace(scene, sprites=scene.sprites[-1:])
    return {
        "good": good,
        "brighter": good * (1 - ramp) + ramp,
        "frozen": np.repeat(good[:1], FRAMES, 0),
        "vanishing": np.concatenate([good[:SEGMENT], render(fewer, SEGMENT, FRAMES - SEGMENT) / 255.0]),
        "repeating": np.tile(good[:2 * SEGMENT], (FRAMES // (2 * SEGMENT), 1, 1, 1)),
        "flickering": np.clip(good + jumps, 0, 1),
    }


@pytest.fixture(scope="module")
def summaries(clips, scene):
    reference = render(scene, 10_000, 64)
    return {k: summarise(segment_metrics(v, SEGMENT, reference=[reference], block_frames=BLOCK)) for k, v in clips.items()}


def test_each_metric_flags_its_failure(summaries):
    good = summaries["good"]
    worse = lambda clip, key, margin: summaries[clip][key] > good[key] + margin
    assert worse("brighter", "exposure_drift", 0.1) and worse("brighter", "colour_drift", 0.1)
    assert worse("frozen", "stagnation", 0.5) and summaries["frozen"]["dynamic_degree"] < good["dynamic_degree"] - 0.5
    assert worse("vanishing", "count_error", 0.2)
    assert worse("repeating", "repetition", 0.3) and summaries["repeating"]["repetition"] > 0.95
    assert worse("flickering", "flicker", 0.5)
    assert worse("brighter", "frechet", 0.5)


def test_brightness_bias_tells_over_exposure_from_darkening(clips, scene):
    """A clip brightening over time and one darkening over time: the bias moves from the unchanged clip's with the
    sign of the change, the exposure drift is its size, and it grows with the change."""
    reference = render(scene, 10_000, 64)
    ramp = np.linspace(0, np.random.uniform(0.3, 0.6), len(clips["good"]))[:, None, None, None]
    unchanged = segment_metrics(clips["good"], SEGMENT, reference=[reference])
    for video, sign in ((clips["good"] * (1 - ramp) + ramp, 1), (clips["good"] * (1 - ramp), -1)):
        segments = segment_metrics(video, SEGMENT, reference=[reference])
        assert all(m["exposure_drift"] == pytest.approx(abs(m["brightness_bias"])) for m in segments)
        assert all(sign * (m["brightness_bias"] - u["brightness_bias"]) > 0 for m, u in zip(segments[1:], unchanged[1:]))
        assert sign * segments[-1]["brightness_bias"] > sign * segments[0]["brightness_bias"] + 0.01


def test_colour_drift_grows_with_the_shift_not_with_bin_edges(clips, scene):
    """An invisible shift of every pixel costs what it moves; a change of colour costs far more."""
    reference = render(scene, 10_000, 64)
    drift = lambda video: summarise(segment_metrics(video, SEGMENT, reference=[reference]))["colour_drift"]
    good = drift(clips["good"])
    for shift in (2, 4, 8):
        assert abs(drift(np.clip(clips["good"] + shift / 255, 0, 1)) - good) < 1.5 * shift / 255
    tinted = clips["good"].copy()
    tinted[..., 2] = 1.0  # full blue: every background turns blue, at one channel in three
    assert drift(tinted) > good + 0.1


def test_stability_ranks_the_good_clip_first(summaries):
    good = summaries["good"]["stability"]
    assert good > 75
    for name, s in summaries.items():
        if name != "good":
            assert s["stability"] < good - 3, name


def test_first_segment_is_the_default_reference(clips):
    good, bright = (segment_metrics(clips[k], SEGMENT) for k in ("good", "brighter"))
    assert good[0]["exposure_drift"] == 0 and good[0]["frechet"] == pytest.approx(0, abs=1e-6)
    assert bright[-1]["exposure_drift"] > good[-1]["exposure_drift"] + 0.1
    assert bright[-1]["stability"] < bright[0]["stability"] - 10


def _apart_frames(scene) -> np.ndarray:
    """Frames where no two sprites touch (their boxes are at least 2 px apart on some axis)."""
    centres = positions(scene, 0, 400)
    half = np.array([s.half_extent for s in scene.sprites])
    gap = np.abs(centres[:, :, None] - centres[:, None]) - (half[:, None] + half[None]) - 2
    return np.flatnonzero((gap.max(-1) + np.eye(len(half)) * 1e9 > 0).all((1, 2)))


def test_sprites_are_counted_and_named(seed):
    """Frames where no two sprites touch: every sprite is found, with its colour and shape."""
    # The first of the seed's scenes with at least two such frames (almost always the first scene).
    scene, apart = next((s, a) for s in sample_scenes(seed, 50, world=WorldSpec(sprite_count=(3, 4)))
                        if len(a := _apart_frames(s)) >= 2)
    video = np.concatenate([render(scene, int(f), 1) for f in apart])
    m = segment_metrics(video, len(video))[0]
    assert m["sprite_count"] == len(scene.sprites)
    assert m["composition_error"] == 0


def test_frechet_distance_matches_the_closed_form():
    x = np.random.default_rng(1).normal(size=(500, 6)) @ np.random.default_rng(2).normal(size=(6, 6))
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-6)
    y = 3 * x + 1  # mean shifts, covariance scales by 9: the distance is |dmu|^2 + (1 - 3)^2 tr(S)
    expected = ((y.mean(0) - x.mean(0)) ** 2).sum() + 4 * np.trace(np.cov(x, rowvar=False))
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_is_symmetric_and_matches_the_root_of_the_first_covariance():
    """The reference's root is the one computed (once): the same distance as with the other covariance's root."""
    rng = np.random.default_rng()
    x = rng.normal(size=(40, 8)) @ rng.normal(size=(8, 8))
    y = rng.normal(size=(60, 8)) @ rng.normal(size=(8, 8)) + rng.normal(size=8)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(sx)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    direct = (((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(sx) + np.trace(sy)
              - 2 * np.sqrt(np.clip(np.linalg.eigvalsh(root @ sy @ root), 0, None)).sum())
    assert frechet_distance(x, y) == pytest.approx(direct, rel=1e-9)
    assert frechet_distance(y, x) == pytest.approx(direct, rel=1e-9)


def test_block_starts_can_be_listed(clips):
    """A codec whose first block decodes to fewer frames: boundaries given as block starts."""
    video = clips["flickering"][:3 * SEGMENT]
    by_length = segment_metrics(video, SEGMENT, block_frames=BLOCK)
    by_start = segment_metrics(video, SEGMENT, block_frames=list(range(BLOCK, len(video), BLOCK)))
    assert [m["flicker"] for m in by_length] == [m["flicker"] for m in by_start]


def test_bad_input_is_refused(clips):
    good = clips["good"]
    with pytest.raises(ValueError, match="shape"):
        segment_metrics(good[..., 0], SEGMENT)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        segment_metrics(good * 2 - 1, SEGMENT)
    with pytest.raises(ValueError, match="segment_frames"):
        segment_metrics(good, 1)
    with pytest.raises(ValueError, match="reference"):
        segment_metrics(good, SEGMENT, reference=good[:, :32])
    with pytest.raises(ValueError, match="no segments"):
        summarise([])


def test_summary_has_every_metric(summaries):
    s = summaries["good"]
    assert {"stability", "stability_last", "stability_min", "exposure_drift", "repetition", "num_segments"} <= set(s)
    assert s["num_segments"] == FRAMES // SEGMENT and 0 <= s["stability_min"] <= s["stability"] <= 100
