"""Streaming text-to-video: the rollout loop, decoded block by block into a video file."""

from __future__ import annotations

import math
import sys
import threading
import time
from pathlib import Path
from queue import Queue

import torch

from sfpp_ray import components
from sfpp_ray.algorithm.rollout import rollout
from sfpp_ray.config import Config
from sfpp_ray.video_io import VideoWriter, to_uint8


def latent_frames_for(cfg: Config, codec, seconds: float) -> int:
    """Latent frames covering `seconds` of video, rounded up to whole blocks."""
    if seconds <= 0:
        raise ValueError(f"--seconds must be positive, got {seconds}")
    n = codec.latent_frames(max(1, round(seconds * cfg.video.fps)))
    fpb = cfg.student.frames_per_block
    return math.ceil(n / fpb) * fpb


class BlockDecoder:
    """Decodes finished blocks on a second thread so decoding overlaps the next block's generation."""

    def __init__(self, codec, writer, overlap: bool, device: torch.device | str = "cpu"):
        self.codec, self.writer, self.overlap = codec, writer, overlap
        cuda = torch.device(device).type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if overlap and cuda else None  # decode beside generation
        self.queue: Queue = Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True) if overlap else None
        if self.thread:
            self.thread.start()

    def _decode(self, latents: torch.Tensor) -> None:
        with torch.no_grad():
            self.writer.append(to_uint8(self.codec.decode_block(latents)))

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                if self.stream is not None:
                    latents, ready = item
                    with torch.cuda.stream(self.stream):
                        self.stream.wait_event(ready)
                        self._decode(latents)
                else:
                    self._decode(item)
            except BaseException as e:  # surfaced in close(): a failed decode must not pass silently
                self.error = e

    def __call__(self, block: int, latents: torch.Tensor) -> None:
        if self.thread and self.stream is not None:
            ready = torch.cuda.Event()
            ready.record()
            self.queue.put((latents, ready))
        elif self.thread:
            self.queue.put(latents)
        else:
            self._decode(latents)

    def close(self) -> None:
        if self.thread:
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            raise RuntimeError("decoding a block failed") from self.error


def generate(cfg: Config, prompt: str, seconds: float, out: str | Path, checkpoint: str | None = None,
             seed: int | None = None, progress: bool = True) -> dict:
    """Generate `seconds` of video for `prompt` with the streaming student and write it to `out`."""
    if not prompt.strip():
        raise ValueError("--prompt is empty")
    device, dtype = components.resolve_device(cfg), components.resolve_dtype(cfg)
    student = components.build_student(cfg, device, dtype, checkpoint=checkpoint).eval()
    text = components.build_text_encoder(cfg, device, dtype)
    codec = components.build_video_codec(cfg, device, dtype)
    schedule = components.build_schedule(cfg)
    nf = latent_frames_for(cfg, codec, seconds)
    g = torch.Generator(device=device).manual_seed(cfg.run.seed if seed is None else seed)
    noise = torch.randn(components.latent_shape(cfg, codec, nf), generator=g, device=device, dtype=dtype)
    blocks = nf // cfg.student.frames_per_block
    t0 = time.perf_counter()
    codec.reset_stream()
    with torch.no_grad(), VideoWriter(out, cfg.video.fps) as writer:
        decoder = BlockDecoder(codec, writer, overlap=cfg.rollout.decode_overlap, device=device)

        def on_block(b: int, x0: torch.Tensor) -> None:
            decoder(b, x0)
            if progress:
                done = b + 1
                rate = done * cfg.student.frames_per_block / (time.perf_counter() - t0)
                print(f"\rblock {done}/{blocks}  {rate:.1f} latent frames/s", end="" if done < blocks else "\n",
                      file=sys.stderr, flush=True)

        cross = student.cross_attention_cache(text.encode([prompt]))
        rollout(student, cross, noise, schedule.student_timesteps(cfg.schedule), schedule,
                context_noise=cfg.schedule.context_noise, generator=g, on_block=on_block)
        decoder.close()
    elapsed = time.perf_counter() - t0
    return {"path": str(out), "latent_frames": nf, "video_frames": writer.frames, "seconds": elapsed,
            "fps": writer.frames / elapsed}
