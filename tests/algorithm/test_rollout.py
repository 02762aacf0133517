"""Rollout in gradient mode: each block's gradient flows only through its exit-step forward; the folded context pass."""

import contextlib
import dataclasses
from pathlib import Path

import pytest
import torch

from sfpp_ray import components
from sfpp_ray.algorithm.rollout import prefill, rollout
from sfpp_ray.algorithm.self_forcing_pp import extended_rollout
from sfpp_ray.config import load_config
from sfpp_ray.models import causal_wan
from sfpp_ray.models.causal_wan import CausalLayout

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_only_exit_step_forwards_hold_a_graph(student, schedule, timesteps):
    text = torch.randn(2, 7, 32)
    noise = torch.randn(2, 12, 9, 8, 8)  # 3 blocks through a 6-frame window: the cache rolls
    exit_step = 1
    calls = []
    hook = student.register_forward_hook(lambda m, args, out: calls.append(None if out is None else out.requires_grad))
    out = rollout(student, student.cross_attention_cache(text), noise, timesteps, schedule,
                  exit_step=exit_step, generator=torch.Generator().manual_seed(0))
    hook.remove()
    # Per block: steps 0..exit_step, then the clean context pass (cache only: it returns nothing); only the exit
    # step builds a graph.
    assert calls == [False, True, None] * 3
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


def _rollout_pair(student, layout, noise, text, schedule, timesteps, **kw):
    """The same rollout with separate context passes and with each folded into the next block's first pass:
    (output, final cache, forwards run) of each."""
    runs = []
    for fold in (False, True):
        student.set_layout(dataclasses.replace(layout, fold_context_pass=fold))
        calls = []
        hook = student.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[2]))
        cache = student.new_cache(noise.shape[0], noise.shape[3], noise.shape[4])
        out = rollout(student, student.cross_attention_cache(text), noise, timesteps, schedule, cache=cache,
                      generator=torch.Generator().manual_seed(7), **kw)
        hook.remove()
        runs.append((out, cache, calls))
    return runs


@pytest.mark.parametrize("fpb,window,sink,rule", [(1, 4, 1, "window_relative"), (3, 9, 3, "window_relative"),
                                                  (3, 12, 3, "absolute"), (3, 6, 0, "window_relative")])
def test_folded_context_pass_equals_separate_passes_after_the_window_rolls(tiny, schedule, timesteps, fpb, window, sink, rule):
    student = tiny.student(tiny.teacher(int(torch.randint(0, 2**31, ()))), fpb).eval()
    layout = CausalLayout(fpb, window, sink, rule, attention="sdpa")
    nf = 3 * window + fpb  # the window rolls more than twice
    noise, text = torch.randn(2, 12, nf, 8, 8), torch.randn(2, 7, 32)
    context_noise = float(torch.randint(0, 2, ())) * float(torch.randint(1, 300, ()))
    with torch.no_grad():
        (plain, plain_cache, plain_calls), (folded, folded_cache, folded_calls) = _rollout_pair(
            student, layout, noise, text, schedule, timesteps, context_noise=context_noise, record=True)
    blocks, K = nf // fpb, len(timesteps)
    assert plain_calls == ([fpb] * K + [fpb]) * blocks  # each block's steps, then its context pass
    assert folded_calls == [fpb] * K + ([2 * fpb] + [fpb] * (K - 1)) * (blocks - 1) + [fpb]  # the last context pass alone
    assert (folded.latents - plain.latents).abs().max() <= 1e-5
    for a, b in zip(plain.steps, folded.steps, strict=True):
        assert (a.block, a.step) == (b.block, b.step) and (a.x0_pred - b.x0_pred).abs().max() <= 1e-5
    # The stream can go on: the same frames committed, in the same slots, with the same keys and values.
    assert folded_cache.frames_done == plain_cache.frames_done == nf
    assert torch.equal(folded_cache.slot_frame, plain_cache.slot_frame)
    assert (folded_cache.k - plain_cache.k).abs().max() <= 1e-5 and (folded_cache.v - plain_cache.v).abs().max() <= 1e-5


def test_folded_rollout_keeps_the_exit_step_gradient(tiny, schedule, timesteps):
    """In gradient mode the folded steps hold no graph, and the exit step's gradient is the unfolded one's."""
    student = tiny.student(tiny.teacher(int(torch.randint(0, 2**31, ()))), 1)
    layout = CausalLayout(1, 4, 1, attention="sdpa")
    noise, text = torch.randn(2, 12, 7, 8, 8), torch.randn(2, 7, 32)
    weight = torch.randn_like(noise)
    grads, latents = [], []
    for out, _, calls in _rollout_pair(student, layout, noise, text, schedule, timesteps, exit_step=1):
        student.zero_grad()
        (out.latents * weight).sum().backward()
        grads.append(_grads(student))
        latents.append(out.latents.detach())
    assert (latents[1] - latents[0]).abs().max() <= 1e-5
    assert calls == [1, 1] + [2, 1] * 6 + [1]  # step 0 folds the previous block's context pass, step 1 holds the graph
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert (grads[1][name] - grads[0][name]).abs().max() <= 1e-5 * max(1.0, grads[0][name].abs().max().item())


def test_fold_context_pass_key_reaches_extended_rollout(schedule, timesteps):
    """student.fold_context_pass on and off: the same extended rollout, one forward fewer per block."""
    seed, runs = int(torch.randint(0, 2**31, ())), []
    for fold in ("false", "true"):
        cfg = load_config(TINY, [f"model.init_seed={seed}", "student.sink_frames=3", "student.window_frames=9",
                                 "student.attention=sdpa", f"student.fold_context_pass={fold}"])
        student = components.build_student(cfg).eval()
        assert student.layout.fold_context_pass == (fold == "true")
        calls = []
        student.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[2]))
        torch.manual_seed(seed)
        noise, text = torch.randn(1, 12, 24, 8, 8), torch.randn(1, 7, 32)
        runs.append((extended_rollout(student, student.cross_attention_cache(text), noise, schedule, timesteps,
                                      context_noise=50.0, generator=torch.Generator().manual_seed(seed)), len(calls)))
    (plain, plain_calls), (folded, folded_calls) = runs
    assert (folded - plain).abs().max() <= 1e-5 and plain_calls - folded_calls == 24 // 3 - 1


def _compiled_calls() -> int:
    info = causal_wan._compiled_body.cache_info()
    return info.hits + info.misses


# aot_eager: dynamo captures the whole step (fullgraph: a graph break is an error) and AOT autograd functionalizes
# the ring's in-place index-copies, as inductor gets them; inductor's C++ build of each graph takes minutes on a
# 2-core machine. Every case shares one model shape, so equal pass shapes reuse the graphs compiled before.
@pytest.mark.parametrize("fpb,window,sink,fold", [(1, 4, 0, False), (1, 4, 1, True), (3, 6, 0, True), (3, 9, 3, False)])
def test_compiled_stream_equals_eager_after_the_window_rolls(tiny, schedule, timesteps, fpb, window, sink, fold):
    student = tiny.student(tiny.teacher(int(torch.randint(0, 2**31, ()))), fpb).eval()
    layout = CausalLayout(fpb, window, sink, attention="sdpa", fold_context_pass=fold)
    nf = 2 * window + fpb  # the window fills (masked slots), then rolls twice
    noise, text = torch.randn(2, 12, nf, 8, 8), torch.randn(2, 7, 32)
    runs = []
    for compile in ("none", "default"):
        student.set_layout(dataclasses.replace(layout, compile=compile, compile_backend="aot_eager"))
        calls = []
        hook = student.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[2]))
        before = _compiled_calls()
        with torch.no_grad():
            cache = student.new_cache(2, 8, 8)
            out = rollout(student, student.cross_attention_cache(text), noise, timesteps, schedule, cache=cache,
                          generator=torch.Generator().manual_seed(3), record=True)
        hook.remove()
        assert _compiled_calls() - before == (len(calls) if compile != "none" else 0)  # every pass ran compiled
        assert cache.static == (compile != "none")
        runs.append((out, cache, calls))
    (eager, eager_cache, eager_calls), (compiled, compiled_cache, compiled_calls) = runs
    assert eager_calls == compiled_calls and (2 * fpb in eager_calls) == fold
    assert (compiled.latents - eager.latents).abs().max() <= 1e-5
    for a, b in zip(eager.steps, compiled.steps, strict=True):
        assert (a.x0_pred - b.x0_pred).abs().max() <= 1e-5
    assert torch.equal(compiled_cache.slot_frame, eager_cache.slot_frame)
    assert (compiled_cache.k - eager_cache.k).abs().max() <= 1e-5 and (compiled_cache.v - eager_cache.v).abs().max() <= 1e-5


def test_a_compiled_stream_of_another_length_reuses_the_graphs(tiny, schedule, timesteps):
    """Each block is cut from the whole rollout's noise: a stream of another length must not compile the step again."""
    from torch._dynamo.utils import counters

    student = tiny.student(tiny.teacher(int(torch.randint(0, 2**31, ()))), 3).eval()
    student.set_layout(CausalLayout(3, 6, 0, attention="sdpa", compile="default", compile_backend="aot_eager"))
    text = torch.randn(1, 7, 32)
    graphs = []
    with torch.no_grad():
        for nf in (12, 21, 15):  # the first fills the window and rolls it: every pass shape a stream has
            rollout(student, student.cross_attention_cache(text), torch.randn(1, 12, nf, 8, 8), timesteps, schedule,
                    generator=torch.Generator().manual_seed(nf))
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0] and graphs[2] == graphs[0], graphs


def test_reduce_overhead_compiles_as_default_off_cuda_and_needs_a_static_cache(tiny, schedule, timesteps):
    student = tiny.student(tiny.teacher(int(torch.randint(0, 2**31, ()))), 1).eval()
    layout = CausalLayout(1, 4, 0, attention="sdpa")
    noise, text = torch.randn(2, 12, 6, 8, 8), torch.randn(2, 7, 32)
    outs = []
    with torch.no_grad():
        for compile in ("none", "reduce-overhead"):
            student.set_layout(dataclasses.replace(layout, compile=compile, compile_backend="aot_eager"))
            with pytest.warns(UserWarning, match="compiles as default") if compile != "none" else contextlib.nullcontext():
                outs.append(rollout(student, student.cross_attention_cache(text), noise, timesteps, schedule,
                                    generator=torch.Generator().manual_seed(0)).latents)
        assert (outs[1] - outs[0]).abs().max() <= 1e-5
        eager_cache = student.set_layout(layout).new_cache(2, 8, 8)
        student.set_layout(dataclasses.replace(layout, compile="default", compile_backend="aot_eager"))
        with pytest.raises(ValueError, match="static cache"):
            student(noise[:, :, :1], torch.zeros(2, 1), cross_cache=student.cross_attention_cache(text), kv_cache=eager_cache)


def test_gradient_steps_of_a_compiled_student_run_eager_against_its_static_cache(tiny, schedule, timesteps):
    """A trainer's student with student.compile: gradient-free passes compiled, the exit step eager (with activation
    checkpointing) over the masked whole ring; the same latents and gradients as the eager student's."""
    student = tiny.student(tiny.teacher(int(torch.randint(0, 2**31, ()))), 1).eval()  # eval: the graphs above serve
    student.enable_gradient_checkpointing()
    noise, text = torch.randn(2, 12, 7, 8, 8), torch.randn(2, 7, 32)
    weight = torch.randn_like(noise)
    results = []
    for compile in ("none", "default"):
        student.set_layout(CausalLayout(1, 4, 1, attention="sdpa", compile=compile, compile_backend="aot_eager"))
        before = _compiled_calls()
        out = rollout(student, student.cross_attention_cache(text), noise, timesteps, schedule, exit_step=1,
                      generator=torch.Generator().manual_seed(5))
        assert (_compiled_calls() - before > 0) == (compile != "none")
        student.zero_grad()
        (out.latents * weight).sum().backward()
        results.append((out.latents.detach(), _grads(student)))
    (a, ga), (b, gb) = results
    assert (a - b).abs().max() <= 1e-5 and ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6)


def _switch_student(tiny, fold: bool):
    """fpb 3, a 9-frame window with 3 sink frames: a 6-block stream rolls the window before the switch at block 4."""
    student = tiny.student(tiny.teacher(int(torch.randint(0, 2**31, ()))), 3).eval()
    return student.set_layout(CausalLayout(3, 9, 3, attention="sdpa", fold_context_pass=fold))


@pytest.mark.parametrize("fold", [False, True])
@torch.no_grad()
def test_recache_at_a_switch_is_a_fresh_prefill_under_the_new_prompt(tiny, schedule, timesteps, fold):
    """switch_cache "recache": the stream after the switch is exactly the stream a fresh cache prefilled with the same
    clean frames under the new prompt makes, and the final cache equals that prefill of every frame (float32)."""
    student = _switch_student(tiny, fold)
    noise, a, b = torch.randn(2, 12, 18, 8, 8), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    cross_a, cross_b, s = student.cross_attention_cache(a), student.cross_attention_cache(b), 4 * 3
    cache = student.new_cache(2, 8, 8)
    out = rollout(student, cross_a, noise, timesteps, schedule, cache=cache, switches={4: cross_b},
                  switch_cache="recache", generator=torch.Generator().manual_seed(5)).latents

    g = torch.Generator().manual_seed(5)
    before = rollout(student, cross_a, noise[:, :, :s], timesteps, schedule, generator=g).latents
    fresh = student.new_cache(2, 8, 8)
    after = rollout(student, cross_b, noise[:, :, s:], timesteps, schedule, cache=fresh, context=before,
                    generator=g).latents
    assert (out[:, :, :s] - before).abs().max() <= 1e-5
    assert (out[:, :, s:] - after).abs().max() <= 1e-5
    prefilled = student.new_cache(2, 8, 8)
    prefill(student, cross_b, prefilled, out)
    for c in (cache, fresh):
        assert c.frames_done == prefilled.frames_done == 18 and torch.equal(c.slot_frame, prefilled.slot_frame)
        assert (c.k - prefilled.k).abs().max() <= 1e-5 and (c.v - prefilled.v).abs().max() <= 1e-5
    # the prompt mattered: keeping the old cache gives another stream
    kept = rollout(student, cross_a, noise, timesteps, schedule, switches={4: cross_b}, switch_cache="keep",
                   generator=torch.Generator().manual_seed(5)).latents
    assert (kept[:, :, :s] - out[:, :, :s]).abs().max() <= 1e-5 and (kept[:, :, s:] - out[:, :, s:]).abs().max() > 1e-3


@pytest.mark.parametrize("fold", [False, True])
@torch.no_grad()
def test_keep_at_a_switch_goes_on_with_the_cache_under_the_new_prompt(tiny, schedule, timesteps, fold):
    """switch_cache "keep": the frames before the switch stay cached as the old prompt made them; only the
    cross-attention changes, so the stream is the old stream's cache continued under the new prompt."""
    student = _switch_student(tiny, fold)
    noise, a, b = torch.randn(1, 12, 18, 8, 8), torch.randn(1, 7, 32), torch.randn(1, 7, 32)
    cross_a, cross_b = student.cross_attention_cache(a), student.cross_attention_cache(b)
    out = rollout(student, cross_a, noise, timesteps, schedule, switches={4: cross_b}, switch_cache="keep",
                  generator=torch.Generator().manual_seed(2)).latents
    g, cache = torch.Generator().manual_seed(2), student.new_cache(1, 8, 8)
    before = rollout(student, cross_a, noise[:, :, :12], timesteps, schedule, cache=cache, generator=g).latents
    after = rollout(student, cross_b, noise[:, :, 12:], timesteps, schedule, cache=cache, generator=g).latents
    assert (out - torch.cat([before, after], dim=2)).abs().max() <= 1e-5
    plain = rollout(student, cross_a, noise, timesteps, schedule, generator=torch.Generator().manual_seed(2)).latents
    assert (plain[:, :, 12:] - out[:, :, 12:]).abs().max() > 1e-3


def test_bad_switches_are_refused(student, schedule, timesteps):
    cross, noise = student.cross_attention_cache(torch.randn(1, 7, 32)), torch.randn(1, 12, 6, 8, 8)
    with torch.no_grad():
        with pytest.raises(ValueError, match="switch_cache"):
            rollout(student, cross, noise, timesteps, schedule, switches={1: cross}, switch_cache="drop")
        with pytest.raises(ValueError, match="outside"):
            rollout(student, cross, noise, timesteps, schedule, switches={2: cross})
        cache = student.new_cache(1, 8, 8)
        prefill(student, cross, cache, torch.randn(1, 12, 3, 8, 8))  # frames the rollout cannot replay
        with pytest.raises(ValueError, match="re-caching needs"):
            rollout(student, cross, noise, timesteps, schedule, cache=cache, switches={1: cross}, switch_cache="recache")
