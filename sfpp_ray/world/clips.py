"""Training data from the synthetic world: rendered clips as codec latents plus their prompt embeddings.

The world is stationary, so a clip starting at frame 10^5 is as valid as one starting at 0;
drawing start frames at random shows a model the world at every time, not just its first seconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sfpp_ray.models.codec import VideoCodec
from sfpp_ray.seeding import seed_for
from sfpp_ray.models.text_encoder import TextEncoder
from sfpp_ray.world.sprites import SceneSpec, WorldSpec, prompt, render, render_layers, sample_scenes

MAX_START_FRAME = 100_000
SPRITE_RIM = 1  # pixels around a sprite weighted with it: a shape's corners are its edge pixels and their neighbours


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
    latents = clip_latents(torch.from_numpy(frames), codec, text_encoder.device, text_encoder.dtype)
    return latents, text_encoder.encode([prompt(s) for s in scenes])


def clip_latents(frames: torch.Tensor, codec: VideoCodec, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 clips (B, F, H, W, 3) to codec latents (B, C, F', h, w) on `device`, in `dtype`. From pinned
    memory the copy does not wait for the GPU's queue to drain."""
    video = frames.to(device, non_blocking=True).permute(0, 4, 1, 2, 3).to(dtype) / 127.5 - 1.0
    return codec.encode(video).to(device, dtype)


def sprite_loss_weight(coverage: torch.Tensor, latent_shape: Sequence[int], sprite_weight: float) -> torch.Tensor:
    """Per-latent loss weights (B, 1, F', h, w) from sprite coverage (B, F, H, W) in [0, 1]: 1 + sprite_weight
    where a latent cell holds any sprite pixel or a pixel within SPRITE_RIM of one, 1 elsewhere. Sprites
    fill a small share of each frame, so a plain mean leaves the shapes little of the loss; any codec's
    latent grid works, as the pixel mask is max-pooled to it. The weight depends on the clean clip, so a model
    trained with it learns a world tilted towards sprite pixels (more sprites: docs/notes/teacher_runs.md,
    runs 15, 17)."""
    if coverage.ndim != 4:
        raise ValueError(f"coverage must be (B, F, H, W), got shape {tuple(coverage.shape)}")
    mask = (coverage.float() > 0).float()
    mask = F.max_pool2d(mask, 2 * SPRITE_RIM + 1, stride=1, padding=SPRITE_RIM)  # pools H, W of each frame
    mask = F.adaptive_max_pool3d(mask[:, None], tuple(latent_shape[2:]))
    return 1.0 + sprite_weight * mask


class WorldClipStream(torch.utils.data.IterableDataset):
    """The batches of training steps first..first+steps-1: uint8 clips (B, F, H, W, 3), their prompts and
    a prompt-dropout mask, each a function of (seed, rank, step) alone; with `coverage`, also the sprites'
    coverage of each pixel (B, F, H, W, uint8 0-255).

    Rendering is the slow part of a small model's step; under a DataLoader with workers, worker w
    renders steps w, w + W, ... and the loader hands them back in step order, so the batches are the
    same with any number of workers. Rank r of `world_size` takes its slice of each step's scenes.
    """

    def __init__(self, world: WorldSpec, num_video_frames: int, batch_size: int, seed: int, first: int, steps: int,
                 rank: int = 0, world_size: int = 1, prompt_dropout: float = 0.0, split: str = "train",
                 coverage: bool = False):
        self.world, self.num_video_frames, self.batch_size = world, num_video_frames, batch_size
        self.seed, self.first, self.steps, self.rank, self.world_size = seed, first, steps, rank, world_size
        self.prompt_dropout, self.split, self.coverage = prompt_dropout, split, coverage

    def batch(self, step: int) -> dict:
        scenes = sample_scenes(seed_for(self.seed, "teacher_scenes", step), self.batch_size * self.world_size,
                               self.split, self.world)[self.rank::self.world_size]
        rng = np.random.default_rng(seed_for(self.seed, "teacher_clips", self.rank, step))
        start = rng.integers(0, MAX_START_FRAME, size=len(scenes))
        frames, coverage = zip(*[render_layers(s, int(f), self.num_video_frames) for s, f in zip(scenes, start)])
        batch = {"step": step, "frames": torch.from_numpy(np.stack(frames)), "prompts": [prompt(s) for s in scenes],
                 "drop": torch.from_numpy(rng.random(len(scenes)) < self.prompt_dropout)}
        if self.coverage:
            batch["coverage"] = torch.from_numpy(np.rint(np.stack(coverage) * 255).astype(np.uint8))
        return batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for step in range(self.first + worker, self.first + self.steps, workers):
            yield self.batch(step)

    def loader(self, workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
        """Batches in step order, rendered by `workers` processes ahead of use (0: in this process); pin_memory
        for a GPU, so copying a batch there does not stall the GPU's queue."""
        return torch.utils.data.DataLoader(self, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                           prefetch_factor=4 if workers else None, persistent_workers=False)
