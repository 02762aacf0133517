"""Long-video metrics per time segment, each aimed at one failure mode of autoregressive rollouts.

Why per segment: the failures Self-Forcing++ targets (over-exposure, darkening and stagnation,
repetition, flicker at block boundaries, objects that vanish or change) build up with time, so each
metric is measured per segment and compared with real clips of the sprite world, or with the video's
own first segment when no reference is given. All metrics run on CPU with OpenCV and numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from threadpoolctl import threadpool_limits

from sfpp_ray.algorithm.optical_flow import as_float_video, farneback_flow, luma
from sfpp_ray.world.sprites import PALETTE, SHAPES

LEVELS = 256  # per channel, for colour drift
FEATURE_HIST_BINS = 4  # per channel, inside the Frechet features
THUMB = 4  # side of the downsampled frame inside the Frechet features
REPEAT_THUMB = 16  # side of the frame descriptor used to find repeats
COLOUR_TOLERANCE = 60.0  # RGB distance (0-255) within which a pixel takes its nearest palette colour
# Penalty scales of the stability score: the raw value at which a penalty saturates (or, for the
# Frechet distance, reaches one half).
EXPOSURE_SCALE = 0.1  # mean luma difference in [0, 1]
COLOUR_SCALE = 0.1  # earth mover's distance of per-channel colour histograms, in [0, 1] units
REPEAT_FLOOR = 0.8  # similarity a moving world reaches by chance between distant segments
FRECHET_SCALE = 2.0
PENALTIES = ("exposure", "colour", "count", "composition", "motion", "flicker", "repetition", "frechet")


class FrechetReference:
    """A Gaussian fitted to reference features, with its covariance's square root computed once: a long video's
    segments are each compared with the same reference, and the eigendecompositions are most of the cost."""

    def __init__(self, y: np.ndarray):
        y = np.asarray(y, np.float64)
        if y.ndim != 2 or len(y) < 2:
            raise ValueError(f"need a (n >= 2, d) feature matrix, got {y.shape}")
        self.mean, self.cov = y.mean(0), np.atleast_2d(np.cov(y, rowvar=False))
        w, v = np.linalg.eigh(self.cov)
        self.root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    def distance(self, x: np.ndarray) -> float:
        """|mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_y^1/2 S_x S_y^1/2)^1/2); the trace of the root is the same with
        the roles of S_x and S_y swapped (both hold the square roots of S_x S_y's eigenvalues)."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.mean) or len(x) < 2:
            raise ValueError(f"need a (n >= 2, {len(self.mean)}) feature matrix, got {x.shape}")
        sx = np.atleast_2d(np.cov(x, rowvar=False))
        cross = np.linalg.eigvalsh(self.root @ sx @ self.root)
        d = (((x.mean(0) - self.mean) ** 2).sum() + np.trace(sx) + np.trace(self.cov)
             - 2 * np.sqrt(np.clip(cross, 0, None)).sum())
        return float(max(d, 0.0))


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of x and y (square roots by eigendecomposition)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"need two (n >= 2, d) feature matrices of equal d, got {x.shape} and {y.shape}")
    return FrechetReference(y).distance(x)


def stability_score(m: dict) -> float:
    """Stability, 0-100: 100 * (1 - mean of eight penalties, each in [0, 1]):

        exposure    = min(1, exposure_drift / 0.1)
        colour      = min(1, colour_drift / 0.1)
        count       = min(1, count_error)
        composition = composition_error
        motion      = stagnation
        flicker     = min(1, max(0, flicker - 1))                  (0 where undefined)
        repetition  = max(0, repetition - 0.8) / 0.2              (0 where undefined)
        frechet     = frechet / (frechet + 2)

    A segment identical in distribution to the reference scores 100; one that fails on a single
    axis loses at most 12.5 points, so the score ranks clips by how many ways they degrade."""
    finite = lambda v: 0.0 if np.isnan(v) else v
    penalties = {
        "exposure": min(1.0, m["exposure_drift"] / EXPOSURE_SCALE),
        "colour": min(1.0, m["colour_drift"] / COLOUR_SCALE),
        "count": min(1.0, m["count_error"]),
        "composition": m["composition_error"],
        "motion": m["stagnation"],
        "flicker": min(1.0, max(0.0, finite(m["flicker"]) - 1.0)),
        "repetition": max(0.0, finite(m["repetition"]) - REPEAT_FLOOR) / (1.0 - REPEAT_FLOOR),
        "frechet": m["frechet"] / (m["frechet"] + FRECHET_SCALE),
    }
    return 100.0 * (1.0 - sum(penalties[k] for k in PENALTIES) / len(PENALTIES))


def _channel_histograms(video: np.ndarray) -> np.ndarray:
    """Per-frame histograms of each channel's 256 levels, (F, 3, 256), each summing to 1."""
    q = np.minimum((video * LEVELS).astype(np.int64), LEVELS - 1).reshape(len(video), -1, 3)
    codes = q + (np.arange(len(video))[:, None, None] * 3 + np.arange(3)) * LEVELS
    return np.bincount(codes.ravel(), minlength=len(video) * 3 * LEVELS).reshape(len(video), 3, LEVELS) / q.shape[1]


def colour_distance(hist_a: np.ndarray, hist_b: np.ndarray) -> float:
    """Earth mover's distance between two (3, 256) channel histograms, averaged over channels, in [0, 1]
    units of pixel value. Why not a binned distance: moving every pixel by an invisible 4 levels across a
    bin edge would count like a change of colour; here it costs what it moves, 4/256."""
    return float(np.abs(np.cumsum(hist_a, -1) - np.cumsum(hist_b, -1)).sum(-1).mean() / LEVELS)


def _colour_histograms(video: np.ndarray, bins: int) -> np.ndarray:
    """Per-frame joint RGB histograms, (F, bins^3), each summing to 1."""
    q = np.minimum((video * bins).astype(np.int64), bins - 1)
    codes = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    codes = codes.reshape(len(video), -1) + np.arange(len(video))[:, None] * bins**3
    counts = np.bincount(codes.ravel(), minlength=len(video) * bins**3).reshape(len(video), bins**3)
    return counts / codes.shape[1]


def _thumbnails(video: np.ndarray, side: int) -> np.ndarray:
    return np.stack([cv2.resize(f, (side, side), interpolation=cv2.INTER_AREA) for f in video]).reshape(len(video), -1)


def _sprites(video: np.ndarray, palette: dict[str, tuple[int, int, int]], tolerance: float, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment each frame by nearest palette colour and label connected components.
    Returns sprites per frame (F,) and (colour, shape) counts (F, P * 3); shape from how much of its
    bounding box a component fills (square ~1, circle ~pi/4, triangle ~1/2)."""
    colours = np.array(list(palette.values()), np.float32) / 255.0
    counts = np.zeros(len(video), np.int64)
    kinds = np.zeros((len(video), len(colours) * len(SHAPES)), np.int64)
    for f, frame in enumerate(video):
        dist2 = (frame**2).sum(-1, keepdims=True) - 2 * frame @ colours.T + (colours**2).sum(-1)
        nearest = dist2.argmin(-1)
        nearest[dist2.min(-1) > (tolerance / 255.0) ** 2] = -1
        for c in np.unique(nearest[nearest >= 0]):
            n, _, stats, _ = cv2.connectedComponentsWithStats((nearest == c).astype(np.uint8), connectivity=4)
            stats = stats[1:][stats[1:, cv2.CC_STAT_AREA] >= min_area]
            fill = stats[:, cv2.CC_STAT_AREA] / (stats[:, cv2.CC_STAT_WIDTH] * stats[:, cv2.CC_STAT_HEIGHT])
            shape = np.where(fill > 0.88, SHAPES.index("square"), np.where(fill > 0.64, SHAPES.index("circle"), SHAPES.index("triangle")))
            np.add.at(kinds[f], c * len(SHAPES) + shape, 1)
            counts[f] += len(stats)
    return counts, kinds


def min_sprite_area(height: int, width: int) -> int:
    """The smallest component counted as a sprite, in pixels at the analysis size: specks are not sprites."""
    return max(4, height * width // 500)


def find_sprites(video: np.ndarray, palette: dict[str, tuple[int, int, int]] = PALETTE
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Sprites per frame (F,) and (colour, shape) counts (F, P * 3) exactly as the metrics find them: at
    their analysis size, tolerance and minimum area. For experiments that look inside the composition
    and count metrics."""
    video = as_float_video(video)
    return _sprites(video, palette, COLOUR_TOLERANCE, min_sprite_area(*video.shape[1:3]))


def _distribution_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance of two count vectors; 1 when exactly one of them is empty."""
    sa, sb = a.sum(), b.sum()
    if sa == 0 or sb == 0:
        return float(sa != sb)
    return 0.5 * float(np.abs(a / sa - b / sb).sum())


def _frame_stats(video: np.ndarray, palette, tolerance: float, min_area: int) -> dict[str, np.ndarray]:
    """Everything the metrics need per frame (or per frame pair), computed once per clip."""
    flow = farneback_flow(video)
    mag = np.linalg.norm(flow, axis=-1)
    flow_stats = np.stack([mag.mean((1, 2)), mag.std((1, 2)), flow[..., 0].mean((1, 2)), flow[..., 1].mean((1, 2))], 1)
    counts, kinds = _sprites(video, palette, tolerance, min_area)
    features = np.concatenate([
        _colour_histograms(video, FEATURE_HIST_BINS), _thumbnails(video, THUMB),
        np.concatenate([flow_stats[:1], flow_stats]),  # frame t carries the flow that arrived at it
    ], 1)
    return {
        "brightness": luma(video).mean((1, 2)), "hist": _channel_histograms(video),
        "flow": flow_stats[:, 0], "diff": np.abs(np.diff(video, axis=0)).mean((1, 2, 3)),
        "count": counts, "kinds": kinds, "features": features,
    }


def _boundary_pairs(num_frames: int, block_frames: int | Sequence[int] | None) -> np.ndarray:
    """Mask over frame pairs (t, t+1): True where frame t+1 starts a new block."""
    mask = np.zeros(num_frames - 1, bool)
    if block_frames is None:
        return mask
    if isinstance(block_frames, (int, np.integer)):
        if block_frames <= 0:
            raise ValueError(f"block_frames must be > 0, got {block_frames}")
        starts = np.arange(block_frames, num_frames, block_frames)
    else:
        starts = np.asarray(block_frames, np.int64)
        starts = starts[(starts > 0) & (starts < num_frames)]
    mask[starts - 1] = True
    return mask


# one BLAS thread: the matrices are ~100 wide, where threads cost more than they give, and evaluations run side by
# side (one process a student) would otherwise each start a thread per core
@threadpool_limits.wrap(limits=1, user_api="blas")
def segment_metrics(video: np.ndarray, segment_frames: int, reference: np.ndarray | Sequence[np.ndarray] | None = None,
                    palette: dict[str, tuple[int, int, int]] = PALETTE, block_frames: int | Sequence[int] | None = None,
                    motion_threshold: float = 0.05, colour_tolerance: float = COLOUR_TOLERANCE, min_area: int | None = None) -> list[dict]:
    """Metrics per consecutive segment of `segment_frames` frames (a trailing remainder of >= 2 frames
    is its own segment). video: (F, H, W, 3) uint8 or float in [0, 1], analysed area-downscaled to a
    short side of at most 128 px; reference: real clips of the same size, (F, H, W, 3),
    (N, F, H, W, 3) or a list, else the video's first segment.
    block_frames: the generator's block length in decoded frames, or the first frame of every block
    (for codecs whose first block decodes to fewer frames). Per segment:

    brightness, exposure_drift  mean luma, and its absolute difference from the reference's
    brightness_bias             the same difference with its sign: over-exposure > 0, darkening < 0
    colour_drift                earth mover's distance of the R, G and B histograms to the reference's
    sprite_count, count_error   connected components of palette colours per frame, relative error
    composition_error           total-variation distance of the (colour, shape) distribution
    flow_magnitude, dynamic_degree, stagnation
                                mean Farneback flow (pixels/frame at the analysis size); fraction
                                of frame pairs whose mean flow exceeds motion_threshold; relative
                                loss of flow vs the reference
    flicker                     (mean abs frame difference across block boundaries + e) / (elsewhere + e)
    repetition                  max over segments >= 2 away of the mean best match of each frame there
                                (cosine of background- and brightness-removed 16x16 thumbnails)
    frechet                     Frechet distance of per-frame features (4^3 colour histogram, 4x4
                                thumbnail, flow statistics) to the reference's
    stability                   see stability_score
    """
    raw_size = np.shape(video)[1:3]
    video = as_float_video(video)
    n, h, w = video.shape[:3]
    if segment_frames < 2:
        raise ValueError(f"segment_frames must be >= 2, got {segment_frames}")
    if min_area is None:
        min_area = min_sprite_area(h, w)
    stats = _frame_stats(video, palette, colour_tolerance, min_area)
    bounds = [(s, min(s + segment_frames, n)) for s in range(0, n, segment_frames) if min(s + segment_frames, n) - s >= 2]

    if reference is None:  # the first segment; per-pair statistics have one entry fewer
        ref = {k: v[: bounds[0][1] - (k in ("flow", "diff"))] for k, v in stats.items()}
    else:
        clips = [reference] if isinstance(reference, np.ndarray) and reference.ndim == 4 else list(reference)
        if not clips or any(np.shape(c)[1:3] != raw_size for c in clips):
            raise ValueError(f"reference must hold clips of the video's size {raw_size}, got {[np.shape(c) for c in clips]}")
        clips = [as_float_video(c) for c in clips]
        per_clip = [_frame_stats(c, palette, colour_tolerance, min_area) for c in clips]
        ref = {k: np.concatenate([p[k] for p in per_clip]) for k in stats}
    ref_brightness, ref_hist, ref_count = ref["brightness"].mean(), ref["hist"].mean(0), ref["count"].mean()
    ref_flow, ref_kinds = ref["flow"].mean(), ref["kinds"].sum(0)
    ref_features = FrechetReference(ref["features"])

    boundary = _boundary_pairs(n, block_frames)
    eps = 0.5 / 255.0
    thumbs = _thumbnails(video, REPEAT_THUMB).reshape(n, -1, 3)
    thumbs = thumbs - thumbs.mean(0)  # the static background
    thumbs = (thumbs - thumbs.mean(1, keepdims=True)).reshape(n, -1)  # global brightness
    thumbs /= np.maximum(np.linalg.norm(thumbs, axis=1, keepdims=True), 1e-3)  # a frame with no content matches nothing
    best = np.maximum.reduceat(thumbs @ thumbs.T, [s for s, _ in bounds], axis=1)  # (F, segments)

    out = []
    for i, (s, e) in enumerate(bounds):
        flow, diff, edge = stats["flow"][s:e - 1], stats["diff"][s:e - 1], boundary[s:e - 1]
        far = [j for j in range(len(bounds)) if abs(i - j) >= 2]
        brightness = float(stats["brightness"][s:e].mean())
        m = {
            "start": s, "end": e,
            "brightness": brightness,
            "brightness_bias": brightness - float(ref_brightness),
            "exposure_drift": abs(brightness - float(ref_brightness)),
            "colour_drift": colour_distance(stats["hist"][s:e].mean(0), ref_hist),
            "sprite_count": float(stats["count"][s:e].mean()),
            "count_error": float(abs(stats["count"][s:e].mean() - ref_count) / max(ref_count, 1.0)),
            "composition_error": _distribution_distance(stats["kinds"][s:e].sum(0), ref_kinds),
            "flow_magnitude": float(flow.mean()),
            "dynamic_degree": float((flow > motion_threshold).mean()),
            "stagnation": float(max(0.0, 1.0 - flow.mean() / ref_flow)) if ref_flow > 0 else 0.0,
            "flicker": float((diff[edge].mean() + eps) / (diff[~edge].mean() + eps)) if edge.any() and not edge.all() else float("nan"),
            "repetition": float(max(best[s:e, j].mean() for j in far)) if far else float("nan"),
            "frechet": ref_features.distance(stats["features"][s:e]),
        }
        m["stability"] = stability_score(m)
        out.append(m)
    return out


def summarise(segments: list[dict]) -> dict:
    """Mean of every metric over segments (undefined values skipped), plus the last and the worst
    segment's stability: a long video is only as good as where it ends up."""
    if not segments:
        raise ValueError("no segments to summarise")
    keys = [k for k in segments[0] if k not in ("start", "end")]
    summary = {}
    for k in keys:
        values = np.array([m[k] for m in segments], np.float64)
        summary[k] = float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
    summary.update(stability_last=segments[-1]["stability"], stability_min=min(m["stability"] for m in segments),
                   num_segments=len(segments), num_frames=segments[-1]["end"])
    return summary
