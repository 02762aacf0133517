"""An open-ended stream of the student, one block at a time, whose prompt can change while it runs.

`generate` knows its length and its prompt switches before it starts; a served stream knows neither. A
LiveStream calls the one rollout loop (`rollout`) for one block at a time with the stream's own KV cache carried
from call to call, so its blocks are those of a single rollout over the same noise (the context pass of each block
runs on its own instead of folded into the next block's first pass: equal up to float rounding). Its state (cache,
random generators, the codec's decoding state, the clean frames a re-cache replays) is its own, so several
streams can take turns on one student.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from sfpp_ray import components
from sfpp_ray.algorithm.rollout import randn, rollout
from sfpp_ray.checks import NonFiniteError
from sfpp_ray.generate import VideoGenerator
from sfpp_ray.video_io import to_uint8


class LiveStream:
    """noise_seed draws each block's starting noise, seed + 1 the denoising steps' fresh noise (two generators, so
    that a block's noise does not depend on how many steps came before it)."""

    def __init__(self, gen: VideoGenerator, prompt: str, seed: int):
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        self.gen, self.cfg, self.prompt = gen, gen.cfg, prompt
        self.noise_generator = torch.Generator(gen.device).manual_seed(seed)
        self.step_generator = torch.Generator(gen.device).manual_seed(seed + 1)
        self.block_shape = components.latent_shape(self.cfg, gen.codec, self.cfg.student.frames_per_block, 1)
        _, _, _, h, w = self.block_shape
        self.cache = gen.student.new_cache(1, h, w, dtype=gen.dtype, device=gen.device)
        self.cross = self._cross(prompt)
        self.history: list[torch.Tensor] = []  # clean blocks so far: what a re-cache replays ("recache" only)
        self.recache_next = False
        self.codec_state = None
        self.blocks = 0
        self.latents: torch.Tensor | None = None  # the last block's clean latents

    def _cross(self, prompt: str):
        with torch.inference_mode():
            return self.gen.student.cross_attention_cache(self.gen.text.encode([prompt]))

    def switch(self, prompt: str) -> None:
        """The next block and those after it follow `prompt` (rollout.switch_cache: the self-attention cache kept,
        or every clean frame so far re-cached under it)."""
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        if prompt != self.prompt:
            self.prompt, self.cross = prompt, self._cross(prompt)
            self.recache_next = self.cfg.rollout.switch_cache == "recache" and self.blocks > 0

    def next_block(self) -> np.ndarray:
        """Generate and decode the next block: uint8 frames (F, H, W, 3)."""
        gen, cfg = self.gen, self.cfg
        noise = randn(self.block_shape, self.noise_generator, gen.device, gen.dtype)
        context = None
        if self.recache_next:  # a fresh cache prefilled with the stream so far under the new prompt
            _, _, _, h, w = self.block_shape
            self.cache = gen.student.new_cache(1, h, w, dtype=gen.dtype, device=gen.device)
            context, self.recache_next = torch.cat(self.history, dim=2), False
        with torch.inference_mode():
            x0 = rollout(gen.student, self.cross, noise, gen.schedule.student_timesteps(cfg.schedule), gen.schedule,
                         cache=self.cache, context=context, context_noise=cfg.schedule.context_noise,
                         generator=self.step_generator).latents
        if not torch.isfinite(x0).all():
            raise NonFiniteError(f"block {self.blocks + 1}: the student's latents hold NaN or inf values")
        if cfg.rollout.switch_cache == "recache":
            self.history.append(x0)
        self.latents, self.blocks = x0, self.blocks + 1
        gen.codec.restore_stream(self.codec_state)
        with torch.inference_mode():
            video = gen.codec.decode_block(x0)
        self.codec_state = gen.codec.stream_state()
        return to_uint8(video[0])


class StreamTimer:
    """Time to first frame and per-block latency of one stream, as its client sees them."""

    def __init__(self):
        self.start = time.perf_counter()
        self.block_ends: list[float] = []

    def block_done(self) -> None:
        self.block_ends.append(time.perf_counter())

    def summary(self) -> dict:
        ends = self.block_ends
        gaps = np.diff([self.start, *ends])
        return {"blocks": len(ends), "first_frame_s": float(gaps[0]) if len(ends) else None,
                "block_latency_s": {"mean": float(gaps[1:].mean()), "max": float(gaps[1:].max())} if len(ends) > 1
                else None}
