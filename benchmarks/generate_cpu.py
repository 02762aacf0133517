"""The README's one command, timed whole: `sfpp-ray generate` of the shipped world student on the CPU.

Wall time of the process (start, imports, load, stream, decode, writing the video), the stream's own time and
rate as `generate` reports it, and the load average before each run (other work on the cores slows a two-thread
stream badly; its CPU time says what the work costs whatever the load). Prints a table (last) and writes JSON.

    python benchmarks/generate_cpu.py --seconds 60 --out generate_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDENT = ROOT / "weights" / "world_student"
# a training-split prompt of the sprite world (sfpp_ray.world.sprites.sample_scenes(0, 4, "train"), 32x32)
PROMPT = "a blue triangle, a white triangle and a green square bouncing steadily on a brown gradient background"


def readme_command(seconds: float = 60, out: str = "outputs/demo_60s.mp4") -> str:
    """The command as README.md and scripts/demo.sh print it, from the repository root."""
    return (f'sfpp-ray generate --config configs/world_gpu.yaml --checkpoint weights/world_student --prompt "{PROMPT}" '
            f"--seconds {seconds:g} --out {out} run.device=cpu")


def command(seconds: float, out: str | Path, checkpoint: str | Path = STUDENT, prompt: str = PROMPT) -> list[str]:
    """`readme_command` as an argument list, run by this interpreter from any directory."""
    return [sys.executable, "-m", "sfpp_ray", "generate", "--config", str(ROOT / "configs" / "world_gpu.yaml"),
            "--checkpoint", str(checkpoint), "--prompt", prompt, "--seconds", f"{seconds:g}", "--out", str(out),
            "run.device=cpu"]


def run(seconds: float, out: str | Path, checkpoint: str | Path = STUDENT, threads: int | None = None) -> dict:
    """One timed run of the command: its JSON result plus the wall and CPU time of the whole process. threads:
    OpenMP threads of the process (OMP_NUM_THREADS; None: torch's default, one a core)."""
    env = dict(os.environ, **({} if threads is None else {"OMP_NUM_THREADS": str(threads)}))
    load = os.getloadavg()[0]
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(command(seconds, out, checkpoint), cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime  # ffmpeg's share included
    if done.returncode:
        raise RuntimeError(f"generate failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "wall_s": wall, "cpu_s": cpu, "load_before": load}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--checkpoint", default=str(STUDENT))
    p.add_argument("--video", default="outputs/bench_generate_cpu.mp4")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the command (default: torch's, one a core)")
    p.add_argument("--out", default="generate_cpu.json")
    args = p.parse_args(argv)
    rows = []
    for _ in range(args.repeats):
        rows.append(run(args.seconds, args.video, args.checkpoint, args.threads))
        r = rows[-1]
        print(f"{r['video_seconds']:g} s of video: {r['wall_s']:.1f} s whole command, stream {r['elapsed_s']:.1f} s "
              f"(load {r['load_before']:.1f} before)", flush=True)
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ}
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    result = {"command": readme_command(args.seconds, args.video), "checkpoint": Path(args.checkpoint).name, "env": env,
              "cpus": os.cpu_count(), "torch_threads": _torch_threads(), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("| video s | frames | latent frames | whole command s | its CPU s | stream s | latent frames/s | load before |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['video_seconds']:g} | {r['video_frames']} | {r['latent_frames']} | {r['wall_s']:.1f} | "
              f"{r['cpu_s']:.1f} | {r['elapsed_s']:.1f} | {r['latent_frames'] / r['elapsed_s']:.1f} | {r['load_before']:.1f} |")
    return result


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
