"""Tiny Wan models shared by the algorithm tests."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import WanTransformer3DModel

from sfpp_ray.algorithm.schedule import FlowMatchSchedule
from sfpp_ray.config import ScheduleConfig
from sfpp_ray.models.causal_wan import CausalLayout, CausalWanTransformer3DModel

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, out_channels=12,
           text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2)


def make_teacher(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**WAN)


def make_student(teacher: WanTransformer3DModel, frames_per_block: int = 3, window_frames: int = 6) -> CausalWanTransformer3DModel:
    student = CausalWanTransformer3DModel(**WAN).set_layout(CausalLayout(frames_per_block=frames_per_block, window_frames=window_frames))
    student.load_state_dict(teacher.state_dict())
    return student


@pytest.fixture
def tiny() -> SimpleNamespace:
    """Factories for tests that need more than one teacher/student pair."""
    return SimpleNamespace(teacher=make_teacher, student=make_student)


@pytest.fixture
def teacher() -> WanTransformer3DModel:
    return make_teacher().requires_grad_(False)


@pytest.fixture
def student(teacher) -> CausalWanTransformer3DModel:
    return make_student(teacher).requires_grad_(True)


@pytest.fixture
def schedule() -> FlowMatchSchedule:
    return FlowMatchSchedule(1000, 5.0)


@pytest.fixture
def timesteps(schedule) -> torch.Tensor:
    """Three warped student steps: two stochastic transitions per block."""
    return schedule.student_timesteps(ScheduleConfig(denoising_steps=[1000, 750, 500]))
