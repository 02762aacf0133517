"""experiments/steps_for_minutes.py: the steps a measured pace fits in the time given, and clear refusals."""

import json
import random

import pytest


@pytest.fixture(scope="module")
def sizing(load_experiment):
    return load_experiment("steps_for_minutes")


def test_the_steps_fit_the_minutes_after_start_up(sizing, tmp_path, capsys):
    pace, minutes = random.uniform(5, 50), random.uniform(5, 30)
    bench = tmp_path / "pace.json"
    bench.write_text(json.dumps({"rows": [{"variant": "bf16_autocast", "steps_per_s": 1000.0},
                                          {"variant": "stage_loader", "steps_per_s": pace}]}))
    steps = sizing.main([str(bench), "--minutes", str(minutes)])
    assert capsys.readouterr().out.strip() == str(steps)
    assert steps % 500 == 0
    budget = (minutes * 60 - 120) * pace * 0.85  # the stage's own pace, after start-up
    assert budget - 500 < steps <= budget


def test_too_little_time_or_no_stage_row_is_refused(sizing, tmp_path):
    with pytest.raises(ValueError, match="no time to train"):
        sizing.steps_for(20.0, minutes=1.5)
    with pytest.raises(ValueError, match="fewer than 500"):
        sizing.steps_for(0.2, minutes=10)
    bench = tmp_path / "pace.json"
    bench.write_text(json.dumps({"rows": [{"variant": "stage", "steps_per_s": 20.0}]}))
    with pytest.raises(SystemExit, match="no stage_loader row"):
        sizing.main([str(bench), "--minutes", "10"])


def _stage_log(compile_s: float, pace: float, steps: int, resumed: int = 0) -> str:
    """A teacher stage's log as the stage prints it: the mean pace since the start (or resume) every tenth of
    the steps, with a compile of compile_s before the steady pace, and Ray's doubled and coloured lines."""
    lines = ["stage pretrain_teacher"] + ([f"[pretrain_teacher] resumed at step {resumed}"] if resumed else [])
    for step in range(steps // 10, steps + 1, steps // 10):
        if step <= resumed:
            continue
        seconds = compile_s + (step - resumed) / pace
        line = (f"\x1b[36m(RayTrainWorker pid=7)\x1b[0m [pretrain_teacher] step {step}/{steps}  loss 0.0400  "
                f"{(step - resumed) / seconds:.1f} steps/s")
        lines += [line, line]
    return "\n".join(lines + ["stage pretrain_teacher: done in 900s"])


@pytest.mark.parametrize("resumed", [0, 3000])
def test_a_stage_log_gives_its_pace_after_the_compile(sizing, tmp_path, capsys, resumed):
    pace, compile_s, minutes = random.uniform(5, 40), random.uniform(30, 120), random.uniform(10, 25)
    log = tmp_path / "teacher1.txt"
    log.write_text(_stage_log(compile_s, pace, 10000, resumed))
    assert sizing.pace_from_log(log.read_text()) == pytest.approx(pace, rel=0.03)
    steps = sizing.main([str(log), "--minutes", str(minutes)])  # a stage's own pace: no efficiency taken off
    assert capsys.readouterr().out.strip() == str(steps)
    budget = (minutes * 60 - 120) * pace
    assert budget * 0.97 - 500 < steps <= budget * 1.03


def test_a_log_without_two_logged_steps_is_refused(sizing, tmp_path):
    log = tmp_path / "teacher1.txt"
    log.write_text("stage pretrain_teacher\n[pretrain_teacher] step 400/4000  loss 0.1099  4.1 steps/s\n")
    with pytest.raises(SystemExit, match="fewer than two logged steps"):
        sizing.main([str(log), "--minutes", "10"])
