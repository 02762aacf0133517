"""The run's terminal: one progress line per stage on the driver, the libraries' output in the run's log file.

A worker's output reaches the driver only through Ray's log stream (log_to_driver), which a quiet run writes to
run_dir/logs/train.log; so a stage's rank 0 writes its step and loss to a small file in the run directory (shared
storage, as the stage outputs are) and a thread on the driver turns it into the stage's progress line: a tqdm bar
on a terminal, else a plain line every tenth of the stage (no carriage returns in a file or a pipe)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

LOG_FILE = "logs/train.log"
PROGRESS_FILE = "logs/progress_{stage}.json"
WRITE_EVERY_S = 0.5  # rank 0 rewrites its progress file at most this often, and at the last step
POLL_S = 0.5
# Loggers a quiet run writes to the log file instead of the terminal (the driver's own; workers' go with their output)
LIBRARY_LOGGERS = ("ray", "mlflow", "alembic", "deepspeed", "DeepSpeed", "torch", "py.warnings", "filelock", "urllib3",
                   "sfpp_ray")
RAY_PRINTER = "ray_print_logs"  # the handler ray.init(log_to_driver=True) adds to the driver's worker-output stream

_last_write: dict[str, float] = {}


def report_progress(run_dir: str | os.PathLike, stage: str, step: int, total: int, **values: float | None) -> None:
    """From a stage's rank 0 after each step: its step and a few values (a loss), for the driver's progress line."""
    now = time.monotonic()
    if step < total and now - _last_write.get(stage, -WRITE_EVERY_S) < WRITE_EVERY_S:
        return
    _last_write[stage] = now
    path = Path(run_dir) / PROGRESS_FILE.format(stage=stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"step": step, "total": total, "values": {k: v for k, v in values.items()
                                                                          if v is not None}}))
    os.replace(tmp, path)  # the driver never reads half a file


def clock(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class StageProgress:
    """The driver's progress line for one stage, read from its rank 0's progress file until `close`."""

    def __init__(self, run_dir: str | os.PathLike, stage: str, total: int, stream=None):
        self.path = Path(run_dir) / PROGRESS_FILE.format(stage=stage)
        self.path.unlink(missing_ok=True)  # an earlier run's: the line shows this run's steps
        self.stage, self.total, self.stream = stage, total, stream or sys.stdout
        self.step, self.values, self.first, self.shown_tenth = 0, {}, None, -1
        self.bar = None
        if self.stream.isatty() and importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=stage, unit="step", file=self.stream, dynamic_ncols=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True, name=f"progress-{stage}")
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            self.read()

    def read(self) -> None:
        try:
            state = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):  # not written yet
            return
        if state["step"] > self.step:
            self.show(state["step"], state["values"])

    def show(self, step: int, values: dict, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.first is None:  # a resumed stage starts past 0: the rate counts the steps seen here
            self.first = (step, now)
        self.step, self.values = step, values
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()})
            return
        tenth = step * 10 // max(1, self.total)
        if tenth > self.shown_tenth:
            self.shown_tenth = tenth
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float) -> str:
        parts = [f"[{self.stage}] step {self.step}/{self.total} ({100 * self.step // max(1, self.total)}%)"]
        parts += [f"{k} {v:.4g}" for k, v in self.values.items()]
        step0, t0 = self.first
        if self.step > step0 and now > t0:
            rate = (self.step - step0) / (now - t0)
            parts.append(f"{rate:.3g} steps/s")
            if self.step < self.total:
                parts.append(f"ETA {clock((self.total - self.step) / rate)}")
        return "  ".join(parts)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.read()  # the last step, written as the stage ended
        if self.bar is not None:
            self.bar.close()


class RunLog:
    """Unless verbose: the libraries' log records and warnings go to run_dir/logs/train.log (its path printed once),
    and after ray.init (`take_worker_output`) every worker's output and Ray Data's progress bars too. `close` puts
    everything back, so a process that trains twice (an experiment, a test) starts each run as it was."""

    def __init__(self, run_dir: str | os.PathLike, verbose: bool, stream=None):
        self.verbose, self.path = verbose, Path(run_dir) / LOG_FILE
        self._undo: list = []
        if verbose:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a", buffering=1)
        for name in LIBRARY_LOGGERS:  # a handler each: ray.init sets its own format on the "ray" logger's handlers
            handler = logging.StreamHandler(self.file)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger = logging.getLogger(name)
            saved = logger.handlers[:], logger.propagate, logger.level
            logger.handlers, logger.propagate = [handler], False
            if logger.level == logging.NOTSET or logger.level > logging.INFO:
                logger.setLevel(logging.INFO)
            self._undo.append(lambda lg=logger, s=saved: (setattr(lg, "handlers", s[0]), setattr(lg, "propagate", s[1]),
                                                          lg.setLevel(s[2])))
        logging.captureWarnings(True)
        self._undo.append(lambda: logging.captureWarnings(False))
        print(f"log: {self.path} (Ray, DeepSpeed, MLflow and the workers' output; --verbose shows it here)",
              file=stream or sys.stdout, flush=True)

    def take_worker_output(self) -> None:
        """Once Ray is up: the workers' output into the log file instead of the terminal, and no progress bars from
        Ray Data (a file would hold every redraw). Nothing to do where log_to_driver is off."""
        if self.verbose:
            return
        from ray.data import DataContext

        context = DataContext.get_current()  # a dataset takes the driver's context with it
        bars = context.enable_progress_bars
        context.enable_progress_bars = False
        self._undo.append(lambda: setattr(context, "enable_progress_bars", bars))
        # Ray's two ways to the driver's terminal: the workers' output stream, and the cluster's messages to the job
        # (the raylet's warnings, a dead worker), which its error listener prints with print_to_stdstream
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        printers = [(name, h) for name, h in dispatcher.handlers if name == RAY_PRINTER]
        if not printers:
            return
        dispatcher.remove_handler(RAY_PRINTER)
        dispatcher.add_handler("sfpp_run_log", self._write_worker_output)
        self._undo.append(lambda: (dispatcher.remove_handler("sfpp_run_log"),
                                   [dispatcher.add_handler(name, h) for name, h in printers]))
        printing = ray_worker.print_to_stdstream
        ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: self._write_worker_output(data)
        self._undo.append(lambda: setattr(ray_worker, "print_to_stdstream", printing))

    def _write_worker_output(self, data: dict) -> None:
        """A batch of one process's lines, as Ray would print them less colours and progress bars."""
        import ray._private.worker as ray_worker
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

        pid, lines = data.get("pid"), data.get("lines", [])
        if pid == "autoscaler":  # its status every few seconds; Ray prints only its events
            lines = list(ray_worker.filter_autoscaler_events(lines))
        who = " ".join(str(x) for x in (data.get("actor_name") or data.get("task_name"), f"pid={pid}") if x)
        self.file.writelines(f"({who}) {line}\n" for line in lines if RAY_TQDM_MAGIC not in line)

    def close(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        if not self.verbose:
            self.file.close()


@contextlib.contextmanager
def run_log(run_dir: str | os.PathLike, verbose: bool, stream=None):
    log = RunLog(run_dir, verbose, stream)
    try:
        yield log
    finally:
        log.close()
