"""GRPO's replay with gradient: peak memory and time of one group's backward by grpo.micro_batch.

A config's student (random weights) rolls out one group of grpo.group_size videos of rollout.num_frames
frames, then `grpo_backward` replays it with gradient, micro_batch rollouts at a time. Prints a table
(last) and writes JSON; peak memory on CUDA only.

    python benchmarks/grpo_memory.py --config configs/world_gpu.yaml --device cuda --out grpo_memory.json
    python benchmarks/grpo_memory.py --config configs/tiny.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from sfpp_ray import components
from sfpp_ray.algorithm.grpo import grpo_backward
from sfpp_ray.algorithm.rollout import rollout
from sfpp_ray.config import load_config


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--device", default="cpu")
    p.add_argument("--micro-batches", default=None, help="comma-separated; default: every divisor of the group")
    p.add_argument("--out", default=None, help="JSON file")
    args = p.parse_args(argv)
    cfg = load_config(args.config, [f"run.device={args.device}"])
    device, dtype = torch.device(args.device), torch.float32
    group, frames = cfg.grpo.group_size, cfg.rollout.num_frames
    sizes = ([int(m) for m in args.micro_batches.split(",")] if args.micro_batches
             else [m for m in range(1, group + 1) if group % m == 0])
    torch.manual_seed(cfg.run.seed)
    student = components.build_student(cfg, device, dtype).train()
    text = components.build_text_encoder(cfg, device, dtype)
    schedule = components.build_schedule(cfg)
    timesteps = schedule.student_timesteps(cfg.schedule)
    codec = components.build_video_codec(cfg, device, dtype)
    cond = text.encode(["a red square bouncing slowly on a dark gradient background"] * group)
    noise = torch.randn(components.latent_shape(cfg, codec, frames, group), device=device, dtype=dtype)
    with torch.no_grad():
        out = rollout(student, student.cross_attention_cache(cond), noise, timesteps, schedule, record=True)
    advantages = torch.randn(group, device=device)
    rows = []
    for size in sizes:
        gp = dataclasses.replace(cfg.grpo, micro_batch=size)
        student.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            grpo_backward(student, cond, out.steps, out.latents, advantages, None, timesteps, schedule,
                          cfg.schedule.context_noise, gp, lambda loss, weight: (loss * weight).backward())
            if device.type == "cuda":
                torch.cuda.synchronize()
            row = {"micro_batch": size, "seconds": time.perf_counter() - t0,
                   "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
        except torch.OutOfMemoryError:
            row = {"micro_batch": size, "seconds": None, "peak_gib": None, "out_of_memory": True}
        student.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "device": str(device), "group_size": group, "frames": frames,
                       "rows": rows}, f, indent=2)
    print(f"GRPO replay of {group} rollouts x {frames} frames ({args.config}, {device})")
    print(f"{'micro_batch':>12}{'seconds':>10}{'peak GiB':>10}")
    for r in rows:
        if r.get("out_of_memory"):
            print(f"{r['micro_batch']:>12}{'out of memory':>20}")
        else:
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
            print(f"{r['micro_batch']:>12}{r['seconds']:>10.2f}{peak:>10}")
    return rows


if __name__ == "__main__":
    main()
