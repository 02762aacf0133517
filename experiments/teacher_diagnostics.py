"""Where a pretrained world teacher falls short: its samples next to real clips, its clean-frame predictions
from real clips noised to several levels, its flow-matching loss per noise level against an untrained model,
and the same loss with each clip's own prompt, another clip's and none: how much the teacher uses its prompt.

    python experiments/teacher_diagnostics.py --run outputs/lh21 [--config configs/world_gpu.yaml] [key=value ...]

Writes teacher_diagnostics.png and teacher_diagnostics.json into --run; runs on the CPU in about a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_horizon import Setup, given_keys  # noqa: E402  (the experiment's shared set-up and its teacher sampler)

from sfpp_ray import components  # noqa: E402
from sfpp_ray.algorithm.ode_init import teacher_samples  # noqa: E402
from sfpp_ray.config import load_config  # noqa: E402
from sfpp_ray.video_io import to_uint8  # noqa: E402
from sfpp_ray.world.clips import world_latent_batch  # noqa: E402
from sfpp_ray.world.sprites import prompt, render, sample_scenes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIGMAS = (0.05, 0.3, 0.6, 0.8, 0.95)
EVERY = 5  # frames shown per clip: every EVERY-th
PROMPT_USE_CLIPS, PROMPT_USE_SEED = 16, 77  # training scenes the prompt-use losses are measured on


def strip(video: np.ndarray) -> np.ndarray:
    return np.concatenate(list(video[::EVERY]), axis=1)


def flow_error(s: Setup, model, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> float:
    """The flow-matching loss of `model` on clips x0 noised with eps to timesteps t."""
    x_t = s.schedule.add_noise(x0, eps, t)
    return float(((model(x_t, t, text, return_dict=False)[0] - s.schedule.flow_target(x0, eps)) ** 2).mean())


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="an experiments/long_horizon.py output directory with teacher/")
    p.add_argument("--config", default=str(ROOT / "configs" / "world_gpu.yaml"))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    run = Path(args.run)
    cfg = load_config(args.config, ["run.device=cpu", *args.overrides])
    torch.manual_seed(cfg.run.seed)
    s = Setup(cfg, run, given=given_keys(args.overrides))
    teacher = components.build_teacher(s.with_teacher())
    untrained = components.build_teacher(cfg)
    T = cfg.video.teacher_frames
    frames = s.codec.video_frames(T)

    # Samples from noise, with the sampler the sampler stage chose (cfg.ode without it).
    ode = s.teacher_sampler()
    scenes = sample_scenes(cfg.evaluation.seed, 2, "heldout", s.world)
    g = torch.Generator().manual_seed(cfg.run.seed)
    prompts = [prompt(sc) for sc in scenes]
    samples = teacher_samples(teacher, s.text.encode(prompts), s.uncond, s.noise(T, len(scenes), g), ode, s.schedule,
                              s.guide(ode, prompts), g)
    rows = []
    for scene, sample in zip(scenes, s.codec.decode(samples)):
        rows += [strip(to_uint8(sample)), strip(render(scene, 500, frames))]

    # Clean-frame predictions from real clips noised to each level, and the loss there.
    x0, text_real = world_latent_batch(scenes, frames, s.codec, s.text, np.random.default_rng(cfg.run.seed))
    eps = torch.randn(x0.shape, generator=g)
    losses = {}
    for sigma in SIGMAS:
        t = torch.full((x0.shape[0],), sigma * s.schedule.num_train_timesteps)
        x_t = s.schedule.add_noise(x0, eps, t)
        flow = teacher(x_t, t, text_real, return_dict=False)[0]  # also drawn below
        losses[sigma] = {"teacher": float(((flow - s.schedule.flow_target(x0, eps)) ** 2).mean()),
                         "untrained": flow_error(s, untrained, x0, eps, t, text_real)}
        if sigma > 0.1:
            rows.append(strip(to_uint8(s.codec.decode(s.schedule.x0_from_flow(x_t, flow, t))[0])))
        print(f"sigma {sigma:.2f}  flow-matching loss: teacher {losses[sigma]['teacher']:.4f}  "
              f"untrained {losses[sigma]['untrained']:.4f}")
    # How much the teacher uses its prompt: its loss on training clips with their own prompts, with
    # another clip's prompt and with none (the negative prompt).
    scenes = sample_scenes(cfg.run.seed + PROMPT_USE_SEED, PROMPT_USE_CLIPS, "train", s.world)
    x0, text_own = world_latent_batch(scenes, frames, s.codec, s.text, np.random.default_rng(cfg.run.seed))
    eps = torch.randn(x0.shape, generator=g)
    prompt_use = {}
    for sigma in SIGMAS:
        t = torch.full((x0.shape[0],), sigma * s.schedule.num_train_timesteps)
        prompt_use[sigma] = {name: flow_error(s, teacher, x0, eps, t, text) for name, text in
                             (("own", text_own), ("other", text_own.roll(1, 0)), ("none", s.uncond.expand_as(text_own)))}
        print(f"sigma {sigma:.2f}  loss with own prompt {prompt_use[sigma]['own']:.4f}  another clip's "
              f"{prompt_use[sigma]['other']:.4f}  none {prompt_use[sigma]['none']:.4f}")
    image = np.concatenate(rows, axis=0)
    cv2.imwrite(str(run / "teacher_diagnostics.png"),
                cv2.resize(image[..., ::-1], None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST))
    sampler = {"shift": ode.shift, "guidance": ode.guidance, "autoguidance": ode.autoguidance, "guide": ode.guide,
               "eta": ode.eta}
    result = {"sampler": sampler, "loss_by_sigma": losses,
              "loss_by_prompt": prompt_use,
              "rows": ["sample, prompt 1", "real, prompt 1", "sample, prompt 2", "real, prompt 2",
                       *(f"clean prediction of real prompt-1 clip at sigma {s}" for s in SIGMAS if s > 0.1)]}
    (run / "teacher_diagnostics.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
