"""How far into the noise a world teacher keeps the sprites' shapes: held-out real clips noised to a level
sigma, then the teacher's own sampler from sigma to 0, scored as the eval stage scores samples. At sigma 0
the clip is the real one; at 1 it is the eval's own teacher sample (same scenes, noise and sampler). A
perfect teacher scores like the real clips at every level (its ODE carries the noised clips' distribution
to the clips'), so where the score falls tells at which noise levels the teacher loses the shapes; the
shape shares say what it draws instead.

    python experiments/shape_recovery.py --run outputs/w11 [--prompts 8] [--sigmas 0,0.2,0.4,0.6,0.8,1] [key=value ...]

Prints a table (last), writes shape_recovery.json and shape_recovery.png (frame 10 of the first clips:
real, then from each level) into --run (shape_recovery_even<N>.* with --even-steps N, ..._eta<e>.* under
the stochastic sampler: ode.eta=e, or the sampler stage's choice). The sampler is the sampler stage's choice
but for the ode keys given here. On the CPU by default (run.device=cuda to change).
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
from sfpp_ray.algorithm.ode_init import Guide, teacher_flow  # noqa: E402
from sfpp_ray.algorithm.schedule import FlowMatchSchedule, euler_ode_sample  # noqa: E402
from sfpp_ray.config import load_config  # noqa: E402
from sfpp_ray.evaluation.metrics import PALETTE, SHAPES, find_sprites, segment_metrics, summarise  # noqa: E402
from sfpp_ray.video_io import to_uint8  # noqa: E402
from sfpp_ray.world.clips import clip_latents  # noqa: E402
from sfpp_ray.world.sprites import prompt, render, sample_scenes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("stability", "composition_error", "count_error", "colour_drift", "frechet")
SHOWN_CLIPS, SHOWN_FRAME = 4, 10


@torch.no_grad()
def recover(teacher, cond, uncond, x0: torch.Tensor, noise: torch.Tensor, sigma: float, sigmas: torch.Tensor,
            guidance: float, schedule: FlowMatchSchedule, guidance_interval: tuple[float, float] = (0.0, 1.0),
            guide: Guide | None = None, autoguidance: float = 1.0, eta: float = 0.0,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """x0 noised to `sigma`, then the sampler's Euler steps below sigma (`sigmas`: its whole grid, 1 -> 0), with the
    sampler's guidance, its interval, its autoguidance (guide, weight) and its eta as the eval samples."""
    if sigma == 0:
        return x0
    t = torch.full((x0.shape[0],), sigma * schedule.num_train_timesteps, device=x0.device)
    x = schedule.add_noise(x0, noise, t)
    grid = torch.cat([torch.tensor([sigma]), sigmas[sigmas < sigma]])

    n = x0.shape[0]
    flow_uncond = None if uncond is None else teacher_flow(teacher, uncond, n)
    clean, _ = euler_ode_sample(teacher_flow(teacher, cond, n), flow_uncond, x, grid, guidance,
                                schedule.num_train_timesteps, guidance_interval=guidance_interval,
                                flow_guide=None if guide is None else teacher_flow(guide.model, guide.cond, n),
                                autoguidance=autoguidance, eta=eta, generator=generator)
    return clean


def shape_shares(videos: list[np.ndarray]) -> dict[str, float]:
    """The share of each shape among the palette-coloured sprites found in every frame of `videos`."""
    counts = np.zeros(len(SHAPES))
    for video in videos:
        kinds = find_sprites(video)[1].sum(0)
        counts += kinds.reshape(len(PALETTE), len(SHAPES)).sum(0)
    return {shape: float(c / max(counts.sum(), 1)) for shape, c in zip(SHAPES, counts)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="an experiments/long_horizon.py output directory with teacher/")
    p.add_argument("--config", default=str(ROOT / "configs" / "world_gpu.yaml"))
    p.add_argument("--prompts", type=int, default=8, help="held-out scenes (the evaluation seed's first ones)")
    p.add_argument("--sigmas", default="0,0.2,0.4,0.6,0.8,1")
    p.add_argument("--even-steps", type=int, default=0,
                   help="N > 0: N even Euler steps from each level instead of the sampler's own below it")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    sigmas = [float(v) for v in args.sigmas.split(",")]
    if any(not 0 <= v <= 1 for v in sigmas):
        raise SystemExit(f"--sigmas must lie in [0, 1], got {args.sigmas}")
    if args.even_steps < 0:
        raise SystemExit(f"--even-steps must be >= 0, got {args.even_steps}")
    run = Path(args.run)
    cfg = load_config(args.config, ["run.device=cpu", *args.overrides])
    s = Setup(cfg, run, given=given_keys(args.overrides))
    teacher = components.build_teacher(s.with_teacher(), s.device, s.dtype)
    ode, T = s.teacher_sampler(), cfg.video.teacher_frames
    name = ("shape_recovery" + (f"_even{args.even_steps}" if args.even_steps else "")
            + (f"_eta{ode.eta:g}" if ode.eta else ""))
    frames = s.codec.video_frames(T)
    scenes = sample_scenes(cfg.evaluation.seed, args.prompts, "heldout", s.world)
    rng = np.random.default_rng(cfg.evaluation.seed)
    real = np.stack([render(sc, int(rng.integers(4 * frames, 100 * frames)), frames) for sc in scenes])
    references = [render(sc, 0, 4 * frames) for sc in scenes]
    x0 = clip_latents(torch.from_numpy(real), s.codec, s.device, s.dtype)
    g = s.generator(4)
    noise = s.noise(T, len(scenes), g)  # as the eval draws the teacher's samples: sigma 1 is its row
    after_noise = g.get_state()  # every level's fresh noise (ode.eta > 0) starts where the eval's does
    prompts = [prompt(sc) for sc in scenes]
    cond, guide = s.text.encode(prompts), s.guide(ode, prompts)
    grid = s.schedule.euler_sigmas(ode.euler_steps, ode.shift)
    block = s.codec.video_frames(cfg.student.frames_per_block)
    rows, shown = [], [real[:SHOWN_CLIPS, min(SHOWN_FRAME, frames - 1)]]
    for sigma in sigmas:
        g.set_state(after_noise)
        if args.even_steps:  # N even levels below sigma (recover puts sigma in front)
            grid = torch.linspace(sigma, 0.0, args.even_steps + 1)[1:]
        clean = recover(teacher, cond, s.uncond, x0, noise, sigma, grid, ode.guidance, s.schedule,
                        tuple(ode.guidance_interval), guide, ode.autoguidance, ode.eta, g)
        videos = [to_uint8(v) for v in s.codec.decode(clean)]
        scores = [summarise(segment_metrics(v, frames, reference=r, block_frames=block))
                  for v, r in zip(videos, references)]
        rows.append({"sigma": sigma, "steps": int((grid < sigma).sum()) if sigma > 0 else 0,
                     **{k: float(np.nanmean([m[k] for m in scores])) for k in KEYS},
                     "shapes": shape_shares(videos)})
        shown.append(np.stack(videos)[:SHOWN_CLIPS, min(SHOWN_FRAME, frames - 1)])
    result = {"sampler": {"euler_steps": ode.euler_steps, "shift": ode.shift, "guidance": ode.guidance,
                          "eta": ode.eta, "even_steps": args.even_steps},
              "prompts": args.prompts, "real_shapes": shape_shares(list(real)), "rows": rows}
    (run / f"{name}.json").write_text(json.dumps(result, indent=2))
    image = np.concatenate([np.concatenate(list(r), axis=1) for r in shown], axis=0)
    cv2.imwrite(str(run / f"{name}.png"), cv2.resize(image[..., ::-1], None, fx=4, fy=4,
                                                           interpolation=cv2.INTER_NEAREST))
    shares = lambda d: " ".join(f"{d[k]:.2f}" for k in SHAPES)
    print(f"real clips: shapes ({' / '.join(SHAPES)}) {shares(result['real_shapes'])}; sampler {result['sampler']}")
    print(f"{'from sigma':>10}{'steps':>7}" + "".join(f"{k:>19}" for k in KEYS) + f"{'shapes':>18}")
    for r in rows:
        values = "".join(f"{r[k]:>19.3f}" for k in KEYS)
        print(f"{r['sigma']:>10.2f}{r['steps']:>7}{values}{shares(r['shapes']):>18}")
    return result


if __name__ == "__main__":
    main()
