"""`evaluate` streams held-out prompts, scores segments against the world, writes JSON and a plot."""

import json
from pathlib import Path

from sfpp_ray.config import load_config
from sfpp_ray.evaluation.evaluate import evaluate

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def test_evaluate_writes_table_json_plot_and_examples(tmp_path):
    cfg = load_config(TINY, ["evaluation.num_prompts=1", "evaluation.horizons=[1,3]", f"run.output_dir={tmp_path}"])
    result = evaluate(cfg, out_dir=tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(saved["table"]) == {"1", "3"} and saved["horizon_frames"] == 6
    long = [r for r in result["rows"] if r["horizon"] == 3][0]
    assert long["num_frames"] == 18 and long["num_segments"] == 3
    assert 0 <= long["stability"] <= 100
    assert (tmp_path / "eval" / "stability_over_time.png").stat().st_size > 0
    assert (tmp_path / "eval" / "example_3x.gif").exists()
