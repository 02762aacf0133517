"""Experiment tracking with MLflow: one MLflow run per training run, continued across restarts.

Without a tracking server the run lives in `<run_dir>/mlflow.db` (sqlite) with its artifacts in
`<run_dir>/mlartifacts`, so a run directory is self-contained; `mlflow ui --backend-store-uri
sqlite:///<run_dir>/mlflow.db` shows it. The MLflow run id is kept in `<run_dir>/mlflow_run_id.txt`:
a restart of the same run name continues the same MLflow run instead of starting a second one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sfpp_ray.config import TrackingConfig

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

log = logging.getLogger(__name__)

MAX_KEY_CHARS = 250  # MLflow's limit for param and metric names
MAX_PARAM_CHARS = 6000  # MLflow's limit for param values
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def sanitize_key(key: str) -> str:
    """A valid MLflow name: alphanumerics and `_ - . space /`, no empty, `.` or `..` path parts."""
    parts = [p for p in _BAD_KEY_CHARS.sub("_", str(key)).split("/") if p not in ("", ".", "..")]
    return "/".join(parts)[:MAX_KEY_CHARS] or "_"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b.c": str(value)} with MLflow-valid keys and truncated values."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[sanitize_key(key)] = str(v)[:MAX_PARAM_CHARS]
    return out


class Tracker:
    """MLflow run of one training run. With `cfg.enabled` false every method does nothing."""

    RUN_ID_FILE = "mlflow_run_id.txt"

    def __init__(self, cfg: TrackingConfig, run_dir: str | os.PathLike, run_name: str):
        self.enabled = cfg.enabled
        self.run_dir = Path(run_dir).resolve()
        self.run_name = run_name
        self.experiment = cfg.experiment
        self.tracking_uri = (cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                             or f"sqlite:///{self.run_dir / 'mlflow.db'}")
        self.run_id: str | None = None
        self._client = None
        self._monitor = None

    def start(self, params: Mapping[str, Any] | None = None, resume_run_id: str | None = None) -> str | None:
        """Open (or continue) the run and log `params`; returns the MLflow run id."""
        if not self.enabled:
            return None
        if self.run_id is not None:
            raise RuntimeError(f"tracker already started (run {self.run_id})")
        from mlflow import MlflowClient

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(self.tracking_uri)
        run_id = resume_run_id or self._stored_run_id()
        if run_id is not None and not self._run_exists(run_id):
            if resume_run_id is not None:
                raise ValueError(f"cannot resume MLflow run {resume_run_id}: not found at {self.tracking_uri}")
            log.warning("MLflow run %s from %s is gone from %s; starting a new run",
                        run_id, self.run_dir / self.RUN_ID_FILE, self.tracking_uri)
            run_id = None
        resumed = run_id is not None
        if resumed:
            self._client.update_run(run_id, status="RUNNING")
        else:
            run_id = self._client.create_run(self._experiment_id(), run_name=self.run_name).info.run_id
        self.run_id = run_id
        (self.run_dir / self.RUN_ID_FILE).write_text(run_id + "\n")
        if params:
            self.log_params(params)
        if importlib.util.find_spec("psutil") is not None:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=self.tracking_uri)
            self._monitor.start()
        log.info("MLflow run %s (%s) at %s", run_id, "resumed" if resumed else "new", self.tracking_uri)
        return run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flattened and stringified. MLflow never changes a logged value: on resume, a changed
        value keeps its first one and a warning names it."""
        if not self._active():
            return
        from mlflow.entities import Param

        logged = self._client.get_run(self.run_id).data.params
        flat = flatten(params)
        changed = {k: v for k, v in flat.items() if k in logged and logged[k] != v}
        for k, v in changed.items():
            log.warning("param %s is %r in this run but MLflow keeps the first value %r", k, v, logged[k])
        self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat.items() if k not in logged])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Numbers (python, numpy or 0-d torch) under sanitised keys; None values are skipped."""
        if not self._active():
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(sanitize_key(k), float(v), now, int(step))
                                                     for k, v in metrics.items() if v is not None])

    def last_step(self, key: str) -> int:
        """The highest step `key` was logged at in this run (0: never). A stage resumed from a checkpoint replays
        the steps after it; those logged before the interruption keep their first values, so each step is in the
        run once."""
        if not self._active():
            return 0
        return max((m.step for m in self._client.get_metric_history(self.run_id, sanitize_key(key))), default=0)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self._active():
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (`FINISHED`, `FAILED` or `KILLED`); safe to call twice."""
        if not self.enabled or self.run_id is None:
            return
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self._client.set_terminated(self.run_id, status)
        self.run_id = None

    # ------------------------------------------------------------------ helpers

    def _active(self) -> bool:
        if not self.enabled:
            return False
        if self.run_id is None:
            raise RuntimeError("Tracker.start() must come before logging")
        return True

    def _stored_run_id(self) -> str | None:
        path = self.run_dir / self.RUN_ID_FILE
        if not path.is_file():
            return None
        return path.read_text().strip() or None

    def _run_exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_run(run_id)
            return True
        except MlflowException:
            return False

    def _experiment_id(self) -> str:
        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        local = self.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in self.tracking_uri
        # A local store keeps artifacts beside the run; a server decides where its artifacts go.
        location = (self.run_dir / "mlartifacts").as_uri() if local else None
        return self._client.create_experiment(self.experiment, artifact_location=location)
