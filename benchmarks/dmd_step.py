"""One DMD critic step and one generator step on one device: seconds, peak memory, FLOPs and MFU.

The steps are the DMD trainer's own (`critic_step`, `dmd_generator_step`), driven as dmd_throughput.py's
`single` drives them: plain AdamW with the trainer's grad clip in place of the DeepSpeed engine, models built
by `components` from the config with random weights, gradient checkpointing as trainer.gradient_checkpointing
says. The generator step re-generates the student's window on top of `--context-frames` clean frames with
gradient at the exit step, runs the frozen teacher twice (guidance: conditional and negative prompt) and the
critic once; the critic step is the critic's flow-matching forward/backward. The batch is fixed (one window,
pinned denoising start/exit steps: by default all of them, the most passes a window can take) so every
timed step does the same work; the rollout that would feed it is not timed. Text embeddings and latents are
random, so the text encoder and VAE are never built (at wan1.3b their config directories are an empty stand-in).

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode over one step of each kind. They are the
FLOPs executed, so the recomputed forward of gradient checkpointing is in them (MFU here is against executed
FLOPs). Attention: the counter has formulas for SDPA's flash/efficient/cuDNN kernels and FlexAttention,
counted as dense (a block mask's skipped blocks included); SDPA's CPU flash kernel it lacks is added here
with the same dense formula. The JSON gives attention's share of the count, so a GPU run shows whether the
attention kernel it used was counted (a share of 0 means it was not).

    python benchmarks/dmd_step.py --shape wan1.3b --steps 5 --warmup 2 --out dmd_step_h200.json
    python benchmarks/dmd_step.py --shape tiny --steps 3 --warmup 1 --out dmd_step_tiny.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from sfpp_ray import components
from sfpp_ray.algorithm.dmd import critic_step
from sfpp_ray.algorithm.self_forcing_pp import backward_noise, dmd_generator_step
from sfpp_ray.config import load_config

sys.path.insert(0, str(Path(__file__).parent))
from rollout_fps import SHAPES  # noqa: E402  (the shapes every benchmark here shares)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"wan1.3b": "configs/wan2.1_t2v_1.3b.yaml", "tiny": "configs/tiny.yaml"}  # under ROOT
DEVICE = {"wan1.3b": ("cuda", "bfloat16"), "tiny": ("cpu", "float32")}
aten = torch.ops.aten
CPU_ATTENTION = {  # arguments arrive as shapes: (q, k, v, ...) and (grad_out, q, k, v, ...)
    aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda dout, q, k, v, *_, **__: sdpa_backward_flop_count(dout, q, k, v)}
ATTENTION_OPS = ("attention",)  # substrings of the counted op names that are attention


def updater(model, lr, t):
    """One process's update of `model`: backward, clip, plain AdamW with the trainer's settings (no DeepSpeed)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(t.betas), weight_decay=t.weight_decay)

    def update(loss, weight=1.0, last=True):
        (loss * weight).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return norm
    return update


def fixed_batch(cfg, shape, device, dtype, context: int, start_step: int, exit_step: int, schedule, timesteps):
    """One window per sample after `context` clean frames, backward-noised to timesteps[start_step]."""
    B, C, K = cfg.trainer.batch_size, cfg.model.in_channels, cfg.data.window_frames
    (H, W), L = SHAPES[shape]["latent_hw"], SHAPES[shape]["text_len"]
    g = torch.Generator(device=device).manual_seed(cfg.run.seed)
    latents = torch.randn(B, C, context + K, H, W, generator=g, device=device, dtype=dtype)
    window = latents[:, :, context:]
    full = lambda n: torch.full((B,), n, dtype=torch.int64, device=device)
    return {"latents": latents, "window": window,
            "noisy": backward_noise(window, float(timesteps[start_step]), schedule, generator=g).to(dtype),
            "window_start": full(context), "start_step": full(start_step), "exit_step": full(exit_step),
            "text": torch.randn(B, L, cfg.model.text_dim, generator=g, device=device, dtype=dtype),
            "uncond": torch.randn(1, L, cfg.model.text_dim, generator=g, device=device, dtype=dtype),
            "seed": torch.arange(B, device=device) + cfg.run.seed}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step, device, steps: int, warmup: int, kind: str = "") -> dict:
    """Median seconds over `steps` after `warmup`, peak memory over all of them (printed at once), then FLOPs over
    one more. Counting runs the step again under FlopCounterMode, which holds more memory than the plain step: if
    that step runs out of memory the time and peak stand and the FLOPs are recorded as not counted, with why."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    timed = {"seconds": statistics.median(times), "seconds_all": times, "peak_gib": peak}
    print(f"[dmd_step] {kind} timed: {timed}", flush=True)
    try:
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
            step()
    except torch.OutOfMemoryError as e:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return timed | {"flops": None, "attention_flop_share": None,
                        "flops_error": f"out of memory under FlopCounterMode: {str(e).splitlines()[0]}"}
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    flops = counter.get_total_flops()
    attention = sum(n for op, n in by_op.items() if any(a in op for a in ATTENTION_OPS))
    return timed | {"flops": flops, "attention_flop_share": attention / flops if flops else 0.0}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="wan1.3b")
    p.add_argument("--config", default=None, help="default: the shape's config")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--context-frames", type=int, default=None,
                   help="clean frames before the window (default student.window_frames: the cache full)")
    p.add_argument("--start-step", type=int, default=0, help="denoising step the window starts from")
    p.add_argument("--exit-step", type=int, default=None, help="step whose x0 holds the graph (default: the last)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--out", default="dmd_step.json")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = p.parse_args(argv)
    config = a.config or CONFIGS[a.shape]
    run_device, run_dtype = DEVICE[a.shape]
    dims = [f"model.{k}={v}" for k, v in SHAPES[a.shape]["model"].items()]
    with tempfile.TemporaryDirectory() as empty:  # the text encoder and VAE never run: their directories need only exist
        stand_in = [f"text.path={empty}", f"codec.path={empty}"] if a.shape == "wan1.3b" else []
        cfg = load_config(a.config or ROOT / config,
                          [f"run.device={run_device}", f"run.dtype={run_dtype}", *stand_in, *dims, *a.overrides])
    device, dtype = components.resolve_device(cfg), components.resolve_dtype(cfg)
    schedule = components.build_schedule(cfg)
    timesteps = schedule.student_timesteps(cfg.schedule)
    context = cfg.student.window_frames if a.context_frames is None else a.context_frames
    exit_step = len(timesteps) - 1 if a.exit_step is None else a.exit_step
    with torch.device(device):  # random weights made where they run
        student = components.build_student(cfg, device, dtype).train()
        critic, teacher = components.build_critic(cfg, device, dtype), components.build_teacher(cfg, device, dtype)
    t = cfg.trainer
    student_update, critic_update = updater(student, t.generator_lr, t), updater(critic, t.critic_lr, t)
    batch = fixed_batch(cfg, a.shape, device, dtype, context, a.start_step, exit_step, schedule, timesteps)
    gens = lambda: [torch.Generator(device=device).manual_seed(int(s)) for s in batch["seed"].tolist()]
    steps = {
        "critic": lambda: critic_step(critic, batch["window"], batch["text"], schedule, cfg.dmd, gens(), critic_update),
        "generator": lambda: dmd_generator_step(student, teacher, critic, batch, schedule, timesteps, cfg.dmd,
                                                student_update, gens(), cfg.schedule.context_noise,
                                                cfg.data.training_rolling_cache),
    }
    rows = []
    for kind, step in steps.items():
        row = {"kind": kind} | measure(step, device, a.steps, a.warmup, kind)
        row["tflops_per_s"] = None if row["flops"] is None else row["flops"] / row["seconds"] / 1e12
        row["mfu"] = row["tflops_per_s"] / a.peak_tflops if device.type == "cuda" and row["flops"] else None
        rows.append(row)
        print(f"[dmd_step] {row}", flush=True)
    params = sum(q.numel() for q in student.parameters())
    result = {"setting": {"shape": a.shape, "config": config, "overrides": a.overrides, "steps": a.steps,
                          "warmup": a.warmup, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                          "torch": torch.__version__, "dtype": str(dtype), "params_per_model": params,
                          "teacher_params": sum(q.numel() for q in teacher.parameters()),
                          "batch_size": t.batch_size, "window": list(batch["window"].shape),
                          "context_frames": context, "start_step": a.start_step, "exit_step": exit_step,
                          "guidance": cfg.dmd.guidance, "gradient_checkpointing": t.gradient_checkpointing,
                          "peak_tflops": a.peak_tflops, "date": time.strftime("%Y-%m-%d", time.gmtime())},
              "rows": rows}
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    s = result["setting"]
    print(f"\n{a.shape}: {params / 1e6:.4g}M params student and critic, teacher {s['teacher_params'] / 1e6:.4g}M, window {s['window']} after {context} context frames, "
          f"steps {a.start_step}..{exit_step}, device={s['device']}, {dtype}, torch {torch.__version__}")
    fmt = lambda v, f: "-" if v is None else format(v, f)
    print(f"{'step':<11}{'s/step':>10}{'peak GiB':>10}{'TFLOP/step':>12}{'attn %':>8}{'TFLOP/s':>10}{'MFU %':>8}")
    for r in rows:
        flops, share = r["flops"], r["attention_flop_share"]
        print(f"{r['kind']:<11}{r['seconds']:>10.4f}{fmt(r['peak_gib'], '.2f'):>10}{fmt(flops and flops / 1e12, '.4g'):>12}"
              f"{fmt(share and 100 * share, '.1f'):>8}{fmt(r['tflops_per_s'], '.4g'):>10}"
              f"{fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f'):>8}")
    return result


if __name__ == "__main__":
    main()
