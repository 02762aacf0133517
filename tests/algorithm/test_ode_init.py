"""ODE initialisation: teacher trajectories, the pair store, and block-causal regression."""

import dataclasses

import pytest
import torch

from sfpp_ray.algorithm.ode_init import (Guide, OdePairStore, fill_ode_store, make_ode_trajectories,
                                         ode_regression_inputs, ode_regression_loss, teacher_samples)
from sfpp_ray.algorithm.schedule import euler_ode_sample, nearest_indices
from sfpp_ray.config import ODEConfig


@pytest.fixture
def ode_cfg():
    return ODEConfig(euler_steps=12, shift=8.0, guidance=3.0)


def test_trajectories_follow_the_teachers_ode(teacher, schedule, timesteps, ode_cfg):
    cond, uncond = torch.randn(2, 7, 32), torch.randn(1, 7, 32)
    noise = torch.randn(2, 12, 6, 8, 8)
    traj = make_ode_trajectories(teacher, cond, uncond, noise, timesteps, ode_cfg, schedule)
    assert traj.shape == (2, len(timesteps) + 1, 12, 6, 8, 8)
    assert torch.equal(traj[:, 0], noise)  # the first student step is t = 1000: the ODE's start
    sigmas = schedule.euler_sigmas(ode_cfg.euler_steps, ode_cfg.shift)
    for k, i in enumerate(nearest_indices(sigmas, timesteps)):
        assert abs(sigmas[i].item() * 1000 - timesteps[k].item()) < 1000 / ode_cfg.euler_steps
    clean, _ = euler_ode_sample(lambda x, t: teacher(x, t, cond, return_dict=False)[0],
                                lambda x, t: teacher(x, t, uncond.expand(2, -1, -1), return_dict=False)[0],
                                noise, sigmas, ode_cfg.guidance)
    torch.testing.assert_close(traj[:, -1], clean)
    # Along the path the states approach the clean end.
    dist = [(traj[:, k] - clean).norm().item() for k in range(len(timesteps))]
    assert dist == sorted(dist, reverse=True)


def test_guidance_applies_only_within_its_noise_levels(teacher, schedule, ode_cfg):
    """Guidance on [low, high] is the guided sampler down to `low`, then the unguided one from there on."""
    cond, uncond, noise = torch.randn(2, 7, 32), torch.randn(1, 7, 32), torch.randn(2, 12, 6, 8, 8)
    flow_c = lambda x, t: teacher(x, t, cond, return_dict=False)[0]
    flow_u = lambda x, t: teacher(x, t, uncond.expand(2, -1, -1), return_dict=False)[0]
    sigmas = schedule.euler_sigmas(ode_cfg.euler_steps, ode_cfg.shift)
    low = float(sigmas[5] + sigmas[6]) / 2  # between grid levels 5 and 6: levels 0-5 guided
    sample = lambda x, grid, **kw: euler_ode_sample(flow_c, flow_u, x, grid, ode_cfg.guidance, **kw)[0]
    interval = sample(noise, sigmas, guidance_interval=(low, 1.0))
    guided_part = sample(noise, sigmas[:7])
    expected = euler_ode_sample(flow_c, flow_u, guided_part, sigmas[6:], 1.0)[0]
    torch.testing.assert_close(interval, expected)
    assert not torch.allclose(interval, sample(noise, sigmas))  # (guidance all the way differs)
    torch.testing.assert_close(sample(noise, sigmas, guidance_interval=(0.0, 1.0)), sample(noise, sigmas))
    traj = make_ode_trajectories(teacher, cond, uncond, noise, torch.tensor([1000.0]),
                                 dataclasses.replace(ode_cfg, guidance_interval=[low, 1.0]), schedule)
    torch.testing.assert_close(traj[:, -1], interval)  # the config's interval reaches the sampler


def test_autoguidance_extrapolates_the_teacher_away_from_its_guide(teacher, tiny, schedule, ode_cfg):
    """Without classifier-free guidance, autoguidance w samples the flow guide + w (teacher - guide) (Karras et
    al., 2024); a guide equal to the teacher, or w = 1, changes nothing; with CFG the term adds to the guided flow."""
    guide = tiny.teacher(seed=1).requires_grad_(False)
    cond, uncond, noise = torch.randn(2, 7, 32), torch.randn(1, 7, 32), torch.randn(2, 12, 6, 8, 8)
    guide_cond = torch.randn(2, 7, 32)  # the guide's own text encoder embeds the prompts differently
    flow_c = lambda x, t: teacher(x, t, cond, return_dict=False)[0]
    flow_u = lambda x, t: teacher(x, t, uncond.expand(2, -1, -1), return_dict=False)[0]
    flow_g = lambda x, t: guide(x, t, guide_cond, return_dict=False)[0]
    sigmas = schedule.euler_sigmas(ode_cfg.euler_steps, ode_cfg.shift)
    w = 1.0 + torch.rand(()).item() * 2
    extrapolated = lambda x, t: flow_g(x, t) + w * (flow_c(x, t) - flow_g(x, t))
    auto = euler_ode_sample(flow_c, None, noise, sigmas, 1.0, flow_guide=flow_g, autoguidance=w)[0]
    torch.testing.assert_close(auto, euler_ode_sample(extrapolated, None, noise, sigmas, 1.0)[0])
    plain = euler_ode_sample(flow_c, None, noise, sigmas, 1.0)[0]
    assert not torch.allclose(auto, plain, atol=1e-3)
    torch.testing.assert_close(euler_ode_sample(flow_c, None, noise, sigmas, 1.0, flow_guide=flow_c, autoguidance=w)[0],
                               plain)
    torch.testing.assert_close(euler_ode_sample(flow_c, None, noise, sigmas, 1.0, flow_guide=flow_g)[0], plain)

    cfg_flow = lambda x, t: flow_u(x, t) + ode_cfg.guidance * (flow_c(x, t) - flow_u(x, t))
    both = lambda x, t: cfg_flow(x, t) + (w - 1) * (flow_c(x, t) - flow_g(x, t))
    traj = make_ode_trajectories(teacher, cond, uncond, noise, torch.tensor([1000.0]),
                                 dataclasses.replace(ode_cfg, autoguidance=w), schedule, Guide(guide, guide_cond))
    torch.testing.assert_close(traj[:, -1], euler_ode_sample(both, None, noise, sigmas, 1.0)[0])
    with pytest.raises(ValueError, match="guide"):
        make_ode_trajectories(teacher, cond, uncond, noise, torch.tensor([1000.0]),
                              dataclasses.replace(ode_cfg, autoguidance=w), schedule)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_stochastic_sampler_keeps_the_datas_distribution(schedule, eta):
    """With the exact flow of Gaussian data every eta samples that Gaussian, as the steps grow (eta = 1 is
    ancestral sampling); a wrong share of fresh noise would widen or narrow it."""
    mu, s0 = torch.rand(()).item() - 0.5, 0.2 + 0.4 * torch.rand(()).item()

    def exact_flow(x, t):  # E[noise | x] - E[x0 | x] for x = (1 - sigma) x0 + sigma noise, x0 ~ N(mu, s0^2)
        sigma = float(t[0]) / 1000
        r = (x - (1 - sigma) * mu) / ((1 - sigma) ** 2 * s0**2 + sigma**2)
        return sigma * r - mu - (1 - sigma) * s0**2 * r

    noise = torch.randn(50_000)
    x = euler_ode_sample(exact_flow, None, noise, schedule.euler_sigmas(1000, 1.0), 1.0, eta=eta,
                         generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))[0]
    assert abs(x.mean().item() - mu) < 0.015 and abs(x.std().item() / s0 - 1) < 0.02  # a fixed share per step: -4%
    few = euler_ode_sample(exact_flow, None, noise[:100], schedule.euler_sigmas(8, 1.0), 1.0, eta=eta,
                           generator=torch.Generator().manual_seed(1))[0]
    again = euler_ode_sample(exact_flow, None, noise[:100], schedule.euler_sigmas(8, 1.0), 1.0, eta=eta,
                             generator=torch.Generator().manual_seed(1))[0]
    other = euler_ode_sample(exact_flow, None, noise[:100], schedule.euler_sigmas(8, 1.0), 1.0, eta=eta,
                             generator=torch.Generator().manual_seed(2))[0]
    assert torch.equal(few, again) and torch.equal(few, other) == (eta == 0)  # fresh noise only with eta > 0
    end, states = euler_ode_sample(exact_flow, None, noise[:100], schedule.euler_sigmas(8, 1.0), 1.0, keep_at=[0, 4],
                                   eta=eta, generator=torch.Generator().manual_seed(1))
    assert torch.equal(end, few) and torch.equal(states[0], noise[:100])  # the states along the way as well


def test_teacher_samples_use_eta_and_ode_pairs_never_do(teacher, schedule, timesteps, ode_cfg):
    cond, uncond, noise = torch.randn(2, 7, 32), torch.randn(1, 7, 32), torch.randn(2, 12, 6, 8, 8)
    stochastic = dataclasses.replace(ode_cfg, eta=0.5)
    pairs = make_ode_trajectories(teacher, cond, uncond, noise, timesteps, ode_cfg, schedule)
    torch.testing.assert_close(make_ode_trajectories(teacher, cond, uncond, noise, timesteps, stochastic, schedule),
                               pairs)
    torch.testing.assert_close(teacher_samples(teacher, cond, uncond, noise, ode_cfg, schedule), pairs[:, -1])
    sampled = teacher_samples(teacher, cond, uncond, noise, stochastic, schedule,
                              generator=torch.Generator().manual_seed(3))
    expected = euler_ode_sample(lambda x, t: teacher(x, t, cond, return_dict=False)[0],
                                lambda x, t: teacher(x, t, uncond.expand(2, -1, -1), return_dict=False)[0], noise,
                                schedule.euler_sigmas(ode_cfg.euler_steps, ode_cfg.shift), ode_cfg.guidance, eta=0.5,
                                generator=torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(sampled, expected)
    assert not torch.allclose(sampled, pairs[:, -1], atol=1e-3)


def test_pair_store_round_trip_and_reuse(tmp_path):
    made = []

    def make_shard(n):
        made.append(n)
        return torch.randn(n, 3, 12, 3, 4, 4), [f"prompt {len(made)}.{i}" for i in range(n)]

    store = OdePairStore(tmp_path, meta={"timesteps": [1000.0, 937.5]})
    assert fill_ode_store(store, 5, make_shard, shard_size=2) == 5 and made == [2, 2, 1]
    assert len(store) == 5 and store.complete(5) and not store.complete(6)

    reopened = OdePairStore(tmp_path, meta={"timesteps": [1000.0, 937.5]})
    assert fill_ode_store(reopened, 5, make_shard, shard_size=2) == 0 and made == [2, 2, 1]  # made once, reused
    pairs = list(reopened)
    assert [p for _, p in pairs] == ["prompt 1.0", "prompt 1.1", "prompt 2.0", "prompt 2.1", "prompt 3.0"]
    traj, prompt = reopened.load(3)
    assert traj.shape == (3, 12, 3, 4, 4) and prompt == "prompt 2.1"
    torch.testing.assert_close(traj, pairs[3][0])
    with pytest.raises(IndexError):
        reopened.load(5)
    with pytest.raises(ValueError, match="made with"):
        OdePairStore(tmp_path, meta={"timesteps": [1000.0]})
    with pytest.raises(ValueError, match="prompts"):
        store.write_shard(torch.randn(2, 3, 12, 3, 4, 4), ["only one"])


def test_regression_inputs_put_each_block_at_one_step(timesteps):
    B, K, F = 4, len(timesteps), 12
    # State k of the trajectory is filled with the value k, so the input reveals which step each frame took.
    traj = torch.arange(K + 1.0).view(1, K + 1, 1, 1, 1, 1).expand(B, K + 1, 2, F, 2, 2).contiguous()
    x, t = ode_regression_inputs(traj, timesteps, 3, torch.Generator().manual_seed(0))
    step = x[:, 0, :, 0, 0].long()  # (B, F)
    assert t.shape == (B, F) and torch.equal(t, timesteps[step])
    blocks = step.view(B, F // 3, 3)
    assert (blocks == blocks[..., :1]).all() and (step < K).all()
    assert len(blocks[..., 0].unique()) > 1  # blocks are drawn independently
    with pytest.raises(ValueError):
        ode_regression_inputs(traj[:, :-1], timesteps, 3)


def test_regression_trains_the_student(teacher, student, schedule, timesteps, ode_cfg):
    text = torch.randn(2, 7, 32)
    traj = make_ode_trajectories(teacher, text, None, torch.randn(2, 12, 6, 8, 8), timesteps, ode_cfg, schedule)

    def held_out_loss():
        with torch.no_grad():
            return sum(ode_regression_loss(student, traj, timesteps, text, schedule, torch.Generator().manual_seed(s))
                       for s in range(4))

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        via_cache = ode_regression_loss(student, traj, timesteps, student.cross_attention_cache(text), schedule, g)
    torch.testing.assert_close(via_cache, ode_regression_loss(student, traj, timesteps, text, schedule,
                                                              torch.Generator().manual_seed(0)).detach())
    before = held_out_loss()
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    for _ in range(30):
        loss = ode_regression_loss(student, traj, timesteps, text, schedule)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out_loss() < 0.7 * before
