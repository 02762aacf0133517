"""The driver's terminal: a stage's progress line from its rank 0's reports, and the run's log file taking the
libraries' and workers' output (the whole terminal of a CLI run: tests/test_job_submit.py)."""

import io
import logging
import random
import re
import warnings

from sfpp_ray.distributed import progress
from sfpp_ray.distributed.progress import StageProgress, report_progress, run_log


def test_without_a_terminal_the_line_is_printed_once_a_tenth_with_rate_and_eta(tmp_path):
    total = random.randint(20, 300)
    stream = io.StringIO()  # not a TTY: plain lines
    line = StageProgress(tmp_path, "ode", total, stream)
    losses = [random.random() for _ in range(total)]
    for step in range(1, total + 1):
        line.show(step, {"loss": losses[step - 1]}, now=100 + step / 4)  # four steps a second
    line.close()
    printed = stream.getvalue()
    assert "\r" not in printed
    rows = printed.splitlines()
    assert len(rows) == len({step * 10 // total for step in range(1, total + 1)}) == 11  # the first step, each tenth
    shown = []
    for row in rows:
        m = re.fullmatch(r"\[ode\] step (\d+)/(\d+) \((\d+)%\)  loss (\S+)(?:  (\S+) steps/s)?(?:  ETA (\d+):(\d\d))?", row)
        assert m, row
        step = int(m[1])
        assert int(m[2]) == total and int(m[3]) == 100 * step // total
        assert float(m[4]) == float(f"{losses[step - 1]:.4g}")
        if step > 1:  # the rate counts from the first step seen
            assert float(m[5]) == 4
        if 1 < step < total:
            assert int(m[6]) * 60 + int(m[7]) == int((total - step) / 4 + 0.5)
        shown.append(step)
    assert shown[0] == 1 and shown[-1] == total and m[6] is None  # no ETA once done
    assert [s * 10 // total for s in shown] == sorted({s * 10 // total for s in range(1, total + 1)})


def test_rank_0_s_reports_reach_the_driver_through_the_run_directory(tmp_path):
    stage, total = f"stage{random.randint(0, 10**6)}", random.randint(5, 50)
    line = StageProgress(tmp_path, stage, total, io.StringIO())
    critic = random.random()
    report_progress(tmp_path, stage, 2, total, critic=critic, generator=None)  # a value not known yet is left out
    line.read()
    assert (line.step, line.values) == (2, {"critic": critic})
    report_progress(tmp_path, stage, 3, total, critic=0.0)  # within WRITE_EVERY_S of the last: not written
    line.read()
    assert line.step == 2
    report_progress(tmp_path, stage, total, total, critic=1.0)  # the last step always is
    line.close()
    assert (line.step, line.values) == (total, {"critic": 1.0})
    assert line.path.parent == tmp_path / "logs" and not list(line.path.parent.glob("*.tmp"))


def test_a_quiet_run_logs_the_libraries_and_workers_to_its_file_and_puts_everything_back(tmp_path):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    from ray.data import DataContext
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    printed = []  # stands in for the handler ray.init(log_to_driver=True) adds
    dispatcher.add_handler(progress.RAY_PRINTER, printed.append)
    loggers = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate)
               for name in ("ray", "mlflow", "deepspeed")}
    bars = DataContext.get_current().enable_progress_bars
    words = [f"w{random.randint(0, 10**9)}" for _ in range(4)]
    stream = io.StringIO()
    try:
        with run_log(tmp_path, verbose=False, stream=stream) as log:
            log.take_worker_output()
            assert DataContext.get_current().enable_progress_bars is False  # a dataset takes the driver's context
            logging.getLogger("mlflow.store.db").info(words[0])
            logging.getLogger("ray.train").warning(words[1])
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.warn(words[2])
            dispatcher.emit({"pid": 1234, "actor_name": "RolloutWorker", "lines": [words[3], RAY_TQDM_MAGIC + "{}"]})
        assert printed == []
        dispatcher.emit({"pid": 1, "lines": ["after"]})
        assert printed == [{"pid": 1, "lines": ["after"]}]  # Ray's own printer is back
    finally:
        dispatcher.remove_handler(progress.RAY_PRINTER)
    text = (tmp_path / "logs" / "train.log").read_text()
    assert all(w in text for w in words) and f"(RolloutWorker pid=1234) {words[3]}" in text and RAY_TQDM_MAGIC not in text
    assert stream.getvalue() == (f"log: {tmp_path / 'logs' / 'train.log'} (Ray, DeepSpeed, MLflow and the workers' "
                                 "output; --verbose shows it here)\n")
    assert {name: (logging.getLogger(name).handlers, logging.getLogger(name).propagate) for name in loggers} == loggers
    assert DataContext.get_current().enable_progress_bars == bars
    with run_log(tmp_path / "verbose", verbose=True, stream=stream) as log:
        log.take_worker_output()
        logging.getLogger("mlflow").info("shown")
    assert not (tmp_path / "verbose").exists()
