"""The controller: one function that runs a training run's stages in order, top to bottom.

    pretrain_teacher -> teacher/       flow matching on world clips              (teacher_trainer)
    ode              -> student_ode/   teacher ODE pairs, causal regression      (ode_trainer)
    dmd              -> student/       Self-Forcing++, the system below          (dmd_trainer, rollout workers, ...)
    grpo             -> student_grpo/  optical-flow reward on student rollouts   (grpo_trainer)

Every stage is a Ray Train TorchTrainer of DeepSpeed ranks. A stage starts from what the stages
before it left in the run directory (the run's teacher, the previous student) and marks its
output directory finished, so running the config again skips it. The DMD stage wires the roles:

    prompts -> PromptFeed -> RolloutWorkers -> RolloutBuffer -> Ray Data -> TorchTrainer
                                  ^                                            |
                                  +---------------- WeightBroker <-------------+

Rollout workers and trainers run concurrently and scale separately; the buffer bounds how far
rollouts may run ahead and how stale they may be. A run is identified by `run.name`: running the
same name again continues in the same MLflow run, and DMD resumes from its last checkpoint.

Faults (docs/faults.md): a dead rollout worker is restarted by Ray (rollout.max_restarts); a failed trainer group
by Ray Train (trainer.max_failures), from its last checkpoint. Resuming has one source of truth, the last
checkpoint Ray Train registered: its step, prompt feed and buffer state; checkpoint directories it never
registered (a kill between a report and its registration) are removed. Every actor a stage starts ends with it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
import zlib
from pathlib import Path

import ray
import torch
from ray.data import ExecutionResources
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from sfpp_ray.config import Config, ConfigError, from_dict, with_teacher
from sfpp_ray.distributed.buffer import create_buffer
from sfpp_ray.distributed.data_pipeline import build_dataset, read_ahead_limit
from sfpp_ray.distributed.progress import StageProgress, run_log
from sfpp_ray.distributed.prompts import PromptFeed, load_prompts
from sfpp_ray.distributed.dmd_trainer import METRICS_TIMEOUT_S, dmd_loop
from sfpp_ray.distributed.engine import PROGRESS_FILES, RESUME_FILE, dmd_memory_per_rank
from sfpp_ray.distributed.grpo_trainer import grpo_loop
from sfpp_ray.distributed.ode_trainer import ode_loop
from sfpp_ray.distributed.rollout_worker import create_rollout_worker
from sfpp_ray.distributed.teacher_trainer import pretrain_teacher_loop
from sfpp_ray.distributed.weight_sync import WeightBroker
from sfpp_ray import reruns
from sfpp_ray.reruns import STAGE_MARKER, STAGE_OUTPUTS, absolute_paths, finished
from sfpp_ray.seeding import seed_for
from sfpp_ray.tracking import Tracker

STUDENT_FROM = {"dmd": "ode", "grpo": "dmd"}  # the stage whose student a stage starts from
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered
STAGE_STEPS = {"pretrain_teacher": lambda c: c.teacher_pretrain.steps, "ode": lambda c: c.ode.steps,
               "dmd": lambda c: c.dmd.steps, "grpo": lambda c: c.grpo.steps}


def train(cfg: Config, evaluation_video: bool = True, fault_hook=None, restart: str | None = None,
          verbose: bool = True) -> dict:
    """Run the configured stages in order, skipping finished ones; returns a summary (stages run and
    skipped, each stage's result, the evaluation video unless `evaluation_video` is off (a benchmark timing
    the stages alone); the DMD stage's details at the top level). fault_hook: see dmd_trainer.dmd_loop.
    A finished stage that ran with other settings refuses the run (reruns.check_rerun) unless `restart` names it
    or an earlier stage: that stage's outputs and every later stage's are discarded and they run again.
    Each stage shows one progress line; without `verbose` (the CLI's default) Ray's, DeepSpeed's, MLflow's and
    the workers' output goes to run_dir/logs/train.log instead of the terminal (progress.RunLog)."""
    cfg = absolute_paths(cfg)
    for stage in reruns.check_rerun(cfg, restart):  # the stages before the restarted one, before it discards
        print(f"stage {stage}: finished without a saved config (an older version); its settings are not compared")
    if restart is not None:
        removed = reruns.restart(cfg, restart)
        print(f"--restart {restart}: removed {', '.join(str(p.relative_to(cfg.run_dir)) for p in removed) or 'nothing'}"
              f" in {cfg.run_dir}")
    pending = [stage for stage in cfg.run.stages if not finished(cfg, stage)]
    for stage in pending:
        _check_resumable(cfg, stage)
    with run_log(cfg.run_dir, verbose) as log:
        try:
            start_ray(cpus_needed(cfg, pending))
            log.take_worker_output()
            return _run_stages(cfg, evaluation_video, fault_hook)
        except BaseException:
            if not verbose:
                print(f"the run stopped; what Ray, DeepSpeed and the workers said is in {log.path}")
            raise


def _run_stages(cfg: Config, evaluation_video: bool, fault_hook) -> dict:
    prompts, prompt_report = load_prompts(cfg.data.prompts, cfg.data.max_prompt_chars)
    tracker = Tracker(cfg.tracking, cfg.run_dir, cfg.run.name)
    run_id = tracker.start(cfg.to_dict())
    tracker.log_params({"prompts": {"kept": prompt_report["kept"], "rejected": prompt_report["rejected"]}})
    summary: dict = {"stages_run": [], "stages_skipped": [], "stages": {}}
    try:
        for stage in cfg.run.stages:
            if finished(cfg, stage):
                print(f"stage {stage}: finished earlier ({cfg.run_dir / STAGE_OUTPUTS[stage]}), skipped")
                summary["stages_skipped"].append(stage)
                continue
            steps = STAGE_STEPS[stage](cfg)
            print(f"stage {stage}: {steps} steps")
            t0 = time.perf_counter()
            reruns.save_stage_config(cfg, stage)
            stage_cfg = _stage_config(cfg, stage)
            progress = StageProgress(cfg.run_dir, stage, steps)
            try:
                if stage == "dmd":
                    memory = dmd_memory_per_rank(stage_cfg)
                    print(f"stage dmd: per trainer rank, about {memory['total']:.1f} GiB of weights, gradients and "
                          f"optimizer state ({', '.join(f'{k} {memory[k]:.1f}' for k in ('teacher', 'student', 'critic', 'average'))}; "
                          f"{memory['teacher_parameters'] / 1e9:.2f}B-parameter teacher, activations not counted"
                          + (f"; the teacher's {memory['teacher_in_cpu_memory']:.1f} GiB in CPU memory"
                             if memory['teacher_in_cpu_memory'] else "") + ")")
                    result = _train_dmd(stage_cfg, prompts, run_id, fault_hook)
                else:
                    result = _fit(stage_cfg, stage, run_id, prompts=prompts)
            finally:
                progress.close()
            summary["stages"][stage] = result | {"seconds": time.perf_counter() - t0}
            summary["stages_run"].append(stage)
            print(f"stage {stage}: done in {summary['stages'][stage]['seconds']:.0f} s")
        student = _last_student(cfg)
        video = None
        if student is not None and evaluation_video:
            print(f"evaluation video: {2 * cfg.video.teacher_frames} latent frames from {student}")
            video = _evaluation_video(cfg, prompts[0], student)
            tracker.log_artifact(video, artifact_path="videos")
    except BaseException:
        try:
            tracker.finish("FAILED")
        except Exception as e:  # the run's own error is the one to raise
            print(f"MLflow run {run_id} not marked failed: {type(e).__name__}: {e}")
        raise
    tracker.finish()
    summary.update(summary["stages"].get("dmd", {}))
    summary.update(student=student, video=video and str(video), mlflow_run_id=run_id, mlflow_uri=tracker.tracking_uri)
    print(closing_summary(cfg, summary))
    return summary


def closing_summary(cfg: Config, summary: dict) -> str:
    """What a run wrote and where, as train's last lines: the run directory, each stage's output (the student the
    evaluation video shows marked), the video, and the MLflow run with the command that shows it."""
    run, skipped = summary["stages_run"], summary["stages_skipped"]
    lines = [f"run {cfg.run.name!r} in {cfg.run_dir}: ran {', '.join(run) or 'no stage'}"
             + (f"; skipped {', '.join(skipped)} (finished earlier)" if skipped else "")]
    width = max(map(len, [*STAGE_OUTPUTS, "video", "MLflow"]))
    for stage in cfg.run.stages:
        output = cfg.run_dir / STAGE_OUTPUTS[stage]
        note = "  (student)" if str(output) == summary["student"] else ""
        lines.append(f"  {stage:<{width}}  {output}{note}" if (output / STAGE_MARKER).is_file()
                     else f"  {stage:<{width}}  not finished")
    if summary["video"]:
        lines.append(f"  {'video':<{width}}  {summary['video']}")
    if summary["mlflow_run_id"]:
        lines.append(f"  {'MLflow':<{width}}  run {summary['mlflow_run_id']} at {summary['mlflow_uri']} "
                     f"(mlflow ui --backend-store-uri {summary['mlflow_uri']})")
    else:
        lines.append(f"  {'MLflow':<{width}}  off (tracking.enabled=false)")
    return "\n".join(lines)


def _stage_config(cfg: Config, stage: str) -> Config:
    """The config a stage trains with: the run's pretrained teacher (and text encoder) once it exists, and the student
    of the stage before (the ODE student for DMD, the DMD student for GRPO)."""
    if finished(cfg, "pretrain_teacher"):
        cfg = with_teacher(cfg, cfg.run_dir / STAGE_OUTPUTS["pretrain_teacher"])
    tree = cfg.to_dict()
    source = STUDENT_FROM.get(stage)
    if source is not None and (cfg.run_dir / STAGE_OUTPUTS[source] / STAGE_MARKER).is_file():
        tree["student"]["checkpoint"] = str(cfg.run_dir / STAGE_OUTPUTS[source])
    elif stage == "grpo" and cfg.student.checkpoint is None:
        raise RuntimeError(f"grpo starts from a DMD student: {cfg.run_dir / 'student'} has none and "
                           "student.checkpoint is not set; run the dmd stage first or name one")
    return from_dict(tree)


def _last_student(cfg: Config) -> str | None:
    """The newest student the run has produced, which the evaluation video shows."""
    for stage in ("grpo", "dmd", "ode"):
        path = cfg.run_dir / STAGE_OUTPUTS[stage]
        if (path / STAGE_MARKER).is_file():
            return str(path)
    return None


def _fit(cfg: Config, stage: str, run_id: str | None, prompts: list[str]) -> dict:
    """One of the stages around DMD: a TorchTrainer of `trainer.num_workers` ranks, no rollout workers."""
    loop = {"pretrain_teacher": pretrain_teacher_loop, "ode": ode_loop, "grpo": grpo_loop}[stage]
    trainer = TorchTrainer(
        loop,
        train_loop_config={"cfg": cfg.to_dict(), "mlflow_run_id": run_id, "prompts": prompts},
        scaling_config=_scaling(cfg),
        run_config=RunConfig(name=f"{cfg.run.name}-{stage}", storage_path=str(cfg.run_dir / "ray_train")),
    )
    output = cfg.run_dir / STAGE_OUTPUTS[stage]
    return {"metrics": _run(trainer).metrics, "output": str(output),
            "record": json.loads((output / STAGE_MARKER).read_text())}


def _run(trainer: TorchTrainer):
    """trainer.fit(), leaving nothing of it running. Ray Train's fit installs a Ctrl-C handler that holds its
    TrainController actor, which so outlived the stage (until the next fit replaced the handler, or the process
    ended); putting the previous handler back releases the actor as soon as the stage ends."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    finally:
        if main:
            signal.signal(signal.SIGINT, handler)


def _train_dmd(cfg: Config, prompts: list[str], run_id: str | None, fault_hook=None) -> dict:
    """The Self-Forcing++ loop: rollout workers feed the buffer while the trainers distil on it."""
    storage = cfg.run_dir / "ray_train" / cfg.run.name
    resume = _registered_resume_state(storage)
    _remove_unregistered_checkpoints(storage)
    start_step, total = resume.get("step", 0), cfg.dmd.steps
    if start_step >= total:
        raise ValueError(f"run {cfg.run.name!r} already reached step {start_step} of dmd.steps={total}; "
                         "raise dmd.steps to train further or pick a new run.name")
    prefix = f"sfpp-{cfg.run.name}-{zlib.crc32(str(cfg.run_dir).encode()):08x}"  # two runs' actors never clash
    names = {"buffer": f"{prefix}-buffer", "feed": f"{prefix}-feed", "broker": f"{prefix}-broker",
             "rollout_workers": [f"{prefix}-rollout-{i}" for i in range(cfg.rollout.num_workers)]}
    rows_a_step = cfg.trainer.num_workers * cfg.trainer.batch_size
    buffer = create_buffer(cfg.buffer, seed=cfg.run.seed, name=names["buffer"], read_ahead=read_ahead_limit(cfg),
                           rows_per_version=rows_a_step * cfg.trainer.sync_every)
    feed = PromptFeed.options(name=names["feed"]).remote(prompts)
    broker = WeightBroker.options(name=names["broker"]).remote()
    if resume:  # counters, policy version and prompt position as the checkpoint left them
        ray.get([buffer.load_state_dict.remote(resume["buffer"]), feed.load_state_dict.remote(resume["feed"])])
    workers = [create_rollout_worker(cfg, i, name=n) for i, n in enumerate(names["rollout_workers"])]
    # After a resume the workers wait for the trainer to publish the checkpoint's weights, version start_step.
    runs = [w.run.remote(buffer, feed, broker, min_version=start_step) for w in workers]
    print(f"run {cfg.run.name!r}: steps {start_step + 1}..{total}, {len(workers)} rollout workers, "
          f"{cfg.trainer.num_workers} trainer workers")

    dataset = build_dataset(cfg, buffer, (total - start_step) * rows_a_step, first_row=start_step * rows_a_step)
    trainer = TorchTrainer(
        dmd_loop,
        train_loop_config={"cfg": cfg.to_dict(), "actors": names, "mlflow_run_id": run_id, "total_steps": total,
                           "fault_hook": fault_hook},
        scaling_config=_scaling(cfg),
        run_config=RunConfig(name=cfg.run.name, storage_path=str(cfg.run_dir / "ray_train"),
                             failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.trainer.keep_checkpoints or None)),
        datasets={"train": dataset},
        dataset_config=_data_config(cfg),
    )
    done = threading.Event()
    watcher = threading.Thread(target=_watch_rollouts, args=(runs, buffer, done), daemon=True)
    watcher.start()
    try:
        result = _run(trainer)
    finally:  # never raises: an error of the run itself is the one that propagates
        done.set()
        stats, published = _stop_rollouts(workers, runs, buffer, feed, broker)
        watcher.join()
        try:
            _remove_unregistered_checkpoints(storage)
        except (OSError, RuntimeError) as e:
            print(f"stage shutdown: unregistered checkpoints left in {storage}: {e}")
    return {"steps": (start_step, total), "metrics": result.metrics, "published": published, "rollout": stats,
            "checkpoints": str(storage), "student": str(cfg.run_dir / "student")}


def _watch_rollouts(runs: list, buffer, done: threading.Event) -> None:
    """A worker's `run` ends before the stage only when the worker is gone for good (its restarts ran out). Once
    every one has, close the buffer: the data pipeline then fails the stage instead of waiting forever."""
    pending = list(runs)
    while pending and not done.is_set():
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
    if not pending and not done.is_set():
        print("every rollout worker is gone (rollout.max_restarts ran out): closing the buffer, the stage fails")
        buffer.close.remote()


def _stop_rollouts(workers: list, runs: list, buffer, feed, broker) -> tuple[list[dict], list]:
    """Stop the rollout side and kill its actors; returns each worker's stats and the broker's history. Never
    raises and never waits on a dead actor beyond a deadline: what does not answer is reported as such."""
    for w in workers:
        w.stop.remote()
    _wait_all([buffer.close.remote(), broker.close.remote()], "closing the buffer and broker")  # releases workers
    stats = [_rollout_stats(i, w, r) for i, (w, r) in enumerate(zip(workers, runs))]
    published = _wait_all([broker.history.remote()], "the broker's history")
    for actor in [*workers, buffer, feed, broker]:
        ray.kill(actor)
    return stats, published[0] if published else []


def _wait_all(refs: list, what: str, timeout: float = 60.0) -> list | None:
    """The refs' values, or None (and a line saying why) if any failed or ran past `timeout`."""
    try:
        return ray.get(refs, timeout=timeout)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
        print(f"stage shutdown: {what} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None


def _scaling(cfg: Config) -> ScalingConfig:
    """trainer.num_workers ranks, each holding trainer.gpus_per_worker of a GPU (a fraction shares it), or on CPUs
    trainer.cpus_per_worker logical CPUs."""
    t = cfg.trainer
    if t.gpus_per_worker == 0:
        return ScalingConfig(num_workers=t.num_workers, use_gpu=False, resources_per_worker={"CPU": t.cpus_per_worker})
    return ScalingConfig(num_workers=t.num_workers, use_gpu=True, resources_per_worker={"GPU": t.gpus_per_worker})


def _rollout_stats(index: int, worker, run) -> dict:
    """A worker's stats once it has left `run`. The final weights live in the trainer rank that
    published them; a worker that fetched them as that rank exited loses them and leaves `run` with
    OwnerDiedError, its stats up to then intact. A worker gone for good has none."""
    try:
        return ray.get(run, timeout=60.0)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
        stats = _wait_all([worker.stats.remote()], f"rollout worker {index}'s stats", timeout=METRICS_TIMEOUT_S)
        return stats[0] if stats else {"worker": index, "error": type(e).__name__}


def _data_config(cfg: Config) -> DataConfig:
    """Cap Ray Data at the CPUs this run budgets for it. Left alone, Data plans on everything Ray
    Train left free, including what the rollout workers hold, and waits forever on tasks it
    believes are running."""
    options = DataConfig.default_ingest_options()
    options.resource_limits = ExecutionResources.for_limits(cpu=_data_cpus(cfg))
    return DataConfig(execution_options=options)


def _evaluation_video(cfg: Config, prompt: str, student: str) -> Path:
    """Twice the teacher's horizon in latent frames (the long-video regime), streamed and written as video: mp4,
    or gif where imageio's ffmpeg is not installed (a finished stage must not fail on its preview)."""
    import importlib.util

    from sfpp_ray.generate import VideoGenerator
    from sfpp_ray.video_io import VideoWriter

    out = cfg.run_dir / "videos" / ("eval.mp4" if importlib.util.find_spec("imageio_ffmpeg") else "eval.gif")
    out.parent.mkdir(parents=True, exist_ok=True)
    with VideoWriter(out, cfg.video.fps) as writer:
        VideoGenerator(cfg, student).stream(prompt, 2 * cfg.video.teacher_frames, writer,
                                            seed=seed_for(cfg.run.seed, "evaluation_video"))
    return out


def _snapshot(storage: Path) -> dict:
    """Ray Train's record of a run's registered checkpoints ({} before the first)."""
    path = storage / SNAPSHOT_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{path} is not readable JSON ({e}); it is Ray Train's record of the checkpoints of this "
                           "run: restore it or pick a new run.name") from None


def _registered_resume_state(storage: Path) -> dict:
    """The resume state in the last checkpoint Ray Train registered, the one a rerun restores ({} for a new run):
    the one source of the step a DMD stage goes on from."""
    latest = _snapshot(storage).get("latest_checkpoint_result")
    if latest is None:
        return {}
    path = storage / latest["checkpoint_dir_name"] / RESUME_FILE
    if not path.is_file():
        raise RuntimeError(f"the last registered checkpoint has no {RESUME_FILE} ({path}): it was not written by "
                           "this DMD stage; pick a new run.name")
    return json.loads(path.read_text())


def _remove_unregistered_checkpoints(storage: Path) -> None:
    """Checkpoint directories Ray Train never registered: their run was killed between a report and its
    registration. Nothing restores them; they only take space."""
    registered = {r["checkpoint_dir_name"] for r in _snapshot(storage).get("checkpoint_results", [])}
    for path in sorted(storage.glob("checkpoint_*")):
        if path.is_dir() and path.name not in registered:
            print(f"removing {path}: a checkpoint that was never registered")
            shutil.rmtree(path)


def _saved_progress(cfg: Config, stage: str) -> dict | None:
    """Where a stage's last checkpoint left off, if it has one."""
    if stage == "dmd":
        return _registered_resume_state(cfg.run_dir / "ray_train" / cfg.run.name) or None
    if stage in PROGRESS_FILES and (path := cfg.run_dir / PROGRESS_FILES[stage]).is_file():
        return json.loads(path.read_text())
    return None


def _check_resumable(cfg: Config, stage: str) -> None:
    """A stage that goes on from a checkpoint needs the trainer layout that saved it: DeepSpeed's optimizer
    shards (ZeRO and the bf16 optimizer) and a ZeRO-3 moving average are one file per rank. Fail here, naming the
    key, rather than in every rank after the cluster has started."""
    saved = _saved_progress(cfg, stage)
    if saved is None:
        return
    where = (f"run {cfg.run.name!r} goes on from its {stage} checkpoint at step {saved['step']}, saved by "
             f"{saved.get('ranks')} trainer ranks under ZeRO-{saved.get('zero_stage')}")
    for key, value, now in (("trainer.num_workers", saved.get("ranks"), cfg.trainer.num_workers),
                            ("trainer.zero_stage", saved.get("zero_stage"), cfg.trainer.zero_stage)):
        if value is not None and value != now:
            raise ConfigError(key, f"{where}: set {key}={value} to resume it (got {now}), or pick a new run.name")


def _data_cpus(cfg: Config) -> int:
    """Ray Data's CPUs: one for the range read and task transforms, plus an actor pool per transform."""
    return 1 + (2 * cfg.data.num_actors if cfg.data.compute == "actors" else 0)


def cpus_needed(cfg: Config, stages: list[str]) -> float:
    """Logical CPUs the stages to run hold at once: trainer.cpus_per_worker per trainer worker, and during DMD the
    rollout workers and Ray Data besides."""
    during_dmd = cfg.rollout.num_workers * cfg.rollout.cpus_per_worker + _data_cpus(cfg) if "dmd" in stages else 0
    return cfg.trainer.num_workers * cfg.trainer.cpus_per_worker + during_dmd


def start_ray(cpus_needed: float) -> None:
    """Join the cluster in RAY_ADDRESS (or the one already initialised), or start a local one.

    A local cluster gets at least the logical CPUs the run needs, so a small machine runs the
    tiny config oversubscribed instead of waiting forever for resources. A joined cluster that
    is too small fails here, with the numbers, rather than hanging in scheduling.
    """
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address is None:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            if not torch.cuda.is_available():
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
            cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed))
            print(f"Ray: starting a local cluster of {cpus} CPUs")
            ray.init(num_cpus=cpus)
        else:
            print(f"Ray: joining the cluster at {address}")
            ray.init(address=address)
    available = ray.cluster_resources().get("CPU", 0)
    if available < cpus_needed:
        raise RuntimeError(f"the run needs {cpus_needed:g} CPUs (trainer.num_workers x trainer.cpus_per_worker, and "
                           f"for the dmd stage rollout.num_workers x rollout.cpus_per_worker and the data transforms) "
                           f"but the cluster has {available:g}; lower the cpus_per_worker or the worker counts, or add "
                           "nodes")
