"""Rollout throughput against the number of rollout workers, through the real Ray roles.

Starts a local Ray cluster, the buffer, the prompt feed and the weight broker, then 1 and 2 (or
`--workers`) rollout workers that each produce `--samples` rollouts while a consumer drains the
buffer. Prints samples per second and the ratio to one worker (a table, last); writes JSON.

    python benchmarks/rollout_scaling.py --config configs/tiny.yaml --samples 6 --out rollout_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import ray

from sfpp_ray.config import load_config
from sfpp_ray.distributed.buffer import create_buffer
from sfpp_ray.distributed.prompts import PromptFeed, load_prompts
from sfpp_ray.distributed.rollout_worker import create_rollout_worker
from sfpp_ray.distributed.weight_sync import WeightBroker


@ray.remote(num_cpus=0)
def drain(buffer, total: int) -> int:
    """The consumer: takes samples as they come and drops them, so the buffer never blocks producers."""
    taken = 0
    while taken < total:
        items = ray.get(buffer.get.remote(1))
        ray.get([item.ref for item in items])
        taken += len(items)
    return taken


def measure(cfg, workers: int, samples: int) -> dict:
    prompts, _ = load_prompts(cfg.data.prompts, cfg.data.max_prompt_chars)
    buffer = create_buffer(cfg.buffer)
    feed = PromptFeed.remote(prompts)
    broker = WeightBroker.options(num_cpus=0).remote()
    actors = [create_rollout_worker(cfg, i) for i in range(workers)]
    # Warm-up, untimed: model construction and each worker's first rollout.
    warm = drain.remote(buffer, workers)
    ray.get([a.run.remote(buffer, feed, broker, max_samples=1) for a in actors])
    ray.get(warm)
    t0 = time.perf_counter()
    consumer = drain.remote(buffer, workers * samples)
    stats = ray.get([a.run.remote(buffer, feed, broker, max_samples=1 + samples) for a in actors])
    ray.get(consumer)
    seconds = time.perf_counter() - t0
    for a in actors:
        ray.kill(a)
    ray.kill(buffer)
    return {"workers": workers, "samples": workers * samples, "seconds": seconds,
            "samples_per_s": workers * samples / seconds, "worker_fps": [s["fps"] for s in stats]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--samples", type=int, default=6, help="rollouts per worker")
    p.add_argument("--out", default="rollout_scaling.json")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides + ["rollout.cpus_per_worker=1"])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    counts = [int(x) for x in a.workers.split(",")]
    ray.init(num_cpus=max(counts) + 1, include_dashboard=False, log_to_driver=False)
    rows = [measure(cfg, n, a.samples) for n in counts]
    ray.shutdown()
    base = rows[0]["samples_per_s"] / rows[0]["workers"] * counts[0]
    for r in rows:
        r["ratio_to_first"] = r["samples_per_s"] / base
    result = {"config": a.config, "latent_frames": cfg.rollout.num_frames, "cpus": os.cpu_count(), "rows": rows}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nrollout scaling: {a.config}, {cfg.rollout.num_frames} latent frames a rollout, {os.cpu_count()} CPUs")
    print(f"{'workers':>8}{'samples':>9}{'seconds':>10}{'samples/s':>11}{'ratio':>8}")
    for r in rows:
        print(f"{r['workers']:>8}{r['samples']:>9}{r['seconds']:>10.2f}{r['samples_per_s']:>11.2f}{r['ratio_to_first']:>8.2f}")


if __name__ == "__main__":
    main()
