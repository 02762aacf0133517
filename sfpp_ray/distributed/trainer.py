"""Trainer role: Self-Forcing++ DMD on rollout windows, one Ray Train worker per rank.

Per step, on every rank:
  0. a window that grew older than buffer.max_staleness while Ray Data held it is replaced by one made
     from the buffer now (data_pipeline.fresh_row);
  1. critic step: flow matching on the window's clean latents (the critic tracks the student);
  2. every `dmd.update_ratio` steps, generator step: the student's cache is prefilled with the
     rollout's own frames before the window, the backward-noised window is re-generated with
     gradient at one exit step, and DMD against the frozen teacher and the critic updates it;
  3. every `trainer.sync_every` steps the student's weights are published to the rollout workers
     (every rank takes part: ZeRO-3 gathers are collectives), and the buffer learns the version;
  4. every `trainer.checkpoint_every` steps, a checkpoint every rank writes its shards into.
At the end the student is saved as the moving average of its weights (trainer.ema_decay > 0), as
inference and the GRPO stage want it; the rollout workers always ran the live weights.
Student and critic are DeepSpeed engines; the teacher is frozen and sharded with ZeRO-3 only when
training shards with ZeRO-3 too. Rank 0 logs to MLflow.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from pathlib import Path

import deepspeed
import ray
import ray.train
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from ray.train import Checkpoint

from sfpp_ray import components
from sfpp_ray.algorithm.dmd import EMA, critic_loss, dmd_generator_loss, is_generator_step
from sfpp_ray.algorithm.rollout import prefill, rollout
from sfpp_ray.config import Config, from_dict
from sfpp_ray.distributed.data_pipeline import fresh_row
from sfpp_ray.distributed.weight_sync import ObjectStoreWeightSync
from sfpp_ray.tracking import Tracker

STATE_FILE = "trainer_state.pt"
EMA_SHARD_FILE = "ema_rank{rank}.pt"  # a rank's part of the moving average (EMA.split)
REPLACEMENT_ROWS = 1 << 40  # row ids of the rows made in place of stale ones: past any dataset's, one range a rank
# In the run dir, per resumable stage: the controller's view of the stage's last checkpoint
PROGRESS_FILES = {"dmd": "trainer_progress.json", "pretrain_teacher": "teacher_progress.json"}
STAGE_MARKER = "stage.json"  # written last into a stage's output dir: the stage finished


def write_marker(directory: Path, record: dict) -> None:
    """Mark a stage's output directory finished, with what the controller and tests read back."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STAGE_MARKER).write_text(json.dumps(record, indent=2) + "\n")


def deepspeed_config(cfg: Config, lr: float, betas: list[float] | None = None, autocast: bool = False) -> dict:
    """AdamW under the trainer's ZeRO stage; `betas` default to trainer.betas (DMD's, without momentum);
    torch's fused AdamW where trainer.fused_optimizer.
    autocast: the engine runs its forward under bfloat16 autocast (weights and optimizer stay as they
    are); DeepSpeed switches off any autocast opened around the engine, so this is the only way in."""
    t = cfg.trainer
    adamw = {"lr": lr, "betas": list(betas or t.betas), "weight_decay": t.weight_decay, "torch_adam": True}
    return ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}} if autocast else {}) | {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": t.zero_stage},
        "optimizer": {"type": "AdamW", "params": adamw | ({"fused": True} if t.fused_optimizer else {})},
        # Under ZeRO-0 with float32 weights DeepSpeed clips with a routine that copies two numbers from the host
        # to the device each step, which waits for the GPU to finish the step; `optimizer_step` clips there instead.
        "gradient_clipping": 0.0 if trainer_clips(cfg) else t.grad_clip,
        "bf16": {"enabled": t.bf16},
    }


def trainer_clips(cfg: Config) -> bool:
    """The trainer, not DeepSpeed, clips the gradients: ZeRO-0 without DeepSpeed's bf16 optimizer."""
    return cfg.trainer.zero_stage == 0 and not cfg.trainer.bf16 and cfg.trainer.grad_clip > 0


def optimizer_step(engine, cfg: Config) -> torch.Tensor | None:
    """engine.step(), with the gradients clipped to trainer.grad_clip first where DeepSpeed does not (see
    deepspeed_config): torch's clipping keeps the norm and the factor on the device. Under ZeRO-0 the
    gradients are whole and already averaged over ranks after the backward of a boundary micro-batch.
    Returns the gradients' norm before clipping, on the device, where the trainer clipped; else None."""
    norm = None
    if trainer_clips(cfg) and engine.is_gradient_accumulation_boundary():
        norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(), cfg.trainer.grad_clip, foreach=True)
    engine.step()
    return norm


def lr_factor(step: int, steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): linear warmup over
    `warmup_steps`, then constant or a cosine down to a tenth at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, steps - 1 - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def full_params(module: torch.nn.Module, zero3: bool, from_partitions: bool = False):
    """All of a module's parameters, gathered under ZeRO-3 (a collective: every rank enters).
    from_partitions: gather every parameter from its partitions, also those ZeRO-3 holds whole at the moment
    (small ones it keeps on every rank, or any still gathered since a forward), which a gather would
    otherwise take as they stand: needed after writing the partitions themselves (EMA.copy_to)."""
    if not zero3:
        return contextlib.nullcontext()
    params = list(module.parameters())
    if from_partitions:
        whole = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
        if whole:
            whole[0].partition(param_list=whole)  # drops the whole copies; the partitions stay
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def save_ema(ema: EMA | None, directory: Path, rank: int) -> dict | None:
    """Into a checkpoint: each rank writes its own part of a split average; a whole one (one rank) is
    returned for rank 0's state file."""
    if ema is not None and ema.split:
        torch.save(ema.state_dict(), directory / EMA_SHARD_FILE.format(rank=rank))
        return None
    return None if ema is None else ema.state_dict()


def load_ema(ema: EMA | None, directory: Path, rank: int, whole: dict | None) -> None:
    """From a checkpoint, as save_ema wrote it; an average the checkpoint lacks starts from the weights."""
    shard = directory / EMA_SHARD_FILE.format(rank=rank)
    saved = torch.load(shard, weights_only=False) if shard.is_file() else whole
    if ema is not None and saved is not None:
        ema.load_state_dict(saved)


def frozen_teacher(cfg: Config, device, dtype):
    """The frozen teacher; sharded with ZeRO-3 (no optimizer) only when the trainers shard with ZeRO-3."""
    teacher = components.build_teacher(cfg)
    if world_size() > 1 and cfg.trainer.zero_stage == 3:
        ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "bf16": {"enabled": cfg.trainer.bf16}}
        engine, *_ = deepspeed.initialize(model=teacher, config=ds)
        return engine.module
    return components.cast(teacher, device, dtype)


def generator_step(student_engine, teacher, critic, batch: dict, schedule, timesteps, cfg: Config,
                   generator: torch.Generator) -> dict:
    """Re-generate the window on top of the rollout's own context, then one DMD update."""
    student = student_engine.module
    latents, noisy = batch["latents"], batch["noisy"]
    B, _, _, H, W = latents.shape
    window_start = int(batch["window_start"][0]) if cfg.data.training_rolling_cache else 0
    cross = student.cross_attention_cache(batch["text"])
    cache = student.new_cache(B, H, W, dtype=latents.dtype, device=latents.device)
    prefill(student, cross, cache, latents[:, :, :window_start], cfg.schedule.context_noise, schedule=schedule,
            generator=generator)
    x0 = rollout(student, cross, noisy, timesteps, schedule, cache=cache, context_noise=cfg.schedule.context_noise,
                 start_step=int(batch["start_step"][0]), exit_step=int(batch["exit_step"][0]),
                 generator=generator).latents
    loss, info = dmd_generator_loss(x0, teacher, critic, batch["text"], batch["uncond"], schedule, cfg.dmd, generator)
    student_engine.backward(loss)
    norm = optimizer_step(student_engine, cfg)
    return {"loss/generator": loss.item(), "dmd/grad_norm": info["dmd_grad_norm"],
            "grad_norm/generator": _grad_norm(student_engine, norm)}


def critic_step(critic_engine, batch: dict, schedule, cfg: Config, generator: torch.Generator) -> dict:
    loss, _ = critic_loss(batch["window"], critic_engine, batch["text"], schedule, cfg.dmd, generator)
    critic_engine.backward(loss)
    norm = optimizer_step(critic_engine, cfg)
    return {"loss/critic": loss.item(), "grad_norm/critic": _grad_norm(critic_engine, norm)}


def _grad_norm(engine, clipped_by_trainer: torch.Tensor | None) -> float | None:
    """The update's gradient norm before clipping: the trainer's under ZeRO-0, else what DeepSpeed kept."""
    norm = clipped_by_trainer if clipped_by_trainer is not None else engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. config: {"cfg": Config dict, "actors": names, "mlflow_run_id", "total_steps",
    "data_seed": the dataset's seed, for rows made in place of stale ones}."""
    cfg = from_dict(config["cfg"])
    names = config["actors"]
    buffer, broker = ray.get_actor(names["buffer"]), ray.get_actor(names["broker"])
    feed = ray.get_actor(names["feed"])
    rank, world = global_rank(), world_size()
    device = ray.train.torch.get_device() if cfg.trainer.gpus_per_worker > 0 else torch.device("cpu")
    dtype = torch.bfloat16 if cfg.trainer.bf16 else components.resolve_dtype(cfg)
    zero3 = cfg.trainer.zero_stage == 3
    torch.manual_seed(cfg.run.seed)  # same init on every rank before DeepSpeed broadcasts/partitions

    student_engine, *_ = deepspeed.initialize(model=components.build_student(cfg),
                                              config=deepspeed_config(cfg, cfg.trainer.generator_lr))
    critic_engine, *_ = deepspeed.initialize(model=components.build_critic(cfg),
                                             config=deepspeed_config(cfg, cfg.trainer.critic_lr))
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
            state = torch.load(Path(d) / STATE_FILE, weights_only=False)
            load_ema(ema, Path(d), rank, state["ema"])
        step = state["step"]
        # Rollout workers were rebuilt from the initial weights: give them the checkpoint's.
        publish(sync, student_engine.module, step, broker, buffer, rank)
    total = config["total_steps"]
    generator = torch.Generator(device=device).manual_seed(cfg.run.seed * 1000 + rank + 7919 * step)

    published = step  # the version the buffer measures staleness against (rollouts start from version 0)
    replaced = 0
    tracker = None
    if rank == 0:
        tracker = Tracker(cfg.tracking, cfg.run_dir, cfg.run.name)
        tracker.start(resume_run_id=config["mlflow_run_id"])
        print(f"trainer: {world} ranks, ZeRO-{cfg.trainer.zero_stage}, steps {step + 1}..{total}")
    try:
        shard = ray.train.get_dataset_shard("train")
        for batch in shard.iter_torch_batches(batch_size=1, device=device):
            if step >= total:
                break
            step += 1
            t0 = time.perf_counter()
            version = int(batch["policy_version"][0])  # the weights the rollout was made with
            while published - version > cfg.buffer.max_staleness:
                row = fresh_row(buffer, cfg, config["data_seed"], REPLACEMENT_ROWS * (rank + 1) + replaced)
                batch = {k: torch.as_tensor(v, device=device) for k, v in row.items()}
                version, replaced = int(row["policy_version"][0]), replaced + 1
            batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
            metrics = critic_step(critic_engine, batch, schedule, cfg, generator)
            if is_generator_step(step, cfg.dmd.update_ratio):
                metrics.update(generator_step(student_engine, teacher, critic_engine, batch, schedule, timesteps,
                                              cfg, generator))
                if ema is not None:
                    ema.update(student_engine.module, step)
            metrics["time/step"] = time.perf_counter() - t0
            # How many updates old the consumed rollout is, and how many rows that Ray Data fetched ahead
            # outlived buffer.max_staleness and were made again.
            metrics["data/staleness"] = float(step - 1 - version)
            metrics["data/replaced_stale"] = float(replaced)
            if step % cfg.trainer.sync_every == 0 or step == total:
                t1 = time.perf_counter()
                publish(sync, student_engine.module, step, broker, buffer, rank)
                published = step
                metrics["time/sync"] = time.perf_counter() - t1
            if rank == 0:
                metrics.update(_system_metrics(buffer, names["rollout_workers"]))
                tracker.log_metrics(metrics, step)
            save = step % cfg.trainer.checkpoint_every == 0 or step == total
            report(metrics, step, student_engine, critic_engine, ema, feed, cfg, rank, save)
        if ema is not None:
            ema.copy_to(student_engine.module)  # training is over: the average is the saved student
        with full_params(student_engine.module, zero3, from_partitions=True):
            if rank == 0:
                student_engine.module.save_pretrained(cfg.run_dir / "student")
                write_marker(cfg.run_dir / "student", {"steps": total, "ema": ema is not None})
    finally:
        if tracker is not None:
            tracker.finish()


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


def write_progress(cfg: Config, stage: str, step: int, **extra) -> None:
    """After a stage's checkpoint, from rank 0: its step, and the ranks and ZeRO stage its shards were laid out for."""
    progress = {"step": step, "ranks": world_size(), "zero_stage": cfg.trainer.zero_stage, **extra}
    (cfg.run_dir / PROGRESS_FILES[stage]).write_text(json.dumps(progress) + "\n")
