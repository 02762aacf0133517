"""Streaming rollout speed: video FPS with and without decoding, peak memory and KV-cache bytes.

Random weights at the chosen shape; the rollout loop and block decoder are the ones `generate`
runs. Prints a table (last) and writes JSON.

    python benchmarks/rollout_fps.py --shape wan1.3b --device cuda --dtype bfloat16 --out rollout_fps.json
    python benchmarks/rollout_fps.py --shape tiny --device cpu
    python benchmarks/rollout_fps.py --shape wan1.3b --device cuda --compile none,default,reduce-overhead

--compile times the stream once per student.compile mode; a compiled mode's warm-up compiles every pass shape.
Each mode's warm-up time is recorded (warmup_s), and the JSON is written after every mode.
--rows picks the decode settings timed (default all four); --profile K lists the K kernels that take the most GPU
time over one block of the last mode's stream without decode (torch.profiler; under CUDA graphs the replayed kernels).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

from sfpp_ray.algorithm.rollout import rollout
from sfpp_ray.algorithm.schedule import FlowMatchSchedule
from sfpp_ray.config import ScheduleConfig
from sfpp_ray.generate import BlockDecoder
from sfpp_ray.models.causal_wan import CausalLayout, CausalWanTransformer3DModel
from sfpp_ray.models.codec import PixelUnshuffleCodec, WanVAECodec
from sfpp_ray.models.kv_cache import RollingKVCache

SHAPES = {
    "wan1.3b": dict(model=dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30),
                    latent_hw=(60, 104), text_len=512),
    "tiny": dict(model=dict(num_attention_heads=2, attention_head_dim=12, in_channels=12, out_channels=12,
                            text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2),
                 latent_hw=(8, 8), text_len=32),
}


ROWS = {"none": ("none", False), "folded": ("none", True), "serial": ("serial", False),
        "overlapped": ("overlapped", False)}  # name: (decode, context pass folded)


class FrameCounter:
    """Stands in for a file: takes decoded frames (already moved to host memory) and counts them."""

    frames = 0

    def append(self, frames) -> None:
        self.frames += len(frames)


def build(shape: str, device, dtype, window: int, fpb: int):
    spec = SHAPES[shape]
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalWanTransformer3DModel(patch_size=(1, 2, 2), **spec["model"]).to(dtype).eval()
    model.set_layout(CausalLayout(frames_per_block=fpb, window_frames=window))
    if shape == "wan1.3b":
        from diffusers import AutoencoderKLWan

        with torch.device(device):
            codec = WanVAECodec(AutoencoderKLWan().to(dtype))  # Wan2.1 VAE shape, random weights
    else:
        codec = PixelUnshuffleCodec(2, 1)
    return model, codec, spec


def run_once(model, codec, spec, device, dtype, latent_frames: int, decode: str, fold: bool = False,
             compile: str = "none") -> dict:
    """One timed stream; `fold`: each context pass inside the next block's first pass (student.fold_context_pass);
    `compile`: the streaming step's torch.compile mode (student.compile)."""
    model.set_layout(dataclasses.replace(model.layout, fold_context_pass=fold, compile=compile))
    h, w = spec["latent_hw"]
    schedule = FlowMatchSchedule(1000, 5.0)
    steps = schedule.student_timesteps(ScheduleConfig())
    text = torch.randn(1, spec["text_len"], spec["model"]["text_dim"], device=device, dtype=dtype)
    noise = torch.randn(1, spec["model"]["in_channels"], latent_frames, h, w, device=device, dtype=dtype)
    counter = FrameCounter()
    codec.reset_stream()
    decoder = BlockDecoder(codec, counter, overlap=decode == "overlapped", device=device) if decode != "none" else None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        cross = model.cross_attention_cache(text)
        rollout(model, cross, noise, steps, schedule, on_block=decoder)
        if decoder is not None:
            decoder.close()
        if device.type == "cuda":
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    video_frames = counter.frames if decoder is not None else codec.video_frames(latent_frames)
    return {"decode": decode, "fold_context_pass": fold, "compile": compile, "latent_frames": latent_frames, "video_frames": video_frames, "seconds": elapsed,
            "fps": video_frames / elapsed,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")}


def top_kernels(model, codec, spec, device, dtype, a, mode: str) -> list[dict]:
    """The GPU kernels that take the most device time over the last block of a window-and-a-block stream (warm, so
    every shape is compiled): name, calls and milliseconds, most first."""
    from torch.profiler import ProfilerActivity, profile

    block = a.frames_per_block
    model.set_layout(dataclasses.replace(model.layout, fold_context_pass=False, compile=mode))
    h, w = spec["latent_hw"]
    schedule = FlowMatchSchedule(1000, 5.0)
    steps = schedule.student_timesteps(ScheduleConfig())
    text = torch.randn(1, spec["text_len"], spec["model"]["text_dim"], device=device, dtype=dtype)
    noise = torch.randn(1, spec["model"]["in_channels"], a.window + 2 * block, h, w, device=device, dtype=dtype)
    cache = model.new_cache(1, h, w, dtype=dtype, device=device)
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with torch.no_grad():
        cross = model.cross_attention_cache(text)
        rollout(model, cross, noise[:, :, :-block], steps, schedule, cache=cache)  # the window full
        with profile(activities=activities) as prof:
            rollout(model, cross, noise[:, :, -block:], steps, schedule, cache=cache)
            if device.type == "cuda":
                torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if (e.self_device_time_total if device.type == "cuda"
                                                  else e.self_cpu_time_total) > 0]
    time_of = (lambda e: e.self_device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    events.sort(key=time_of, reverse=True)
    return [{"name": e.key, "calls": e.count, "ms": time_of(e) / 1e3} for e in events[:a.profile]]


def save(result: dict, path: str) -> None:
    """Write the JSON whole or not at all."""
    with open(path + ".part", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".part", path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=list(SHAPES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--window", type=int, default=21)
    p.add_argument("--frames-per-block", type=int, default=3)
    p.add_argument("--latent-frames", type=int, default=63, help="frames timed, after a warm-up of one window")
    p.add_argument("--compile", default="none", help="comma-separated student.compile modes to time: none,default,reduce-overhead")
    p.add_argument("--repeats", type=int, default=1, help="time each row this many times, keep the fastest (a shared host)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows to time, of {','.join(ROWS)}")
    p.add_argument("--profile", type=int, default=0, help="list this many top kernels of one block (0: no profile)")
    p.add_argument("--out", default="rollout_fps.json")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model, codec, spec = build(a.shape, device, dtype, a.window, a.frames_per_block)
    h, w = spec["latent_hw"]
    m = spec["model"]
    kv = RollingKVCache.analytic_bytes(m["num_layers"], 1, m["num_attention_heads"], m["attention_head_dim"],
                                       (h // 2) * (w // 2), a.window, dtype)
    settings = [ROWS[r] for r in a.rows.split(",")]
    warm = a.window + 2 * a.frames_per_block  # past the window: the filling and the full passes, folded or not
    rows = []
    result = {"shape": a.shape, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "dtype": str(dtype), "window_frames": a.window, "frames_per_block": a.frames_per_block,
              "kv_cache_bytes": kv, "rows": rows, "profile": None}
    for mode in a.compile.split(","):
        print(f"compile={mode}: warming up (a compiled mode compiles every pass shape here)", flush=True)
        t0 = time.perf_counter()
        for d, fold in settings:  # warm-up: kernels, allocator, decoder cache, the compiled graphs
            run_once(model, codec, spec, device, dtype, warm, d, fold, mode)
        warmup_s = time.perf_counter() - t0
        print(f"compile={mode}: warm-up took {warmup_s:.1f} s", flush=True)
        for d, fold in settings:
            runs = [run_once(model, codec, spec, device, dtype, a.latent_frames, d, fold, mode) for _ in range(a.repeats)]
            rows.append(max(runs, key=lambda r: r["fps"]) | {"warmup_s": warmup_s})
            print(f"compile={mode} {d} folded={fold}: {rows[-1]['fps']:.1f} FPS", flush=True)
        save(result, a.out)  # a run stopped in a later mode's warm-up keeps the rows timed so far
    kernels = top_kernels(model, codec, spec, device, dtype, a, mode) if a.profile else []
    result["profile"] = {"compile": mode, "kernels": kernels} if kernels else None
    save(result, a.out)
    if kernels:
        total = sum(k["ms"] for k in kernels)
        print(f"\ntop kernels, one block of the stream (compile={mode}, no decode; window full), ms of "
              f"{'GPU' if device.type == 'cuda' else 'CPU'} time:")
        for k in kernels:
            print(f"{k['ms']:>9.2f} {k['calls']:>6} {k['name'][:100]}")
        print(f"{total:>9.2f}        total of these")
    print(f"\nshape={a.shape} device={result['device']} dtype={dtype} window={a.window} kv_cache={kv / 2**30:.2f} GiB")
    print(f"{'compile':<16}{'decode':<12}{'folded':>7}{'latent fr':>10}{'video fr':>10}{'seconds':>10}{'FPS':>9}{'peak GiB':>10}"
          f"{'warm-up s':>11}")
    for r in rows:
        print(f"{r['compile']:<16}{r['decode']:<12}{'yes' if r['fold_context_pass'] else 'no':>7}{r['latent_frames']:>10}"
              f"{r['video_frames']:>10}{r['seconds']:>10.2f}{r['fps']:>9.1f}{r['peak_gib']:>10.2f}{r['warmup_s']:>11.1f}")
    return result


if __name__ == "__main__":
    main()
