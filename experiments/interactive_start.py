"""Prompt switches and image starts in the sprite world, measured with the evaluation's metrics.

Switch: each of --pairs held-out scene pairs (A, B) streams --before teacher horizons under A, then switches to B
for --after horizons, with the self-attention cache kept and re-cached (rollout.switch_cache); the video after the
switch is scored segment by segment against real clips of B and compared with a fresh start under B (same noise
seed). Image start: the same B scenes start from their first rendered frame (a PNG-like still, one block) and from
their first rendered block (a clip); the first generated segment's sprite count, colour and composition errors
against the rendered scene, and its first block's pixel error against the scene's true continuation, beside a fresh
start. Everything streams through `VideoGenerator` (what `generate` runs); on CPU.

    python experiments/interactive_start.py --student weights/world_student [--pairs 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sfpp_ray.components import world_of
from sfpp_ray.config import load_config
from sfpp_ray.evaluation.evaluate import FrameList, block_starts
from sfpp_ray.evaluation.metrics import find_sprites, segment_metrics, summarise
from sfpp_ray.generate import VideoGenerator
from sfpp_ray.prompt_schedule import PromptSchedule
from sfpp_ray.seeding import seed_for
from sfpp_ray.world.sprites import prompt, render, sample_scenes

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("stability", "count_error", "colour_drift", "composition_error", "frechet", "flicker")
SHORT = {"composition_error": "composition", "colour_drift": "colour"}


def _stream(gen: VideoGenerator, prompts, nf: int, seeds, start=None) -> list[np.ndarray]:
    sinks = [FrameList() for _ in prompts]
    gen.stream_batch(prompts, nf, sinks, seeds, start=start)
    return [s.video() for s in sinks]


def _scores(videos, scenes, horizon: int, block_frames) -> dict:
    """Mean over videos of the first segment's metrics and of every segment's."""
    first, whole = [], []
    for video, scene in zip(videos, scenes):
        seg = segment_metrics(video, horizon, reference=render(scene, 0, 4 * horizon), block_frames=block_frames)
        first.append(seg[0])
        whole.append(summarise(seg))
    return {"first": {k: float(np.nanmean([m[k] for m in first])) for k in KEYS},
            "all": {k: float(np.nanmean([m[k] for m in whole])) for k in KEYS}}


def image_sprites(videos, images, frames: int) -> dict:
    """How far the first `frames` generated frames keep the start image's sprites: relative error of the sprite
    count per frame against the image's, and total-variation distance of the (colour, shape) mix to the image's."""
    count, mix = [], []
    for video, image in zip(videos, images):
        n0, k0 = (x[0] for x in find_sprites(np.stack([image, image])))  # it takes clips
        n, k = find_sprites(video[:frames])
        count.append(abs(n.mean() - n0) / max(n0, 1))
        k = k.sum(0)
        mix.append(0.5 * np.abs(k / max(k.sum(), 1) - k0 / max(k0.sum(), 1)).sum() if k.sum() and k0.sum() else
                   float(k.sum() != k0.sum()))
    return {"image_count_error": float(np.mean(count)), "image_mix_error": float(np.mean(mix))}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default=str(ROOT / "weights" / "world_student"))
    p.add_argument("--config", default=str(ROOT / "configs" / "world_gpu.yaml"))
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--before", type=int, default=2, help="teacher horizons under the first prompt")
    p.add_argument("--after", type=int, default=3, help="teacher horizons after the switch, and of each start")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1, help="torch threads (on a shared machine one runs steadiest)")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        with torch.no_grad():
            return measure(a)
    finally:
        torch.set_num_threads(threads)


def measure(a: argparse.Namespace) -> dict:
    student = Path(a.student)
    base = ["run.device=cpu", "rollout.decode_overlap=false"]
    if (student / "text_encoder" / "config.json").is_file():
        base += ["text.kind=umt5", f"text.path={student}"]
    t0 = time.perf_counter()
    gens = {mode: VideoGenerator(load_config(a.config, base + [f"rollout.switch_cache={mode}"] + a.overrides), str(student))
            for mode in ("keep", "recache")}
    gen = gens["recache"]
    cfg, fpb, T = gen.cfg, gen.cfg.student.frames_per_block, gen.cfg.video.teacher_frames
    horizon, codec = gen.codec.video_frames(T), gen.codec
    scenes = sample_scenes(a.seed, 2 * a.pairs, "heldout", world_of(cfg))
    first, second = scenes[0::2], scenes[1::2]
    seeds = [seed_for(a.seed, "switch", i) for i in range(a.pairs)]
    nb, na = a.before * T, a.after * T
    cut = codec.video_frames(nb)  # the switch's first decoded frame
    after_blocks = block_starts(codec, na, fpb)
    rows = {}
    for mode, g in gens.items():
        schedules = [PromptSchedule(prompt(s), ((nb / cfg.video.fps, prompt(b)),)) for s, b in zip(first, second)]
        videos = _stream(g, schedules, nb + na, seeds)
        rows[f"switch, {mode}"] = _scores([v[cut:] for v in videos], second, horizon, after_blocks)
    fresh = _stream(gen, [prompt(s) for s in second], na, seeds)
    rows["fresh start"] = _scores(fresh, second, horizon, after_blocks)

    # image starts: the scene's first frame as a one-block still, and its first block as a clip
    start_frames = codec.video_frames(fpb)
    truth = [render(s, 0, start_frames + horizon) for s in second]
    starts = {"image start (still)": [np.repeat(t[:1], start_frames, 0) for t in truth],
              "image start (clip)": [t[:start_frames] for t in truth]}
    block = [t[start_frames:2 * start_frames] for t in truth]
    mae = lambda vids: float(np.mean([np.abs(v[:start_frames] / 255.0 - b / 255.0).mean() for v, b in zip(vids, block)]))  # noqa: E731
    first_images = [t[0] for t in truth]
    sprites = lambda vids: {**image_sprites(vids, first_images, horizon),  # noqa: E731
                            **{f"{k}_block": v for k, v in image_sprites(vids, first_images, start_frames).items()}}
    image = {"fresh start": {**rows["fresh start"], "first_block_mae": mae(fresh), **sprites(fresh)}}
    for name, frames in starts.items():
        latents = torch.cat([gen.start_latents(f) for f in frames])
        videos = [v[start_frames:] for v in _stream(gen, [prompt(s) for s in second], na, seeds, start=latents)]
        image[name] = {**_scores(videos, second, horizon, after_blocks), "first_block_mae": mae(videos),
                       **sprites(videos)}

    named = student.resolve().relative_to(ROOT) if student.resolve().is_relative_to(ROOT) else student.name
    result = {"student": str(named),  # no machine's absolute path in a committed result "pairs": a.pairs, "before_horizons": a.before, "after_horizons": a.after,
              "horizon_frames": horizon, "seed": a.seed, "switch": rows, "image_start": image,
              "elapsed_s": time.perf_counter() - t0}
    print(f"prompt switch after {a.before}x T, {a.after}x T after it; {a.pairs} held-out pairs; segments of {horizon} "
          "frames scored against real clips of the new prompt's scene (first: the segment right after the switch)")
    head = "".join(f"{SHORT.get(k, k):>12}" for k in KEYS)
    print(f"{'':22}{'':6}{head}")
    for name, r in rows.items():
        for part in ("first", "all"):
            print(f"{name:22}{part:6}" + "".join(f"{r[part][k]:12.3f}" for k in KEYS))
    extra = ("first_block_mae", "image_count_error", "image_mix_error", "image_count_error_block",
             "image_mix_error_block")
    print(f"\nimage start: the first generated segment ({horizon} frames) against real clips of the scene; "
          "first_block_mae: its first block against the scene's true continuation (pixels in [0, 1]); image_count_error, "
          "image_mix_error: its sprites against the start image's (relative count error, colour-and-shape mix distance), "
          "over the segment and (_block) over its first block")
    print(f"{'':22}{head}" + "".join(f"{k:>24}" for k in extra))
    for name, r in image.items():
        print(f"{name:22}" + "".join(f"{r['first'][k]:12.3f}" for k in KEYS) + "".join(f"{r[k]:24.3f}" for k in extra))
    print(f"({result['elapsed_s']:.0f} s)")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
