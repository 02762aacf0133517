"""A synthetic video world with known ground truth: coloured sprites bouncing in a box.

Why: long-horizon failures (exposure drift, stagnation, repetition, vanishing objects) are only
measurable against a world whose true statistics are known and do not change with time. Here motion
is closed-form (constant speed, elastic bounces off the walls), the background is static and sprites
never change, so frame 10^6 is distributed like frame 0, any frame can be rendered directly, and a
clip 100x longer has the statistics of a short one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 50),
    "green": (50, 180, 70),
    "cyan": (40, 200, 220),
    "blue": (50, 90, 230),
    "purple": (160, 70, 210),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
# Gradient end points per tone: dark and desaturated, far from every palette colour, so a pixel's
# nearest palette colour separates sprites from background.
BACKGROUND_TONES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "dark": ((12, 12, 18), (40, 40, 52)),
    "grey": ((70, 70, 76), (105, 105, 112)),
    "navy": ((10, 16, 48), (30, 40, 90)),
    "brown": ((40, 26, 16), (80, 56, 36)),
}
BACKGROUND_KINDS = ("gradient", "texture")
TEXTURE_AMPLITUDE = 12.0  # 0-255 units; keeps textured backgrounds far from the palette
# Colour/shape pairs that only held-out scenes contain: every colour and shape is still seen in
# training, so held-out prompts test composition, not new words.
HELDOUT_COMBOS = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square"),
                            ("yellow", "square"), ("purple", "triangle"), ("white", "circle")})
TEMPOS = ("slowly", "steadily", "quickly")  # thirds of the world's speed range
SPLITS = ("train", "heldout")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class WorldSpec:
    """Resolution and the ranges scenes are sampled from. Sizes and speeds are in short sides
    (and short sides per second), so one spec means the same world at any resolution and fps."""

    height: int = 64
    width: int = 64
    fps: int = 16
    sprite_count: tuple[int, int] = (1, 4)  # inclusive
    size: tuple[float, float] = (0.08, 0.16)  # sprite half-width
    speed: tuple[float, float] = (0.1, 0.6)
    backgrounds: tuple[str, ...] = BACKGROUND_KINDS
    antialias: bool = True

    def __post_init__(self) -> None:
        if self.height < 8 or self.width < 8 or self.fps <= 0:
            raise ValueError(f"need height, width >= 8 and fps > 0, got {self.height}x{self.width} at {self.fps} fps")
        lo, hi = self.sprite_count
        if not 1 <= lo <= hi < len(NUMBER_WORDS):
            raise ValueError(f"sprite_count must satisfy 1 <= lo <= hi <= {len(NUMBER_WORDS) - 1}, got {self.sprite_count}")
        if not 0 < self.size[0] <= self.size[1] < 0.5:
            raise ValueError(f"size must satisfy 0 < lo <= hi < 0.5 (fraction of the short side), got {self.size}")
        if not 0 < self.speed[0] < self.speed[1]:
            raise ValueError(f"speed must satisfy 0 < lo < hi, got {self.speed}")
        if not self.backgrounds or not set(self.backgrounds) <= set(BACKGROUND_KINDS):
            raise ValueError(f"backgrounds must be a non-empty subset of {BACKGROUND_KINDS}, got {self.backgrounds}")

    @property
    def short_side(self) -> int:
        return min(self.height, self.width)


def half_extent(shape: str, radius: float) -> tuple[float, float]:
    """Half of a sprite's bounding box (x, y); the box is what bounces off the walls."""
    return (radius, radius * math.sqrt(3) / 2) if shape == "triangle" else (radius, radius)


@dataclass(frozen=True)
class Sprite:
    shape: str
    colour: str
    radius: float  # half-width in pixels
    position: tuple[float, float]  # (x, y) centre at frame 0, pixels
    velocity: tuple[float, float]  # pixels per frame

    @property
    def half_extent(self) -> tuple[float, float]:
        return half_extent(self.shape, self.radius)


@dataclass(frozen=True)
class Background:
    kind: str
    tone: str
    angle: float  # gradient direction, radians
    waves: tuple[tuple[float, float, float], ...] = ()  # texture: (kx, ky, phase) per sinusoid


@dataclass(frozen=True)
class SceneSpec:
    world: WorldSpec
    sprites: tuple[Sprite, ...]  # draw order: later sprites occlude earlier ones
    background: Background

    def __post_init__(self) -> None:
        if not self.sprites:
            raise ValueError("a scene needs at least one sprite")
        for s in self.sprites:
            if s.shape not in SHAPES or s.colour not in PALETTE:
                raise ValueError(f"unknown sprite {s.colour!r} {s.shape!r} (shapes {SHAPES}, colours {list(PALETTE)})")
            hx, hy = s.half_extent
            if not (hx <= s.position[0] <= self.world.width - hx and hy <= s.position[1] <= self.world.height - hy):
                raise ValueError(f"sprite at {s.position} with half extent {(hx, hy)} is outside the {self.world.width}x{self.world.height} box")
        bg = self.background
        if bg.kind not in BACKGROUND_KINDS or bg.tone not in BACKGROUND_TONES:
            raise ValueError(f"unknown background {bg.kind!r} {bg.tone!r}")


# ---------------------------------------------------------------- sampling and prompts


def sample_scene(rng: np.random.Generator, world: WorldSpec = WorldSpec(), split: str = "train") -> SceneSpec:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    all_combos = [(c, s) for c in PALETTE for s in SHAPES]
    train_combos = [cs for cs in all_combos if cs not in HELDOUT_COMBOS]
    n = int(rng.integers(world.sprite_count[0], world.sprite_count[1] + 1))
    if split == "train":
        combos = [train_combos[i] for i in rng.integers(len(train_combos), size=n)]
    else:  # at least one held-out pair, so no held-out prompt can be a training prompt
        held = sorted(HELDOUT_COMBOS)
        combos = [held[rng.integers(len(held))]] + [all_combos[i] for i in rng.integers(len(all_combos), size=n - 1)]
        rng.shuffle(combos)
    third = (world.speed[1] - world.speed[0]) / len(TEMPOS)
    slow = world.speed[0] + third * rng.integers(len(TEMPOS))
    px_per_frame = world.short_side / world.fps
    sprites = []
    for colour, shape in combos:
        radius = rng.uniform(*world.size) * world.short_side
        hx, hy = half_extent(shape, radius)
        position = (rng.uniform(hx, world.width - hx), rng.uniform(hy, world.height - hy))
        speed, heading = rng.uniform(slow, slow + third) * px_per_frame, rng.uniform(0, 2 * math.pi)
        sprites.append(Sprite(shape, colour, radius, position, (speed * math.cos(heading), speed * math.sin(heading))))
    kind = world.backgrounds[rng.integers(len(world.backgrounds))]
    tone = list(BACKGROUND_TONES)[rng.integers(len(BACKGROUND_TONES))]
    waves = ()
    if kind == "texture":  # wavelengths between a quarter and a whole short side
        k = 2 * math.pi / (world.short_side * rng.uniform(0.25, 1.0, size=3))
        theta, phase = rng.uniform(0, 2 * math.pi, size=3), rng.uniform(0, 2 * math.pi, size=3)
        waves = tuple((float(k[i] * math.cos(theta[i])), float(k[i] * math.sin(theta[i])), float(phase[i])) for i in range(3))
    return SceneSpec(world, tuple(sprites), Background(kind, tone, float(rng.uniform(0, 2 * math.pi)), waves))


def sample_scenes(seed: int, n: int, split: str = "train", world: WorldSpec = WorldSpec()) -> list[SceneSpec]:
    """n scenes; scene i depends only on (seed, split, i), so prompt sets are reproducible and extendable."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [sample_scene(np.random.default_rng([SPLITS.index(split), seed, i]), world, split) for i in range(n)]


def tempo(scene: SceneSpec) -> str:
    """The speed word of the prompt: which third of the world's speed range the mean speed falls in."""
    w = scene.world
    mean = np.mean([math.hypot(*s.velocity) for s in scene.sprites]) * w.fps / w.short_side
    third = (w.speed[1] - w.speed[0]) / len(TEMPOS)
    return TEMPOS[int(np.clip((mean - w.speed[0]) // third, 0, len(TEMPOS) - 1))]


def prompt(scene: SceneSpec) -> str:
    """e.g. "two red squares and a blue circle bouncing slowly on a dark gradient background"."""
    counts: dict[tuple[str, str], int] = {}
    for s in scene.sprites:
        counts[(s.colour, s.shape)] = counts.get((s.colour, s.shape), 0) + 1
    groups = [f"{NUMBER_WORDS[n]} {colour} {shape}s" if n > 1 else f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"
              for (colour, shape), n in counts.items()]
    objects = groups[0] if len(groups) == 1 else ", ".join(groups[:-1]) + " and " + groups[-1]
    texture = "gradient" if scene.background.kind == "gradient" else "textured"
    return f"{objects} bouncing {tempo(scene)} on a {scene.background.tone} {texture} background"


def vocabulary() -> list[str]:
    """Every word (and the comma) a prompt of this world can contain, in a fixed order: the
    vocabulary of a word-level tokenizer, one token per word."""
    words = [*NUMBER_WORDS, "a", "an", "and", ",", "bouncing", "on", "background", "gradient", "textured",
             *TEMPOS, *BACKGROUND_TONES, *PALETTE, *SHAPES, *(f"{shape}s" for shape in SHAPES)]
    return list(dict.fromkeys(words))


# ---------------------------------------------------------------- rendering


def positions(scene: SceneSpec, start_frame: int, num_frames: int) -> np.ndarray:
    """Sprite centres (F, S, 2) in pixels: straight lines folded back at the walls (elastic bounces)."""
    t = np.arange(start_frame, start_frame + num_frames, dtype=np.float64)[:, None, None]
    p0 = np.array([s.position for s in scene.sprites], dtype=np.float64)
    v = np.array([s.velocity for s in scene.sprites], dtype=np.float64)
    lo = np.array([s.half_extent for s in scene.sprites], dtype=np.float64)
    span = np.array([scene.world.width, scene.world.height], dtype=np.float64) - 2 * lo
    u = np.mod(p0 - lo + v * t, 2 * span)
    return lo + span - np.abs(u - span)


def background(scene: SceneSpec) -> np.ndarray:
    """Static background (H, W, 3), float32 in 0-255."""
    w, bg = scene.world, scene.background
    y, x = np.mgrid[0:w.height, 0:w.width].astype(np.float32) + 0.5
    along = (x - w.width / 2) * math.cos(bg.angle) + (y - w.height / 2) * math.sin(bg.angle)
    ramp = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
    start, end = (np.array(c, dtype=np.float32) for c in BACKGROUND_TONES[bg.tone])
    image = start + ramp[..., None] * (end - start)
    if bg.waves:
        texture = sum(np.sin(kx * x + ky * y + phase) for kx, ky, phase in bg.waves) / len(bg.waves)
        image = image + TEXTURE_AMPLITUDE * texture[..., None]
    return image


def _signed_distance(shape: str, radius: float, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Distance in pixels to the shape's edge, negative inside (exact enough for 1-pixel anti-aliasing)."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - radius
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - radius
    h = radius * math.sqrt(3) / 2  # apex up, base down; the side is 2 * radius
    slant = (2 * h * np.abs(dx) - radius * (dy + h)) / (2 * radius)
    return np.maximum(dy - h, slant)


def render(scene: SceneSpec, start_frame: int, num_frames: int) -> np.ndarray:
    """Frames [start_frame, start_frame + num_frames) as uint8 (F, H, W, 3); pure function of its arguments."""
    return render_layers(scene, start_frame, num_frames)[0]


def render_layers(scene: SceneSpec, start_frame: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """render's frames and the sprites' coverage (F, H, W), float32 in [0, 1]: the share of each pixel that
    a sprite covers (the most over sprites), so a loss can single out the pixels that carry the shapes."""
    if num_frames <= 0 or start_frame < 0:
        raise ValueError(f"need start_frame >= 0 and num_frames > 0, got {start_frame}, {num_frames}")
    w = scene.world
    base = background(scene)
    centres = positions(scene, start_frame, num_frames)
    video = np.empty((num_frames, w.height, w.width, 3), dtype=np.uint8)
    coverage = np.zeros((num_frames, w.height, w.width), dtype=np.float32)
    colours = [np.array(PALETTE[s.colour], dtype=np.float32) for s in scene.sprites]
    for f in range(num_frames):
        canvas = base.copy()
        for sprite, colour, (cx, cy) in zip(scene.sprites, colours, centres[f]):
            hx, hy = sprite.half_extent
            x0, x1 = max(int(cx - hx) - 1, 0), min(int(cx + hx) + 2, w.width)
            y0, y1 = max(int(cy - hy) - 1, 0), min(int(cy + hy) + 2, w.height)
            dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - np.float32(cx)
            dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - np.float32(cy)
            d = _signed_distance(sprite.shape, sprite.radius, dx, dy)
            alpha = np.clip(0.5 - d, 0.0, 1.0) if w.antialias else (d <= 0).astype(np.float32)
            patch = canvas[y0:y1, x0:x1]
            patch += alpha[..., None] * (colour - patch)
            np.maximum(coverage[f, y0:y1, x0:x1], alpha, out=coverage[f, y0:y1, x0:x1])
        video[f] = np.clip(np.rint(canvas), 0, 255)
    return video, coverage


def stream(scene: SceneSpec, chunk: int, start_frame: int = 0) -> Iterator[np.ndarray]:
    """Endless chunks of `chunk` frames; concatenated they equal one long render."""
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    while True:
        yield render(scene, start_frame, chunk)
        start_frame += chunk
