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
  4. every `trainer.checkpoint_every` steps (0: only at the end), a checkpoint every rank writes its shards into,
     with the run's resume state (RESUME_FILE: step, prompt feed, buffer counters) from rank 0.
A rank restarted by Ray Train (trainer.max_failures) goes on from the last registered checkpoint: it publishes that
checkpoint's weights as a new epoch (rollout workers drop what they hold, the buffer drops samples of later
versions). Steps after the checkpoint that MLflow already holds are trained again but not logged again.
At the end the student is saved as the moving average of its weights (trainer.ema_decay > 0), as
inference and the GRPO stage want it; the rollout workers always ran the live weights.
Student and critic are DeepSpeed engines; the teacher is frozen and sharded with ZeRO-3 only when
training shards with ZeRO-3 too. Rank 0 logs to MLflow.
"""

from __future__ import annotations

import json
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
from sfpp_ray.config import Config, rebuilt
from sfpp_ray.distributed.data_pipeline import fresh_row
from sfpp_ray.distributed.engine import (RESUME_FILE, STATE_FILE, BadSteps, deepspeed_config, engine_update,
                                         frozen_teacher, full_params, global_rank, load_ema, save_ema, save_student,
                                         stage_dtype, world_size, write_marker)
from sfpp_ray.distributed.progress import report_progress
from sfpp_ray.distributed.weight_sync import ObjectStoreWeightSync
from sfpp_ray.seeding import seed_for
from sfpp_ray.tracking import Tracker


def dmd_loop(config: dict) -> None:
    """Ray Train entry point. config: {"cfg": Config dict, "actors": names, "mlflow_run_id", "total_steps",
    "fault_hook"}. fault_hook(point, step, rank, actors), when given, is called at "after_report" (a step's
    report returned, its checkpoint not yet registered): how tests stop a run at the moments that matter."""
    cfg = rebuilt(config["cfg"])
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

    step, replaced = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            student_engine.load_checkpoint(str(Path(d) / "student"), tag="state")
            critic_engine.load_checkpoint(str(Path(d) / "critic"), tag="state")
            state = torch.load(Path(d) / STATE_FILE, weights_only=True)
            load_ema(ema, Path(d), rank, state["ema"])
            replaced = json.loads((Path(d) / RESUME_FILE).read_text())["replaced"]
        step = state["step"]
    # Rollout workers hold the initial weights (a new run's controller built them) or a dead attempt's later ones
    # (Ray Train restarted this group): either way they get this checkpoint's, or the initial weights again.
    if checkpoint is not None or call(broker.history.remote(), "the weight broker"):
        publish(sync, student_engine.module, step, broker, buffer, rank, rewind=True)
    total, hook = config["total_steps"], config.get("fault_hook")

    published = step  # the version the buffer measures staleness against (rollouts start from version 0)
    tracker, logged_through, served = None, 0, None
    if rank == 0:
        call(buffer.reset_read_ahead.remote(), "the rollout buffer")  # a new pipeline: nothing drawn ahead yet
        served = call(buffer.metrics.remote(), "the rollout buffer")["served"]
        tracker = Tracker(cfg.tracking, cfg.run_dir, cfg.run.name)
        tracker.start(resume_run_id=config["mlflow_run_id"])
        logged_through = tracker.last_step(STEP_KEY)
        print(f"trainer: {world} ranks, ZeRO-{cfg.trainer.zero_stage}, {B} windows a rank a step, "
              f"steps {step + 1}..{total}" + (f"; MLflow holds steps up to {logged_through} already, which are "
                                               "trained again but not logged again" if logged_through > step else ""))
    step_ends, waits = [], []  # wall clock at each step's end, and how long each step waited for its batch
    generator_loss = None  # the last generator step's, for the progress line
    try:
        shard = ray.train.get_dataset_shard("train")
        t_ready = time.perf_counter()
        for batch in shard.iter_torch_batches(batch_size=B, device=device, drop_last=True):
            if step >= total:
                break
            step += 1
            t0 = time.perf_counter()
            waits.append(t0 - t_ready)
            stale = 0
            for i in range(B):  # the weights each rollout was made with
                stale += published - int(batch["policy_version"][i]) > cfg.buffer.max_staleness
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
            buffer.consumed.remote(B, stale)  # after the publish: rows drawn next are of the new weights
            if rank == 0:
                system, served = _system_metrics(buffer, feed, names["rollout_workers"], served)
                metrics.update(system)
                if step > logged_through:
                    tracker.log_metrics(metrics, step)
                generator_loss = metrics.get("loss/generator", generator_loss)
                report_progress(cfg.run_dir, "dmd", step, total, critic=metrics["loss/critic"], generator=generator_loss)
            every = cfg.trainer.checkpoint_every
            report(metrics, step, student_engine, critic_engine, ema, cfg, rank,
                   save=(every > 0 and step % every == 0) or step == total,
                   resume={"feed": feed, "buffer": buffer, "replaced": replaced})
            if hook is not None:
                hook("after_report", step, rank, names)
            t_ready = time.perf_counter()
            step_ends.append(t_ready)
        if ema is not None:
            ema.copy_to(student_engine.module)  # training is over: the average is the saved student
        with full_params(student_engine.module, zero3, from_partitions=True):
            if rank == 0:
                save_student(student_engine.module, cfg, cfg.run_dir / "student")
                write_marker(cfg.run_dir / "student", {"steps": total, "ema": ema is not None, "step_ends": step_ends,
                                                        "data_waits": waits})
    except BaseException:
        if tracker is not None:
            try:
                tracker.finish("FAILED")
            except Exception as e:  # the step's own error is the one to raise
                print(f"trainer: MLflow run not marked failed: {type(e).__name__}: {e}")
        raise
    if tracker is not None:
        tracker.finish()


def _float(norm) -> float | None:
    return None if norm is None else float(norm)


STEP_KEY = "loss/critic"  # logged at every DMD step: the step MLflow last holds
ACTOR_TIMEOUT_S = 60.0  # the buffer, broker and feed answer at once; silence this long means one is gone
METRICS_TIMEOUT_S = 5.0  # a step's metrics do without the roles that do not answer in this time


def call(ref, what: str, timeout: float = ACTOR_TIMEOUT_S):
    """ray.get with a deadline: an actor that died or hangs fails the step with its name, never blocks it."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"{what} did not answer in {timeout:g}s") from None


def publish(sync: ObjectStoreWeightSync, student, version: int, broker, buffer, rank: int, rewind: bool = False) -> None:
    """Every rank publishes (ZeRO-3 gathers); rank 0 hands the handle on and advances the buffer.
    rewind: a restarted trainer's checkpoint weights, older than what the rollout workers may hold."""
    handle = sync.publish(student, version)
    if rank == 0:
        call(broker.publish.remote([handle], rewind=rewind), "the weight broker")
        call(buffer.set_policy_version.remote(version, rewind=rewind), "the rollout buffer")


def _answers(refs: list, timeout: float = METRICS_TIMEOUT_S) -> list:
    """Each ref's value, or None where its actor is dead, restarting or slower than `timeout`."""
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref) if ref in ready else None)
        except ray.exceptions.RayError as e:
            print(f"trainer: a rollout role did not answer for metrics: {type(e).__name__}")
            out.append(None)
    return out


def _system_metrics(buffer, feed, worker_names: list[str], served_before: int) -> tuple[dict, int]:
    """Buffer, read-ahead and rollout metrics from the roles that answer in time; a dead or restarting rollout
    worker is left out, never waited for. Returns them and the buffer's samples served so far."""
    workers = []
    for name in worker_names:
        try:
            workers.append(ray.get_actor(name).stats.remote())
        except ValueError:  # gone for good: its restarts ran out
            print(f"trainer: rollout worker {name} is gone")
    buf, fed, *stats = _answers([buffer.metrics.remote(), feed.stats.remote(), *workers])
    stats = [s for s in stats if s is not None]
    out = {"rollout/workers_answering": len(stats)}
    if stats:
        out |= {"rollout/fps": sum(s["fps"] for s in stats), "rollout/samples": sum(s["samples"] for s in stats),
                "rollout/min_policy_version": min(s["policy_version"] for s in stats)}
    if buf is not None:
        out |= {"buffer/fill": buf["fill"], "buffer/age_mean": buf["age_mean"], "buffer/age_max": buf["age_max"],
                "buffer/dropped_stale": buf["dropped_stale"], "buffer/dropped_aged": buf["dropped_aged"],
                "data/read_ahead": buf["read_ahead"],
                "data/read_ahead_max": buf["read_ahead_max"],
                # rows the pipeline drew ahead that the trainer threw away as older than buffer.max_staleness
                "data/stale_share": buf["discarded_stale"] / max(1, buf["served_ahead"]),
                "data/drawn_per_step": buf["served"] - served_before}  # rows the pipeline and the trainer drew
    if buf is not None and fed is not None:
        out |= {"rollout/worker_restarts": fed["worker_restarts"],
                "rollout/lost_samples": fed["lost_in_flight"] + buf["dropped_lost"] + buf["lost_served"]}
    return out, served_before if buf is None else buf["served"]


def report(metrics: dict, step: int, student_engine, critic_engine, ema: EMA | None, cfg: Config, rank: int,
           save: bool, resume: dict) -> None:
    """Report on every rank (Ray Train expects it); with `save`, every rank writes its shards first and rank 0 the
    run's resume state (RESUME_FILE), which the controller reads from the last registered checkpoint."""
    reported = {k: v for k, v in metrics.items() if v is not None} | {"step": step}
    if not save:
        ray.train.report(reported)
        return
    with tempfile.TemporaryDirectory() as d:
        student_engine.save_checkpoint(str(Path(d) / "student"), tag="state")
        critic_engine.save_checkpoint(str(Path(d) / "critic"), tag="state")
        whole_ema = save_ema(ema, Path(d), rank)
        if rank == 0:
            torch.save({"step": step, "ema": whole_ema}, Path(d) / STATE_FILE)
            feed, buffer = call(resume["feed"].state_dict.remote(), "the prompt feed"), call(
                resume["buffer"].state_dict.remote(), "the rollout buffer")
            (Path(d) / RESUME_FILE).write_text(json.dumps(
                {"step": step, "ranks": world_size(), "zero_stage": cfg.trainer.zero_stage, "feed": feed,
                 "buffer": buffer, "replaced": resume["replaced"]}) + "\n")
        ray.train.report(reported, checkpoint=Checkpoint.from_directory(d))
