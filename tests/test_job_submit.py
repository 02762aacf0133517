"""`ray job submit` to a local `ray start --head --num-cpus=2` cluster (a laptop's) runs the tiny config to completion,
and what the user sees of it is a quiet terminal: one progress line a stage, the summary, no errors."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from sfpp_ray.distributed.server import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _stop_cluster(temp_dir: str) -> None:
    """Stop only this head's processes (`ray stop` would also stop other Ray clusters of the machine), killed at
    once as `ray stop --force` does: nothing of the finished job is kept, and a SIGTERM leaves the GCS and raylet
    up for the whole grace period."""
    procs = [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in a for a in (p.info["cmdline"] or []))]
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=15)


@pytest.fixture
def head_node():
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
    dashboard = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # Every port on a free one: other Ray clusters (the shared test cluster among them) hold the defaults.
    ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]
    subprocess.run([RAY, "start", "--head", f"--port={free_port()}", f"--dashboard-port={dashboard}", *ports,
                    "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _stop_cluster(temp_dir)


def test_the_tiny_config_fits_two_cpus_and_its_actors_ask_for_the_fractions_it_names():
    from sfpp_ray.config import load_config
    from sfpp_ray.distributed.controller import _scaling, cpus_needed

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    assert cpus_needed(cfg, cfg.run.stages) == 2  # 0.5 trainer + 2 x 0.25 rollout + 1 Ray Data
    assert _scaling(cfg).num_cpus_per_worker == cfg.trainer.cpus_per_worker == 0.5
    wider = load_config(ROOT / "configs" / "tiny.yaml", ["trainer.num_workers=3", "trainer.cpus_per_worker=1.5"])
    assert cpus_needed(wider, ["ode"]) == 4.5 and cpus_needed(wider, ["dmd"]) == 6


def test_ray_job_submit_runs_the_tiny_config_on_a_two_cpu_cluster(head_node, tmp_path):
    address, env = head_node
    out = tmp_path / "runs"
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update(DS_ACCELERATOR="cpu", RAY_AUTH_MODE="disabled")  # a CPU-only cluster, as documented
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    submit = (
        [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env", str(tmp_path / "runtime_env.yaml"),
         "--", sys.executable, "-m", "sfpp_ray", "train", "--config", "configs/tiny.yaml", f"run.output_dir={out}",
         "run.stages=[ode,dmd]", "ode.num_pairs=4", "ode.steps=2", "rollout.num_frames=12", "dmd.steps=2",
         "dmd.update_ratio=1"])
    for _ in range(60):  # the head's job agent comes up some seconds after `ray start` returns
        job = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        log = job.stdout + job.stderr
        if "No available agent" not in log:
            break
        time.sleep(2)
    assert job.returncode == 0, log[-3000:]
    assert "succeeded" in log, log[-3000:]
    run = out / "tiny"
    assert (run / "student" / "config.json").exists()
    # the terminal: each stage's progress on one line (no carriage-return redraws), no traceback and no error
    # record, Ray's, DeepSpeed's and the workers' output in the log file it names, and where everything went
    lines = job.stdout.split("\n")
    assert not [x for x in lines if "Traceback" in x or " E " in x or "\r" in x], log[-3000:]
    for stage in ("ode", "dmd"):
        assert [x for x in lines if x.startswith(f"[{stage}] step ")][-1].startswith(f"[{stage}] step 2/2 (100%)"), log
    assert lines.count(f"log: {run / 'logs' / 'train.log'} (Ray, DeepSpeed, MLflow and the workers' output; "
                       "--verbose shows it here)") == 1
    worker_output = (run / "logs" / "train.log").read_text()
    assert "(RayTrainWorker" in worker_output and "deepspeed_shm_comm_op" in worker_output
    leaked = [x for x in log.splitlines() if any(w in x for w in ("(RayTrainWorker", "deepspeed_shm_comm_op",
                                                                  "INFO mlflow", "Requesting resources"))]
    assert not leaked, leaked
    summary = lines[lines.index(f"run 'tiny' in {run}: ran ode, dmd"):]
    assert summary[1].split() == ["ode", str(run / "student_ode")]
    assert summary[2].split() == ["dmd", str(run / "student"), "(student)"]
    assert summary[3].split() == ["video", str(run / "videos" / "eval.mp4")] and (run / "videos" / "eval.mp4").is_file()
    assert summary[4].split()[:5] == ["MLflow", "run", (run / "mlflow_run_id.txt").read_text().strip(), "at",
                                      f"sqlite:///{run / 'mlflow.db'}"]
