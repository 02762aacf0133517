"""The DMD stage's memory estimate per trainer rank, printed before the stage starts, and the teacher kept in CPU
memory."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sfpp_ray.config import load_config
from sfpp_ray.distributed.engine import dmd_memory_per_rank, parameter_count

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def teacher14b(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "diffusion_pytorch_model.safetensors")
    paths = [f"{key}={tmp_path}" for key in ("model.pretrained", "teacher_model.pretrained", "text.path", "codec.path")]
    return lambda *keys: load_config(ROOT / "configs" / "wan2.1_t2v_1.3b_teacher14b.yaml", [*paths, *keys])


def test_parameters_are_the_wan_models(teacher14b):
    cfg = teacher14b()
    assert 14.0e9 < parameter_count(cfg.teacher_model) < 14.5e9  # Wan2.1-T2V-14B
    assert 1.3e9 < parameter_count(cfg.model) < 1.5e9  # Wan2.1-T2V-1.3B


def test_zero_partitions_what_each_stage_splits(teacher14b):
    ranks = int(torch.randint(2, 9, ()))
    one = dmd_memory_per_rank(teacher14b("trainer.num_workers=1"))
    gib = 2**30
    assert one["teacher"] == pytest.approx(one["teacher_parameters"] * 2 / gib)  # bf16, whole on the one rank
    assert one["student"] == pytest.approx(one["student_parameters"] * 16 / gib)  # bf16 + grads + fp32 master + Adam
    zero3 = dmd_memory_per_rank(teacher14b(f"trainer.num_workers={ranks}"))
    assert zero3["teacher"] == pytest.approx(one["teacher"] / ranks)
    assert zero3["student"] == pytest.approx(one["student"] / ranks) and zero3["average"] == pytest.approx(one["average"] / ranks)
    zero2 = dmd_memory_per_rank(teacher14b(f"trainer.num_workers={ranks}", "trainer.zero_stage=2"))
    assert zero2["teacher"] == pytest.approx(one["teacher"])  # sharded only under ZeRO-3
    assert zero2["student"] == pytest.approx(one["student_parameters"] * (2 + 14 / ranks) / gib)
    assert zero2["total"] == pytest.approx(sum(zero2[k] for k in ("teacher", "student", "critic", "average")))


def test_an_offloaded_teacher_leaves_the_device(teacher14b):
    sharded = dmd_memory_per_rank(teacher14b("trainer.num_workers=1"))
    offloaded = dmd_memory_per_rank(teacher14b("trainer.num_workers=1", "trainer.teacher_offload=true"))
    assert offloaded["teacher"] == 0 and offloaded["teacher_in_cpu_memory"] == pytest.approx(sharded["teacher"])
    assert offloaded["total"] == pytest.approx(sharded["total"] - sharded["teacher"])


OFFLOADED_TEACHER = """
import os, sys, torch, deepspeed
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
deepspeed.init_distributed(dist_backend="gloo")
from sfpp_ray import components
from sfpp_ray.algorithm.dmd import _flow
from sfpp_ray.config import load_config
from sfpp_ray.distributed.engine import frozen_teacher
seed = int(sys.argv[2])
cfg = load_config("configs/tiny.yaml", [f"model.init_seed={seed}", "trainer.teacher_offload=true"])
g = torch.Generator().manual_seed(seed)
x, t, text = torch.randn(2, 12, 3, 8, 8, generator=g), torch.rand(2, generator=g) * 1000, torch.randn(2, 7, 32, generator=g)
offloaded = frozen_teacher(cfg, "cpu", torch.float32)
assert sum(p.numel() for p in offloaded.parameters()) == 0  # partitioned: gathered layer by layer as it runs
with torch.no_grad():
    print((_flow(offloaded, x, t, text) - _flow(components.build_teacher(cfg), x, t, text)).abs().max().item())
"""


def test_an_offloaded_teacher_scores_as_the_teacher():
    """frozen_teacher with trainer.teacher_offload (ZeRO-3 parameter offload, one rank) predicts the flow the plain
    teacher predicts; in a process of its own, which initialises torch.distributed."""
    seed, port = int(torch.randint(0, 2**31, ())), int(torch.randint(20000, 40000, ()))
    done = subprocess.run([sys.executable, "-c", OFFLOADED_TEACHER, str(port), str(seed)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) <= 1e-6
