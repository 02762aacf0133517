"""Self-Forcing++ DMD, one Ray Train worker per rank, on rollout windows from the data pipeline.

Per step, on every rank, on trainer.batch_size windows (each its own row of the dataset, with its own window
start and its own random stream, seeded by the row):
  0. a window that grew older than buffer.max_staleness while Ray Data held it is replaced by one made
     from the buffer now (data_pipeline.fresh_row);
  1. critic step (algorithm.dmd.critic_step): flow matching on the windows' clean latents;
  2. every `dmd.update_ratio` steps, generator step (algorithm.self_forcing_pp.dmd_generator_step): each
     window re-generated with gradient on top of its own rollout's frames, DMD against the frozen teacher;
  3. every `trainer.sync_every` steps the student's weights are published to the rollout workers
     (every rank takes part: ZeRO-3 gathers are collectives), and the buffer learns the version;
  4. every `trainer.checkpoint_every` steps (0: only at the end), a checkpoint every rank writes its shards into.
At the end the student is saved as the moving average of its weights (trainer.ema_decay > 0), as
inference and the GRPO stage want it; the rollout workers always ran the live weights.
Student and critic are DeepSpeed engines; the teacher is frozen and sharded with ZeRO-3 only when
training shards with ZeRO-3 too. Rank 0 logs to MLflow.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import deepspeed
import ray
import ray.train
import torch
from ray.train import Checkpoint

from sfpp_ray import components
from sfpp_ray.algorithm.dmd import EMA, critic_step, is_generator_step
from sfpp_ray.algorithm.self_forcing_pp import dmd_generator_step
from sfpp_ray.config import Config, from_dict
from sfpp_ray.distributed.data_pipeline import fresh_row
from sfpp_ray.distributed.engine import (STATE_FILE, BadSteps, deepspeed_config, engine_update, frozen_teacher, full_params,
                                         global_rank, load_ema, save_ema, save_student, stage_dtype, world_size,
                                         write_marker, write_progress)
from sfpp_ray.distributed.weight_sync import ObjectStoreWeightSync
from sfpp_ray.seeding import seed_for
from sfpp_ray.tracking import Tracker


def dmd_loop(config: dict) -> None:
    """Ray Train entry point. config: {"cfg": Config dict, "actors": names, "mlflow_run_id", "total_steps"}."""
    cfg = from_dict(config["cfg"])
    names = config["actors"]
    buffer, broker = ray.get_actor(names["buffer"]), ray.get_actor(names["broker"])
    feed = ray.get_actor(names["feed"])
    rank, world = global_rank(), world_size()
    device = ray.train.torch.get_device() if cfg.trainer.gpus_per_worker > 0 else torch.device("cpu")
    dtype = stage_dtype(cfg)
    zero3 = cfg.trainer.zero_stage == 3
    torch.manual_seed(cfg.run.seed)  # same init on every rank before DeepSpeed broadcasts/partitions
    B = cfg.trainer.batch_size

    student_engine, *_ = deepspeed.initialize(model=components.build_student(cfg),
                                              config=deepspeed_config(cfg, cfg.trainer.generator_lr, micro_batch=B))
    critic_engine, *_ = deepspeed.initialize(model=components.build_critic(cfg),
                                             config=deepspeed_config(cfg, cfg.trainer.critic_lr, micro_batch=B))
    student_update, critic_update = engine_update(student_engine, cfg), engine_update(critic_engine, cfg)
    bad = BadSteps("dmd", cfg, student_update, critic_update)
    teacher = frozen_teacher(cfg, device, dtype)
    schedule = components.build_schedule(cfg)
    timesteps = schedule.student_timesteps(cfg.schedule)
    ema = None  # the saved student is the generator's moving average; rollouts use the live weights
    if cfg.trainer.ema_decay > 0:
        ema = EMA(student_engine.module, cfg.trainer.ema_decay, cfg.trainer.ema_start_step, partitioned=zero3,
                  ranks=world, rank=rank)
    sync = ObjectStoreWeightSync()

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            student_engine.load_checkpoint(str(Path(d) / "student"), tag="state")
            critic_engine.load_checkpoint(str(Path(d) / "critic"), tag="state")
            state = torch.load(Path(d) / STATE_FILE, weights_only=True)
            load_ema(ema, Path(d), rank, state["ema"])
        step = state["step"]
        # Rollout workers were rebuilt from the initial weights: give them the checkpoint's.
        publish(sync, student_engine.module, step, broker, buffer, rank)
    total = config["total_steps"]

    published = step  # the version the buffer measures staleness against (rollouts start from version 0)
    replaced = 0
    tracker = None
    if rank == 0:
        tracker = Tracker(cfg.tracking, cfg.run_dir, cfg.run.name)
        tracker.start(resume_run_id=config["mlflow_run_id"])
        print(f"trainer: {world} ranks, ZeRO-{cfg.trainer.zero_stage}, {B} windows a rank a step, "
              f"steps {step + 1}..{total}")
    step_ends, waits = [], []  # wall clock at each step's end, and how long each step waited for its batch
    try:
        shard = ray.train.get_dataset_shard("train")
        t_ready = time.perf_counter()
        for batch in shard.iter_torch_batches(batch_size=B, device=device, drop_last=True):
            if step >= total:
                break
            step += 1
            t0 = time.perf_counter()
            waits.append(t0 - t_ready)
            for i in range(B):  # the weights each rollout was made with
                while published - int(batch["policy_version"][i]) > cfg.buffer.max_staleness:
                    row = fresh_row(buffer, cfg, seed_for(cfg.run.seed, "replacement", rank, step, replaced))
                    for key, value in row.items():
                        batch[key][i] = torch.as_tensor(value[0], device=device)
                    replaced += 1
            batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
            generators = [torch.Generator(device=device).manual_seed(s) for s in batch["seed"].tolist()]
            out = critic_step(critic_engine, batch["window"], batch["text"], schedule, cfg.dmd, generators,
                              critic_update)
            metrics = {"loss/critic": out["loss"].item(), "grad_norm/critic": _float(out["grad_norm"])}
            if is_generator_step(step, cfg.dmd.update_ratio):
                out = dmd_generator_step(student_engine.module, teacher, critic_engine, batch, schedule, timesteps,
                                         cfg.dmd, student_update, generators, cfg.schedule.context_noise,
                                         cfg.data.training_rolling_cache)
                metrics.update({"loss/generator": out["loss"].item(), "dmd/grad_norm": out["dmd_grad_norm"],
                                "grad_norm/generator": _float(out["grad_norm"])})
                if ema is not None:
                    ema.update(student_engine.module, step)
            metrics.update(bad.after(step))
            metrics["time/step"] = time.perf_counter() - t0
            metrics["time/data_wait"] = waits[-1]
            # How many updates old the consumed rollouts are, and how many rows that Ray Data fetched ahead
            # outlived buffer.max_staleness and were made again.
            metrics["data/staleness"] = float(step - 1 - batch["policy_version"].float().mean())
            metrics["data/replaced_stale"] = float(replaced)
            if step % cfg.trainer.sync_every == 0 or step == total:
                t1 = time.perf_counter()
                publish(sync, student_engine.module, step, broker, buffer, rank)
                published = step
                metrics["time/sync"] = time.perf_counter() - t1
            if rank == 0:
                metrics.update(_system_metrics(buffer, names["rollout_workers"]))
                tracker.log_metrics(metrics, step)
            every = cfg.trainer.checkpoint_every
            report(metrics, step, student_engine, critic_engine, ema, feed, cfg, rank,
                   save=(every > 0 and step % every == 0) or step == total)
            t_ready = time.perf_counter()
            step_ends.append(t_ready)
        if ema is not None:
            ema.copy_to(student_engine.module)  # training is over: the average is the saved student
        with full_params(student_engine.module, zero3, from_partitions=True):
            if rank == 0:
                save_student(student_engine.module, cfg, cfg.run_dir / "student")
                write_marker(cfg.run_dir / "student", {"steps": total, "ema": ema is not None, "step_ends": step_ends,
                                                        "data_waits": waits})
    finally:
        if tracker is not None:
            tracker.finish()


def _float(norm) -> float | None:
    return None if norm is None else float(norm)


def publish(sync: ObjectStoreWeightSync, student, version: int, broker, buffer, rank: int) -> None:
    """Every rank publishes (ZeRO-3 gathers); rank 0 hands the handle on and advances the buffer."""
    handle = sync.publish(student, version)
    if rank == 0:
        ray.get(broker.publish.remote([handle]))
        ray.get(buffer.set_policy_version.remote(version))


def _system_metrics(buffer, worker_names: list[str]) -> dict:
    buf = ray.get(buffer.metrics.remote())
    stats = ray.get([ray.get_actor(n).stats.remote() for n in worker_names])
    return {"buffer/fill": buf["fill"], "buffer/age_mean": buf["age_mean"], "buffer/age_max": buf["age_max"],
            "buffer/dropped_stale": buf["dropped_stale"],
            "rollout/fps": sum(s["fps"] for s in stats), "rollout/samples": sum(s["samples"] for s in stats),
            "rollout/min_policy_version": min(s["policy_version"] for s in stats)}


def report(metrics: dict, step: int, student_engine, critic_engine, ema: EMA | None, feed, cfg: Config, rank: int,
           save: bool) -> None:
    """Report on every rank (Ray Train expects it); with `save`, every rank writes its shards first."""
    reported = {k: v for k, v in metrics.items() if v is not None} | {"step": step}
    if not save:
        ray.train.report(reported)
        return
    with tempfile.TemporaryDirectory() as d:
        student_engine.save_checkpoint(str(Path(d) / "student"), tag="state")
        critic_engine.save_checkpoint(str(Path(d) / "critic"), tag="state")
        feed_position = ray.get(feed.position.remote())
        whole_ema = save_ema(ema, Path(d), rank)
        if rank == 0:
            torch.save({"step": step, "ema": whole_ema, "feed_position": feed_position}, Path(d) / STATE_FILE)
        ray.train.report(reported, checkpoint=Checkpoint.from_directory(d))
    if rank == 0:
        write_progress(cfg, "dmd", step, feed_position=feed_position)
