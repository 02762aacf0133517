"""Teacher pretraining step time: float32 (TF32 matmuls on a GPU) against bfloat16 autocast, and the stage's own step.

One step is what the pretrain_teacher stage does on each rank: the flow-matching loss on a batch of
world clips, backward, Adam, the EMA update. The batch is rendered once and reused, so the first rows
show the model's cost; the `render` row gives one process's time to render a batch, to set
teacher_pretrain.data_workers against. A text encoder trained with the teacher
(teacher_pretrain.train_text_encoder) is left out of those rows: it is a few layers beside the teacher's.

The `stage` variant runs the stage's own step (`TeacherTraining`: the DeepSpeed engine, compiled and under
autocast as teacher_pretrain says, the text encoder trained with it) on the same reused batch, and
`stage_loader` on batches from the stage's loader and its teacher_pretrain.data_workers processes. For
these, `host s/step` is the time the Python loop takes to issue a step: where it is close to `s/step`, the
GPU waits on the host and a larger batch costs little more. `--profile DIR` writes, for the stage
variants, the operations that took the host's time (torch.profiler) and, on a GPU, every place a step
waited for the GPU (torch.cuda.set_sync_debug_mode). Prints a table (last) and writes JSON.

    python benchmarks/teacher_step.py --config configs/world_gpu.yaml --out teacher_step.json
    python benchmarks/teacher_step.py --config configs/world_gpu.yaml --variants stage,stage_loader \
        --profile profile/ --out teacher_stage_step.json teacher_pretrain.compile=inductor teacher_pretrain.autocast=true
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from sfpp_ray import components
from sfpp_ray.algorithm.dmd import EMA, critic_loss
from sfpp_ray.config import load_config
from sfpp_ray.distributed.engine import trainer_clips
from sfpp_ray.components import world_of
from sfpp_ray.world.clips import WorldClipStream, clip_latents


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(cfg, device, autocast: bool, compile_mode: str | None, latents, cond, steps: int) -> dict:
    """compile_mode: None (eager), "default" or "reduce-overhead" (CUDA graphs: one launch for the graph's kernels)."""
    torch.manual_seed(0)
    model = components.build_critic(cfg, device, torch.float32)
    if compile_mode is not None:
        model = torch.compile(model, mode=compile_mode)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.teacher_pretrain.lr, betas=(0.9, 0.999))
    ema = EMA(model, cfg.teacher_pretrain.ema_decay or 0.999)
    schedule = components.build_schedule(cfg)
    g = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, t0 = [], None
    for step in range(steps + 3):  # 3 warm-up steps (and compilation) are not timed
        if step == 3:
            sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            loss, _ = critic_loss(latents, model, cond, schedule, cfg.dmd, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model, step)
        losses.append(loss.item())
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"params": sum(p.numel() for p in model.parameters()), "seconds_per_step": seconds,
            "steps_per_s": 1 / seconds, "peak_gib": peak, "loss_first": losses[0],
            "loss_last": float(np.mean(losses[-3:]))}


WARMUP = 3  # steps (and compilation) not timed
PROFILED = 10  # steps profiled, and as many more watched for waits on the GPU
STAGE_VARIANTS = ("stage", "stage_loader")
COMPILE_MODES = {"bf16_autocast_compiled": "default", "bf16_autocast_cudagraphs": "reduce-overhead"}


def one_rank_group() -> None:
    """The one-rank process group Ray Train would set up, for DeepSpeed."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_SIZE": "1"})


def time_stage(cfg, device, with_loader: bool, steps: int, profile: Path | None, variant: str) -> dict:
    """The stage's step (TeacherTraining) on one reused batch or on the stage's loader: seconds a step, the host's
    share of them, and with `profile` where the host's time goes and where it waits for the GPU."""
    from sfpp_ray.distributed.engine import stage_dtype
    from sfpp_ray.distributed.teacher_trainer import TeacherTraining

    one_rank_group()
    torch.manual_seed(cfg.run.seed)
    training = TeacherTraining(cfg, device, stage_dtype(cfg))
    clips = training.clips(first=1, steps=WARMUP + steps + 2 * PROFILED)
    if with_loader:
        batches = iter(clips.loader(cfg.teacher_pretrain.data_workers, pin_memory=device.type == "cuda"))
    else:
        fixed = clips.batch(1)
        if device.type == "cuda":
            fixed = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in fixed.items()}
        batches = (fixed | {"step": step} for step in itertools.count(1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, host = [], 0.0
    for _ in range(WARMUP):
        losses.append(training.step(next(batches)))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        h = time.perf_counter()
        losses.append(training.step(batch))
        host += time.perf_counter() - h
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    row = {"params": sum(p.numel() for p in training.engine.module.parameters()), "seconds_per_step": seconds,
           "steps_per_s": 1 / seconds, "host_seconds_per_step": host / steps,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
           "loss_first": losses[0].item(), "loss_last": float(torch.stack(losses[-3:]).float().mean())}
    if profile is not None:
        row |= profile_steps(training, batches, device, profile, variant)
    return row


def profile_steps(training, batches, device, out: Path, variant: str, steps: int = PROFILED) -> dict:
    """torch.profiler over `steps` steps (host operations by their own time, written to a text file) and, on a
    GPU, the source lines where a step waited for the GPU, counted over `steps` more."""
    out.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            training.step(next(batches))
        sync(device)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    (out / f"{variant}_host_ops.txt").write_text(table)
    result = {"profile": f"{variant}_host_ops.txt"}  # in the --profile directory
    if device.type == "cuda":
        waits = collections.Counter()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(steps):
                    training.step(next(batches))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for w in caught:
            if "synchroniz" in str(w.message):
                waits[f"{Path(w.filename).name}:{w.lineno}"] += 1
        result["waits_per_step"] = {where: n / steps for where, n in waits.most_common()}
        (out / f"{variant}_waits.json").write_text(json.dumps(result["waits_per_step"], indent=2))
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/world_gpu.yaml")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--variants", default="float32,bf16_autocast",
                   help="comma-separated from float32, bf16_autocast, bf16_autocast_compiled, bf16_autocast_cudagraphs, stage, stage_loader")
    p.add_argument("--profile", type=Path, default=None, help="directory for the stage variants' profiles")
    p.add_argument("--out", default="teacher_step.json")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    device = components.resolve_device(cfg)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the stage sets it
    tp = cfg.teacher_pretrain
    codec = components.build_video_codec(cfg, device, torch.float32)
    stream = WorldClipStream(world_of(cfg), codec.video_frames(cfg.video.teacher_frames), tp.batch_size, cfg.run.seed,
                             first=1, steps=4)
    t0 = time.perf_counter()
    batches = [stream.batch(step) for step in range(1, 4)]
    render = (time.perf_counter() - t0) / len(batches)
    batch = batches[0]
    latents = clip_latents(batch["frames"], codec, device, torch.float32)
    cond = components.build_text_encoder(cfg, device, torch.float32).encode(batch["prompts"])
    rows = []
    for variant in a.variants.split(","):
        if variant not in ("float32", "bf16_autocast", "bf16_autocast_compiled", "bf16_autocast_cudagraphs",
                           *STAGE_VARIANTS):
            raise SystemExit(f"unknown variant {variant!r}")
        if variant in STAGE_VARIANTS:
            row = {"variant": variant} | time_stage(cfg, device, variant == "stage_loader", a.steps, a.profile, variant)
        else:
            row = {"variant": variant} | time_steps(cfg, device, variant != "float32", COMPILE_MODES.get(variant),
                                                    latents, cond, a.steps)
        rows.append(row)
        print(f"[teacher_step] {row}", flush=True)
    base = rows[0]["seconds_per_step"]
    for row in rows:
        row["speedup"] = base / row["seconds_per_step"]
    params = rows[0]["params"]
    result = {"config": a.config, "overrides": a.overrides, "device": torch.cuda.get_device_name() if device.type == "cuda"
              else "cpu", "params": params, "batch_size": tp.batch_size, "latent_shape": list(latents.shape),
              "render_seconds_per_batch": render, "rows": rows}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nteacher {params / 1e6:.2f}M params, batch {tp.batch_size} x latents {list(latents.shape[1:])}, "
          f"device={result['device']}; rendering a batch in one process: {render:.3f} s")
    stage = [f"{k}={v}" for k, v in (("compile", tp.compile), ("autocast", tp.autocast),
                                     ("data_workers", tp.data_workers), ("trainer clips", trainer_clips(cfg)))]
    print(f"stage variants: {', '.join(stage)}")
    print(f"{'variant':<24}{'s/step':>9}{'steps/s':>9}{'speedup':>9}{'host s/step':>12}{'peak GiB':>10}"
          f"{'loss 1st->last':>17}")
    for r in rows:
        host = r.get("host_seconds_per_step", float("nan"))
        print(f"{r['variant']:<24}{r['seconds_per_step']:>9.4f}{r['steps_per_s']:>9.2f}{r['speedup']:>9.2f}"
              f"{host:>12.4f}{r['peak_gib']:>10.2f}{r['loss_first']:>8.3f} ->{r['loss_last']:>6.3f}")


if __name__ == "__main__":
    main()
