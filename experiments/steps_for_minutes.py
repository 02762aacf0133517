"""How many teacher steps fit in a number of minutes, from the pace benchmarks/teacher_step.py measured for the
stage's own step (its `stage_loader` row) on the machine that will train.

    python benchmarks/teacher_step.py --config configs/world_gpu.yaml --variants stage_loader --steps 200 \
        --out pace.json <the stage's keys>
    steps=$(python experiments/steps_for_minutes.py pace.json --minutes 18)

The stage goes slower than the benchmark's step (reading the loss back, logging, Ray: 14.6 against 17.2 steps/s
on an H200 compiled, 28.7 against 30.0 under CUDA graphs, docs/results.md) and starting it and compiling cost a minute or two: --efficiency and --overhead
take these off. Prints the steps, rounded down to a multiple of --round.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def steps_for(steps_per_s: float, minutes: float, efficiency: float = 0.85, overhead_s: float = 120,
              round_to: int = 500) -> int:
    seconds = minutes * 60 - overhead_s
    if seconds <= 0 or steps_per_s <= 0:
        raise ValueError(f"{minutes} minutes leave no time to train after {overhead_s:g} s of start-up "
                         f"at {steps_per_s:g} steps/s")
    steps = int(steps_per_s * efficiency * seconds) // round_to * round_to
    if steps < round_to:
        raise ValueError(f"{minutes} minutes at {steps_per_s:g} steps/s fit fewer than {round_to} steps")
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("benchmark", type=Path, help="benchmarks/teacher_step.py's JSON with a stage_loader row")
    p.add_argument("--minutes", type=float, required=True, help="wall time for the whole teacher stage")
    p.add_argument("--efficiency", type=float, default=0.85, help="the stage's pace over the benchmark's")
    p.add_argument("--overhead", type=float, default=120, help="seconds of start-up and compiling")
    p.add_argument("--round", type=int, default=500)
    a = p.parse_args(argv)
    rows = [r for r in json.loads(a.benchmark.read_text())["rows"] if r["variant"] == "stage_loader"]
    if not rows:
        raise SystemExit(f"{a.benchmark} has no stage_loader row: run benchmarks/teacher_step.py --variants stage_loader")
    try:
        steps = steps_for(rows[0]["steps_per_s"], a.minutes, a.efficiency, a.overhead, a.round)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(steps)
    return steps


if __name__ == "__main__":
    main()
