"""Rollout in gradient mode: each block's gradient flows only through its exit-step forward."""

import pytest
import torch

from sfpp_ray.algorithm.rollout import prefill, rollout


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_only_exit_step_forwards_hold_a_graph(student, schedule, timesteps):
    text = torch.randn(2, 7, 32)
    noise = torch.randn(2, 12, 9, 8, 8)  # 3 blocks through a 6-frame window: the cache rolls
    exit_step = 1
    calls = []
    hook = student.register_forward_hook(lambda m, args, out: calls.append(out.requires_grad))
    out = rollout(student, student.cross_attention_cache(text), noise, timesteps, schedule,
                  exit_step=exit_step, generator=torch.Generator().manual_seed(0))
    hook.remove()
    # Per block: steps 0..exit_step, then the clean context pass; only the exit step builds a graph.
    assert calls == [False, True, False] * 3
    assert out.latents.requires_grad

    weight = torch.randn_like(out.latents)
    student.zero_grad()
    (out.latents * weight).sum().backward()
    rollout_grads = _grads(student)

    # The same computation with every non-exit step replaced by its detached recorded value.
    with torch.no_grad():
        rec = rollout(student, student.cross_attention_cache(text), noise, timesteps, schedule, exit_step=exit_step,
                      record=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rec.latents, out.latents.detach())
    cross = student.cross_attention_cache(text)
    cache = student.new_cache(2, 8, 8)
    blocks = []
    for r in (r for r in rec.steps if r.step == exit_step):
        t = torch.full((2, 3), float(timesteps[exit_step]))
        blocks.append(schedule.x0_from_flow(r.x_in, student(r.x_in, t, cross_cache=cross, kv_cache=cache), t))
        prefill(student, cross, cache, rec.latents[:, :, 3 * r.block:3 * r.block + 3])
    student.zero_grad()
    (torch.cat(blocks, dim=2) * weight).sum().backward()
    manual_grads = _grads(student)

    assert rollout_grads.keys() == manual_grads.keys() and rollout_grads
    for name in rollout_grads:
        torch.testing.assert_close(rollout_grads[name], manual_grads[name], rtol=1e-4, atol=1e-6)


def test_rollout_without_exit_step_holds_no_graph(student, schedule, timesteps):
    cross = student.cross_attention_cache(torch.randn(1, 7, 32))
    out = rollout(student, cross, torch.randn(1, 12, 6, 8, 8), timesteps, schedule)
    assert not out.latents.requires_grad


def test_context_noise_needs_the_schedule(student, schedule):
    with torch.no_grad():
        cross = student.cross_attention_cache(torch.randn(1, 7, 32))
        cache = student.new_cache(1, 8, 8)
        with pytest.raises(ValueError, match="schedule"):
            prefill(student, cross, cache, torch.randn(1, 12, 3, 8, 8), context_noise=10.0)
        prefill(student, cross, cache, torch.randn(1, 12, 3, 8, 8), context_noise=10.0, schedule=schedule)
    assert cache.frames_done == 3
