"""Self-Forcing++: window sampling, backward noise, window re-generation and one extended-DMD iteration."""

import copy
import math

import pytest
import torch

from sfpp_ray.algorithm.dmd import critic_step
from sfpp_ray.algorithm.self_forcing_pp import (backward_noise, dmd_generator_step, extended_rollout,
                                                regenerate_window, sample_window_start)
from sfpp_ray.config import DMDConfig, ScheduleConfig

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


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _rollout_batch(B: int, N: int, K: int, g: torch.Generator, timesteps) -> dict:
    """B rollouts of N frames with K-frame windows at distinct block-aligned starts and random denoising steps."""
    starts = (torch.randperm((N - K) // 3 + 1, generator=g)[:B] * 3).tolist()
    start_step = torch.randint(0, len(timesteps), (B,), generator=g)
    exit_step = torch.stack([torch.randint(int(s), len(timesteps), (1,), generator=g)[0] for s in start_step])
    latents = torch.randn(B, 12, N, 8, 8, generator=g)
    return {"latents": latents, "window": torch.stack([latents[i, :, s:s + K] for i, s in enumerate(starts)]),
            "noisy": torch.randn(B, 12, K, 8, 8, generator=g), "window_start": torch.tensor(starts),
            "start_step": start_step, "exit_step": exit_step, "text": torch.randn(B, 7, 32, generator=g),
            "uncond": torch.randn(1, 7, 32, generator=g)}


@pytest.mark.parametrize("rolling_cache", [True, False])
def test_a_batch_of_windows_gives_the_mean_of_its_samples_gradients(teacher, student, schedule, rolling_cache):
    """trainer.batch_size windows with ragged starts (each its own cache) and their own random streams: the batched
    critic and generator steps' gradients equal the mean of the single-sample steps' gradients (float32)."""
    seed = int(torch.randint(0, 2**31, (1,)))
    g = torch.Generator().manual_seed(seed)
    critic = copy.deepcopy(teacher).requires_grad_(True)
    timesteps = schedule.student_timesteps(ScheduleConfig())
    dmd = DMDConfig(guidance=2.0)
    B, batch = 3, _rollout_batch(3, 18, 6, g, timesteps)
    seeds = torch.randint(0, 2**62, (B,), generator=g).tolist()
    streams = lambda idx: [torch.Generator().manual_seed(seeds[i]) for i in idx]
    losses = []

    def steps(idx: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        part = {k: v if k == "uncond" else v[idx] for k, v in batch.items()}
        student.zero_grad(), critic.zero_grad()
        gens = streams(idx)
        out = critic_step(critic, part["window"], part["text"], schedule, dmd, gens, lambda loss: loss.backward())
        critic_grads = _grads(critic)
        critic.zero_grad()
        out = dmd_generator_step(student, teacher, critic, part, schedule, timesteps, dmd,
                                 lambda loss: losses.append(loss.detach()) or loss.backward(), gens,
                                 rolling_cache=rolling_cache)
        assert out["loss"].isfinite() and math.isfinite(out["dmd_grad_norm"])
        assert all(p.grad is None or not p.grad.any() for p in critic.parameters())
        return critic_grads, _grads(student)

    batched = steps(list(range(B)))
    singles = [steps([i]) for i in range(B)]
    for which in (0, 1):
        for k, grad in enumerate(batched[which]):
            mean = sum(single[which][k] for single in singles) / B
            torch.testing.assert_close(grad, mean, rtol=1e-4, atol=1e-5)
    assert sum(g.abs().sum() for g in batched[1]) > 0  # the student did get a gradient
    # each sample's window was re-generated on its own context: without it the gradient differs
    if rolling_cache:
        student.zero_grad()
        dmd_generator_step(student, teacher, critic, batch, schedule, timesteps, dmd, lambda loss: loss.backward(),
                           streams(range(B)), rolling_cache=False)
        assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(_grads(student), batched[1]))
