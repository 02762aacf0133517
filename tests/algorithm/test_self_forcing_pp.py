"""Self-Forcing++: window sampling, backward noise, window re-generation and one extended-DMD iteration."""

import copy
import math

import pytest
import torch

from sfpp_ray.algorithm.dmd import critic_loss, dmd_generator_loss, is_generator_step
from sfpp_ray.algorithm.self_forcing_pp import (backward_noise, extended_rollout, regenerate_window,
                                                sample_window_start, sf_pp_generator_batch)
from sfpp_ray.config import DataConfig, DMDConfig, ScheduleConfig

CHI2_13DOF_P001 = 34.53  # chi-square critical value, 13 degrees of freedom, p = 0.001


def test_backward_noise_at_zero_is_identity(schedule):
    x0 = torch.randn(2, 12, 6, 8, 8)
    assert torch.equal(backward_noise(x0, 0.0, schedule), x0)
    assert torch.equal(backward_noise(x0, torch.zeros(2), schedule), x0)
    bf = x0.bfloat16()
    assert torch.equal(backward_noise(bf, 0, schedule), bf)


def test_backward_noise_statistics(schedule):
    x0 = torch.randn(1, 4, 3, 4, 4)
    draws, t = 8000, 300.0
    x_t = backward_noise(x0.expand(draws, -1, -1, -1, -1), t, schedule, torch.Generator().manual_seed(0))
    sigma = t / 1000
    torch.testing.assert_close(x_t.mean(0), (1 - sigma) * x0[0], atol=5 * sigma / math.sqrt(draws), rtol=0)
    torch.testing.assert_close(x_t.std(0), torch.full_like(x0[0], sigma), atol=6 * sigma / math.sqrt(2 * draws), rtol=0)


def test_backward_noise_keeps_the_frames_in_order(schedule):
    x0 = torch.randn(1, 12, 12, 8, 8)
    sigma = 0.6
    x_t = backward_noise(x0, sigma * 1000, schedule)
    # Each noisy frame is nearest to its own clean frame, scaled as the schedule scales it.
    dist = ((x_t[0, :, :, None] - (1 - sigma) * x0[0, :, None, :]) ** 2).sum(dim=(0, 3, 4))  # (noisy, clean)
    assert torch.equal(dist.argmin(1), torch.arange(12))


def test_regenerated_window_starts_from_the_backward_noised_rollout(student, schedule, timesteps):
    cross = student.cross_attention_cache(torch.randn(1, 7, 32))
    latents = torch.randn(1, 12, 15, 8, 8)
    noise = torch.randn(1, 12, 6, 8, 8)
    start_step, t = 1, float(timesteps[1])
    seen = []
    hook = student.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone())
                                         if float(args[1].flatten()[0]) == t else None)
    x0 = regenerate_window(student, cross, latents, 6, 6, schedule, timesteps, start_step=start_step,
                           exit_step=start_step, noise=noise)
    hook.remove()
    assert x0.shape == (1, 12, 6, 8, 8) and x0.requires_grad
    expected = schedule.add_noise(latents[:, :, 6:12], noise, torch.full((1,), t))
    torch.testing.assert_close(torch.cat(seen, dim=2), expected)


def test_window_sampler_is_uniform_over_block_aligned_starts():
    g = torch.Generator().manual_seed(0)
    num_frames, window, fpb = 60, 21, 3
    starts = torch.tensor([sample_window_start(num_frames, window, fpb, generator=g) for _ in range(7000)])
    assert (starts % fpb == 0).all() and starts.min() == 0 and starts.max() == num_frames - window
    counts = torch.bincount(starts // fpb, minlength=14).double()
    expected = len(starts) / 14
    assert ((counts - expected) ** 2 / expected).sum() < CHI2_13DOF_P001


def test_beta_window_sampler_favours_early_windows():
    g = torch.Generator().manual_seed(0)
    starts = torch.tensor([sample_window_start(300, 21, 3, "beta", 1.0, 2.0, g) for _ in range(2000)]).double()
    relative = starts / (300 - 21)
    assert abs(relative.mean().item() - 1 / 3) < 0.03  # mean of Beta(1, 2)


def test_window_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match="does not fit"):
        sample_window_start(18, 21, 3)
    with pytest.raises(ValueError, match="multiples"):
        sample_window_start(20, 6, 3)
    with pytest.raises(ValueError, match="sampler"):
        sample_window_start(21, 6, 3, sampler="gaussian")
    assert sample_window_start(21, 21, 3) == 0


def test_window_regeneration_reproduces_the_rollout(student, schedule):
    """One-step sampling is deterministic: the window, re-generated on the prefilled context, is the rollout's."""
    one_step = torch.tensor([1000.0])
    cross = student.cross_attention_cache(torch.randn(2, 7, 32))
    noise = torch.randn(2, 12, 18, 8, 8)
    latents = extended_rollout(student, cross, noise, schedule, one_step)
    window = regenerate_window(student, cross, latents, 9, 6, schedule, one_step, use_backward_noise=False,
                               noise=noise[:, :, 9:15])
    torch.testing.assert_close(window.detach(), latents[:, :, 9:15], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        regenerate_window(student, cross, latents, 15, 6, schedule, one_step)
    with pytest.raises(ValueError, match="pure noise"):
        regenerate_window(student, cross, latents, 0, 6, schedule, one_step, use_backward_noise=False, start_step=1)


def test_extended_dmd_iteration_runs(teacher, student, schedule):
    """Rollout 20x the window, window DMD for the student, a critic step: finite losses, gradients where expected."""
    critic = copy.deepcopy(teacher).requires_grad_(True)
    timesteps = schedule.student_timesteps(ScheduleConfig())
    data, dmd = DataConfig(window_frames=6), DMDConfig(update_ratio=2)
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 7, 32), torch.randn(1, 7, 32)
    gen_opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.0, 0.999))
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=1e-4, betas=(0.0, 0.999))
    for step in range(2):
        with torch.no_grad():
            latents = extended_rollout(student, student.cross_attention_cache(cond), torch.randn(1, 12, 120, 8, 8),
                                       schedule, timesteps, generator=g)
        assert latents.shape[2] == 20 * data.window_frames and latents.isfinite().all()
        if is_generator_step(step, dmd.update_ratio):
            x0, start = sf_pp_generator_batch(student, student.cross_attention_cache(cond), latents, schedule,
                                              timesteps, data, generator=g)
            assert x0.shape[2] == 6 and start % 3 == 0
            loss, metrics = dmd_generator_loss(x0, teacher, critic, cond, uncond, schedule, dmd, g)
            gen_opt.zero_grad()
            loss.backward()
            assert loss.isfinite() and math.isfinite(metrics["dmd_grad_norm"])
            assert all(p.grad is None for p in critic.parameters()) and all(p.grad is None for p in teacher.parameters())
            assert sum(p.grad.abs().sum() for p in student.parameters() if p.grad is not None) > 0
            gen_opt.step()
        with torch.no_grad():
            x0, _ = sf_pp_generator_batch(student, student.cross_attention_cache(cond), latents, schedule,
                                          timesteps, data, generator=g)
        loss, metrics = critic_loss(x0, critic, cond, schedule, dmd, g)
        critic_opt.zero_grad()
        loss.backward()
        assert loss.isfinite()
        critic_opt.step()
