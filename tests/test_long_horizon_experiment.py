"""experiments/long_horizon.py end to end on the tiny CPU config through the controller: every stage writes its
output, each variant's student is the product's and its printed command remakes its config, the results table holds
the expected rows (with a spread over two seeds), and a second run skips finished stages."""

import dataclasses
import json
import math
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sfpp_ray import components
from sfpp_ray.config import ConfigError, load_config
from sfpp_ray.world.clips import world_latent_batch
from sfpp_ray.world.sprites import WorldSpec, sample_scenes

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TOY = ["teacher_pretrain.steps=3", "ode.num_pairs=4", "ode.shard_size=4", "ode.steps=3", "ode.euler_steps=4",
       "dmd.steps=2", "evaluation.horizons=[1,2]", "evaluation.num_prompts=1",
       "rollout.num_workers=1", "tracking.enabled=false"]  # every training stage is a controller run: one rollout
# worker to start, no MLflow database for each run directory


@pytest.fixture(scope="module")
def experiment(load_experiment):
    return load_experiment("long_horizon")


def test_world_latent_batch_encodes_rendered_clips_and_prompts():
    cfg = load_config(TINY)
    text, codec = components.build_text_encoder(cfg), components.build_video_codec(cfg)
    scenes = sample_scenes(0, 2, "train", WorldSpec(height=16, width=16, fps=8))
    latents, embeds = world_latent_batch(scenes, 6, codec, text, np.random.default_rng(0))
    assert latents.shape == (2, 12, 6, 8, 8) and embeds.shape[0] == 2
    assert latents.min() >= -1 and latents.max() <= 1
    same, _ = world_latent_batch(scenes, 6, codec, text, [5, 5])
    again, _ = world_latent_batch(scenes, 6, codec, text, [5, 5])
    assert torch.equal(same, again)


def test_long_horizon_runs_every_stage_and_resumes(experiment, load_experiment, ray_cluster, tmp_path, capsys):
    out = tmp_path / "run"
    stages = "teacher,sampler,ode,sf,sfpp,eval"
    guided = [*TOY, "teacher_pretrain.guide_steps=[2]"]  # the teacher at step 2 is saved as an autoguidance guide
    # sf and sfpp trained at once, each `sfpp-ray train` in a process of its own on this cluster
    lean = ["rollout.cpus_per_worker=0"]  # two runs of trainer + data in the test cluster's 4 CPUs
    result = experiment.main(["--config", str(TINY), "--out", str(out), "--stages", stages, "--parallel", "2",
                              *guided, *lean])
    printed = capsys.readouterr().out
    teacher = json.loads((out / "teacher" / "stage.json").read_text())  # written by the Ray stage
    assert len(teacher["losses"]) == 3 and all(math.isfinite(v) for v in teacher["losses"])
    sweep = json.loads((out / "sampler" / "stage.json").read_text())
    guide = str(out / "teacher" / "guide_step2")
    plain = [r for r in sweep["rows"] if r["autoguidance"] == 1 and r["guide"] is None and r["eta"] == 0]
    best_plain = max(plain, key=lambda r: r["stability"])
    autoguided = [(r["shift"], r["guidance"], r["guide"], r["autoguidance"], r["eta"]) for r in sweep["rows"][9:12]]
    assert len(plain) == 9 and autoguided == [(best_plain["shift"], best_plain["guidance"], guide, w, 0.0)
                                              for w in experiment.AUTOGUIDANCE_SWEEP]
    deterministic = ("shift", "guidance", "autoguidance", "guide")  # the stochastic sampler from the best so far
    best_so_far = max(sweep["rows"][:12], key=lambda r: r["stability"])
    assert [{k: r[k] for k in (*deterministic, "eta")} for r in sweep["rows"][12:]] == [
        {**{k: best_so_far[k] for k in deterministic}, "eta": eta} for eta in experiment.ETA_SWEEP]
    best = max(sweep["rows"], key=lambda r: r["stability"])
    assert sweep["best"] == {k: best[k] for k in (*deterministic, "eta")}

    # every student is the controller's: the ODE stage in --out, each variant in a run directory of its own
    ode = json.loads((out / "student_ode" / "stage.json").read_text())
    assert ode["steps"] == 3 and ode["pairs"] == 4 and all(math.isfinite(v) for v in ode["losses"])
    ode_command = command_of(printed, "ode")  # the teacher's pairs drawn with the sampler stage's choice
    remade = load_config(ode_command[3], ode_command[4:])
    assert remade.run_dir == out and remade.run.stages == ["ode"] and remade.model.pretrained == str(out / "teacher")
    assert {k: getattr(remade.ode, k) for k in deterministic} == {k: sweep["best"][k] for k in deterministic}
    cfg = load_config(TINY, guided)
    for name in ("sf", "sfpp"):
        student = out / name / "seed0" / "student"
        assert json.loads((student / "stage.json").read_text())["steps"] == 2  # the DMD stage's marker
        assert (student / "config.json").is_file()
        # the printed command holds the variant's overrides and remakes its config
        command = command_of(printed, f"{name} seed0")
        assert command[:3] == ["sfpp-ray", "train", "--config"] and Path(command[3]).resolve() == TINY
        assert set(experiment.variant_overrides(cfg, name)) <= set(command[4:])
        remade = load_config(command[3], command[4:])
        assert remade.run_dir == out / name / "seed0" and remade.run.stages == ["dmd"]
        assert remade.student.checkpoint == str(out / "student_ode") and remade.model.pretrained == str(out / "teacher")
        assert remade.data.training_rolling_cache == remade.data.backward_noise == (name == "sfpp")
        assert f"[{name} seed0] finished" in printed
    lines = printed.splitlines()
    started = [i for i, line in enumerate(lines) if re.match(r"\[sfp?p? seed0\] sfpp-ray train ", line)]
    ended = [i for i, line in enumerate(lines) if re.match(r"\[sfp?p? seed0\] finished", line)]
    assert len(started) == 2 and max(started) < min(ended)  # both were running at once
    first = re.match(r"\[(sfp?p?) seed0\] finished", lines[min(ended)]).group(1)
    assert lines.index(f"[eval] {first} seed0: scoring") < max(ended)  # scored while the other still trained
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["table"]) == {"real", "teacher", "sf", "sfpp"} and saved["seeds"]["sfpp"] == [0]
    assert set(saved["table"]["sfpp"]) == {"1", "2"} and set(saved["table"]["teacher"]) == {"1"}
    assert saved["spread"]["sfpp"]["2"]["stability"]["n"] == 1
    assert set(result["table"]["sf"][2]) == set(experiment.TABLE_KEYS)
    assert saved["commands"]["sf"]["0"] == shlex.join(command_of(printed, "sf seed0"))
    assert "sfpp" in printed.splitlines()[-1]

    found = load_experiment("teacher_diagnostics").main(["--run", str(out), "--config", str(TINY), *TOY])
    assert found["sampler"] == saved_best(out)  # samples drawn with the sampler stage's choice
    assert all(math.isfinite(v) for by in found["loss_by_sigma"].values() for v in by.values())
    assert (out / "teacher_diagnostics.png").is_file() and (out / "teacher_diagnostics.json").is_file()

    # shape recovery from sigma 0 and 1 scores exactly the eval's real clips and teacher samples
    recovery = load_experiment("shape_recovery")
    found = recovery.main(["--run", str(out), "--config", str(TINY), "--prompts", "1", "--sigmas", "0,1", *TOY])
    reference = experiment.reference_rows(experiment.Setup(load_config(TINY, ["run.device=cpu", *TOY]), out))
    for row, label in zip(found["rows"], ("real", "teacher")):
        assert {k: row[k] for k in recovery.KEYS} == pytest.approx({k: reference[label][1][k] for k in recovery.KEYS})
    eta = f"_eta{saved_best(out)['eta']:g}" if saved_best(out)["eta"] else ""  # the file names the sampler's eta
    assert json.loads((out / f"shape_recovery{eta}.json").read_text())["rows"] == found["rows"]
    # the command line's ode.eta wins over the sampler stage's choice (0 or ETA_SWEEP's)
    assert 0.25 not in (0.0, *experiment.ETA_SWEEP)
    stochastic = recovery.main(["--run", str(out), "--config", str(TINY), "--prompts", "1", "--sigmas", "0.5,1", *TOY,
                                "ode.eta=0.25"])  # every level's fresh noise starts as the eval's: sigma 1 is its row
    reference = experiment.reference_rows(experiment.Setup(load_config(TINY, ["run.device=cpu", *TOY, "ode.eta=0.25"]),
                                                           out, given={"ode.eta"}))
    assert {k: stochastic["rows"][1][k] for k in recovery.KEYS} == pytest.approx(
        {k: reference["teacher"][1][k] for k in recovery.KEYS})
    assert (out / "shape_recovery_eta0.25.json").is_file() and stochastic["sampler"]["eta"] == 0.25
    even = recovery.main(["--run", str(out), "--config", str(TINY), "--prompts", "1", "--sigmas", "0.5",
                          "--even-steps", "3", *TOY])
    assert even["rows"][0]["steps"] == 3 and (out / f"shape_recovery_even3{eta}.json").is_file()

    # the sampler experiment: its eval rows are the eval's own, for either split
    sampler = load_experiment("teacher_sampler")
    found = sampler.main(["--run", str(out), "--config", str(TINY), "--settings",
                          f"4:3:2,4:3:2:0.5:1,4:3:2:autoguidance=2:guide={guide},4:3:2:eta=0.5", "--validation", "1",
                          "--heldout", "1", "--top", "1", "--splits", "heldout,train", *TOY])
    assert len(found["validation"]) == 4 and len(found["heldout"]) == 4
    assert found["validation"][2]["setting"] == {"euler_steps": 4, "shift": 3.0, "guidance": 2.0, "autoguidance": 2.0,
                                                 "guide": guide}
    assert found["validation"][2]["teacher"] != found["validation"][0]["teacher"]  # the guide steers the samples
    assert found["validation"][3]["setting"]["eta"] == 0.5
    assert found["validation"][3]["teacher"] != found["validation"][0]["teacher"]  # fresh noise changes them
    with pytest.raises(SystemExit, match="eta"):
        sampler.parse_setting("4:3:2:eta=2")
    setup = experiment.Setup(load_config(TINY, ["run.device=cpu", *TOY]), out)
    ode = dataclasses.replace(setup.cfg.ode, euler_steps=4, shift=3.0, guidance=2.0)
    for split, row, top in zip(("heldout", "train"), found["heldout"][0::2], found["heldout"][1::2]):
        assert row["split"] == split and row["setting"] == {"euler_steps": 4, "shift": 3.0, "guidance": 2.0}
        expected = experiment.reference_rows(setup, ode, split=split)
        assert row["teacher"] == pytest.approx({k: expected["teacher"][1][k] for k in sampler.KEYS})
        # the real clips are scored once per scene set: the top setting's row reuses them
        assert row["real"] == top["real"] == pytest.approx({k: expected["real"][1][k] for k in sampler.KEYS})
    validation_real = experiment.reference_rows(setup, ode, seed=setup.cfg.evaluation.seed + experiment.VALIDATION_SEED_OFFSET,
                                                labels=("real",))
    assert set(validation_real) == {"real"} and all(r["real"] == pytest.approx(
        {k: validation_real["real"][1][k] for k in sampler.KEYS}) for r in found["validation"])
    assert json.loads((out / "teacher_sampler.json").read_text()) == found

    # --teacher scores a saved guide in place of the run's teacher, into a directory of its own
    other = tmp_path / "guide_scored"
    with pytest.raises(SystemExit, match="holds no teacher"):
        sampler.main(["--run", str(other), "--config", str(TINY), "--settings", "4:3:2", *TOY])
    by_guide = sampler.main(["--run", str(other), "--teacher", guide, "--config", str(TINY), "--settings", "4:3:2",
                             "--validation", "0", "--heldout", "1", *TOY])
    expected = experiment.reference_rows(experiment.Setup(setup.cfg, other, Path(guide)), ode)["teacher"][1]
    assert by_guide["heldout"][0]["teacher"] == pytest.approx({k: expected[k] for k in sampler.KEYS})
    assert by_guide["heldout"][0]["teacher"] != found["heldout"][0]["teacher"]  # step 2's model, not step 3's
    assert json.loads((other / "teacher_sampler.json").read_text())["teacher"] == guide

    mtime = (out / "sfpp" / "seed0" / "student" / "stage.json").stat().st_mtime
    experiment.main(["--config", str(TINY), "--out", str(out), "--stages", stages, "--parallel", "2", *guided, *lean])
    printed = capsys.readouterr().out
    assert all(f"[{s}] done, skipped" in printed for s in ("teacher", "sampler", "ode", "sf seed0", "sfpp seed0"))
    assert "sfpp-ray train" not in printed
    assert (out / "sfpp" / "seed0" / "student" / "stage.json").stat().st_mtime == mtime

    # a second training seed of sf alone (sfpp@0: sfpp keeps its own seeds), trained here through the controller;
    # the table's mean and spread over both seeds
    two = experiment.main(["--config", str(TINY), "--out", str(out), "--stages", "sf,sfpp@0,eval", "--seeds", "0,1",
                           *guided])
    printed = capsys.readouterr().out
    assert "[sf seed0] done, skipped" in printed and "[sfpp seed0] done, skipped" in printed
    assert "run.seed=1" in command_of(printed, "sf seed1")
    assert not [line for line in printed.splitlines() if line.startswith("[sfpp seed1]")]
    assert json.loads((out / "sf" / "seed1" / "student" / "stage.json").read_text())["steps"] == 2
    assert not (out / "sfpp" / "seed1").exists()
    assert two["commands"]["sf"][1] == shlex.join(command_of(printed, "sf seed1"))
    assert set(two["table"]) == {"real", "teacher", "sf", "sfpp"} and two["seeds"]["sf"] == [0, 1]
    assert two["seeds"]["sfpp"] == [0]
    for h, spread in two["spread"]["sf"].items():
        per_seed = [json.loads((out / "eval" / "sf" / f"seed{k}" / "metrics.json").read_text())["table"][str(h)]
                    for k in (0, 1)]
        for key in experiment.TABLE_KEYS:
            values = [t[key] for t in per_seed]
            assert two["table"]["sf"][h][key] == pytest.approx(np.mean(values))
            assert spread[key] == pytest.approx({"std": np.std(values, ddof=1), "min": min(values), "max": max(values),
                                                 "n": 2})
    assert (out / "stability_over_time.png").stat().st_size > 0  # both variants over time, both seeds
    rows = [line for line in printed.splitlines() if re.match(r"sf +\d+x", line)]
    assert len(rows) == 2 and all("±" in row for row in rows)  # the spread column
    md = (out / "results.md").read_text()  # the docs table, made from results.json
    assert md.count("| sf | ") == 2 and "| sf | 1x | 2 | " in md and "| real | 1x | - | " in md
    assert f"{two['table']['sf'][1]['stability']:.3f} ± {two['spread']['sf'][1]['stability']['std']:.3f}" in md
    assert f"| sfpp | 1x | 1 | {two['table']['sfpp'][1]['stability']:.3f} | " in md  # one seed: no spread

    # scores cached under eval/ are not mixed with scores made under other settings
    with pytest.raises(ConfigError) as e:
        experiment.main(["--config", str(TINY), "--out", str(out), "--stages", "eval", *TOY, "evaluation.num_prompts=2"])
    assert e.value.key == "evaluation.num_prompts"
    with pytest.raises(ConfigError) as e:
        experiment.main(["--config", str(TINY), "--out", str(out), "--stages", "eval", *TOY,
                         "ode.guidance_interval=[0.5,1.0]"])
    assert e.value.key == "ode.guidance_interval"
    settings = out / "eval" / "settings.json"
    recorded = json.loads(settings.read_text())
    settings.write_text(json.dumps({**recorded, "ode.eta": recorded["ode.eta"] + 0.25}))  # another sampler's scores
    with pytest.raises(ConfigError) as e:
        experiment.main(["--config", str(TINY), "--out", str(out), "--stages", "eval", *TOY])
    assert e.value.key == "ode.eta"
    # one written before the interval and eta were recorded: guidance everywhere, the deterministic sampler
    settings.write_text(json.dumps({k: v for k, v in recorded.items() if k not in ("ode.guidance_interval", "ode.eta")}))
    if recorded["ode.eta"] == 0:
        assert experiment.main(["--config", str(TINY), "--out", str(out), "--stages", "eval", *TOY])["table"]
    else:  # the sweep chose the stochastic sampler: scores recorded as deterministic are refused
        with pytest.raises(ConfigError, match="ode.eta"):
            experiment.main(["--config", str(TINY), "--out", str(out), "--stages", "eval", *TOY])

    # a guide the config names (a smaller teacher, say) is swept after the ones saved beside the teacher
    shutil.copytree(out / "teacher" / "guide_step2", tmp_path / "named_guide")
    shutil.rmtree(out / "sampler")
    experiment.main(["--config", str(TINY), "--out", str(out), "--stages", "sampler", *TOY,
                     f"ode.guide={tmp_path / 'named_guide'}"])
    rows = json.loads((out / "sampler" / "stage.json").read_text())["rows"]
    assert [r["guide"] for r in rows[9:15]] == [guide] * 3 + [str(tmp_path / "named_guide")] * 3


def test_a_variant_stage_may_name_its_own_seeds(experiment):
    assert experiment.stage_seeds("sfpp_nobn@0+2", [0, 1, 2]) == ("sfpp_nobn", [0, 2])
    assert experiment.stage_seeds("sf", [4, 5]) == ("sf", [4, 5])
    with pytest.raises(ValueError, match="trains once"):
        experiment.stage_seeds("ode@1", [0])
    with pytest.raises(ValueError, match="integers joined by"):
        experiment.stage_seeds("sf@one", [0])


def saved_best(out: Path) -> dict:
    return json.loads((out / "sampler" / "stage.json").read_text())["best"]


def command_of(printed: str, label: str) -> list[str]:
    """The `sfpp-ray train` command line the experiment printed for a stage, split as a shell would."""
    lines = [line for line in printed.splitlines() if line.startswith(f"[{label}] sfpp-ray train ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].split("] ", 1)[1])


def test_variants_are_command_line_overrides(experiment, tmp_path):
    cfg = load_config(TINY)
    T = cfg.video.teacher_frames

    def variant(name: str):
        return load_config(TINY, experiment.variant_overrides(cfg, name))

    sf, sfpp = variant("sf"), variant("sfpp")
    assert sf.rollout.num_frames == sf.data.window_frames == sf.student.window_frames == T
    assert not sf.data.backward_noise and not sf.data.training_rolling_cache
    assert sfpp.rollout.num_frames == cfg.rollout.num_frames and sfpp.data.window_frames == T
    assert sfpp.data.backward_noise and sfpp.data.training_rolling_cache
    assert not variant("sfpp_nobn").data.backward_noise and variant("sfpp_nobn").data.training_rolling_cache
    assert not variant("sfpp_nocache").data.training_rolling_cache and variant("sfpp_nocache").data.backward_noise
    assert variant("sfpp_w9").student.window_frames == 9
    assert experiment.default_variants(cfg) == ["sf", "sfpp", "sfpp_nobn", "sfpp_nocache", "sfpp_grpo"]  # window 6
    gpu = load_config(ROOT / "configs" / "world_gpu.yaml")
    assert experiment.default_variants(gpu) == ["sf", "sfpp", "sfpp_nobn", "sfpp_nocache", "sfpp_w9", "sfpp_w15",
                                                "sfpp_grpo"]
    with pytest.raises(ConfigError):
        variant("sfpp_w4")  # not a whole number of blocks
    with pytest.raises(ValueError):
        experiment.variant_overrides(cfg, "sfpp_w")
    with pytest.raises(ConfigError):  # before anything is trained
        experiment.main(["--config", str(TINY), "--out", str(tmp_path / "run"), "--stages", "sfpp_w4"])
    assert not (tmp_path / "run" / "sfpp_w4").exists()

    # on a GPU a variant's trainer ranks and rollout workers share one; CPU ranks and workers otherwise
    shared = load_config(TINY, experiment.gpu_overrides(cfg, cuda=True))
    asked = (shared.trainer.gpus_per_worker * shared.trainer.num_workers
             + shared.rollout.gpus_per_worker * shared.rollout.num_workers)
    assert shared.trainer.gpus_per_worker > 0 and shared.rollout.gpus_per_worker > 0 and asked <= 1
    assert experiment.gpu_overrides(cfg, cuda=False) == []
    assert experiment.gpu_overrides(gpu, cuda=False) == ["trainer.gpus_per_worker=0.0"]  # the file asks for one
    given = ["rollout.gpus_per_worker=1"]
    assert experiment.gpu_overrides(load_config(TINY, given), True, experiment.given_keys(given)) == [
        "trainer.gpus_per_worker=0.5"]


def test_teacher_sampler_keeps_the_rows_scored_before_a_run_is_cut_short(load_experiment, monkeypatch, tmp_path):
    sampler = load_experiment("teacher_sampler")
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text("{}")
    scored = []

    def score(self, setting, prompts, seed_offset, split):
        if len(scored) == 2:
            raise KeyboardInterrupt  # the run is stopped while scoring the third row
        scored.append({k: float(torch.rand(())) for k in sampler.KEYS})
        return {"real": {k: 1.0 for k in sampler.KEYS}, "teacher": scored[-1]}

    monkeypatch.setattr(sampler.Scorer, "__call__", score)
    with pytest.raises(KeyboardInterrupt):
        sampler.main(["--run", str(tmp_path), "--settings", "4:3:2,4:8:2,4:1:1", "--validation", "1", "--top", "1"])
    kept = json.loads((tmp_path / "teacher_sampler.json").read_text())
    assert [r["teacher"] for r in kept["validation"]] == scored and kept["heldout"] == []
    assert all(isinstance(r["seconds"], float) and r["seconds"] >= 0 for r in kept["validation"])  # each row timed
    assert [r["setting"]["shift"] for r in kept["validation"]] == [3.0, 8.0]


def test_a_failed_variant_run_still_leaves_the_others_table(experiment, monkeypatch, tmp_path):
    """One variant's run failing must not cost the table of those that finished: eval collects it, then the
    failure is raised."""
    calls = []

    def parallel_runs(s, cmd, jobs, parallel, scorer=None):
        calls.append(("train", sorted(jobs)))
        raise experiment.VariantRunsFailed("variant runs failed: sfpp_nocache seed0: exit 1")

    def collect(s, cmd, variants, seeds, parallel=1, scorer=None):
        calls.append(("eval", variants, seeds))
        return {"table": {}}

    class NoScorer:
        def __init__(self, *args):
            pass

        def submit(self, name, seed):
            pass

    monkeypatch.setattr(experiment, "train_variants_in_parallel", parallel_runs)
    monkeypatch.setattr(experiment, "run_eval", collect)
    monkeypatch.setattr(experiment, "Scorer", NoScorer)
    monkeypatch.setattr(experiment, "format_results", lambda result: "the table")
    with pytest.raises(experiment.VariantRunsFailed, match="sfpp_nocache seed0"):
        experiment.main(["--config", str(TINY), "--out", str(tmp_path / "run"), "--stages", "sfpp,sfpp_nocache@0,eval",
                         "--seeds", "0,1", "--parallel", "2", "run.device=cpu"])
    assert calls == [("train", [("sfpp", 0), ("sfpp", 1), ("sfpp_nocache", 0)]),
                     ("eval", ["sfpp", "sfpp_nocache"], [0, 1])]
    # without eval to follow, the failure stops the script where it happens
    calls.clear()
    with pytest.raises(experiment.VariantRunsFailed):
        experiment.main(["--config", str(TINY), "--out", str(tmp_path / "run"), "--stages", "sfpp", "--parallel", "2",
                         "run.device=cpu"])
    assert [c[0] for c in calls] == ["train"]
