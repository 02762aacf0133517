"""Self-Forcing++: distil on windows of rollouts far longer than the teacher's horizon.

The student streams N >> T frames with its rolling cache exactly as at inference, so the rollout
carries the errors it accumulates. A teacher-length window of it is re-noised (backward noise:
the noisy window keeps the rollout's temporal structure) and re-generated with gradient on top
of the rollout's own preceding context; DMD on that window then teaches the student to recover
from its own long-horizon drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from sfpp_ray.algorithm.dmd import Update, dmd_generator_loss
from sfpp_ray.algorithm.rollout import Generators, randn, rollout
from sfpp_ray.algorithm.schedule import FlowMatchSchedule
from sfpp_ray.config import DMDConfig

if TYPE_CHECKING:  # annotations only: the data pipeline's processes import this module and load no diffusers
    from sfpp_ray.models.causal_wan import CausalWanTransformer3DModel, CrossAttentionCache


def randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high]."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(low, high + 1, (1,), generator=generator, device=device))


def sample_window_start(num_frames: int, window_frames: int, frames_per_block: int, sampler: str = "uniform",
                        beta_a: float = 1.0, beta_b: float = 2.0, generator: torch.Generator | None = None) -> int:
    """First frame of a block-aligned window of `window_frames` inside a rollout of `num_frames`.

    uniform: every valid start equally likely. beta: the start's relative position ~ Beta(a, b)
    (Beta(1, 2) favours early windows).
    """
    if window_frames > num_frames:
        raise ValueError(f"window of {window_frames} frames does not fit a rollout of {num_frames}")
    if window_frames <= 0 or num_frames % frames_per_block or window_frames % frames_per_block:
        raise ValueError(f"rollout ({num_frames}) and window ({window_frames}) must be positive multiples of "
                         f"the block size ({frames_per_block})")
    num_starts = (num_frames - window_frames) // frames_per_block + 1
    if sampler == "uniform":
        idx = randint(0, num_starts - 1, generator)
    elif sampler == "beta":
        seed = randint(0, 2**62, generator)
        u = np.random.default_rng(seed).beta(beta_a, beta_b)
        idx = min(int(u * num_starts), num_starts - 1)
    else:
        raise ValueError(f"unknown window sampler {sampler!r} (uniform or beta)")
    return idx * frames_per_block


def backward_noise(x0: torch.Tensor, t: torch.Tensor | float, schedule: FlowMatchSchedule,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Re-noise clean rollout latents (B, C, F, H, W) to timestep t (scalar, (B,) or (B, F)); t = 0 returns x0."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x0.device)
    if t.ndim == 0:
        t = t.expand(x0.shape[0])
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return schedule.add_noise(x0, noise, t)


@torch.no_grad()
def extended_rollout(student: CausalWanTransformer3DModel, cross_cache: CrossAttentionCache, noise: torch.Tensor,
                     schedule: FlowMatchSchedule, timesteps: torch.Tensor, context_noise: float = 0.0,
                     generator: torch.Generator | None = None, switches: dict[int, CrossAttentionCache] | None = None,
                     switch_cache: str = "keep") -> torch.Tensor:
    """Gradient-free rollout to noise.shape[2] frames with the rolling cache, as at inference (prompt switches
    included: see `rollout`)."""
    return rollout(student, cross_cache, noise, timesteps, schedule, context_noise=context_noise,
                   generator=generator, switches=switches, switch_cache=switch_cache).latents


def sample_denoising_steps(num_steps: int, start_step: int | None = None, exit_step: int | None = None,
                           generator: torch.Generator | None = None) -> tuple[int, int]:
    """(start, exit): start ~ U{0..K-1} and exit ~ U{start..K-1}, each drawn only where not given."""
    start = randint(0, num_steps - 1, generator) if start_step is None else start_step
    exit_ = randint(start, num_steps - 1, generator) if exit_step is None else exit_step
    if not 0 <= start <= exit_ < num_steps:
        raise ValueError(f"need 0 <= start_step ({start}) <= exit_step ({exit_}) < {num_steps}")
    return start, exit_


def regenerate_window(student: CausalWanTransformer3DModel, cross_cache: CrossAttentionCache,
                      rollout_latents: torch.Tensor, window_start: int, window_frames: int,
                      schedule: FlowMatchSchedule, timesteps: torch.Tensor, *, use_backward_noise: bool = True,
                      start_step: int | None = None, exit_step: int | None = None, context_noise: float = 0.0,
                      noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Re-generate frames [window_start, window_start + window_frames) of a rollout, with gradient.

    The cache is prefilled with the rollout's clean frames before the window (the same context
    passes the rollout ran), then every block of the window is denoised from timesteps[start_step]
    (its backward-noised rollout latents; pure noise at step 0 without backward noise) and
    returns its x0 prediction at the shared exit step, the only forward that holds a graph.
    noise: the window's noise (drawn from `generator` if None).
    """
    B, C, N, H, W = rollout_latents.shape
    fpb = student.layout.frames_per_block
    if window_start % fpb or window_frames % fpb or window_frames <= 0:
        raise ValueError(f"window [{window_start}, +{window_frames}) is not aligned to {fpb}-frame blocks")
    if not 0 <= window_start <= N - window_frames:
        raise ValueError(f"window [{window_start}, {window_start + window_frames}) lies outside the {N}-frame rollout")
    if not use_backward_noise:
        if start_step not in (None, 0):
            raise ValueError("without backward noise the window starts from pure noise (start_step 0)")
        start_step = 0
    start_step, exit_step = sample_denoising_steps(len(timesteps), start_step, exit_step, generator)
    context, window = rollout_latents[:, :, :window_start], rollout_latents[:, :, window_start:window_start + window_frames]
    if noise is None:
        noise = randn(window.shape, generator, window.device, window.dtype)
    elif noise.shape != window.shape:
        raise ValueError(f"window noise has shape {tuple(noise.shape)}, the window {tuple(window.shape)}")
    start = noise
    if use_backward_noise:
        t = torch.full((B, window_frames), float(timesteps[start_step]), device=window.device)
        start = schedule.add_noise(window.detach(), noise, t)
    return regenerate(student, cross_cache, context, start, schedule, timesteps, start_step, exit_step,
                      context_noise, generator)


def regenerate(student: CausalWanTransformer3DModel, cross_cache: CrossAttentionCache, context: torch.Tensor,
               start: torch.Tensor, schedule: FlowMatchSchedule, timesteps: torch.Tensor, start_step: int,
               exit_step: int, context_noise: float = 0.0, generator: Generators = None) -> torch.Tensor:
    """A fresh cache prefilled with the clean `context` frames, then the window denoised from `start` (its state at
    timesteps[start_step]) to the x0 prediction of `exit_step`, the only forward that holds a graph."""
    return rollout(student, cross_cache, start, timesteps, schedule, context=context, context_noise=context_noise,
                   start_step=start_step, exit_step=exit_step, generator=generator).latents


def dmd_generator_step(student: CausalWanTransformer3DModel, teacher: nn.Module, critic: nn.Module, batch: dict,
                       schedule: FlowMatchSchedule, timesteps: torch.Tensor, cfg: DMDConfig, update: Update,
                       generators: Sequence[torch.Generator], context_noise: float = 0.0,
                       rolling_cache: bool = True) -> dict:
    """One Self-Forcing++ generator update on a batch of rollout windows.

    batch: "latents" (B, C, N, H, W) the clean rollouts; "noisy" (B, C, K, H, W) each window at
    timesteps[start_step] (backward noise, or pure noise at step 0); "window_start", "start_step", "exit_step" (B,);
    "text" (B, L, D); "uncond" (1 or B, L, D). Each sample is re-generated on top of its own rollout's frames before
    its window (rolling_cache False: on none, as if the window began the video), with its own generator: samples
    start at different frames, so each gets its own cache, and a batch of B gives the mean of its B samples'
    gradients exactly. Then DMD against the teacher and the critic, batched.
    """
    x0 = []
    for i, g in enumerate(generators):
        start = int(batch["window_start"][i]) if rolling_cache else 0
        x0.append(regenerate(student, student.cross_attention_cache(batch["text"][i:i + 1]),
                             batch["latents"][i:i + 1, :, :start], batch["noisy"][i:i + 1], schedule, timesteps,
                             int(batch["start_step"][i]), int(batch["exit_step"][i]), context_noise, g))
    loss, info = dmd_generator_loss(torch.cat(x0), teacher, critic, batch["text"], batch["uncond"], schedule, cfg,
                                    list(generators))
    return {"loss": loss.detach(), "grad_norm": update(loss), "dmd_grad_norm": info["dmd_grad_norm"]}
