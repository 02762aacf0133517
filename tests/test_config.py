"""Config: the shipped files load; each bad input gives one error naming its key."""

import dataclasses
import random
from pathlib import Path

import pytest

from sfpp_ray.config import ConfigError, guide_dir, load_config, load_section, saved_guides

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def weights_dir(path: Path) -> Path:
    """A directory holding a weights file whose header reads (validation reads no further)."""
    from safetensors.torch import save_file
    import torch

    path.mkdir(exist_ok=True)
    save_file({"x": torch.zeros(2)}, path / "diffusion_pytorch_model.safetensors")
    return path


def test_shipped_configs_load(tmp_path):
    cfg = load_config(TINY)
    assert cfg.student.frames_per_block == 3
    weights = weights_dir(tmp_path / "w")
    wan = load_config(ROOT / "configs" / "wan2.1_t2v_1.3b.yaml",
                      [f"model.pretrained={weights}", f"text.path={weights}", f"codec.path={weights}"])
    assert (wan.student.window_frames, wan.student.sink_frames, wan.schedule.denoising_steps) == (21, 0, [1000, 750, 500, 250])
    assert (wan.dmd.guidance, wan.trainer.generator_lr, wan.trainer.critic_lr, wan.trainer.betas) == (3.0, 2e-6, 4e-7, [0.0, 0.999])
    assert (wan.dmd.update_ratio, wan.trainer.ema_decay, wan.trainer.ema_start_step, wan.trainer.grad_clip) == (5, 0.99, 200, 10.0)
    assert (wan.ode.euler_steps, wan.ode.shift, wan.ode.guidance) == (48, 8.0, 6.0)
    big = load_config(ROOT / "configs" / "wan2.1_t2v_1.3b_teacher14b.yaml",
                      [f"model.pretrained={weights}", f"teacher_model.pretrained={weights}", f"text.path={weights}",
                       f"codec.path={weights}"])
    assert (big.teacher_model.num_layers, big.teacher_model.num_attention_heads, big.teacher_model.ffn_dim) == (40, 40, 13824)
    assert big.model == wan.model and big.trainer.zero_stage == 3


def test_overrides_are_typed_and_dotted():
    cfg = load_config(TINY, ["trainer.num_workers=2", "data.window_sampler=beta", "run.name=x"])
    assert (cfg.trainer.num_workers, cfg.data.window_sampler, cfg.run.name) == (2, "beta", "x")
    # YAML 1.1 reads an exponent without a dot or a sign as a string; a float key takes it as the number
    cfg = load_config(TINY, ["teacher_pretrain.lr=3e-4", "dmd.timestep_shift=2E+1", "dmd.guidance=1.5e0"])
    assert (cfg.teacher_pretrain.lr, cfg.dmd.timestep_shift, cfg.dmd.guidance) == (3e-4, 20.0, 1.5)


@pytest.mark.parametrize("override,key", [
    ("student.unknown=1", "student.unknown"),
    ("nosuchsection.x=1", "nosuchsection"),
    ("trainer.num_workers=two", "trainer.num_workers"),
    ("trainer.bf16=3", "trainer.bf16"),
    ("teacher_pretrain.lr=1e-4x", "teacher_pretrain.lr"),
    ("trainer.num_workers=1e2", "trainer.num_workers"),  # an exponent makes no integer
    ("run.device=tpu", "run.device"),
    ("run.seed=-1", "run.seed"),
    ("data.window_frames=27", "data.window_frames"),  # longer than rollout.num_frames (24)
    ("rollout.num_frames=25", "rollout.num_frames"),  # not divisible by the block size
    ("student.sink_frames=6", "student.sink_frames"),  # sink >= window
    ("student.window_frames=7", "student.window_frames"),
    ("model.pretrained=/nonexistent/wan", "model.pretrained"),
    ("data.prompts=/nonexistent/prompts.txt", "data.prompts"),
    ("schedule.denoising_steps=[250,500]", "schedule.denoising_steps"),
    ("trainer.zero_stage=4", "trainer.zero_stage"),
    ("model.in_channels=16", "model.in_channels"),  # the tiny codec makes 12
    ("text.kind=umt5", "text.path"),
    ("grpo.reward=raft", "grpo.raft_weights"),
    ("run.stages=[dmd,ode]", "run.stages"),
    ("teacher_pretrain.warmup_steps=20", "teacher_pretrain.warmup_steps"),  # not below steps (20)
    ("teacher_pretrain.ema_decay=1.0", "teacher_pretrain.ema_decay"),
    ("trainer.ema_decay=1.0", "trainer.ema_decay"),
    ("trainer.ema_start_step=-1", "trainer.ema_start_step"),
    ("teacher_pretrain.lr_schedule=linear", "teacher_pretrain.lr_schedule"),
    ("teacher_pretrain.data_workers=-1", "teacher_pretrain.data_workers"),
    ("teacher_pretrain.train_text_encoder=maybe", "teacher_pretrain.train_text_encoder"),
    ("teacher_pretrain.autocast=maybe", "teacher_pretrain.autocast"),
    ("teacher_pretrain.compile=yes", "teacher_pretrain.compile"),
    ("teacher_pretrain.timestep_shift=0", "teacher_pretrain.timestep_shift"),
    ("teacher_pretrain.sprite_weight=-1", "teacher_pretrain.sprite_weight"),
    ("teacher_pretrain.time_limit_minutes=-5", "teacher_pretrain.time_limit_minutes"),
    ("teacher_pretrain.extra_ema_decays=[0.999,1.0]", "teacher_pretrain.extra_ema_decays"),
    ("trainer.fused_optimizer=maybe", "trainer.fused_optimizer"),
    ("teacher_pretrain.timestep_distribution=normal", "teacher_pretrain.timestep_distribution"),
    ("dmd.timestep_shift=-1", "dmd.timestep_shift"),
    ("ode.guidance_interval=[0.8,0.3]", "ode.guidance_interval"),
    ("ode.guidance_interval=[0.5]", "ode.guidance_interval"),
    ("ode.eta=1.5", "ode.eta"),
    ("ode.eta=-0.1", "ode.eta"),
    ("ode.autoguidance=0.5", "ode.autoguidance"),
    ("ode.autoguidance=2", "ode.guide"),  # on without a guide
    ("ode.guide=/nonexistent/guide_step100", "ode.guide"),
    ("teacher_pretrain.guide_steps=[0]", "teacher_pretrain.guide_steps"),
    ("teacher_pretrain.guide_steps=[20]", "teacher_pretrain.guide_steps"),  # tiny.yaml trains 20 steps
    ("grpo.micro_batch=3", "grpo.micro_batch"),  # does not divide the group of 2
    ("world.sprite_count=[3,2]", "world.sprite_count"),
    ("world.size=[0.1]", "world.size"),
    ("world.speed=[0.5,0.2]", "world.speed"),
    ("world.backgrounds=[stripes]", "world.backgrounds[0]"),
    ("world.backgrounds=[]", "world.backgrounds"),
    ("student", "student"),
    ("rollout.switch_cache=drop", "rollout.switch_cache"),
    ("rollout.switch_prob=1.5", "rollout.switch_prob"),
    ("rollout.switch_prob=0.5", "rollout.switch_prob"),  # tiny.yaml's batch of 1 has no other prompt to switch to
    ("serve.port=0", "serve.port"),
    ("serve.port=70000", "serve.port"),
    ("serve.max_streams=0", "serve.max_streams"),
    ("serve.max_seconds=-1", "serve.max_seconds"),
    ("serve.gpus_per_replica=-0.5", "serve.gpus_per_replica"),
    ("serve.jpeg_quality=101", "serve.jpeg_quality"),
    ("serve.realtime=sometimes", "serve.realtime"),
])
def test_bad_input_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert e.value.key == key
    assert str(e.value).startswith(f"config key '{key}'")


def test_teacher_compiles_only_below_zero3():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["teacher_pretrain.compile=inductor", "trainer.zero_stage=3"])
    assert e.value.key == "teacher_pretrain.compile"
    assert load_config(TINY, ["teacher_pretrain.compile=inductor", "trainer.zero_stage=2"]).teacher_pretrain.compile == "inductor"


def test_extra_averages_are_refused_with_checkpoints_that_would_lose_them():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["teacher_pretrain.extra_ema_decays=[0.9999]", "teacher_pretrain.checkpoint_every=5"])
    assert e.value.key == "teacher_pretrain.extra_ema_decays"
    assert load_config(TINY, ["teacher_pretrain.extra_ema_decays=[0.9999]"]).teacher_pretrain.extra_ema_decays == [0.9999]


def test_cuda_graphs_are_a_mode_of_the_inductor_compiler():
    for backend in ("none", "aot_eager"):
        with pytest.raises(ConfigError) as e:
            load_config(TINY, [f"teacher_pretrain.compile={backend}", "teacher_pretrain.compile_mode=reduce-overhead"])
        assert e.value.key == "teacher_pretrain.compile_mode"
    cfg = load_config(TINY, ["teacher_pretrain.compile=inductor", "teacher_pretrain.compile_mode=reduce-overhead"])
    assert cfg.teacher_pretrain.compile_mode == "reduce-overhead"


def test_the_streaming_step_s_compile_mode_is_checked_and_reaches_the_student():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["student.compile=max-autotune"])
    assert e.value.key == "student.compile"
    from sfpp_ray import components

    for mode in ("none", "default", "reduce-overhead"):
        cfg = load_config(TINY, [f"student.compile={mode}"])
        assert components.build_student(cfg).layout.compile == mode


def test_missing_file_is_a_clear_error():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/none.yaml")


def test_world_section_sets_the_scenes():
    from sfpp_ray.components import world_of
    from sfpp_ray.world.sprites import sample_scenes

    cfg = load_config(TINY, ["world.sprite_count=[2,3]", "world.size=[0.2,0.25]", "world.backgrounds=[texture]"])
    world = world_of(cfg)
    assert (world.height, world.width, world.fps) == (cfg.video.height, cfg.video.width, cfg.video.fps)
    for scene in sample_scenes(int(__import__("random").randrange(2**31)), 20, world=world):
        assert 2 <= len(scene.sprites) <= 3 and scene.background.kind == "texture"
        assert all(0.2 * world.short_side <= s.radius <= 0.25 * world.short_side for s in scene.sprites)


def test_saved_guides_are_found_in_step_order(tmp_path):
    for step in (1000, 200, 50):
        guide_dir(tmp_path, step).mkdir()
    (tmp_path / "guide_stepx").mkdir()
    (tmp_path / "text_encoder").mkdir()
    assert saved_guides(tmp_path) == [tmp_path / "guide_step50", tmp_path / "guide_step200", tmp_path / "guide_step1000"]


def test_a_guide_this_run_saves_need_not_exist_yet(tmp_path):
    guide = tmp_path / "g" / "teacher" / "guide_step10"
    made_here = [f"run.output_dir={tmp_path}", "run.name=g", "teacher_pretrain.guide_steps=[10]", "ode.autoguidance=2",
                 f"ode.guide={guide}"]
    assert load_config(TINY, made_here).ode.guide == str(guide)
    for missing in ("teacher_pretrain.guide_steps=[5]", "run.stages=[ode,dmd]"):  # another step; no teacher stage
        with pytest.raises(ConfigError) as e:
            load_config(TINY, [*made_here, missing])
        assert e.value.key == "ode.guide"


def test_a_section_loads_without_the_paths_other_sections_need(tmp_path):
    wan = ROOT / "configs" / "wan2.1_t2v_1.3b.yaml"
    with pytest.raises(ConfigError, match="text.path"):  # the whole config wants the encoder's directory
        load_config(wan)
    whole = load_config(wan, [f"{k}={weights_dir(tmp_path)}" for k in ("model.pretrained", "text.path", "codec.path")])
    assert load_section(wan, "model") == dataclasses.replace(whole.model, pretrained=None)
    layers, heads = random.randint(1, 50), random.randint(1, 16)
    own = tmp_path / "own.yaml"
    own.write_text(f"model: {{num_layers: {layers}, num_attention_heads: {heads}}}\ntext: {{kind: umt5}}\n")
    model = load_section(own, "model")
    assert (model.num_layers, model.num_attention_heads) == (layers, heads)
    own.write_text("model: {num_layer: 3}\n")
    with pytest.raises(ConfigError, match="model.num_layer"):
        load_section(own, "model")
    with pytest.raises(ConfigError, match="unknown section"):
        load_section(wan, "modle")


@pytest.mark.parametrize("override, key", [
    ("dmd.guidance=.nan", "dmd.guidance"), ("schedule.shift=.nan", "schedule.shift"),
    ("trainer.critic_lr=.nan", "trainer.critic_lr"), ("trainer.generator_lr=-1e-4", "trainer.generator_lr"),
    ("grpo.lr=0", "grpo.lr"), ("rollout.cpus_per_worker=-1", "rollout.cpus_per_worker"),
    ("trainer.betas=[0.0", "trainer.betas"), ("dmd.steps=0", "dmd.steps"), ("ode.steps=-3", "ode.steps"),
    ("trainer.checkpoint_every=-1", "trainer.checkpoint_every"), ("teacher_pretrain.lr_floor=1.5", "teacher_pretrain.lr_floor"),
    ("teacher_pretrain.prompt_dropout=1", "teacher_pretrain.prompt_dropout"), ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.gpus_per_worker=-0.5", "trainer.gpus_per_worker"), ("trainer.cpus_per_worker=0", "trainer.cpus_per_worker"),
    ("video.fps=.inf", "video.fps"),
    ("model.patch_size=[1,0,2]", "model.patch_size"), ("model.eps=0", "model.eps"), ("text.max_length=0", "text.max_length"),
    ("codec.temporal_factor=0", "codec.temporal_factor"), ("buffer.max_staleness=-1", "buffer.max_staleness"),
    ("data.num_actors=0", "data.num_actors"), ("trainer.weight_decay=-0.1", "trainer.weight_decay"),
    ("ode.shift=0", "ode.shift"), ("ode.guidance=-1", "ode.guidance"), ("dmd.guidance=-3", "dmd.guidance"),
    ("grpo.clip=0", "grpo.clip"), ("grpo.advantage_clip=-1", "grpo.advantage_clip"), ("grpo.kl_coef=-0.1", "grpo.kl_coef"),
    ("grpo.min_motion=-1", "grpo.min_motion"), ("evaluation.seed=-1", "evaluation.seed"),
    ("video.width=4", "video.width"), ("video.height=-16", "video.height"),
    ("schedule.num_train_timesteps=0", "schedule.num_train_timesteps"), ("trainer.max_bad_steps=0", "trainer.max_bad_steps"),
])
def test_a_bad_value_is_refused_naming_its_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert e.value.key == key and str(e.value).startswith(f"config key '{key}'")

