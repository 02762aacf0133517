"""A live stream, block by block with its prompt switched while it runs, is one rollout over the same noise."""

import numpy as np
import pytest
import torch

from sfpp_ray.algorithm.rollout import randn, rollout
from sfpp_ray.config import load_config
from sfpp_ray.generate import VideoGenerator
from sfpp_ray.live_stream import LiveStream
from sfpp_ray.video_io import to_uint8


@pytest.mark.parametrize("switch_cache", ["keep", "recache"])
def test_live_stream_equals_one_rollout_with_the_switch(switch_cache):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    torch.manual_seed(seed)  # the untrained student's weights
    cfg = load_config("configs/tiny.yaml", [f"rollout.switch_cache={switch_cache}", "student.window_frames=6"])
    gen = VideoGenerator(cfg)
    live = LiveStream(gen, "a red circle bouncing", seed)
    frames, latents = [], []
    for b in range(5):  # 15 frames: the 6-frame window rolls
        if b == 3:
            live.switch("a blue square drifting slowly")
        frames.append(live.next_block())
        latents.append(live.latents)
    noise_generator = torch.Generator().manual_seed(seed)  # each block's starting noise, as the stream drew it
    noise = torch.cat([randn(live.block_shape, noise_generator, "cpu") for _ in range(5)], dim=2)

    text = lambda p: gen.student.cross_attention_cache(gen.text.encode([p]))
    with torch.inference_mode():
        whole = rollout(gen.student, text("a red circle bouncing"), noise,
                        gen.schedule.student_timesteps(cfg.schedule), gen.schedule,
                        generator=torch.Generator().manual_seed(seed + 1),
                        switches={3: text("a blue square drifting slowly")}, switch_cache=switch_cache).latents
    streamed = torch.cat(latents, dim=2)
    assert torch.isfinite(streamed).all() and streamed.abs().max() > 0.1
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=1e-5)
    video = np.concatenate(frames)
    assert video.shape == (15, 16, 16, 3) and video.dtype == np.uint8
    assert np.abs(video.astype(int) - to_uint8(gen.codec.decode(whole)[0]).astype(int)).max() <= 1


def test_streams_taking_turns_on_one_student_are_each_the_stream_made_alone():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    torch.manual_seed(seed)
    gen = VideoGenerator(load_config("configs/tiny.yaml"))
    alone = LiveStream(gen, "a green triangle", seed)
    solo = [alone.next_block() for _ in range(4)]
    first, second = LiveStream(gen, "a green triangle", seed), LiveStream(gen, "a white circle", seed + 7)
    turns = []
    for _ in range(4):
        turns.append(first.next_block())
        second.next_block()
    assert all(np.array_equal(a, b) for a, b in zip(solo, turns))


def test_an_empty_prompt_is_refused():
    gen = VideoGenerator(load_config("configs/tiny.yaml"))
    with pytest.raises(ValueError, match="empty"):
        LiveStream(gen, " ", 0)
    with pytest.raises(ValueError, match="empty"):
        LiveStream(gen, "a red circle", 0).switch("")
