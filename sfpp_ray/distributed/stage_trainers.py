"""Trainer role for the stages around DMD, one Ray Train worker per rank, on the DMD trainer's stack.

  pretrain_teacher  flow matching of the bidirectional teacher on world clips
  ode               teacher ODE pairs (made by the ranks, written by rank 0), then block-causal
                    regression of the student onto them
  grpo              groups of recorded rollouts of one prompt, scored by the optical-flow reward,
                    PPO-clipped with a KL to the frozen pre-GRPO student

Each loop trains a DeepSpeed engine, averages its metrics over ranks, logs them from rank 0 into
the run's MLflow run, and ends with rank 0 saving the model and the stage marker. ODE and GRPO are
short and restart from their beginning if interrupted; teacher pretraining (with
teacher_pretrain.checkpoint_every) and DMD go on from their last checkpoint. Every rank
draws its own data from generators seeded by (rank, step), so a rank's data depends only on
where it is, never on what ran before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path

import deepspeed
import ray.train
import torch
import torch._dynamo  # its counters tell how many graphs a compiled teacher became
import torch.distributed as dist

from sfpp_ray import components
from sfpp_ray.algorithm.dmd import EMA, critic_loss
from sfpp_ray.algorithm.grpo import group_advantages, grpo_backward, trajectory_log_prob
from sfpp_ray.algorithm.ode_init import Guide, OdePairStore, make_ode_trajectories, ode_regression_loss
from sfpp_ray.algorithm.reward import batch_flow_rewards
from sfpp_ray.algorithm.rollout import rollout
from sfpp_ray.config import Config, ema_dir, from_dict, guide_dir
from sfpp_ray.distributed.trainer import (STATE_FILE, deepspeed_config, full_params, global_rank, load_ema, lr_factor,
                                         optimizer_step, save_ema, world_size, write_marker, write_progress)
from sfpp_ray.evaluation.evaluate import world_of
from sfpp_ray.tracking import Tracker
from sfpp_ray.video_io import to_uint8
from sfpp_ray.models.text_encoder import PromptConditioned
from sfpp_ray.world.clips import WorldClipStream, clip_latents, sprite_loss_weight
from sfpp_ray.world.sprites import prompt, sample_scenes

PROMPT_DROPOUT = 0.1  # teacher prompts replaced by the negative prompt, so guidance has an unconditional model
TEACHER_BETAS = [0.9, 0.999]  # flow matching on data is ordinary supervised training: Adam with momentum
READ_BACK_EVERY = 20  # teacher steps between reads of the loss from the GPU
ODE_SCENE_OFFSET = 100_000  # ODE prompts are world scenes apart from the teacher's per-step scenes


def stage_dtype(cfg: Config) -> torch.dtype:
    """The dtype the stages build their models and data in: bfloat16 under DeepSpeed's bf16, else run.dtype."""
    return torch.bfloat16 if cfg.trainer.bf16 else components.resolve_dtype(cfg)


def _setup(config: dict) -> tuple[Config, torch.device, torch.dtype]:
    cfg = from_dict(config["cfg"])
    device = ray.train.torch.get_device() if cfg.trainer.gpus_per_worker > 0 else torch.device("cpu")
    dtype = stage_dtype(cfg)
    torch.manual_seed(cfg.run.seed)  # same init on every rank before DeepSpeed broadcasts/partitions
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # float32 runs as TF32 on GPUs
    return cfg, device, dtype


def _generator(cfg: Config, device: torch.device, stream: int, step: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(cfg.run.seed * 1000 + stream + 7919 * step)


@contextlib.contextmanager
def _rank0_tracker(cfg: Config, run_id: str | None):
    """Rank 0 logs into the controller's MLflow run; other ranks get None."""
    if global_rank() != 0:
        yield None
        return
    tracker = Tracker(cfg.tracking, cfg.run_dir, cfg.run.name)
    tracker.start(resume_run_id=run_id)
    try:
        yield tracker
    finally:
        tracker.finish()


def _step_done(tracker: Tracker | None, metrics: dict[str, float], step: int, device: torch.device) -> dict:
    """Average the step's metrics over ranks and log them from rank 0. Ray Train hears of the stage
    once, at its end (`_finish`): a report is a round trip to the train controller, which costs
    more than a toy step."""
    world = world_size()
    if world > 1:
        values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=device)
        dist.all_reduce(values)
        metrics = dict(zip(metrics, (values / world).tolist()))
    if tracker is not None:
        tracker.log_metrics(metrics, step)
    return metrics


def _finish(engine, cfg: Config, name: str, record: dict, metrics: dict, step: int) -> None:
    """Rank 0 writes the model to run_dir/name and then its marker (ZeRO-3 gathers on every rank);
    every rank reports the last step's metrics."""
    with full_params(engine.module, cfg.trainer.zero_stage == 3, from_partitions=True):  # the EMA may be in them
        if global_rank() == 0:
            engine.module.save_pretrained(cfg.run_dir / name)
            write_marker(cfg.run_dir / name, record)
    ray.train.report(metrics | {"step": step})


# ---------------------------------------------------------------- teacher pretraining


class TeacherTraining:
    """The teacher stage's engine, moving average and step (flow matching on a batch of world clips, backward,
    the optimizer, the average), built as the stage builds them on each rank: the stage's loop and
    benchmarks/teacher_step.py run the same step."""

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype, rank: int = 0, world: int = 1):
        tp = cfg.teacher_pretrain
        self.cfg, self.device, self.dtype, self.rank, self.world = cfg, device, dtype, rank, world
        self.text = components.build_text_encoder(cfg, device, dtype)
        model = components.build_critic(cfg)
        if tp.train_text_encoder:
            model = PromptConditioned(model, self.text)  # takes token ids; saves the encoder beside the teacher
        self.engine, *_ = deepspeed.initialize(
            model=model, config=deepspeed_config(cfg, tp.lr, betas=TEACHER_BETAS, autocast=tp.autocast),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lambda i: lr_factor(i, tp.steps, tp.warmup_steps, tp.lr_schedule)))
        if tp.compile != "none":  # in place: the module's keys, saving and the EMA are unchanged
            self.engine.compile(backend=tp.compile, compile_kwargs={"mode": tp.compile_mode})
        self.cuda_graphs = tp.compile_mode == "reduce-overhead" and device.type == "cuda"
        average = lambda decay: EMA(self.engine.module, decay, tp.ema_start_step,
                                    partitioned=cfg.trainer.zero_stage == 3, ranks=world, rank=rank)
        self.ema = None if tp.ema_decay <= 0 else average(tp.ema_decay)
        self.extra_emas = {decay: average(decay) for decay in tp.extra_ema_decays}  # saved beside the teacher
        self.averages = [e for e in (self.ema, *self.extra_emas.values()) if e is not None]  # updated each step
        self.codec = components.build_video_codec(cfg, device, dtype)
        self.schedule = components.build_schedule(cfg)
        self.uncond = None if tp.train_text_encoder else self.text.encode([cfg.text.negative_prompt])
        self.noise_levels = dataclasses.replace(cfg.dmd, timestep_shift=tp.timestep_shift,
                                                timestep_distribution=tp.timestep_distribution)

    def clips(self, first: int, steps: int) -> WorldClipStream:
        """This rank's batches of steps first..first+steps-1."""
        tp = self.cfg.teacher_pretrain
        return WorldClipStream(world_of(self.cfg), self.codec.video_frames(self.cfg.video.teacher_frames),
                               tp.batch_size, self.cfg.run.seed, first=first, steps=steps, rank=self.rank,
                               world_size=self.world, prompt_dropout=PROMPT_DROPOUT, coverage=tp.sprite_weight > 0)

    def step(self, batch: dict) -> torch.Tensor:
        """One optimizer step on a batch of `clips`; the loss comes back on the device (reading it waits for the GPU)."""
        cfg, tp, device, text = self.cfg, self.cfg.teacher_pretrain, self.device, self.text
        if self.cuda_graphs:  # a new step: the graphs may reuse the memory of the last step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        latents = clip_latents(batch["frames"], self.codec, device, self.dtype)
        if tp.train_text_encoder:  # dropped prompts become the negative prompt before tokenizing
            cond = text.tokenize([cfg.text.negative_prompt if drop else p
                                  for p, drop in zip(batch["prompts"], batch["drop"].tolist())])
        else:
            cond = torch.where(batch["drop"].to(device)[:, None, None], self.uncond, text.encode(batch["prompts"]))
        weight = None if tp.sprite_weight == 0 else sprite_loss_weight(
            batch["coverage"].to(device, non_blocking=True), latents.shape, tp.sprite_weight)
        loss, _ = critic_loss(latents, self.engine, cond, self.schedule, self.noise_levels,
                              _generator(cfg, device, self.rank, batch["step"]), weight)
        self.engine.backward(loss)
        optimizer_step(self.engine, cfg)
        for average in self.averages:
            average.update(self.engine.module, batch["step"])
        return loss.detach()


def pretrain_teacher_loop(config: dict) -> None:
    """Ray Train entry point. config: {"cfg": Config dict, "mlflow_run_id"}. Each rank trains on
    teacher_pretrain.batch_size clips a step, rendered ahead by teacher_pretrain.data_workers processes;
    with teacher_pretrain.ema_decay > 0 the saved teacher is the moving average of its weights; with
    teacher_pretrain.train_text_encoder the text encoder trains with it and is saved in the teacher's directory."""
    cfg, device, dtype = _setup(config)
    tp, rank, world = cfg.teacher_pretrain, global_rank(), world_size()
    training = TeacherTraining(cfg, device, dtype, rank, world)
    engine, ema = training.engine, training.ema
    done, losses = 0, []
    checkpoint = ray.train.get_checkpoint()  # the last one of an interrupted run of this stage
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(str(Path(d) / "teacher"), tag="state")
            state = torch.load(Path(d) / STATE_FILE, weights_only=False)
            load_ema(ema, Path(d), rank, state["ema"])
        done, losses = state["step"], state["losses"]
        if rank == 0:
            print(f"[pretrain_teacher] resumed at step {done}", flush=True)
    clips = training.clips(first=done + 1, steps=tp.steps - done)
    t0 = time.perf_counter()
    deadline = t0 + 60 * tp.time_limit_minutes if tp.time_limit_minutes > 0 else None
    metrics, unread, step = {}, [], done  # unread: (step, loss on the device, lr) not yet read back
    out_of_time = False
    with _rank0_tracker(cfg, config["mlflow_run_id"]) as tracker:
        def read_back() -> tuple[dict, bool]:
            """Reading a loss waits for the GPU to finish the step; done every few steps, the GPU's queue stays full.
            Also whether any rank is past teacher_pretrain.time_limit_minutes, in the same all-reduce, so that all
            ranks stop at the same step."""
            late = deadline is not None and time.perf_counter() > deadline
            values = torch.cat([torch.stack([loss for _, loss, _ in unread]).float(),
                                torch.tensor([float(late)], device=unread[0][1].device)])
            if world > 1:
                dist.all_reduce(values)
                values /= world
            *values, late_share = values.tolist()
            for (step, _, lr), value in zip(unread, values):
                losses.append(value)
                if tracker is not None:
                    tracker.log_metrics({"teacher/loss": value, "teacher/lr": lr}, step)
            last_lr = unread[-1][2]
            unread.clear()
            return {"teacher/loss": losses[-1], "teacher/lr": last_lr}, late_share > 0

        for batch in clips.loader(tp.data_workers, pin_memory=device.type == "cuda"):
            step = batch["step"]
            loss = training.step(batch)
            if step in tp.guide_steps:  # a weaker model of the same data
                _save_average(engine, ema, cfg, guide_dir(cfg.run_dir / "teacher", step))
            unread.append((step, loss, engine.get_lr()[0]))
            printing = step % max(1, tp.steps // 10) == 0 or step == tp.steps
            checkpointing = tp.checkpoint_every and step % tp.checkpoint_every == 0 and step < tp.steps
            if printing or checkpointing or len(unread) == READ_BACK_EVERY:  # printing: also the last step
                metrics, out_of_time = read_back()
            if rank == 0 and (printing or out_of_time):
                print(f"[pretrain_teacher] step {step}/{tp.steps}  loss {metrics['teacher/loss']:.4f}  "
                      f"{(step - done) / (time.perf_counter() - t0):.1f} steps/s", flush=True)
            if checkpointing:
                _save_teacher_state(engine, ema, losses, metrics, step)
                if rank == 0:
                    write_progress(cfg, "pretrain_teacher", step)
            if out_of_time and step < tp.steps:
                if rank == 0:
                    unsaved = [k for k in tp.guide_steps if k > step]
                    print(f"[pretrain_teacher] stopped at step {step} of {tp.steps}: past "
                          f"teacher_pretrain.time_limit_minutes={tp.time_limit_minutes:g}"
                          + (f"; the guides of steps {unsaved} (teacher_pretrain.guide_steps) were not saved"
                             if unsaved else ""), flush=True)
                break
    for decay, average in training.extra_emas.items():
        _save_average(engine, average, cfg, ema_dir(cfg.run_dir / "teacher", decay))
    if ema is not None:
        ema.copy_to(engine.module)  # the average is the published teacher
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # more than one: the trace broke somewhere
    _finish(engine, cfg, "teacher", {"steps": step, "planned_steps": tp.steps, "losses": losses,
                                     "ema": tp.ema_decay > 0, "extra_emas": tp.extra_ema_decays, "resumed_from": done,
                                     "seconds": time.perf_counter() - t0, "compiled_graphs": graphs}, metrics, step)


def _save_average(engine, ema: EMA | None, cfg: Config, directory: Path) -> None:
    """The teacher as a moving average has it (the live weights where there is none), with its text encoder when
    trained with it, saved to `directory`: a guide for autoguidance (ode.guide) or an extra average. Every rank
    takes part; training goes on with its live weights."""
    with ema.swapped_in(engine.module) if ema is not None else contextlib.nullcontext():
        with full_params(engine.module, cfg.trainer.zero_stage == 3, from_partitions=True):
            if global_rank() == 0:
                engine.module.save_pretrained(directory)


def _save_teacher_state(engine, ema: EMA | None, losses: list[float], metrics: dict, step: int) -> None:
    """Every rank writes its engine shards (weights, optimizer, LR schedule), rank 0 the step, losses and
    EMA; Ray Train keeps the directory as the stage's latest checkpoint."""
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(str(Path(d) / "teacher"), tag="state")
        whole_ema = save_ema(ema, Path(d), global_rank())
        if global_rank() == 0:
            torch.save({"step": step, "losses": losses, "ema": whole_ema}, Path(d) / STATE_FILE)
        ray.train.report(metrics | {"step": step}, checkpoint=ray.train.Checkpoint.from_directory(d))


# ---------------------------------------------------------------- ODE initialisation


def _ode_shard(teacher, cfg: Config, start: int, n: int, text, codec, schedule, timesteps, uncond, device, dtype,
               guide=None):
    """Pairs start..start+n: prompts and noise depend only on `start`, not on which rank makes them.
    guide: (model, text encoder) of ode.guide when autoguidance is on."""
    prompts = [prompt(s) for s in sample_scenes(cfg.run.seed * 1000 + ODE_SCENE_OFFSET + start, n, "train",
                                                world_of(cfg))]
    g = _generator(cfg, device, ODE_SCENE_OFFSET, start)
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
    cfg, device, dtype = _setup(config)
    rank = global_rank()
    text = components.build_text_encoder(cfg, device, dtype)
    codec = components.build_video_codec(cfg, device, dtype)
    schedule = components.build_schedule(cfg)
    timesteps = schedule.student_timesteps(cfg.schedule)
    uncond = text.encode([cfg.text.negative_prompt])
    store = ode_pairs(cfg, text, codec, schedule, timesteps, uncond, device, dtype)
    engine, *_ = deepspeed.initialize(model=components.build_student(cfg), config=deepspeed_config(cfg, cfg.ode.lr))
    losses = []
    with _rank0_tracker(cfg, config["mlflow_run_id"]) as tracker:
        for step in range(1, cfg.ode.steps + 1):
            g = _generator(cfg, device, rank, step)
            idx = torch.randint(0, len(store), (cfg.ode.batch_size,), generator=g, device=device).tolist()
            pairs = [store.load(i) for i in idx]
            trajectories = torch.stack([p[0] for p in pairs]).to(device, dtype)
            loss = ode_regression_loss(engine.module, trajectories, timesteps, text.encode([p[1] for p in pairs]),
                                       schedule, g)
            engine.backward(loss)
            optimizer_step(engine, cfg)
            metrics = _step_done(tracker, {"ode/loss": loss.item()}, step, device)
            losses.append(metrics["ode/loss"])
    _finish(engine, cfg, "student_ode", {"steps": cfg.ode.steps, "losses": losses, "pairs": len(store)}, metrics,
            cfg.ode.steps)


# ---------------------------------------------------------------- GRPO


def grpo_loop(config: dict) -> None:
    """Ray Train entry point. config: {"cfg": Config dict (student.checkpoint: the DMD student), "prompts",
    "mlflow_run_id"}. Each rank takes its own prompt per step and rolls out a group for it."""
    cfg, device, dtype = _setup(config)
    gp, rank, world, prompts = cfg.grpo, global_rank(), world_size(), config["prompts"]
    parts = gp.group_size // gp.micro_batch if gp.micro_batch else 1  # replayed one after another, one update
    engine, *_ = deepspeed.initialize(model=components.build_student(cfg),
                                      config=deepspeed_config(cfg, gp.lr) | {"gradient_accumulation_steps": parts})
    reference = components.build_student(cfg, device, dtype).eval().requires_grad_(False)
    text = components.build_text_encoder(cfg, device, dtype)
    codec = components.build_video_codec(cfg, device, dtype)
    schedule = components.build_schedule(cfg)
    timesteps = schedule.student_timesteps(cfg.schedule)
    ctx = cfg.schedule.context_noise
    rewards_seen = []

    def accumulate(loss: torch.Tensor, weight: float) -> None:  # the engine divides by `parts` itself
        engine.backward(loss)
        optimizer_step(engine, cfg)  # updates the weights after the last part only

    with _rank0_tracker(cfg, config["mlflow_run_id"]) as tracker:
        for step in range(1, gp.steps + 1):
            student, g = engine.module, _generator(cfg, device, rank, step)
            cond = text.encode([prompts[((step - 1) * world + rank) % len(prompts)]] * gp.group_size)
            # Shared initial noise: the group differs only by the sampler's own noise, the policy's randomness.
            shape = components.latent_shape(cfg, codec, cfg.rollout.num_frames, 1 if gp.shared_noise else gp.group_size)
            noise = torch.randn(shape, generator=g, device=device, dtype=dtype).expand(gp.group_size, *shape[1:])
            with torch.no_grad():
                out = rollout(student, student.cross_attention_cache(cond), noise, timesteps, schedule,
                              context_noise=ctx, record=True, generator=g)
                videos = [to_uint8(v) for v in codec.decode(out.latents)]
                _, ref_means = trajectory_log_prob(reference, reference.cross_attention_cache(cond), out.steps,
                                                   out.latents, timesteps, schedule, ctx)
            rewards = batch_flow_rewards(videos, gp.min_motion, gp.reward, gp.raft_weights)
            advantages = group_advantages(torch.from_numpy(rewards)[None], gp.advantage_clip)[0].to(device)
            info = grpo_backward(student, cond, out.steps, out.latents, advantages, ref_means, timesteps, schedule,
                                 ctx, gp, accumulate)
            metrics = _step_done(tracker, {"grpo/loss": info["loss"], "grpo/reward": float(rewards.mean()),
                                           "grpo/kl": info["kl"], "grpo/clip_frac": info["clip_frac"]}, step, device)
            rewards_seen.append(metrics["grpo/reward"])
    _finish(engine, cfg, "student_grpo", {"steps": gp.steps, "rewards": rewards_seen}, metrics, gp.steps)
