"""The DeepSpeed engine settings the trainer roles share."""

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sfpp_ray import components
from sfpp_ray.config import load_config
from sfpp_ray.checks import NonFiniteError
from sfpp_ray.distributed.engine import (BadSteps, deepspeed_config, engine_update, full_params, optimizer_step,
                                         trainer_clips)

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
            norm, skipped = optimizer_step(engine, cfg)
            assert not skipped
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
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # fused and foreach AdamW round apart


def _state(engine, zero3: bool) -> list[torch.Tensor]:
    """The weights (gathered under ZeRO-3), the optimizer's own weights and state, and the learning rate."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    with full_params(engine.module, zero3):
        weights = [p.detach().clone() for p in engine.module.parameters()]
    inner_weights = [p.detach().clone() for g in inner.param_groups for p in g["params"]]
    state = [v.detach().clone() for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    return weights + inner_weights + state + [torch.tensor(engine.get_lr())]


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_a_non_finite_loss_or_gradient_skips_the_step_and_too_many_stop_the_stage(single_rank, zero_stage):
    """A step (here of two accumulated parts, as GRPO's) whose loss or gradient is NaN in any part leaves the
    weights, the optimizer's state and the learning-rate schedule as they were, under every ZeRO stage; it is
    counted (train/bad_steps), a good step resets the run of them, and trainer.max_bad_steps in a row stop the stage
    with an error naming it and the step. A finite loss with a NaN gradient is caught as well."""
    import deepspeed

    cfg = load_config(CONFIG, [f"trainer.zero_stage={zero_stage}", "trainer.max_bad_steps=2"])
    torch.manual_seed(int(torch.randint(1 << 30, ())))
    engine, *_ = deepspeed.initialize(
        model=components.build_critic(cfg), config=deepspeed_config(cfg, 1e-2) | {"gradient_accumulation_steps": 2},
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 / (i + 1)))
    update = engine_update(engine, cfg)
    bad = BadSteps("dmd", cfg, update)
    x, t, text = torch.randn(2, cfg.model.in_channels, 3, 8, 8), torch.rand(2) * 1000, torch.randn(2, 5, cfg.model.text_dim)

    def step(number: int, parts: list[str]) -> dict:
        for i, kind in enumerate(parts):
            out = engine(x, t, text, return_dict=False)[0]
            loss = {"finite": out.square().mean(), "nan_loss": out.square().mean() * float("nan"),
                    # finite (0), but d sqrt(u)/du = inf at u = 0 times du/d out = 0: a NaN gradient
                    "nan_grad": (out - out.detach()).square().sum().sqrt()}[kind]
            update(loss, weight=0.5, last=i == len(parts) - 1)
        return bad.after(number)

    zero3 = zero_stage == 3
    same = lambda a, b: len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))
    assert step(1, ["finite", "finite"]) == {"train/bad_steps": 0.0}
    before = _state(engine, zero3)
    assert step(2, ["nan_loss", "finite"]) == {"train/bad_steps": 1.0}
    assert same(_state(engine, zero3), before)
    assert step(3, ["finite", "finite"]) == {"train/bad_steps": 1.0}  # trains again, the run of bad steps ends
    after = _state(engine, zero3)
    assert not same(after, before) and after[-1] < before[-1]  # weights moved, the schedule advanced
    assert step(4, ["finite", "nan_grad"]) == {"train/bad_steps": 2.0}
    assert same(_state(engine, zero3), after)
    with pytest.raises(NonFiniteError, match=r"stage dmd, step 5: 2 steps in a row .* \(trainer.max_bad_steps=2\)"):
        step(5, ["nan_loss", "nan_loss"])
    assert same(_state(engine, zero3), after)


def test_the_teacher_stage_skips_a_clip_batch_of_nan_and_stops_after_max_bad_steps(single_rank):
    """The stage's own step (TeacherTraining, as the pretrain_teacher loop runs it): a batch whose clips hold a
    NaN leaves the teacher as it was and is counted; trainer.max_bad_steps of them in a row stop the stage."""
    from sfpp_ray.distributed.teacher_trainer import TeacherTraining

    cfg = load_config(CONFIG, ["trainer.zero_stage=0", "teacher_pretrain.batch_size=2", "trainer.max_bad_steps=2",
                               f"run.seed={int(torch.randint(1 << 30, ()))}"])
    training = TeacherTraining(cfg, torch.device("cpu"), torch.float32)
    clips = training.clips(first=1, steps=4)
    weights = lambda: [p.detach().clone() for p in training.engine.module.parameters()]
    training.step(clips.batch(1))
    assert training.bad_steps.after(1) == {"train/bad_steps": 0.0}
    start = weights()
    poisoned = clips.batch(2)
    poisoned["frames"] = poisoned["frames"].float().clone()
    poisoned["frames"].view(-1)[int(torch.randint(poisoned["frames"].numel(), ()))] = float("nan")
    assert training.step(poisoned).isnan()
    assert training.bad_steps.after(2) == {"train/bad_steps": 1.0}
    assert all(torch.equal(a, b) for a, b in zip(start, weights()))
    training.step(poisoned | {"step": 3})
    with pytest.raises(NonFiniteError, match="stage pretrain_teacher, step 3"):
        training.bad_steps.after(3)
    assert all(torch.equal(a, b) for a, b in zip(start, weights()))


def _two_rank_step(rank: int, port: int, out: str) -> None:
    """One rank of test_a_loss_bad_on_one_rank_skips_the_step_on_every_rank."""
    import json
    import os

    import deepspeed

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_SIZE": "2"})
    results = {}
    for zero_stage in (0, 2):
        cfg = load_config(CONFIG, [f"trainer.zero_stage={zero_stage}"])
        torch.manual_seed(0)
        engine, *_ = deepspeed.initialize(model=components.build_critic(cfg), config=deepspeed_config(cfg, 1e-2))
        update = engine_update(engine, cfg)
        g = torch.Generator().manual_seed(rank)
        x, t = torch.randn(2, cfg.model.in_channels, 3, 8, 8, generator=g), torch.rand(2, generator=g) * 1000
        text = torch.randn(2, 5, cfg.model.text_dim, generator=g)
        skipped = []
        for step in range(3):
            loss = engine(x, t, text, return_dict=False)[0].square().mean()
            if step == 1 and rank == 1:
                loss = loss + torch.tensor(float("nan"))  # a NaN loss whose gradient is finite
            update(loss)
            skipped.append(update.skipped)
            update.skipped = 0
            with full_params(engine.module, zero_stage == 3):
                results[f"{zero_stage}/{step}"] = [sum(float(p.double().sum()) for p in engine.module.parameters())]
        results[f"{zero_stage}/skipped"] = skipped
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(results, f)


def test_a_loss_bad_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """Two ranks, a NaN loss on one of them whose gradient is finite (nothing in the gradients shows it): both
    ranks skip that step, under ZeRO-0 and ZeRO-2, so their weights stay the same as each other's, unchanged by
    that step, and both train on the next."""
    import json
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The ranks are forked from a fresh process once it has imported torch and DeepSpeed, so that neither imports
    # them again; not from this one, whose process group and threads a fork would copy half-alive
    code = (f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nimport torch.multiprocessing as mp\n"
            f"from test_trainer import _two_rank_step\nmp.start_processes(_two_rank_step, args=({port}, "
            f"{str(tmp_path)!r}), nprocs=2, join=True, start_method='fork')\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    for zero_stage in (0, 2):
        assert ranks[0][f"{zero_stage}/skipped"] == [0, 1, 0]
        assert ranks[0][f"{zero_stage}/1"] == ranks[0][f"{zero_stage}/0"] != ranks[0][f"{zero_stage}/2"]
