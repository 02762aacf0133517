"""How often the composition metric's shape classifier is right on real sprites: scenes of one sprite
each (so every component's true shape is known), classified frame by frame exactly as the metric does
(palette segmentation, then how much of its bounding box a component fills). Prints the confusion per
true shape and sprite radius (last) and writes JSON.

    python experiments/shape_classifier.py --out shape_classifier.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from sfpp_ray.evaluation.metrics import find_sprites
from sfpp_ray.world.sprites import PALETTE, SHAPES, WorldSpec, render, sample_scenes

def confusion(scenes: int, size: int, frames: int, seed: int) -> dict[tuple[str, int], np.ndarray]:
    """(true shape, radius rounded to pixels) -> frames classified as each of SHAPES."""
    world = WorldSpec(height=size, width=size, fps=16, sprite_count=(1, 1))
    counts: dict[tuple[str, int], np.ndarray] = {}
    for scene in sample_scenes(seed, scenes, "train", world):
        sprite = scene.sprites[0]
        _, kinds = find_sprites(render(scene, 0, frames))
        own = kinds.reshape(frames, len(PALETTE), len(SHAPES))[:, list(PALETTE).index(sprite.colour)].sum(0)
        key = (sprite.shape, int(round(sprite.radius)))
        counts[key] = counts.get(key, np.zeros(len(SHAPES), np.int64)) + own
    return counts


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=300)
    p.add_argument("--size", type=int, default=32, help="video side in pixels (configs/world_gpu.yaml: 32)")
    p.add_argument("--frames", type=int, default=21)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    counts = confusion(args.scenes, args.size, args.frames, args.seed)
    rows = []
    for shape in SHAPES:
        for key in sorted(k for k in counts if k[0] == shape) + [(shape, None)]:
            c = counts[key] if key[1] is not None else sum(v for k, v in counts.items() if k[0] == shape)
            rows.append({"shape": shape, "radius_px": key[1], **{f"as_{s}": int(n) for s, n in zip(SHAPES, c)},
                         "correct": float(c[SHAPES.index(shape)] / max(1, c.sum()))})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    print(f"{'true shape':<10}{'radius':>8}" + "".join(f"{'as ' + s:>12}" for s in SHAPES) + f"{'correct':>10}")
    for r in rows:
        radius = "all" if r["radius_px"] is None else r["radius_px"]
        found = "".join(f"{r['as_' + s]:>12}" for s in SHAPES)
        print(f"{r['shape']:<10}{radius:>8}{found}{r['correct']:>10.2f}")
    return rows


if __name__ == "__main__":
    main()
