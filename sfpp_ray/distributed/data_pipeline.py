"""Ray Data pipeline from the rollout buffer to the trainers: fetch, pick a window, backward-noise it.

    range(num_rows) -> FetchRollouts -> sample_windows -> add_backward_noise -> trainer shards

One row is one window of one training step of one trainer worker (trainer.batch_size rows a step). The rows are
only a count (their ids continue a resumed run's count, `first_row`): FetchRollouts
replaces each with a rollout taken from the buffer, so the dataset streams as fast as the
rollout workers fill the buffer (it waits when the buffer is empty). The window sampling and
re-noising are per-row numpy/torch work that Ray Data runs beside the trainers, keeping the
trainer's step to the forward and backward passes. Rows fetched ahead can outlive
buffer.max_staleness while they wait; the trainer swaps such a row for `fresh_row`. The pipeline draws
ahead of the trainer at most `read_ahead_limit` rows the trainer has not acknowledged (`buffer.consumed`).
Every row's randomness (its window, its backward noise, and the "seed" column the trainer's step draws from)
is a stream of (run.seed, row id) (sfpp_ray.seeding). Only numeric columns, so `iter_torch_batches` can stack
every column.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from sfpp_ray.algorithm.schedule import FlowMatchSchedule
from sfpp_ray.algorithm.self_forcing_pp import backward_noise, sample_denoising_steps, sample_window_start
from sfpp_ray.config import Config, rebuilt
from sfpp_ray.seeding import generator, seed_for

SAMPLE_KEYS = ("latents", "text", "uncond", "prompt_index")


class FetchRollouts:
    """Takes one buffer sample per row (oldest first) and fetches its arrays from the object store. A sample
    whose object died with its rollout worker is skipped (the buffer counts it) and another taken.
    ahead: the rows are drawn ahead of the trainer (the pipeline), bounded by `read_ahead_limit`."""

    def __init__(self, buffer, first_row: int = 0, ahead: bool = True):
        self.buffer, self.first_row, self.ahead = buffer, first_row, ahead

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        items, samples = [], []
        while len(samples) < n:
            taken = ray.get(self.buffer.get.remote(n - len(samples), ahead=self.ahead))
            if not taken:
                raise RuntimeError(f"rollout buffer closed with {len(samples)} of {n} samples delivered")
            lost = []
            for item in taken:
                try:
                    samples.append(ray.get(item.ref))
                    items.append(item)
                except ray.exceptions.ObjectLostError:
                    lost.append(item.ref)
            if lost:
                ray.get(self.buffer.lost.remote(lost))  # a list: Ray passes the references, not their objects
                if self.ahead:  # a lost row was never delivered: it does not count against the read-ahead
                    ray.get(self.buffer.consumed.remote(len(lost)))
        out = {key: np.stack([s[key] for s in samples]) for key in SAMPLE_KEYS}
        out["id"] = batch["id"] + self.first_row
        out["policy_version"] = np.array([item.policy_version for item in items], dtype=np.int64)
        return out


def sample_windows(batch: dict[str, np.ndarray], cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """A block-aligned window of `data.window_frames` per rollout; adds `window_start` and `window`."""
    c = rebuilt(cfg)
    K, fpb = c.data.window_frames, c.student.frames_per_block
    starts, windows = [], []
    for row_id, latents in zip(batch["id"], batch["latents"]):
        s = sample_window_start(latents.shape[1], K, fpb, c.data.window_sampler, c.data.beta_a, c.data.beta_b,
                                generator(seed, "window", int(row_id)))
        starts.append(s)
        windows.append(latents[:, s:s + K])
    seeds = [seed_for(seed, "dmd_step", int(row_id)) for row_id in batch["id"]]
    return {**batch, "window_start": np.array(starts, dtype=np.int64), "window": np.stack(windows),
            "seed": np.array(seeds, dtype=np.int64)}


def add_backward_noise(batch: dict[str, np.ndarray], cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Per row: denoising start/exit steps and the window noised to timesteps[start] (backward noise).

    Without backward noise (ablation) the window restarts from pure noise at step 0.
    """
    c = rebuilt(cfg)
    schedule = FlowMatchSchedule.from_config(c.schedule)
    timesteps = schedule.student_timesteps(c.schedule)
    noisy, starts, exits = [], [], []
    for row_id, window in zip(batch["id"], batch["window"]):
        g = generator(seed, "backward_noise", int(row_id))
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


def fresh_row(buffer, cfg: Config, seed: int) -> dict[str, np.ndarray]:
    """One row made now, as the dataset makes its rows, its randomness the stream `seed`: what the trainer trains
    on instead of a row that went stale while Ray Data held it ahead (the buffer serves nothing past
    buffer.max_staleness)."""
    kwargs = {"cfg": cfg.to_dict(), "seed": seed}
    batch = FetchRollouts(buffer, ahead=False)({"id": np.array([0], dtype=np.int64)})
    return add_backward_noise(sample_windows(batch, **kwargs), **kwargs)


def read_ahead_limit(cfg: Config) -> int:
    """Rows the pipeline may hold drawn but untrained: as many as the trainers take while a sample of the newest
    weights grows to buffer.max_staleness (rows further ahead would be stale when trained, however fresh when
    drawn), and at least two steps' rows, so no rank waits for rows another holds; never more than
    buffer.max_items."""
    steps = max(2, (cfg.buffer.max_staleness + 1) * cfg.trainer.sync_every)
    return min(cfg.buffer.max_items, steps * cfg.trainer.num_workers * cfg.trainer.batch_size)


def build_dataset(cfg: Config, buffer, num_rows: int, first_row: int = 0) -> ray.data.Dataset:
    """The trainers' stream: `num_rows` rows (steps x trainer workers x trainer.batch_size), each a noised rollout
    window; row ids start at `first_row` (a resumed run's rows already trained on), randomness from run.seed.
    The consumer acknowledges the rows it trained on with `buffer.consumed`: no more than the buffer's read-ahead
    (`read_ahead_limit`) rows are drawn ahead of it."""
    if num_rows <= 0:
        raise ValueError(f"the dataset needs at least one row, got {num_rows}")
    # Many small blocks: one block is the unit an operator handles, and rows must stream one by one.
    ds = ray.data.range(num_rows, override_num_blocks=num_rows)
    ds = ds.map_batches(FetchRollouts, fn_constructor_args=(buffer, first_row), batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)
    kwargs = {"cfg": cfg.to_dict(), "seed": cfg.run.seed}
    ds = _map(ds, sample_windows, cfg, kwargs)
    return _map(ds, add_backward_noise, cfg, kwargs)
