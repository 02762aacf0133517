"""The DMD stage's memory estimate per trainer rank, printed before the stage starts."""

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
