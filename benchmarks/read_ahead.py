"""How far the data pipeline reads ahead of the DMD trainer, and how many of its rows go stale.

Runs the DMD stage (`controller.train`) on a local Ray cluster with the given overrides and prints, step by step
from MLflow, the rows drawn ahead at most, the rows drawn, the rows thrown away as older than
buffer.max_staleness, and their share (docs/faults.md).

    python benchmarks/read_ahead.py --config configs/tiny.yaml buffer.max_items=4 buffer.max_staleness=1
"""

from __future__ import annotations

import argparse
import tempfile

from mlflow import MlflowClient

from sfpp_ray.config import load_config
from sfpp_ray.distributed.controller import train

KEYS = ("data/read_ahead_max", "data/drawn_per_step", "data/replaced_stale", "data/stale_share", "data/staleness",
        "time/data_wait")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(args.config, [f"run.output_dir={out}", "run.name=read_ahead", "run.stages=[dmd]",
                                        "rollout.num_frames=12", "trainer.num_workers=1", "dmd.steps=8",
                                        "dmd.update_ratio=1", "trainer.checkpoint_every=0", *args.overrides])
        summary = train(cfg, evaluation_video=False)
        client = MlflowClient(summary["mlflow_uri"])
        rows = {key: {m.step: m.value for m in client.get_metric_history(summary["mlflow_run_id"], key)}
                for key in KEYS}
    print("step  " + "  ".join(KEYS))
    for step in range(1, cfg.dmd.steps + 1):
        print(f"{step:4d}  " + "  ".join(f"{rows[k].get(step, float('nan')):>{len(k)}.3g}" for k in KEYS))


if __name__ == "__main__":
    main()
