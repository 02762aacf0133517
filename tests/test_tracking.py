import numpy as np
import torch
from mlflow import MlflowClient

from sfpp_ray.config import TrackingConfig
from sfpp_ray.tracking import Tracker, flatten, sanitize_key


def test_run_roundtrip_and_resume(tmp_path):
    run_dir = tmp_path / "outputs" / "tiny"
    params = {"trainer": {"zero_stage": 2, "betas": [0.0, 0.999]}, "run": {"name": "tiny"},
              "data": {"prompts": None, "note": "x" * 7000}}
    tracker = Tracker(TrackingConfig(experiment="sfpp-test"), run_dir, "tiny")
    run_id = tracker.start(params)
    assert (run_dir / "mlflow_run_id.txt").read_text().strip() == run_id
    tracker.log_metrics({"loss/generator": 1.5, "loss/critic": np.float32(0.25), "lr (gen)": torch.tensor(2e-6)},
                        step=0)
    tracker.log_metrics({"loss/generator": 1.0, "buffer:fill": 3, "skipped": None}, step=1)
    video = tmp_path / "sample.gif"
    video.write_bytes(np.random.default_rng(0).bytes(256))
    tracker.log_artifact(video, artifact_path="videos")
    tracker.finish()

    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params["trainer.zero_stage"] == "2" and run.data.params["trainer.betas"] == "[0.0, 0.999]"
    assert run.data.params["data.prompts"] == "None" and len(run.data.params["data.note"]) == 6000
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss/generator")] == [(0, 1.5), (1, 1.0)]
    assert set(run.data.metrics) >= {"loss/critic", "lr _gen_", "buffer_fill"}
    assert [a.path for a in client.list_artifacts(run_id, "videos")] == ["videos/sample.gif"]
    artifact_location = client.get_experiment(run.info.experiment_id).artifact_location
    assert artifact_location.startswith((run_dir / "mlartifacts").resolve().as_uri())

    resumed = Tracker(TrackingConfig(experiment="sfpp-test"), run_dir, "tiny")
    assert resumed.start({**params, "run": {"name": "tiny", "seed": 1}}) == run_id
    # What a resumed stage asks before logging: the last step each key holds (a replayed step is not logged again).
    assert resumed.last_step("loss/generator") == 1 and resumed.last_step("buffer:fill") == 1
    assert resumed.last_step("never/logged") == 0
    resumed.log_metrics({"loss/generator": 0.5}, step=2)
    resumed.finish()
    history = client.get_metric_history(run_id, "loss/generator")
    assert [m.step for m in history] == [0, 1, 2]
    assert client.get_run(run_id).data.params["run.seed"] == "1"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_disabled_tracker_is_a_no_op(tmp_path):
    tracker = Tracker(TrackingConfig(enabled=False), tmp_path, "off")
    assert tracker.start({"a": 1}) is None
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.log_artifact(tmp_path / "missing.txt")
    tracker.finish()
    assert list(tmp_path.iterdir()) == []


def test_keys_are_made_valid():
    assert sanitize_key("loss/gen (dmd)@k=1") == "loss/gen _dmd__k_1"
    assert sanitize_key("/a//../b/./c/") == "a/b/c"
    assert sanitize_key("x" * 300) == "x" * 250
    assert flatten({"a": {"b": {"c": 1}, "d": {}}, "e": [1]}) == {"a.b.c": "1", "a.d": "{}", "e": "[1]"}
