"""GRPO pieces: Gaussian log-probabilities, the clipped surrogate, group advantages, rollout replay."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from sfpp_ray.algorithm.grpo import (gaussian_kl, gaussian_log_prob, group_advantages, grpo_backward, grpo_loss, ppo_clip_loss,
                                     rollout_log_prob, step_sigmas, trajectory_log_prob)
from sfpp_ray.algorithm.rollout import rollout
from sfpp_ray.config import GRPOConfig


def test_gaussian_log_prob_matches_torch_normal():
    x, mean = torch.randn(3, 4, 2, 5), torch.randn(3, 4, 2, 5)
    for sigma in (0.3, torch.tensor([0.2, 0.5, 1.0]).view(3, 1, 1, 1)):
        expected = Normal(mean.double(), torch.as_tensor(sigma).double()).log_prob(x.double()).flatten(1).sum(1)
        got = gaussian_log_prob(x, mean, sigma)
        assert got.shape == (3,)
        torch.testing.assert_close(got, expected)


def test_gaussian_kl_matches_torch():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    expected = kl_divergence(Normal(a, 0.4), Normal(b, 0.4)).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl(a, b, 0.4), expected)


def test_clipped_loss_at_ratio_one_is_the_policy_gradient():
    logp = torch.randn(6, dtype=torch.float64, requires_grad=True)
    adv = torch.randn(2, 3)
    ppo_clip_loss(logp, logp.detach(), adv, clip=1e-4).backward()
    clipped_grad = logp.grad.clone()
    logp.grad = None
    (-(adv.reshape(-1).double() * logp).mean()).backward()
    torch.testing.assert_close(clipped_grad, logp.grad)

    # per step: one advantage a rollout, shared by its steps; the mean over rollouts and steps
    logp = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    adv = torch.randn(4)
    ppo_clip_loss(logp, logp.detach(), adv, clip=1e-4).backward()
    clipped_grad = logp.grad.clone()
    logp.grad = None
    (-(adv.double()[:, None] * logp).mean()).backward()
    torch.testing.assert_close(clipped_grad, logp.grad)


def test_clipped_loss_stops_gradient_outside_the_trust_region():
    logp_old = torch.zeros(2, dtype=torch.float64)
    logp = torch.tensor([0.5, -0.5], dtype=torch.float64, requires_grad=True)  # ratio far above / below 1
    ppo_clip_loss(logp, logp_old, torch.tensor([1.0, -1.0]), clip=0.1).backward()
    assert torch.equal(logp.grad, torch.zeros(2, dtype=torch.float64))


def test_group_advantages_are_normalised_per_group():
    rewards = torch.randn(4, 12) * torch.tensor([1.0, 5.0, 0.1, 30.0])[:, None] + torch.arange(4.0)[:, None] * 7
    adv = group_advantages(rewards, clip=100.0)
    torch.testing.assert_close(adv.mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(adv.std(1, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    assert group_advantages(rewards, clip=0.5).abs().max() <= 0.5
    with pytest.raises(ValueError):
        group_advantages(torch.randn(5), clip=5.0)


def test_replay_matches_the_recorded_rollout(student, schedule, timesteps):
    text = torch.randn(2, 7, 32)
    with torch.no_grad():
        out = rollout(student, student.cross_attention_cache(text), torch.randn(2, 12, 9, 8, 8), timesteps, schedule,
                      record=True, generator=torch.Generator().manual_seed(0))
    recorded = rollout_log_prob(out.steps, timesteps, schedule)
    logp, means = trajectory_log_prob(student, student.cross_attention_cache(text), out.steps, out.latents,
                                      timesteps, schedule)
    assert means.shape == (2, 3 * 2, 12, 3, 8, 8)  # 3 blocks x 2 stochastic steps
    torch.testing.assert_close(logp.detach(), recorded, rtol=0, atol=1e-6)
    sigmas = step_sigmas(out.steps, timesteps, schedule)
    stochastic = [r for r in out.steps if r.x_next is not None]
    recorded_means = torch.stack([(1 - sigmas[0, i, 0]) * r.x0_pred for i, r in enumerate(stochastic)], dim=1)
    torch.testing.assert_close(means.detach(), recorded_means, rtol=1e-4, atol=1e-5)

    # The replay carries the gradient of the log-probability into the weights.
    loss, metrics = grpo_loss(logp, recorded, torch.tensor([1.0, -1.0]), means, means.detach(), sigmas,
                              GRPOConfig(ratio="trajectory"))
    loss.backward()
    assert metrics["kl"] == 0 and abs(metrics["ratio"] - 1) < 1e-3
    assert sum(p.grad.abs().sum() for p in student.parameters() if p.grad is not None) > 0

    # Per step: each stochastic step's log-probability per element, summing back to the whole rollout's.
    student.zero_grad(set_to_none=True)
    per_step, means = trajectory_log_prob(student, student.cross_attention_cache(text), out.steps, out.latents,
                                          timesteps, schedule, per_step=True)
    recorded_per_step = rollout_log_prob(out.steps, timesteps, schedule, per_step=True)
    assert per_step.shape == recorded_per_step.shape == (2, 6)
    torch.testing.assert_close(per_step.detach(), recorded_per_step, rtol=0, atol=1e-9)
    torch.testing.assert_close((recorded_per_step * 12 * 3 * 8 * 8).sum(1), recorded, rtol=1e-12, atol=1e-6)
    loss, metrics = grpo_loss(per_step, recorded_per_step, torch.tensor([1.0, -1.0]), means, means.detach(), sigmas,
                              GRPOConfig())
    loss.backward()
    assert metrics["kl"] == 0 and metrics["clip_frac"] == 0
    assert sum(p.grad.abs().sum() for p in student.parameters() if p.grad is not None) > 0
    with pytest.raises(ValueError, match="grpo.ratio per_step needs"):
        grpo_loss(logp, recorded, torch.tensor([1.0, -1.0]), means, None, sigmas, GRPOConfig())


def test_a_replay_a_little_off_the_rollout_clips_every_whole_rollout_ratio_but_no_per_step_one(student, schedule,
                                                                                               timesteps):
    """What the GPU's GRPO run met (docs/results.md): rollout and replay differ by far less than the clip per
    element (here a shift of the policy's means of about 1e-3 of the noise level), yet summed over a rollout the
    log-ratio is far outside clip 1e-4; per step and element it stays inside."""
    text = torch.randn(3, 7, 32)
    with torch.no_grad():
        out = rollout(student, student.cross_attention_cache(text), torch.randn(3, 12, 9, 8, 8), timesteps, schedule,
                      record=True)
        student.proj_out.bias.add_(1e-3 * torch.randn_like(student.proj_out.bias))
        clip_frac = {}
        for ratio in ("trajectory", "per_step"):
            logp, means = trajectory_log_prob(student, student.cross_attention_cache(text), out.steps, out.latents,
                                              timesteps, schedule, per_step=ratio == "per_step")
            old = rollout_log_prob(out.steps, timesteps, schedule, per_step=ratio == "per_step")
            _, metrics = grpo_loss(logp, old, torch.randn(3), means, None, 1.0, GRPOConfig(ratio=ratio))
            clip_frac[ratio] = metrics["clip_frac"]
    assert clip_frac == {"trajectory": 1.0, "per_step": 0.0}


def test_replay_and_kl_move_with_the_policy(student, schedule, timesteps):
    text = torch.randn(1, 7, 32)
    with torch.no_grad():
        out = rollout(student, student.cross_attention_cache(text), torch.randn(1, 12, 6, 8, 8), timesteps, schedule,
                      record=True)
        _, ref_means = trajectory_log_prob(student, student.cross_attention_cache(text), out.steps, out.latents,
                                           timesteps, schedule)
        student.proj_out.bias.add_(0.1)
    logp, means = trajectory_log_prob(student, student.cross_attention_cache(text), out.steps, out.latents,
                                      timesteps, schedule)
    logp_old = rollout_log_prob(out.steps, timesteps, schedule)
    assert (logp.detach() - logp_old).abs().item() > 1.0
    sigmas = step_sigmas(out.steps, timesteps, schedule)
    cfg = GRPOConfig(kl_coef=0.5, ratio="trajectory")
    loss, metrics = grpo_loss(logp, logp_old, torch.tensor([1.0]), means, ref_means, sigmas, cfg)
    expected_kl = sum(gaussian_kl(means[:, i], ref_means[:, i], sigmas[0, i]) for i in range(means.shape[1]))
    assert metrics["kl"] > 0 and abs(metrics["kl"] - expected_kl.item()) < 1e-3 * expected_kl.item()
    assert metrics["clip_frac"] == 1.0  # the ratio has left [1 - clip, 1 + clip]


@pytest.mark.parametrize("ratio", ["per_step", "trajectory"])
def test_replaying_the_group_in_parts_gives_the_whole_groups_gradient(student, schedule, timesteps, ratio):
    text = torch.randn(4, 7, 32)
    with torch.no_grad():
        out = rollout(student, student.cross_attention_cache(text), torch.randn(4, 12, 6, 8, 8), timesteps, schedule,
                      record=True, generator=torch.Generator().manual_seed(1))
        _, ref_means = trajectory_log_prob(student, student.cross_attention_cache(text), out.steps, out.latents,
                                           timesteps, schedule)
        ref_means = ref_means + 0.01 * torch.randn_like(ref_means)  # a KL term that is not zero
    advantages = torch.randn(4)

    def gradient(micro_batch: int) -> tuple[dict, list[torch.Tensor]]:
        student.zero_grad(set_to_none=True)
        info = grpo_backward(student, text, out.steps, out.latents, advantages, ref_means, timesteps, schedule, 0.0,
                             GRPOConfig(kl_coef=0.5, clip=0.5, micro_batch=micro_batch, ratio=ratio),
                             lambda loss, weight, last: (loss * weight).backward())
        return info, [p.grad.clone() for p in student.parameters() if p.grad is not None]

    whole, whole_grad = gradient(0)
    for micro_batch in (1, 2):
        parts, parts_grad = gradient(micro_batch)
        assert parts["loss"] == pytest.approx(whole["loss"], rel=1e-5) and parts["kl"] == pytest.approx(whole["kl"], rel=1e-5)
        assert len(parts_grad) == len(whole_grad) > 0
        for a, b in zip(parts_grad, whole_grad):  # float32 sums in another order
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
