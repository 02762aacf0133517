"""experiments/interactive_start.py: the switch and image-start table from a saved student, and its sprite measure."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sfpp_ray import components
from sfpp_ray.config import load_config
from sfpp_ray.world.sprites import WorldSpec, render, sample_scenes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def experiment(load_experiment):
    return load_experiment("interactive_start")


def test_a_video_of_the_image_keeps_its_sprites_and_another_scene_does_not(experiment):
    a, b = sample_scenes(int(np.random.randint(10**6)), 2, world=WorldSpec(height=32, width=32))
    image, other = render(a, 0, 1)[0], render(b, 0, 8)
    kept = experiment.image_sprites([np.repeat(image[None], 8, 0)], [image], 8)
    assert kept == {"image_count_error": 0.0, "image_mix_error": 0.0}
    moved = experiment.image_sprites([other], [image], 8)
    assert moved["image_count_error"] > 0 or moved["image_mix_error"] > 0


def test_the_table_is_measured_from_a_saved_student(experiment, tmp_path, capsys):
    components.build_student(load_config(ROOT / "configs" / "tiny.yaml")).save_pretrained(tmp_path / "student")
    out = tmp_path / "r.json"
    result = experiment.main(["--student", str(tmp_path / "student"), "--config", str(ROOT / "configs" / "tiny.yaml"),
                              "--pairs", "2", "--before", "1", "--after", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["switch"]) == {"switch, keep", "switch, recache", "fresh start"}
    assert set(result["image_start"]) == {"fresh start", "image start (still)", "image start (clip)"}
    for row in result["switch"].values():
        assert all(math.isfinite(row[part]["stability"]) for part in ("first", "all"))
    assert result["switch"]["switch, keep"] != result["switch"]["switch, recache"]
    assert "switch, recache" in capsys.readouterr().out
