"""The paper's long-horizon comparison at small scale, in one process, in a world whose truth is known.

Stages (each writes under --out and is skipped when its output exists, so an interrupted run resumes):
  teacher     flow-matching pretraining of the bidirectional teacher on T-frame world clips
  sampler     the teacher's samples scored on validation scenes for each ODE sampler setting in
              SAMPLER_SWEEP (shift x guidance), then autoguidance and the stochastic sampler at the best;
              once it has run, the ODE pairs and the teacher's reference samples use its best setting
              instead of the config's (the ODE pairs stay deterministic: they ignore ode.eta)
  ode         teacher ODE pairs, then ODE initialisation of the causal student
  <variants>  DMD from the ODE student, each with its own critic:
                sf          Self-Forcing: rollout = training window = T
                sfpp        Self-Forcing++: N-frame rolling-cache rollouts, backward-noised T-frame windows
                sfpp_nobn   sfpp, windows re-generated from pure noise
                sfpp_w<n>   sfpp with an n-frame attention (KV cache) window (default: 9 and 15, the paper's
                            ablation, where shorter than the configured window)
                sfpp_grpo   sfpp followed by GRPO with the optical-flow reward
  eval        real clips, teacher samples (1x T) and every variant at cfg.evaluation.horizons,
              scored against real clips; a table is printed and written to results.json

    python experiments/long_horizon.py --out runs/long_horizon [--stages teacher,ode,sf,sfpp,eval] [key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from sfpp_ray import components
from sfpp_ray.algorithm.dmd import EMA, critic_loss, dmd_generator_loss, is_generator_step
from sfpp_ray.algorithm.grpo import group_advantages, grpo_backward, trajectory_log_prob
from sfpp_ray.algorithm.ode_init import (Guide, OdePairStore, fill_ode_store, make_ode_trajectories,
                                         ode_regression_loss, teacher_samples)
from sfpp_ray.algorithm.reward import batch_flow_rewards
from sfpp_ray.algorithm.rollout import rollout
from sfpp_ray.algorithm.self_forcing_pp import extended_rollout, sample_window_start, sf_pp_generator_batch
from sfpp_ray.config import Config, ConfigError, load_config, saved_guides, validate, with_teacher
from sfpp_ray.evaluation.evaluate import evaluate, nanmean, world_of
from sfpp_ray.evaluation.metrics import segment_metrics, summarise
from sfpp_ray.video_io import to_uint8
from sfpp_ray.world.sprites import prompt, render, sample_scenes

ROOT = Path(__file__).resolve().parents[1]
DONE = "stage.json"  # written last: a stage whose directory lacks it did not finish
TABLE_KEYS = ("stability", "exposure_drift", "dynamic_degree", "flicker", "frechet")


# ---------------------------------------------------------------- setup


class Setup:
    """What every stage shares: config, device, text encoder, codec, schedule and the negative prompt."""

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
        self.timesteps = self.schedule.student_timesteps(cfg.schedule)  # CPU: indexed as Python scalars
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

    def train_prompts(self, offset: int, n: int) -> list[str]:
        """n training-split prompts; `offset` makes each stage and step draw its own scenes."""
        return [prompt(s) for s in sample_scenes(self.cfg.run.seed * 1000 + offset, n, "train", self.world)]


def finished(path: Path) -> bool:
    return (path / DONE).is_file()


def mark_done(path: Path, record: dict) -> dict:
    path.mkdir(parents=True, exist_ok=True)
    (path / DONE).write_text(json.dumps(record, indent=2, default=float))
    return record


def adamw(params, lr: float, cfg: Config) -> torch.optim.AdamW:
    t = cfg.trainer
    return torch.optim.AdamW(params, lr=lr, betas=tuple(t.betas), weight_decay=t.weight_decay)


def step_(loss: torch.Tensor, model: torch.nn.Module, opt: torch.optim.Optimizer, clip: float) -> float:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return float(norm)


def progress(name: str, step: int, steps: int, t0: float, **values: float) -> None:
    if step == steps - 1 or step % max(1, steps // 10) == 0:
        text = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
        print(f"[{name}] {step + 1}/{steps}  {time.perf_counter() - t0:.0f}s  {text}", flush=True)


# ---------------------------------------------------------------- teacher


def train_teacher(s: Setup) -> dict:
    """The `pretrain_teacher` stage of the Ray system (Ray Train + DeepSpeed, `sfpp-ray pretrain-teacher`),
    run with this experiment's output directory as its run directory, so it writes teacher/ here."""
    import ray

    from sfpp_ray.distributed.controller import train

    cfg = copy.deepcopy(s.cfg)
    cfg.run.output_dir, cfg.run.name, cfg.run.stages = str(s.out.parent.resolve()), s.out.name, ["pretrain_teacher"]
    cfg.trainer.gpus_per_worker = 1.0 if s.device.type == "cuda" else 0.0
    started_here = not ray.is_initialized()
    try:
        return train(cfg)["stages"]["pretrain_teacher"]["record"]
    finally:
        if started_here:
            ray.shutdown()


# ---------------------------------------------------------------- ODE initialisation


def ode_init(s: Setup) -> dict:
    """Teacher ODE pairs (kept in a resumable store), then block-causal regression of the student onto them."""
    cfg, t0 = s.with_teacher(), time.perf_counter()
    T, g = cfg.video.teacher_frames, s.generator(2)
    teacher = components.build_teacher(cfg, s.device, s.dtype)
    store = OdePairStore(s.out / "ode_pairs", meta={"timesteps": s.timesteps.tolist(),
                                                    "shape": list(components.latent_shape(cfg, s.codec, T))})

    sampler = s.teacher_sampler()

    def make_shard(n: int) -> tuple[torch.Tensor, list[str]]:
        prompts = s.train_prompts(100_000 + len(store), n)
        return make_ode_trajectories(teacher, s.text.encode(prompts), s.uncond, s.noise(T, n, g), s.timesteps,
                                     sampler, s.schedule, s.guide(sampler, prompts)), prompts

    print(f"[ode] teacher sampler: shift {sampler.shift:g}, guidance {sampler.guidance:g}, "
          f"autoguidance {sampler.autoguidance:g} ({sampler.guide}), eta {sampler.eta:g} (samples only)", flush=True)
    fill_ode_store(store, cfg.ode.num_pairs, make_shard, cfg.ode.shard_size)
    teacher = None  # frees its memory before the student trains (make_shard refers to it: no `del`)
    pairs = [store.load(i) for i in range(cfg.ode.num_pairs)]
    trajectories = torch.stack([p[0] for p in pairs]).to(s.device, s.dtype)
    prompts = [p[1] for p in pairs]
    student = components.build_student(cfg, s.device, s.dtype).train()
    opt = adamw(student.parameters(), cfg.ode.lr, cfg)
    losses = []
    for step in range(cfg.ode.steps):
        idx = torch.randint(0, len(prompts), (cfg.ode.batch_size,), generator=g, device=s.device)
        text = s.text.encode([prompts[i] for i in idx.tolist()])
        loss = ode_regression_loss(student, trajectories[idx], s.timesteps, text, s.schedule, g)
        step_(loss, student, opt, cfg.trainer.grad_clip)
        losses.append(loss.item())
        progress("ode", step, cfg.ode.steps, t0, loss=loss.item())
    student.save_pretrained(s.out / "student_ode")
    return mark_done(s.out / "student_ode", {"losses": {"ode_regression": losses}, "seconds": time.perf_counter() - t0})


# ---------------------------------------------------------------- variants


def variant_config(cfg: Config, name: str) -> Config:
    """The config a variant trains and is evaluated with."""
    v = copy.deepcopy(cfg)
    T = cfg.video.teacher_frames
    v.data.window_frames = T
    if name == "sf":
        v.rollout.num_frames, v.student.window_frames, v.data.backward_noise = T, T, False
    elif name == "sfpp_nobn":
        v.data.backward_noise = False
    elif m := re.fullmatch(r"sfpp_w(\d+)", name):
        v.student.window_frames = int(m.group(1))
    elif name not in ("sfpp", "sfpp_grpo"):
        raise ValueError(f"unknown variant {name!r}")
    validate(v)
    return v


ABLATION_WINDOWS = (9, 15)  # latent frames: the paper's cache-window ablation against the full 21


def default_variants(cfg: Config) -> list[str]:
    """sf, sfpp, sfpp_nobn, the ablation's cache windows that fit (whole blocks, shorter than the configured one), sfpp_grpo."""
    w, fpb = cfg.student.window_frames, cfg.student.frames_per_block
    windows = [n for n in ABLATION_WINDOWS if n < w and n % fpb == 0]
    return ["sf", "sfpp", "sfpp_nobn", *(f"sfpp_w{n}" for n in windows), "sfpp_grpo"]


def train_dmd(s: Setup, name: str) -> dict:
    """DMD on windows of the student's own rollouts: critic every step, student every update_ratio-th.

    The critic fits the student's window distribution: uniform windows of its long rollouts (sfpp),
    or its whole T-frame rollouts (sf).
    """
    cfg = s.with_teacher(variant_config(s.cfg, name))
    tr, offset = cfg.trainer, 10_000 * (1 + sum(map(ord, name)))
    g, t0 = s.generator(offset), time.perf_counter()
    teacher = components.build_teacher(cfg, s.device, s.dtype)
    critic = components.build_critic(cfg, s.device, s.dtype)
    student = components.build_student(cfg, s.device, s.dtype, checkpoint=str(s.out / "student_ode")).train()
    opt_g, opt_c = adamw(student.parameters(), tr.generator_lr, cfg), adamw(critic.parameters(), tr.critic_lr, cfg)
    ema = EMA(student, tr.ema_decay, tr.ema_start_step)
    N, K, B = cfg.rollout.num_frames, cfg.data.window_frames, tr.batch_size
    losses: dict[str, list[float]] = {"dmd": [], "critic": []}
    generator_steps = 0
    for step in range(cfg.dmd.steps):
        if is_generator_step(step, cfg.dmd.update_ratio):
            # One long rollout per student update; the critic steps until the next update fit other
            # windows of it, which keeps an N-frame rollout's cost off every critic step.
            cond = s.text.encode(s.train_prompts(offset + step * B, B))
            with torch.no_grad():
                latents = extended_rollout(student, student.cross_attention_cache(cond), s.noise(N, B, g), s.schedule,
                                           s.timesteps, cfg.schedule.context_noise, g)
            x0, _ = sf_pp_generator_batch(student, student.cross_attention_cache(cond), latents, s.schedule,
                                          s.timesteps, cfg.data, cfg.schedule.context_noise, g)
            loss, _ = dmd_generator_loss(x0, teacher, critic, cond, s.uncond, s.schedule, cfg.dmd, g)
            step_(loss, student, opt_g, tr.grad_clip)
            ema.update(student, generator_steps)
            generator_steps += 1
            losses["dmd"].append(loss.item())
        start = sample_window_start(N, K, cfg.student.frames_per_block, cfg.data.window_sampler, cfg.data.beta_a,
                                    cfg.data.beta_b, g)
        loss, _ = critic_loss(latents[:, :, start:start + K], critic, cond, s.schedule, cfg.dmd, g)
        step_(loss, critic, opt_c, tr.grad_clip)
        losses["critic"].append(loss.item())
        progress(name, step, cfg.dmd.steps, t0, critic=loss.item(), dmd=losses["dmd"][-1])
    ema.copy_to(student)  # the average is the published model
    student.save_pretrained(s.out / name)
    return mark_done(s.out / name, {"losses": losses, "seconds": time.perf_counter() - t0})


def train_grpo(s: Setup, name: str = "sfpp_grpo") -> dict:
    """sfpp, then GRPO with the optical-flow reward: groups of rollouts of one prompt, KL to the frozen sfpp student."""
    cfg = s.with_teacher(variant_config(s.cfg, name))
    gp, tr = cfg.grpo, cfg.trainer
    g, t0 = s.generator(3), time.perf_counter()
    student = components.build_student(cfg, s.device, s.dtype, checkpoint=str(s.out / "sfpp")).train()
    reference = components.build_student(cfg, s.device, s.dtype, checkpoint=str(s.out / "sfpp")).eval().requires_grad_(False)
    opt = adamw(student.parameters(), gp.lr, cfg)
    N, ctx = cfg.rollout.num_frames, cfg.schedule.context_noise
    losses: dict[str, list[float]] = {"grpo": [], "reward": []}
    for step in range(gp.steps):
        cond = s.text.encode(s.train_prompts(200_000 + step, 1) * gp.group_size)
        with torch.no_grad():
            out = rollout(student, student.cross_attention_cache(cond), s.noise(N, gp.group_size, g), s.timesteps,
                          s.schedule, context_noise=ctx, record=True, generator=g)
            videos = [to_uint8(v) for v in s.codec.decode(out.latents)]
            _, ref_means = trajectory_log_prob(reference, reference.cross_attention_cache(cond), out.steps, out.latents,
                                               s.timesteps, s.schedule, ctx)
        rewards = batch_flow_rewards(videos, gp.min_motion, gp.reward, gp.raft_weights)
        advantages = group_advantages(torch.from_numpy(rewards)[None], gp.advantage_clip)[0].to(s.device)
        opt.zero_grad(set_to_none=True)
        info = grpo_backward(student, cond, out.steps, out.latents, advantages, ref_means, s.timesteps, s.schedule,
                             ctx, gp, lambda loss, weight: (loss * weight).backward())
        torch.nn.utils.clip_grad_norm_(student.parameters(), tr.grad_clip)
        opt.step()
        losses["grpo"].append(info["loss"])
        losses["reward"].append(float(rewards.mean()))
        progress(name, step, gp.steps, t0, loss=info["loss"], reward=float(rewards.mean()))
    student.save_pretrained(s.out / name)
    return mark_done(s.out / name, {"losses": losses, "seconds": time.perf_counter() - t0})


# ---------------------------------------------------------------- evaluation


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
            rows[label].append(summarise(segment_metrics(video, horizon, reference=reference, block_frames=block)))
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
            "evaluation.seed": ev.seed, "run.seed": s.cfg.run.seed, "ode.shift": ode.shift,
            "ode.guidance": ode.guidance, "ode.euler_steps": ode.euler_steps,
            "ode.guidance_interval": list(ode.guidance_interval), "ode.autoguidance": ode.autoguidance,
            "ode.guide": ode.guide, "ode.eta": ode.eta}


# keys settings.json gained later: what older ones meant
RECORDED_LATER = {"ode.guidance_interval": [0.0, 1.0], "ode.autoguidance": 1.0, "ode.guide": None, "ode.eta": 0.0}


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


def run_eval(s: Setup, variants: list[str]) -> dict:
    """Scores every finished variant (each cached under eval/<variant>) and collects the results table."""
    check_eval_settings(s)  # makes eval/
    ref_path = s.out / "eval" / "reference.json"
    if not ref_path.is_file():
        ref_path.write_text(json.dumps(reference_rows(s), indent=2))
    reference = json.loads(ref_path.read_text())
    print(format_reference(reference))
    table = {label: {int(h): {k: m[k] for k in TABLE_KEYS} for h, m in rows.items()} for label, rows in reference.items()}
    for name in variants:
        if not finished(s.out / name):
            print(f"[eval] {name}: not trained, skipped")
            continue
        path = s.out / "eval" / name / "metrics.json"
        if not path.is_file():
            evaluate(variant_config(s.with_teacher(), name), str(s.out / name), path.parent, label=name)
        table[name] = {int(h): {k: m[k] for k in TABLE_KEYS} for h, m in json.loads(path.read_text())["table"].items()}
    result = {"horizon_frames": s.codec.video_frames(s.cfg.video.teacher_frames), "table": table,
              "stages": {p.name: json.loads((p / DONE).read_text())["seconds"] for p in sorted(s.out.iterdir()) if finished(p)}}
    (s.out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    return result


def format_reference(reference: dict[str, dict]) -> str:
    """Real clips against the teacher's samples on every metric: where the teacher falls short."""
    keys = [k for k in reference["real"]["1"] if k not in ("num_segments", "num_frames", "stability_last", "stability_min")]
    lines = [f"{'metric':<20}{'real':>10}{'teacher':>10}"]
    lines += [f"{k:<20}{reference['real']['1'][k]:>10.3f}{reference['teacher']['1'][k]:>10.3f}" for k in keys]
    return "\n".join(lines)


def format_results(table: dict[str, dict[int, dict]]) -> str:
    lines = [f"{'variant':<12}{'horizon':>8}" + "".join(f"{k:>16}" for k in TABLE_KEYS)]
    for label, rows in table.items():
        for h, m in sorted(rows.items()):
            lines.append(f"{label:<12}{str(h) + 'x':>8}" + "".join(f"{m[k]:>16.3f}" for k in TABLE_KEYS))
    return "\n".join(lines)


# ---------------------------------------------------------------- driver


def given_keys(overrides: list[str]) -> set[str]:
    """The dotted keys of key=value overrides."""
    return {o.split("=", 1)[0] for o in overrides}


def run(cfg: Config, out: Path, stages: list[str], given: Iterable[str] = ()) -> dict | None:
    """Runs the requested stages in order, skipping finished ones; returns the results when eval ran. `given`:
    the keys set on the command line (Setup)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.run.seed)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    s = Setup(cfg, out, given=given)
    variants = [v for v in stages if v not in ("teacher", "sampler", "ode", "eval")]
    for v in variants:
        variant_config(cfg, v)  # a bad variant name fails before hours of training
    needs = {"teacher": "teacher", "sampler": "sampler", "ode": "student_ode", **{v: v for v in variants}}
    for stage in stages:
        if stage == "eval":
            result = run_eval(s, variants or default_variants(cfg))
            print(format_results(result["table"]))
            return result
        if finished(out / needs[stage]):
            print(f"[{stage}] done, skipped")
            continue
        if stage == "teacher":
            train_teacher(s)
            s = Setup(cfg, out, given=given)  # with the teacher's text encoder
        elif stage == "sampler":
            sampler_sweep(s)
        elif stage == "ode":
            ode_init(s)
        elif stage == "sfpp_grpo":
            if not finished(out / "sfpp"):
                raise RuntimeError("sfpp_grpo starts from sfpp: run the sfpp stage first")
            train_grpo(s)
        else:
            train_dmd(s, stage)
    return None


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "world_gpu.yaml"))
    p.add_argument("--out", required=True, help="directory every stage writes into (and resumes from)")
    p.add_argument("--stages", help="comma-separated, in order; default: teacher,ode,<every variant>,eval")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    stages = args.stages.split(",") if args.stages else ["teacher", "sampler", "ode", *default_variants(cfg), "eval"]
    order = ["teacher", "sampler", "ode"]
    if [x for x in stages if x in order] != [x for x in order if x in stages]:
        raise ValueError("teacher, sampler and ode run in that order")
    return run(cfg, Path(args.out), stages, given_keys(args.overrides))


if __name__ == "__main__":
    main()
