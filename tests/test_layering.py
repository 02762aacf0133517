"""The package reads downward: each layer imports only the layers below it, and the processes that train never
load a plotting library."""

import ast
import subprocess
import sys
from pathlib import Path

import sfpp_ray

PACKAGE = Path(sfpp_ray.__file__).parent
# layer -> the package's modules it may not import
FORBIDDEN = {
    "checks.py": ("sfpp_ray.",),
    "config.py": ("sfpp_ray.",),
    "seeding.py": ("sfpp_ray.",),
    "world": ("sfpp_ray.algorithm", "sfpp_ray.distributed", "sfpp_ray.evaluation", "sfpp_ray.generate"),
    "models": ("sfpp_ray.algorithm", "sfpp_ray.distributed", "sfpp_ray.evaluation", "sfpp_ray.components",
               "sfpp_ray.generate"),
    "algorithm": ("sfpp_ray.distributed", "sfpp_ray.evaluation", "sfpp_ray.components", "sfpp_ray.generate",
                  "sfpp_ray.tracking"),
    "evaluation": ("sfpp_ray.distributed",),
    "reruns.py": ("sfpp_ray.distributed", "sfpp_ray.components", "sfpp_ray.models", "sfpp_ray.algorithm"),
}
ALLOWED = {"config.py": {"sfpp_ray.checks"}}  # below config: what it reads of the files it names, without torch


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "sfpp_ray":  # from sfpp_ray import components
            names |= {f"sfpp_ray.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_each_layer_imports_only_the_layers_below_it():
    broken = []
    for layer, forbidden in FORBIDDEN.items():
        files = [PACKAGE / layer] if layer.endswith(".py") else sorted((PACKAGE / layer).rglob("*.py"))
        assert files and all(f.is_file() for f in files), layer
        for f in files:
            broken += [f"{f.relative_to(PACKAGE)} imports {m}" for m in imported(f)
                       if m.startswith(forbidden) and m not in ALLOWED.get(layer, ())]
    assert not broken, broken


def test_the_check_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("import torch\nfrom sfpp_ray.algorithm.schedule import FlowMatchSchedule\n"
                   "from sfpp_ray import components\n")
    assert imported(bad) == {"torch", "sfpp_ray.algorithm.schedule", "sfpp_ray.components"}


def test_training_ranks_do_not_load_matplotlib():
    code = ("import sys\nimport sfpp_ray.distributed.controller, sfpp_ray.distributed.teacher_trainer, "
            "sfpp_ray.distributed.ode_trainer, sfpp_ray.distributed.dmd_trainer, sfpp_ray.distributed.grpo_trainer, "
            "sfpp_ray.evaluation.evaluate\nprint('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_the_data_pipelines_processes_load_no_model_library():
    """Ray Data's coordinators and workers import the pipeline's module to run its transforms, each in a process of
    its own at every stage's start, one after another: re-noising a window needs the schedule alone."""
    code = ("import sys\nimport sfpp_ray.distributed.data_pipeline\n"
            "print(sorted(m for m in ('diffusers', 'transformers', 'deepspeed', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
