"""benchmarks/rollout_fps.py on the tiny shape: the rows asked for, and the profile's kernels of one block."""

import json

import pytest


def test_picked_rows_are_timed_and_the_profile_lists_the_heaviest_kernels_first(tmp_path, load_benchmark):
    out = tmp_path / "fps.json"
    result = load_benchmark("rollout_fps").main(["--shape", "tiny", "--device", "cpu", "--window", "6", "--latent-frames", "9",
                                 "--rows", "none,folded", "--profile", "40", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [(r["decode"], r["fold_context_pass"]) for r in result["rows"]] == [("none", False), ("none", True)]
    assert all(r["fps"] > 0 and r["video_frames"] == 9 and r["warmup_s"] > 0 for r in result["rows"])
    kernels = result["profile"]["kernels"]
    assert len(kernels) == 40 and all(k["calls"] > 0 for k in kernels)
    assert [k["ms"] for k in kernels] == sorted((k["ms"] for k in kernels), reverse=True)
    # one block of a 2-layer student: attention runs in every layer, so its calls come in pairs (the profiler names
    # the dispatched kernel or its wrapper, whichever held self time)
    calls = [k["calls"] for k in kernels if "scaled_dot_product" in k["name"]]
    assert calls and all(c % 2 == 0 for c in calls)


def test_a_run_stopped_in_a_later_mode_keeps_the_rows_timed_before_it(tmp_path, load_benchmark):
    out = tmp_path / "fps.json"
    with pytest.raises(Exception):  # an unknown compile mode fails in its warm-up, as a killed compile would stop there
        load_benchmark("rollout_fps").main(["--shape", "tiny", "--device", "cpu", "--window", "6", "--latent-frames", "6",
                            "--rows", "none", "--compile", "none,no-such-mode", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [(r["compile"], r["decode"]) for r in saved["rows"]] == [("none", "none")]
    assert saved["rows"][0]["warmup_s"] > 0 and saved["profile"] is None
