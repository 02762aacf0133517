"""Rollout worker: streams long student rollouts into the buffer, as the student would at inference.

Each worker owns a full copy of the student and runs the same gradient-free rolling-cache
rollout that `generate` runs, to `rollout.num_frames` latent frames, far past the teacher's
horizon. Between rollouts it pulls the newest weights from the broker, so every sample is
tagged with the policy version that made it and a sync never lands in the middle of a rollout.

Workers are restartable actors (rollout.max_restarts): Ray replaces a dead one's process and runs `run`
again on it. The new process tells the feed, which hands the prompts the old one had in flight out again
and counts them lost, and the buffer, which drops the old process's samples (their objects died with it).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import ray
import torch

from sfpp_ray import components
from sfpp_ray.algorithm.self_forcing_pp import extended_rollout, randint
from sfpp_ray.config import Config, rebuilt
from sfpp_ray.distributed.buffer import offer
from sfpp_ray.distributed.weight_sync import ObjectStoreWeightSync, state_checksum
from sfpp_ray.seeding import generator


def switched_rollout(cfg: Config, student, text, prompts: list[str], noise: torch.Tensor, schedule, timesteps,
                     generator: torch.Generator, switch_generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One batch of extended rollouts; with probability rollout.switch_prob each video switches, at a block drawn
    uniformly after the first, to the next video's prompt (so the student learns to follow a switch). Returns
    (latents, the prompt embeddings in force at the end, the switch block or -1). Switches draw from their own
    generator: with them off, or before the switch, the rollout is the one without them."""
    cond = text.encode(prompts)
    cross, switches, block = student.cross_attention_cache(cond), {}, -1
    p = cfg.rollout.switch_prob
    if p > 0 and float(torch.rand((), generator=switch_generator, device=switch_generator.device)) < p:
        block = randint(1, noise.shape[2] // cfg.student.frames_per_block - 1, switch_generator)
        cond = cond.roll(-1, dims=0)
        switches = {block: student.cross_attention_cache(cond)}
    latents = extended_rollout(student, cross, noise, schedule, timesteps, cfg.schedule.context_noise, generator,
                               switches=switches, switch_cache=cfg.rollout.switch_cache)
    return latents, cond, block


class RolloutWorker:
    """Actor body; start it with `RolloutWorker.options(...)` via `create_rollout_worker`."""

    def __init__(self, cfg: dict, index: int, checkpoint: str | None = None):
        self.cfg = rebuilt(cfg)
        self.index = index
        self.device, self.dtype = components.resolve_device(self.cfg), components.resolve_dtype(self.cfg)
        self.student = components.build_student(self.cfg, self.device, self.dtype, checkpoint=checkpoint).eval()
        self.text = components.build_text_encoder(self.cfg, self.device, self.dtype)
        self.codec = components.build_video_codec(self.cfg, self.device, self.dtype)
        self.schedule = components.build_schedule(self.cfg)
        self.timesteps = self.schedule.student_timesteps(self.cfg.schedule)
        self.uncond = self.text.encode([self.cfg.text.negative_prompt])[0].float().cpu().numpy()
        # Distinct per worker, so two workers given the same prompt still explore different noise.
        self.generator = generator(self.cfg.run.seed, "rollout", index, device=self.device)
        self.switch_generator = generator(self.cfg.run.seed, "rollout_switch", index, device=self.device)
        self.sync = ObjectStoreWeightSync()
        self.version = 0
        self.applied: list[tuple[int, str]] = []  # (version, checksum after apply)
        self._lock = threading.Lock()  # a weight apply and a rollout never overlap
        self._stop = threading.Event()
        self.samples = 0
        self.frames = 0
        self.rollout_seconds = 0.0
        self.epoch = 0  # the broker's epoch of the weights applied
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed

    def run(self, buffer, feed, broker, max_samples: int | None = None, min_version: int = 0) -> dict:
        """Roll out rollout.batch_size prompts at once until `stop()` (or `max_samples`); returns `stats()`.

        min_version: wait for weights of at least this version before the first rollout (a
        resumed run must not fill the buffer from the freshly built, untrained student).
        A full buffer blocks `offer`; closing the buffer releases it, which is how shutdown
        reaches a worker that is waiting for room.
        """
        if self.restarted:
            self.restarted = False
            lost = ray.get(feed.restarted.remote(self.index)) + ray.get(buffer.purge_worker.remote(self.index))
            print(f"rollout worker {self.index}: restarted, {lost} samples lost")
        if self.version < min_version:
            handle = ray.get(broker.latest.remote(min_version - 1, wait=True, epoch=self.epoch))
            if handle is None:  # the broker closed: training ended before it published
                return self.stats()
            self._apply(handle)
        n_frames, batch = self.cfg.rollout.num_frames, self.cfg.rollout.batch_size
        while not self._stop.is_set() and (max_samples is None or self.samples < max_samples):
            self.pull_weights(broker)
            indexed = ray.get([feed.next.remote(self.index) for _ in range(batch)])
            with self._lock, torch.no_grad():
                shape = components.latent_shape(self.cfg, self.codec, n_frames, batch)
                noise = torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)
                t0 = time.perf_counter()
                latents, cond, switch = switched_rollout(self.cfg, self.student, self.text,
                                                         [prompt for _, prompt in indexed], noise, self.schedule,
                                                         self.timesteps, self.generator, self.switch_generator)
                self.rollout_seconds += time.perf_counter() - t0
                version = self.version
            latents, cond = latents.float().cpu().numpy(), cond.float().cpu().numpy()
            for i, (index, _) in enumerate(indexed):
                sample = {"latents": latents[i], "text": cond[i], "uncond": self.uncond,
                          "prompt_index": np.array(index, dtype=np.int64)}
                self.samples += 1
                self.frames += n_frames
                offer(buffer, sample, version, meta={"worker": self.index, "prompt_index": index, "switch_block": switch})
            ray.get(feed.done.remote(self.index, [index for index, _ in indexed]))
        return self.stats()

    def pull_weights(self, broker) -> int:
        """Apply the broker's newest weights if they are newer than ours; returns our version."""
        handle = ray.get(broker.latest.remote(self.version, epoch=self.epoch))
        if handle is not None:
            self._apply(handle)
        return self.version

    def _apply(self, handle) -> None:
        with self._lock:
            self.version, self.epoch = self.sync.apply(self.student, handle), handle.epoch
            self.applied.append((self.version, state_checksum(self.student)))

    def stop(self) -> None:
        """Finish the current rollout, then leave `run`."""
        self._stop.set()

    def stats(self) -> dict:
        return {"worker": self.index, "samples": self.samples, "latent_frames": self.frames,
                "fps": self.frames / self.rollout_seconds if self.rollout_seconds else 0.0,
                "policy_version": self.version, "applied": list(self.applied)}

    def checksum(self) -> str:
        with self._lock:
            return state_checksum(self.student)

    def policy_version(self) -> int:
        return self.version

    def pid(self) -> int:
        return os.getpid()


def create_rollout_worker(cfg, index: int, name: str | None = None, checkpoint: str | None = None):
    """Start one worker with the resources the config asks for; two threads so that `stop` and
    `stats` answer while `run` loops. Up to rollout.max_restarts times a dead process is replaced and the
    call it was in (`run`) made again on the new one."""
    restarts = cfg.rollout.max_restarts
    actor = ray.remote(RolloutWorker).options(
        num_gpus=cfg.rollout.gpus_per_worker, num_cpus=cfg.rollout.cpus_per_worker, max_concurrency=2, name=name,
        max_restarts=restarts, max_task_retries=-1 if restarts else 0)
    return actor.remote(cfg.to_dict(), index, checkpoint)
