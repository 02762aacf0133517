"""Builds every model component from the config: the one place that turns knobs into modules."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from sfpp_ray.algorithm.schedule import FlowMatchSchedule
from sfpp_ray.config import Config, from_dict, with_teacher
from sfpp_ray.models.bidirectional_wan import BidirectionalWanTransformer3DModel
from sfpp_ray.models.causal_wan import CausalLayout, CausalWanTransformer3DModel, saved_layout
from sfpp_ray.models.codec import VideoCodec, build_codec
from sfpp_ray.models.loading import build_wan_transformer, load_into, load_transformer_state_dict, stored_shape
from sfpp_ray.models.text_encoder import TextEncoder
from sfpp_ray.world.sprites import WorldSpec


def world_of(cfg: Config) -> WorldSpec:
    """The sprite world at the video's resolution and fps, with the config's scene ranges."""
    w, v = cfg.world, cfg.video
    return WorldSpec(height=v.height, width=v.width, fps=v.fps, sprite_count=tuple(w.sprite_count), size=tuple(w.size),
                     speed=tuple(w.speed), backgrounds=tuple(dict.fromkeys(w.backgrounds)))


def resolve_device(cfg: Config) -> torch.device:
    if cfg.run.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but no GPU is visible")
    return torch.device(cfg.run.device)


def resolve_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.run.dtype == "bfloat16" else torch.float32


def layout(cfg: Config) -> CausalLayout:
    s = cfg.student
    return CausalLayout(s.frames_per_block, s.window_frames, s.sink_frames, s.position_rule, s.attention, s.fold_context_pass,
                        s.compile)


def with_student_layout(cfg: Config, checkpoint: str | None) -> Config:
    """A copy of cfg whose student blocks, window, sinks and position rule are the ones `checkpoint` was saved with,
    where it saved them, whose text encoder is the one saved beside it (a trained one the run used, see
    engine.carry_text_encoder) and whose codec is the one it names (codec.json): inference streams as the student was trained from the directory alone. Training
    builds from its config instead (a variant may train a student saved with another window)."""
    if checkpoint is None:
        return cfg
    saved, home = saved_layout(checkpoint), Path(checkpoint)
    home = home.parent if home.is_file() and (home.parent / "config.json").is_file() else home  # a model dir's file
    text = home.is_dir() and (home / "text_encoder" / "config.json").is_file()
    codec = home / "codec.json" if home.is_dir() and (home / "codec.json").is_file() else None  # engine.CODEC_FILE
    if not saved and not text and not codec:
        return cfg
    tree = cfg.to_dict()
    tree["student"].update(saved or {})
    if codec:
        tree["codec"].update(json.loads(codec.read_text()))
    if text:
        tree["text"].update(kind="umt5", path=str(home))
    return from_dict(tree)


def cast(model: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """Move to device/dtype, keeping the modules Wan keeps in float32 (norms, time embedding, modulation)."""
    model.to(device or "cpu")
    if dtype is None or dtype == torch.float32:
        return model
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if not any(k in name.split(".") for k in keep):
            param.data = param.data.to(dtype)
    return model


def teacher_config(cfg: Config) -> Config:
    """The config the teacher is built from: `teacher_model`'s shape and weights where set, else `model`'s."""
    return cfg if cfg.teacher_model is None else dataclasses.replace(cfg, model=cfg.teacher_model)


def build_teacher(cfg: Config, device=None, dtype=None) -> BidirectionalWanTransformer3DModel:
    """The frozen bidirectional teacher (real score): no gradient, so nothing to checkpoint."""
    teacher = build_critic(teacher_config(cfg), device, dtype).eval().requires_grad_(False)
    if teacher.gradient_checkpointing:
        teacher.disable_gradient_checkpointing()
    return teacher


def build_guide(cfg: Config, device=None, dtype=None) -> tuple[BidirectionalWanTransformer3DModel, TextEncoder] | None:
    """The weaker teacher of ode.guide for autoguidance, with the text encoder it was trained with; None when off.
    The guide keeps the shape its directory states: an earlier checkpoint of the teacher or a smaller model."""
    if cfg.ode.guide is None or cfg.ode.autoguidance == 1:
        return None
    guide_cfg = with_teacher(cfg, cfg.ode.guide)
    own_shape = dataclasses.replace(guide_cfg.model, **stored_shape(cfg.ode.guide))
    guide_cfg = dataclasses.replace(guide_cfg, model=own_shape)
    return build_teacher(guide_cfg, device, dtype), build_text_encoder(guide_cfg, device, dtype)


def build_critic(cfg: Config, device=None, dtype=None) -> BidirectionalWanTransformer3DModel:
    """The trainable bidirectional critic (fake score), initialised from the teacher."""
    model = build_wan_transformer(cfg.model, cls=BidirectionalWanTransformer3DModel)
    model.prediction = cfg.model.prediction
    if cfg.trainer.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return cast(model, device, dtype).train()


def build_student(cfg: Config, device=None, dtype=None, checkpoint: str | None = None) -> CausalWanTransformer3DModel:
    """The causal student: teacher weights (or a student checkpoint) in the causal module tree."""
    model = build_wan_transformer(cfg.model, cls=CausalWanTransformer3DModel)
    path = checkpoint or cfg.student.checkpoint
    if path is not None:
        load_into(model, load_transformer_state_dict(path))
    model.prediction = cfg.model.prediction
    if cfg.trainer.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return cast(model.set_layout(layout(cfg)), device, dtype)


def build_text_encoder(cfg: Config, device=None, dtype=None) -> TextEncoder:
    return TextEncoder.from_config(cfg.text, cfg.model.text_dim, device=device or "cpu", dtype=dtype or torch.float32)


def build_video_codec(cfg: Config, device=None, dtype=None) -> VideoCodec:
    return build_codec(cfg.codec, device=device or "cpu", dtype=dtype or torch.float32)


def build_schedule(cfg: Config) -> FlowMatchSchedule:
    return FlowMatchSchedule.from_config(cfg.schedule)


def latent_shape(cfg: Config, codec: VideoCodec, num_frames: int, batch_size: int = 1) -> tuple[int, ...]:
    f = codec.spatial_factor
    if cfg.video.height % f or cfg.video.width % f:
        raise ValueError(f"video {cfg.video.height}x{cfg.video.width} is not divisible by the codec's factor {f}")
    return (batch_size, codec.latent_channels, num_frames, cfg.video.height // f, cfg.video.width // f)
