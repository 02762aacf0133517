"""How many teacher steps fit in a number of minutes, from the pace benchmarks/teacher_step.py measured for the
stage's own step (its `stage_loader` row) on the machine that will train.

    python benchmarks/teacher_step.py --config configs/world_gpu.yaml --variants stage_loader --steps 200 \
        --out pace.json <the stage's keys>
    steps=$(python experiments/steps_for_minutes.py pace.json --minutes 18)

The stage goes slower than the benchmark's step (reading the loss back, logging, Ray: 14.6 against 17.2 steps/s
on an H200 compiled, 28.7 against 30.0 under CUDA graphs, docs/notes/teacher_runs.md) and starting it and
compiling cost a minute or two: --efficiency and --overhead take these off. Prints the steps, rounded down to a multiple of --round.

The pace can also come from a teacher stage's own log (any file not ending in .json), e.g. a short run of a
layout the benchmark cannot time, such as several ranks: the pace between the middle and the last of its
logged steps, after the compile; the stage's pace, so --efficiency defaults to 1 there.

    steps=$(python experiments/steps_for_minutes.py outputs/probe/logs/teacher1.txt --minutes 18)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

LOGGED = re.compile(r"\[pretrain_teacher\] step (\d+)/\d+ .*?([\d.]+) steps/s")
RESUMED = re.compile(r"\[pretrain_teacher\] resumed at step (\d+)")


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


def pace_from_log(text: str) -> float:
    """Steps/s between the logged step nearest half the last one and the last: each line logs the mean pace
    since the stage began (or resumed), so the difference of two points leaves the compile out."""
    resumed = [int(m.group(1)) for m in RESUMED.finditer(text)]
    start = resumed[-1] if resumed else 0
    points = sorted({int(m.group(1)): float(m.group(2)) for m in LOGGED.finditer(text)}.items())
    points = [(step, mean) for step, mean in points if step > start and mean > 0]
    if len(points) < 2:
        raise ValueError("the log has fewer than two logged steps of the teacher stage: let it run longer")
    last, mean_last = points[-1]
    middle, mean_middle = min(points[:-1], key=lambda p: abs(p[0] - last / 2))
    seconds = (last - start) / mean_last - (middle - start) / mean_middle
    if seconds <= 0:
        raise ValueError(f"the logged paces at steps {middle} and {last} do not give a pace")
    return (last - middle) / seconds


def stage_loader_pace(path: Path) -> float:
    rows = [r for r in json.loads(path.read_text())["rows"] if r["variant"] == "stage_loader"]
    if not rows:
        raise ValueError(f"{path} has no stage_loader row: run benchmarks/teacher_step.py --variants stage_loader")
    return rows[0]["steps_per_s"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pace", type=Path, help="benchmarks/teacher_step.py's JSON with a stage_loader row, or a stage's log")
    p.add_argument("--minutes", type=float, required=True, help="wall time for the whole teacher stage")
    p.add_argument("--efficiency", type=float, help="the stage's pace over the measured one (0.85 for the "
                   "benchmark's, 1 for a stage log's)")
    p.add_argument("--overhead", type=float, default=120, help="seconds of start-up and compiling")
    p.add_argument("--round", type=int, default=500)
    a = p.parse_args(argv)
    from_benchmark = a.pace.suffix == ".json"
    efficiency = a.efficiency if a.efficiency is not None else 0.85 if from_benchmark else 1.0
    try:
        pace = stage_loader_pace(a.pace) if from_benchmark else pace_from_log(a.pace.read_text(errors="replace"))
        steps = steps_for(pace, a.minutes, efficiency, a.overhead, a.round)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(steps)
    return steps


if __name__ == "__main__":
    main()
