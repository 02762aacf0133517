"""experiments/shape_classifier.py on fresh scenes: it writes what it returns, and its counts say what
docs/notes/teacher_runs.md relies on: squares are recognised, and every true shape is found more often right
than wrong."""

import json
import random


def test_confusion_of_the_shape_classifier_on_real_sprites(tmp_path, load_experiment):
    module = load_experiment("shape_classifier")
    out, frames = tmp_path / "shapes.json", 6
    seed = random.SystemRandom().randrange(2**31)
    rows = module.main(["--scenes", "40", "--frames", str(frames), "--seed", str(seed), "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == rows
    totals = {r["shape"]: r for r in rows if r["radius_px"] is None}
    per_radius = [r for r in rows if r["radius_px"] is not None]
    for shape, total in totals.items():  # the "all" row sums its shape's radii
        parts = [r for r in per_radius if r["shape"] == shape]
        assert all(total[k] == sum(r[k] for r in parts) for k in ("as_circle", "as_square", "as_triangle"))
        assert total["correct"] > 0.5
    counted = sum(r[k] for r in totals.values() for k in ("as_circle", "as_square", "as_triangle"))
    assert 0.9 * 40 * frames <= counted <= 1.1 * 40 * frames  # about one component a frame: one sprite a scene
    assert all(r["correct"] >= 0.95 for r in per_radius if r["shape"] == "square" and r["radius_px"] >= 4)
