import os
import shlex
import subprocess
from pathlib import Path

import yaml

from sfpp_ray.config import Config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CONFIG_KEYS = set(Config().flat())


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def check_entrypoint(command: str) -> None:
    """`python -m sfpp_ray train --config <existing file> key=value...` with known config keys."""
    argv = shlex.split(command)
    assert argv[:5] == ["python", "-m", "sfpp_ray", "train", "--config"], argv
    assert (ROOT / argv[5]).is_file(), f"{argv[5]} is not in the repository"
    for key, _ in parse_overrides(argv[6:]):
        assert key in CONFIG_KEYS, f"unknown config key {key}"


def test_runtime_env():
    env = load("runtime_env.yaml")
    assert env["working_dir"] == "."
    assert {"outputs/", ".venv/", ".git/", "*.mp4", "mlruns/"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray takes strings only
    assert env["env_vars"]["MLFLOW_DISABLE_TELEMETRY"] == "true" and "DS_ACCELERATOR" not in env["env_vars"]


def test_cluster_launcher():
    c = load("ray-cluster.yaml")
    types = c["available_node_types"]
    assert c["head_node_type"] in types and {"rollout_gpu", "train_gpu"} <= set(types)
    for name in ("rollout_gpu", "train_gpu"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"] <= c["max_workers"]
    assert c["provider"]["type"] in {"aws", "gcp", "azure"}
    assert any("pip install" in cmd and "sfpp-ray" in cmd for cmd in c["setup_commands"])


def test_kuberay_cluster_and_job():
    cluster = load("kuberay/raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"rollout-gpu", "train-gpu"}
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups.values()]
    for pod in pods:
        volumes = {v["name"] for v in pod["volumes"]}
        mounts = [m for c in pod["containers"] for m in c["volumeMounts"]]
        assert {m["name"] for m in mounts} <= volumes
        assert any(m["mountPath"] == "/data" for m in mounts)
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1

    job = load("kuberay/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    check_entrypoint(job["spec"]["entrypoint"])
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())


def test_submit_script(tmp_path):
    """Run it with a stand-in `ray` that prints its arguments: the job command must be well formed."""
    script = CLUSTER / "submit.sh"
    assert os.access(script, os.X_OK)
    fake = tmp_path / "ray"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "RAY_ADDRESS": "http://head:8265"}
    out = subprocess.run([str(script), "configs/wan2.1_t2v_1.3b.yaml", "run.name=x y"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[:8] == ["job", "submit", "--address", "http://head:8265", "--working-dir", ".",
                       "--runtime-env", "cluster/runtime_env.yaml"]
    assert out[8] == "--"
    check_entrypoint(shlex.join(out[9:]))
    assert out[-1] == "run.name=x y"
    assert subprocess.run([str(script)], env=env, capture_output=True).returncode == 2
