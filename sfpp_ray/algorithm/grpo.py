"""GRPO on the stochastic few-step sampler: the student's rollout is a Gaussian policy.

Each non-terminal denoising step draws x_next ~ N((1 - sigma') x0_hat, sigma'^2) with sigma' the
next step's noise level, so a rollout's log-probability is the sum of those Gaussian terms over
blocks and steps. Rewards are normalised within a group of rollouts of one prompt, and the
update is PPO-clipped, with a KL to a frozen reference on the same Gaussian means. grpo.ratio picks where
the ratio is taken: per recorded step on its log-probability per element (per_step), or once on the whole
rollout's sum (trajectory), whose ratio a tiny difference per element, summed over millions, moves by units.

Log-probabilities are float64: they sum millions of terms, and the PPO ratio needs their
differences to ~1e-4, below float32's resolution at that magnitude.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import torch

from sfpp_ray.algorithm.dmd import Update
from sfpp_ray.algorithm.reward import batch_flow_rewards
from sfpp_ray.algorithm.rollout import StepRecord, prefill, randn, rollout
from sfpp_ray.algorithm.schedule import FlowMatchSchedule
from sfpp_ray.config import GRPOConfig
from sfpp_ray.video_io import to_uint8
from sfpp_ray.models.causal_wan import CausalWanTransformer3DModel, CrossAttentionCache


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """(B,) sum over all but the batch dim of log N(x; mean, sigma^2); sigma broadcasts against x."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    z = (x.double() - mean.double()) / sigma
    lp = -0.5 * z.square() - sigma.log() - 0.5 * math.log(2 * math.pi)
    return lp.expand(x.shape).flatten(1).sum(1)


def gaussian_kl(mean_a: torch.Tensor, mean_b: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """(B,) KL(N(mean_a, sigma^2) || N(mean_b, sigma^2)) summed over all but the batch dim."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=mean_a.device)
    kl = (mean_a.float() - mean_b.float()).square() / (2 * sigma.square())
    return kl.flatten(1).sum(1)


def _non_terminal(steps: list[StepRecord]) -> list[StepRecord]:
    return [r for r in steps if r.x_next is not None]


def step_sigmas(steps: list[StepRecord], timesteps: torch.Tensor, schedule: FlowMatchSchedule) -> torch.Tensor:
    """Noise level of each non-terminal step's x_next, shaped (1, S, 1, 1, 1, 1) to broadcast against the means."""
    sig = torch.stack([schedule.sigma(timesteps[r.step + 1]) for r in _non_terminal(steps)])
    return sig.view(1, -1, 1, 1, 1, 1)


def rollout_log_prob(steps: list[StepRecord], timesteps: torch.Tensor, schedule: FlowMatchSchedule,
                     per_step: bool = False) -> torch.Tensor:
    """(B,) log-probability of a recorded rollout under the policy that made it (no model call); per_step: (B, S),
    each non-terminal step's log-probability per element, S steps in record order."""
    recs = _non_terminal(steps)
    if not recs:
        raise ValueError("the rollout has no stochastic steps (record=True and more than one denoising step needed)")
    sigmas = [schedule.sigma(timesteps[r.step + 1]) for r in recs]
    terms = [gaussian_log_prob(r.x_next, (1 - s) * r.x0_pred.float(), s) for r, s in zip(recs, sigmas)]
    return _per_element(terms, recs) if per_step else sum(terms)


def _per_element(terms: list[torch.Tensor], recs: list[StepRecord]) -> torch.Tensor:
    """(B,) log-probability sums of each step -> (B, S) per element."""
    return torch.stack([t / r.x_next[0].numel() for t, r in zip(terms, recs)], dim=1)


def trajectory_log_prob(student: CausalWanTransformer3DModel, cross_cache: CrossAttentionCache, steps: list[StepRecord],
                        clean_latents: torch.Tensor, timesteps: torch.Tensor, schedule: FlowMatchSchedule,
                        context_noise: float = 0.0, per_step: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Replay a recorded rollout under the current student, with gradient.

    Per block the cache holds the rollout's clean previous blocks, and the student re-predicts x0
    at each recorded non-terminal step. Returns the (B,) log-probability (per_step: (B, S), each step's per
    element, as rollout_log_prob's) and the Gaussian means (B, S, C, f, H, W), S steps in record order. With the
    recording weights and context_noise 0 it equals rollout_log_prob.
    """
    B, _, N, H, W = clean_latents.shape
    fpb = student.layout.frames_per_block
    by_block: dict[int, list[StepRecord]] = defaultdict(list)
    for r in _non_terminal(steps):
        if r.block >= N // fpb:
            raise ValueError(f"record of block {r.block} but the clean latents hold {N // fpb} blocks")
        by_block[r.block].append(r)
    if not by_block:
        raise ValueError("the rollout has no stochastic steps (record=True and more than one denoising step needed)")
    cache = student.new_cache(B, H, W, dtype=clean_latents.dtype, device=clean_latents.device)
    terms, recs, means = [], [], []
    last = max(by_block)
    for b in range(last + 1):
        for r in by_block[b]:
            t = torch.full((B, r.x_in.shape[2]), float(timesteps[r.step]), device=r.x_in.device)
            x0 = schedule.x0_from_flow(r.x_in, student(r.x_in, t, cross_cache=cross_cache, kv_cache=cache), t)
            sigma = schedule.sigma(timesteps[r.step + 1])
            mean = (1 - sigma) * x0.float()
            terms.append(gaussian_log_prob(r.x_next, mean, sigma))
            recs.append(r)
            means.append(mean)
        if b < last:
            prefill(student, cross_cache, cache, clean_latents[:, :, b * fpb:(b + 1) * fpb], context_noise,
                    schedule=schedule)
    return _per_element(terms, recs) if per_step else sum(terms), torch.stack(means, dim=1)


def group_advantages(rewards: torch.Tensor, clip: float, eps: float = 1e-8) -> torch.Tensor:
    """(P, G) rewards of G rollouts per prompt -> advantages normalised within each group, clipped to [-clip, clip]."""
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"need rewards (prompts, group >= 2), got shape {tuple(rewards.shape)}")
    r = rewards.double()
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return adv.clamp(-clip, clip).float()


def ppo_clip_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's clipped surrogate (to minimise), the mean over its ratios; at ratio 1 its gradient is the plain policy
    gradient. logp: (B,) or (B, S), one advantage per rollout (B,)."""
    adv = advantages.reshape(-1, *[1] * (logp_new.ndim - 1)).to(logp_new.dtype)
    ratio = torch.exp(logp_new - logp_old.detach().to(logp_new.dtype))
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()


def grpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, means: torch.Tensor,
              ref_means: torch.Tensor | None, sigmas: torch.Tensor | float, cfg: GRPOConfig) -> tuple[torch.Tensor, dict]:
    """PPO-clip plus kl_coef * KL to the reference policy; logp (B, S) per step and element with grpo.ratio
    per_step (the KL then per element too), (B,) whole rollouts with trajectory (the KL then summed over one)."""
    if logp_new.ndim != (2 if cfg.ratio == "per_step" else 1):
        raise ValueError(f"grpo.ratio {cfg.ratio} needs log-probabilities of shape "
                         f"{'(B, S)' if cfg.ratio == 'per_step' else '(B,)'}, got {tuple(logp_new.shape)}")
    policy = ppo_clip_loss(logp_new, logp_old, advantages, cfg.clip)
    kl = torch.zeros((), device=means.device)
    if ref_means is not None:
        kl = gaussian_kl(means, ref_means.detach(), sigmas).mean()
        if cfg.ratio == "per_step":
            kl = kl / means[0].numel()
    loss = policy + cfg.kl_coef * kl
    with torch.no_grad():
        ratio = torch.exp(logp_new - logp_old.to(logp_new.dtype))
        clipped = ((ratio - 1).abs() > cfg.clip).float().mean()
    return loss, {"policy_loss": policy.item(), "kl": kl.item(), "ratio": ratio.mean().item(),
                  "clip_frac": clipped.item()}


def _rollouts(record: StepRecord, part: slice) -> StepRecord:
    return dataclasses.replace(record, x_in=record.x_in[part], x0_pred=record.x0_pred[part],
                               x_next=None if record.x_next is None else record.x_next[part])


def grpo_backward(student: CausalWanTransformer3DModel, cond: torch.Tensor, steps: list[StepRecord],
                  clean_latents: torch.Tensor, advantages: torch.Tensor, ref_means: torch.Tensor | None,
                  timesteps: torch.Tensor, schedule: FlowMatchSchedule, context_noise: float, cfg: GRPOConfig,
                  update: Update) -> dict:
    """One group's GRPO loss, replayed and back-propagated cfg.micro_batch rollouts at a time (0: all).

    Why: the replay keeps every block's activations for the backward, so its memory grows with the
    rollouts replayed together. The loss is a mean over rollouts, so the parts' gradients, each
    weighted by its share of the group, sum to the whole group's. update(loss, weight, last) is called once
    per part (dmd.Update); a DeepSpeed engine whose gradient_accumulation_steps is the number of (equal) parts
    applies that weight itself and steps at the last.
    Returns the group's loss and grpo_loss's metrics, averaged over the parts.
    """
    group = clean_latents.shape[0]
    size = cfg.micro_batch or group
    per_step = cfg.ratio == "per_step"
    logp_old, sigmas = rollout_log_prob(steps, timesteps, schedule, per_step), step_sigmas(steps, timesteps, schedule)
    totals: dict[str, float] = defaultdict(float)
    for start in range(0, group, size):
        part = slice(start, min(start + size, group))
        weight = (part.stop - part.start) / group
        text = cond[part] if len(cond) == group else cond  # one prompt's embedding may serve the group
        logp, means = trajectory_log_prob(student, student.cross_attention_cache(text), [_rollouts(r, part) for r in steps],
                                          clean_latents[part], timesteps, schedule, context_noise, per_step)
        loss, info = grpo_loss(logp, logp_old[part], advantages[part], means,
                               None if ref_means is None else ref_means[part], sigmas, cfg)
        update(loss, weight=weight, last=part.stop == group)
        for key, value in {"loss": loss.item(), **info}.items():
            totals[key] += weight * value
    return dict(totals)


def grpo_step(student: CausalWanTransformer3DModel, reference: CausalWanTransformer3DModel, codec, cond: torch.Tensor,
              num_frames: int, latent_size: tuple[int, int], timesteps: torch.Tensor, schedule: FlowMatchSchedule,
              cfg: GRPOConfig, update: Update, generator: torch.Generator | None, context_noise: float = 0.0) -> dict:
    """One GRPO update on a group of cfg.group_size rollouts of one prompt (cond: (1 or G, L, D)).

    The group is rolled out with the stochastic sampler (recorded), decoded by `codec` and scored by the flow reward;
    advantages are normalised within the group, and the PPO-clipped loss with a KL to the frozen `reference` is
    replayed and back-propagated in cfg.micro_batch parts. grpo.shared_noise: one initial noise for the whole
    group, so its rollouts differ only by the sampler's own noise, the policy's randomness.
    """
    G, (h, w) = cfg.group_size, latent_size
    cond = cond.expand(G, *cond.shape[1:]) if cond.shape[0] == 1 else cond
    p = next(student.parameters())
    shape = (1 if cfg.shared_noise else G, student.config.in_channels, num_frames, h, w)
    noise = randn(shape, generator, p.device, p.dtype).expand(G, *shape[1:])
    with torch.no_grad():
        out = rollout(student, student.cross_attention_cache(cond), noise, timesteps, schedule,
                      context_noise=context_noise, record=True, generator=generator)
        videos = [to_uint8(v) for v in codec.decode(out.latents)]
        _, ref_means = trajectory_log_prob(reference, reference.cross_attention_cache(cond), out.steps, out.latents,
                                           timesteps, schedule, context_noise)
    rewards = batch_flow_rewards(videos, cfg.min_motion, cfg.reward, cfg.raft_weights)
    advantages = group_advantages(torch.from_numpy(rewards)[None], cfg.advantage_clip)[0].to(p.device)
    info = grpo_backward(student, cond, out.steps, out.latents, advantages, ref_means, timesteps, schedule,
                         context_noise, cfg, update)
    return {**info, "reward": float(rewards.mean()), "reward_std": float(rewards.std())}
