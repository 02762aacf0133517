"""Flow-matching schedule shared by the teacher, the critic and the few-step student.

Convention (Wan / rectified flow): a timestep t in [0, T] is the noise level sigma = t / T;
x_t = (1 - sigma) x0 + sigma eps, and the network predicts the flow eps - x0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sfpp_ray.config import ScheduleConfig


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Timestep shift: spends more of a step budget at high noise (sigma' = s sigma / (1 + (s-1) sigma))."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _bcast(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or (B, F) noise levels -> broadcastable against latents (B, C, F, H, W)."""
    sigma = sigma.to(like.device, torch.float32)
    if sigma.ndim == 1:
        return sigma.view(-1, 1, 1, 1, 1)
    return sigma.view(sigma.shape[0], 1, sigma.shape[1], 1, 1)


@dataclass
class FlowMatchSchedule:
    num_train_timesteps: int = 1000
    shift: float = 5.0

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> FlowMatchSchedule:
        return cls(cfg.num_train_timesteps, cfg.shift)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() / self.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = _bcast(self.sigma(t), x0)
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)

    def x0_from_flow(self, x_t: torch.Tensor, flow: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = _bcast(self.sigma(t), x_t)
        return (x_t.float() - s * flow.float()).to(x_t.dtype)

    @staticmethod
    def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def warp(self, steps: list[int]) -> list[float]:
        """The few-step list through the shifted schedule ([1000, 750, 500, 250] -> [1000, 937.5, 833.3, 625])."""
        T = self.num_train_timesteps
        return [float(T * shift_sigma(t / T, self.shift)) for t in steps]

    def student_timesteps(self, cfg: ScheduleConfig) -> torch.Tensor:
        steps = self.warp(cfg.denoising_steps) if cfg.warp_denoising_steps else [float(t) for t in cfg.denoising_steps]
        return torch.tensor(steps, dtype=torch.float32)

    def sample_training_timesteps(self, n: int, min_t: int, max_t: int, shift: float,
                                  generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                                  distribution: str = "uniform") -> torch.Tensor:
        """One t per sample: drawn from `distribution`, shifted, clamped to [min_t, max_t] (DMD and critic).
        "uniform" spends as much training at every noise level; "logit_normal" (sigma = sigmoid of a standard
        normal, as in SD3) concentrates it around sigma 0.5. A shift above 1 draws more noisy timesteps, below 1
        more clean ones (1: none)."""
        if shift <= 0:
            raise ValueError(f"timestep shift must be > 0, got {shift}")
        T, where = self.num_train_timesteps, generator.device if generator is not None else "cpu"
        if distribution == "uniform":
            u = torch.randint(0, T, (n,), generator=generator, device=where).float() / T
        elif distribution == "logit_normal":
            u = torch.sigmoid(torch.randn(n, generator=generator, device=where))
        else:
            raise ValueError(f"timestep distribution must be 'uniform' or 'logit_normal', got {distribution!r}")
        t = shift_sigma(u, shift) * T
        return t.clamp(min_t, max_t).to(device)

    def euler_sigmas(self, num_steps: int, shift: float) -> torch.Tensor:
        """num_steps + 1 decreasing noise levels from 1 to 0 for the teacher's ODE sampler."""
        return shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).float()


FlowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def euler_ode_sample(flow_cond: FlowFn, flow_uncond: FlowFn | None, noise: torch.Tensor, sigmas: torch.Tensor,
                     guidance: float, T: int = 1000, keep_at: list[int] | None = None,
                     guidance_interval: tuple[float, float] = (0.0, 1.0), flow_guide: FlowFn | None = None,
                     autoguidance: float = 1.0, eta: float = 0.0,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Many-step Euler ODE with classifier-free guidance (the teacher's sampler).

    flow_*(x, t) return the predicted flow for timesteps t of shape (B,). Guidance applies only at
    noise levels sigma within `guidance_interval` (low, high); the default (0, 1) guides every step.
    With `flow_guide` (a weaker model of the same data, e.g. an earlier checkpoint) and autoguidance
    w > 1, every step also moves w - 1 times the difference between the model and the guide further
    along (Karras et al., 2024): where the weaker model blurs, the difference points away from the blur.
    Returns the clean end point and, for each index in `keep_at`, the state at sigmas[index]
    (ODE-init trajectories).

    eta > 0 makes it stochastic, DDIM's eta for x = (1 - sigma) x0 + sigma noise: from the clean and noise
    predictions x0 and e, x' = (1 - sigma') x0 + sqrt(sigma'^2 - s^2) e + s z with fresh noise z (drawn
    with `generator`) of scale s = eta * (the ancestral sampler's step noise, the forward process's
    posterior deviation). eta = 1 is ancestral sampling, whose small-step limit is the reverse SDE; fresh
    noise lets later steps undo errors of an imperfect model. eta = 0 is the Euler step itself.
    """
    lo, hi = guidance_interval
    x = noise.float()
    kept: dict[int, torch.Tensor] = {}
    keep = set(keep_at or [])
    guided_away = flow_guide is not None and autoguidance != 1.0
    for i in range(len(sigmas) - 1):
        if i in keep:
            kept[i] = x.clone()
        sigma = float(sigmas[i])
        t = torch.full((x.shape[0],), sigma * T, device=x.device)
        cond = flow = flow_cond(x.to(noise.dtype), t).float()
        if flow_uncond is not None and guidance != 1.0 and lo <= sigma <= hi:
            un = flow_uncond(x.to(noise.dtype), t).float()
            flow = un + guidance * (cond - un)
        if guided_away:
            flow = flow + (autoguidance - 1.0) * (cond - flow_guide(x.to(noise.dtype), t).float())
        nxt = float(sigmas[i + 1])
        if eta == 0 or nxt == 0:
            x = x + (nxt - sigma) * flow
        else:
            fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            x0, e = x - sigma * flow, x + (1 - sigma) * flow
            ratio = (1 - sigma) * nxt / ((1 - nxt) * sigma)  # the signal-to-noise ratios' root ratio, < 1
            s = eta * nxt * math.sqrt(1 - ratio**2)
            x = (1 - nxt) * x0 + math.sqrt(nxt**2 - s**2) * e + s * fresh
    return x.to(noise.dtype), [kept[i].to(noise.dtype) for i in (keep_at or [])]


def nearest_indices(sigmas: torch.Tensor, timesteps: torch.Tensor, T: int = 1000) -> list[int]:
    """For each student timestep, the index of the closest ODE noise level (where a pair is recorded)."""
    return [int(torch.argmin((sigmas[:-1] * T - t).abs())) for t in timesteps]
