"""Video files: latents decoded to uint8 frames, written as mp4 (imageio's bundled ffmpeg) or gif."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) or (B=1, 3, F, H, W) floats in [-1, 1] -> (F, H, W, 3) uint8."""
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(f"expected one video, got a batch of {video.shape[0]}")
        video = video[0]
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


class VideoWriter:
    """Appends frames as they are decoded, so a long stream never sits in memory whole."""

    def __init__(self, path: str | Path, fps: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.frames = 0
        if self.path.suffix == ".gif":
            self._w = imageio.get_writer(self.path, mode="I", duration=1000 / fps, loop=0)
        elif self.path.suffix == ".mp4":
            # macro_block_size=1 keeps tiny resolutions exact; yuv420p for players that need it.
            if importlib.util.find_spec("imageio_ffmpeg") is None:  # else another plugin takes .mp4 and fails
                raise RuntimeError(f"writing {self.path} needs imageio-ffmpeg (pip install imageio-ffmpeg), "
                                   "or write a .gif")
            self._w = imageio.get_writer(self.path, "ffmpeg", fps=fps, codec="libx264", macro_block_size=1,
                                         pixelformat="yuv420p", quality=8, ffmpeg_log_level="error")
        else:
            raise ValueError(f"unsupported video format {self.path.suffix!r}: use .mp4 or .gif")

    def append(self, frames: np.ndarray) -> None:
        for f in frames:
            self._w.append_data(f)
            self.frames += 1

    def close(self) -> None:
        self._w.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    with VideoWriter(path, fps) as w:
        w.append(frames)
    return Path(path)


def read_video(path: str | Path) -> np.ndarray:
    """(F, H, W, 3) uint8, decoded by the same ffmpeg that wrote it."""
    reader = imageio.get_reader(path, "ffmpeg" if Path(path).suffix == ".mp4" else None)
    try:
        return np.stack([frame for frame in reader])
    finally:
        reader.close()
