"""Reruns into a run directory: a finished stage is compared with the new config on its own keys; a difference is
refused in one line naming the keys, and --restart discards the stage and every later one."""

import json
import random
from pathlib import Path

import pytest

from sfpp_ray import reruns
from sfpp_ray.cli import main
from sfpp_ray.config import load_config
from sfpp_ray.reruns import STAGE_MARKER, STAGE_OUTPUTS, RerunRefused

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
STAGES = list(STAGE_OUTPUTS)


def changed(value):
    """Another value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + random.choice([1, 2, 3])
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value + value[:1] if value else [1]
    return "x"


def test_a_stage_s_own_keys_count_and_resource_and_bookkeeping_keys_do_not():
    flat = load_config(TINY).flat()
    for stage in STAGES:
        keys = reruns.stage_keys(flat, stage)
        own = {"pretrain_teacher": "teacher_pretrain.", "ode": "ode.", "dmd": "dmd.", "grpo": "grpo."}[stage]
        mine = random.sample([k for k in keys if k.startswith(own)], 2)
        shared = random.choice([k for k in keys if k.startswith(("model.", "codec.", "video.", "schedule."))])
        ignored = [*random.sample(sorted(reruns.RESOURCE_KEYS), 3), "run.name", "run.output_dir", "run.stages",
                   "tracking.experiment", "evaluation.horizons"]
        new = dict(flat) | {k: changed(flat[k]) for k in [*mine, shared, *ignored]}
        assert {k for k, _, _ in reruns.changed_keys(flat, new, stage)} == {*mine, shared}, stage
        assert reruns.changed_keys(flat, dict(flat), stage) == []
    # another stage's own section is not this stage's
    new = dict(flat) | {"grpo.lr": flat["grpo.lr"] * 2}
    assert reruns.changed_keys(flat, new, "ode") == [] and reruns.changed_keys(flat, new, "grpo") != []
    # a key the saved config lacks (added to the config since) is not compared
    assert reruns.changed_keys({k: v for k, v in flat.items() if k != "ode.lr"}, flat | {"ode.lr": 1.0}, "ode") == []


def finished_run(tmp_path: Path, overrides: list[str]):
    """A run directory whose four stages finished under tiny.yaml with `overrides`, as the controller leaves it."""
    base = [f"run.output_dir={tmp_path}", "run.name=r"]
    cfg = load_config(TINY, [*base, *overrides])
    for stage in STAGES:
        (cfg.run_dir / STAGE_OUTPUTS[stage]).mkdir(parents=True)
        (cfg.run_dir / STAGE_OUTPUTS[stage] / STAGE_MARKER).write_text(json.dumps({"steps": cfg.dmd.steps}))
        reruns.save_stage_config(cfg, stage)
    for path in ("ray_train/r-pretrain_teacher", "ray_train/r", "ray_train/r-ode", "ode_pairs", "videos"):
        (cfg.run_dir / path).mkdir(parents=True)
    (cfg.run_dir / "teacher_progress.json").write_text("{}")
    return base, cfg


def test_a_changed_key_of_a_finished_stage_is_refused_in_one_line_naming_it_and_the_way_out(tmp_path, capsys):
    lr = random.choice([1e-3, 2e-3, 5e-4])
    base, cfg = finished_run(tmp_path, [f"ode.lr={lr}"])
    before = sorted(p.relative_to(cfg.run_dir) for p in cfg.run_dir.rglob("*"))
    # what only the ODE stage reads: the teacher's stage is unaffected, the ODE stage is the one named
    assert main(["train", "--config", TINY, *base, f"ode.lr={lr * 3}", "rollout.num_workers=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("error: run 'r'") and "finished stage ode" in err and f"ode.lr {lr} -> {lr * 3}" in err
    assert "run.name=" in err and "--restart ode (discards ode, dmd, grpo)" in err
    assert "rollout.num_workers" not in err  # a resource key
    assert sorted(p.relative_to(cfg.run_dir) for p in cfg.run_dir.rglob("*")) == before  # nothing touched
    reruns.check_rerun(load_config(TINY, [*base, f"ode.lr={lr}", "rollout.num_workers=1"]))  # unchanged: no refusal


def test_restart_discards_the_stage_and_every_later_one_and_keeps_the_earlier(tmp_path):
    base, cfg = finished_run(tmp_path, [])
    stage = random.choice(STAGES[1:])
    later = STAGES[STAGES.index(stage):]
    removed = {p.relative_to(cfg.run_dir).as_posix() for p in reruns.restart(cfg, stage)}
    assert {STAGE_OUTPUTS[s] for s in later} | {f"stage_configs/{s}.json" for s in later} | {"videos"} <= removed
    assert ("ode_pairs" in removed) == (stage == "ode") and ("ray_train/r" in removed) == (stage in ("ode", "dmd"))
    kept = [s for s in STAGES if s not in later]
    assert all(reruns.finished(cfg, s) and reruns.saved_stage_config(cfg, s) for s in kept)
    assert not any(reruns.finished(cfg, s) for s in later)
    assert (cfg.run_dir / "teacher_progress.json").is_file() and (cfg.run_dir / "ray_train/r-pretrain_teacher").is_dir()
    with pytest.raises(RerunRefused, match="--restart grpo: not among run.stages"):
        reruns.restart(load_config(TINY, [*base, "run.stages=[ode]"]), "grpo")
