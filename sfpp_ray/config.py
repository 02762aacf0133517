"""One typed configuration tree for the whole system.

Every knob lives here, one dataclass per component. A YAML file in `configs/` plus dotted
`key=value` overrides are parsed into `Config`, type-checked field by field and cross-checked
before anything is built, so a bad value fails in one line that names its key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sfpp_ray import checks


class ConfigError(ValueError):
    """A bad configuration value; the message always starts with the dotted key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class ConfigFileError(ConfigError):
    """The config file itself is missing or unreadable; the message names the file."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.key = "--config"
        ValueError.__init__(self, f"config file {str(path)!r}: {message}")


@dataclass
class RunConfig:
    name: str = "tiny"
    output_dir: str = "outputs"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    stages: list[Literal["pretrain_teacher", "ode", "dmd", "grpo"]] = field(default_factory=lambda: ["ode", "dmd"])


@dataclass
class ModelConfig:
    """Wan transformer shape (teacher, critic and student share it) and where the teacher's weights are."""

    pretrained: str | None = None  # diffusers-format dir, or an original Wan / Self-Forcing / CausVid file
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 8960
    num_layers: int = 30
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    init_seed: int = 0  # random init when there are no weights (tests, embedded default, benchmarks)
    # What the network's output means: "flow" (Wan's own), or "sample", clean latents read as the flow
    # (x_t - x0) / sigma. Small models on large raw-pixel patches fail to cancel the noise a flow
    # carries and leave it in their samples; predicting clean frames removes that failure (not others).
    prediction: Literal["flow", "sample"] = "flow"


@dataclass
class StudentConfig:
    """The causal student: block size, rolling KV cache and its position rule."""

    checkpoint: str | None = None  # student weights; otherwise the teacher's weights are the start
    frames_per_block: int = 3
    window_frames: int = 21  # KV cache window in latent frames, the current block included
    sink_frames: int = 0
    position_rule: Literal["window_relative", "absolute"] = "window_relative"
    attention: Literal["auto", "sdpa", "flex"] = "auto"
    # Each block's clean context pass runs inside the next block's first denoising pass: the same outputs
    # (float32 within 1e-5), one forward fewer per block. Off until measured on the GPU.
    fold_context_pass: bool = False
    # the gradient-free streaming step (rollout workers, generate, GRPO's groups) under torch.compile, whole and
    # without graph breaks: element-wise chains and rotary fused, one graph a pass shape. reduce-overhead also
    # replays it as CUDA graphs (CUDA only: on a CPU it compiles as default, with a warning). Gradient passes run eager
    compile: Literal["none", "default", "reduce-overhead"] = "none"


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = 1000
    shift: float = 5.0
    denoising_steps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    warp_denoising_steps: bool = True
    context_noise: int = 0  # timestep of the clean context pass that writes the cache


@dataclass
class TextConfig:
    kind: Literal["tiny", "tiny_words", "umt5"] = "umt5"  # tiny: bytes; tiny_words: the sprite world's words
    path: str | None = None  # directory with the UMT5 encoder and its tokenizer (kind umt5)
    max_length: int = 512
    negative_prompt: str = ""


@dataclass
class CodecConfig:
    kind: Literal["pixel_unshuffle", "wan_vae"] = "wan_vae"
    path: str | None = None  # diffusers AutoencoderKLWan directory (kind wan_vae)
    spatial_factor: int = 2  # pixel_unshuffle only
    temporal_factor: int = 1  # pixel_unshuffle only


@dataclass
class VideoConfig:
    height: int = 480
    width: int = 832
    fps: int = 16
    teacher_frames: int = 21  # the teacher's horizon T in latent frames


@dataclass
class RolloutConfig:
    num_frames: int = 21  # N: latent frames each training rollout runs to
    num_workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    batch_size: int = 1
    decode_overlap: bool = True  # decode block b while block b+1 is generated (generate only)
    max_restarts: int = 3  # times Ray replaces a worker's dead process (its prompts in flight are handed out again)
    # At a prompt switch the self-attention cache is kept (frames stay cached under the old prompt) or re-cached:
    # every clean frame of the stream re-run through the context pass under the new prompt (costs one forward a block
    # of the stream so far; exact against a fresh prefill under the new prompt). generate's and training's switches.
    switch_cache: Literal["keep", "recache"] = "recache"
    # Probability that a training rollout switches prompt at a uniformly drawn block (each video to the next one's
    # prompt in its batch; needs batch_size >= 2); the window is then scored under the prompt the rollout ends with
    switch_prob: float = 0.0


@dataclass
class BufferConfig:
    max_items: int = 64  # also the rows the data pipeline may draw ahead of the trainers (at least two steps' worth)
    max_bytes: int = 2 * 1024**3
    max_staleness: int = 4  # the buffer drops samples older than this many policy versions, and the trainer replaces
    # any window Ray Data fetched ahead that grew older than that while it waited (data/replaced_stale)
    max_reuse: int = 1  # times one rollout may be served to the trainer


@dataclass
class DataConfig:
    prompts: str | None = None  # .txt (one prompt a line) or .jsonl ({"prompt": ...}); None: built-in list
    window_frames: int = 21  # K: window sampled from the rollout for DMD
    window_sampler: Literal["uniform", "beta"] = "uniform"
    beta_a: float = 1.0
    beta_b: float = 2.0
    backward_noise: bool = True  # False: the window is re-generated from pure noise (ablation)
    training_rolling_cache: bool = True  # False: no rolling cache in training (Self-Forcing baseline)
    compute: Literal["tasks", "actors"] = "tasks"
    num_actors: int = 1
    max_prompt_chars: int = 2000


@dataclass
class TrainerConfig:
    num_workers: int = 1
    gpus_per_worker: float = 0.0  # 0: CPU ranks; a fraction shares a GPU with rollout workers (Ray's fractional GPUs)
    cpus_per_worker: float = 1.0  # logical CPUs a CPU rank holds (a GPU rank asks for none); a fraction shares a core
    zero_stage: int = 2
    bf16: bool = False
    gradient_checkpointing: bool = False  # re-run each block's forward in the backward: less activation memory
    # the frozen teacher's weights stay in CPU memory and each layer comes to the GPU as it runs (DeepSpeed ZeRO-3
    # parameter offload): a teacher too large for a GPU beside the student and the critic (a 14B one on 80 GB)
    teacher_offload: bool = False
    batch_size: int = 1
    generator_lr: float = 2e-6
    critic_lr: float = 4e-7
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    # AdamW's update in one fused kernel per step (torch's fused AdamW) instead of a few per group of tensors: the
    # same update in fewer launches. The world's teacher step under CUDA graphs went no faster with it on an H200
    # (docs/benchmarks.md); a step whose host time goes to the optimizer may gain, which is why it is a knob
    fused_optimizer: bool = False
    ema_decay: float = 0.99  # > 0: the saved student is the generator's moving average; 0: its last weights
    ema_start_step: int = 200  # before it the average is a copy
    sync_every: int = 1
    checkpoint_every: int = 1  # DMD: a resumable checkpoint every this many steps; 0: only at the end
    # DMD: the newest checkpoints kept (a resume needs only the last; older ones are deleted as new ones register,
    # each holding student, critic, average and both optimizers); 0 keeps every one
    keep_checkpoints: int = 3
    # a step whose loss or gradients are not finite is skipped (no update) and counted (train/bad_steps); this
    # many in a row stop the stage with an error naming it and the step
    max_bad_steps: int = 3
    # DMD: failures of the trainer group Ray Train recovers from, each by restarting the group from the last
    # checkpoint (a dead rank, a lost node; also an error in the step, which then costs one more attempt)
    max_failures: int = 2


@dataclass
class ODEConfig:
    num_pairs: int = 16000
    euler_steps: int = 48
    shift: float = 8.0
    guidance: float = 6.0
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # noise levels where guidance applies
    # > 1: each step also moves this - 1 times the teacher's flow minus a weaker guide's (autoguidance); the
    # guide is a teacher directory: teacher/guide_step1000 that teacher_pretrain.guide_steps writes, or a smaller
    # teacher trained on the same data (built at the shape its config.json states)
    autoguidance: float = 1.0
    guide: str | None = None
    # > 0: the teacher's own samples (evaluation, sampler sweeps) draw this share of each step's noise fresh
    # (DDIM's eta, schedule.euler_ode_sample); ODE pairs are paths of the deterministic sampler and ignore it
    eta: float = 0.0
    shard_size: int = 64
    steps: int = 3000
    lr: float = 2e-6
    batch_size: int = 1


@dataclass
class DMDConfig:
    steps: int = 1000
    guidance: float = 3.0
    min_timestep: int = 20
    max_timestep: int = 980
    timestep_shift: float = 5.0
    timestep_distribution: Literal["uniform", "logit_normal"] = "uniform"  # before the shift (schedule.py)
    update_ratio: int = 5  # critic steps per generator step


@dataclass
class GRPOConfig:
    steps: int = 100
    group_size: int = 12
    shared_noise: bool = True
    clip: float = 1e-4
    # per_step: PPO's ratio per rollout and denoising step, on the step's log-probability per element, and the KL
    # per element (Flow-GRPO's form, for which clip 1e-4 is sized); trajectory: one ratio on the whole rollout's
    # summed log-probability, which over millions of elements leaves any clip of this size at the smallest
    # difference between rollout and replay (docs/results.md, GRPO)
    ratio: Literal["per_step", "trajectory"] = "per_step"
    advantage_clip: float = 5.0
    kl_coef: float = 0.01
    lr: float = 1e-6
    reward: Literal["farneback", "raft"] = "farneback"
    raft_weights: str | None = None
    min_motion: float = 0.05  # flow magnitude (pixels/frame) under which motion is penalised
    micro_batch: int = 0  # rollouts replayed with gradient at once (0: the whole group); must divide group_size


@dataclass
class TeacherPretrainConfig:
    steps: int = 2000
    lr: float = 1e-4
    batch_size: int = 8
    warmup_steps: int = 0  # linear warmup of the learning rate from 0
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: decays to lr * lr_floor at the last step
    lr_floor: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # flow matching on data: Adam with momentum
    prompt_dropout: float = 0.1  # prompts replaced by the negative prompt, so guidance has an unconditional model
    ema_decay: float = 0.0  # > 0: the saved teacher is the weights' moving average (sharper samples)
    ema_start_step: int = 0
    # further moving averages kept beside ema_decay's, each saved at the end as teacher/ema_<decay> (ema_dir), a
    # teacher experiments/teacher_sampler.py --teacher scores: how long an average suits a diffusion model's
    # samples is found by trying, and one run gives them all. Not checkpointed, so not with checkpoint_every
    extra_ema_decays: list[float] = field(default_factory=list)
    data_workers: int = 0  # processes rendering world clips ahead of the GPU (0: in the training loop)
    timestep_shift: float = 1.0  # of the training noise levels; 1 spends as much training near clean as near noise
    timestep_distribution: Literal["uniform", "logit_normal"] = "uniform"  # logit_normal: most training near sigma 0.5
    # > 0: the loss weighs latents on and around sprites 1 + this, the rest 1. The weight depends on the clean
    # clip, so the teacher learns a world re-weighted towards sprite pixels: more sprites
    # (docs/notes/teacher_runs.md, runs 15, 17)
    sprite_weight: float = 0.0
    checkpoint_every: int = 0  # a resumable checkpoint every this many steps (an interrupted stage goes on from it); 0: none
    # > 0: the stage stops at its first loss read-back (every 20 steps) past this many minutes of its training loop
    # (the compile included) and saves the teacher as it stands, its stage record naming the step reached: a run
    # sized too long for the time it has ends short rather than lost. Where it stops depends on the machine's pace
    time_limit_minutes: float = 0.0
    # at each of these steps the teacher as it stands (its EMA) is also saved, to teacher/guide_step<N>: a weaker
    # model of the same data for autoguidance (ode.guide)
    guide_steps: list[int] = field(default_factory=list)
    train_text_encoder: bool = False  # train the text encoder with the teacher, saved beside it and used from then on
    autocast: bool = False  # forward and backward in bfloat16 autocast; weights, optimizer and EMA stay float32
    # torch.compile backend for the model as it trains ("none": eager). One stage leaves a GPU half idle on the
    # world's small model (docs/notes/teacher_runs.md), waiting on kernel launches that inductor fuses; aot_eager traces
    # forward and backward without making kernels (a check on a CPU)
    compile: Literal["none", "inductor", "aot_eager"] = "none"
    # torch.compile mode under inductor. reduce-overhead replays the step's kernels as CUDA graphs, one launch for
    # hundreds: the world's small model is bound by the host's launches (docs/benchmarks.md: the stage 1.97x as
    # fast on an H200). On a CPU it compiles as default
    compile_mode: Literal["default", "reduce-overhead"] = "default"


MAX_SPRITES = 9  # the world's prompts spell counts out, "one" to "nine"


@dataclass
class WorldConfig:
    """The synthetic sprite world's scene ranges (`sfpp_ray.world.sprites.WorldSpec`, built by
    `components.world_of`); its resolution and fps are video's. Sizes in short sides, speeds in short sides per second."""
    sprite_count: list[int] = field(default_factory=lambda: [1, 4])  # inclusive, at most MAX_SPRITES
    size: list[float] = field(default_factory=lambda: [0.08, 0.16])  # sprite half-width
    speed: list[float] = field(default_factory=lambda: [0.1, 0.6])
    backgrounds: list[Literal["gradient", "texture"]] = field(default_factory=lambda: ["gradient", "texture"])


@dataclass
class EvalConfig:
    num_prompts: int = 4  # held-out prompts of the synthetic world
    horizons: list[int] = field(default_factory=lambda: [1, 5, 10, 20])  # multiples of the teacher's horizon
    seed: int = 1234
    batch_size: int = 8  # prompts streamed at once (a small model streams a batch about as fast as one on a GPU)
    # > 0: one more stream (the first prompt) this many times the teacher's horizon, whose last segment is scored
    # and checked for collapse (blank or frozen frames); 0: none
    long_stream: int = 0


@dataclass
class ServeConfig:
    """`sfpp-ray serve`: the student streamed over HTTP by a Ray Serve deployment."""
    host: str = "127.0.0.1"  # 0.0.0.0 to be reached from other machines
    port: int = 8000
    num_replicas: int = 1  # each holds the student and streams its own clients
    gpus_per_replica: float = 0.0  # 0 on a machine without CUDA; the GPU share one replica takes
    cpus_per_replica: float = 1.0
    max_streams: int = 4  # streams one replica serves at once, taking turns a block at a time; more are refused (429)
    max_seconds: float = 600.0  # longest video one stream may ask for
    jpeg_quality: int = 90
    realtime: bool = True  # pace each stream to the video's fps (false: as fast as the student makes blocks)


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str | None = None  # None: sqlite under the run's output directory
    experiment: str = "sfpp-ray"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # The teacher (real score) when it is another model than the student's and critic's `model`: its shape and
    # weights (Self-Forcing's DMD with Wan2.1-T2V-14B as the teacher of a 1.3B student). It reads the same latents and
    # text embeddings. None: the teacher is `model`.
    teacher_model: ModelConfig | None = None
    student: StudentConfig = field(default_factory=StudentConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    text: TextConfig = field(default_factory=TextConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ode: ODEConfig = field(default_factory=ODEConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    teacher_pretrain: TeacherPretrainConfig = field(default_factory=TeacherPretrainConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = obj

        walk("", self.to_dict())
        return out

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


# ---------------------------------------------------------------- parsing and validation


EXPONENT_FLOAT = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+")


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 or 1.5e0 as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every comparison the checks below make
            raise ConfigError(key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(key, f"unsupported type {tp}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            key = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(key, f"unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            key = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _check_type(key, data[f.name], hints[f.name])
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(key, "cannot override inside a non-mapping value")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "overrides are written key=value")
        key, raw = item.split("=", 1)
        try:
            out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
        except yaml.YAMLError as e:
            raise ConfigError(key.strip(), f"cannot read {raw!r} as a value ({str(e).splitlines()[0]})") from None
    return out


def _read_tree(path: str | os.PathLike) -> dict:
    """A config file's YAML as a dict, unchecked."""
    p = Path(path)
    if not p.is_file():
        raise ConfigFileError(path, "does not exist" if not p.exists() else "is not a file")
    try:
        loaded = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigFileError(path, "is not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigFileError(path, f"is not valid YAML{where} ({getattr(e, 'problem', None) or type(e).__name__})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigFileError(path, f"must hold a mapping of sections, holds a {type(loaded).__name__}")
    return loaded or {}


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file + dotted overrides -> validated Config (no model is built here)."""
    tree = _read_tree(path) if path is not None else {}
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return from_dict(tree)


def load_section(path: str | os.PathLike, name: str) -> Any:
    """One section of a config file, typed and checked key by key, without the whole config's checks: those
    want the weights, encoder and codec that the file's other sections name, which a tool reading only its
    model section (a memory count on the meta device, say) does not need."""
    sections = typing.get_type_hints(Config)
    if name not in sections:
        raise ConfigError(name, f"unknown section (known: {', '.join(sorted(sections))})")
    tree = _read_tree(path)
    return _build(sections[name], tree.get(name), name)


def from_dict(tree: dict) -> Config:
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def rebuilt(tree: dict) -> Config:
    """A config the driver loaded and validated, rebuilt in a Ray worker from its `to_dict()`: typed again, its
    files not read again. Checks there would re-read every weights header (the data pipeline rebuilds its config
    for every block), and a moment's absence of a file on shared storage, long after the load checked it, would
    fail the run."""
    return _build(Config, tree)


def with_teacher(cfg: Config, teacher_dir: str | os.PathLike) -> Config:
    """A copy of cfg whose teacher weights are teacher_dir's, and whose text encoder is the one trained
    with that teacher (teacher_pretrain.train_text_encoder) where the directory holds one."""
    tree, teacher_dir = cfg.to_dict(), Path(teacher_dir)
    tree["teacher_model" if cfg.teacher_model is not None else "model"]["pretrained"] = str(teacher_dir)
    if (teacher_dir / "text_encoder" / "config.json").is_file():
        tree["text"]["kind"], tree["text"]["path"] = "umt5", str(teacher_dir)
    return from_dict(tree)


GUIDE_PREFIX = "guide_step"


def guide_dir(teacher_dir: str | os.PathLike, step: int) -> Path:
    """Where the teacher stage saves the teacher as it stood at `step` (teacher_pretrain.guide_steps)."""
    return Path(teacher_dir) / f"{GUIDE_PREFIX}{step}"


def ema_dir(teacher_dir: str | os.PathLike, decay: float) -> Path:
    """Where the teacher stage saves the moving average of `decay` (teacher_pretrain.extra_ema_decays)."""
    return Path(teacher_dir) / f"ema_{decay:g}"


def saved_guides(teacher_dir: str | os.PathLike) -> list[Path]:
    """The guides saved beside a teacher, earliest first."""
    found = [p for p in Path(teacher_dir).glob(f"{GUIDE_PREFIX}*") if p.name.removeprefix(GUIDE_PREFIX).isdigit()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(GUIDE_PREFIX)))


def guide_made_by_this_run(cfg: Config) -> bool:
    """ode.guide is a guide this run's own pretrain_teacher stage saves (teacher_pretrain.guide_steps), so it
    need not exist yet when the config is loaded."""
    planned = {guide_dir(cfg.run_dir / "teacher", k) for k in cfg.teacher_pretrain.guide_steps}
    return "pretrain_teacher" in cfg.run.stages and Path(cfg.ode.guide) in planned


def codec_latent_channels(cfg: Config) -> int | None:
    if cfg.codec.kind == "pixel_unshuffle":
        return 3 * cfg.codec.spatial_factor**2 * cfg.codec.temporal_factor
    return None


def check_inputs(cfg: Config) -> None:
    """The files the config names, read as far as needed to know they are what they should be (checks: headers of
    weights, the prompts' text), without torch: a truncated checkpoint or a binary prompts file fails here, in one
    line naming its key, rather than inside a Ray worker."""
    def check(key: str, fn, *args) -> None:
        try:
            fn(*args)
        except checks.CheckError as e:
            raise ConfigError(key, str(e)) from None

    teacher_weights = cfg.teacher_model.pretrained if cfg.teacher_model is not None else None
    for key, path in (("model.pretrained", cfg.model.pretrained), ("student.checkpoint", cfg.student.checkpoint),
                      ("teacher_model.pretrained", teacher_weights)):
        if path is not None:
            check(key, checks.check_weights, path)
    if cfg.ode.guide is not None and Path(cfg.ode.guide).exists():
        check("ode.guide", checks.check_weights, cfg.ode.guide)
    for key, path in (("text.path", cfg.text.path), ("codec.path", cfg.codec.path)):
        if path is not None and not Path(path).is_dir():
            raise ConfigError(key, f"{path!r} is not a directory")
    if cfg.grpo.raft_weights is not None:
        check("grpo.raft_weights", checks.check_torch_file, Path(cfg.grpo.raft_weights))
    if cfg.data.prompts is not None:
        check("data.prompts", checks.read_prompts, cfg.data.prompts, cfg.data.max_prompt_chars)


def validate(cfg: Config) -> None:
    """Cross-field checks: combinations that cannot run."""

    def positive(key: str, value: float, allow_zero: bool = False) -> None:
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    positive("run.seed", cfg.run.seed, allow_zero=True)  # seeds hash (seed, row) pairs, which must be >= 0
    m, s, sch = cfg.model, cfg.student, cfg.schedule
    if len(m.patch_size) != 3 or min(m.patch_size) < 1:
        raise ConfigError("model.patch_size", f"needs 3 entries (t, h, w) >= 1, got {m.patch_size}")
    positive("model.eps", m.eps)
    positive("model.init_seed", m.init_seed, allow_zero=True)
    positive("schedule.num_train_timesteps", sch.num_train_timesteps)
    positive("text.max_length", cfg.text.max_length)
    positive("codec.spatial_factor", cfg.codec.spatial_factor)
    positive("codec.temporal_factor", cfg.codec.temporal_factor)
    positive("buffer.max_staleness", cfg.buffer.max_staleness, allow_zero=True)
    positive("data.num_actors", cfg.data.num_actors)
    positive("data.max_prompt_chars", cfg.data.max_prompt_chars)
    positive("trainer.weight_decay", cfg.trainer.weight_decay, allow_zero=True)
    positive("trainer.grad_clip", cfg.trainer.grad_clip, allow_zero=True)  # 0: no clipping
    positive("ode.shift", cfg.ode.shift)
    positive("ode.guidance", cfg.ode.guidance, allow_zero=True)  # 0: the unconditional teacher
    positive("dmd.guidance", cfg.dmd.guidance, allow_zero=True)
    for key in ("clip", "advantage_clip"):
        positive(f"grpo.{key}", getattr(cfg.grpo, key))
    positive("grpo.kl_coef", cfg.grpo.kl_coef, allow_zero=True)
    positive("grpo.min_motion", cfg.grpo.min_motion, allow_zero=True)
    positive("evaluation.seed", cfg.evaluation.seed, allow_zero=True)
    for name in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                 "freq_dim", "ffn_dim", "num_layers", "rope_max_seq_len"):
        positive(f"model.{name}", getattr(m, name))
    if m.attention_head_dim % 2 or (m.attention_head_dim - 4 * (m.attention_head_dim // 6)) % 2:
        raise ConfigError("model.attention_head_dim", "must split evenly into the t/h/w rotary parts")
    positive("student.frames_per_block", s.frames_per_block)
    positive("student.window_frames", s.window_frames)
    positive("student.sink_frames", s.sink_frames, allow_zero=True)
    if s.sink_frames >= s.window_frames:
        raise ConfigError("student.sink_frames", f"must be < student.window_frames ({s.window_frames}), got {s.sink_frames}")
    if s.window_frames - s.sink_frames < s.frames_per_block:
        raise ConfigError("student.window_frames", "window minus sink frames must hold at least one block")
    if s.window_frames % s.frames_per_block:
        raise ConfigError("student.window_frames", f"{s.window_frames} is not divisible by student.frames_per_block ({s.frames_per_block})")
    if s.sink_frames % s.frames_per_block:
        raise ConfigError("student.sink_frames", f"{s.sink_frames} is not divisible by student.frames_per_block ({s.frames_per_block})")
    if not sch.denoising_steps:
        raise ConfigError("schedule.denoising_steps", "needs at least one step")
    if any(not 0 < t <= sch.num_train_timesteps for t in sch.denoising_steps):
        raise ConfigError("schedule.denoising_steps", f"steps must lie in (0, {sch.num_train_timesteps}]")
    if list(sch.denoising_steps) != sorted(sch.denoising_steps, reverse=True):
        raise ConfigError("schedule.denoising_steps", "must be decreasing")
    positive("schedule.shift", sch.shift)
    if not 0 <= sch.context_noise < sch.num_train_timesteps:
        raise ConfigError("schedule.context_noise", f"must lie in [0, {sch.num_train_timesteps})")
    for key, value in (("rollout.num_frames", cfg.rollout.num_frames), ("data.window_frames", cfg.data.window_frames),
                       ("video.teacher_frames", cfg.video.teacher_frames)):
        positive(key, value)
        if value % s.frames_per_block:
            raise ConfigError(key, f"{value} is not divisible by student.frames_per_block ({s.frames_per_block})")
    if cfg.data.window_frames > cfg.rollout.num_frames:
        raise ConfigError("data.window_frames", f"window ({cfg.data.window_frames}) is longer than rollout.num_frames ({cfg.rollout.num_frames})")
    if cfg.data.window_sampler == "beta":
        positive("data.beta_a", cfg.data.beta_a)
        positive("data.beta_b", cfg.data.beta_b)
    for key, lr in (("trainer.generator_lr", cfg.trainer.generator_lr), ("trainer.critic_lr", cfg.trainer.critic_lr),
                    ("ode.lr", cfg.ode.lr), ("grpo.lr", cfg.grpo.lr), ("teacher_pretrain.lr", cfg.teacher_pretrain.lr)):
        positive(key, lr)
    for key, steps in (("dmd.steps", cfg.dmd.steps), ("ode.steps", cfg.ode.steps), ("grpo.steps", cfg.grpo.steps),
                       ("ode.num_pairs", cfg.ode.num_pairs), ("ode.batch_size", cfg.ode.batch_size),
                       ("ode.euler_steps", cfg.ode.euler_steps), ("ode.shard_size", cfg.ode.shard_size)):
        positive(key, steps)
    positive("rollout.cpus_per_worker", cfg.rollout.cpus_per_worker, allow_zero=True)
    positive("rollout.num_workers", cfg.rollout.num_workers)
    positive("rollout.gpus_per_worker", cfg.rollout.gpus_per_worker, allow_zero=True)
    positive("rollout.batch_size", cfg.rollout.batch_size)
    positive("rollout.max_restarts", cfg.rollout.max_restarts, allow_zero=True)
    if not 0 <= cfg.rollout.switch_prob <= 1:
        raise ConfigError("rollout.switch_prob", f"must lie in [0, 1], got {cfg.rollout.switch_prob}")
    if cfg.rollout.switch_prob > 0 and cfg.rollout.batch_size < 2:
        raise ConfigError("rollout.switch_prob", "switches to another prompt of the rollout's batch: needs "
                          f"rollout.batch_size >= 2, got {cfg.rollout.batch_size}")
    if cfg.rollout.switch_prob > 0 and cfg.rollout.num_frames < 2 * s.frames_per_block:
        raise ConfigError("rollout.switch_prob", "a switch needs a rollout of at least two blocks")
    positive("trainer.max_failures", cfg.trainer.max_failures, allow_zero=True)
    positive("trainer.num_workers", cfg.trainer.num_workers)
    positive("trainer.gpus_per_worker", cfg.trainer.gpus_per_worker, allow_zero=True)
    positive("trainer.cpus_per_worker", cfg.trainer.cpus_per_worker)
    if cfg.trainer.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("trainer.zero_stage", f"must be 0, 1, 2 or 3, got {cfg.trainer.zero_stage}")
    if len(cfg.trainer.betas) != 2 or not all(0 <= b < 1 for b in cfg.trainer.betas):
        raise ConfigError("trainer.betas", f"needs two values in [0, 1), got {cfg.trainer.betas}")
    positive("trainer.sync_every", cfg.trainer.sync_every)
    positive("trainer.checkpoint_every", cfg.trainer.checkpoint_every, allow_zero=True)
    positive("trainer.keep_checkpoints", cfg.trainer.keep_checkpoints, allow_zero=True)
    positive("trainer.batch_size", cfg.trainer.batch_size)
    positive("trainer.max_bad_steps", cfg.trainer.max_bad_steps)
    if not 0 <= cfg.trainer.ema_decay < 1:
        raise ConfigError("trainer.ema_decay", f"must lie in [0, 1), got {cfg.trainer.ema_decay}")
    positive("trainer.ema_start_step", cfg.trainer.ema_start_step, allow_zero=True)
    positive("dmd.update_ratio", cfg.dmd.update_ratio)
    positive("dmd.timestep_shift", cfg.dmd.timestep_shift)
    if not 0 <= cfg.dmd.min_timestep < cfg.dmd.max_timestep <= sch.num_train_timesteps:
        raise ConfigError("dmd.max_timestep", "needs 0 <= dmd.min_timestep < dmd.max_timestep <= num_train_timesteps")
    positive("buffer.max_items", cfg.buffer.max_items)
    rows = 2 * cfg.trainer.num_workers * cfg.trainer.batch_size  # a step each rank trains on and one it fetches ahead
    if "dmd" in cfg.run.stages and cfg.buffer.max_items < rows:
        raise ConfigError("buffer.max_items", f"the data pipeline draws at most this many rows ahead of the trainers, "
                          f"which need two steps' rows (2 x trainer.num_workers x trainer.batch_size = {rows}), "
                          f"got {cfg.buffer.max_items}")
    positive("buffer.max_bytes", cfg.buffer.max_bytes)
    positive("buffer.max_reuse", cfg.buffer.max_reuse)
    if "grpo" in cfg.run.stages and cfg.grpo.group_size < 2:
        raise ConfigError("grpo.group_size", "needs at least 2 rollouts per group")
    positive("grpo.micro_batch", cfg.grpo.micro_batch, allow_zero=True)
    if cfg.grpo.micro_batch and cfg.grpo.group_size % cfg.grpo.micro_batch:
        raise ConfigError("grpo.micro_batch", f"must divide grpo.group_size = {cfg.grpo.group_size}, got {cfg.grpo.micro_batch}")
    if cfg.grpo.reward == "raft" and cfg.grpo.raft_weights is None:
        raise ConfigError("grpo.raft_weights", "the raft reward needs a local weights path")
    lat = codec_latent_channels(cfg)
    if lat is not None and lat != m.in_channels:
        raise ConfigError("model.in_channels", f"the pixel_unshuffle codec makes {lat} latent channels, model.in_channels is {m.in_channels}")
    w = cfg.world
    for key in ("sprite_count", "size", "speed"):
        if len(getattr(w, key)) != 2:
            raise ConfigError(f"world.{key}", f"needs 2 entries (lowest, highest), got {getattr(w, key)}")
    if not 1 <= w.sprite_count[0] <= w.sprite_count[1] <= MAX_SPRITES:
        raise ConfigError("world.sprite_count", f"needs 1 <= lowest <= highest <= {MAX_SPRITES}, got {w.sprite_count}")
    if not 0 < w.size[0] <= w.size[1] < 0.5:
        raise ConfigError("world.size", f"needs 0 < lowest <= highest < 0.5 (of the short side), got {w.size}")
    if not 0 < w.speed[0] < w.speed[1]:
        raise ConfigError("world.speed", f"needs 0 < lowest < highest, got {w.speed}")
    if not w.backgrounds:
        raise ConfigError("world.backgrounds", "needs at least one kind")
    for key in ("height", "width"):
        if getattr(cfg.video, key) < 8:
            raise ConfigError(f"video.{key}", f"the world needs a video of at least 8x8, got {cfg.video.height}x{cfg.video.width}")
    positive("video.fps", cfg.video.fps)
    if cfg.text.kind == "umt5" and cfg.text.path is None:
        raise ConfigError("text.path", "kind umt5 needs a local directory with the encoder and tokenizer")
    if cfg.codec.kind == "wan_vae" and cfg.codec.path is None:
        raise ConfigError("codec.path", "kind wan_vae needs a local AutoencoderKLWan directory")
    for key, value in (("model.pretrained", m.pretrained), ("student.checkpoint", s.checkpoint),
                       ("text.path", cfg.text.path), ("codec.path", cfg.codec.path),
                       ("data.prompts", cfg.data.prompts), ("grpo.raft_weights", cfg.grpo.raft_weights)):
        if value is not None and not Path(value).exists():
            raise ConfigError(key, f"path {value!r} does not exist")
    check_inputs(cfg)
    tp = cfg.teacher_pretrain
    positive("teacher_pretrain.steps", tp.steps)
    positive("teacher_pretrain.batch_size", tp.batch_size)
    if not 0 <= tp.warmup_steps < tp.steps:
        raise ConfigError("teacher_pretrain.warmup_steps", f"must lie in [0, teacher_pretrain.steps), got {tp.warmup_steps}")
    if not 0 <= tp.lr_floor <= 1:
        raise ConfigError("teacher_pretrain.lr_floor", f"must lie in [0, 1], got {tp.lr_floor}")
    if len(tp.betas) != 2 or not all(0 <= b < 1 for b in tp.betas):
        raise ConfigError("teacher_pretrain.betas", f"needs two values in [0, 1), got {tp.betas}")
    if not 0 <= tp.prompt_dropout < 1:
        raise ConfigError("teacher_pretrain.prompt_dropout", f"must lie in [0, 1), got {tp.prompt_dropout}")
    if not 0 <= tp.ema_decay < 1:
        raise ConfigError("teacher_pretrain.ema_decay", f"must lie in [0, 1), got {tp.ema_decay}")
    if any(not 0 < d < 1 for d in tp.extra_ema_decays):
        raise ConfigError("teacher_pretrain.extra_ema_decays", f"each must lie in (0, 1), got {tp.extra_ema_decays}")
    if tp.extra_ema_decays and tp.checkpoint_every:
        raise ConfigError("teacher_pretrain.extra_ema_decays", "the extra averages are not checkpointed, so a resumed "
                          "stage would lose them: leave teacher_pretrain.checkpoint_every at 0 with them")
    positive("teacher_pretrain.ema_start_step", tp.ema_start_step, allow_zero=True)
    positive("teacher_pretrain.data_workers", tp.data_workers, allow_zero=True)
    positive("teacher_pretrain.timestep_shift", tp.timestep_shift)
    positive("teacher_pretrain.checkpoint_every", tp.checkpoint_every, allow_zero=True)
    positive("teacher_pretrain.time_limit_minutes", tp.time_limit_minutes, allow_zero=True)
    positive("teacher_pretrain.sprite_weight", tp.sprite_weight, allow_zero=True)
    if tp.compile != "none" and cfg.trainer.zero_stage == 3:
        raise ConfigError("teacher_pretrain.compile", "ZeRO-3 gathers each layer's weights in hooks that break the "
                          "compiled trace into a graph a layer: compile with trainer.zero_stage <= 2, or set none")
    if tp.compile_mode != "default" and tp.compile != "inductor":
        raise ConfigError("teacher_pretrain.compile_mode", f"{tp.compile_mode} is a mode of the inductor compiler: "
                          f"set teacher_pretrain.compile=inductor (it is {tp.compile}), or compile_mode=default")
    if any(not 0 < k < tp.steps for k in tp.guide_steps):
        raise ConfigError("teacher_pretrain.guide_steps", f"each must lie in (0, teacher_pretrain.steps), got {tp.guide_steps}")
    gi = cfg.ode.guidance_interval
    if len(gi) != 2 or not 0.0 <= gi[0] <= gi[1] <= 1.0:
        raise ConfigError("ode.guidance_interval", f"needs two noise levels 0 <= low <= high <= 1, got {gi}")
    if not 0 <= cfg.ode.eta <= 1:
        raise ConfigError("ode.eta", f"must be in [0, 1] (0: the deterministic ODE), got {cfg.ode.eta}")
    if cfg.ode.autoguidance < 1:
        raise ConfigError("ode.autoguidance", f"must be >= 1 (1: off), got {cfg.ode.autoguidance}")
    if cfg.ode.autoguidance != 1 and cfg.ode.guide is None:
        raise ConfigError("ode.guide", "ode.autoguidance needs a guide: a weaker teacher's directory")
    if cfg.ode.guide is not None and not Path(cfg.ode.guide).exists() and not guide_made_by_this_run(cfg):
        raise ConfigError("ode.guide", f"path {cfg.ode.guide!r} does not exist, and it is not a guide this run's "
                                       "pretrain_teacher stage saves (teacher_pretrain.guide_steps)")
    positive("evaluation.num_prompts", cfg.evaluation.num_prompts)
    positive("evaluation.batch_size", cfg.evaluation.batch_size)
    if not cfg.evaluation.horizons or min(cfg.evaluation.horizons) < 1:
        raise ConfigError("evaluation.horizons", "needs one or more multiples >= 1 of the teacher's horizon")
    if cfg.evaluation.long_stream < 0:
        raise ConfigError("evaluation.long_stream", f"must be >= 0 (0: off), got {cfg.evaluation.long_stream}")
    if (tm := cfg.teacher_model) is not None:
        for key in ("patch_size", "in_channels", "out_channels", "text_dim", "prediction"):
            if getattr(tm, key) != getattr(cfg.model, key):
                raise ConfigError(f"teacher_model.{key}", f"is {getattr(tm, key)!r} but model.{key} is "
                                  f"{getattr(cfg.model, key)!r}: the teacher must read the student's latents and text")
        for key in ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers", "freq_dim"):
            positive(f"teacher_model.{key}", getattr(tm, key))
    sv = cfg.serve
    if not 1 <= sv.port <= 65535:
        raise ConfigError("serve.port", f"must lie in [1, 65535], got {sv.port}")
    for key in ("num_replicas", "max_streams", "max_seconds", "cpus_per_replica"):
        positive(f"serve.{key}", getattr(sv, key))
    positive("serve.gpus_per_replica", sv.gpus_per_replica, allow_zero=True)
    if not 1 <= sv.jpeg_quality <= 100:
        raise ConfigError("serve.jpeg_quality", f"must lie in [1, 100], got {sv.jpeg_quality}")
    stage_order = ["pretrain_teacher", "ode", "dmd", "grpo"]
    idx = [stage_order.index(x) for x in cfg.run.stages]
    if idx != sorted(set(idx)):
        raise ConfigError("run.stages", f"stages run in the order {stage_order}, each once")
