"""Building components from the config: the autoguidance guide at its own shape, a student's saved layout."""

import dataclasses
from pathlib import Path

import torch

from sfpp_ray import components
from sfpp_ray.algorithm.ode_init import Guide, make_ode_trajectories
from sfpp_ray.config import load_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_a_smaller_guide_is_built_at_its_own_shape_and_steers_the_sampler(tmp_path):
    cfg = load_config(TINY)
    small = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=1, ffn_dim=16,
                                                               init_seed=int(torch.randint(1, 2**31, ()))))
    saved = components.build_teacher(small)
    saved.save_pretrained(tmp_path / "guide")
    guided = load_config(TINY, ["ode.autoguidance=2", f"ode.guide={tmp_path / 'guide'}"])
    guide, text = components.build_guide(guided)
    assert (guide.config.num_layers, guide.config.ffn_dim) == (1, 16) != (cfg.model.num_layers, cfg.model.ffn_dim)
    assert all(torch.equal(p, saved.state_dict()[k]) for k, p in guide.state_dict().items())
    assert components.build_guide(cfg) is None  # autoguidance off

    teacher, prompts = components.build_teacher(cfg), ["two red squares", "a blue circle"]
    noise, cond, uncond = torch.randn(2, 12, 6, 8, 8), text.encode(prompts), text.encode([cfg.text.negative_prompt])
    steps = torch.tensor([1000.0])
    steered = make_ode_trajectories(teacher, cond, uncond, noise, steps, guided.ode, components.build_schedule(cfg),
                                    Guide(guide, text.encode(prompts)))
    plain = make_ode_trajectories(teacher, cond, uncond, noise, steps, cfg.ode, components.build_schedule(cfg))
    assert steered.shape == plain.shape and not torch.allclose(steered, plain, atol=1e-4)


def random_layout(unlike: dict | None = None) -> dict:
    """A student layout the tiny config accepts: 1-3 frames a block, a window of whole blocks, no sinks or one block."""
    while True:
        fpb = int(torch.randint(1, 4, ()))
        sink = fpb * int(torch.randint(0, 2, ()))
        layout = {"frames_per_block": fpb, "window_frames": sink + fpb * int(torch.randint(1, 4, ())),
                  "sink_frames": sink, "position_rule": ["window_relative", "absolute"][int(torch.randint(0, 2, ()))]}
        if unlike is None or layout["window_frames"] != unlike["window_frames"]:
            return layout


def overrides(layout: dict) -> list[str]:
    return [f"student.{k}={v}" for k, v in layout.items()]


def test_with_student_layout_restores_the_layout_the_student_was_saved_with(tmp_path):
    saved = random_layout()
    components.build_student(load_config(TINY, overrides(saved))).save_pretrained(tmp_path / "student")
    cfg = load_config(TINY, overrides(random_layout(saved)) + ["student.attention=sdpa"])
    restored = components.with_student_layout(cfg, str(tmp_path / "student"))
    expected = cfg.to_dict()
    expected["student"].update(saved)  # the attention kernel stays the config's
    assert restored.to_dict() == expected != cfg.to_dict()

    components.build_teacher(cfg).save_pretrained(tmp_path / "teacher")  # weights without a layout
    assert components.with_student_layout(cfg, str(tmp_path / "teacher")) is cfg
    assert components.with_student_layout(cfg, None) is cfg
    # training builds from its config: a variant may train a student saved with another window
    student = components.build_student(cfg, checkpoint=str(tmp_path / "student"))
    assert student.layout == components.layout(cfg) != components.layout(restored)


def test_a_student_saved_with_its_run_s_text_encoder_generates_with_it_from_the_base_config(tmp_path):
    """The stages train with a text encoder loaded from text.path (the one trained with the teacher); the saved
    student carries it, and streaming from the directory with the base config conditions on it: the same frames
    as the training config streams, other frames than the base config's own tiny encoder."""
    from sfpp_ray.distributed.engine import save_student
    from sfpp_ray.evaluation.evaluate import FrameList
    from sfpp_ray.generate import VideoGenerator
    from sfpp_ray.models.text_encoder import TextEncoder

    base = load_config(TINY, [f"run.output_dir={tmp_path}"])
    TextEncoder.tiny(base.model.text_dim, base.text.max_length, seed=int(torch.randint(1, 2**31, ()))).save_pretrained(
        tmp_path / "teacher")
    trained = load_config(TINY, [f"run.output_dir={tmp_path}", "text.kind=umt5", f"text.path={tmp_path / 'teacher'}"])
    save_student(components.build_student(trained), trained, tmp_path / "student")
    save_student(components.build_student(base), base, tmp_path / "student_base")  # a built-in encoder: nothing to carry
    assert not (tmp_path / "student_base" / "text_encoder").exists()
    assert components.with_student_layout(base, str(tmp_path / "student")).text.path == str(tmp_path / "student")
    # the codec it names wins over the config's: a student decodes its latents as it was trained to (here as many
    # channels, from 4 frames of 1x1 pixels instead of 1 frame of 2x2)
    other = load_config(TINY, [f"run.output_dir={tmp_path}", "codec.spatial_factor=1", "codec.temporal_factor=4"])
    save_student(components.build_student(other), other, tmp_path / "student_other_codec")
    assert components.with_student_layout(base, str(tmp_path / "student_other_codec")).codec == other.codec != base.codec
    assert components.with_student_layout(other, str(tmp_path / "student")).codec == base.codec
    loose = tmp_path / "teacher" / "student.pt"  # a weights file beside an encoder, not in a model directory
    torch.save(components.build_student(base).state_dict(), loose)
    assert components.with_student_layout(base, str(loose)) is base

    seed = int(torch.randint(0, 2**31, ()))

    def stream(cfg, checkpoint):
        frames = FrameList()
        VideoGenerator(cfg, checkpoint).stream("two red squares", 6, frames, seed=seed)
        return frames.video()

    from_directory = stream(base, str(tmp_path / "student"))
    assert (from_directory == stream(trained, str(tmp_path / "student_base"))).all()
    assert (from_directory != stream(base, str(tmp_path / "student_base"))).any()


def with_larger_teacher(cfg, **shape):
    """The config with a teacher of another shape than the student's (as a 14B teacher of a 1.3B student)."""
    from sfpp_ray.config import from_dict

    tree = cfg.to_dict()
    tree["teacher_model"] = tree["model"] | shape
    return from_dict(tree)


def test_a_teacher_of_another_shape_is_the_real_score_of_a_dmd_step():
    from sfpp_ray.algorithm.dmd import dmd_generator_loss

    seed = int(torch.randint(0, 2**31, ()))
    cfg = with_larger_teacher(load_config(TINY, [f"model.init_seed={seed}"]), num_layers=3, num_attention_heads=4,
                              attention_head_dim=8, ffn_dim=96, init_seed=seed + 1)
    teacher, critic = components.build_teacher(cfg), components.build_critic(cfg)
    student = components.build_student(cfg)
    assert (len(teacher.blocks), teacher.config.num_attention_heads, teacher.config.ffn_dim) == (3, 4, 96)
    assert all((len(m.blocks), m.config.num_attention_heads) == (2, 2) for m in (critic, student))
    assert not any(p.requires_grad for p in teacher.parameters())
    text = torch.randn(1, 7, cfg.model.text_dim)
    x0 = torch.randn(2, 12, 3, 8, 8, requires_grad=True)
    loss, metrics = dmd_generator_loss(x0, teacher, critic, text, torch.randn(1, 7, cfg.model.text_dim),
                                       components.build_schedule(cfg), cfg.dmd, torch.Generator().manual_seed(seed))
    loss.backward()
    assert torch.isfinite(x0.grad).all() and metrics["dmd_grad_norm"] > 0
    # the same step with the student's own shape as teacher is another real score
    same = dmd_generator_loss(x0.detach(), components.build_teacher(load_config(TINY, [f"model.init_seed={seed}"])),
                              critic, text, torch.randn(1, 7, cfg.model.text_dim), components.build_schedule(cfg),
                              cfg.dmd, torch.Generator().manual_seed(seed))[1]
    assert same["dmd_grad_norm"] != metrics["dmd_grad_norm"]


def test_a_teacher_of_another_shape_takes_the_trained_teachers_weights(tmp_path):
    from sfpp_ray.config import with_teacher

    cfg = with_larger_teacher(load_config(TINY), num_layers=3)
    components.build_teacher(cfg).save_pretrained(tmp_path / "teacher")
    chained = with_teacher(cfg, tmp_path / "teacher")
    assert chained.teacher_model.pretrained == str(tmp_path / "teacher") and chained.model.pretrained is None
    loaded, saved = components.build_teacher(chained), components.build_teacher(cfg)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), saved.state_dict().values()))


def test_a_teacher_that_reads_other_latents_or_text_is_refused_naming_the_key():
    import pytest

    from sfpp_ray.config import ConfigError

    for key, value in (("text_dim", 64), ("in_channels", 16), ("patch_size", [1, 1, 1])):
        with pytest.raises(ConfigError) as e:
            with_larger_teacher(load_config(TINY), **{key: value})
        assert e.value.key == f"teacher_model.{key}"
