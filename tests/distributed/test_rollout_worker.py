"""The rollout worker's batch: with rollout.switch_prob on, a rollout's conditioning changes at the sampled block."""

from pathlib import Path

import torch

from sfpp_ray import components
from sfpp_ray.config import load_config
from sfpp_ray.distributed.rollout_worker import switched_rollout

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


@torch.no_grad()
def test_a_sampled_switch_changes_the_conditioning_at_its_block():
    seed = int(torch.randint(0, 2**31, ()))
    runs = {}
    for p in (0.0, 1.0):
        cfg = load_config(TINY, ["rollout.batch_size=2", f"rollout.switch_prob={p}", f"model.init_seed={seed}"])
        student, text = components.build_student(cfg).eval(), components.build_text_encoder(cfg)
        schedule = components.build_schedule(cfg)
        noise = torch.randn(components.latent_shape(cfg, components.build_video_codec(cfg), 24, 2),
                            generator=torch.Generator().manual_seed(seed))
        prompts = ["two red squares bouncing", "a blue circle drifting on stripes"]
        runs[p] = switched_rollout(cfg, student, text, prompts, noise, schedule,
                                   schedule.student_timesteps(cfg.schedule), torch.Generator().manual_seed(1),
                                   torch.Generator().manual_seed(seed))
        if p == 0:
            encoded = text.encode(prompts)
    (plain, plain_cond, no_switch), (switched, cond, block) = runs[0.0], runs[1.0]
    assert no_switch == -1 and torch.equal(plain_cond, encoded)
    assert 1 <= block < 8
    s = 3 * block
    assert torch.equal(switched[:, :, :s], plain[:, :, :s])  # the same rollout up to the switch
    for i in range(2):  # from it on, each video follows the other's prompt
        assert (switched[i, :, s:s + 3] - plain[i, :, s:s + 3]).abs().max() > 1e-3
    assert torch.equal(cond, encoded.roll(-1, dims=0))  # the window is scored under the prompt the rollout ends with
