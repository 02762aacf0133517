"""`sfpp-ray serve`'s latency as its HTTP clients see it: time to first frame and the gap between blocks, for 1..N
streams playing at once on one replica (they take turns on the student a block at a time).

Starts the deployment on a local Ray cluster (or the one in RAY_ADDRESS) with serve.realtime false, so each stream
runs as fast as the student makes blocks; prints a table (last) and writes JSON.

    python benchmarks/serve_latency.py --config configs/world_gpu.yaml --checkpoint weights/world_student \
        --streams 1,2,4 --seconds 10 --out serve_latency.json run.device=cpu text.kind=umt5 \
        text.path=weights/world_student
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
import torch

from sfpp_ray.config import load_config
from sfpp_ray.distributed.server import free_port

PROMPT = "a blue triangle, a white triangle and a green square bouncing steadily on a brown gradient background"


def play(url: str, seconds: float, seed: int) -> dict:
    """One client: start a stream, read it to the end; the arrival time of every JPEG part."""
    made = requests.post(url + "streams", json={"prompt": PROMPT, "seconds": seconds, "seed": seed}, timeout=600)
    made.raise_for_status()
    sid, blocks = made.json()["id"], made.json()["blocks"]
    start, arrivals = time.perf_counter(), []
    with requests.get(url + f"streams/{sid}/video", stream=True, timeout=600) as video:
        for chunk in video.iter_content(chunk_size=None):
            arrivals += [time.perf_counter() - start] * chunk.count(b"Content-Type: image/jpeg")
    return {"blocks": blocks, "frames": len(arrivals), "arrivals": arrivals}


def measure(url: str, streams: int, seconds: float, fps: int) -> dict:
    with ThreadPoolExecutor(streams) as pool:
        t0 = time.perf_counter()
        runs = list(pool.map(lambda i: play(url, seconds, i), range(streams)))
        wall = time.perf_counter() - t0
    frames_per_block = runs[0]["frames"] // runs[0]["blocks"]
    first = [r["arrivals"][0] for r in runs]
    gaps = np.concatenate([np.diff(r["arrivals"][::frames_per_block]) for r in runs])  # block to block
    video_s = sum(r["frames"] for r in runs) / fps
    return {"streams": streams, "frames_each": runs[0]["frames"], "first_frame_s": float(np.mean(first)),
            "block_gap_mean_s": float(gaps.mean()), "block_gap_p95_s": float(np.percentile(gaps, 95)),
            "video_s_per_s": video_s / wall, "wall_s": wall}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--streams", default="1,2", help="comma-separated numbers of streams at once")
    p.add_argument("--seconds", type=float, default=5.0, help="video seconds per stream")
    p.add_argument("--out", help="JSON file")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.streams.split(",")]
    cfg = load_config(args.config, [*args.overrides, f"serve.port={free_port()}", "serve.realtime=false",
                                    f"serve.max_streams={max(counts)}", f"serve.max_seconds={args.seconds}"])
    import ray
    from ray import serve

    from sfpp_ray.distributed import server
    from sfpp_ray.distributed.controller import start_ray

    start_ray(cfg.serve.cpus_per_replica)
    url = server.start(cfg, args.checkpoint)
    try:
        # warm-up: a whole stream, so the window fills and rolls (a compiled student compiles each pass shape here)
        play(url, args.seconds, 99)
        rows = [measure(url, n, args.seconds, cfg.video.fps) for n in counts]
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {"config": args.config, "checkpoint": args.checkpoint, "overrides": args.overrides,
              "device": cfg.run.device, "torch": torch.__version__, "host": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"{'streams':>7} {'frames each':>11} {'first frame s':>13} {'block gap s':>11} {'p95 s':>7} "
          f"{'video s / s':>11}")
    for r in rows:
        print(f"{r['streams']:>7} {r['frames_each']:>11} {r['first_frame_s']:>13.3f} {r['block_gap_mean_s']:>11.3f} "
              f"{r['block_gap_p95_s']:>7.3f} {r['video_s_per_s']:>11.2f}")
    return result


if __name__ == "__main__":
    main()
