"""DMD throughput of the product path against the same update in a single process, in one run.

product:  `controller.train` with stages [dmd]: rollout workers, buffer, Ray Data and the DeepSpeed trainer, the
          trainer and the rollout workers sharing one GPU by fractional requests (trainer.gpus_per_worker,
          rollout.gpus_per_worker). Steps/s from the trainer's own step clock past `--warmup` steps; how long each
          step waited for its batch; rollout frames/s from the workers.
single:   one process on the same GPU doing the same work a step: every buffer.max_reuse steps rolling out
          trainer.batch_size prompts of rollout.num_frames (each rollout feeds max_reuse steps, as the buffer serves
          it), the data pipeline's window and backward-noise transforms (a fresh window each step), then the same
          `critic_step` / `dmd_generator_step` with plain AdamW.
GPU busy: `nvidia-smi` sampled twice a second during each. Prints a table last; writes JSON.

    python benchmarks/dmd_throughput.py --config configs/world_gpu.yaml --steps 40 --warmup 10 --out dmd_throughput.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from sfpp_ray import components
from sfpp_ray.algorithm.dmd import critic_step, is_generator_step
from sfpp_ray.algorithm.self_forcing_pp import dmd_generator_step, extended_rollout
from sfpp_ray.config import load_config
from sfpp_ray.distributed.data_pipeline import add_backward_noise, sample_windows
from sfpp_ray.distributed.prompts import load_prompts
from sfpp_ray.seeding import generator, seed_for

sys.path.insert(0, str(Path(__file__).parent))
from dmd_step import updater  # noqa: E402  (the single process's plain AdamW step, as the DMD step benchmark's)


class GpuBusy:
    """Mean GPU utilisation (%) while the block runs; None without nvidia-smi."""

    def __enter__(self):
        self.samples, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.mean = float(np.mean(self.samples)) if self.samples else None


def product(cfg, steps: int, warmup: int) -> dict:
    from sfpp_ray.distributed.controller import train

    with GpuBusy() as busy:
        summary = train(cfg, evaluation_video=False)
    record = json.loads((cfg.run_dir / "student" / "stage.json").read_text())
    ends, waits = record["step_ends"][warmup:], record["data_waits"][warmup + 1:]
    rollout_seconds = sum(s["latent_frames"] / s["fps"] for s in summary["rollout"] if s["fps"])
    return {"steps_per_s": (len(ends) - 1) / (ends[-1] - ends[0]), "gpu_busy": busy.mean,
            "data_wait_mean_s": float(np.mean(waits)), "steps_waiting_over_10ms": float(np.mean(np.array(waits) > 0.01)),
            "rollout_latent_frames_per_s": sum(s["latent_frames"] for s in summary["rollout"]) / max(rollout_seconds, 1e-9),
            "stage_seconds": summary["stages"]["dmd"]["seconds"]}


def single(cfg, steps: int, warmup: int) -> dict:
    device, dtype = torch.device("cuda" if torch.cuda.is_available() else "cpu"), components.resolve_dtype(cfg)
    student = components.build_student(cfg, device, dtype).train()
    critic, teacher = components.build_critic(cfg, device, dtype), components.build_teacher(cfg, device, dtype)
    text, codec = components.build_text_encoder(cfg, device, dtype), components.build_video_codec(cfg, device, dtype)
    schedule = components.build_schedule(cfg)
    timesteps = schedule.student_timesteps(cfg.schedule)
    t = cfg.trainer

    student_update, critic_update = updater(student, t.generator_lr, t), updater(critic, t.critic_lr, t)
    prompts, _ = load_prompts(cfg.data.prompts, cfg.data.max_prompt_chars)
    uncond = text.encode([cfg.text.negative_prompt])[0].float().cpu().numpy()
    g, B, ends = generator(cfg.run.seed, "benchmark", device=device), t.batch_size, []
    with GpuBusy() as busy:
        for step in range(1, steps + 1):
            if (step - 1) % cfg.buffer.max_reuse == 0:
                cond = text.encode([prompts[(step * B + i) % len(prompts)] for i in range(B)])
                noise = torch.randn(components.latent_shape(cfg, codec, cfg.rollout.num_frames, B), generator=g,
                                    device=device, dtype=dtype)
                with torch.no_grad():
                    latents = extended_rollout(student, student.cross_attention_cache(cond), noise, schedule,
                                               timesteps, cfg.schedule.context_noise, g)
            rows = {"id": np.arange(step * B, (step + 1) * B), "latents": latents.float().cpu().numpy(),
                    "text": cond.float().cpu().numpy(), "uncond": np.stack([uncond] * B)}
            rows = add_backward_noise(sample_windows(rows, cfg.to_dict(), cfg.run.seed), cfg.to_dict(), cfg.run.seed)
            batch = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in rows.items()}
            batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
            gens = [torch.Generator(device=device).manual_seed(int(s)) for s in batch["seed"].tolist()]
            critic_step(critic, batch["window"], batch["text"], schedule, cfg.dmd, gens, critic_update)
            if is_generator_step(step, cfg.dmd.update_ratio):
                dmd_generator_step(student, teacher, critic, batch, schedule, timesteps, cfg.dmd, student_update, gens,
                                   cfg.schedule.context_noise, cfg.data.training_rolling_cache)
            if device.type == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
    ends = ends[warmup:]
    return {"steps_per_s": (len(ends) - 1) / (ends[-1] - ends[0]), "gpu_busy": busy.mean}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/world_gpu.yaml")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default="dmd_throughput.json")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    workers = 1
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(args.config, [
            f"run.output_dir={d}", "run.name=throughput", "run.stages=[dmd]", f"dmd.steps={args.steps}",
            "trainer.checkpoint_every=0", "tracking.enabled=false", f"rollout.num_workers={workers}",
            f"trainer.gpus_per_worker={0.5 if gpu else 0}", f"rollout.gpus_per_worker={0.5 if gpu else 0}",
            *args.overrides])
        results = {"single": single(cfg, args.steps, args.warmup)}
        print(f"single: {results['single']}", flush=True)
        results["product"] = product(cfg, args.steps, args.warmup)
    results["ratio"] = results["product"]["steps_per_s"] / results["single"]["steps_per_s"]
    results["setting"] = {"config": args.config, "steps": args.steps, "warmup": args.warmup, "overrides": args.overrides,
                          "device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
                          "trainer.batch_size": cfg.trainer.batch_size, "rollout.batch_size": cfg.rollout.batch_size,
                          "rollout.num_frames": cfg.rollout.num_frames, "seed": seed_for(cfg.run.seed, "benchmark")}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    fmt = lambda v: "-" if v is None else f"{v:.3g}"
    print(f"{'path':<10}{'DMD steps/s':>14}{'GPU busy %':>12}{'data wait s':>13}{'waits>10ms':>12}{'rollout lat.fr/s':>18}")
    for name in ("single", "product"):
        r = results[name]
        print(f"{name:<10}{fmt(r['steps_per_s']):>14}{fmt(r['gpu_busy']):>12}{fmt(r.get('data_wait_mean_s')):>13}"
              f"{fmt(r.get('steps_waiting_over_10ms')):>12}{fmt(r.get('rollout_latent_frames_per_s')):>18}")
    print(f"product / single: {results['ratio']:.3f}")
    return results


if __name__ == "__main__":
    main()
