"""What every stage's Ray Train ranks share: the DeepSpeed engine's settings and optimizer step, the ranks'
identities, the moving average's checkpoint files, the stage markers, and logging from rank 0.

A stage trainer (teacher_trainer, ode_trainer, dmd_trainer, grpo_trainer) builds its engines with
`deepspeed_config`, trains through `engine_update` (the `update` of the algorithm's step functions, which skips a
step whose loss or gradients are not finite; `BadSteps` counts those and stops a stage that makes only those), and
ends with `finish`, which saves the model and marks the stage's output directory finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import deepspeed
import ray.train
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from diffusers import WanTransformer3DModel

from sfpp_ray import components
from sfpp_ray.algorithm.dmd import EMA
from sfpp_ray.checks import NonFiniteError
from sfpp_ray.config import Config, ModelConfig, rebuilt
from sfpp_ray.models.loading import wan_transformer_kwargs
from sfpp_ray.reruns import STAGE_MARKER
from sfpp_ray.tracking import Tracker

STATE_FILE = "trainer_state.pt"
RESUME_FILE = "resume.json"  # in a DMD checkpoint: its step, trainer layout, prompt feed and buffer state
EMA_SHARD_FILE = "ema_rank{rank}.pt"  # a rank's part of the moving average (EMA.split)
# In the run dir, per resumable stage: the controller's view of the stage's last checkpoint. DMD has none: its
# controller reads the last checkpoint Ray Train registered (RESUME_FILE in it), the one a rerun restores.
PROGRESS_FILES = {"pretrain_teacher": "teacher_progress.json"}


def write_marker(directory: Path, record: dict) -> None:
    """Mark a stage's output directory finished, with what the controller and tests read back."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STAGE_MARKER).write_text(json.dumps(record, indent=2) + "\n")


def deepspeed_config(cfg: Config, lr: float, betas: list[float] | None = None, autocast: bool = False,
                     micro_batch: int = 1) -> dict:
    """AdamW under the trainer's ZeRO stage; `betas` default to trainer.betas (DMD's, without momentum);
    torch's fused AdamW where trainer.fused_optimizer.
    autocast: the engine runs its forward under bfloat16 autocast (weights and optimizer stay as they
    are); DeepSpeed switches off any autocast opened around the engine, so this is the only way in."""
    t = cfg.trainer
    adamw = {"lr": lr, "betas": list(betas or t.betas), "weight_decay": t.weight_decay, "torch_adam": True}
    return ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}} if autocast else {}) | {
        "train_micro_batch_size_per_gpu": micro_batch,
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


def optimizer_step(engine, cfg: Config, loss_finite: torch.Tensor | None = None) -> tuple[torch.Tensor | None, bool]:
    """engine.step(), with the gradients clipped to trainer.grad_clip first where DeepSpeed does not (see
    deepspeed_config): torch's clipping keeps the norm and the factor on the device. Under ZeRO-0 the
    gradients are whole and already averaged over ranks after the backward of a boundary micro-batch.

    At the accumulation boundary a step whose loss (`loss_finite` False) or gradients are not finite is skipped:
    the weights, the optimizer's state and the learning-rate schedule stay as they are, on every rank. DeepSpeed's
    ZeRO and bf16 optimizers check the gradients' norm themselves and skip such a step (counted in
    engine.skipped_steps); under ZeRO-0 in float32 nothing does, so the norm is taken here. The decision waits for
    the step's backward on the device, once a step.
    Returns (the gradients' norm before clipping, on the device, where the trainer took it, else None; skipped)."""
    if not engine.is_gradient_accumulation_boundary():
        engine.step()  # DeepSpeed counts the micro-batch; the step waits for the boundary
        return None, False
    norm = None
    params = [p for p in engine.module.parameters() if p.grad is not None]
    if trainer_clips(cfg):
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.trainer.grad_clip, foreach=True)
    elif cfg.trainer.zero_stage == 0 and not cfg.trainer.bf16 and params:  # whole gradients nothing else checks
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    flags = [~loss_finite] if loss_finite is not None else []
    flags += [] if norm is None else [~torch.isfinite(norm)]
    withhold = False
    if flags or world_size() > 1:
        device = flags[0].device if flags else next(engine.module.parameters()).device
        bad = torch.stack(flags).any().float() if flags else torch.zeros((), device=device)
        if world_size() > 1:  # a loss that is bad on one rank skips the step on all: the weights stay the same
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        withhold = bool(bad)
    skipped_before = engine.skipped_steps
    with _withheld(engine) if withhold else contextlib.nullcontext():
        engine.step()
    return norm, withhold or engine.skipped_steps > skipped_before


@contextlib.contextmanager
def _withheld(engine):
    """engine.step() without its effect: DeepSpeed's bookkeeping runs (the gradients are cleared, the step
    counted) while torch's optimizer and the learning-rate schedule inside it do nothing. ZeRO's and bf16's
    wrappers keep torch's optimizer as `.optimizer`; under ZeRO-0 in float32 the engine holds it directly."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    patched = [obj for obj in (inner, engine.lr_scheduler) if obj is not None]
    saved = [vars(obj).get("step") for obj in patched]  # a scheduler may have wrapped the optimizer's step
    for obj in patched:
        obj.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for obj, step in zip(patched, saved):
            if step is None:
                del obj.step
            else:
                obj.step = step


def lr_factor(step: int, steps: int, warmup_steps: int, schedule: str, floor: float = 0.1) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): linear warmup over
    `warmup_steps`, then constant or a cosine down to `floor` at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, steps - 1 - warmup_steps)
    return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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
    saved = torch.load(shard, weights_only=True) if shard.is_file() else whole
    if ema is not None and saved is not None:
        ema.load_state_dict(saved)


def parameter_count(model: ModelConfig) -> int:
    """Parameters of a Wan transformer of this shape, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in WanTransformer3DModel(**wan_transformer_kwargs(model)).parameters())


def dmd_memory_per_rank(cfg: Config) -> dict[str, float]:
    """GiB each DMD trainer rank holds on its device for the transformers' weights, gradients, AdamW state and the
    student's moving average, as ZeRO partitions them over trainer.num_workers ranks (activations, the text encoder
    and the codec not included): the frozen teacher is sharded only under ZeRO-3 with several ranks, and held in CPU
    memory instead with trainer.teacher_offload (teacher_in_cpu_memory; frozen_teacher); a trained model's optimizer
    state is split from stage 1, its gradients from 2, its weights from 3."""
    ranks, stage, width = cfg.trainer.num_workers, cfg.trainer.zero_stage, 2 if cfg.trainer.bf16 else 4
    split = lambda from_stage: ranks if stage >= from_stage else 1  # noqa: E731
    teacher = parameter_count(components.teacher_config(cfg).model)
    trained = parameter_count(cfg.model)
    master = 4 if cfg.trainer.bf16 else 0  # fp32 master weights beside bf16 ones
    one = trained * width / split(3) + trained * width / split(2) + trained * (master + 8) / split(1)
    teacher_share = teacher * width / (ranks if stage == 3 and ranks > 1 else 1)
    gib = {"teacher": 0.0 if cfg.trainer.teacher_offload else teacher_share, "student": one, "critic": one,
           "average": trained * 4 / split(3) if cfg.trainer.ema_decay > 0 else 0.0}
    gib = {k: v / 2**30 for k, v in gib.items()}
    return gib | {"total": sum(gib.values()), "teacher_parameters": teacher, "student_parameters": trained,
                  "teacher_in_cpu_memory": teacher_share / 2**30 if cfg.trainer.teacher_offload else 0.0}


def frozen_teacher(cfg: Config, device, dtype):
    """The frozen teacher; sharded with ZeRO-3 (no optimizer) when the trainers shard with ZeRO-3, and its weights
    kept in CPU memory with trainer.teacher_offload."""
    teacher = components.build_teacher(cfg)
    if cfg.trainer.teacher_offload or (world_size() > 1 and cfg.trainer.zero_stage == 3):
        zero = {"stage": 3} | ({"offload_param": {"device": "cpu"}} if cfg.trainer.teacher_offload else {})
        ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "bf16": {"enabled": cfg.trainer.bf16}}
        engine, *_ = deepspeed.initialize(model=teacher, config=ds)
        return engine.module
    return components.cast(teacher, device, dtype)


class EngineUpdate:
    """The `update` a step function trains through (algorithm.dmd.Update), for a DeepSpeed engine: its backward
    (which divides by its gradient accumulation steps itself, so `weight` is the engine's to apply) and
    `optimizer_step`, which DeepSpeed applies at the accumulation boundary only, and skips where the loss of any
    part of the step or its gradients are not finite. Returns the update's gradient norm before clipping where one
    is known (on the device under ZeRO-0). `skipped` counts the skipped steps until `BadSteps` takes them."""

    def __init__(self, engine, cfg: Config):
        self.engine, self.cfg = engine, cfg
        self.loss_finite: torch.Tensor | None = None  # over the parts of the step so far
        self.skipped = 0

    def __call__(self, loss: torch.Tensor, weight: float = 1.0, last: bool = True):
        finite = torch.isfinite(loss.detach()).all()
        self.loss_finite = finite if self.loss_finite is None else self.loss_finite & finite
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        norm, skipped = optimizer_step(self.engine, self.cfg, self.loss_finite if boundary else None)
        if boundary:
            self.loss_finite, self.skipped = None, self.skipped + skipped
        return norm if norm is not None or not last else self.engine.get_global_grad_norm()


def engine_update(engine, cfg: Config) -> EngineUpdate:
    return EngineUpdate(engine, cfg)


class BadSteps:
    """A stage's steps that its updates skipped for a non-finite loss or gradient: counted (`train/bad_steps` in
    the step's metrics), and after trainer.max_bad_steps of them in a row the stage stops with NonFiniteError
    naming the stage and step, rather than go on training with no update at all. Every rank skips the same
    steps (optimizer_step agrees over ranks), so every rank stops at the same one."""

    def __init__(self, stage: str, cfg: Config, *updates: EngineUpdate):
        self.stage, self.limit, self.updates = stage, cfg.trainer.max_bad_steps, updates
        self.total = self.in_a_row = 0

    def after(self, step: int) -> dict[str, float]:
        """After each step of the stage: this step's skips taken from the updates; the count as a metric."""
        bad = sum(u.skipped for u in self.updates) > 0
        for u in self.updates:
            u.skipped = 0
        self.total += bad
        self.in_a_row = self.in_a_row + 1 if bad else 0
        if self.in_a_row >= self.limit:
            raise NonFiniteError(f"stage {self.stage}, step {step}: {self.in_a_row} steps in a row had a non-finite "
                                 f"loss or gradient and were skipped (trainer.max_bad_steps={self.limit}); "
                                 f"{self.total} skipped in all")
        return {"train/bad_steps": float(self.total)}


def stage_dtype(cfg: Config) -> torch.dtype:
    """The dtype the stages build their models and data in: bfloat16 under DeepSpeed's bf16, else run.dtype."""
    return torch.bfloat16 if cfg.trainer.bf16 else components.resolve_dtype(cfg)


def setup(config: dict) -> tuple[Config, torch.device, torch.dtype]:
    cfg = rebuilt(config["cfg"])
    device = ray.train.torch.get_device() if cfg.trainer.gpus_per_worker > 0 else torch.device("cpu")
    dtype = stage_dtype(cfg)
    torch.manual_seed(cfg.run.seed)  # same init on every rank before DeepSpeed broadcasts/partitions
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # float32 runs as TF32 on GPUs
    return cfg, device, dtype


@contextlib.contextmanager
def rank0_tracker(cfg: Config, run_id: str | None):
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


def step_done(tracker: Tracker | None, metrics: dict[str, float], step: int, device: torch.device) -> dict:
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


def carry_text_encoder(cfg: Config, directory: Path) -> None:
    """Into a saved student: the text encoder and tokenizer the run conditioned it with where that is one loaded from
    text.path (the encoder trained with the teacher, which the stages switch to), laid out as `with_teacher` reads
    them, so `generate --checkpoint` from the directory alone embeds prompts as training did. Files are hard-linked
    where the file system allows (a real umT5 weighs gigabytes), else copied."""
    if cfg.text.kind != "umt5" or cfg.text.path is None or Path(cfg.text.path).resolve() == directory.resolve():
        return
    source = Path(cfg.text.path)
    encoder = source / "text_encoder" if (source / "text_encoder").is_dir() else source
    tokenizer = source / "tokenizer" if (source / "tokenizer").is_dir() else source
    for src, name in ((encoder, "text_encoder"), (tokenizer, "tokenizer")):
        shutil.rmtree(directory / name, ignore_errors=True)
        shutil.copytree(src, directory / name, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


CODEC_FILE = "codec.json"  # beside a saved student: the codec its latents are decoded with (cfg.codec)


def save_student(module: torch.nn.Module, cfg: Config, directory: Path) -> None:
    """A student's weights, causal layout, text encoder and codec reference: what generating from the directory
    needs."""
    module.save_pretrained(directory)
    carry_text_encoder(cfg, directory)
    (Path(directory) / CODEC_FILE).write_text(json.dumps(dataclasses.asdict(cfg.codec), indent=2) + "\n")


def finish(engine, cfg: Config, name: str, record: dict, metrics: dict, step: int, student: bool = True) -> None:
    """Rank 0 writes the model to run_dir/name (a student with its text encoder, `save_student`) and then its
    marker (ZeRO-3 gathers on every rank); every rank reports the last step's metrics."""
    with full_params(engine.module, cfg.trainer.zero_stage == 3, from_partitions=True):  # the EMA may be in them
        if global_rank() == 0:
            if student:
                save_student(engine.module, cfg, cfg.run_dir / name)
            else:
                engine.module.save_pretrained(cfg.run_dir / name)
            write_marker(cfg.run_dir / name, record)
    ray.train.report(metrics | {"step": step})


def write_progress(cfg: Config, stage: str, step: int, **extra) -> None:
    """After a stage's checkpoint, from rank 0: its step, and the ranks and ZeRO stage its shards were laid out for."""
    progress = {"step": step, "ranks": world_size(), "zero_stage": cfg.trainer.zero_stage, **extra}
    (cfg.run_dir / PROGRESS_FILES[stage]).write_text(json.dumps(progress) + "\n")
