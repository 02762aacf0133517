"""GRPO, one Ray Train worker per rank: groups of recorded rollouts of one prompt, scored by the optical-flow
reward, PPO-clipped with a KL to the frozen pre-GRPO student (algorithm.grpo.grpo_step). Each rank takes its own
prompt a step. Short: an interrupted stage starts again."""

from __future__ import annotations

import deepspeed

from sfpp_ray import components
from sfpp_ray.algorithm.grpo import grpo_step
from sfpp_ray.distributed.engine import (BadSteps, deepspeed_config, engine_update, finish, global_rank, rank0_tracker,
                                         setup, step_done, world_size)
from sfpp_ray.distributed.progress import report_progress
from sfpp_ray.seeding import generator


def grpo_loop(config: dict) -> None:
    """Ray Train entry point. config: {"cfg": Config dict (student.checkpoint: the DMD student), "prompts",
    "mlflow_run_id"}. Each rank takes its own prompt per step and rolls out a group for it."""
    cfg, device, dtype = setup(config)
    gp, rank, world, prompts = cfg.grpo, global_rank(), world_size(), config["prompts"]
    parts = gp.group_size // gp.micro_batch if gp.micro_batch else 1  # replayed one after another, one update
    engine, *_ = deepspeed.initialize(model=components.build_student(cfg),
                                      config=deepspeed_config(cfg, gp.lr) | {"gradient_accumulation_steps": parts})
    reference = components.build_student(cfg, device, dtype).eval().requires_grad_(False)
    text = components.build_text_encoder(cfg, device, dtype)
    codec = components.build_video_codec(cfg, device, dtype)
    schedule = components.build_schedule(cfg)
    timesteps = schedule.student_timesteps(cfg.schedule)
    update = engine_update(engine, cfg)
    bad = BadSteps("grpo", cfg, update)
    latent_size = components.latent_shape(cfg, codec, cfg.rollout.num_frames)[-2:]
    rewards_seen = []
    with rank0_tracker(cfg, config["mlflow_run_id"]) as tracker:
        for step in range(1, gp.steps + 1):
            g = generator(cfg.run.seed, "grpo", rank, step, device=device)
            cond = text.encode([prompts[((step - 1) * world + rank) % len(prompts)]])
            info = grpo_step(engine.module, reference, codec, cond, cfg.rollout.num_frames, latent_size, timesteps,
                             schedule, gp, update, g, cfg.schedule.context_noise)
            metrics = step_done(tracker, {"grpo/loss": info["loss"], "grpo/reward": info["reward"],
                                           "grpo/kl": info["kl"], "grpo/clip_frac": info["clip_frac"],
                                           **bad.after(step)}, step, device)
            rewards_seen.append(metrics["grpo/reward"])
            if rank == 0:
                report_progress(cfg.run_dir, "grpo", step, gp.steps, loss=metrics["grpo/loss"], reward=rewards_seen[-1],
                                clip_frac=metrics["grpo/clip_frac"], kl=metrics["grpo/kl"])  # a clip that binds shows
    finish(engine, cfg, "student_grpo", {"steps": gp.steps, "rewards": rewards_seen}, metrics, gp.steps)
