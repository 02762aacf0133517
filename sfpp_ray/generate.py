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
from sfpp_ray.algorithm.rollout import randn, rollout
from sfpp_ray.checks import NonFiniteError
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
        """writer: where frames (F, H, W, 3) go, or one writer per video of a batch."""
        self.codec, self.overlap = codec, overlap
        self.writers = list(writer) if isinstance(writer, (list, tuple)) else [writer]
        cuda = torch.device(device).type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if overlap and cuda else None  # decode beside generation
        self.queue: Queue = Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True) if overlap else None
        if self.thread:
            self.thread.start()

    def _decode(self, latents: torch.Tensor) -> None:
        with torch.no_grad():
            video = self.codec.decode_block(latents)
        for writer, one in zip(self.writers, video, strict=True):
            writer.append(to_uint8(one))

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

    def close(self, abandon: bool = False) -> None:
        """Wait for the queued blocks; `abandon`: the stream failed, and its error is the one to raise."""
        if self.thread:
            self.queue.put(None)
            self.thread.join()
        if self.error is not None and not abandon:
            raise RuntimeError("decoding a block failed") from self.error


class VideoGenerator:
    """The student, text encoder, codec and schedule built once; streams any number of videos.

    A student checkpoint that saved its layout streams with it, whatever the config says (`self.cfg` holds it)."""

    def __init__(self, cfg: Config, checkpoint: str | None = None):
        self.cfg = cfg = components.with_student_layout(cfg, checkpoint or cfg.student.checkpoint)
        self.device, self.dtype = components.resolve_device(cfg), components.resolve_dtype(cfg)
        self.student = components.build_student(cfg, self.device, self.dtype, checkpoint=checkpoint).eval()
        self.text = components.build_text_encoder(cfg, self.device, self.dtype)
        self.codec = components.build_video_codec(cfg, self.device, self.dtype)
        self.schedule = components.build_schedule(cfg)

    def stream(self, prompt: str, num_latent_frames: int, sink, seed: int, progress: bool = False) -> dict:
        """Roll out `num_latent_frames` and hand decoded uint8 frames (F, H, W, 3) to `sink.append` block by block."""
        return self.stream_batch([prompt], num_latent_frames, [sink], [seed], progress)

    def stream_batch(self, prompts: list[str], num_latent_frames: int, sinks: list, seeds: list[int],
                     progress: bool = False) -> dict:
        """`stream` for several prompts at once, each video to its sink: each draws its noise from its own seed's
        generator, so it is the video `stream` makes of it alone (up to the batch's float rounding); a small model
        streams a batch about as fast as one video on a GPU."""
        if not len(prompts) == len(sinks) == len(seeds):
            raise ValueError(f"{len(prompts)} prompts, {len(sinks)} sinks and {len(seeds)} seeds")
        if not all(p.strip() for p in prompts):
            raise ValueError("the prompt is empty")
        cfg, fpb = self.cfg, self.cfg.student.frames_per_block
        g = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        noise = randn(components.latent_shape(cfg, self.codec, num_latent_frames, len(prompts)), g, self.device,
                      self.dtype)
        blocks = num_latent_frames // fpb
        self.codec.reset_stream()
        decoder = BlockDecoder(self.codec, sinks, overlap=cfg.rollout.decode_overlap, device=self.device)
        t0 = time.perf_counter()

        def on_block(b: int, x0: torch.Tensor) -> None:
            if not torch.isfinite(x0).all():  # decoded, NaN becomes black frames that look like a video
                raise NonFiniteError(f"block {b + 1} of {blocks}: the student's latents hold NaN or inf values; "
                                     "no video is written (check the student's weights and the schedule)")
            decoder(b, x0)
            if progress:
                rate = (b + 1) * fpb / (time.perf_counter() - t0)
                print(f"\rblock {b + 1}/{blocks}  {rate:.1f} latent frames/s", end="" if b + 1 < blocks else "\n",
                      file=sys.stderr, flush=True)

        try:
            with torch.inference_mode():  # lighter than no_grad per op: no version counters or view tracking
                cross = self.student.cross_attention_cache(self.text.encode(list(prompts)))
                rollout(self.student, cross, noise, self.schedule.student_timesteps(cfg.schedule), self.schedule,
                        context_noise=cfg.schedule.context_noise, generator=g, on_block=on_block)
        except BaseException:
            decoder.close(abandon=True)
            raise
        decoder.close()
        return {"latent_frames": num_latent_frames, "elapsed_s": time.perf_counter() - t0}


def generate(cfg: Config, prompt: str, seconds: float, out: str | Path, checkpoint: str | None = None,
             seed: int | None = None, progress: bool = True) -> dict:
    """Generate `seconds` of video for `prompt` with the streaming student and write it to `out`. Returns the
    video's path, length (video_seconds, video_frames, latent_frames) and the time taken (elapsed_s)."""
    if not prompt.strip():
        raise ValueError("--prompt is empty")
    if seconds <= 0:
        raise ValueError(f"--seconds must be positive, got {seconds}")
    gen = VideoGenerator(cfg, checkpoint)
    cfg = gen.cfg  # the checkpoint's layout: whole blocks of its size
    nf = latent_frames_for(cfg, gen.codec, seconds)
    try:
        with VideoWriter(out, cfg.video.fps) as writer:
            stats = gen.stream(prompt, nf, writer, cfg.run.seed if seed is None else seed, progress=progress)
    except BaseException:
        Path(out).unlink(missing_ok=True)  # no half-written video left to pass for a result
        raise
    elapsed = stats["elapsed_s"]
    return {"path": str(out), "video_seconds": writer.frames / cfg.video.fps, "video_frames": writer.frames,
            "latent_frames": nf, "elapsed_s": elapsed, "frames_per_s": writer.frames / elapsed}


def summary(result: dict) -> str:
    """One line naming what `generate` wrote: the video's path and length, and the time it took."""
    return (f"wrote {result['path']}: {result['video_seconds']:g} s of video, {result['video_frames']} frames "
            f"({result['latent_frames']} latent), in {result['elapsed_s']:.1f} s")
