"""Building components from the config: the autoguidance guide at its own shape."""

import dataclasses
from pathlib import Path

import torch

from sfpp_ray import components
from sfpp_ray.algorithm.ode_init import Guide, make_ode_trajectories
from sfpp_ray.config import load_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_a_smaller_guide_is_built_at_its_own_shape_and_steers_the_sampler(tmp_path):
    cfg = load_config(TINY)
    small = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=1, ffn_dim=16,
                                                               init_seed=int(torch.randint(1, 2**31, ()))))
    saved = components.build_teacher(small)
    saved.save_pretrained(tmp_path / "guide")
    guided = load_config(TINY, ["ode.autoguidance=2", f"ode.guide={tmp_path / 'guide'}"])
    guide, text = components.build_guide(guided)
    assert (guide.config.num_layers, guide.config.ffn_dim) == (1, 16) != (cfg.model.num_layers, cfg.model.ffn_dim)
    assert all(torch.equal(p, saved.state_dict()[k]) for k, p in guide.state_dict().items())
    assert components.build_guide(cfg) is None  # autoguidance off

    teacher, prompts = components.build_teacher(cfg), ["two red squares", "a blue circle"]
    noise, cond, uncond = torch.randn(2, 12, 6, 8, 8), text.encode(prompts), text.encode([cfg.text.negative_prompt])
    steps = torch.tensor([1000.0])
    steered = make_ode_trajectories(teacher, cond, uncond, noise, steps, guided.ode, components.build_schedule(cfg),
                                    Guide(guide, text.encode(prompts)))
    plain = make_ode_trajectories(teacher, cond, uncond, noise, steps, cfg.ode, components.build_schedule(cfg))
    assert steered.shape == plain.shape and not torch.allclose(steered, plain, atol=1e-4)
