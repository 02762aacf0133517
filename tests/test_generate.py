"""`sfpp-ray generate` on the tiny config writes a playable video of the expected length."""

import json
from pathlib import Path

import pytest


from sfpp_ray.cli import main
from sfpp_ray.config import load_config
from sfpp_ray.generate import generate
from sfpp_ray.video_io import read_video

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_generate_cli_writes_a_playable_mp4_20x_the_teacher_horizon(tmp_path, capsys):
    cfg = load_config(TINY)
    horizon_s = cfg.video.teacher_frames / cfg.video.fps  # tiny codec: one video frame per latent frame
    out = tmp_path / "video.mp4"
    assert main(["generate", "--config", str(TINY), "--prompt", "two red squares bouncing",
                 "--seconds", str(20 * horizon_s), "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    frames = read_video(out)
    assert frames.shape == (20 * cfg.video.teacher_frames, cfg.video.height, cfg.video.width, 3)
    assert result["video_frames"] == frames.shape[0]


def test_generate_is_deterministic_by_seed_and_prompt(tmp_path):
    cfg = load_config(TINY, ["rollout.decode_overlap=false"])
    a = read_video(generate(cfg, "a blue circle", 1.5, tmp_path / "a.gif", seed=3, progress=False)["path"])
    b = read_video(generate(cfg, "a blue circle", 1.5, tmp_path / "b.gif", seed=3, progress=False)["path"])
    c = read_video(generate(cfg, "a blue circle", 1.5, tmp_path / "c.gif", seed=4, progress=False)["path"])
    assert (a == b).all() and not (a == c).all()


@pytest.mark.parametrize("prompt,seconds", [(" ", 1.0), ("x", 0.0), ("x", -2.0)])
def test_bad_generate_input_is_refused(tmp_path, prompt, seconds):
    with pytest.raises(ValueError):
        generate(load_config(TINY), prompt, seconds, tmp_path / "x.mp4", progress=False)
