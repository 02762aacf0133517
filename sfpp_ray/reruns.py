"""Running a config again into a run directory that already holds finished stages.

A finished stage is skipped only if the config it ran with agrees with the new one on the keys that shape what it
made (STAGE_KEYS); otherwise the run is refused in one line naming the keys, old -> new, so that a changed setting
never silently keeps the old result. Starting over is a new `run.name`, or `--restart STAGE`, which discards that
stage's outputs and every later stage's (and starts a new MLflow run). An interrupted stage (no marker) goes on from its checkpoint as before.
Read without torch or Ray, so the refusal comes before a cluster starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sfpp_ray.config import Config, from_dict
from sfpp_ray.tracking import Tracker

STAGE_OUTPUTS = {"pretrain_teacher": "teacher", "ode": "student_ode", "dmd": "student", "grpo": "student_grpo"}
STAGE_MARKER = "stage.json"  # written last into a stage's output dir: the stage finished
CONFIGS_DIR = "stage_configs"  # <run>/stage_configs/<stage>.json: the config each stage last started with

# What every stage's result depends on, then each stage's own sections and the keys feeding it. A section counts
# whole, less RESOURCE_KEYS. trainer.num_workers counts: ranks x trainer.batch_size is the batch a step trains on.
SHARED_KEYS = ("run.seed", "run.dtype", "model", "schedule", "text", "codec", "video", "trainer")
STAGE_KEYS = {
    "pretrain_teacher": (*SHARED_KEYS, "world", "teacher_pretrain"),
    "ode": (*SHARED_KEYS, "student", "world", "ode"),
    "dmd": (*SHARED_KEYS, "student", "data", "rollout", "buffer", "dmd"),
    "grpo": (*SHARED_KEYS, "student", "data.prompts", "data.max_prompt_chars", "rollout.num_frames", "grpo"),
}
# Where and how fast a stage runs, not what it makes (and run.name / output_dir / stages / tracking / evaluation,
# which no stage's result depends on, are in no stage's keys).
RESOURCE_KEYS = frozenset({
    "trainer.gpus_per_worker", "trainer.cpus_per_worker", "trainer.max_failures", "trainer.checkpoint_every",
    "trainer.gradient_checkpointing", "trainer.fused_optimizer", "rollout.num_workers", "rollout.gpus_per_worker",
    "rollout.cpus_per_worker", "rollout.max_restarts", "rollout.decode_overlap", "data.compute", "data.num_actors",
    "student.attention", "student.compile", "teacher_pretrain.data_workers", "teacher_pretrain.checkpoint_every",
    "teacher_pretrain.compile", "teacher_pretrain.compile_mode",
})


class RerunRefused(ValueError):
    """A finished stage ran with other settings than the ones given now; the message is one line saying which."""


def stage_keys(flat: dict, stage: str) -> list[str]:
    """The dotted keys of `flat` that shape `stage`'s result."""
    prefixes = STAGE_KEYS[stage]
    return sorted(k for k in flat if k not in RESOURCE_KEYS and any(k == p or k.startswith(p + ".") for p in prefixes))


def changed_keys(saved: dict, new: dict, stage: str) -> list[tuple[str, object, object]]:
    """(key, old, new) for each of the stage's keys whose value differs; both configs flat (dotted keys). A key the
    saved config lacks (added to the config since) is not compared."""
    return [(k, saved[k], new[k]) for k in stage_keys(new, stage) if k in saved and saved[k] != new[k]]


def absolute_paths(cfg: Config) -> Config:
    """The config as a run records it and its Ray workers read it (they run in their own working directories):
    every path absolute."""
    tree = cfg.to_dict()
    tree["run"]["output_dir"] = str(Path(cfg.run.output_dir).resolve())
    for section, key in (("data", "prompts"), ("student", "checkpoint"), ("model", "pretrained"), ("text", "path"),
                         ("codec", "path")):
        if tree[section][key] is not None:
            tree[section][key] = str(Path(tree[section][key]).resolve())
    return from_dict(tree)


def finished(cfg: Config, stage: str) -> bool:
    """A stage is finished once its marker exists; DMD only up to the steps it reached, so raising dmd.steps
    continues it from its last checkpoint."""
    marker = cfg.run_dir / STAGE_OUTPUTS[stage] / STAGE_MARKER
    if not marker.is_file():
        return False
    return stage != "dmd" or json.loads(marker.read_text())["steps"] >= cfg.dmd.steps


def save_stage_config(cfg: Config, stage: str) -> None:
    """As a stage starts: the config it runs with, which a later run compares with its own."""
    path = cfg.run_dir / CONFIGS_DIR / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.flat(), indent=1, sort_keys=True) + "\n")


def saved_stage_config(cfg: Config, stage: str) -> dict | None:
    path = cfg.run_dir / CONFIGS_DIR / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_rerun(cfg: Config, restart: str | None = None) -> list[str]:
    """Refuse (RerunRefused) if a finished stage of cfg.run.stages ran with settings that differ on its keys; the
    earliest such stage is named, as restarting it reruns every later one. With `restart`, only the stages before
    it are compared (it and the later ones are discarded), and it must be one of cfg.run.stages. Returns the
    finished stages that could not be compared: finished before stages saved their config."""
    order = list(STAGE_OUTPUTS)
    if restart is not None and restart not in cfg.run.stages:
        raise RerunRefused(f"--restart {restart}: not among run.stages {cfg.run.stages}")
    new, unknown = cfg.flat(), []
    for stage in order[:order.index(restart)] if restart else order:
        if stage not in cfg.run.stages or not finished(cfg, stage):
            continue
        saved = saved_stage_config(cfg, stage)
        if saved is None:
            unknown.append(stage)
            continue
        changes = changed_keys(saved, new, stage)
        if changes:
            later = [s for s in order[order.index(stage):] if s in cfg.run.stages]
            diff = ", ".join(f"{k} {json.dumps(old)} -> {json.dumps(now)}" for k, old, now in changes)
            raise RerunRefused(
                f"run {cfg.run.name!r} ({cfg.run_dir}) finished stage {stage} with other settings: {diff}; set them back, "
                f"or start over with a new run.name=... or --restart {stage} (discards {', '.join(later)})")
    return unknown


def stage_files(cfg: Config, stage: str) -> list[Path]:
    """Everything a stage leaves in the run directory: its output, the config it ran with, its checkpoints (Ray
    Train's storage, which a rerun would resume from) and its progress record or ODE pairs."""
    storage = cfg.run_dir / "ray_train"
    files = [cfg.run_dir / STAGE_OUTPUTS[stage], cfg.run_dir / CONFIGS_DIR / f"{stage}.json",
             storage / (cfg.run.name if stage == "dmd" else f"{cfg.run.name}-{stage}")]
    extra = {"pretrain_teacher": "teacher_progress.json", "ode": "ode_pairs"}.get(stage)
    return files + ([cfg.run_dir / extra] if extra else [])


def restart(cfg: Config, stage: str) -> list[Path]:
    """Discard what `stage` and every later stage left, and the evaluation video; returns what was removed. The run
    logs to a new MLflow run from then on: the old one holds the old settings' params and steps, which MLflow keeps."""
    if stage not in cfg.run.stages:
        raise RerunRefused(f"--restart {stage}: not among run.stages {cfg.run.stages}")
    order, removed = list(STAGE_OUTPUTS), []
    for path in [p for s in order[order.index(stage):] for p in stage_files(cfg, s)] + [
            cfg.run_dir / "videos", cfg.run_dir / Tracker.RUN_ID_FILE]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed
