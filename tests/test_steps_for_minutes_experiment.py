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
