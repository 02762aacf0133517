"""`evaluate` streams held-out prompts, scores segments against the world, writes JSON and a plot."""

import json
from pathlib import Path

import numpy as np

from sfpp_ray.config import load_config
from sfpp_ray.evaluation.evaluate import evaluate

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def test_evaluate_writes_table_json_plot_and_examples_and_says_where(tmp_path, capsys):
    cfg = load_config(TINY, ["evaluation.num_prompts=1", "evaluation.horizons=[1,3]", f"run.output_dir={tmp_path}"])
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "example_7x.gif").write_bytes(b"")  # an earlier evaluation's: not this one's output
    result = evaluate(cfg, out_dir=tmp_path / "eval")
    out = tmp_path / "eval"
    gifs = [out / "example_1x.gif", out / "example_3x.gif"]
    assert result["outputs"] == {"metrics": str(out / "metrics.json"), "plot": str(out / "stability_over_time.png"),
                                 "gifs": [str(f) for f in gifs]}
    assert all(f.stat().st_size > 0 for f in gifs)
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"student: wrote {out / 'metrics.json'}, {out / 'stability_over_time.png'} and gifs example_1x.gif, "
        f"example_3x.gif in {out}")
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(saved["table"]) == {"1", "3"} and saved["horizon_frames"] == 6
    long = [r for r in result["rows"] if r["horizon"] == 3][0]
    assert long["num_frames"] == 18 and long["num_segments"] == 3
    assert 0 <= long["stability"] <= 100
    # GRPO's reward of each whole video, as the GRPO stage scores its rollouts: the same prompt's stream made again
    from sfpp_ray.algorithm.reward import flow_reward
    from sfpp_ray.components import world_of
    from sfpp_ray.evaluation.evaluate import FrameList
    from sfpp_ray.generate import VideoGenerator
    from sfpp_ray.seeding import seed_for
    from sfpp_ray.world.sprites import prompt, sample_scenes

    frames = FrameList()
    (scene,) = sample_scenes(cfg.evaluation.seed, 1, "heldout", world_of(cfg))
    VideoGenerator(cfg).stream(prompt(scene), 3 * cfg.video.teacher_frames, frames,
                               seed=seed_for(cfg.evaluation.seed, "evaluation", 0))
    again = flow_reward(frames.video(), cfg.grpo.min_motion, cfg.grpo.reward, cfg.grpo.raft_weights)
    assert np.isfinite(again) and abs(long["flow_reward"] - again) < 1e-6
    assert saved["table"]["3"]["flow_reward"] == long["flow_reward"]
    (curve,) = saved["stability_by_segment"]  # the longest horizon's segments: their mean is its stability
    assert len(curve) == 3 and abs(np.mean(curve) - long["stability"]) < 1e-9
    assert (tmp_path / "eval" / "stability_over_time.png").stat().st_size > 0
    assert (tmp_path / "eval" / "example_3x.gif").exists()


def test_long_stream_scores_its_last_segment_and_tells_a_world_from_a_collapse(tmp_path, monkeypatch):
    from sfpp_ray.evaluation import evaluate as ev_module

    cfg = load_config(TINY, ["evaluation.num_prompts=1", "evaluation.horizons=[1]", "evaluation.long_stream=4",
                             f"run.output_dir={tmp_path}"])
    result = evaluate(cfg, out_dir=tmp_path / "eval")["long_stream"]
    assert result["horizon"] == 4 and result["video_frames"] == 24
    assert result["stability_last"] == result["last_segment"]["stability"] and 0 <= result["stability_last"] <= 100
    assert (tmp_path / "eval" / "long_4x_last.gif").exists()
    assert not result["collapsed"], result  # an untrained student's noise is no world, but it is not blank or frozen

    def blank_stream(self, prompt, num_latent_frames, sink, seed, progress=False):  # a student that went black
        sink.append(np.zeros((self.codec.video_frames(num_latent_frames), 16, 16, 3), np.uint8))
        return {}

    monkeypatch.setattr(ev_module.VideoGenerator, "stream", blank_stream)
    blank = ev_module.long_stream(ev_module.VideoGenerator(cfg), cfg, ev_module.sample_scenes(1, 1, "heldout", ev_module.world_of(cfg))[0], 4,
                                  tmp_path)
    assert blank["collapsed"] and blank["pixel_std"] == 0 and blank["change"] == 0


def test_prompts_streamed_in_a_batch_score_as_streamed_one_at_a_time(tmp_path):
    import pytest

    scores = {}
    for batch in (1, 3):
        cfg = load_config(TINY, ["evaluation.num_prompts=3", "evaluation.horizons=[2]", f"evaluation.batch_size={batch}",
                                 "rollout.decode_overlap=false", f"run.output_dir={tmp_path}"])
        scores[batch] = [r["stability"] for r in evaluate(cfg, out_dir=tmp_path / f"b{batch}")["rows"]]
    assert scores[3] == pytest.approx(scores[1], abs=0.5)
