"""Shared test setup: one small local Ray cluster for each pytest worker (scripts/test.sh runs two), CPU-only settings."""

import functools
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Set before ray / mlflow / deepspeed are imported anywhere; Ray workers inherit them.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DS_ACCELERATOR"] = "cpu"
# Two loaded cores can take longer than Ray Train's 60 s default to start a worker group that imports torch.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))  # JIT ops built once


def _load_script(folder: str, name: str):
    """<folder>/<name>.py of the checkout as a module (experiments/ and benchmarks/ are scripts, not packages)."""
    path = Path(__file__).resolve().parents[1] / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_experiment():
    """load_experiment(name): experiments/<name>.py as a module."""
    return functools.partial(_load_script, "experiments")


@pytest.fixture(scope="session")
def load_benchmark():
    """load_benchmark(name): benchmarks/<name>.py as a module."""
    return functools.partial(_load_script, "benchmarks")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test that asks for it; yields ray.cluster_resources()."""
    import ray

    # Remote functions defined in test modules are imported by name on workers: let them find those
    # modules (pytest put their folders on sys.path during collection; workers inherit the env).
    tests = str(Path(__file__).parent)
    paths = [p for p in sys.path if p.startswith(tests)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(num_cpus=4, object_store_memory=512 * 1024**2, include_dashboard=False,
             log_to_driver=False, _temp_dir=temp_dir)
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def one_thread():
    """The test models are tiny: one thread each runs them fastest and keeps tests off each other's cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
