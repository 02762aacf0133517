"""Every training stage on the Ray Train + DeepSpeed stack, in order, at toy size on CPU: the
teacher's pretraining, ODE initialisation, Self-Forcing++ DMD and GRPO, then a re-run that skips them."""

import dataclasses
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from sfpp_ray import components, reruns
from sfpp_ray.algorithm.ode_init import OdePairStore
from sfpp_ray.config import ConfigError, ema_dir, guide_dir, load_config, with_teacher
from sfpp_ray.distributed.teacher_trainer import READ_BACK_EVERY
from sfpp_ray.distributed.engine import EMA_SHARD_FILE, STATE_FILE
from sfpp_ray.distributed.weight_sync import state_checksum
from sfpp_ray.models.text_encoder import PromptConditioned
from sfpp_ray.video_io import read_video

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"
STAGES = ["pretrain_teacher", "ode", "dmd", "grpo"]
OUTPUTS = {"pretrain_teacher": "teacher", "ode": "student_ode", "dmd": "student", "grpo": "student_grpo"}


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    """One run of all four stages, then the same run again."""
    from sfpp_ray.distributed.controller import train

    out = tmp_path_factory.mktemp("stages")
    cfg = load_config(CONFIG, [
        f"run.output_dir={out}", "run.name=stages", f"run.stages={STAGES}",
        "rollout.num_frames=12", "rollout.cpus_per_worker=0.5", "ode.num_pairs=4", "ode.steps=4", "dmd.steps=2",
        "trainer.batch_size=2", "rollout.batch_size=2",  # two windows a step, two prompts a rollout
        "dmd.update_ratio=1", "grpo.steps=2", "tracking.experiment=sfpp-stages",
        # the interruption test below covers float32 and the plain loss; this run weighs the loss towards
        # sprites and draws its noise levels around the middle
        "teacher_pretrain.autocast=true",
        "teacher_pretrain.sprite_weight=3", "teacher_pretrain.timestep_distribution=logit_normal",
        # the teacher stage saves its step-10 EMA, and the ODE pairs steer away from it (autoguidance)
        "teacher_pretrain.guide_steps=[10]", "ode.autoguidance=2",
        f"ode.guide={out / 'stages' / 'teacher' / 'guide_step10'}",
    ])
    first = train(cfg)
    grpo_checksum = state_checksum(components.build_student(cfg, checkpoint=first["student"]))
    return cfg, first, train(cfg), grpo_checksum


def metric_history(summary: dict, key: str) -> list[float]:
    client = MlflowClient(summary["mlflow_uri"])
    return [m.value for m in sorted(client.get_metric_history(summary["mlflow_run_id"], key), key=lambda m: m.step)]


def test_every_stage_runs_in_order_and_leaves_loadable_weights(runs):
    cfg, first, _, _ = runs
    assert first["stages_run"] == STAGES and first["stages_skipped"] == []
    for stage, name in OUTPUTS.items():
        assert (cfg.run_dir / name / "stage.json").is_file(), stage
    components.build_teacher(load_config(CONFIG, [f"model.pretrained={cfg.run_dir / 'teacher'}"]))
    for name in ("student_ode", "student", "student_grpo"):
        components.build_student(cfg, checkpoint=str(cfg.run_dir / name))
    assert first["student"] == str(cfg.run_dir / "student_grpo")  # the evaluation video shows the last student
    assert Path(first["video"]).is_file()
    frames = read_video(first["video"])  # twice the teacher's horizon, counted in the codec's video frames
    assert len(frames) == components.build_video_codec(cfg).video_frames(2 * cfg.video.teacher_frames)



def test_train_ends_with_a_summary_naming_what_it_wrote(runs):
    """The run directory, each stage's output (the evaluation video's student marked), the video and the MLflow run,
    each path one that exists."""
    from sfpp_ray.distributed.controller import closing_summary

    cfg, first, second, _ = runs
    head, *rows = closing_summary(cfg, first).splitlines()
    assert head == f"run 'stages' in {cfg.run_dir}: ran {', '.join(STAGES)}"
    paths = {row.split()[0]: row.split()[1] for row in rows}
    assert list(paths) == [*STAGES, "video", "MLflow"]
    assert all(paths[s] == str(cfg.run_dir / OUTPUTS[s]) and Path(paths[s]).is_dir() for s in STAGES)
    assert rows[STAGES.index("grpo")].endswith("(student)") and paths["video"] == first["video"]
    assert rows[-1].endswith(f"run {first['mlflow_run_id']} at {first['mlflow_uri']} "
                             f"(mlflow ui --backend-store-uri {first['mlflow_uri']})")
    assert closing_summary(cfg, second).splitlines()[0].endswith(f"ran no stage; skipped {', '.join(STAGES)} "
                                                                 "(finished earlier)")


def test_teacher_flow_matching_loss_decreases(runs):
    """Trained under bf16 autocast, saved in float32."""
    cfg, first, _, _ = runs
    saved = load_file(cfg.run_dir / "teacher" / "diffusion_pytorch_model.safetensors")
    assert {w.dtype for w in saved.values()} == {torch.float32}
    losses = metric_history(first, "teacher/loss")
    assert len(losses) == cfg.teacher_pretrain.steps
    assert losses == pytest.approx(json.loads((cfg.run_dir / "teacher" / "stage.json").read_text())["losses"])
    assert sum(losses[-5:]) < sum(losses[:5])


def test_text_encoder_trained_with_the_teacher_is_saved_and_used_by_later_stages(runs):
    from sfpp_ray.distributed.controller import _stage_config

    cfg, _, _, _ = runs
    teacher_dir = cfg.run_dir / "teacher"
    later = _stage_config(cfg, "dmd")
    assert (later.text.kind, later.text.path, later.model.pretrained) == ("umt5", str(teacher_dir), str(teacher_dir))
    trained = components.build_text_encoder(later).encoder.state_dict()
    untrained = components.build_text_encoder(cfg).encoder.state_dict()
    assert trained.keys() == untrained.keys()
    assert all(not torch.equal(trained[k], untrained[k]) for k in trained)


def test_ode_student_starts_from_the_teacher_and_moves_away(runs):
    cfg, first, _, _ = runs
    assert len(json.loads((cfg.run_dir / "ode_pairs" / "index.json").read_text())["shards"]) == 1
    teacher_cfg = load_config(CONFIG, [f"model.pretrained={cfg.run_dir / 'teacher'}"])
    teacher = components.build_student(teacher_cfg).state_dict()
    student = components.build_student(cfg, checkpoint=str(cfg.run_dir / "student_ode")).state_dict()
    assert teacher.keys() == student.keys()
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)
    assert len(metric_history(first, "ode/loss")) == cfg.ode.steps


def test_ode_pairs_steer_away_from_the_guide_the_teacher_stage_saved(runs):
    """The guide is the teacher (and its text encoder) as it stood at step 10; the stored ODE pairs are the
    autoguided sampler's, not the plain one's."""
    from sfpp_ray.distributed.controller import _stage_config
    from sfpp_ray.distributed.ode_trainer import _ode_shard

    cfg, _, _, _ = runs
    ode_cfg = _stage_config(cfg, "ode")
    guide_cfg = with_teacher(ode_cfg, cfg.ode.guide)
    assert guide_cfg.text.path == cfg.ode.guide  # saved with the text encoder it was trained with
    guide, teacher = components.build_teacher(guide_cfg).state_dict(), components.build_teacher(ode_cfg).state_dict()
    assert any(not torch.equal(guide[k], teacher[k]) for k in teacher)

    text, codec, schedule = (components.build_text_encoder(ode_cfg), components.build_video_codec(ode_cfg),
                             components.build_schedule(ode_cfg))
    made = lambda c, guide: _ode_shard(components.build_teacher(c), c, 0, cfg.ode.num_pairs, text, codec, schedule,
                                       schedule.student_timesteps(c.schedule), text.encode([c.text.negative_prompt]),
                                       torch.device("cpu"), torch.float32, guide)
    autoguided, prompts = made(ode_cfg, components.build_guide(ode_cfg))
    plain, _ = made(dataclasses.replace(ode_cfg, ode=dataclasses.replace(ode_cfg.ode, autoguidance=1.0)), None)
    stored = OdePairStore(cfg.run_dir / "ode_pairs")
    assert [stored.load(i)[1] for i in range(len(stored))] == prompts
    stored = torch.stack([stored.load(i)[0] for i in range(len(stored))])
    torch.testing.assert_close(stored, autoguided)
    assert not torch.allclose(stored[:, -1], plain[:, -1], atol=1e-4)


def test_grpo_rewards_are_finite_and_the_group_replayed_in_parts_updates_the_student(runs):
    cfg, first, _, grpo_checksum = runs
    rewards = metric_history(first, "grpo/reward")
    assert len(rewards) == cfg.grpo.steps and all(math.isfinite(r) for r in rewards)
    assert all(math.isfinite(x) for x in metric_history(first, "grpo/loss"))
    assert cfg.grpo.micro_batch < cfg.grpo.group_size  # tiny.yaml: one update from several backward passes
    assert state_checksum(components.build_student(cfg, checkpoint=str(cfg.run_dir / "student"))) != grpo_checksum


def test_rerun_skips_finished_stages(runs):
    cfg, first, second, grpo_checksum = runs
    assert second["stages_run"] == [] and second["stages_skipped"] == STAGES
    assert all(reruns.saved_stage_config(cfg, s) == cfg.flat() for s in STAGES)  # what the rerun compared with
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert state_checksum(components.build_student(cfg, checkpoint=second["student"])) == grpo_checksum


def test_a_changed_key_is_refused_and_restart_runs_the_stage_again(runs, tmp_path):
    """A GRPO-only run whose stage finished (the fixture's GRPO student, recorded as made with some grpo.lr): run
    again unchanged it is skipped; with another grpo.lr it is refused naming the key; with restart it trains again
    and saves the new config, which a further run then agrees with."""
    from sfpp_ray.distributed.controller import train

    cfg, _, _, _ = runs
    lr = random.choice([1e-6, 3e-6, 1e-5])
    keys = [f"run.output_dir={tmp_path}", "run.name=again", "run.stages=[grpo]", f"student.checkpoint={cfg.run_dir / 'student'}",
            "grpo.steps=1", "grpo.group_size=2", "grpo.micro_batch=1", "tracking.enabled=false"]
    before, changed = (load_config(CONFIG, [*keys, f"grpo.lr={x}"]) for x in (lr, lr * 2))
    shutil.copytree(cfg.run_dir / "student_grpo", before.run_dir / "student_grpo")
    reruns.save_stage_config(reruns.absolute_paths(before), "grpo")
    assert train(before, evaluation_video=False)["stages_skipped"] == ["grpo"]
    with pytest.raises(reruns.RerunRefused, match=rf"finished stage grpo with other settings: grpo.lr {lr} -> {lr * 2};"):
        train(changed, evaluation_video=False)
    again = train(changed, evaluation_video=False, restart="grpo")
    assert again["stages_run"] == ["grpo"] and again["stages"]["grpo"]["record"]["steps"] == 1  # the fixture's had 2
    assert reruns.saved_stage_config(changed, "grpo")["grpo.lr"] == lr * 2
    assert train(changed, evaluation_video=False)["stages_skipped"] == ["grpo"]


def test_generate_from_a_student_directory_alone_makes_the_run_s_evaluation_video(runs, tmp_path):
    """Every student carries the text encoder trained with the teacher: `generate --checkpoint` with the base
    config (a built-in tiny encoder) streams the frames of the run's own evaluation video, for its prompt and
    seed; the training config streams them from a copy without that encoder, the base config does not."""
    from sfpp_ray.distributed.controller import _stage_config
    from sfpp_ray.distributed.prompts import load_prompts
    from sfpp_ray.generate import generate
    from sfpp_ray.seeding import seed_for

    cfg, first, _, _ = runs
    for name in ("student_ode", "student", "student_grpo"):
        assert (cfg.run_dir / name / "text_encoder" / "config.json").is_file(), name
    prompt = load_prompts(cfg.data.prompts, cfg.data.max_prompt_chars)[0][0]
    seconds = 2 * cfg.video.teacher_frames / cfg.video.fps  # the evaluation video's length
    made = lambda c, student, out: read_video(generate(c, prompt, seconds, tmp_path / out, checkpoint=str(student),
                                                       seed=seed_for(cfg.run.seed, "evaluation_video"),
                                                       progress=False)["path"])
    evaluation = read_video(first["video"])
    assert (made(cfg, first["student"], "student.mp4") == evaluation).all()
    bare = shutil.copytree(first["student"], tmp_path / "bare", ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    assert (made(_stage_config(cfg, "grpo"), bare, "trained.mp4") == evaluation).all()
    assert (made(cfg, bare, "bare.mp4") != evaluation).any()


def test_teacher_learning_rate_warms_up_then_decays_to_a_tenth():
    from sfpp_ray.distributed.engine import lr_factor

    steps, warmup = 100, 10
    cosine = [lr_factor(i, steps, warmup, "cosine") for i in range(steps)]
    assert cosine[:warmup] == pytest.approx([(i + 1) / warmup for i in range(warmup)])
    assert cosine[warmup] == pytest.approx(1.0) and cosine[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cosine[warmup:], cosine[warmup + 1:]))
    assert [lr_factor(i, steps, 0, "constant") for i in range(steps)] == [1.0] * steps


def test_a_run_asks_the_cluster_only_for_the_cpus_of_the_stages_it_runs(ray_cluster, tmp_path):
    """Rollout workers and Ray Data hold CPUs during the dmd stage only: a teacher stage beside rollout
    settings the 4-CPU cluster could not hold is not refused for them; a dmd stage is, before it starts,
    naming the keys to lower."""
    from sfpp_ray.distributed.controller import cpus_needed, train

    crowded = ["rollout.num_workers=4", "rollout.cpus_per_worker=1", "trainer.num_workers=2",
               "trainer.cpus_per_worker=1", "tracking.enabled=false",
               f"run.output_dir={tmp_path}", "run.name=cpus"]
    cfg = load_config(CONFIG, [*crowded, "run.stages=[pretrain_teacher,dmd]"])
    assert cpus_needed(cfg, ["pretrain_teacher", "ode"]) == 2 and cpus_needed(cfg, ["dmd"]) >= 7
    with pytest.raises(RuntimeError, match=r"needs \d+ CPUs .*rollout.num_workers.*has 4"):
        train(cfg)
    assert not (tmp_path / "cpus" / "teacher").exists()  # refused before any stage began


@pytest.mark.parametrize("zero_stage, ranks", [(2, 2), (3, 1)])
def test_interrupted_teacher_pretraining_goes_on_from_its_checkpoint(ray_cluster, tmp_path, saved_average, zero_stage,
                                                                     ranks):
    """A run stopped after its step-2 checkpoint (marker and weights gone) resumes there and ends where an
    uninterrupted run ends: the same losses for every step and the same weights. The moving average is
    split over the ranks and saved by each: under ZeRO-3 per partition, under ZeRO-2 on two ranks per
    whole parameter."""
    from sfpp_ray.distributed.controller import train

    cfg_overrides = [f"run.output_dir={tmp_path}", "run.name=resume", "run.stages=[pretrain_teacher]",
                     "teacher_pretrain.steps=4", "teacher_pretrain.checkpoint_every=2",
                     "teacher_pretrain.ema_start_step=1", "teacher_pretrain.guide_steps=[2]",
                     f"trainer.zero_stage={zero_stage}", f"trainer.num_workers={ranks}", "tracking.enabled=false"]
    cfg = load_config(CONFIG, cfg_overrides)
    first = train(cfg)["stages"]["pretrain_teacher"]["record"]
    teacher = cfg.run_dir / "teacher"
    def saved_weights():  # the teacher's and the text encoder's trained with it
        trained = with_teacher(cfg, teacher)
        return components.build_teacher(trained).state_dict() | {
            f"text.{k}": v for k, v in components.build_text_encoder(trained).encoder.state_dict().items()}

    weights = saved_weights()
    # the guide saved at step 2 is the EMA the step-2 checkpoint holds, not the live weights it trained on with
    checkpoint, = [f.parent for f in (cfg.run_dir / "ray_train").rglob(STATE_FILE)]
    assert torch.load(checkpoint / STATE_FILE, weights_only=False)["step"] == 2
    trained = PromptConditioned(components.build_critic(cfg), components.build_text_encoder(cfg))
    average = saved_average(checkpoint, trained).denoiser.state_dict()
    guide = load_file(teacher / "guide_step2" / "diffusion_pytorch_model.safetensors")
    assert guide.keys() == average.keys() and all(torch.equal(guide[k], average[k]) for k in guide)
    assert len(list(checkpoint.glob(EMA_SHARD_FILE.format(rank="*")))) == ranks  # each rank saved its part
    if zero_stage < 3:  # ZeRO-3's model states hold no whole live weights to compare with
        live, = [torch.load(f, weights_only=False)["module"] for f in checkpoint.rglob("mp_rank_00_model_states.pt")]
        assert not all(torch.equal(guide[k], live[f"denoiser.{k}"]) for k in guide)
    shutil.rmtree(teacher)
    # the checkpoint's shards are laid out per rank: another layout fails at once, naming its key
    assert json.loads((cfg.run_dir / "teacher_progress.json").read_text()) == {"step": 2, "ranks": ranks,
                                                                               "zero_stage": zero_stage}
    for key, value, saved in (("trainer.num_workers", 3 - ranks, ranks), ("trainer.zero_stage", 5 - zero_stage, zero_stage)):
        with pytest.raises(ConfigError, match=rf"'{key}'.*step 2.*set {key}={saved} "):
            train(load_config(CONFIG, [*cfg_overrides, f"{key}={value}"]))
    # below ZeRO-3 compiled (forward and backward traced, no kernels made on a CPU): the steps are the eager ones
    compiled = ["teacher_pretrain.compile=aot_eager"] if zero_stage < 3 else []
    again = train(load_config(CONFIG, [*cfg_overrides, *compiled]))["stages"]["pretrain_teacher"]["record"]
    assert first["resumed_from"] == 0 and again["resumed_from"] == 2  # steps 3-4 trained again, not 1-4
    assert first["compiled_graphs"] == 0 and again["compiled_graphs"] == len(compiled)  # the model in one graph
    assert len(again["losses"]) == 4
    assert again["losses"] == pytest.approx(first["losses"], rel=1e-5)
    resumed = saved_weights()
    assert all(torch.allclose(resumed[k], weights[k], rtol=1e-5, atol=1e-7) for k in weights)


def test_teacher_pretraining_stops_at_its_time_limit_with_the_teacher_and_the_extra_averages_it_reached(ray_cluster,
                                                                                                       tmp_path):
    """teacher_pretrain.time_limit_minutes: a stage planned for far more steps than its time allows stops at its
    first loss read-back past the limit, both ranks at the same step (the flag rides the losses' all-reduce, so
    neither waits on the other), and saves the teacher it reached; its record names that step and the plan.

    teacher_pretrain.extra_ema_decays (the same run): each further average is saved as a teacher of its own. One of
    the main average's decay saves the published teacher's weights exactly (the same trajectory averaged the same
    way, split over two ranks); another decay saves other weights; both load as teachers."""
    from sfpp_ray.distributed.controller import train

    cfg = load_config(CONFIG, [f"run.output_dir={tmp_path}", "run.name=limit", "run.stages=[pretrain_teacher]",
                               "teacher_pretrain.steps=100000", "teacher_pretrain.time_limit_minutes=1e-9",
                               "teacher_pretrain.ema_start_step=1", "teacher_pretrain.guide_steps=[50000]",
                               "teacher_pretrain.ema_decay=0.9", "teacher_pretrain.extra_ema_decays=[0.9,0.5]",
                               "trainer.num_workers=2", "trainer.zero_stage=2", "tracking.enabled=false"])
    record = train(cfg)["stages"]["pretrain_teacher"]["record"]
    assert not guide_dir(cfg.run_dir / "teacher", 50000).exists()  # not reached: named in the stop's message
    assert (record["steps"], record["planned_steps"], len(record["losses"])) == (READ_BACK_EVERY, 100000,
                                                                                  READ_BACK_EVERY)
    assert all(math.isfinite(x) for x in record["losses"])
    saved = components.build_teacher(with_teacher(cfg, cfg.run_dir / "teacher")).state_dict()
    fresh = components.build_teacher(cfg).state_dict()
    assert saved.keys() == fresh.keys() and any(not torch.equal(saved[k], fresh[k]) for k in fresh)

    assert record["extra_emas"] == [0.9, 0.5]
    teacher = cfg.run_dir / "teacher"
    weights = lambda d: components.build_teacher(with_teacher(cfg, d)).state_dict()
    main, same, other = weights(teacher), weights(ema_dir(teacher, 0.9)), weights(ema_dir(teacher, 0.5))
    assert main.keys() == same.keys() == other.keys()
    assert all(torch.equal(main[k], same[k]) for k in main)
    assert any(not torch.equal(main[k], other[k]) for k in main)


def test_teacher_pretraining_goes_on_from_a_saved_teacher(runs, tmp_path):
    """model.pretrained and text.path at a saved teacher: pretraining starts from its weights and its text
    encoder (fine-tuning), not from a random init. At a learning rate of 1e-9 two steps leave them in place."""
    from sfpp_ray.distributed.controller import train

    cfg, _, _, _ = runs
    saved = cfg.run_dir / "teacher"
    again = load_config(CONFIG, [f"run.output_dir={tmp_path}", "run.name=finetune", "run.stages=[pretrain_teacher]",
                                 "teacher_pretrain.steps=2", "teacher_pretrain.warmup_steps=0", "teacher_pretrain.lr=1e-9",
                                 "teacher_pretrain.ema_decay=0",
                                 f"model.pretrained={saved}", "text.kind=umt5", f"text.path={saved}",
                                 "tracking.enabled=false"])
    train(again)

    def weights(teacher_dir):
        trained = with_teacher(cfg, teacher_dir)
        return components.build_teacher(trained).state_dict() | {
            f"text.{k}": v for k, v in components.build_text_encoder(trained).encoder.state_dict().items()}

    start, tuned, fresh = weights(saved), weights(tmp_path / "finetune" / "teacher"), components.build_teacher(cfg).state_dict()
    assert all(torch.allclose(tuned[k], start[k], atol=1e-6) for k in start)
    assert not all(torch.allclose(tuned[k], fresh[k], atol=1e-6) for k in fresh)
