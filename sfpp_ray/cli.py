"""`sfpp-ray <command> --config configs/X.yaml [key=value ...]`: a small CLI; every knob lives in config."""

from __future__ import annotations

import argparse
import json
import sys

from sfpp_ray.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sfpp-ray", description="Self-Forcing++ on Ray: long-video distillation.")
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
    command("train", "run the stages the config asks for (teacher pretraining, ODE init, SF++ DMD, GRPO)")
    command("pretrain-teacher", "train the bidirectional teacher on the synthetic world")
    e = command("evaluate", "score generated videos against the synthetic world's ground truth")
    e.add_argument("--checkpoint", help="student weights to evaluate")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args, load_config(args.config, args.overrides))
    except ConfigError as e:  # a bad value, on load or against what the run directory already holds
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, cfg) -> int:
    if args.command == "generate":
        from sfpp_ray.generate import generate

        result = generate(cfg, args.prompt, args.seconds, args.out, checkpoint=args.checkpoint, seed=args.seed)
        print(json.dumps(result))
        return 0
    if args.command == "train":
        from sfpp_ray.distributed.controller import train

        train(cfg)
        return 0
    if args.command == "pretrain-teacher":
        from sfpp_ray.distributed.controller import train

        cfg.run.stages = ["pretrain_teacher"]
        train(cfg)
        return 0
    if args.command == "evaluate":
        from sfpp_ray.evaluation.evaluate import evaluate
        from sfpp_ray.tracking import Tracker

        tracker = Tracker(cfg.tracking, cfg.run_dir, cfg.run.name)
        tracker.start(cfg.flat())
        evaluate(cfg, checkpoint=args.checkpoint, tracker=tracker)
        tracker.finish()
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
