"""`sfpp-ray <command> --config configs/X.yaml [key=value ...]`: a small CLI; every knob lives in config.

Arguments and config are checked before torch, Ray or a model is imported: a bad one is one line on stderr naming
its argument, key or path, and exit status 2, in a fraction of a second."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

from sfpp_ray.checks import CheckError, NonFiniteError, check_weights
from sfpp_ray.config import ConfigError, load_config
from sfpp_ray.prompt_schedule import PromptSchedule
from sfpp_ray.reruns import STAGE_OUTPUTS, RerunRefused, absolute_paths, check_rerun

VIDEO_SUFFIXES = (".mp4", ".gif")


class UsageError(ValueError):
    """A bad command-line argument; the message starts with the argument's name."""


class Parser(argparse.ArgumentParser):
    """argparse's errors in one line (its usage block is what --help is for)."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="sfpp-ray", description="Self-Forcing++ on Ray: long-video distillation.")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--config", required=True, help="YAML file in configs/")
        c.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainer.num_workers=2")
        return c

    g = command("generate", "stream a video from a prompt with the causal student")
    g.add_argument("--prompt", required=True)
    g.add_argument("--seconds", type=float, required=True)
    g.add_argument("--out", required=True, help="output .mp4 or .gif")
    g.add_argument("--checkpoint", help="student weights (a diffusers dir or an original-layout file)")
    g.add_argument("--seed", type=int)
    g.add_argument("--switch", action="append", default=[], metavar="SECONDS:PROMPT",
                   help="switch to PROMPT at SECONDS (repeatable), or a .jsonl file of {\"t\": seconds, \"prompt\": ...}")
    g.add_argument("--image", help="start the video from this image (PNG), or from the first frames of a clip")
    for name, help in (("train", "run the stages the config asks for (teacher pretraining, ODE init, SF++ DMD, GRPO)"),
                       ("pretrain-teacher", "train the bidirectional teacher on the synthetic world")):
        c = command(name, help)
        c.add_argument("--restart", choices=list(STAGE_OUTPUTS), metavar="STAGE",
                       help="discard what this stage and every later one left in the run directory, and run them "
                            f"again ({', '.join(STAGE_OUTPUTS)})")
        c.add_argument("--verbose", action="store_true",
                       help="show Ray's, DeepSpeed's, MLflow's and the workers' output here instead of in "
                            "RUN/logs/train.log")
    e = command("evaluate", "score generated videos against the synthetic world's ground truth")
    e.add_argument("--checkpoint", help="student weights to evaluate")
    s = command("serve", "stream the student over HTTP (Ray Serve) until interrupted; serve.* keys configure it")
    s.add_argument("--checkpoint", help="student weights to serve")
    return p


def check_args(args: argparse.Namespace) -> None:
    """The command's own arguments, as far as they can be judged without a model."""
    if args.command == "generate":
        if not args.prompt.strip():
            raise UsageError("--prompt: is empty")
        if not math.isfinite(args.seconds) or args.seconds <= 0:
            raise UsageError(f"--seconds: must be a finite number > 0, got {args.seconds:g}")
        try:
            args.schedule = PromptSchedule.parse(args.prompt, args.switch)
        except ValueError as e:
            raise UsageError(f"--switch: {e}") from None
        if args.image is not None and not Path(args.image).is_file():
            raise UsageError(f"--image: {args.image} is not a file")
        if args.seed is not None and not 0 <= args.seed < 2**63:
            raise UsageError(f"--seed: must lie in [0, 2**63), got {args.seed}")
        out = Path(args.out)
        if out.suffix not in VIDEO_SUFFIXES:
            raise UsageError(f"--out: {args.out!r}: unsupported video format {out.suffix or '(none)'!r}, "
                             f"use {' or '.join(VIDEO_SUFFIXES)}")
        if out.is_dir():
            raise UsageError(f"--out: {args.out!r} is a directory")
        if any(parent.exists() and not parent.is_dir() for parent in out.parents):
            raise UsageError(f"--out: {args.out!r}: a parent of it is a file, not a directory")
        if out.suffix == ".mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
            raise UsageError(f"--out: writing {args.out!r} needs imageio-ffmpeg (pip install imageio-ffmpeg), "
                             "or write a .gif")
    if getattr(args, "checkpoint", None) is not None:
        try:
            check_weights(args.checkpoint)
        except CheckError as e:
            raise UsageError(f"--checkpoint: {e}") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        check_args(args)
        cfg = load_config(args.config, args.overrides)
        return _run(args, cfg)
    except (UsageError, ConfigError, RerunRefused) as e:  # a bad argument or value, on load or against the run dir
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        found = cause(e, NonFiniteError)  # a stage stopped by NaNs: its one line says where, not Ray's traceback
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        return 1


def cause(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """An error of `kind` among `error`'s causes, as Ray hands back an error raised in a worker: chained, among a
    worker group's failures (ray.train.WorkerGroupError.worker_failures) or a controller's, or wrapped with its
    traceback (Ray Train's UserExceptionWithTraceback keeps it as _base_exc, a task's error as .cause)."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        failures = getattr(e, "worker_failures", None)
        stack += [e.__cause__, e.__context__, getattr(e, "_base_exc", None), getattr(e, "cause", None),
                  getattr(e, "controller_failure", None), *(failures.values() if isinstance(failures, dict) else [])]
        stack = [x for x in stack if x is None or isinstance(x, BaseException)]
    return None


def _run(args: argparse.Namespace, cfg) -> int:
    if args.command == "generate":
        from sfpp_ray.generate import generate, summary

        result = generate(cfg, args.schedule, args.seconds, args.out, checkpoint=args.checkpoint, seed=args.seed,
                          image=args.image)
        print(json.dumps(result))  # stdout stays one JSON line for scripts; the summary is for the terminal
        print(summary(result), file=sys.stderr)
        return 0
    if args.command in ("train", "pretrain-teacher"):
        if args.command == "pretrain-teacher":
            cfg.run.stages = ["pretrain_teacher"]
        check_rerun(absolute_paths(cfg), args.restart)  # what train checks first, said before Ray and torch load
        from sfpp_ray.distributed.controller import train

        train(cfg, restart=args.restart, verbose=args.verbose)
        return 0
    if args.command == "evaluate":
        from sfpp_ray.evaluation.evaluate import evaluate
        from sfpp_ray.tracking import Tracker

        tracker = Tracker(cfg.tracking, cfg.run_dir, cfg.run.name)
        tracker.start(cfg.flat())
        evaluate(cfg, checkpoint=args.checkpoint, tracker=tracker)
        tracker.finish()
        return 0
    if args.command == "serve":
        import signal
        import threading

        from ray import serve

        from sfpp_ray.distributed import server
        from sfpp_ray.distributed.controller import start_ray

        server.check(cfg)
        start_ray(cfg.serve.num_replicas * cfg.serve.cpus_per_replica)
        url = server.start(cfg, args.checkpoint)
        print(f"serving {args.checkpoint or 'the configured student'} at {url} (Ctrl-C stops)", file=sys.stderr)

        def stop(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)  # a job's stop or a kill ends it as Ctrl-C does: the deployment shut down
        signal.signal(signal.SIGINT, stop)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
            print("stopping the server", file=sys.stderr)
            serve.shutdown()
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
