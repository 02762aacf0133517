"""Teacher pretraining, one Ray Train worker per rank: flow matching of the bidirectional teacher on world clips.

Each rank trains on teacher_pretrain.batch_size clips a step, rendered ahead by teacher_pretrain.data_workers
processes and drawn from streams seeded by (rank, step), so a rank's data depends only on where it is. With
teacher_pretrain.checkpoint_every > 0 an interrupted stage goes on from its last checkpoint.
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
from sfpp_ray.algorithm.dmd import EMA, critic_step
from sfpp_ray.config import Config, ema_dir, guide_dir
from sfpp_ray.distributed.engine import (STATE_FILE, BadSteps, deepspeed_config, engine_update, finish, full_params,
                                         global_rank, load_ema, lr_factor, rank0_tracker, save_ema, setup, world_size,
                                         write_progress)
from sfpp_ray.distributed.progress import report_progress
from sfpp_ray.models.text_encoder import PromptConditioned
from sfpp_ray.seeding import generator
from sfpp_ray.world.clips import WorldClipStream, clip_latents, sprite_loss_weight

READ_BACK_EVERY = 20  # teacher steps between reads of the loss from the GPU


class TeacherTraining:
    """The teacher stage's engine, moving average and step (flow matching on a batch of world clips, backward,
    the optimizer, the average), built as the stage builds them on each rank: the stage's loop and
    benchmarks/teacher_step.py run the same step."""

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype, rank: int = 0, world: int = 1):
        tp = cfg.teacher_pretrain
        self.cfg, self.device, self.dtype, self.rank, self.world = cfg, device, dtype, rank, world
        self.text = components.build_text_encoder(cfg, device, dtype)
        model = components.build_critic(components.teacher_config(cfg))  # the teacher's shape
        if tp.train_text_encoder:
            model = PromptConditioned(model, self.text)  # takes token ids; saves the encoder beside the teacher
        self.engine, *_ = deepspeed.initialize(
            model=model, config=deepspeed_config(cfg, tp.lr, betas=tp.betas, autocast=tp.autocast),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lambda i: lr_factor(i, tp.steps, tp.warmup_steps, tp.lr_schedule, tp.lr_floor)))
        if tp.compile != "none":  # in place: the module's keys, saving and the EMA are unchanged
            self.engine.compile(backend=tp.compile, compile_kwargs={"mode": tp.compile_mode})
        self.update = engine_update(self.engine, cfg)
        self.bad_steps = BadSteps("pretrain_teacher", cfg, self.update)
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
        return WorldClipStream(components.world_of(self.cfg), self.codec.video_frames(self.cfg.video.teacher_frames),
                               tp.batch_size, self.cfg.run.seed, first=first, steps=steps, rank=self.rank,
                               world_size=self.world, prompt_dropout=tp.prompt_dropout, coverage=tp.sprite_weight > 0)

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
        g = generator(cfg.run.seed, "teacher", self.rank, batch["step"], device=device)
        loss = critic_step(self.engine, latents, cond, self.schedule, self.noise_levels, g, self.update, weight)["loss"]
        for average in self.averages:
            average.update(self.engine.module, batch["step"])
        return loss


def pretrain_teacher_loop(config: dict) -> None:
    """Ray Train entry point. config: {"cfg": Config dict, "mlflow_run_id"}. Each rank trains on
    teacher_pretrain.batch_size clips a step, rendered ahead by teacher_pretrain.data_workers processes;
    with teacher_pretrain.ema_decay > 0 the saved teacher is the moving average of its weights; with
    teacher_pretrain.train_text_encoder the text encoder trains with it and is saved in the teacher's directory."""
    cfg, device, dtype = setup(config)
    tp, rank, world = cfg.teacher_pretrain, global_rank(), world_size()
    training = TeacherTraining(cfg, device, dtype, rank, world)
    engine, ema = training.engine, training.ema
    done, losses = 0, []
    checkpoint = ray.train.get_checkpoint()  # the last one of an interrupted run of this stage
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(str(Path(d) / "teacher"), tag="state")
            state = torch.load(Path(d) / STATE_FILE, weights_only=True)
            load_ema(ema, Path(d), rank, state["ema"])
        done, losses = state["step"], state["losses"]
        if rank == 0:
            print(f"[pretrain_teacher] resumed at step {done}", flush=True)
    clips = training.clips(first=done + 1, steps=tp.steps - done)
    t0 = time.perf_counter()
    deadline = t0 + 60 * tp.time_limit_minutes if tp.time_limit_minutes > 0 else None
    metrics, unread, step = {}, [], done  # unread: (step, loss on the device, lr, bad steps) not yet read back
    out_of_time = False
    with rank0_tracker(cfg, config["mlflow_run_id"]) as tracker:
        def read_back() -> tuple[dict, bool]:
            """Reading a loss waits for the GPU to finish the step; done every few steps, the GPU's queue stays full.
            Also whether any rank is past teacher_pretrain.time_limit_minutes, in the same all-reduce, so that all
            ranks stop at the same step."""
            late = deadline is not None and time.perf_counter() > deadline
            values = torch.cat([torch.stack([loss for _, loss, _, _ in unread]).float(),
                                torch.tensor([float(late)], device=unread[0][1].device)])
            if world > 1:
                dist.all_reduce(values)
                values /= world
            *values, late_share = values.tolist()
            for (step, _, lr, bad), value in zip(unread, values):
                losses.append(value)
                if tracker is not None:
                    tracker.log_metrics({"teacher/loss": value, "teacher/lr": lr} | bad, step)
            last = unread[-1]
            unread.clear()
            return {"teacher/loss": losses[-1], "teacher/lr": last[2]} | last[3], late_share > 0

        for batch in clips.loader(tp.data_workers, pin_memory=device.type == "cuda"):
            step = batch["step"]
            loss = training.step(batch)
            bad = training.bad_steps.after(step)  # the step's update already waited for its backward
            if step in tp.guide_steps:  # a weaker model of the same data
                _save_average(engine, ema, cfg, guide_dir(cfg.run_dir / "teacher", step))
            unread.append((step, loss, engine.get_lr()[0], bad))
            printing = step % max(1, tp.steps // 10) == 0 or step == tp.steps
            checkpointing = tp.checkpoint_every and step % tp.checkpoint_every == 0 and step < tp.steps
            if printing or checkpointing or len(unread) == READ_BACK_EVERY:  # printing: also the last step
                metrics, out_of_time = read_back()
            if rank == 0:
                report_progress(cfg.run_dir, "pretrain_teacher", step, tp.steps, loss=losses[-1] if losses else None)
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
    finish(engine, cfg, "teacher", {"steps": step, "planned_steps": tp.steps, "losses": losses,
                                     "ema": tp.ema_decay > 0, "extra_emas": tp.extra_ema_decays, "resumed_from": done,
                                     "seconds": time.perf_counter() - t0, "compiled_graphs": graphs}, metrics, step,
           student=False)  # its text encoder, trained with it, is saved inside it


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
