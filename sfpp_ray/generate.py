"""Streaming text-to-video: the rollout loop, decoded block by block into a video file.

A video can change prompt while it runs (a PromptSchedule: prompts by time) and start from a given
image or clip (its first block encoded by the codec and prefilled into the cache as clean context).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from pathlib import Path
from queue import Queue

import cv2
import imageio.v2 as imageio
import numpy as np
import torch

from sfpp_ray import components
from sfpp_ray.algorithm.rollout import randn, rollout
from sfpp_ray.checks import NonFiniteError
from sfpp_ray.config import Config
from sfpp_ray.prompt_schedule import PromptSchedule
from sfpp_ray.video_io import VideoWriter, read_video, to_uint8


def latent_frames_for(cfg: Config, codec, seconds: float) -> int:
    """Latent frames covering `seconds` of video, rounded up to whole blocks."""
    if seconds <= 0:
        raise ValueError(f"--seconds must be positive, got {seconds}")
    n = codec.latent_frames(max(1, round(seconds * cfg.video.fps)))
    fpb = cfg.student.frames_per_block
    return math.ceil(n / fpb) * fpb


def as_schedule(prompt: str | PromptSchedule) -> PromptSchedule:
    return prompt if isinstance(prompt, PromptSchedule) else PromptSchedule(prompt)


def read_start(path: str | Path, height: int, width: int, num_frames: int) -> np.ndarray:
    """A start for the video: an image repeated `num_frames` times (a still), or a clip's first `num_frames` frames;
    uint8 (num_frames, height, width, 3), resized to the video's size where it differs."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--image {path}: no such file")
    if path.suffix.lower() in (".mp4", ".gif"):
        frames = read_video(path)
        if len(frames) < num_frames:
            raise ValueError(f"--image {path}: a start clip needs {num_frames} frames (one block), it has {len(frames)}")
        frames = frames[:num_frames]
    else:
        image = np.asarray(imageio.imread(path))
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, -1)
        frames = np.repeat(image[None, ..., :3], num_frames, 0)
    if frames.shape[1:3] != (height, width):
        frames = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames])
    return frames.astype(np.uint8)


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

    def start_latents(self, image: str | Path | np.ndarray) -> torch.Tensor:
        """Latents (1, C, one block, h, w) of a start image or clip (a path, or uint8 frames (F, H, W, 3)) as the
        codec encodes it: the clean context a stream from it is prefilled with."""
        cfg = self.cfg
        n = self.codec.video_frames(cfg.student.frames_per_block)
        frames = read_start(image, cfg.video.height, cfg.video.width, n) if not isinstance(image, np.ndarray) else image
        if frames.shape != (n, cfg.video.height, cfg.video.width, 3):
            raise ValueError(f"start frames of shape {frames.shape}; one block is {(n, cfg.video.height, cfg.video.width, 3)}")
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None].to(self.device, self.dtype)
        with torch.no_grad():
            return self.codec.encode(video / 127.5 - 1.0).to(self.device, self.dtype)

    @torch.no_grad()
    def stream(self, prompt: str | PromptSchedule, num_latent_frames: int, sink, seed: int, progress: bool = False,
               start: torch.Tensor | None = None) -> dict:
        """Roll out `num_latent_frames` and hand decoded uint8 frames (F, H, W, 3) to `sink.append` block by block.

        prompt: a prompt, or a PromptSchedule that switches prompts at given times. start: latents of clean frames
        the video begins with (`start_latents`), prefilled into the cache; they are decoded first, into the video."""
        return self.stream_batch([prompt], num_latent_frames, [sink], [seed], progress, start=start)

    def stream_batch(self, prompts: list[str | PromptSchedule], num_latent_frames: int, sinks: list, seeds: list[int],
                     progress: bool = False, start: torch.Tensor | None = None) -> dict:
        """`stream` for several prompts at once, each video to its sink: each draws its noise from its own seed's
        generator, so it is the video `stream` makes of it alone (up to the batch's float rounding); a small model
        streams a batch about as fast as one video on a GPU. At a block where any video switches prompt, the batch's
        cross-attention cache is rebuilt from each video's prompt in force (rollout.switch_cache: the self-attention
        cache kept or re-cached)."""
        if not len(prompts) == len(sinks) == len(seeds):
            raise ValueError(f"{len(prompts)} prompts, {len(sinks)} sinks and {len(seeds)} seeds")
        schedules = [as_schedule(p) for p in prompts]
        cfg, fpb = self.cfg, self.cfg.student.frames_per_block
        g = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        noise = randn(components.latent_shape(cfg, self.codec, num_latent_frames, len(prompts)), g, self.device,
                      self.dtype)
        blocks = num_latent_frames // fpb
        if start is not None:
            start = start.to(self.device, self.dtype).expand(len(prompts), -1, -1, -1, -1)
        # the prompt in force at each block of the video, its start's blocks first: switch times count from its start
        lead = 0 if start is None else start.shape[2] // fpb
        in_force = [{0: s.prompt, **s.blocks(self.codec.latent_frames, cfg.video.fps, fpb, lead + blocks)}
                    for s in schedules]
        for f in in_force:  # a prompt holds until its video's next switch
            for b in range(1, lead + blocks):
                f.setdefault(b, f[b - 1])
        in_force = [[f[b] for b in range(lead, lead + blocks)] for f in in_force]  # the generated blocks'
        switch_blocks = sorted(b for b in range(1, blocks) if any(f[b] != f[b - 1] for f in in_force))
        switches = {b: self.student.cross_attention_cache(self.text.encode([f[b] for f in in_force]))
                    for b in switch_blocks}
        self.codec.reset_stream()
        decoder = BlockDecoder(self.codec, sinks, overlap=cfg.rollout.decode_overlap, device=self.device)
        if start is not None:
            decoder(-1, start)
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
                cross = self.student.cross_attention_cache(self.text.encode([f[0] for f in in_force]))
                rollout(self.student, cross, noise, self.schedule.student_timesteps(cfg.schedule), self.schedule,
                        context=start, context_noise=cfg.schedule.context_noise, generator=g, switches=switches,
                        switch_cache=cfg.rollout.switch_cache, on_block=on_block)
        except BaseException:
            decoder.close(abandon=True)
            raise
        decoder.close()
        return {"latent_frames": num_latent_frames, "elapsed_s": time.perf_counter() - t0,
                "switch_blocks": switch_blocks}


def generate(cfg: Config, prompt: str | PromptSchedule, seconds: float, out: str | Path, checkpoint: str | None = None,
             seed: int | None = None, progress: bool = True, image: str | Path | None = None) -> dict:
    """Generate `seconds` of video for `prompt` (or a PromptSchedule) with the streaming student and write it to
    `out`; with `image` (a PNG, or a clip whose first block is used) the video starts from it. Returns the video's
    path, length (video_seconds, video_frames, latent_frames: the start's included) and the time taken
    (elapsed_s)."""
    if isinstance(prompt, str) and not prompt.strip():
        raise ValueError("--prompt is empty")
    if seconds <= 0:
        raise ValueError(f"--seconds must be positive, got {seconds}")
    gen = VideoGenerator(cfg, checkpoint)
    cfg = gen.cfg  # the checkpoint's layout: whole blocks of its size
    nf = latent_frames_for(cfg, gen.codec, seconds)
    start = gen.start_latents(image) if image is not None else None
    try:
        with VideoWriter(out, cfg.video.fps) as writer:
            stats = gen.stream(prompt, nf, writer, cfg.run.seed if seed is None else seed, progress=progress,
                               start=start)
    except BaseException:
        Path(out).unlink(missing_ok=True)  # no half-written video left to pass for a result
        raise
    elapsed = stats["elapsed_s"]
    nf += 0 if start is None else start.shape[2]
    return {"path": str(out), "video_seconds": writer.frames / cfg.video.fps, "video_frames": writer.frames,
            "latent_frames": nf, "switch_blocks": stats["switch_blocks"], "elapsed_s": elapsed, "frames_per_s": writer.frames / elapsed}


def summary(result: dict) -> str:
    """One line naming what `generate` wrote: the video's path and length, and the time it took."""
    return (f"wrote {result['path']}: {result['video_seconds']:g} s of video, {result['video_frames']} frames "
            f"({result['latent_frames']} latent), in {result['elapsed_s']:.1f} s")
