"""The DeepSpeed engine settings the trainer roles share."""

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sfpp_ray import components
from sfpp_ray.config import load_config
from sfpp_ray.distributed.trainer import deepspeed_config

CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"


@pytest.fixture
def single_rank(monkeypatch):
    """A one-rank gloo group in this process, as Ray Train sets one up on each worker."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_autocast_engine_computes_in_bf16_and_keeps_float32_weights(single_rank):
    """On a GPU DeepSpeed switches off a torch.autocast opened around its engine, so autocast comes
    through the engine's config: the teacher's layers then compute in bf16, its weights stay float32."""
    import deepspeed

    cfg = load_config(CONFIG)
    x, t, text = torch.randn(2, cfg.model.in_channels, 3, 8, 8), torch.rand(2) * 1000, torch.randn(2, 5, cfg.model.text_dim)
    for autocast, computed_in in ((False, torch.float32), (True, torch.bfloat16)):
        engine, *_ = deepspeed.initialize(model=components.build_critic(cfg),
                                          config=deepspeed_config(cfg, 1e-3, autocast=autocast))
        seen = []
        engine.module.proj_out.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        engine.backward(engine(x, t, text, return_dict=False)[0].float().square().mean())
        engine.step()
        assert seen == [computed_in]
        assert all(p.dtype == p.grad.dtype == torch.float32 for p in engine.module.parameters() if p.grad is not None)
        assert all(p.dtype == torch.float32 for p in engine.module.parameters())
