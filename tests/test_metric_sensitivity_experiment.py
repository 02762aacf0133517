"""experiments/metric_sensitivity.py: the table it prints and writes says what docs/notes/metrics.md and
docs/notes/teacher_runs.md rely on, on fresh scenes: colour drift grows with a shift of every pixel and stays
near what the shift moves, while the earlier binned distance jumps on shifts nobody can see; blur raises the
composition error."""

import json
import random


def test_colour_drift_follows_the_shift_and_the_binned_one_does_not(tmp_path, load_experiment):
    module = load_experiment("metric_sensitivity")
    out = tmp_path / "sensitivity.json"
    seed = random.SystemRandom().randrange(2**31)
    rows = {r["change"]: r for r in module.main(["--scenes", "6", "--size", "32", "--frames", "12",
                                                 "--seed", str(seed), "--out", str(out)])}
    assert json.loads(out.read_text())["rows"] == list(rows.values())
    drift = [rows[k]["colour_drift"] for k in ("none", "+4 levels", "+8 levels", "+25 levels")]
    assert drift == sorted(drift) and drift[-1] > 0.05
    for levels in (2, 4, 8):
        moved = rows[f"+{levels} levels"]["colour_drift"] - rows["none"]["colour_drift"]
        assert 0 < moved < 1.5 * levels / 255
    binned_jump = rows["+4 levels"]["binned_colour_drift"] - rows["none"]["binned_colour_drift"]
    assert binned_jump > 5 * (rows["+4 levels"]["colour_drift"] - rows["none"]["colour_drift"])
    assert rows["grey (no colour)"]["colour_drift"] > rows["+4 levels"]["colour_drift"]
    # Soft edges move the shape classes. Half a pixel is within the scene-to-scene spread of six
    # scenes, so only a full pixel is held to be worse than both.
    shapes = {k: rows[k]["composition_error"] for k in ("none", "blur, sigma 0.5 px", "blur, sigma 1 px")}
    assert shapes["blur, sigma 1 px"] > max(shapes["none"], shapes["blur, sigma 0.5 px"])
