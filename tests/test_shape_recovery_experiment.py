"""experiments/shape_recovery.py: noising to sigma 1 and sampling down is the teacher's sampler from noise,
sigma 0 is the clip itself, and intermediate levels take only the sampler's steps below them."""

from pathlib import Path

import pytest
import torch

from sfpp_ray import components
from sfpp_ray.algorithm.ode_init import Guide
from sfpp_ray.algorithm.schedule import FlowMatchSchedule, euler_ode_sample
from sfpp_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recovery(load_experiment):
    return load_experiment("shape_recovery")


def test_recovery_from_sigma_one_is_the_sampler_and_from_zero_the_clip(recovery):
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    teacher, text = components.build_teacher(cfg), components.build_text_encoder(cfg)
    cond, uncond = text.encode(["a red square", "two blue circles"]), text.encode([""])
    x0, noise = torch.randn(2, 12, 3, 8, 8), torch.randn(2, 12, 3, 8, 8)
    schedule = FlowMatchSchedule(1000, 5.0)
    grid = schedule.euler_sigmas(6, 3.0)
    flow = lambda c: (lambda x, t: teacher(x, t, c.expand(2, *c.shape[1:]), return_dict=False)[0])
    sampled, _ = euler_ode_sample(flow(cond), flow(uncond), noise, grid, 2.0)
    torch.testing.assert_close(recovery.recover(teacher, cond, uncond, x0, noise, 1.0, grid, 2.0, schedule), sampled)
    assert torch.equal(recovery.recover(teacher, cond, uncond, x0, noise, 0.0, grid, 2.0, schedule), x0)
    interval, _ = euler_ode_sample(flow(cond), flow(uncond), noise, grid, 2.0, guidance_interval=(0.5, 1.0))
    torch.testing.assert_close(recovery.recover(teacher, cond, uncond, x0, noise, 1.0, grid, 2.0, schedule, (0.5, 1.0)),
                               interval)  # the sampler's guidance interval is the eval's
    torch.manual_seed(1)
    guide = Guide(components.build_teacher(cfg), torch.randn_like(cond))  # another model, its own prompt embedding
    flow_g = lambda x, t: guide.model(x, t, guide.cond, return_dict=False)[0]
    autoguided, _ = euler_ode_sample(flow(cond), flow(uncond), noise, grid, 2.0, flow_guide=flow_g, autoguidance=2.5)
    torch.testing.assert_close(recovery.recover(teacher, cond, uncond, x0, noise, 1.0, grid, 2.0, schedule,
                                                guide=guide, autoguidance=2.5), autoguided)  # and its autoguidance
    assert not torch.allclose(autoguided, sampled, atol=1e-4)
    # from a level on the grid: the noised clip, then exactly the grid's remaining steps
    k = 3
    noised = (1 - grid[k]) * x0 + grid[k] * noise
    expected, _ = euler_ode_sample(flow(cond), flow(uncond), noised, grid[k:], 2.0)
    recovered = recovery.recover(teacher, cond, uncond, x0, noise, float(grid[k]), grid, 2.0, schedule)
    torch.testing.assert_close(recovered, expected)
    # the stochastic sampler (ode.eta) from sigma 1 is the eval's, fresh noise included
    stochastic, _ = euler_ode_sample(flow(cond), flow(uncond), noise, grid, 2.0, eta=0.5,
                                     generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(recovery.recover(teacher, cond, uncond, x0, noise, 1.0, grid, 2.0, schedule, eta=0.5,
                                                generator=torch.Generator().manual_seed(7)), stochastic)
    assert not torch.allclose(stochastic, sampled, atol=1e-4)
