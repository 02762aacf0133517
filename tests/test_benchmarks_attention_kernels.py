"""benchmarks/attention_kernels.py on the tiny config: the call's shape is the student's, every kernel asked for gets
a row, timed with its error or saying why it cannot run."""

import json
from pathlib import Path

import pytest

from sfpp_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_each_kernel_is_timed_against_float32_or_says_why_not(tmp_path, load_benchmark):
    out = tmp_path / "attention.json"
    result = load_benchmark("attention_kernels").main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--device", "cpu",
                                 "--kernels", "math,flash,cudnn", "--repeats", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    cfg = load_config(ROOT / "configs" / "tiny.yaml")  # 16x16 video, codec factor 2, 2x2 patches: 16 tokens a frame
    assert result["shape"] == {"heads": cfg.model.num_attention_heads, "head_dim": cfg.model.attention_head_dim,
                               "queries": 16 * cfg.student.frames_per_block, "keys": 16 * cfg.student.window_frames}
    math, flash, cudnn = result["rows"]
    for row in (math, flash):
        assert row["ms"] > 0 and row["tflops"] > 0
        assert 0 < row["max_abs_error"] < 2e-2  # bfloat16 against float32: close, not equal
    assert cudnn["kernel"] == "cudnn" and "RuntimeError" in cudnn["unavailable"]  # no cuDNN on a CPU


def test_an_unknown_kernel_is_refused_naming_it(capsys, load_benchmark):
    with pytest.raises(SystemExit):
        load_benchmark("attention_kernels").main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--device", "cpu", "--kernels", "fa9"])
    assert "--kernels: unknown ['fa9']" in capsys.readouterr().err
