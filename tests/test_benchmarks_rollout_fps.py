"""benchmarks/rollout_fps.py on the tiny shape: the rows asked for, and the profile's kernels of one block."""

import importlib.util
import json
from pathlib import Path


def load_script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "rollout_fps.py"
    spec = importlib.util.spec_from_file_location("rollout_fps", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_picked_rows_are_timed_and_the_profile_lists_the_heaviest_kernels_first(tmp_path):
    out = tmp_path / "fps.json"
    result = load_script().main(["--shape", "tiny", "--device", "cpu", "--window", "6", "--latent-frames", "9",
                                 "--rows", "none,folded", "--profile", "40", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [(r["decode"], r["fold_context_pass"]) for r in result["rows"]] == [("none", False), ("none", True)]
    assert all(r["fps"] > 0 and r["video_frames"] == 9 for r in result["rows"])
    kernels = result["profile"]["kernels"]
    assert len(kernels) == 40 and all(k["calls"] > 0 for k in kernels)
    assert [k["ms"] for k in kernels] == sorted((k["ms"] for k in kernels), reverse=True)
    # one block of a 2-layer student: its attention calls come in pairs, one a layer
    calls = [k["calls"] for k in kernels if k["name"] == "aten::scaled_dot_product_attention"]
    assert len(calls) == 1 and calls[0] % 2 == 0
