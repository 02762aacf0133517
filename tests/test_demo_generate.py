"""The README's one command on the shipped world student: a short video of moving sprites, on the CPU."""

import json
from pathlib import Path

import numpy as np
import pytest

from sfpp_ray.video_io import read_video

ROOT = Path(__file__).resolve().parents[1]


def test_readme_and_demo_script_run_the_benchmarked_command(load_benchmark):
    line = load_benchmark("generate_cpu").readme_command()
    assert line in (ROOT / "README.md").read_text()
    assert line in (ROOT / "scripts" / "demo.sh").read_text()


@pytest.mark.skipif(not (ROOT / "weights" / "world_student" / "config.json").is_file(),
                    reason="weights/world_student (the shipped student) is not in this checkout")
def test_demo_command_streams_moving_sprites_from_the_shipped_student(tmp_path, load_benchmark):
    script = load_benchmark("generate_cpu")
    # one thread: two OpenMP threads spin at every op's barrier when other work holds a core, which makes this
    # short stream minutes long on a busy two-core machine (docs/benchmarks.md)
    result = script.main(["--seconds", "2", "--threads", "1", "--video", str(tmp_path / "demo.mp4"),
                          "--out", str(tmp_path / "b.json")])
    assert result["env"]["OMP_NUM_THREADS"] == "1"
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads(json.dumps(result))
    row = result["rows"][0]
    assert row["video_frames"] == 33 and row["latent_frames"] == 33  # 32 frames at 16 fps, whole 3-frame blocks
    frames = read_video(tmp_path / "demo.mp4").astype(np.float32)
    assert frames.shape == (33, 32, 32, 3)
    steps = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
    assert (steps > 0).all()  # every frame differs from the one before: the content moves
    # ...and smoothly: neighbouring frames are closer than frames a second apart (noise would not be)
    assert steps.mean() < np.abs(frames[16:] - frames[:-16]).mean()
    assert frames.std() > 5  # not a flat image
