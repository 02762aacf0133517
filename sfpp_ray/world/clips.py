"""Training data from the synthetic world: rendered clips as codec latents plus their prompt embeddings.

The world is stationary, so a clip starting at frame 10^5 is as valid as one starting at 0;
drawing start frames at random shows a model the world at every time, not just its first seconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sfpp_ray.models.codec import VideoCodec
from sfpp_ray.models.text_encoder import TextEncoder
from sfpp_ray.world.sprites import SceneSpec, prompt, render

MAX_START_FRAME = 100_000


def world_latent_batch(scenes: Sequence[SceneSpec], num_video_frames: int, codec: VideoCodec, text_encoder: TextEncoder,
                       start: np.random.Generator | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (B, C, F, h, w) of `num_video_frames`-frame clips of `scenes` and their prompts' embeddings.

    start: a numpy Generator (start frames uniform in [0, MAX_START_FRAME)) or one start frame per scene.
    Latents and embeddings are on the text encoder's device, in its dtype.
    """
    if isinstance(start, np.random.Generator):
        start = start.integers(0, MAX_START_FRAME, size=len(scenes))
    if len(start) != len(scenes):
        raise ValueError(f"{len(start)} start frames for {len(scenes)} scenes")
    frames = np.stack([render(s, int(f), num_video_frames) for s, f in zip(scenes, start)])  # (B, F, H, W, 3)
    video = torch.from_numpy(frames).to(text_encoder.device).permute(0, 4, 1, 2, 3)
    video = video.to(text_encoder.dtype) / 127.5 - 1.0
    latents = codec.encode(video).to(text_encoder.device, text_encoder.dtype)
    return latents, text_encoder.encode([prompt(s) for s in scenes])
