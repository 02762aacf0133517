"""`sfpp-ray evaluate`: long student videos scored against the synthetic world's ground truth.

For each held-out prompt of the world, the student streams one video of the longest horizon asked
for (the same rollout `generate` runs); its first 1x, 5x, ... the teacher's horizon are the videos
of those lengths (a causal student's first frames do not depend on how long it goes on), each cut
into horizon-long segments and scored against real clips of the same scene. Prints a table, writes JSON, plots metrics over time and
logs everything to MLflow. With evaluation.long_stream, one more stream of that many horizons (the first
prompt) shows whether the student still makes a world at its end: its last segment is scored and checked
for collapse (blank or frozen frames).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sfpp_ray.algorithm.reward import flow_reward
from sfpp_ray.components import world_of
from sfpp_ray.config import Config
from sfpp_ray.evaluation.metrics import segment_metrics, summarise
from sfpp_ray.generate import VideoGenerator
from sfpp_ray.seeding import seed_for
from sfpp_ray.tracking import Tracker
from sfpp_ray.video_io import write_video
from sfpp_ray.world.sprites import prompt, render, sample_scenes

GIF_MAX_HORIZON = 10  # example gifs of longer videos would weigh megabytes; the long stream's last segment has its own
BLANK_STD = 4.0  # pixel levels: a frame whose pixels spread less than this shows no world (real clips: 40-60)
TABLE_KEYS = ("stability", "stability_last", "exposure_drift", "colour_drift", "count_error", "dynamic_degree",
              "flicker", "repetition", "frechet", "flow_reward")


class FrameList:
    def __init__(self):
        self.chunks: list[np.ndarray] = []

    def append(self, frames: np.ndarray) -> None:
        self.chunks.append(frames)

    def video(self) -> np.ndarray:
        return np.concatenate(self.chunks)


def block_starts(codec, num_latent_frames: int, frames_per_block: int) -> list[int]:
    """First decoded frame of every block (the Wan VAE's first block decodes to fewer frames)."""
    return [0] + [codec.video_frames(b) for b in range(frames_per_block, num_latent_frames, frames_per_block)]


def evaluate(cfg: Config, checkpoint: str | None = None, out_dir: str | Path | None = None, label: str = "student",
             tracker: Tracker | None = None) -> dict:
    gen = VideoGenerator(cfg, checkpoint)
    cfg = gen.cfg  # the checkpoint's saved layout, where it has one
    out = Path(out_dir or cfg.run_dir / "eval" / label)
    out.mkdir(parents=True, exist_ok=True)
    ev, fpb = cfg.evaluation, cfg.student.frames_per_block
    horizon = gen.codec.video_frames(cfg.video.teacher_frames)
    scenes = sample_scenes(ev.seed, ev.num_prompts, "heldout", world_of(cfg))
    rows, curves = [], {}
    longest = cfg.video.teacher_frames * max(ev.horizons)
    streams: list[FrameList] = []
    for first in range(0, len(scenes), ev.batch_size):  # each prompt's video is the one it streams alone
        batch = range(first, min(first + ev.batch_size, len(scenes)))
        sinks = [FrameList() for _ in batch]
        gen.stream_batch([prompt(scenes[i]) for i in batch], longest, sinks,
                         [seed_for(ev.seed, "evaluation", i) for i in batch])
        streams += sinks
    for i, (scene, frames) in enumerate(zip(scenes, streams)):
        reference = render(scene, 0, 4 * horizon)
        stream = frames.video()
        for mult in ev.horizons:
            nf = cfg.video.teacher_frames * mult
            video = stream[:gen.codec.video_frames(nf)]
            segments = segment_metrics(video, horizon, reference=reference, block_frames=block_starts(gen.codec, nf, fpb))
            # GRPO's own reward (grpo.reward, grpo.min_motion) on the whole video: what GRPO moved, if anything
            reward = flow_reward(video, cfg.grpo.min_motion, cfg.grpo.reward, cfg.grpo.raft_weights)
            rows.append({"prompt": prompt(scene), "horizon": mult, **summarise(segments), "flow_reward": reward})
            curves.setdefault(mult, []).append([s["stability"] for s in segments])
            if i == 0 and mult <= GIF_MAX_HORIZON:
                write_video(video, out / f"example_{mult}x.gif", cfg.video.fps)
    table = {}
    for mult in ev.horizons:
        sel = [r for r in rows if r["horizon"] == mult]
        table[mult] = {k: nanmean([r[k] for r in sel]) for k in TABLE_KEYS}
    result = {"label": label, "checkpoint": checkpoint, "horizon_frames": horizon, "table": table, "rows": rows,
              # the longest horizon's stability segment by segment, per prompt: stability over time
              "stability_by_segment": curves[max(ev.horizons)]}
    if ev.long_stream:
        result["long_stream"] = long_stream(gen, cfg, scenes[0], ev.long_stream, out)
    gifs = [out / f"example_{mult}x.gif" for mult in ev.horizons if mult <= GIF_MAX_HORIZON]
    gifs += [out / f"long_{ev.long_stream}x_last.gif"] if ev.long_stream else []
    result["outputs"] = {"metrics": str(out / "metrics.json"), "plot": str(out / "stability_over_time.png"),
                         "gifs": [str(f) for f in gifs]}
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
    plot = _plot(curves, horizon, cfg.video.fps, out / "stability_over_time.png", label)
    print(format_table(table, label))
    if ev.long_stream:
        ls = result["long_stream"]
        print(f"{label}: {ls['horizon']}x stream of {ls['video_frames']} frames, last segment stability "
              f"{ls['stability_last']:.1f}{', COLLAPSED' if ls['collapsed'] else ''}")
    print(f"{label}: wrote {out / 'metrics.json'}, {plot} and gifs {', '.join(f.name for f in gifs) or '(none)'} in {out}")
    if tracker is not None:
        for mult, metrics in table.items():
            tracker.log_metrics({f"eval/{label}/{k}_{mult}x": v for k, v in metrics.items()}, step=0)
        if ev.long_stream:
            last = result["long_stream"]
            tracker.log_metrics({f"eval/{label}/long_{ev.long_stream}x_{k}": float(last[k])
                                 for k in ("stability_last", "pixel_std", "change", "collapsed")}, step=0)
        for f in (out / "metrics.json", plot, *gifs):
            tracker.log_artifact(f, f"eval/{label}")
    return result


def long_stream(gen: VideoGenerator, cfg: Config, scene, mult: int, out: Path) -> dict:
    """Streams `scene`'s prompt for `mult` teacher horizons and scores the last horizon-long segment. Collapsed: a
    frame of the segment is blank (pixels spread less than BLANK_STD levels) or the segment does not change."""
    horizon = gen.codec.video_frames(cfg.video.teacher_frames)
    frames = FrameList()
    nf = cfg.video.teacher_frames * mult
    gen.stream(prompt(scene), nf, frames, seed=seed_for(cfg.evaluation.seed, "long_stream"))
    stream = frames.video()
    last, first = stream[-horizon:], len(stream) - horizon
    blocks = [b - first for b in block_starts(gen.codec, nf, cfg.student.frames_per_block)]  # the segment's own
    metrics = segment_metrics(last, horizon, reference=render(scene, 0, 4 * horizon), block_frames=blocks)[0]
    pixel_std = float(last.reshape(len(last), -1).std(axis=1).min())
    change = float(np.abs(np.diff(last.astype(np.int16), axis=0)).mean())
    write_video(last, out / f"long_{mult}x_last.gif", cfg.video.fps)
    return {"horizon": mult, "prompt": prompt(scene), "video_frames": len(stream), "stability_last": metrics["stability"],
            "last_segment": metrics, "pixel_std": pixel_std, "change": change,
            "collapsed": pixel_std < BLANK_STD or change == 0}


def nanmean(values: list[float]) -> float:
    """Mean of the defined values; NaN when none is (e.g. repetition of a one-segment video)."""
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _plot(curves: dict[int, list[list[float]]], horizon: int, fps: int, path: Path, label: str) -> Path:
    import matplotlib  # here, not at the top: training ranks import this module's neighbours, never a plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for mult, per_prompt in sorted(curves.items()):
        n = min(len(c) for c in per_prompt)
        mean = np.mean([c[:n] for c in per_prompt], axis=0)
        ax.plot((np.arange(n) + 0.5) * horizon / fps, mean, marker="o", ms=3, label=f"{mult}x horizon")
    ax.set(xlabel="time (s)", ylabel="stability (0-100)", title=f"{label}: stability per segment", ylim=(0, 100))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(table: dict[int, dict[str, float]], label: str) -> str:
    lines = [f"{label}: mean over held-out prompts", f"{'horizon':>8}" + "".join(f"{k:>15}" for k in TABLE_KEYS)]
    for mult, m in table.items():
        lines.append(f"{str(mult) + 'x':>8}" + "".join(f"{m[k]:>15.3f}" for k in TABLE_KEYS))
    return "\n".join(lines)
