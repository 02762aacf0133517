"""The one rollout loop: block-wise few-step sampling against the rolling KV cache.

`generate`, every training stage (Self-Forcing DMD, Self-Forcing++ extended rollouts and window
re-generation) and GRPO call `rollout`. Per block: denoise through the student's step list,
re-noising each x0 prediction with fresh noise to the next level (a stochastic sampler: GRPO's
Gaussian policy), then run the clean context pass that writes the block's K/V into the cache.
With the student's layout.fold_context_pass, that context pass runs inside the next block's first
denoising pass (one forward over both blocks, each attending as its own pass would: see
CausalWanTransformer3DModel.forward), except for the last block and before a gradient step.

Prompt switches go through the same loop: from a switch's block on, the new prompt's cross-attention
cache conditions every pass, and the self-attention cache is either kept (frames generated under the
old prompt stay as they were cached) or re-cached: every clean frame of the stream re-run through the
context pass under the new prompt, exactly the cache a fresh prefill of those frames would build.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from sfpp_ray.algorithm.schedule import FlowMatchSchedule

if TYPE_CHECKING:  # the math needs only the model's interface: processes that only re-noise load no diffusers
    from sfpp_ray.models.causal_wan import CausalWanTransformer3DModel, CrossAttentionCache
    from sfpp_ray.models.kv_cache import RollingKVCache


@dataclass
class StepRecord:
    """One stochastic denoising step of one block: what GRPO needs to score the policy."""

    block: int
    step: int
    x_in: torch.Tensor  # state fed to the student at timesteps[step]
    x0_pred: torch.Tensor
    x_next: torch.Tensor | None  # the re-noised state (None on the block's last step)


@dataclass
class RolloutOutput:
    latents: torch.Tensor  # (B, C, F, H, W) clean latents, with grad at the exit steps in gradient mode
    steps: list[StepRecord] = field(default_factory=list)


def _timestep(t: float, batch: int, frames: int, device) -> torch.Tensor:
    return torch.full((batch, frames), float(t), device=device)


Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators, device, dtype=None) -> torch.Tensor:
    """Gaussian noise. A sequence of generators draws each sample's (first dim) from its own, so a batch gets
    exactly the noise its samples would get one at a time: what makes a batched step equal its samples' steps."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def _randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    return randn(x.shape, generator, x.device, x.dtype)


def _context_input(clean: torch.Tensor, schedule: FlowMatchSchedule | None, context_noise: float,
                   generator: Generators) -> tuple[torch.Tensor, torch.Tensor]:
    """A clean block as its context pass sees it (re-noised to context_noise when it is > 0), and its timesteps."""
    B, _, f = clean.shape[:3]
    t = _timestep(context_noise, B, f, clean.device)
    ctx = clean.detach()
    if context_noise > 0:
        if schedule is None:
            raise ValueError("context_noise > 0 needs the schedule to re-noise the context")
        with torch.no_grad():
            ctx = schedule.add_noise(ctx, _randn_like(ctx, generator), t)
    return ctx, t


def _context_pass(student: CausalWanTransformer3DModel, cross_cache: CrossAttentionCache, cache: RollingKVCache,
                  clean: torch.Tensor, schedule: FlowMatchSchedule | None, context_noise: float,
                  generator: Generators) -> None:
    """Write one clean block's K/V into the cache."""
    ctx, t = _context_input(clean, schedule, context_noise, generator)
    # a ZeRO-3 student gathers its partitioned parameters module by module as its pass goes: a pass that stops
    # inside the last block would leave the ranks' gathers out of step, so such a student runs the whole pass
    partitioned = hasattr(next(student.parameters()), "ds_id")  # ZeRO-3 wraps every parameter: the first says
    with torch.no_grad():
        student(ctx, t, cross_cache=cross_cache, kv_cache=cache, cache_only=not partitioned)
        cache.commit()


def prefill(student: CausalWanTransformer3DModel, cross_cache: CrossAttentionCache, cache: RollingKVCache,
            clean: torch.Tensor, context_noise: float = 0.0, *, schedule: FlowMatchSchedule | None = None,
            generator: Generators = None) -> None:
    """Write clean frames (B, C, F, H, W) into the cache block by block, as the rollout's context passes do."""
    fpb = student.layout.frames_per_block
    for s in range(0, clean.shape[2], fpb):
        _context_pass(student, cross_cache, cache, clean[:, :, s:s + fpb], schedule, context_noise, generator)


SWITCH_CACHE = ("keep", "recache")


def rollout(student: CausalWanTransformer3DModel, cross_cache: CrossAttentionCache, noise: torch.Tensor,
            timesteps: torch.Tensor, schedule: FlowMatchSchedule, *, cache: RollingKVCache | None = None,
            context: torch.Tensor | None = None, context_noise: float = 0.0,
            start_latents: torch.Tensor | None = None, start_step: int = 0, exit_step: int | None = None,
            record: bool = False, generator: Generators = None,
            switches: Mapping[int, CrossAttentionCache] | None = None, switch_cache: str = "keep",
            on_block: Callable[[int, torch.Tensor], None] | None = None) -> RolloutOutput:
    """Generate noise.shape[2] latent frames block by block.

    noise: initial noise of every frame. start_latents: clean latents to re-noise to
    timesteps[start_step] instead of starting from pure noise (backward noise initialisation).
    exit_step: gradient mode: every block stops at this step and returns its x0 prediction with
    grad; earlier steps and all cache writes hold no graph. `cache` continues an existing stream;
    by default a fresh cache is made. context: clean frames (B, C, F, H, W) prefilled into the cache
    before the first block (an earlier part of the stream, a start image's latents).
    switches: {block: cross-attention cache of the prompt from that block on}; switch_cache: "keep"
    the self-attention cache at a switch, or "recache" every clean frame of the stream (the context
    and the blocks so far) under the new prompt. on_block(b, x0) sees each finished block.
    """
    B, _, nf, H, W = noise.shape
    fpb = student.layout.frames_per_block
    if nf % fpb:
        raise ValueError(f"{nf} frames is not a whole number of {fpb}-frame blocks")
    K = len(timesteps)
    last = K - 1 if exit_step is None else exit_step
    if not 0 <= start_step <= last < K:
        raise ValueError(f"need 0 <= start_step ({start_step}) <= exit_step ({last}) < {K}")
    if switch_cache not in SWITCH_CACHE:
        raise ValueError(f"switch_cache must be one of {SWITCH_CACHE}, got {switch_cache!r}")
    switches = dict(switches or {})
    if any(not 0 <= b < nf // fpb for b in switches):
        raise ValueError(f"switch blocks {sorted(switches)} lie outside the rollout's {nf // fpb} blocks")
    cache = cache if cache is not None else student.new_cache(B, H, W, dtype=noise.dtype, device=noise.device)
    history = []  # the stream's clean frames this call knows of: what a re-cache replays
    known = cache.frames_done  # frames a given cache held before this call, which a re-cache cannot replay
    if context is not None and context.shape[2] % fpb:
        raise ValueError(f"a context of {context.shape[2]} frames is not a whole number of {fpb}-frame blocks")
    if context is not None and context.shape[2]:
        prefill(student, cross_cache, cache, context, context_noise, schedule=schedule, generator=generator)
        history.append(context.detach())
    fold = student.layout.fold_context_pass
    out, records = [], []
    pending = None  # a finished block whose context pass waits to be folded into the next block's first pass
    for b, s in enumerate(range(0, nf, fpb)):
        if b in switches:
            if pending is not None:  # the old prompt's context pass of the last block runs before the switch
                _context_pass(student, cross_cache, cache, pending, schedule, context_noise, generator)
                pending = None
            cross_cache = switches[b]
            if switch_cache == "recache":
                if known:
                    raise ValueError(f"re-caching needs the clean frames of the stream: the cache held {known} "
                                     "frames this rollout was not given as context")
                cache.reset()
                if history:
                    prefill(student, cross_cache, cache, torch.cat(history, dim=2), context_noise, schedule=schedule,
                            generator=generator)
        eps = noise[:, :, s:s + fpb]
        x = eps if start_latents is None else schedule.add_noise(start_latents[:, :, s:s + fpb], eps, _timestep(timesteps[start_step], B, fpb, eps.device))
        for k in range(start_step, last + 1):
            t = _timestep(timesteps[k], B, fpb, x.device)
            grad = torch.is_grad_enabled() and k == exit_step
            with torch.set_grad_enabled(grad):
                if pending is not None and not grad:
                    ctx, t_ctx = _context_input(pending, schedule, context_noise, generator)
                    flow = student(torch.cat([ctx, x], dim=2), torch.cat([t_ctx, t], dim=1), cross_cache=cross_cache,
                                   kv_cache=cache, context_frames=fpb)
                else:
                    if pending is not None:  # a gradient step: the context pass, which holds no graph, runs on its own
                        _context_pass(student, cross_cache, cache, pending, schedule, context_noise, generator)
                    flow = student(x, t, cross_cache=cross_cache, kv_cache=cache)
                x0 = schedule.x0_from_flow(x, flow, t)
            pending = None
            x_next = None
            if k < last:
                fresh = _randn_like(x0, generator)
                x_next = schedule.add_noise(x0.detach(), fresh, _timestep(timesteps[k + 1], B, fpb, x.device))
            if record:
                records.append(StepRecord(b, k, x.detach(), x0.detach(), x_next))
            if x_next is not None:
                x = x_next
        if fold and s + fpb < nf:
            pending = x0
        else:
            _context_pass(student, cross_cache, cache, x0, schedule, context_noise, generator)
        out.append(x0)
        history.append(x0.detach())
        if on_block is not None:
            on_block(b, x0.detach())
    return RolloutOutput(torch.cat(out, dim=2) if out else noise[:, :, :0], records)  # no frames: a prefill alone
