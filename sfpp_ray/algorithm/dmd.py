"""Distribution matching distillation: the student's generator loss, the critic's loss, and EMA.

The generator gradient is the difference of two score estimates on the student's own noised
samples: the frozen teacher's (real) and the critic's (fake, fit to the student's samples).
Both are x0 predictions; their difference, normalised per sample, is applied to x0 through an
MSE against a detached target so that the optimiser sees an ordinary loss.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sfpp_ray.algorithm.rollout import Generators, randn
from sfpp_ray.algorithm.schedule import FlowMatchSchedule
from sfpp_ray.config import DMDConfig

# update(loss, weight=1.0, last=True): back-propagate loss * weight and, on the last part, step the optimizer;
# returns the gradients' norm where the optimizer knows it. A step function trains through it, so the same step
# runs under a DeepSpeed engine (distributed.engine.engine_update) or a plain torch optimizer (tests).
Update = Callable[..., torch.Tensor | float | None]


def _flow(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return model(x_t, t, text, return_dict=False)[0]


def _batch(text: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A single prompt embedding (e.g. the negative prompt) serves the whole batch."""
    if text.shape[0] == batch_size:
        return text
    if text.shape[0] == 1:
        return text.expand(batch_size, *text.shape[1:])
    raise ValueError(f"text embeddings of batch {text.shape[0]} do not match latents of batch {batch_size}")


def _noised(x0: torch.Tensor, schedule: FlowMatchSchedule, cfg: DMDConfig, generator: Generators):
    """x0 at a training noise level per sample; a list of generators draws each sample's level and noise from its own."""
    draw = lambda n, g: schedule.sample_training_timesteps(n, cfg.min_timestep, cfg.max_timestep, cfg.timestep_shift,
                                                           generator=g, device=x0.device,
                                                           distribution=cfg.timestep_distribution)
    t = torch.cat([draw(1, g) for g in generator]) if isinstance(generator, (list, tuple)) else draw(x0.shape[0], generator)
    noise = randn(x0.shape, generator, x0.device, x0.dtype)
    return schedule.add_noise(x0, noise, t), noise, t


def dmd_generator_loss(x0: torch.Tensor, teacher: nn.Module, critic: nn.Module, cond: torch.Tensor,
                       uncond: torch.Tensor | None, schedule: FlowMatchSchedule, cfg: DMDConfig,
                       generator: Generators = None) -> tuple[torch.Tensor, dict]:
    """DMD loss on student samples x0 (B, C, F, H, W); its gradient w.r.t. x0 is (fake - real) / norm / numel."""
    B = x0.shape[0]
    with torch.no_grad():
        x_t, _, t = _noised(x0.detach(), schedule, cfg, generator)
        real = schedule.x0_from_flow(x_t, _flow(teacher, x_t, t, _batch(cond, B)), t).double()
        if cfg.guidance != 0:
            if uncond is None:
                raise ValueError("dmd.guidance != 0 needs the unconditional (negative prompt) embedding")
            real_uncond = schedule.x0_from_flow(x_t, _flow(teacher, x_t, t, _batch(uncond, B)), t).double()
            real = real + cfg.guidance * (real - real_uncond)
        fake = schedule.x0_from_flow(x_t, _flow(critic, x_t, t, _batch(cond, B)), t).double()
        # Per-sample normaliser: keeps the step size independent of how far the sample is from the teacher. A sample
        # on the teacher's own prediction (norm 0) gets no gradient; a NaN or inf stays one, for the update to skip
        norm = (x0.detach().double() - real).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
        grad = torch.where(norm == 0, 0.0, (fake - real) / norm)
    x = x0.double()
    loss = 0.5 * F.mse_loss(x, (x - grad).detach())
    return loss, {"dmd_grad_norm": grad.norm().item(), "timestep": t.float().mean().item()}


def critic_loss(x0: torch.Tensor, critic: nn.Module, cond: torch.Tensor, schedule: FlowMatchSchedule, cfg: DMDConfig,
                generator: Generators = None, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Flow matching of the critic on gradient-free student samples: the critic tracks the student's distribution
    (and, on real clips, the teacher's pretraining). weight: per-element loss weights broadcastable to x0; the
    loss is their weighted mean, so its scale stays that of the plain MSE.
    The metrics stay on the device (reading them waits for the GPU): the caller decides when."""
    x0 = x0.detach()
    x_t, noise, t = _noised(x0, schedule, cfg, generator)
    flow = _flow(critic, x_t, t, _batch(cond, x0.shape[0]))
    squared = (flow.float() - schedule.flow_target(x0, noise).float()).square()
    if weight is None:
        loss = squared.mean()
    else:
        weight = weight.float().expand_as(squared)
        loss = (weight * squared).sum() / weight.sum()
    return loss, {"critic_loss": loss.detach(), "timestep": t.float().mean()}


def critic_step(critic: nn.Module, x0: torch.Tensor, cond: torch.Tensor, schedule: FlowMatchSchedule, cfg: DMDConfig,
                generator: Generators, update: Update, weight: torch.Tensor | None = None) -> dict:
    """One flow-matching update of a bidirectional model on clean latents: the DMD critic on the student's windows,
    or the teacher's pretraining on world clips. The loss stays on the device."""
    loss, info = critic_loss(x0, critic, cond, schedule, cfg, generator, weight)
    return {"loss": info["critic_loss"], "grad_norm": update(loss)}


def is_generator_step(step: int, update_ratio: int) -> bool:
    """The critic trains every step; the student every `update_ratio`-th, so the critic keeps up with it."""
    if update_ratio < 1:
        raise ValueError(f"update_ratio must be >= 1, got {update_ratio}")
    return step % update_ratio == 0


def owners(model: nn.Module, ranks: int) -> dict[str, int]:
    """Each parameter's owning rank, dealt out largest first to the least loaded rank, so that every rank
    owns about 1/ranks of the values; the same on every rank for the same model."""
    load, owner = [0] * ranks, {}
    for name, p in sorted(model.named_parameters(), key=lambda named: (-named[1].numel(), named[0])):
        owner[name] = min(range(ranks), key=lambda r: (load[r], r))
        load[owner[name]] += p.numel()
    return owner


class EMA:
    """Exponential moving average of a model's parameters, kept in float32 (bf16 would swallow 1% updates).

    Split over ranks so that none keeps a float32 copy of the whole model:
    - `partitioned`: the parameters are sharded by DeepSpeed ZeRO-3, and each rank averages only its own
      partition of each (`param.ds_tensor`): no gather a step. `copy_to` writes the partitions: gather from
      them afterwards to see the average (`trainer.full_params(..., from_partitions=True)`).
    - `ranks` > 1 below ZeRO-3, where every rank holds every whole parameter: each rank averages the whole
      parameters it owns (`owners`), and `copy_to` broadcasts each from its owner, a collective every rank
      enters.
    Either way its state is this rank's alone, and a run resumes it on as many ranks as it was saved from."""

    def __init__(self, model: nn.Module, decay: float, start_step: int = 0, partitioned: bool = False,
                 ranks: int = 1, rank: int = 0):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        if not 0 <= rank < ranks:
            raise ValueError(f"EMA rank must lie in [0, {ranks}), got {rank}")
        self.decay, self.start_step, self.partitioned = decay, start_step, partitioned
        self.ranks, self.rank = (1, 0) if partitioned else (ranks, rank)  # ZeRO-3 has split every parameter already
        self.owners = owners(model, self.ranks)
        self.shadow = {name: t.detach().float().clone() for name, t in self._tensors(model)}

    @property
    def split(self) -> bool:
        """Whether each rank holds only part of the average (and saves its own part)."""
        return self.partitioned or self.ranks > 1

    def _tensors(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """What this rank averages: the parameters it owns, or under `partitioned` its partition of each."""
        return [(name, p.ds_tensor if self.partitioned else p) for name, p in model.named_parameters()
                if self.owners[name] == self.rank]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Before start_step the average is a copy: early weights are far from where training settles.
        One fused op over all tensors rather than a kernel launch per tensor."""
        named = self._tensors(model)
        shadow, params = [self.shadow[name] for name, _ in named], [t.detach().float() for _, t in named]
        if step < self.start_step:
            torch._foreach_copy_(shadow, params)
        else:
            torch._foreach_lerp_(shadow, params, 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """The average into the model: with `ranks` > 1 every rank must call it (each parameter comes from its owner)."""
        for name, t in self._tensors(model):
            t.copy_(self.shadow[name])
        if self.ranks > 1:
            for name, p in model.named_parameters():
                torch.distributed.broadcast(p.data, src=self.owners[name])

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """The average in the model's parameters while the block runs (to save it), the live weights back after."""
        tensors = [p.ds_tensor if self.partitioned else p for p in model.parameters()]
        live = [t.detach().clone() for t in tensors]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(tensors, live)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "start_step": self.start_step, "partitioned": self.partitioned,
                "ranks": self.ranks, "shadow": copy.copy(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        """A state saved on as many ranks (this rank's part), or a whole average, of which this rank takes its part."""
        if state.get("partitioned", False) != self.partitioned:
            kept = lambda partitioned: "per ZeRO-3 partition" if partitioned else "whole"
            raise ValueError(f"the saved moving average was kept {kept(not self.partitioned)}, this one "
                             f"{kept(self.partitioned)}: resume under the trainer.zero_stage it was saved with")
        shadow, saved_ranks = state["shadow"], state.get("ranks", 1)
        whole = saved_ranks == 1 and self.ranks > 1  # a whole average: checked whole, this rank's part kept
        if saved_ranks != self.ranks and not whole:
            raise ValueError(f"the saved moving average was split over {saved_ranks} ranks, this one over "
                             f"{self.ranks}: resume on as many ranks as it was saved from")
        missing = (set(self.owners) if whole else set(self.shadow)) ^ set(shadow)
        if missing:
            raise KeyError(f"EMA state does not match the model's parameters: {sorted(missing)[:5]}")
        if whole:
            shadow = {name: v for name, v in shadow.items() if name in self.shadow}
        shapes = {name for name, v in shadow.items() if v.shape != self.shadow[name].shape}
        if shapes:
            raise ValueError(f"saved moving average has other shapes ({sorted(shapes)[:3]}): resume on as many "
                             "ranks as it was saved from")
        self.decay, self.start_step = state["decay"], state["start_step"]
        self.shadow = {name: v.to(self.shadow[name].device, torch.float32).clone() for name, v in shadow.items()}
