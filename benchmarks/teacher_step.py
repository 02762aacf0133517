"""Teacher pretraining step time: float32 (TF32 matmuls on a GPU) against bfloat16 autocast.

One step is what the pretrain_teacher stage does on each rank: the flow-matching loss on a batch of
world clips, backward, Adam, the EMA update. The batch is rendered once and reused, so the table
shows the model's cost; the `render` row gives one process's time to render a batch, to set
teacher_pretrain.data_workers against. A text encoder trained with the teacher
(teacher_pretrain.train_text_encoder) is left out: it is a few layers beside the teacher's. Prints a table (last) and writes JSON.

    python benchmarks/teacher_step.py --config configs/world_gpu.yaml --out teacher_step.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from sfpp_ray import components
from sfpp_ray.algorithm.dmd import EMA, critic_loss
from sfpp_ray.config import load_config
from sfpp_ray.evaluation.evaluate import world_of
from sfpp_ray.world.clips import WorldClipStream, clip_latents


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(cfg, device, autocast: bool, compile_model: bool, latents, cond, steps: int) -> dict:
    torch.manual_seed(0)
    model = components.build_critic(cfg, device, torch.float32)
    if compile_model:
        model = torch.compile(model)
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/world_gpu.yaml")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--variants", default="float32,bf16_autocast",
                   help="comma-separated from float32, bf16_autocast, bf16_autocast_compiled")
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
        if variant not in ("float32", "bf16_autocast", "bf16_autocast_compiled"):
            raise SystemExit(f"unknown variant {variant!r}")
        row = {"variant": variant} | time_steps(cfg, device, variant != "float32", variant.endswith("compiled"),
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
    print(f"{'variant':<24}{'s/step':>9}{'steps/s':>9}{'speedup':>9}{'peak GiB':>10}{'loss 1st->last':>17}")
    for r in rows:
        print(f"{r['variant']:<24}{r['seconds_per_step']:>9.4f}{r['steps_per_s']:>9.2f}{r['speedup']:>9.2f}"
              f"{r['peak_gib']:>10.2f}{r['loss_first']:>8.3f} ->{r['loss_last']:>6.3f}")


if __name__ == "__main__":
    main()
