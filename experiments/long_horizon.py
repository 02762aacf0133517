"""The paper's long-horizon comparison at small scale, in a world whose truth is known, trained by the product.

Every training stage is `sfpp-ray train` (sfpp_ray.distributed.controller.train) with config overrides, and prints
that command line: a row of the table is remade with the printed command, without this script. The script only
picks the overrides, samples the teacher for the sampler sweep and scores the students.

Stages (each skipped when its output is finished, so an interrupted run resumes):
  teacher     the pretrain_teacher stage, run directory --out: out/teacher (skipped with --teacher DIR, a trained
              teacher such as the shipped weights/world_teacher)
  sampler     the teacher's samples scored on validation scenes for each ODE sampler setting in
              SAMPLER_SWEEP (shift x guidance), then autoguidance and the stochastic sampler at the best;
              once it has run, the ODE pairs and the teacher's reference samples use its best setting
              instead of the config's (the ODE pairs stay deterministic: they ignore ode.eta)
  ode         the ode stage from the teacher, run directory --out: out/student_ode
  <variants>  the dmd stage from out/student_ode, each variant and training seed (--seeds) in its own run
              directory out/<variant>/seed<k> (its student in student/), with the overrides of variant_overrides:
                sf           Self-Forcing: rollout = training window = attention window = T, no rolling cache
                sfpp         Self-Forcing++: N-frame rolling-cache rollouts, backward-noised T-frame windows
                sfpp_nobn    sfpp, windows re-generated from pure noise
                sfpp_nocache sfpp, windows re-generated without the rollout's frames before them
                sfpp_w<n>    sfpp with an n-frame attention (KV cache) window (default: 9 and 15, the paper's
                             ablation, where shorter than the configured window)
                sfpp_grpo    the grpo stage from sfpp's student of the same seed (student_grpo/)
  eval        real clips, teacher samples (1x T) and every variant and seed at cfg.evaluation.horizons, scored
              against real clips (sfpp-ray evaluate's function); a table of the mean and spread over seeds is
              printed and written to results.json

The teacher and the ODE student are trained once, with the config's run.seed. On a GPU each variant's trainer and
rollout workers share it (trainer.gpus_per_worker, rollout.gpus_per_worker: GPU_SHARES), unless given.

    python experiments/long_horizon.py --out runs/long_horizon [--stages teacher,ode,sf,sfpp,eval] [--seeds 0,1,2] \
        [--teacher weights/world_teacher] [key=value ...]

A variant stage may name its own seeds after '@' ('+' between them): `--stages sf,sfpp,sfpp_nobn@0 --seeds 0,1,2`
trains the ablation once and the others three times, all in one parallel schedule.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from sfpp_ray import components
from sfpp_ray.algorithm.ode_init import Guide, teacher_samples
from sfpp_ray.algorithm.reward import flow_reward
from sfpp_ray.components import world_of
from sfpp_ray.config import Config, ConfigError, load_config, saved_guides, with_teacher
from sfpp_ray.evaluation.evaluate import evaluate, nanmean
from sfpp_ray.evaluation.metrics import segment_metrics, summarise
from sfpp_ray.video_io import to_uint8
from sfpp_ray.world.sprites import prompt, render, sample_scenes

ROOT = Path(__file__).resolve().parents[1]
DONE = "stage.json"  # written last: a stage whose directory lacks it did not finish (the product's marker too)
TABLE_KEYS = ("stability", "exposure_drift", "dynamic_degree", "flicker", "frechet", "flow_reward")


# ---------------------------------------------------------------- setup


class Setup:
    """What the stages run here share (the sampler sweep, the reference rows; experiments/teacher_sampler.py and
    others): config, device, text encoder, codec, schedule and the negative prompt."""

    def __init__(self, cfg: Config, out: Path, teacher: Path | None = None, given: Iterable[str] = ()):
        """`teacher`: another teacher directory to stand in for out/teacher (a saved guide, a teacher of
        another run); it is taken as finished. `given`: the keys set on the command line (given_keys), which
        the sampler stage's choice does not override."""
        self.cfg, self.out, self.given = cfg, out, set(given)
        self.teacher_dir = teacher or out / "teacher"
        self.device, self.dtype = components.resolve_device(cfg), components.resolve_dtype(cfg)
        # the teacher's own text encoder once it has one (teacher_pretrain.train_text_encoder)
        text_cfg = self.with_teacher() if teacher or finished(self.teacher_dir) else cfg
        self.text = components.build_text_encoder(text_cfg, self.device, self.dtype)
        self.codec = components.build_video_codec(cfg, self.device, self.dtype)
        self.schedule = components.build_schedule(cfg)
        self.uncond = self.text.encode([cfg.text.negative_prompt])
        self.world = world_of(cfg)
        self._guides: dict[str, tuple] = {}  # ode.guide -> (model, text encoder), loaded on first use

    def with_teacher(self, cfg: Config | None = None) -> Config:
        """A copy of the config whose model weights (and text encoder, if trained with it) are the teacher's."""
        return with_teacher(cfg or self.cfg, self.teacher_dir)

    def teacher_sampler(self):
        """cfg.ode with the sampler stage's best setting once that stage has run, but for the ode keys given on
        the command line."""
        if not finished(self.out / "sampler"):
            return self.cfg.ode
        best = json.loads((self.out / "sampler" / DONE).read_text())["best"]
        return dataclasses.replace(self.cfg.ode, **{k: v for k, v in best.items() if f"ode.{k}" not in self.given})

    def guide(self, ode, prompts: list[str]) -> Guide | None:
        """The autoguidance guide of the sampler `ode` with the prompts embedded by its own text encoder; None when
        off. Each guide is loaded once (the ODE stage asks for it every shard)."""
        if ode.guide is None or ode.autoguidance == 1:
            return None
        if ode.guide not in self._guides:
            self._guides[ode.guide] = components.build_guide(dataclasses.replace(self.cfg, ode=ode), self.device,
                                                             self.dtype)
        model, text = self._guides[ode.guide]
        return Guide(model, text.encode(prompts))

    def generator(self, offset: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(self.cfg.run.seed * 1000 + offset)

    def noise(self, num_frames: int, batch: int, g: torch.Generator) -> torch.Tensor:
        shape = components.latent_shape(self.cfg, self.codec, num_frames, batch)
        return torch.randn(shape, generator=g, device=self.device, dtype=self.dtype)


def finished(path: Path) -> bool:
    return (path / DONE).is_file()


def mark_done(path: Path, record: dict) -> dict:
    path.mkdir(parents=True, exist_ok=True)
    (path / DONE).write_text(json.dumps(record, indent=2, default=float))
    return record


def record_seconds(out: Path, label: str, seconds: float) -> None:
    """out/seconds.json: how long each stage run here took (results.json's "stages")."""
    path = out / "seconds.json"
    path.write_text(json.dumps({**(json.loads(path.read_text()) if path.is_file() else {}), label: seconds}, indent=2))


# ---------------------------------------------------------------- training: `sfpp-ray train` with overrides


class Command:
    """`sfpp-ray train --config <config> <overrides>`, the run's command line, which every training stage extends
    with its own overrides (later ones win)."""

    def __init__(self, config: str, overrides: list[str]):
        self.config, self.overrides = config, list(overrides)

    def config_for(self, stage: list[str]) -> Config:
        return load_config(self.config, [*self.overrides, *stage])

    def line(self, stage: list[str]) -> str:
        config = os.path.relpath(self.config)
        return "sfpp-ray train " + shlex.join(["--config", self.config if config.startswith("..") else config,
                                               *self.overrides, *stage])

    def train(self, out: Path, label: str, stage: list[str]) -> dict:
        """Prints the command line, then runs it here. Ray is joined when initialised, else started for this stage
        and stopped after it: the controller sizes a local cluster for the stages it runs."""
        import ray

        from sfpp_ray.distributed.controller import train

        print(f"[{label}] {self.line(stage)}", flush=True)
        cfg, t0, started_here = self.config_for(stage), time.perf_counter(), not ray.is_initialized()
        try:
            summary = train(cfg)
        finally:
            if started_here:
                ray.shutdown()
        record_seconds(out, label, time.perf_counter() - t0)
        return summary


def value_text(value) -> str:
    """A config value as an override writes it (YAML reads it back)."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def changes(cfg: Config, wanted: dict, given: Iterable[str] = ()) -> list[str]:
    """Overrides for the dotted keys of `wanted` whose value cfg does not have yet, but for the `given` ones."""
    flat = cfg.flat()
    return [f"{k}={value_text(v)}" for k, v in wanted.items() if flat[k] != v and k not in given]


def teacher_overrides(cfg: Config, teacher_dir: Path) -> list[str]:
    """with_teacher's changes (the teacher's weights, its own text encoder where it has one) as overrides."""
    return changes(cfg, with_teacher(cfg, teacher_dir).flat())


def run_keys(run_dir: Path, stage: str) -> list[str]:
    """The run directory a training stage writes into and the one controller stage it runs."""
    return [f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}", f"run.stages=[{stage}]"]


def whole_gpu(s: Setup) -> list[str]:
    """The teacher and ODE stages, which run alone: their ranks hold a whole GPU each (CPU ranks without one)."""
    return changes(s.cfg, {"trainer.gpus_per_worker": 1.0 if s.device.type == "cuda" else 0.0})


GPU_SHARES = {"trainer": 0.5, "rollout": 0.5}  # of the one GPU a variant's trainer ranks and rollout workers share


def gpu_overrides(cfg: Config, cuda: bool, given: Iterable[str] = (), gpu: float = 1.0) -> list[str]:
    """A variant's GPU requests: on a GPU each role's share of GPU_SHARES of `gpu` GPUs split over its workers
    (rounded down to Ray's precision of 1e-4), so the run asks for at most `gpu`; CPU ranks and workers otherwise.
    Keys given on the command line stay as given."""
    workers = {"trainer": cfg.trainer.num_workers, "rollout": cfg.rollout.num_workers}
    return changes(cfg, {f"{role}.gpus_per_worker": math.floor(gpu * share / workers[role] * 1e4) / 1e4 if cuda else 0.0
                         for role, share in GPU_SHARES.items()}, given)


def variant_overrides(cfg: Config, name: str) -> list[str]:
    """What a variant sets on top of the config, as `sfpp-ray train` overrides (T: the teacher's horizon)."""
    T = cfg.video.teacher_frames
    sfpp = [f"data.window_frames={T}"]  # rollouts of rollout.num_frames, backward noise, rolling cache
    if name == "sf":  # N = T, no rolling cache in training
        return [f"rollout.num_frames={T}", f"student.window_frames={T}", *sfpp, "data.backward_noise=false",
                "data.training_rolling_cache=false"]
    if name in ("sfpp", "sfpp_grpo"):
        return sfpp
    if name == "sfpp_nobn":
        return [*sfpp, "data.backward_noise=false"]
    if name == "sfpp_nocache":
        return [*sfpp, "data.training_rolling_cache=false"]
    if m := re.fullmatch(r"sfpp_w(\d+)", name):
        return [*sfpp, f"student.window_frames={int(m.group(1))}"]
    raise ValueError(f"unknown variant {name!r} (known: sf, sfpp, sfpp_nobn, sfpp_nocache, sfpp_w<n>, sfpp_grpo)")


ABLATION_WINDOWS = (9, 15)  # latent frames: the paper's cache-window ablation against the full 21


def default_variants(cfg: Config) -> list[str]:
    """sf, sfpp, sfpp_nobn, sfpp_nocache, the ablation's cache windows that fit (whole blocks, shorter than the
    configured one), sfpp_grpo."""
    w, fpb = cfg.student.window_frames, cfg.student.frames_per_block
    windows = [n for n in ABLATION_WINDOWS if n < w and n % fpb == 0]
    return ["sf", "sfpp", "sfpp_nobn", "sfpp_nocache", *(f"sfpp_w{n}" for n in windows), "sfpp_grpo"]


def variant_dir(out: Path, name: str, seed: int) -> Path:
    return out / name / f"seed{seed}"


def student_of(out: Path, name: str, seed: int) -> Path:
    """Where the controller saves a variant's student: student/ (the dmd stage), student_grpo/ (grpo)."""
    return variant_dir(out, name, seed) / ("student_grpo" if name == "sfpp_grpo" else "student")


def variant_run(s: Setup, name: str, seed: int, gpu: float = 1.0) -> list[str]:
    """All a variant adds to the command line: its overrides, then its run directory and stage, training seed,
    teacher, first student (the ODE student; sfpp's of the same seed for sfpp_grpo) and GPU shares (of `gpu` GPUs:
    less when runs share one)."""
    grpo = name == "sfpp_grpo"
    start = student_of(s.out, "sfpp", seed) if grpo else s.out / "student_ode"
    return [*variant_overrides(s.cfg, name), *run_keys(variant_dir(s.out, name, seed), "grpo" if grpo else "dmd"),
            f"run.seed={seed}", *teacher_overrides(s.cfg, s.teacher_dir), f"student.checkpoint={start}",
            *gpu_overrides(s.cfg, s.device.type == "cuda", s.given, gpu)]


def trained(student: Path, cfg: Config) -> bool:
    """The controller's rule: finished, a DMD student only up to the dmd.steps it reached (more steps go on from its
    last checkpoint)."""
    return finished(student) and (student.name != "student"
                                  or json.loads((student / DONE).read_text())["steps"] >= cfg.dmd.steps)


def train_teacher(s: Setup, cmd: Command) -> dict:
    """The pretrain_teacher stage with --out as its run directory: out/teacher."""
    return cmd.train(s.out, "teacher", [*run_keys(s.out, "pretrain_teacher"), *whole_gpu(s)])


def train_ode(s: Setup, cmd: Command) -> dict:
    """The ode stage from the teacher with --out as its run directory (out/student_ode, the pairs in out/ode_pairs),
    its pairs drawn with the sampler stage's choice once that has run (Setup.teacher_sampler)."""
    sampler = {f"ode.{k}": v for k, v in dataclasses.asdict(s.teacher_sampler()).items()}
    return cmd.train(s.out, "ode", [*run_keys(s.out, "ode"), *teacher_overrides(s.cfg, s.teacher_dir),
                                    *changes(s.cfg, sampler), *whole_gpu(s)])


COMMAND_FILE = "command.txt"  # in a variant's run directory: the command line that trained it


def start_of(s: Setup, name: str, seed: int) -> Path:
    return student_of(s.out, "sfpp", seed) if name == "sfpp_grpo" else s.out / "student_ode"


def check_start(s: Setup, name: str, seed: int) -> None:
    if not finished(start_of(s, name, seed)):
        raise RuntimeError(f"{name} starts from {start_of(s, name, seed)}, which is not trained: run the "
                           f"{'sfpp stage with this seed' if name == 'sfpp_grpo' else 'ode stage'} first")


def train_variant(s: Setup, cmd: Command, name: str, seed: int) -> dict:
    check_start(s, name, seed)
    overrides = variant_run(s, name, seed)
    write_command(variant_dir(s.out, name, seed), cmd.line(overrides))
    return cmd.train(s.out, f"{name} seed{seed}", overrides)


def write_command(run_dir: Path, line: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / COMMAND_FILE).write_text(line + "\n")


class VariantRunsFailed(RuntimeError):
    """Some variant runs failed; the others finished (and, with eval to come, were scored)."""


def train_variants_in_parallel(s: Setup, cmd: Command, jobs: list[tuple[str, int]], parallel: int,
                               scorer: Scorer | None = None) -> None:
    """Up to `parallel` variant runs at once, each `sfpp-ray train` in a process of its own, all on this process's
    Ray cluster (started here unless one is), each with 1/parallel of the GPU; fewer at once where the cluster's
    CPUs do not hold `parallel` runs. sfpp_grpo starts once sfpp's student of its seed is trained. Each run's output
    goes to train.log in its run directory; a failed run stops none of the others, and is raised at the end.
    `scorer`: each student is scored as soon as it is trained, beside the runs still training."""
    import subprocess
    import sys

    import ray

    from sfpp_ray.distributed.controller import cpus_needed

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(include_dashboard=False)
    try:
        per_run = max(cpus_needed(cmd.config_for(variant_overrides(s.cfg, n)), ["grpo" if n == "sfpp_grpo" else "dmd"])
                      for n, _ in jobs)  # not variant_run: sfpp_grpo's first student may not be trained yet
        fits = max(1, int(ray.cluster_resources().get("CPU", 0) // per_run))
        if fits < parallel:
            print(f"[parallel] the cluster's CPUs hold {fits} runs of {per_run:g} CPUs at once, not {parallel}")
        parallel = min(parallel, fits, len(jobs))
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        waiting, running, failed = list(jobs), {}, []
        while waiting or running:
            for name, seed in list(waiting):
                first = name != "sfpp_grpo" or finished(start_of(s, name, seed))
                if len(running) == parallel or not first and ("sfpp", seed) in [*waiting, *running]:
                    continue  # sfpp_grpo waits for sfpp's student of its seed
                waiting.remove((name, seed))
                try:
                    check_start(s, name, seed)
                except RuntimeError as e:
                    failed.append(f"{name} seed{seed}: {e}")
                    continue
                overrides, run_dir = variant_run(s, name, seed, 1 / parallel), variant_dir(s.out, name, seed)
                line = cmd.line(overrides)
                write_command(run_dir, line)
                print(f"[{name} seed{seed}] {line}", flush=True)
                log = (run_dir / "train.log").open("w")
                args = [sys.executable, "-m", "sfpp_ray", "train", "--config", cmd.config, *cmd.overrides, *overrides]
                running[(name, seed)] = (subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env), log,
                                         time.perf_counter())
            for (name, seed), (process, log, t0) in list(running.items()):
                try:
                    code = process.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    continue
                log.close()
                del running[(name, seed)]
                record_seconds(s.out, f"{name} seed{seed}", time.perf_counter() - t0)
                print(f"[{name} seed{seed}] {'finished' if code == 0 else f'FAILED (exit {code})'} in "
                      f"{time.perf_counter() - t0:.0f} s, log {log.name}", flush=True)
                if code != 0:
                    failed.append(f"{name} seed{seed}: exit {code}, see {log.name}")
                elif scorer is not None:
                    scorer.submit(name, seed)
        if failed:
            raise VariantRunsFailed("variant runs failed: " + "; ".join(failed))
    finally:
        if started_here:
            ray.shutdown()


# ---------------------------------------------------------------- sampler sweep and evaluation


SAMPLER_SWEEP = {"shift": (1.0, 3.0, 8.0), "guidance": (1.0, 2.0, 4.0)}
AUTOGUIDANCE_SWEEP = (1.5, 2.0, 3.0)  # with each guide the teacher stage saved (teacher_pretrain.guide_steps)
ETA_SWEEP = (0.5,)  # the stochastic sampler (ode.eta) at the best setting; eta 1 scored below the Euler step on the GPU
VALIDATION_SEED_OFFSET = 1  # the sampler sweep scores other held-out scenes than the evaluation


def reference_rows(s: Setup, ode=None, seed: int | None = None, split: str = "heldout",
                   labels: tuple[str, ...] = ("real", "teacher")) -> dict[str, dict]:
    """Real clips and the teacher's own 1x-horizon samples (sampled with `ode`, default s.teacher_sampler()), scored
    like the students: the metrics' floor and the teacher's ceiling. `split` "train" scores new scenes made only of
    the colour / shape pairs the teacher was trained on (held-out scenes each hold at least one pair it never saw).
    `labels`: which of the two to score; the real clips' scores do not depend on the sampler, so a sweep of sampler
    settings scores them once or not at all."""
    cfg = s.with_teacher()
    ev, T = cfg.evaluation, cfg.video.teacher_frames
    seed = ev.seed if seed is None else seed
    horizon = s.codec.video_frames(T)
    block = s.codec.video_frames(cfg.student.frames_per_block)
    scenes = sample_scenes(seed, ev.num_prompts, split, s.world)
    samples = teacher_videos(s, cfg, scenes, ode or s.teacher_sampler()) if "teacher" in labels else None
    rng = np.random.default_rng(seed)
    rows: dict[str, list[dict]] = {label: [] for label in labels}
    for i, scene in enumerate(scenes):
        reference = render(scene, 0, 4 * horizon)
        start = int(rng.integers(4 * horizon, 100 * horizon))  # drawn either way: real clips do not depend on labels
        for label in labels:
            video = render(scene, start, horizon) if label == "real" else samples[i]
            rows[label].append({**summarise(segment_metrics(video, horizon, reference=reference, block_frames=block)),
                                "flow_reward": flow_reward(video, cfg.grpo.min_motion, cfg.grpo.reward, cfg.grpo.raft_weights)})
    return {label: {1: {k: nanmean([r[k] for r in rs]) for k in rs[0]}} for label, rs in rows.items()}


def teacher_videos(s: Setup, cfg: Config, scenes: list, ode) -> list[np.ndarray]:
    """The teacher's samples for `scenes` under the sampler `ode`, as uint8 videos of the teacher's horizon."""
    prompts, T = [prompt(sc) for sc in scenes], cfg.video.teacher_frames
    teacher = components.build_teacher(cfg, s.device, s.dtype)
    g = s.generator(4)
    clean = teacher_samples(teacher, s.text.encode(prompts), s.uncond, s.noise(T, len(scenes), g), ode, s.schedule,
                            s.guide(ode, prompts), g)
    return [to_uint8(v) for v in s.codec.decode(clean)]


def sampler_sweep(s: Setup) -> dict:
    """The teacher's stability on validation scenes for every (shift, guidance) of SAMPLER_SWEEP without
    autoguidance, then, at the best of those, for every weight of AUTOGUIDANCE_SWEEP with each guide saved beside
    the teacher and with ode.guide where the config names one (a smaller teacher, say), then at the best so far
    with the stochastic sampler at each eta of ETA_SWEEP."""
    rows, t0 = [], time.perf_counter()

    def score(**setting) -> None:
        setting = {"autoguidance": 1.0, "guide": None, "eta": 0.0} | setting
        ode = dataclasses.replace(s.cfg.ode, **setting)
        m = reference_rows(s, ode, seed=s.cfg.evaluation.seed + VALIDATION_SEED_OFFSET, labels=("teacher",))["teacher"][1]
        rows.append({**setting, **m})
        print(f"[sampler] {'  '.join(f'{k} {v}' for k, v in setting.items())}  stability {m['stability']:.1f}  "
              f"colour_drift {m['colour_drift']:.3f}  count_error {m['count_error']:.3f}  frechet {m['frechet']:.3f}",
              flush=True)

    for shift in SAMPLER_SWEEP["shift"]:
        for guidance in SAMPLER_SWEEP["guidance"]:
            score(shift=shift, guidance=guidance)
    best = max(rows, key=lambda r: r["stability"])
    guides = [str(g) for g in saved_guides(s.teacher_dir)]
    for guide in guides + ([s.cfg.ode.guide] if s.cfg.ode.guide and s.cfg.ode.guide not in guides else []):
        for weight in AUTOGUIDANCE_SWEEP:
            score(shift=best["shift"], guidance=best["guidance"], autoguidance=weight, guide=guide)
    best = max(rows, key=lambda r: r["stability"])
    for eta in ETA_SWEEP:
        score(**{k: best[k] for k in ("shift", "guidance", "autoguidance", "guide")}, eta=eta)
    best = max(rows, key=lambda r: r["stability"])
    chosen = {k: best[k] for k in ("shift", "guidance", "autoguidance", "guide", "eta")}
    print(f"[sampler] best: {'  '.join(f'ode.{k}={v}' for k, v in chosen.items())}")
    return mark_done(s.out / "sampler", {"rows": rows, "best": chosen, "seconds": time.perf_counter() - t0})


def eval_settings(s: Setup) -> dict:
    """What the scores cached under eval/ depend on besides the trained weights, by config key (the
    teacher's sampler: the sampler stage's choice once it has run)."""
    ev, ode = s.cfg.evaluation, s.teacher_sampler()
    return {"evaluation.num_prompts": ev.num_prompts, "evaluation.horizons": list(ev.horizons),
            "evaluation.seed": ev.seed, "evaluation.long_stream": ev.long_stream, "run.seed": s.cfg.run.seed, "ode.shift": ode.shift,
            "ode.guidance": ode.guidance, "ode.euler_steps": ode.euler_steps,
            "ode.guidance_interval": list(ode.guidance_interval), "ode.autoguidance": ode.autoguidance,
            "ode.guide": ode.guide, "ode.eta": ode.eta}


# keys settings.json gained later: what older ones meant
RECORDED_LATER = {"evaluation.long_stream": 0, "ode.guidance_interval": [0.0, 1.0], "ode.autoguidance": 1.0, "ode.guide": None, "ode.eta": 0.0}


def check_eval_settings(s: Setup) -> None:
    """Cached scores are reused only under the settings they were made with; another prompt count, seed
    or sampler is refused with the key that differs, so a table never mixes two of them."""
    path, now = s.out / "eval" / "settings.json", eval_settings(s)
    if not path.is_file():  # a new eval/ (or one from before settings were recorded: taken as made with these)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(now, indent=2))
        return
    then = json.loads(path.read_text())
    for key, value in now.items():
        before = then.get(key, RECORDED_LATER.get(key))
        if before != value:
            raise ConfigError(key, f"the scores in {path.parent} were made with {before}, not {value}: "
                                   "remove that directory to score again")


class Scorer:
    """Scores students in processes of their own (spawned: CUDA does not survive a fork) as soon as each is trained,
    while other variants still train, each cached under eval/<variant>/seed<k>/metrics.json."""

    def __init__(self, s: Setup, cmd: Command, processes: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        check_eval_settings(s)  # makes eval/; scores made under other settings are refused before any is added
        self.s, self.cmd, self.futures = s, cmd, {}
        self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, name: str, seed: int) -> None:
        s, student = self.s, student_of(self.s.out, name, seed)
        out = s.out / "eval" / name / f"seed{seed}"
        if (name, seed) in self.futures or not finished(student) or (out / "metrics.json").is_file():
            return
        print(f"[eval] {name} seed{seed}: scoring", flush=True)
        self.futures[(name, seed)] = self.pool.submit(evaluate, self.cmd.config_for(variant_run(s, name, seed)),
                                                      str(student), out, f"{name} seed{seed}")

    def wait(self) -> None:
        """Every submitted score finished (an error in one is raised, after the others are done)."""
        self.pool.shutdown(wait=True)
        for (name, seed), future in self.futures.items():
            future.result()
            print(f"[eval] {name} seed{seed} scored", flush=True)


def run_eval(s: Setup, cmd: Command, variants: list[str], seeds: list[int], parallel: int = 1,
             scorer: Scorer | None = None) -> dict:
    """Scores every trained variant and seed with the config it trained with (each cached under
    eval/<variant>/seed<k>; up to `parallel` students at once, each in a process of its own: `scorer`'s, which may
    hold scores started while training went on), then collects per variant and horizon the mean over seeds and
    their spread."""
    check_eval_settings(s)  # makes eval/
    ref_path = s.out / "eval" / "reference.json"
    if not ref_path.is_file():
        ref_path.write_text(json.dumps(reference_rows(s), indent=2))
    reference = json.loads(ref_path.read_text())
    print(format_reference(reference))
    todo = [(name, seed) for name in variants for seed in seeds if finished(student_of(s.out, name, seed))
            and not (s.out / "eval" / name / f"seed{seed}" / "metrics.json").is_file()]
    if scorer is None and parallel > 1 and len(todo) > 1:
        scorer = Scorer(s, cmd, min(parallel, len(todo)))
    if scorer is not None:
        for name, seed in todo:
            scorer.submit(name, seed)
        scorer.wait()
    scores = {label: {None: rows} for label, rows in reference.items()}  # label -> seed -> horizon -> metrics
    commands: dict[str, dict[int, str]] = {}
    long_streams: dict[str, dict[int, dict]] = {}  # evaluation.long_stream: each student's one longest stream
    for name in variants:
        for seed in seeds:
            student = student_of(s.out, name, seed)
            if not finished(student):
                print(f"[eval] {name} seed{seed}: not trained, skipped")
                continue
            path = s.out / "eval" / name / f"seed{seed}" / "metrics.json"
            overrides = variant_run(s, name, seed)
            if not path.is_file():
                evaluate(cmd.config_for(overrides), str(student), path.parent, f"{name} seed{seed}")
            metrics = json.loads(path.read_text())
            scores.setdefault(name, {})[seed] = metrics["table"]
            if "long_stream" in metrics:
                long_streams.setdefault(name, {})[seed] = metrics["long_stream"]
            recorded = variant_dir(s.out, name, seed) / COMMAND_FILE  # as it ran (its GPU share)
            commands.setdefault(name, {})[seed] = (recorded.read_text().strip() if recorded.is_file()
                                                   else cmd.line(overrides))
    table, spread = {}, {}
    for label, by_seed in scores.items():
        table[label], spread[label] = over_seeds(list(by_seed.values()))
    seconds = s.out / "seconds.json"
    result = {"horizon_frames": s.codec.video_frames(s.cfg.video.teacher_frames), "table": table, "spread": spread,
              "seeds": {label: [k for k in by_seed if k is not None] for label, by_seed in scores.items()},
              "per_seed": {label: by_seed for label, by_seed in scores.items() if None not in by_seed},
              "long_stream": long_streams, "commands": commands, "stages": json.loads(seconds.read_text()) if seconds.is_file() else {}}
    (s.out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    (s.out / "results.md").write_text(markdown_results(json.loads((s.out / "results.json").read_text())))
    plot_over_time(s, [n for n in variants if n in scores], seeds)
    return result


def plot_over_time(s: Setup, variants: list[str], seeds: list[int]) -> Path | None:
    """out/stability_over_time.png: each variant's stability segment by segment over the longest evaluated
    horizon, the mean over prompts and seeds, shaded between its lowest and highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name in variants:
        per_seed = []
        for seed in seeds:
            path = s.out / "eval" / name / f"seed{seed}" / "metrics.json"
            curves = json.loads(path.read_text()).get("stability_by_segment") if path.is_file() else None
            if curves:  # scores of older runs lack it
                n = min(len(c) for c in curves)
                per_seed.append(np.mean([c[:n] for c in curves], axis=0))
        if not per_seed:
            continue
        n = min(len(c) for c in per_seed)
        curves = np.array([c[:n] for c in per_seed])
        seconds = (np.arange(n) + 0.5) * s.codec.video_frames(s.cfg.video.teacher_frames) / s.cfg.video.fps
        line, = ax.plot(seconds, curves.mean(0), label=f"{name} ({len(per_seed)} seeds)")
        if len(per_seed) > 1:
            ax.fill_between(seconds, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.2)
    if not ax.lines:
        plt.close(fig)
        return None
    ax.set(xlabel="time (s)", ylabel="stability (0-100)", ylim=(0, 100),
           title="stability per teacher-horizon segment, mean over held-out prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = s.out / "stability_over_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def over_seeds(tables: list[dict]) -> tuple[dict, dict]:
    """Per horizon and TABLE_KEYS metric of one variant's per-seed tables: the mean over seeds, and their spread
    (sample std, min, max over the n seeds whose value is defined)."""
    mean, spread = {}, {}
    for h in tables[0]:
        mean[int(h)], spread[int(h)] = {}, {}
        for k in TABLE_KEYS:
            v = np.array([t[h].get(k, math.nan) for t in tables], dtype=float)  # scores made before a key was
            v = v[~np.isnan(v)]
            mean[int(h)][k] = float(v.mean()) if len(v) else math.nan
            spread[int(h)][k] = {"std": float(v.std(ddof=1)) if len(v) > 1 else math.nan,
                                 "min": float(v.min()) if len(v) else math.nan,
                                 "max": float(v.max()) if len(v) else math.nan, "n": len(v)}
    return mean, spread


def format_reference(reference: dict[str, dict]) -> str:
    """Real clips against the teacher's samples on every metric: where the teacher falls short."""
    keys = [k for k in reference["real"]["1"] if k not in ("num_segments", "num_frames", "stability_last", "stability_min")]
    lines = [f"{'metric':<20}{'real':>10}{'teacher':>10}"]
    lines += [f"{k:<20}{reference['real']['1'][k]:>10.3f}{reference['teacher']['1'][k]:>10.3f}" for k in keys]
    return "\n".join(lines)


def format_results(result: dict) -> str:
    """The mean over seeds; where more than one seed was scored, ± their sample std, and min..max on the line below."""
    lines = [f"{'variant':<14}{'horizon':>8}{'seeds':>6}" + "".join(f"{k:>22}" for k in TABLE_KEYS)]
    for label, rows in result["table"].items():
        n = max(1, len(result["seeds"][label]))
        for h, m in sorted(rows.items()):
            sp = result["spread"][label][h]
            cells = (f"{m[k]:.3f} ± {sp[k]['std']:.3f}" if n > 1 else f"{m[k]:.3f}" for k in TABLE_KEYS)
            lines.append(f"{label:<14}{str(h) + 'x':>8}{n:>6}" + "".join(f"{c:>22}" for c in cells))
            if n > 1:
                ranges = (f"{sp[k]['min']:.3f}..{sp[k]['max']:.3f}" for k in TABLE_KEYS)
                lines.append(" " * 28 + "".join(f"{r:>22}" for r in ranges))
    return "\n".join(lines)


def markdown_results(result: dict) -> str:
    """results.md: the table as docs/results.md shows it, mean ± sample std over seeds (n seeds), one row a variant
    and horizon, then each student's longest stream (its last segment); made from results.json, never by hand."""
    lines = ["| variant | horizon | seeds | " + " | ".join(TABLE_KEYS) + " |", "|---|---|---|" + "---|" * len(TABLE_KEYS)]
    for label, rows in result["table"].items():
        n = len(result["seeds"].get(label, [])) or 1
        for h, m in sorted(rows.items(), key=lambda hm: int(hm[0])):
            sp = result["spread"][label][h]
            cells = [f"{m[k]:.3f} ± {sp[k]['std']:.3f}" if n > 1 and not math.isnan(sp[k]["std"]) else f"{m[k]:.3f}"
                     for k in TABLE_KEYS]
            lines.append(f"| {label} | {h}x | {n if label in result['per_seed'] else '-'} | " + " | ".join(cells) + " |")
    streams = result.get("long_stream", {})
    if streams:
        lines += ["", "| variant | seed | stream | frames | last segment's stability | collapsed |", "|---|---|---|---|---|---|"]
        for label, by_seed in streams.items():
            for seed, ls in sorted(by_seed.items(), key=lambda kv: int(kv[0])):
                lines.append(f"| {label} | {seed} | {ls['horizon']}x | {ls['video_frames']} | {ls['stability_last']:.1f} | "
                             f"{'yes' if ls['collapsed'] else 'no'} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- driver


def given_keys(overrides: list[str]) -> set[str]:
    """The dotted keys of key=value overrides."""
    return {o.split("=", 1)[0] for o in overrides}


FIXED = {"teacher": "teacher", "sampler": "sampler", "ode": "student_ode"}  # stage -> its output under --out


def stage_seeds(stage: str, seeds: list[int]) -> tuple[str, list[int]]:
    """'sfpp_nobn@0+1' -> ('sfpp_nobn', [0, 1]); a stage without '@' trains with `seeds`."""
    name, _, own = stage.partition("@")
    if not own:
        return name, seeds
    if name in (*FIXED, "eval"):
        raise ValueError(f"stage {name!r} trains once: it takes no seeds ({stage!r})")
    try:
        return name, [int(k) for k in own.split("+")]
    except ValueError:
        raise ValueError(f"stage {stage!r}: seeds after '@' are integers joined by '+', as sfpp_nobn@0+1") from None


def run(cmd: Command, out: Path, stages: list[str], seeds: list[int] | None = None,
        teacher: Path | None = None, parallel: int = 1) -> dict | None:
    """Runs the requested stages in order, skipping finished ones, each variant once per training seed (default: the
    config's run.seed); returns the results when eval ran. `teacher`: a trained teacher directory (the shipped
    weights/world_teacher) in place of the teacher stage. `parallel` > 1: the variants' runs go up to that many at
    once (train_variants_in_parallel), before eval, which scores as many students at once."""
    cfg, given = cmd.config_for([]), given_keys(cmd.overrides)
    seeds = seeds or [cfg.run.seed]
    out = out if out.name else out.resolve()  # run.name is the directory's name
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.run.seed)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    s = Setup(cfg, out, teacher, given)
    own_seeds = dict(stage_seeds(x, seeds) for x in stages)
    stages = list(own_seeds)
    variants = [v for v in stages if v not in (*FIXED, "eval")]
    for v in variants:  # a bad variant or seed fails before hours of training
        for seed in own_seeds[v]:
            cmd.config_for([*variant_overrides(cfg, v), f"run.seed={seed}"])
    jobs: list[tuple[str, int]] = []  # variant runs waiting to go in parallel
    scorer = None  # with eval to come, students are scored while the others train
    failure = None  # a failed run before eval: the table of the others is made first, then it is raised
    for stage in stages:
        if jobs and stage in ("eval", "sampler", "ode"):
            if stage == "eval" and scorer is None:
                scorer = Scorer(s, cmd, parallel)
                for name in variants:  # trained before, not yet scored
                    for seed in own_seeds[name]:
                        scorer.submit(name, seed)
            try:
                train_variants_in_parallel(s, cmd, jobs, parallel, scorer)
            except VariantRunsFailed as e:
                if stage != "eval":
                    raise
                failure = e
            jobs = []
        if stage == "eval":
            result = run_eval(s, cmd, variants or default_variants(cfg), sorted({k for v in own_seeds.values() for k in v}),
                              parallel, scorer)
            print(format_results(result))
            if failure is not None:
                raise failure
            return result
        if stage in FIXED:
            if stage == "teacher" and teacher:
                print(f"[teacher] {teacher} given, skipped")
            elif finished(out / FIXED[stage]):
                print(f"[{stage}] done, skipped")
            elif stage != "teacher" and not (teacher or finished(s.teacher_dir)):
                raise RuntimeError(f"{stage} needs the teacher: run the teacher stage first")
            elif stage == "teacher":
                train_teacher(s, cmd)
                s = Setup(cfg, out, given=given)  # with the teacher's text encoder
            elif stage == "sampler":
                record_seconds(out, "sampler", sampler_sweep(s)["seconds"])
            else:
                train_ode(s, cmd)
            continue
        for seed in own_seeds[stage]:
            if trained(student_of(out, stage, seed), cfg):
                print(f"[{stage} seed{seed}] done, skipped")
            elif parallel > 1:
                jobs.append((stage, seed))
            else:
                train_variant(s, cmd, stage, seed)
    if jobs:
        train_variants_in_parallel(s, cmd, jobs, parallel)
    return None


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "world_gpu.yaml"))
    p.add_argument("--out", required=True, help="directory every stage writes into (and resumes from)")
    p.add_argument("--stages", help="comma-separated, in order; default: teacher,sampler,ode,<every variant>,eval")
    p.add_argument("--seeds", help="comma-separated training seeds (run.seed) of the variants; default: the config's")
    p.add_argument("--parallel", type=int, default=1, help="variant runs at once, sharing the GPU (default 1)")
    p.add_argument("--teacher", type=Path, help="a trained teacher directory (weights/world_teacher) in place of the "
                                                "teacher stage")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = p.parse_args(argv)
    cmd = Command(args.config, args.overrides)
    cfg = cmd.config_for([])
    stages = args.stages.split(",") if args.stages else [*FIXED, *default_variants(cfg), "eval"]
    if [x for x in stages if x in FIXED] != [x for x in FIXED if x in stages]:  # ('@' on these is refused by run)
        raise ValueError("teacher, sampler and ode run in that order")
    seeds = [int(k) for k in args.seeds.split(",")] if args.seeds else None
    if args.parallel < 1:
        p.error(f"--parallel must be >= 1, got {args.parallel}")
    return run(cmd, Path(args.out), stages, seeds, args.teacher, args.parallel)


if __name__ == "__main__":
    main()
