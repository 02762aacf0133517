"""The whole Self-Forcing++ system on a local Ray cluster: rollout workers, buffer, Ray Data,
DeepSpeed trainers, weight sync, checkpoint/resume and MLflow, at toy size on CPU."""

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from sfpp_ray import components
from sfpp_ray.config import load_config
from sfpp_ray.distributed.controller import _registered_resume_state
from sfpp_ray.distributed.engine import STATE_FILE
from sfpp_ray.distributed.weight_sync import state_checksum

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"


def tiny(tmp_path: Path, name: str, steps: int, zero_stage: int = 2, *overrides: str):
    """Strictly on-policy (max_staleness 0): a publish refuses every older pending sample, so each
    worker moves to the new weights at once instead of waiting for buffer room."""
    return load_config(CONFIG, [
        f"run.name={name}", f"run.output_dir={tmp_path}", "run.stages=[dmd]",
        "rollout.num_frames=12", "rollout.num_workers=2", "rollout.cpus_per_worker=0.5",
        "trainer.num_workers=2", f"trainer.zero_stage={zero_stage}", "trainer.checkpoint_every=1", "buffer.max_staleness=0",
        f"dmd.steps={steps}", "dmd.update_ratio=1", "tracking.experiment=sfpp-e2e", *overrides,
    ])


def check_weight_sync(summary: dict, first_version: int, last_version: int, saved_average) -> None:
    """Versions advance with each sync, and after every sync a worker's weights are the trainers'. The run
    saved the moving average its last checkpoint holds, not the last published policy."""
    published = dict(summary["published"])
    assert sorted(published) == list(range(first_version, last_version + 1))
    applied = [a for stats in summary["rollout"] for a in stats["applied"]]
    assert applied, "no rollout worker picked up new weights"
    for stats in summary["rollout"]:
        versions = [v for v, _ in stats["applied"]]
        assert versions == sorted(set(versions))
        for version, checksum in stats["applied"]:
            assert checksum == published[version]
    (last,) = [d for d in Path(summary["checkpoints"]).glob("checkpoint_*/")
               if torch.load(d / STATE_FILE, weights_only=False)["step"] == last_version]
    average = saved_average(last, components.build_student(summary["cfg"]))
    assert summary["student_checksum"] == state_checksum(average) != published[last_version]


def run(cfg, evaluation_video: bool = True) -> dict:
    """train(), plus the checksum of the student it saved (a resumed run overwrites the directory)."""
    from sfpp_ray.distributed.controller import train

    summary = train(cfg, evaluation_video=evaluation_video)
    student = components.build_student(cfg, checkpoint=summary["student"])
    return summary | {"student_checksum": state_checksum(student), "cfg": cfg}


@pytest.fixture(scope="module")
def zero2_runs(ray_cluster, tmp_path_factory):
    """One run stopped after step 2, then the same run name resumed to step 3, keeping the 2 newest checkpoints."""
    out = tmp_path_factory.mktemp("e2e")
    return (run(tiny(out, "z2", 2, 2, "trainer.keep_checkpoints=2")),
            run(tiny(out, "z2", 3, 2, "trainer.keep_checkpoints=2")))


def test_zero2_trains_and_syncs_weights(zero2_runs, saved_average):
    first, _ = zero2_runs
    assert first["steps"] == (0, 2) and first["metrics"]["step"] == 2
    assert sum(s["samples"] for s in first["rollout"]) >= 2
    check_weight_sync(first, 1, 2, saved_average)


def test_resume_continues_at_next_step_in_same_mlflow_run(zero2_runs, saved_average):
    first, second = zero2_runs
    assert second["steps"] == (2, 3) and second["metrics"]["step"] == 3
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    check_weight_sync(second, 2, 3, saved_average)
    # Version 2 is republished on resume from the checkpoint: the very weights the first run ended with
    # (it saved their moving average as the student, and the resumed run averages on from there).
    assert dict(second["published"])[2] == dict(first["published"])[2] != first["student_checksum"]
    saved = _registered_resume_state(Path(second["checkpoints"]))  # what a rerun would go on from
    assert saved["step"] == 3 and saved["ranks"] == 2 and saved["zero_stage"] == 2
    # trainer.keep_checkpoints: step 1's checkpoint was deleted on disk, not only forgotten
    kept = sorted(Path(second["checkpoints"]).glob("checkpoint_*/"))
    assert sorted(torch.load(d / STATE_FILE, weights_only=False)["step"] for d in kept) == [2, 3]


def test_mlflow_holds_params_loss_curve_and_video(zero2_runs):
    _, second = zero2_runs
    client = MlflowClient(second["mlflow_uri"])
    run = client.get_run(second["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.zero_stage"] == "2" and run.data.params["run.name"] == "z2"
    for key in ("loss/critic", "loss/generator"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3]
    assert {"rollout/fps", "buffer/fill", "time/step", "time/sync"} <= set(run.data.metrics)
    assert run.data.metrics["rollout/fps"] > 0
    # On-policy (max_staleness 0, a sync every step): whatever Ray Data fetched ahead, every window trained on
    # came from the weights of the step before; older rows were made again.
    staleness = client.get_metric_history(run.info.run_id, "data/staleness")
    assert [m.step for m in staleness] == [1, 2, 3] and {m.value for m in staleness} == {0.0}
    assert "data/replaced_stale" in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id, "videos")] == ["videos/eval.mp4"]
    assert len(client.search_runs([run.info.experiment_id])) == 1


LEAN = ("rollout.num_workers=1", "tracking.enabled=false")  # for runs that check neither MLflow nor two workers


def test_zero3_trains_and_syncs_weights(ray_cluster, tmp_path, saved_average):
    summary = run(tiny(tmp_path, "z3", 2, 3, *LEAN), evaluation_video=False)
    assert summary["metrics"]["step"] == 2
    check_weight_sync(summary, 1, 2, saved_average)  # each rank averaged its partitions; together: the student


def test_without_a_moving_average_the_saved_student_is_the_last_published(ray_cluster, tmp_path):
    """Also trainer.checkpoint_every=0: no checkpoint along the way, one at the end."""
    summary = run(tiny(tmp_path, "no_ema", 2, 2, "trainer.ema_decay=0", "trainer.checkpoint_every=0", *LEAN),
                  evaluation_video=False)
    assert summary["metrics"]["step"] == 2
    saved = [torch.load(d / STATE_FILE, weights_only=False)["step"]
             for d in Path(summary["checkpoints"]).glob("checkpoint_*/")]
    assert saved == [2]
    assert summary["student_checksum"] == dict(summary["published"])[2] != dict(summary["published"])[1]


def test_load_prompts_keeps_good_lines_and_says_why(tmp_path, capsys):
    from sfpp_ray.distributed.prompts import load_prompts

    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_bytes(b'{"prompt": "a fox runs"}\n\n{"prompt": \n{"text": "x"}\n{"prompt": "' + b"y" * 50
                      + b'"}\n{"prompt": "caf\xe9"}\n\xff\xfe\n{"prompt": "  rain  "}\n')
    prompts, report = load_prompts(jsonl, max_chars=20)
    assert prompts == ["a fox runs", "rain"]
    assert report["kept"] == 2 and report["rejected"] == 6
    assert report["reasons"] == {"empty": 1, "bad json": 1, "no string 'prompt' field": 1,
                                 "longer than 20 chars": 1, "not utf-8": 2}
    assert report["examples"]["not utf-8"] == [6, 7]  # latin-1 "café" and stray bytes
    assert "2 kept, 6 rejected" in capsys.readouterr().out

    txt = tmp_path / "prompts.txt"
    txt.write_text("one\n\n   \ntwo\n")
    assert load_prompts(txt, max_chars=20)[0] == ["one", "two"]
    txt.write_text("\n\n")
    with pytest.raises(ValueError, match="no usable prompt"):
        load_prompts(txt, max_chars=20)
    csv = tmp_path / "prompts.csv"
    csv.write_text("one\n")
    with pytest.raises(ValueError, match="expected .txt"):
        load_prompts(csv, max_chars=20)
    assert load_prompts(None, max_chars=20)[1]["source"] == "built-in"


def test_prompt_feed_cycles_and_resumes(ray_cluster):
    import ray

    from sfpp_ray.distributed.prompts import PromptFeed

    feed = PromptFeed.remote(["a", "b"])
    assert [ray.get(feed.next.remote()) for _ in range(3)] == [(0, "a"), (1, "b"), (0, "a")]
    assert ray.get(feed.position.remote()) == 3
    ray.get(feed.seek.remote(1))
    assert ray.get(feed.next.remote()) == (1, "b")


def test_prompt_feed_hands_a_restarted_workers_prompts_out_again(ray_cluster):
    import ray

    from sfpp_ray.distributed.prompts import PromptFeed

    prompts = [f"p{i}" for i in range(5)]
    feed = PromptFeed.remote(prompts)
    taken = [ray.get(feed.next.remote(w)) for w in (0, 1, 0, 1)]
    ray.get(feed.done.remote(0, [taken[0][0]]))  # worker 0's first sample reached the buffer, its second did not
    assert ray.get(feed.restarted.remote(0)) == 1
    state = ray.get(feed.state_dict.remote())
    assert state == {"position": 4, "again": [2, 1, 3], "worker_restarts": 1, "lost_in_flight": 1}
    assert ray.get(feed.next.remote(1)) == (2, "p2")  # the lost prompt first, then new ones
    assert ray.get(feed.next.remote(1)) == (4, "p4")
    resumed = PromptFeed.remote(prompts)
    ray.get(resumed.load_state_dict.remote(state))  # prompts in flight at a checkpoint come again on resume
    assert [ray.get(resumed.next.remote())[0] for _ in range(4)] == [2, 1, 3, 4]
    assert ray.get(resumed.stats.remote()) == {"position": 5, "worker_restarts": 1, "lost_in_flight": 1}
