"""Ray Data pipeline from the rollout buffer to the trainers: fetch, pick a window, backward-noise it.

    range(num_rows) -> FetchRollouts -> sample_windows -> add_backward_noise -> trainer shards

One row is one training step of one trainer worker. The rows are only a count: FetchRollouts
replaces each with a rollout taken from the buffer, so the dataset streams as fast as the
rollout workers fill the buffer (it waits when the buffer is empty). The window sampling and
re-noising are per-row numpy/torch work that Ray Data runs beside the trainers, keeping the
trainer's step to the forward and backward passes. Rows fetched ahead can outlive
buffer.max_staleness while they wait; the trainer swaps such a row for `fresh_row`.
Only numeric columns, so `iter_torch_batches` can stack every column.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from sfpp_ray import components
from sfpp_ray.algorithm.self_forcing_pp import backward_noise, sample_denoising_steps, sample_window_start
from sfpp_ray.config import Config, from_dict

SAMPLE_KEYS = ("latents", "text", "uncond", "prompt_index")


class FetchRollouts:
    """Takes one buffer sample per row (oldest first) and fetches its arrays from the object store."""

    def __init__(self, buffer):
        self.buffer = buffer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        items = ray.get(self.buffer.get.remote(n))
        if len(items) < n:
            raise RuntimeError(f"rollout buffer closed with {len(items)} of {n} samples delivered")
        samples = ray.get([item.ref for item in items])
        out = {key: np.stack([s[key] for s in samples]) for key in SAMPLE_KEYS}
        out["id"] = batch["id"]
        out["policy_version"] = np.array([item.policy_version for item in items], dtype=np.int64)
        return out


def _row_generator(seed: int, row_id: int) -> torch.Generator:
    """Per-row randomness fixed by (seed, row), so a transform's result does not depend on batching. The
    pair is hashed: a CPU generator keeps only 32 bits of its seed, and row ids run past 2**32."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, int(row_id)]).generate_state(1)[0]))


def sample_windows(batch: dict[str, np.ndarray], cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """A block-aligned window of `data.window_frames` per rollout; adds `window_start` and `window`."""
    c = from_dict(cfg)
    K, fpb = c.data.window_frames, c.student.frames_per_block
    starts, windows = [], []
    for row_id, latents in zip(batch["id"], batch["latents"]):
        s = sample_window_start(latents.shape[1], K, fpb, c.data.window_sampler, c.data.beta_a, c.data.beta_b,
                                _row_generator(seed, row_id))
        starts.append(s)
        windows.append(latents[:, s:s + K])
    return {**batch, "window_start": np.array(starts, dtype=np.int64), "window": np.stack(windows)}


def add_backward_noise(batch: dict[str, np.ndarray], cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Per row: denoising start/exit steps and the window noised to timesteps[start] (backward noise).

    Without backward noise (ablation) the window restarts from pure noise at step 0.
    """
    c = from_dict(cfg)
    schedule = components.build_schedule(c)
    timesteps = schedule.student_timesteps(c.schedule)
    noisy, starts, exits = [], [], []
    for row_id, window in zip(batch["id"], batch["window"]):
        g = _row_generator(seed + 1, row_id)
        x0 = torch.from_numpy(np.array(window))[None]
        if c.data.backward_noise:
            start, exit_ = sample_denoising_steps(len(timesteps), generator=g)
            x = backward_noise(x0, timesteps[start], schedule, generator=g)
        else:
            start, exit_ = sample_denoising_steps(len(timesteps), start_step=0, generator=g)
            x = torch.randn(x0.shape, generator=g)
        noisy.append(x[0].numpy())
        starts.append(start)
        exits.append(exit_)
    return {**batch, "noisy": np.stack(noisy).astype(np.float32), "start_step": np.array(starts, dtype=np.int64),
            "exit_step": np.array(exits, dtype=np.int64)}


class _Transform:
    """A row transform as a callable class, for when the config asks for an actor pool."""

    def __init__(self, fn, **kwargs):
        self.fn, self.kwargs = fn, kwargs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.fn(batch, **self.kwargs)


def _map(ds: ray.data.Dataset, fn, cfg: Config, kwargs: dict) -> ray.data.Dataset:
    """Run `fn(batch, **kwargs)` on tasks or on an actor pool, as `cfg.data.compute` asks."""
    if cfg.data.compute == "actors":
        return ds.map_batches(_Transform, fn_constructor_args=(fn,), fn_constructor_kwargs=kwargs,
                              compute=ray.data.ActorPoolStrategy(size=cfg.data.num_actors), batch_size=1)
    return ds.map_batches(fn, fn_kwargs=kwargs, compute=ray.data.TaskPoolStrategy(), batch_size=1)


def fresh_row(buffer, cfg: Config, seed: int, row_id: int) -> dict[str, np.ndarray]:
    """One row made now, as the dataset makes its rows: what the trainer trains on instead of a row that
    went stale while Ray Data held it ahead (the buffer serves nothing past buffer.max_staleness)."""
    kwargs = {"cfg": cfg.to_dict(), "seed": seed}
    batch = FetchRollouts(buffer)({"id": np.array([row_id], dtype=np.int64)})
    return add_backward_noise(sample_windows(batch, **kwargs), **kwargs)


def build_dataset(cfg: Config, buffer, num_rows: int, seed: int) -> ray.data.Dataset:
    """The trainers' stream: `num_rows` rows (steps x trainer workers), each a noised rollout window."""
    if num_rows <= 0:
        raise ValueError(f"the dataset needs at least one row, got {num_rows}")
    # Many small blocks: one block is the unit an operator handles, and rows must stream one by one.
    ds = ray.data.range(num_rows, override_num_blocks=num_rows)
    ds = ds.map_batches(FetchRollouts, fn_constructor_args=(buffer,), batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)
    kwargs = {"cfg": cfg.to_dict(), "seed": seed}
    ds = _map(ds, sample_windows, cfg, kwargs)
    return _map(ds, add_backward_noise, cfg, kwargs)
