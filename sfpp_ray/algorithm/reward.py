"""Optical-flow reward for GRPO: smooth motion wins, jitter and a frozen picture lose.

With flow f_t from frame t to t+1 (pixels/frame, measured with the short side downscaled to at most
128 px, see algorithm.optical_flow), follow each pixel along its flow and compare the next flow there; the
change is the motion's acceleration:

    a_t(x)     = f_{t+1}(x + f_t(x)) - f_t(x)
    magnitude  = mean_{t,x} |f_t(x)|
    smoothness = mean_{t,x} |a_t(x)| / max(magnitude, min_motion)
    motion     = max(0, min_motion - magnitude) / min_motion
    reward     = -smoothness - motion_weight * motion

Constant-velocity motion has zero acceleration whatever its speed, so smoothness rewards steady
motion rather than slow motion; the relative scale makes the reward independent of speed. A frozen
video has no acceleration either, which is why the motion floor costs it up to motion_weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from sfpp_ray.algorithm.optical_flow import optical_flow


def flow_reward_terms(video: np.ndarray, min_motion: float, method: str = "farneback",
                      raft_weights: str | None = None, motion_weight: float = 1.0) -> dict[str, float]:
    """The reward and its parts (for logging). video: (F >= 3, H, W, 3) uint8 or float in [0, 1]."""
    if min_motion <= 0:
        raise ValueError(f"min_motion must be > 0 (pixels/frame), got {min_motion}")
    if np.asarray(video).ndim == 4 and len(video) < 3:
        raise ValueError(f"the flow reward needs at least 3 frames (two flows to compare), got {len(video)}")
    flow = optical_flow(video, method, raft_weights)
    h, w = flow.shape[1:3]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    accel = [
        np.linalg.norm(cv2.remap(nxt, grid_x + cur[..., 0], grid_y + cur[..., 1], cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REPLICATE) - cur, axis=-1).mean()
        for cur, nxt in zip(flow[:-1], flow[1:])
    ]
    magnitude = float(np.linalg.norm(flow, axis=-1).mean())
    smoothness = float(np.mean(accel)) / max(magnitude, min_motion)
    motion = max(0.0, min_motion - magnitude) / min_motion
    return {"reward": -smoothness - motion_weight * motion, "smoothness": smoothness,
            "magnitude": magnitude, "motion_penalty": motion}


def flow_reward(video: np.ndarray, min_motion: float, method: str = "farneback",
                raft_weights: str | None = None, motion_weight: float = 1.0) -> float:
    return flow_reward_terms(video, min_motion, method, raft_weights, motion_weight)["reward"]


def batch_flow_rewards(videos: np.ndarray | Sequence[np.ndarray], min_motion: float, method: str = "farneback",
                       raft_weights: str | None = None, motion_weight: float = 1.0) -> np.ndarray:
    """Rewards of a group of rollouts, (B,) float64; videos: (B, F, H, W, 3) or a list of clips."""
    return np.array([flow_reward(v, min_motion, method, raft_weights, motion_weight) for v in videos], np.float64)
