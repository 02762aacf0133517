"""Activation checkpointing: the same gradients as the plain backward, for less saved memory, under a rolling cache too."""

from pathlib import Path

import pytest
import torch

from sfpp_ray import components
from sfpp_ray.algorithm.rollout import prefill, rollout
from sfpp_ray.config import load_config
from sfpp_ray.models.kv_cache import RollingKVCache

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
LAYOUTS = [(3, 6, 0), (1, 4, 1)]  # (frames_per_block, window, sinks): keys cached rotated, and re-rotated every pass


def _config(fpb, window, sink, seed):
    return load_config(TINY, [f"student.frames_per_block={fpb}", f"student.window_frames={window}",
                              f"student.sink_frames={sink}", "model.num_layers=2", f"model.init_seed={seed}"])


def _grads(model, run, checkpointing: bool) -> tuple[list[torch.Tensor], int]:
    """Gradients of run()'s scalar for every parameter, and the bytes autograd saved for the backward."""
    model.zero_grad(set_to_none=True)
    (model.enable_gradient_checkpointing if checkpointing else model.disable_gradient_checkpointing)()
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    loss.backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()], saved


def _assert_same(a, b):
    assert all(torch.allclose(x, y, rtol=0, atol=1e-5) for x, y in zip(a, b, strict=True))
    assert any(x.abs().sum() > 0 for x in a)


@pytest.mark.parametrize("fpb,window,sink", LAYOUTS)
def test_checkpointed_block_causal_forward_gives_the_same_gradients_for_less_memory(fpb, window, sink):
    seed = int(torch.randint(0, 2**31, ()))
    student = components.build_student(_config(fpb, window, sink, seed)).train()
    torch.manual_seed(seed)
    nf = 2 * window + fpb  # past the window: with sinks, every query block gets its own positions
    x, t, text = torch.randn(1, 12, nf, 8, 8), torch.rand(1, nf) * 1000, torch.randn(1, 7, 32)
    run = lambda: student(x, t, text).square().mean()  # noqa: E731
    plain, plain_bytes = _grads(student, run, False)
    ckpt, ckpt_bytes = _grads(student, run, True)
    _assert_same(ckpt, plain)
    assert ckpt_bytes < plain_bytes


@pytest.mark.parametrize("fpb,window,sink", LAYOUTS)
def test_checkpointed_cached_window_pass_gives_the_same_gradients_for_less_memory(fpb, window, sink, monkeypatch):
    """The DMD generator step: a prefilled cache, then every block's exit step with grad while the ring rolls on,
    so later passes overwrite slots an earlier block attended to before the backward re-runs it."""
    seed = int(torch.randint(0, 2**31, ()))
    cfg = _config(fpb, window, sink, seed)
    student, schedule = components.build_student(cfg).train(), components.build_schedule(cfg)
    timesteps = schedule.student_timesteps(cfg.schedule)
    torch.manual_seed(seed)
    exit_step = int(torch.randint(0, len(timesteps), ()))
    context, noise, text = torch.randn(1, 12, window, 8, 8), torch.randn(1, 12, 3 * fpb, 8, 8), torch.randn(1, 7, 32)
    snapshots = []
    frozen = RollingKVCache.frozen
    monkeypatch.setattr(RollingKVCache, "frozen", lambda self, layer: snapshots.append(frozen(self, layer)) or snapshots[-1])
    caches = []

    def run():
        cross = student.cross_attention_cache(text)
        cache = student.new_cache(1, 8, 8)
        prefill(student, cross, cache, context)
        out = rollout(student, cross, noise, timesteps, schedule, cache=cache, exit_step=exit_step,
                      generator=torch.Generator().manual_seed(seed)).latents
        caches.append((cache, cache.k.clone(), cache.v.clone()))
        return out.sum()

    plain, plain_bytes = _grads(student, run, False)
    assert not snapshots  # no copies without checkpointing
    ckpt, ckpt_bytes = _grads(student, run, True)
    _assert_same(ckpt, plain)
    assert len(snapshots) == 3 * len(student.blocks)  # one per layer of each exit pass; context passes hold no grad
    for cache, k, v in caches:  # each block wrote the cache once: the backward's re-runs left it alone
        assert torch.equal(cache.k, k) and torch.equal(cache.v, v)
    assert torch.equal(caches[0][1], caches[1][1]) and torch.equal(caches[0][2], caches[1][2])
    held = sum(s.k.nbytes + s.v.nbytes for s in snapshots)  # the copies checkpointing keeps beside what autograd saved
    assert ckpt_bytes + held < plain_bytes


def test_checkpointed_critic_gives_the_same_gradients_for_less_memory():
    seed = int(torch.randint(0, 2**31, ()))
    critic = components.build_critic(load_config(TINY, ["model.num_layers=2", f"model.init_seed={seed}"]))
    torch.manual_seed(seed)
    x, t, text = torch.randn(2, 12, 6, 8, 8), torch.rand(2) * 1000, torch.randn(2, 7, 32)
    run = lambda: critic(x, t, text, return_dict=False)[0].square().mean()  # noqa: E731
    plain, plain_bytes = _grads(critic, run, False)
    ckpt, ckpt_bytes = _grads(critic, run, True)
    _assert_same(ckpt, plain)
    assert ckpt_bytes < plain_bytes


@pytest.mark.parametrize("build", [components.build_student, components.build_critic])
def test_the_trainer_knob_turns_checkpointing_on(build):
    assert build(load_config(TINY, ["trainer.gradient_checkpointing=true"])).gradient_checkpointing
    assert not build(load_config(TINY)).gradient_checkpointing
