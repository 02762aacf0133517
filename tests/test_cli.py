"""The CLI turns a bad config value into one line naming its key and exit status 2, whether the value is bad
on its own or against what the run directory already holds."""

import json
from pathlib import Path

import pytest

from sfpp_ray.cli import main

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def test_a_bad_value_is_one_line_naming_its_key(capsys):
    assert main(["train", "--config", TINY, "trainer.num_workers=two"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config key 'trainer.num_workers'") and "\n" not in err


@pytest.mark.parametrize("key,saved", [("trainer.num_workers", {"ranks": 4, "zero_stage": 2}),
                                       ("trainer.zero_stage", {"ranks": 1, "zero_stage": 3})])
def test_resuming_on_another_trainer_layout_fails_before_anything_starts(tmp_path, capsys, key, saved):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "teacher_progress.json").write_text(json.dumps({"step": 7, **saved}))
    argv = ["pretrain-teacher", "--config", TINY, f"run.output_dir={tmp_path}", "run.name=r", "trainer.num_workers=1",
            "trainer.zero_stage=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: config key '{key}'") and "step 7" in err and "\n" not in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["teacher_progress.json"]  # nothing started, nothing written
