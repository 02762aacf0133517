"""ODE initialisation: regress the causal student onto the teacher's deterministic sampling paths.

The teacher's many-step Euler ODE (with CFG) maps noise to a clean sample; the states it passes
at the student's few noise levels are inputs whose answer is that sample. Teaching the student
this map, block-causally, gives DMD a student that already produces video.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sfpp_ray.algorithm.dmd import Update
from sfpp_ray.algorithm.schedule import FlowFn, FlowMatchSchedule, euler_ode_sample, nearest_indices
from sfpp_ray.config import ODEConfig
from sfpp_ray.models.causal_wan import CausalWanTransformer3DModel, CrossAttentionCache


@dataclass
class Guide:
    """A weaker teacher the sampler steers away from (autoguidance, ode.autoguidance): an earlier checkpoint of
    the same teacher, or a smaller one trained on the same data. cond: the prompts embedded by the guide's own
    text encoder (one trained with the teacher changes with it)."""

    model: nn.Module
    cond: torch.Tensor


def teacher_flow(model: nn.Module, text: torch.Tensor, batch: int) -> FlowFn:
    """flow(x, t) of a bidirectional model under `text` (one prompt embedding is shared by the batch)."""
    text = text.expand(batch, *text.shape[1:]) if text.shape[0] == 1 else text
    return lambda x, t: model(x, t, text, return_dict=False)[0]


@torch.no_grad()
def _teacher_sample(teacher: nn.Module, cond: torch.Tensor, uncond: torch.Tensor | None, noise: torch.Tensor,
                    cfg: ODEConfig, schedule: FlowMatchSchedule, guide: Guide | None, keep: list[int] | None = None,
                    eta: float = 0.0, generator: torch.Generator | None = None):
    if cfg.autoguidance != 1.0 and guide is None:
        raise ValueError("ode.autoguidance needs a guide model (ode.guide)")
    flow = lambda model, text: teacher_flow(model, text, noise.shape[0])
    return euler_ode_sample(flow(teacher, cond), flow(teacher, uncond) if uncond is not None else None, noise,
                            schedule.euler_sigmas(cfg.euler_steps, cfg.shift), cfg.guidance,
                            schedule.num_train_timesteps, keep_at=keep, guidance_interval=tuple(cfg.guidance_interval),
                            flow_guide=None if guide is None else flow(guide.model, guide.cond),
                            autoguidance=cfg.autoguidance, eta=eta, generator=generator)


def make_ode_trajectories(teacher: nn.Module, cond: torch.Tensor, uncond: torch.Tensor | None, noise: torch.Tensor,
                          student_timesteps: torch.Tensor, cfg: ODEConfig, schedule: FlowMatchSchedule,
                          guide: Guide | None = None) -> torch.Tensor:
    """(B, K+1, C, F, H, W): the teacher's ODE states nearest each of the K student timesteps, then its clean end.
    Always the deterministic ODE (ode.eta is for samples only): a pair's input must determine its answer."""
    keep = nearest_indices(schedule.euler_sigmas(cfg.euler_steps, cfg.shift), student_timesteps,
                           schedule.num_train_timesteps)
    clean, kept = _teacher_sample(teacher, cond, uncond, noise, cfg, schedule, guide, keep)
    return torch.stack(kept + [clean], dim=1)


def teacher_samples(teacher: nn.Module, cond: torch.Tensor, uncond: torch.Tensor | None, noise: torch.Tensor,
                    cfg: ODEConfig, schedule: FlowMatchSchedule, guide: Guide | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, F, H, W): the teacher's clean samples from `noise` under the sampler `cfg`, ode.eta included
    (its fresh noise drawn with `generator`)."""
    return _teacher_sample(teacher, cond, uncond, noise, cfg, schedule, guide, eta=cfg.eta, generator=generator)[0]


class OdePairStore:
    """A directory of safetensors shards of trajectories (B, K+1, C, F, H, W) plus index.json with the prompts.

    Made once, then read by every ODE-init run. One writer at a time; `meta` (e.g. the student's
    timesteps and latent shape) is recorded with the first shard, and a store made with other
    settings refuses to open instead of silently training on the wrong pairs.
    """

    def __init__(self, root: str | os.PathLike, meta: dict | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "index.json"
        self.index = json.loads(path.read_text()) if path.exists() else {"meta": meta, "shards": []}
        if meta is not None and self.index["meta"] not in (None, meta):
            raise ValueError(f"ODE store {self.root} was made with {self.index['meta']}, not {meta}")
        self.index["meta"] = self.index["meta"] or meta
        self._offsets: list[int] = []
        self._reindex()

    def _reindex(self) -> None:
        self._offsets, total = [], 0
        for shard in self.index["shards"]:
            self._offsets.append(total)
            total += len(shard["prompts"])
        self._len = total

    def __len__(self) -> int:
        return self._len

    def complete(self, num_pairs: int) -> bool:
        return len(self) >= num_pairs

    def write_shard(self, trajectories: torch.Tensor, prompts: list[str]) -> None:
        if trajectories.ndim != 6 or trajectories.shape[0] != len(prompts):
            raise ValueError(f"need trajectories (B, K+1, C, F, H, W) and B prompts, got {tuple(trajectories.shape)} "
                             f"and {len(prompts)} prompts")
        name = f"shard-{len(self.index['shards']):06d}.safetensors"
        tmp = self.root / f".{name}.tmp"
        save_file({"trajectories": trajectories.detach().cpu().contiguous()}, str(tmp))
        os.replace(tmp, self.root / name)
        self.index["shards"].append({"file": name, "prompts": list(prompts)})
        tmp = self.root / ".index.json.tmp"
        tmp.write_text(json.dumps(self.index))
        os.replace(tmp, self.root / "index.json")  # the shard becomes visible only once complete
        self._reindex()

    def load(self, i: int) -> tuple[torch.Tensor, str]:
        """(trajectory (K+1, C, F, H, W), prompt) of pair i."""
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} out of range for a store of {len(self)}")
        s = bisect.bisect_right(self._offsets, i) - 1
        shard, row = self.index["shards"][s], i - self._offsets[s]
        with safe_open(str(self.root / shard["file"]), framework="pt") as f:
            return f.get_slice("trajectories")[row], shard["prompts"][row]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        return (self.load(i) for i in range(len(self)))


def fill_ode_store(store: OdePairStore, num_pairs: int, make_shard: Callable[[int], tuple[torch.Tensor, list[str]]],
                   shard_size: int) -> int:
    """Append shards of make_shard(n) until the store holds num_pairs; returns how many pairs were made (0 if complete)."""
    made = 0
    while not store.complete(num_pairs):
        trajectories, prompts = make_shard(min(shard_size, num_pairs - len(store)))
        store.write_shard(trajectories, prompts)
        made += len(prompts)
    return made


def ode_regression_inputs(trajectory: torch.Tensor, student_timesteps: torch.Tensor, frames_per_block: int,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-causal student input: each block of each sample at its own random student step.

    Returns x (B, C, F, H, W) taken from the trajectory and per-frame timesteps (B, F).
    """
    B, K1, C, nf, H, W = trajectory.shape
    K = len(student_timesteps)
    if K1 != K + 1:
        raise ValueError(f"trajectory holds {K1} states, {K} student timesteps need {K + 1}")
    if nf % frames_per_block:
        raise ValueError(f"{nf} frames is not a whole number of {frames_per_block}-frame blocks")
    device = generator.device if generator is not None else "cpu"
    step = torch.randint(0, K, (B, nf // frames_per_block), generator=generator, device=device).to(trajectory.device)
    step = step.repeat_interleave(frames_per_block, dim=1)  # (B, F)
    idx = step.view(B, 1, 1, nf, 1, 1).expand(B, 1, C, nf, H, W)
    x = trajectory.gather(1, idx).squeeze(1)
    return x, student_timesteps.to(trajectory.device)[step]


def ode_regression_loss(student: CausalWanTransformer3DModel, trajectory: torch.Tensor, student_timesteps: torch.Tensor,
                        cross_cache_or_text: CrossAttentionCache | torch.Tensor, schedule: FlowMatchSchedule,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE of the student's x0 prediction (one block-causal whole-sequence forward) to the trajectory's clean end."""
    x, t = ode_regression_inputs(trajectory, student_timesteps, student.layout.frames_per_block, generator)
    if isinstance(cross_cache_or_text, CrossAttentionCache):
        flow = student(x, t, cross_cache=cross_cache_or_text, kv_cache=None, causal=True)
    else:
        flow = student(x, t, cross_cache_or_text, kv_cache=None, causal=True)
    x0 = schedule.x0_from_flow(x, flow, t)
    return F.mse_loss(x0.float(), trajectory[:, -1].float())


def ode_step(student: CausalWanTransformer3DModel, trajectories: torch.Tensor, student_timesteps: torch.Tensor,
             cond: torch.Tensor, schedule: FlowMatchSchedule, generator: torch.Generator | None,
             update: Update) -> dict:
    """One ODE-initialisation update: regression of the student onto a batch of the teacher's trajectories."""
    loss = ode_regression_loss(student, trajectories, student_timesteps, cond, schedule, generator)
    return {"loss": loss.detach(), "grad_norm": update(loss)}
