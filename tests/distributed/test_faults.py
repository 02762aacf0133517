"""Faults in a DMD run on a local Ray cluster (docs/faults.md): rollout workers killed mid-run, the trainer killed
between a checkpoint's report and its registration, twice (Ray Train recovers the first, a rerun the second), and
the data pipeline's read-ahead. One run and its rerun; the run ends at its configured step, each step in MLflow once."""

import functools
import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import ray
from mlflow import MlflowClient

from sfpp_ray.config import load_config
from sfpp_ray.distributed.controller import SNAPSHOT_FILE, _registered_resume_state, train
from sfpp_ray.distributed.data_pipeline import read_ahead_limit

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"
STEPS, MAX_ITEMS = 4, 4
ROLES = ("TrainController", "RayTrainWorker", "PlacementGroupCleaner", "SynchronizationActor", "DatasetManager",
         "SplitCoordinator", "MapWorker", "RolloutWorker", "RolloutBuffer", "PromptFeed", "WeightBroker")  # a stage's


def inject(marks: Path, storage: Path, point: str, step: int, rank: int, actors: dict) -> None:
    """Each fault once (a file marks it done), right after a step's report returned, its checkpoint not yet
    registered. Step 1: ray.kill of rollout worker 0 (restart allowed) and SIGKILL of worker 1's process, waited
    for until both new processes have taken over (so the checkpoints from step 2 on count both restarts). Steps 2
    and 3: SIGKILL of the trainer itself, once the step before is registered (so the rerun's checkpoint, step 2,
    counts the restarts); its mark records the steps Ray Train had registered then."""
    mark = marks / f"step{step}"
    if point != "after_report" or rank != 0 or step >= STEPS or mark.exists():
        return
    deadline = time.monotonic() + 600  # a loaded machine restarts slowly
    if step > 1:
        while step - 1 not in registered_steps(storage):
            assert time.monotonic() < deadline, f"step {step - 1} was not registered"
            time.sleep(0.05)  # polling Ray Train's record from the trainer's process, with a deadline
        mark.write_text(json.dumps(registered_steps(storage)))
        os.kill(os.getpid(), signal.SIGKILL)
    mark.touch()
    first, second = (ray.get_actor(name) for name in actors["rollout_workers"])
    pid = ray.get(second.pid.remote())
    ray.kill(first, no_restart=False)
    os.kill(pid, signal.SIGKILL)
    feed = ray.get_actor(actors["feed"])
    while ray.get(feed.stats.remote())["worker_restarts"] < 2:
        assert time.monotonic() < deadline, "the rollout workers were not restarted"
        time.sleep(0.05)  # polling the restarts from the trainer's process, with a deadline


def registered_steps(storage: Path) -> list[int]:
    """The steps Ray Train's checkpoint record holds; read again while Ray is rewriting it (not atomically)."""
    snapshot = storage / SNAPSHOT_FILE
    deadline = time.monotonic() + 60
    while snapshot.is_file():
        try:
            return [r["metrics"]["step"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
        except json.JSONDecodeError:
            assert time.monotonic() < deadline, f"{snapshot} stayed unreadable"
            time.sleep(0.01)  # caught mid-write
    return []


def checkpoint_dirs(storage: Path) -> list[str]:
    return sorted(p.name for p in storage.glob("checkpoint_*") if p.is_dir())


def stage_processes(since: float = 0.0) -> list[str]:
    """This session's Ray processes (the cluster's raylet is a child of this process) that serve a stage's actors,
    started at or after `since` (epoch seconds): the shared cluster may still hold actors of earlier tests."""
    titles = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.create_time() >= since:
                titles.append(" ".join(p.cmdline()))
        except psutil.NoSuchProcess:
            continue  # ended while listed
    return [t for t in titles if t.startswith(tuple(f"ray::{role}" for role in ROLES))]


@pytest.fixture(scope="module")
def faulty_run(ray_cluster, tmp_path_factory):
    """Ray Train may restart the trainer once (trainer.max_failures=1): the kill at step 2 it recovers from (from
    step 1), the one at step 3 ends the run, which the same command then finishes (from step 2)."""
    out = tmp_path_factory.mktemp("faults")
    marks = out / "marks"
    marks.mkdir()
    cfg = load_config(CONFIG, [
        "run.name=faults", f"run.output_dir={out}", "run.stages=[dmd]", "rollout.num_frames=12",
        "rollout.num_workers=2", "rollout.cpus_per_worker=0.5", "trainer.num_workers=1", "trainer.checkpoint_every=1",
        "trainer.keep_checkpoints=0", "trainer.max_failures=1", "rollout.max_restarts=2", f"buffer.max_items={MAX_ITEMS}",
        f"dmd.steps={STEPS}", "dmd.update_ratio=1", "tracking.experiment=sfpp-faults"])
    storage = cfg.run_dir / "ray_train" / cfg.run.name
    hook = functools.partial(inject, marks, storage)
    started = time.time() - 1.0  # process start times are rounded
    with pytest.raises(Exception, match="TrainingFailedError|WorkerGroupError|died"):
        train(cfg, evaluation_video=False, fault_hook=hook)
    after_kill = {"dirs": checkpoint_dirs(storage),
                  "resume": _registered_resume_state(storage)}
    summary = train(cfg, evaluation_video=False, fault_hook=hook)
    deadline = time.monotonic() + 120
    while (left := stage_processes(started)) and time.monotonic() < deadline:
        time.sleep(0.2)  # actors end asynchronously once released
    return summary | {"cfg": cfg, "after_kill": after_kill, "left": left, "marks": {p.name: p.read_text() for p in marks.iterdir()}}


def test_the_run_finishes_at_its_step_after_every_fault(faulty_run):
    marks = faulty_run["marks"]
    assert sorted(marks) == ["step1", "step2", "step3"]  # every fault happened
    # Each trainer kill came before its step's checkpoint was registered.
    assert json.loads(marks["step2"]) == [1] and json.loads(marks["step3"]) == [1, 2]
    # The rerun went on from the last registered checkpoint, not from the unregistered one after it.
    resumed = faulty_run["after_kill"]["resume"]["step"]
    assert resumed == 2 and faulty_run["steps"] == (resumed, STEPS)
    assert faulty_run["metrics"]["step"] == STEPS
    storage = Path(faulty_run["checkpoints"])
    assert faulty_run["after_kill"]["dirs"] == checkpoint_dirs(storage)[:resumed]  # the failed run left no orphan
    registered = json.loads((storage / SNAPSHOT_FILE).read_text())["checkpoint_results"]
    assert checkpoint_dirs(storage) == sorted(r["checkpoint_dir_name"] for r in registered)  # nor did the rerun
    assert [r["metrics"]["step"] for r in registered] == list(range(1, STEPS + 1))


def test_mlflow_holds_each_step_once_and_counts_restarts_and_lost_samples(faulty_run):
    client = MlflowClient(faulty_run["mlflow_uri"])
    run_id = faulty_run["mlflow_run_id"]
    for key in ("loss/critic", "time/step", "rollout/worker_restarts"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, STEPS + 1)), key
    restarts = client.get_metric_history(run_id, "rollout/worker_restarts")
    assert restarts[-1].value == 2 and [m.value for m in restarts] == sorted(m.value for m in restarts)
    lost = client.get_metric_history(run_id, "rollout/lost_samples")[-1].value
    resume = _registered_resume_state(Path(faulty_run["checkpoints"]))
    counters = resume["buffer"]["counters"]
    assert lost == resume["feed"]["lost_in_flight"] + counters.get("dropped_lost", 0) + counters.get("lost_served", 0)
    assert lost >= 1
    assert resume["feed"]["worker_restarts"] == 2 and resume["step"] == STEPS
    assert client.get_run(run_id).info.status == "FINISHED"


def test_read_ahead_stays_within_the_buffer_bound_and_the_stale_share_is_reported(faulty_run):
    """buffer.max_items=4 bounds the rows drawn ahead (max_staleness 4 would allow 5 steps' rows)."""
    assert read_ahead_limit(faulty_run["cfg"]) == MAX_ITEMS
    client = MlflowClient(faulty_run["mlflow_uri"])
    run_id = faulty_run["mlflow_run_id"]
    peaks = [m.value for m in client.get_metric_history(run_id, "data/read_ahead_max")]
    assert len(peaks) == STEPS and 2 <= max(peaks) <= MAX_ITEMS  # it did read ahead, never past the bound
    drawn = [m.value for m in client.get_metric_history(run_id, "data/drawn_per_step")]
    assert len(drawn) == STEPS and all(0 <= d <= MAX_ITEMS + 1 for d in drawn)  # the bound, and a row made again
    counters = _registered_resume_state(Path(faulty_run["checkpoints"]))["buffer"]["counters"]
    assert counters["read_ahead_max"] <= MAX_ITEMS and counters["consumed"] >= 1
    shares = client.get_metric_history(run_id, "data/stale_share")
    assert [m.step for m in shares] == list(range(1, STEPS + 1)) and all(0 <= m.value <= 1 for m in shares)


def test_no_process_of_the_stage_outlives_it(faulty_run):
    assert faulty_run["left"] == []
