"""DMD: the generator gradient, the critic's fit, the update schedule, EMA, and a tiny distillation."""

import copy

import pytest
import torch
from torch import nn

from sfpp_ray.algorithm.dmd import EMA, _noised, critic_loss, dmd_generator_loss, is_generator_step
from sfpp_ray.algorithm.rollout import rollout
from sfpp_ray.algorithm.schedule import euler_ode_sample
from sfpp_ray.config import DMDConfig, ScheduleConfig


def test_generator_gradient_is_zero_when_the_critic_is_the_teacher(teacher, schedule):
    critic = copy.deepcopy(teacher)
    x0 = torch.randn(2, 12, 3, 8, 8, requires_grad=True)
    loss, metrics = dmd_generator_loss(x0, teacher, critic, torch.randn(2, 7, 32), None, schedule, DMDConfig(guidance=0.0))
    loss.backward()
    assert loss.item() == 0 and metrics["dmd_grad_norm"] == 0
    assert torch.equal(x0.grad, torch.zeros_like(x0))


def test_generator_gradient_is_the_normalised_score_difference(teacher, schedule, tiny):
    critic = tiny.teacher(seed=1)
    x0 = torch.randn(2, 12, 3, 8, 8, requires_grad=True)
    loss, metrics = dmd_generator_loss(x0, teacher, critic, torch.randn(1, 7, 32), torch.randn(1, 7, 32), schedule,
                                       DMDConfig(), torch.Generator().manual_seed(0))
    loss.backward()
    assert metrics["dmd_grad_norm"] > 0 and 20 <= metrics["timestep"] <= 980
    # d loss / d x0 = grad / numel, and the gradient stops at x0: nothing reaches the teacher or the critic.
    torch.testing.assert_close(x0.grad.norm().item() * x0.numel(), metrics["dmd_grad_norm"], rtol=1e-4, atol=0)
    assert all(p.grad is None for m in (teacher, critic) for p in m.parameters())
    with pytest.raises(ValueError, match="unconditional"):
        dmd_generator_loss(x0, teacher, critic, torch.randn(1, 7, 32), None, schedule, DMDConfig(guidance=3.0))


def test_a_nan_in_the_scores_reaches_the_loss_and_the_gradient(teacher, schedule, tiny):
    """A NaN guidance (or any NaN in the teacher's or critic's scores) makes the loss and x0's gradient NaN,
    so the update skips the step and counts it (distributed.engine.optimizer_step): nothing turns it into zeros."""
    critic = tiny.teacher(seed=1)
    x0 = torch.randn(2, 12, 3, 8, 8, requires_grad=True)
    text = torch.randn(1, 7, 32)
    loss, metrics = dmd_generator_loss(x0, teacher, critic, text, text, schedule, DMDConfig(guidance=float("nan")),
                                       torch.Generator().manual_seed(int(torch.randint(1 << 30, ()))))
    loss.backward()
    assert loss.isnan() and x0.grad.isnan().all() and metrics["dmd_grad_norm"] != metrics["dmd_grad_norm"]


def test_critic_steps_lower_the_critic_loss(tiny, schedule):
    critic = tiny.teacher(seed=1)
    cfg, text = DMDConfig(), torch.randn(4, 7, 32)
    x0 = 0.8 + 0.3 * torch.randn(4, 12, 3, 8, 8)

    def held_out_loss():
        with torch.no_grad():
            return sum(critic_loss(x0, critic, text, schedule, cfg, torch.Generator().manual_seed(s))[0] for s in range(8))

    before = held_out_loss()
    opt = torch.optim.Adam(critic.parameters(), lr=2e-3)
    for _ in range(30):
        loss, _ = critic_loss(x0, critic, text, schedule, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out_loss() < 0.8 * before


def test_generator_steps_every_update_ratio():
    assert [s for s in range(12) if is_generator_step(s, 5)] == [0, 5, 10]
    assert all(is_generator_step(s, 1) for s in range(4))
    with pytest.raises(ValueError):
        is_generator_step(0, 0)


def test_ema_copies_then_averages():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, start_step=2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=1)  # before start_step: a copy
    assert torch.equal(ema.shadow["weight"], torch.ones(2, 3))
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, step=2)
    torch.testing.assert_close(ema.shadow["weight"], torch.full((2, 3), 0.9 * 1 + 0.1 * 3))
    restored = EMA(nn.Linear(3, 2), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9 and restored.start_step == 2
    target = nn.Linear(3, 2)
    restored.copy_to(target)
    torch.testing.assert_close(target.weight, torch.full((2, 3), 1.2))
    with pytest.raises(KeyError):
        EMA(nn.Linear(3, 2, bias=False), 0.9).load_state_dict(ema.state_dict())


def test_ema_swapped_in_holds_the_average_inside_and_the_live_weights_after():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(torch.randn(2, 3))
    ema.update(model, step=1)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(ema.shadow["weight"], live["weight"])
    with ema.swapped_in(model) as inside:
        assert all(torch.equal(p, ema.shadow[k]) for k, p in inside.named_parameters())
    assert all(torch.equal(p, live[k]) for k, p in model.named_parameters())
    with pytest.raises(RuntimeError), ema.swapped_in(model):
        raise RuntimeError("a failed save")
    assert all(torch.equal(p, live[k]) for k, p in model.named_parameters())  # restored on failure too


def _partition(model: nn.Module, rank: int, ranks: int) -> None:
    """Each parameter's `ds_tensor` as ZeRO-3 lays it out: rank r holds a flat slice of the padded parameter."""
    for p in model.parameters():
        n = -(-p.numel() // ranks)
        padded = torch.nn.functional.pad(p.detach().flatten(), (0, n * ranks - p.numel()))
        p.ds_tensor = padded[rank * n:(rank + 1) * n].clone()


def test_partitioned_ema_averages_each_rank_slice_as_the_whole_average_would():
    ranks, model = 2, nn.Linear(5, 3)  # 15 and 3 values: the last slice of each is padded
    whole = EMA(model, decay=0.8, start_step=2)
    parts = []
    for r in range(ranks):
        _partition(model, r, ranks)
        parts.append(EMA(model, decay=0.8, start_step=2, partitioned=True))
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        whole.update(model, step)
        for r, ema in enumerate(parts):
            _partition(model, r, ranks)
            ema.update(model, step)
    for name, p in model.named_parameters():
        joined = torch.cat([ema.shadow[name] for ema in parts])[:p.numel()].view_as(p)
        torch.testing.assert_close(joined, whole.shadow[name])
    live = {k: v.clone() for k, v in model.state_dict().items()}
    parts[1].copy_to(model)  # writes rank 1's slices only; the gathered parameters are left alone
    assert all(torch.equal(p, live[k]) for k, p in model.named_parameters())
    assert all(torch.equal(p.ds_tensor, parts[1].shadow[k]) for k, p in model.named_parameters())
    with pytest.raises(ValueError, match="zero_stage"):
        EMA(model, 0.8).load_state_dict(parts[0].state_dict())
    _partition(model, 0, 1)  # one rank: slices the size of the whole parameter
    with pytest.raises(ValueError, match="as many ranks"):
        EMA(model, 0.8, partitioned=True).load_state_dict(parts[0].state_dict())


def _train_teacher_on_known_mean(teacher, text, mean, schedule, steps=60):
    """Brief flow matching on data around a per-channel mean: a teacher whose samples are recognisable."""
    opt = torch.optim.Adam(teacher.parameters(), lr=2e-3)
    for _ in range(steps):
        x0 = mean + 0.5 * torch.randn(8, 12, 3, 8, 8)
        noise, t = torch.randn_like(x0), torch.rand(8) * 1000
        flow = teacher(schedule.add_noise(x0, noise, t), t, text.expand(8, -1, -1), return_dict=False)[0]
        loss = (flow - schedule.flow_target(x0, noise)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher.requires_grad_(False)


def test_dmd_moves_student_samples_toward_the_teachers(tiny, schedule):
    torch.manual_seed(0)
    text = torch.randn(1, 7, 32)
    channel_mean = torch.linspace(-1, 1, 12).view(1, 12, 1, 1, 1)
    teacher = _train_teacher_on_known_mean(tiny.teacher(), text, channel_mean, schedule)
    eval_noise = torch.randn(16, 12, 3, 8, 8)
    teacher_samples, _ = euler_ode_sample(lambda x, t: teacher(x, t, text.expand(16, -1, -1), return_dict=False)[0],
                                          None, eval_noise, schedule.euler_sigmas(20, 5.0), 1.0)
    # The student starts from the teacher, pushed off by a shift of its output; the critic starts where the student is.
    student = tiny.student(teacher).requires_grad_(True)
    with torch.no_grad():
        student.proj_out.bias.add_(0.7 * torch.randn(student.proj_out.bias.shape))
    critic = tiny.teacher()
    critic.load_state_dict(student.state_dict())
    timesteps = schedule.student_timesteps(ScheduleConfig(denoising_steps=[1000, 500]))
    cfg = DMDConfig(guidance=0.0, update_ratio=1)

    def distance_to_teacher():
        with torch.no_grad():
            s = rollout(student, student.cross_attention_cache(text.expand(16, -1, -1)), eval_noise, timesteps,
                        schedule, generator=torch.Generator().manual_seed(1)).latents
        return (s.mean(dim=(0, 2, 3, 4)) - teacher_samples.mean(dim=(0, 2, 3, 4))).norm().item()

    def student_samples(exit_step=None):
        return rollout(student, student.cross_attention_cache(text.expand(8, -1, -1)), torch.randn(8, 12, 3, 8, 8),
                       timesteps, schedule, exit_step=exit_step).latents

    start = distance_to_teacher()
    gen_opt = torch.optim.Adam(student.parameters(), lr=1e-3, betas=(0.0, 0.999))
    critic_opt = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.0, 0.999))
    for step in range(30):
        with torch.no_grad():
            fresh = student_samples()
        loss, _ = critic_loss(fresh, critic, text, schedule, cfg)
        critic_opt.zero_grad()
        loss.backward()
        critic_opt.step()
        if is_generator_step(step, cfg.update_ratio):
            loss, _ = dmd_generator_loss(student_samples(exit_step=step % 2), teacher, critic, text, None, schedule, cfg)
            gen_opt.zero_grad()
            loss.backward()
            gen_opt.step()
    assert distance_to_teacher() < 0.5 * start


def test_flow_matching_under_bf16_autocast_matches_float32(tiny, schedule):
    """Teacher pretraining's autocast path: the same loss and gradient direction as float32, with the
    weights and their gradients left in float32 for the optimizer."""
    critic, cfg = tiny.teacher(seed=int(torch.randint(0, 1000, ()))), DMDConfig()
    text, x0 = torch.randn(4, 7, 32), 0.8 + 0.3 * torch.randn(4, 12, 3, 8, 8)

    def loss_and_grad(autocast: bool):
        critic.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss, _ = critic_loss(x0, critic, text, schedule, cfg, torch.Generator().manual_seed(0))
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in critic.parameters()])

    (exact, g32), (mixed, g16) = loss_and_grad(False), loss_and_grad(True)
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in critic.parameters())
    assert mixed != exact and mixed == pytest.approx(exact, rel=0.03)  # computed in bf16, to 3%
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99


@pytest.mark.parametrize("shift", [0.25, 3.0])
def test_training_timesteps_follow_the_shift_on_both_sides_of_one(schedule, shift):
    """A shift below 1 must draw more clean timesteps (it was once silently read as 1)."""
    seed = int(torch.randint(0, 2**31, ()))
    draw = lambda s: schedule.sample_training_timesteps(20000, 0, 1000, s, torch.Generator().manual_seed(seed))
    uniform, shifted = draw(1.0), draw(shift)
    assert abs(uniform.mean().item() - 500) < 15
    expected = 1000 * torch.tensor([shift * (k / 1000) / (1 + (shift - 1) * k / 1000) for k in range(1000)]).mean()
    assert abs(shifted.mean().item() - expected.item()) < 15
    assert (shifted.mean() < uniform.mean() - 100) if shift < 1 else (shifted.mean() > uniform.mean() + 100)
    with pytest.raises(ValueError, match="shift"):
        draw(0.0)


def test_weighted_critic_loss_is_the_weighted_mean_of_the_squared_errors(teacher, schedule):
    seed, cfg = int(torch.randint(0, 2**31, ())), DMDConfig()
    x0, text = torch.randn(2, 12, 3, 8, 8), torch.randn(2, 7, 32)
    with torch.no_grad():
        x_t, noise, t = _noised(x0, schedule, cfg, torch.Generator().manual_seed(seed))
        squared = (teacher(x_t, t, text, return_dict=False)[0] - schedule.flow_target(x0, noise)).square()
        loss = lambda weight: critic_loss(x0, teacher, text, schedule, cfg, torch.Generator().manual_seed(seed), weight)[0]
        torch.testing.assert_close(loss(None), squared.mean())
        torch.testing.assert_close(loss(torch.full((2, 1, 3, 8, 8), 3.0)), squared.mean())  # the scale is kept
        weight = torch.rand(2, 1, 3, 8, 8) * 4
        torch.testing.assert_close(loss(weight), (weight * squared).sum() / weight.expand_as(squared).sum())
        region = torch.zeros(2, 1, 3, 8, 8)
        region[1, :, :, 2:5, 3:7] = 1  # all weight on one region: the mean error there
        torch.testing.assert_close(loss(region), squared[1, :, :, 2:5, 3:7].mean())


def test_logit_normal_timesteps_gather_around_the_middle(schedule):
    seed = int(torch.randint(0, 2**31, ()))
    draw = lambda s, d: schedule.sample_training_timesteps(20000, 0, 1000, s, torch.Generator().manual_seed(seed),
                                                           distribution=d)
    middle = lambda t: ((t >= 250) & (t <= 750)).float().mean().item()
    uniform, logit_normal = draw(1.0, "uniform"), draw(1.0, "logit_normal")
    assert abs(middle(uniform) - 0.5) < 0.02
    assert abs(middle(logit_normal) - 0.728) < 0.02  # P(|z| <= logit(0.75)) for a standard normal z
    assert abs(logit_normal.median().item() - 500) < 15 and logit_normal.min() > 0 and logit_normal.max() < 1000
    assert draw(3.0, "logit_normal").median() > 700  # the shift applies after: 1000 * shift_sigma(0.5, 3) = 750
    with pytest.raises(ValueError, match="distribution"):
        draw(1.0, "normal")


def test_ema_split_over_ranks_averages_each_parameter_once_as_the_whole_average_would():
    """Below ZeRO-3 each rank averages the whole parameters it owns: together they are the whole average,
    each value kept on one rank, about 1/ranks of the values each; a whole saved average splits on load."""
    ranks, model = 3, nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(4, 2))
    whole = EMA(model, decay=0.7, start_step=2)
    parts = [EMA(model, decay=0.7, start_step=2, ranks=ranks, rank=r) for r in range(ranks)]
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        for ema in (whole, *parts):
            ema.update(model, step)
    names = [name for ema in parts for name in ema.shadow]
    assert sorted(names) == sorted(whole.shadow)  # each parameter on exactly one rank
    for ema in parts:
        assert all(torch.equal(v, whole.shadow[k]) for k, v in ema.shadow.items())
    sizes = [sum(v.numel() for v in ema.shadow.values()) for ema in parts]
    largest = max(p.numel() for p in model.parameters())
    assert max(sizes) - min(sizes) <= largest and sum(sizes) == sum(p.numel() for p in model.parameters())
    assert all(ema.split for ema in parts) and not whole.split

    restored = EMA(model, decay=0.1, ranks=ranks, rank=1)
    restored.load_state_dict(whole.state_dict())  # a whole average (one rank's checkpoint): this rank's part
    assert restored.shadow.keys() == parts[1].shadow.keys() and restored.decay == 0.7
    assert all(torch.equal(restored.shadow[k], parts[1].shadow[k]) for k in restored.shadow)
    with pytest.raises(ValueError, match="split over 3 ranks, this one over 2"):
        EMA(model, 0.7, ranks=2, rank=1).load_state_dict(parts[1].state_dict())
    with pytest.raises(ValueError, match="as many ranks"):
        EMA(model, 0.7).load_state_dict(parts[0].state_dict())
    with pytest.raises(KeyError, match="does not match"):
        EMA(nn.Linear(6, 8), 0.7, ranks=2, rank=0).load_state_dict(whole.state_dict())
    with pytest.raises(ValueError, match="rank must lie"):
        EMA(model, 0.7, ranks=2, rank=2)
