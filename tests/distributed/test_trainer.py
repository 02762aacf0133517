"""The DeepSpeed engine settings the trainer roles share."""

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sfpp_ray import components
from sfpp_ray.config import load_config
from sfpp_ray.distributed.engine import deepspeed_config, optimizer_step, trainer_clips

CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def single_rank():
    """A one-rank gloo group in this process, as Ray Train sets one up on each worker; one for the module, as
    DeepSpeed keeps its groups once made."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as monkeypatch:
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


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_clips_under_zero0_as_deepspeed_would(single_rank, accumulation):
    """Under ZeRO-0 the trainer clips (deepspeed_config leaves DeepSpeed's clipping off): the weights after a few
    clipped updates are those DeepSpeed's own clipping gives, also over accumulated micro-batches, and clipping
    was at work (without it they differ)."""
    import deepspeed

    cfg = load_config(CONFIG, ["trainer.zero_stage=0", "trainer.grad_clip=0.01"])
    assert trainer_clips(cfg) and deepspeed_config(cfg, 1e-3)["gradient_clipping"] == 0
    seed = int(torch.randint(1 << 30, ()))
    batches = [(torch.randn(2, cfg.model.in_channels, 3, 8, 8), torch.rand(2) * 1000,
                torch.randn(2, 5, cfg.model.text_dim)) for _ in range(3 * accumulation)]
    weights = {}
    for clipping in ("trainer", "deepspeed", "none"):
        torch.manual_seed(seed)
        config = deepspeed_config(cfg, 1e-2) | {"gradient_accumulation_steps": accumulation}
        if clipping == "deepspeed":
            config["gradient_clipping"] = cfg.trainer.grad_clip
        engine, *_ = deepspeed.initialize(model=components.build_critic(cfg), config=config)
        for i, (x, t, text) in enumerate(batches):
            engine.backward(engine(x, t, text, return_dict=False)[0].square().mean())
            if clipping != "trainer":
                engine.step()
                continue
            boundary = (i + 1) % accumulation == 0
            grads = [p.grad.clone() for p in engine.module.parameters() if p.grad is not None] if boundary else []
            norm = optimizer_step(engine, cfg)
            if boundary:  # the norm of the accumulated gradients, before clipping
                torch.testing.assert_close(norm, torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
            else:
                assert norm is None
        assert engine.global_steps == 3
        weights[clipping] = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
    torch.testing.assert_close(weights["trainer"], weights["deepspeed"])
    assert not torch.allclose(weights["trainer"], weights["none"], atol=1e-4)


def test_teacher_stage_compiles_its_model_in_the_configured_mode(single_rank, monkeypatch):
    """teacher_pretrain.compile_mode reaches torch.compile (reduce-overhead: CUDA graphs on a GPU), and the
    stage's step still trains the compiled teacher."""
    from sfpp_ray.distributed.teacher_trainer import TeacherTraining

    modes, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: modes.append(kwargs.get("mode")) or compile(*args, **kwargs))
    for mode in ("default", "reduce-overhead"):
        cfg = load_config(CONFIG, ["teacher_pretrain.compile=inductor", f"teacher_pretrain.compile_mode={mode}",
                                   "trainer.zero_stage=0", "teacher_pretrain.batch_size=2"])
        training = TeacherTraining(cfg, torch.device("cpu"), torch.float32)
        assert modes[-1] == mode
    monkeypatch.setattr(torch, "compile", compile)
    cfg = load_config(CONFIG, ["teacher_pretrain.compile=aot_eager", "trainer.zero_stage=0",
                               "teacher_pretrain.batch_size=2", "teacher_pretrain.lr=1e-3"])
    training = TeacherTraining(cfg, torch.device("cpu"), torch.float32)
    before = [p.detach().clone() for p in training.engine.module.parameters()]
    clips = training.clips(first=1, steps=2)
    losses = [training.step(clips.batch(step)) for step in (1, 2)]
    assert all(torch.isfinite(loss) for loss in losses)
    assert any(not torch.equal(b, p) for b, p in zip(before, training.engine.module.parameters()))


def test_fused_optimizer_makes_the_same_updates(single_rank):
    """trainer.fused_optimizer swaps the per-tensor AdamW for torch's fused one: the engine's optimizer is the
    fused kind, and a few updates from the same start on the same batches leave the same weights."""
    import deepspeed

    seed = int(torch.randint(1 << 30, ()))
    cfg0 = load_config(CONFIG, ["trainer.zero_stage=0"])
    batches = [(torch.randn(2, cfg0.model.in_channels, 3, 8, 8), torch.rand(2) * 1000,
                torch.randn(2, 5, cfg0.model.text_dim)) for _ in range(3)]
    weights = {}
    for fused in (False, True):
        cfg = load_config(CONFIG, ["trainer.zero_stage=0", f"trainer.fused_optimizer={str(fused).lower()}"])
        torch.manual_seed(seed)
        engine, *_ = deepspeed.initialize(model=components.build_critic(cfg), config=deepspeed_config(cfg, 1e-2))
        assert bool(engine.optimizer.defaults.get("fused")) is fused
        start = [p.detach().clone() for p in engine.module.parameters()]
        for x, t, text in batches:
            engine.backward(engine(x, t, text, return_dict=False)[0].square().mean())
            optimizer_step(engine, cfg)
        weights[fused] = [p.detach().clone() for p in engine.module.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(start, weights[fused]))
    for a, b in zip(weights[False], weights[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
