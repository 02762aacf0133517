"""Video checks and dense optical flow, shared by the evaluation metrics and the GRPO reward."""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np


ANALYSIS_SIDE = 128  # flow and metrics work with the short side at most this many pixels


def as_float_video(video: np.ndarray, max_short_side: int | None = ANALYSIS_SIDE) -> np.ndarray:
    """(F, H, W, 3) uint8, or float in [0, 1] -> float32 in [0, 1], area-downscaled so the short side
    is at most max_short_side: flow and statistics then cost the same and mean the same (pixels/frame
    at that size) whatever the output resolution. Anything that is not a video is refused loudly."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a video of shape (F, H, W, 3), got {video.shape}")
    if video.shape[0] < 2:
        raise ValueError(f"need at least 2 frames, got {video.shape[0]}")
    if video.dtype != np.uint8:
        if not np.issubdtype(video.dtype, np.floating):
            raise ValueError(f"expected uint8 or float frames, got dtype {video.dtype}")
        lo, hi = float(video.min()), float(video.max())
        if not np.isfinite(lo + hi) or lo < 0.0 or hi > 1.0:
            raise ValueError(f"float frames must lie in [0, 1] (clamp decoded frames first), got [{lo:.3g}, {hi:.3g}]")
    h, w = video.shape[1:3]
    if max_short_side is not None and min(h, w) > max_short_side:
        size = (round(w * max_short_side / min(h, w)), round(h * max_short_side / min(h, w)))
        video = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in video])
    return video.astype(np.float32) / 255.0 if video.dtype == np.uint8 else video.astype(np.float32)


def luma(video: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of a float video in [0, 1]: (F, H, W)."""
    return video @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def farneback_flow(video: np.ndarray) -> np.ndarray:
    """Flow from each frame to the next, (F-1, h, w, 2) in pixels/frame (x, y) at the analysis size. CPU, no weights."""
    gray = np.round(luma(as_float_video(video)) * 255.0).astype(np.uint8)
    winsize = max(5, min(15, min(gray.shape[1:]) // 4) | 1)  # small frames need a small window
    return np.stack([
        cv2.calcOpticalFlowFarneback(gray[t], gray[t + 1], None, 0.5, 3, winsize, 3, 5, 1.1, 0)
        for t in range(len(gray) - 1)
    ])


@functools.lru_cache(maxsize=2)
def _raft_model(weights: str):
    try:
        import torch
        from torchvision.models.optical_flow import raft_large, raft_small
    except ImportError as e:
        raise RuntimeError("grpo.reward=raft needs torchvision to run the weights at grpo.raft_weights; "
                           "install torchvision or use grpo.reward=farneback") from e
    if not Path(weights).is_file():
        raise FileNotFoundError(f"grpo.raft_weights: no RAFT state dict at {weights!r}")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for build in (raft_large, raft_small):
        model = build(weights=None)
        try:
            model.load_state_dict(state)
        except RuntimeError:
            continue
        return model.eval().to(device)
    raise ValueError(f"grpo.raft_weights: {weights!r} is neither a torchvision raft_large nor a raft_small state dict")


def raft_flow(video: np.ndarray, weights: str | None, batch_pairs: int = 16) -> np.ndarray:
    """torchvision RAFT flow at the analysis size, like farneback_flow. RAFT wants sides that are
    multiples of 8 and at least 128, so frames are resized to fit and the flow is mapped back."""
    if weights is None:
        raise ValueError("grpo.raft_weights: the raft flow needs a local path to RAFT weights")
    import torch
    import torch.nn.functional as F

    model = _raft_model(str(weights))
    device = next(model.parameters()).device
    frames = torch.from_numpy(as_float_video(video)).to(device).permute(0, 3, 1, 2) * 2.0 - 1.0
    h, w = frames.shape[-2:]
    scale = max(1.0, 128 / min(h, w))
    size = (int(np.ceil(h * scale / 8)) * 8, int(np.ceil(w * scale / 8)) * 8)
    frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
    out = []
    with torch.inference_mode():
        for s in range(0, len(frames) - 1, batch_pairs):
            e = min(s + batch_pairs, len(frames) - 1)
            out.append(model(frames[s:e], frames[s + 1:e + 1])[-1])
        flow = F.interpolate(torch.cat(out), size=(h, w), mode="bilinear", align_corners=False)
    flow = flow * torch.tensor([w / size[1], h / size[0]], device=device).view(1, 2, 1, 1)
    return flow.permute(0, 2, 3, 1).float().cpu().numpy()


def optical_flow(video: np.ndarray, method: str = "farneback", raft_weights: str | None = None) -> np.ndarray:
    """(F-1, h, w, 2) flow of a video downscaled by as_float_video."""
    if method == "farneback":
        return farneback_flow(video)
    if method == "raft":
        return raft_flow(video, raft_weights)
    raise ValueError(f"unknown flow method {method!r} (known: farneback, raft)")
