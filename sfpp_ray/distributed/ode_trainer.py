"""ODE initialisation, one Ray Train worker per rank: the teacher's ODE pairs (made by the ranks, written by
rank 0 into a resumable store), then block-causal regression of the student onto them (algorithm.ode_init.ode_step).
Short: an interrupted stage starts again, and the pairs already made are kept."""

from __future__ import annotations

import time

import deepspeed
import torch
import torch.distributed as dist

from sfpp_ray import components
from sfpp_ray.algorithm.ode_init import Guide, OdePairStore, make_ode_trajectories, ode_step
from sfpp_ray.config import Config
from sfpp_ray.distributed.engine import (BadSteps, deepspeed_config, engine_update, finish, global_rank, rank0_tracker,
                                         setup, step_done, world_size)
from sfpp_ray.distributed.progress import report_progress
from sfpp_ray.seeding import generator, seed_for
from sfpp_ray.world.sprites import prompt, sample_scenes


def _ode_shard(teacher, cfg: Config, start: int, n: int, text, codec, schedule, timesteps, uncond, device, dtype,
               guide=None):
    """Pairs start..start+n: prompts and noise depend only on `start`, not on which rank makes them.
    guide: (model, text encoder) of ode.guide when autoguidance is on."""
    prompts = [prompt(s) for s in sample_scenes(seed_for(cfg.run.seed, "ode_scenes", start), n, "train",
                                                components.world_of(cfg))]
    g = generator(cfg.run.seed, "ode_pairs", start, device=device)
    noise = torch.randn(components.latent_shape(cfg, codec, cfg.video.teacher_frames, n), generator=g, device=device,
                        dtype=dtype)
    trajectories = make_ode_trajectories(teacher, text.encode(prompts), uncond, noise, timesteps, cfg.ode, schedule,
                                         None if guide is None else Guide(guide[0], guide[1].encode(prompts)))
    return trajectories.cpu(), prompts


def ode_pairs(cfg: Config, text, codec, schedule, timesteps, uncond, device, dtype) -> OdePairStore:
    """The store under run_dir/ode_pairs, completed once: the ranks make the missing shards in rounds,
    one each, and rank 0 writes them in order (a store has one writer). Every rank holds a full
    teacher copy for this, so ranks with nothing left to make in the last round need not follow."""
    root = cfg.run_dir / "ode_pairs"
    meta = {"timesteps": timesteps.tolist(),
            "shape": list(components.latent_shape(cfg, codec, cfg.video.teacher_frames))}
    store = OdePairStore(root, meta)
    starts = list(range(len(store), cfg.ode.num_pairs, cfg.ode.shard_size))
    if not starts:
        return store
    rank, world = global_rank(), world_size()
    teacher, guide = components.build_teacher(cfg, device, dtype), components.build_guide(cfg, device, dtype)
    for first in range(0, len(starts), world):
        mine = starts[first + rank] if first + rank < len(starts) else None
        shard = None if mine is None else _ode_shard(teacher, cfg, mine, min(cfg.ode.shard_size,
                                                                             cfg.ode.num_pairs - mine),
                                                     text, codec, schedule, timesteps, uncond, device, dtype, guide)
        shards = [shard]
        if world > 1:
            shards = [None] * world
            dist.all_gather_object(shards, shard)
        if rank == 0:
            for made in shards:
                if made is not None:
                    store.write_shard(*made)
    if world > 1:
        dist.barrier()
    return OdePairStore(root, meta)  # rank 0's index, as written


def ode_loop(config: dict) -> None:
    """Ray Train entry point. config: {"cfg": Config dict (model.pretrained: the teacher), "mlflow_run_id"}."""
    cfg, device, dtype = setup(config)
    rank = global_rank()
    text = components.build_text_encoder(cfg, device, dtype)
    codec = components.build_video_codec(cfg, device, dtype)
    schedule = components.build_schedule(cfg)
    timesteps = schedule.student_timesteps(cfg.schedule)
    uncond = text.encode([cfg.text.negative_prompt])
    t0 = time.perf_counter()
    store = ode_pairs(cfg, text, codec, schedule, timesteps, uncond, device, dtype)
    if rank == 0:
        print(f"[ode] {len(store)} pairs ready in {time.perf_counter() - t0:.0f} s", flush=True)
    engine, *_ = deepspeed.initialize(model=components.build_student(cfg),
                                      config=deepspeed_config(cfg, cfg.ode.lr, micro_batch=cfg.ode.batch_size))
    update = engine_update(engine, cfg)
    bad = BadSteps("ode", cfg, update)
    losses, t0 = [], time.perf_counter()
    with rank0_tracker(cfg, config["mlflow_run_id"]) as tracker:
        for step in range(1, cfg.ode.steps + 1):
            g = generator(cfg.run.seed, "ode", rank, step, device=device)
            idx = torch.randint(0, len(store), (cfg.ode.batch_size,), generator=g, device=device).tolist()
            pairs = [store.load(i) for i in idx]
            trajectories = torch.stack([p[0] for p in pairs]).to(device, dtype)
            out = ode_step(engine.module, trajectories, timesteps, text.encode([p[1] for p in pairs]), schedule, g,
                           update)
            metrics = step_done(tracker, {"ode/loss": out["loss"].item(), **bad.after(step)}, step, device)
            losses.append(metrics["ode/loss"])
            if rank == 0:
                report_progress(cfg.run_dir, "ode", step, cfg.ode.steps, loss=losses[-1])
            if rank == 0 and (step % max(1, cfg.ode.steps // 10) == 0 or step == cfg.ode.steps):
                print(f"[ode] step {step}/{cfg.ode.steps}  loss {losses[-1]:.4f}  "
                      f"{step / (time.perf_counter() - t0):.1f} steps/s", flush=True)
    finish(engine, cfg, "student_ode", {"steps": cfg.ode.steps, "losses": losses, "pairs": len(store)}, metrics,
            cfg.ode.steps)
