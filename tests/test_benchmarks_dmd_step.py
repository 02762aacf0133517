"""benchmarks/dmd_step.py on the tiny shape: both step kinds timed and their FLOPs counted, attention included."""

import json

import torch


def test_tiny_shape_times_and_counts_both_steps(tmp_path, load_benchmark):
    out = tmp_path / "dmd_step.json"
    result = load_benchmark("dmd_step").main(["--shape", "tiny", "--steps", "1", "--warmup", "0", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["kind"]: r for r in result["rows"]}
    assert set(rows) == {"critic", "generator"}
    for r in rows.values():
        assert r["seconds"] > 0 and r["flops"] > 0 and r["mfu"] is None  # no MFU without a GPU peak
        assert 0 < r["attention_flop_share"] < 1  # the CPU attention kernel is counted
    # the generator step runs the student (with gradient), the teacher twice and the critic forward
    assert rows["generator"]["flops"] > rows["critic"]["flops"]
    assert result["setting"]["window"][2] == 6 and result["setting"]["context_frames"] == 6


def test_an_out_of_memory_flop_count_keeps_the_time_and_says_why(tmp_path, monkeypatch, load_benchmark):
    """Counting FLOPs re-runs the step under FlopCounterMode, which holds more memory than the step itself: running
    out there must not lose the timed steps."""
    script = load_benchmark("dmd_step")

    class OutOfMemoryCounter(script.FlopCounterMode):
        def __enter__(self):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 58.00 MiB.")

    monkeypatch.setattr(script, "FlopCounterMode", OutOfMemoryCounter)
    result = script.main(["--shape", "tiny", "--steps", "1", "--warmup", "0", "--out", str(tmp_path / "r.json")])
    for r in result["rows"]:
        assert r["seconds"] > 0 and r["flops"] is None and r["tflops_per_s"] is None
        assert r["flops_error"].startswith("out of memory under FlopCounterMode: CUDA out of memory")
