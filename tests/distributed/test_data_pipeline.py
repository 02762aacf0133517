"""The Ray Data pipeline and the rows the trainer makes in place of stale ones."""

from pathlib import Path

import numpy as np
import ray

from sfpp_ray.config import load_config
from sfpp_ray.distributed.buffer import create_buffer, offer
from sfpp_ray.distributed.data_pipeline import build_dataset, fresh_row
from sfpp_ray.seeding import seed_for

CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"


def rollout_sample(rng: np.random.Generator, frames: int) -> dict:
    """A sample as a rollout worker offers it: (C, F, H, W) latents, the prompt's and the negative's embeddings."""
    return {"latents": rng.standard_normal((12, frames, 8, 8), dtype=np.float32),
            "text": rng.standard_normal((16, 32), dtype=np.float32),
            "uncond": rng.standard_normal((16, 32), dtype=np.float32),
            "prompt_index": np.array(rng.integers(100), dtype=np.int64)}


def test_fresh_row_is_the_row_ray_data_makes_and_respects_staleness(ray_cluster):
    rng = np.random.default_rng()
    seed, sample = int(rng.integers(1000)), rollout_sample(rng, frames=24)
    cfg = load_config(CONFIG, ["buffer.max_staleness=1", "buffer.max_reuse=1", "data.window_sampler=uniform",
                               f"run.seed={seed}"])
    buffer = create_buffer(cfg.buffer)
    offer(buffer, sample, policy_version=0)
    (row,) = list(build_dataset(cfg, buffer, 1).iter_rows())

    # The same sample at a newer version beside ones the buffer now counts as stale (version 4, staleness 1).
    offer(buffer, rollout_sample(rng, frames=24), policy_version=1)
    ray.get(buffer.set_policy_version.remote(4))
    offer(buffer, sample, policy_version=3)
    made = fresh_row(buffer, cfg, seed)  # row 0 of the stream `seed`: the dataset's first row
    assert made["policy_version"].tolist() == [3]
    for key in ("window_start", "start_step", "exit_step", "window", "noisy", "text", "uncond", "prompt_index", "seed"):
        np.testing.assert_array_equal(made[key][0], row[key], err_msg=key)
    assert made["window"].shape == (1, 12, cfg.data.window_frames, 8, 8)

    # Another stream draws its own window and noise from the same rollout.
    offer(buffer, sample, policy_version=4)
    other = fresh_row(buffer, cfg, seed_for(seed, "replacement", 0, 1, 0))
    assert not np.array_equal(other["noisy"], made["noisy"])


def test_rows_are_made_after_the_config_s_weights_file_vanished(ray_cluster, tmp_path):
    """The files a config names are checked once, where it is loaded: the pipeline's transforms rebuild it for
    every block, and a moment's absence of a weights file on shared storage must not fail a run (a DMD run failed
    so when its teacher's directory was rewritten beneath it)."""
    from safetensors.torch import save_file
    import torch

    rng = np.random.default_rng()
    weights = tmp_path / "teacher"
    weights.mkdir()
    save_file({"x": torch.zeros(2)}, weights / "diffusion_pytorch_model.safetensors")
    seed = int(rng.integers(1000))
    cfg = load_config(CONFIG, [f"model.pretrained={weights}", "buffer.max_reuse=2", f"run.seed={seed}"])
    (weights / "diffusion_pytorch_model.safetensors").unlink()
    buffer = create_buffer(cfg.buffer)
    offer(buffer, rollout_sample(rng, frames=24), policy_version=0)
    (row,) = list(build_dataset(cfg, buffer, 1).iter_rows())
    made = fresh_row(buffer, cfg, seed)
    for key in ("window_start", "start_step", "exit_step", "window", "noisy"):  # the same rollout, the same stream
        np.testing.assert_array_equal(made[key][0], row[key], err_msg=key)
