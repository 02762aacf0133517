"""A world teacher's own samples against real clips under chosen sampler settings, on more scenes than the
sampler stage and the eval use: which sampler to draw with, and how far the teacher is from the world.

Each setting is steps:shift:guidance[:low:high] (Euler steps, the grid's shift, guidance, and the noise
levels where guidance applies), optionally followed by :autoguidance=w:guide=<dir> (a weaker teacher's
directory, e.g. <run>/teacher/guide_step1000, steered away from with weight w) and :eta=e (the share of each
step's noise drawn fresh, ode.eta; 0 is the deterministic ODE). Every setting is scored
on --validation scenes (the sampler stage's seed); the first setting and the --top best of them again on
--heldout scenes (the eval's seed, so the first --heldout 8 are the table's own) of each split in
--splits: "heldout" scenes each hold a colour / shape pair the teacher never saw, "train" scenes only
pairs it was trained on.

    python experiments/teacher_sampler.py --run outputs/w11 --settings 24:8:2,24:8:4:0.3:0.8 \
        [--teacher <dir>] [--validation 32] [--heldout 64] [--top 3] [--splits heldout,train] [key=value ...]

--teacher scores another teacher directory in place of <run>/teacher: a guide saved at a step, or a teacher
that no run of this experiment made. Prints a table (last) and writes teacher_sampler.json into --run, again
after every scored row, with the seconds each row took. On the GPU by default (run.device=cpu to change).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_horizon import VALIDATION_SEED_OFFSET, Setup, reference_rows  # noqa: E402

from sfpp_ray.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("stability", "composition_error", "count_error", "colour_drift", "exposure_drift", "brightness_bias", "frechet")


NAMED = {"autoguidance": float, "guide": str, "eta": float}  # setting pieces given as name=value


def parse_setting(text: str) -> dict:
    """'24:8:2', '24:8:4:0.3:0.8' or '24:8:2:autoguidance=2:guide=<dir>' -> the ode config fields it sets."""
    pieces = text.split(":")
    v = [x for x in pieces if "=" not in x]
    named = dict(x.split("=", 1) for x in pieces if "=" in x)
    if len(v) not in (3, 5) or set(named) - set(NAMED):
        raise SystemExit(f"a setting is steps:shift:guidance[:low:high][:autoguidance=w:guide=dir][:eta=e], "
                         f"got {text!r}")
    setting = {"euler_steps": int(v[0]), "shift": float(v[1]), "guidance": float(v[2])}
    if not 0 <= float(named.get("eta", 0)) <= 1:
        raise SystemExit(f"eta is in [0, 1] (0: the deterministic ODE), got {text!r}")
    if len(v) == 5:
        setting["guidance_interval"] = [float(v[3]), float(v[4])]
    return setting | {k: NAMED[k](x) for k, x in named.items()}


def setting_name(st: dict) -> str:
    numbers = ":".join(f"{v:g}" for v in (st["euler_steps"], st["shift"], st["guidance"],
                                          *st.get("guidance_interval", [])))
    if st.get("eta", 0):
        numbers += f" eta {st['eta']:g}"
    if st.get("autoguidance", 1) == 1:
        return numbers
    guide = Path(st["guide"])  # a saved guide by its step; another run's teacher by that run's folder
    return numbers + f" ag {st['autoguidance']:g} " + (guide.name if guide.name != "teacher" else guide.parent.name)


class Scorer:
    """Scores one teacher under sampler settings beside the real clips of the same scenes. The set-up (one per scene
    count) and the real clips' row (one per scene set) are made once: neither depends on the sampler."""

    def __init__(self, run: Path, teacher: Path | None, config: str, overrides: list[str]):
        self.run, self.teacher, self.config, self.overrides = run, teacher, config, overrides
        self.setups: dict[int, Setup] = {}
        self.real_rows: dict[tuple, dict] = {}

    def __call__(self, setting: dict, prompts: int, seed_offset: int, split: str) -> dict:
        if prompts not in self.setups:
            cfg = load_config(self.config, [*self.overrides, f"evaluation.num_prompts={prompts}"])
            self.setups[prompts] = Setup(cfg, self.run, self.teacher)
        s, scenes = self.setups[prompts], (prompts, seed_offset, split)
        labels = ("teacher",) if scenes in self.real_rows else ("real", "teacher")
        rows = reference_rows(s, dataclasses.replace(s.cfg.ode, **setting), seed=s.cfg.evaluation.seed + seed_offset,
                              split=split, labels=labels)
        rows["real"] = self.real_rows.setdefault(scenes, rows.get("real"))
        return {label: {k: float(rows[label][1][k]) for k in KEYS} for label in ("real", "teacher")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="an experiments/long_horizon.py output directory with teacher/")
    p.add_argument("--teacher", default=None, help="a teacher directory to score instead of <run>/teacher")
    p.add_argument("--config", default=str(ROOT / "configs" / "world_gpu.yaml"))
    p.add_argument("--settings", required=True,
                   help="comma-separated steps:shift:guidance[:low:high][:autoguidance=w:guide=dir][:eta=e]")
    p.add_argument("--validation", type=int, default=32, help="validation scenes per setting (0: skip)")
    p.add_argument("--heldout", type=int, default=64, help="evaluation scenes for the first and the top settings")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--splits", default="heldout")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    settings = [parse_setting(t) for t in args.settings.split(",")]
    splits = args.splits.split(",")
    if any(sp not in ("heldout", "train") for sp in splits):
        raise SystemExit(f"--splits takes heldout and/or train, got {args.splits}")
    run, teacher = Path(args.run), args.teacher and Path(args.teacher)
    if not (teacher or run / "teacher").joinpath("config.json").is_file():
        raise SystemExit(f"{teacher or run / 'teacher'} holds no teacher (no config.json): give --run a directory "
                         "whose teacher stage finished, or --teacher a saved teacher or guide")
    run.mkdir(parents=True, exist_ok=True)
    out = {"settings": settings, "teacher": str(teacher or run / "teacher"), "validation": [], "heldout": []}
    written = run / "teacher_sampler.json"  # rewritten after every row: a run cut short keeps what it scored
    score = Scorer(run, teacher, args.config, args.overrides)

    def timed(*scenes) -> dict:  # a row and the seconds it took (the first of a scene count includes its set-up)
        t0 = time.perf_counter()
        return score(*scenes) | {"seconds": round(time.perf_counter() - t0, 1)}

    for setting in settings if args.validation else []:
        row = timed(setting, args.validation, VALIDATION_SEED_OFFSET, "heldout")
        out["validation"].append({"setting": setting, **row})
        written.write_text(json.dumps(out, indent=2))
        print(f"[validation] {setting}  stability {row['teacher']['stability']:.1f}  ({row['seconds']:.0f} s)",
              flush=True)
    ranked = [r["setting"] for r in sorted(out["validation"], key=lambda r: -r["teacher"]["stability"])]
    chosen = [settings[0]] + [st for st in ranked if st != settings[0]][:args.top]
    for split in splits:
        for setting in chosen:
            row = timed(setting, args.heldout, 0, split)
            out["heldout"].append({"setting": setting, "split": split, **row})
            written.write_text(json.dumps(out, indent=2))
            print(f"[eval {split}] {setting}  stability {row['teacher']['stability']:.1f} "
                  f"(real {row['real']['stability']:.1f})  ({row['seconds']:.0f} s)", flush=True)
    print(f"{'scenes':<18}{'setting':<30}{'real':>8}" + "".join(f"{k:>19}" for k in KEYS))
    for label, rows in (("validation", out["validation"]), ("eval", out["heldout"])):
        for r in rows:
            where = f"{label} {r.get('split', '')}".strip()
            print(f"{where:<18}{setting_name(r['setting']):<30}{r['real']['stability']:>8.1f}"
                  + "".join(f"{r['teacher'][k]:>19.3f}" for k in KEYS))
    return out


if __name__ == "__main__":
    main()
