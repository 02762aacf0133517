"""Wan transformer weights: read any published layout, rename to diffusers' keys, load strictly.

Teacher, critic and causal student all use diffusers' `WanTransformer3DModel` module tree. Weights come as
diffusers directories, as original Wan files (`blocks.N.self_attn.q.weight`, ...), and as Self-Forcing /
CausVid training checkpoints that wrap original keys in `{"generator": {"model.<key>": ...}}`, sometimes
with FSDP or torch.compile segments inside the key paths. Everything is normalised to diffusers keys here,
so the rest of the code sees one layout.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import accelerate
import torch
from diffusers import WanTransformer3DModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from sfpp_ray.checks import (TORCH_SUFFIXES, CheckError, check_safetensors, check_torch_file, weights_directory,
                             weights_files)
from sfpp_ray.config import ModelConfig

# ---------------------------------------------------------------- the rename table (original Wan -> diffusers)

_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "norm_q": "norm_q", "norm_k": "norm_k"}

# Module paths outside the blocks; a parameter's own name (.weight, .bias) follows the path unchanged.
ORIGINAL_TO_DIFFUSERS_TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}

# Paths inside `blocks.N.`. Wan calls the cross-attention norm `norm3` and the (weightless) pre-FFN norm
# `norm2`; diffusers swaps those names, and only the cross-attention norm carries weights.
ORIGINAL_TO_DIFFUSERS_BLOCK = {
    **{f"self_attn.{src}": f"attn1.{dst}" for src, dst in _ATTENTION.items()},
    **{f"cross_attn.{src}": f"attn2.{dst}" for src, dst in _ATTENTION.items()},
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}

_DIFFUSERS_TO_ORIGINAL_TOP = {v: k for k, v in ORIGINAL_TO_DIFFUSERS_TOP.items()}
_DIFFUSERS_TO_ORIGINAL_BLOCK = {v: k for k, v in ORIGINAL_TO_DIFFUSERS_BLOCK.items()}

# First key segments of a Wan transformer in either layout; anything in front of them is a wrapper prefix.
_ROOTS = {"patch_embedding", "text_embedding", "time_embedding", "time_projection", "blocks", "head",
          "condition_embedder", "scale_shift_table", "proj_out"}
_KEY_PREFIXES = {"model", "diffusion_model", "module"}
_WRAPPER_SEGMENTS = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}
# Top-level entries of training checkpoints, in order of preference: the EMA weights are the published model.
CHECKPOINT_ENTRIES = ("generator_ema", "generator", "model", "state_dict", "module")

_LIST_LIMIT = 20


class WeightsMismatchError(ValueError):
    """Weights that do not fit the model; the message names the offending keys and shapes."""

    def __init__(self, source: str, missing=(), unexpected=(), mismatched=(), config_diffs=()):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)  # (key, model shape, checkpoint shape)
        self.config_diffs = list(config_diffs)  # (key, model value, checkpoint value)
        sections = [f"weights from {source} do not fit the model"]
        sections += _section("missing keys", self.missing, str)
        sections += _section("unexpected keys", self.unexpected, str)
        sections += _section("shape mismatches (model vs checkpoint)", self.mismatched,
                             lambda m: f"{m[0]}: {tuple(m[1])} vs {tuple(m[2])}")
        sections += _section("config differences (model vs checkpoint)", self.config_diffs,
                             lambda d: f"{d[0]}: {d[1]!r} vs {d[2]!r}")
        super().__init__("\n".join(sections))


def _section(title: str, items: list, fmt) -> list[str]:
    if not items:
        return []
    lines = [f"{len(items)} {title}:"] + [f"  {fmt(item)}" for item in items[:_LIST_LIMIT]]
    if len(items) > _LIST_LIMIT:
        lines.append(f"  ... and {len(items) - _LIST_LIMIT} more")
    return lines


# ---------------------------------------------------------------- key conversion


def _rename(key: str, top: dict[str, str], block: dict[str, str]) -> str | None:
    """Renames one key through a (top, block) table pair; None when the table has no entry for it."""
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        prefix, rest, table = f"blocks.{parts[1]}.", ".".join(parts[2:]), block
    else:
        prefix, rest, table = "", key, top
    for source, target in table.items():
        if rest == source or rest.startswith(source + "."):
            return prefix + target + rest[len(source):]
    return None


def _convert(state_dict: Mapping[str, torch.Tensor], top, block, source_layout: str) -> dict[str, torch.Tensor]:
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        new_key = _rename(key, top, block)
        if new_key is None:
            unknown.append(key)
        else:
            converted[new_key] = tensor
    if unknown:
        raise WeightsMismatchError(f"a {source_layout}-layout state dict", unexpected=unknown)
    return converted


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan keys -> diffusers keys (tensors are shared, not copied)."""
    return _convert(state_dict, ORIGINAL_TO_DIFFUSERS_TOP, ORIGINAL_TO_DIFFUSERS_BLOCK, "original Wan")


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers keys -> original Wan keys, for exporting to tools that read Wan / Self-Forcing checkpoints."""
    return _convert(state_dict, _DIFFUSERS_TO_ORIGINAL_TOP, _DIFFUSERS_TO_ORIGINAL_BLOCK, "diffusers")


def _strip_wrappers(key: str) -> str:
    parts = [p for p in key.split(".") if p not in _WRAPPER_SEGMENTS]
    while len(parts) > 1 and parts[0] not in _ROOTS and parts[0] in _KEY_PREFIXES:
        parts = parts[1:]
    return ".".join(parts)


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'original' or 'diffusers', judged from keys that exist in only one of the two layouts."""
    original_only = diffusers_only = 0
    for key in state_dict:
        as_original = _rename(key, ORIGINAL_TO_DIFFUSERS_TOP, ORIGINAL_TO_DIFFUSERS_BLOCK) is not None
        as_diffusers = _rename(key, _DIFFUSERS_TO_ORIGINAL_TOP, _DIFFUSERS_TO_ORIGINAL_BLOCK) is not None
        original_only += as_original and not as_diffusers
        diffusers_only += as_diffusers and not as_original
    if original_only and diffusers_only:
        raise ValueError(f"state dict mixes original Wan keys ({original_only}) and diffusers keys ({diffusers_only})")
    if not original_only and not diffusers_only:
        raise ValueError(f"no Wan transformer keys found; first keys: {list(state_dict)[:10]}")
    return "original" if original_only else "diffusers"


def normalize_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any Wan state dict (wrapper prefixes, either layout) -> diffusers keys."""
    stripped: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new_key = _strip_wrappers(key)
        if new_key in stripped:
            raise ValueError(f"keys collide once wrapper prefixes are removed: {new_key!r}")
        stripped[new_key] = tensor
    return original_to_diffusers(stripped) if detect_layout(stripped) == "original" else stripped


# ---------------------------------------------------------------- reading files


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap_checkpoint(obj, source: str, entry: str | None) -> Mapping[str, torch.Tensor]:
    """Walks into training-checkpoint containers until a flat name -> tensor mapping is reached."""
    if entry is not None:
        if not isinstance(obj, Mapping) or entry not in obj:
            keys = list(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise KeyError(f"{source} has no top-level entry {entry!r} (it has {keys})")
        obj = obj[entry]
    while not _is_state_dict(obj):
        if not isinstance(obj, Mapping):
            raise ValueError(f"{source} holds a {type(obj).__name__}, not a state dict")
        found = next((k for k in CHECKPOINT_ENTRIES if isinstance(obj.get(k), Mapping)), None)
        if found is None:
            raise ValueError(f"{source} is not a state dict and has none of the entries {list(CHECKPOINT_ENTRIES)}; "
                             f"its top-level keys are {list(obj)[:20]}")
        obj = obj[found]
    return obj


def _read_torch_file(path: Path) -> object:
    """Tensors and plain containers only (weights_only): a checkpoint that pickles anything else is refused,
    naming the file, as is one whose header (checks.check_torch_file) or contents do not read."""
    check_torch_file(path)
    try:
        # Memory-map zip-format checkpoints so a multi-GB file is not read twice; legacy files cannot be mapped.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckError(f"{path}: holds objects other than tensors and plain containers, which a weights-only load "
                         f"refuses ({_first_line(e)})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckError(f"{path}: cannot be read as a torch checkpoint ({_first_line(e)})") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    check_safetensors(path)
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckError(f"{path}: cannot be read as safetensors ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _read_sharded(index: Path) -> dict[str, torch.Tensor]:
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state_dict: dict[str, torch.Tensor] = {}
    for shard in shards:
        state_dict.update(_read_safetensors(index.parent / shard))
    return state_dict


def _read_file(path: Path, entry: str | None) -> Mapping[str, torch.Tensor]:
    if path.name.endswith(".safetensors.index.json"):
        return _read_sharded(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return _unwrap_checkpoint(_read_torch_file(path), str(path), entry)
    raise ValueError(f"{path}: unknown weights format {path.suffix!r} "
                     "(expected .safetensors, .safetensors.index.json, .pt, .pth, .bin, .ckpt)")


def load_transformer_state_dict(path: str | Path, entry: str | None = None) -> dict[str, torch.Tensor]:
    """Wan transformer weights in diffusers key layout from a directory or a single checkpoint file.

    `entry` picks a top-level entry of a training checkpoint (e.g. "generator" instead of the default
    "generator_ema" when both exist).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights path {str(path)!r} does not exist")
    if entry is not None and (path.is_dir() or path.suffix not in TORCH_SUFFIXES):
        raise ValueError(f"{path} has no top-level entries; `entry` applies to {', '.join(TORCH_SUFFIXES)} files")
    if path.is_dir():
        (file,) = weights_files(path)  # the directory's one weights file or shard index, as checks finds it
        raw = _read_file(file, entry=None)
    else:
        raw = _read_file(path, entry)
    return normalize_state_dict(raw)


# ---------------------------------------------------------------- loading into a model


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "the state dict") -> None:
    """Strict load: every model key present with its shape, nothing extra; otherwise WeightsMismatchError.

    A model whose parameters are still on the meta device gets freshly allocated copies (in the model's
    dtype): there is no storage to copy into, and tensors read from a file may be misaligned, which makes
    CPU kernels round differently from a model built in memory.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [(k, tuple(expected[k].shape), tuple(state_dict[k].shape))
                  for k in expected if k in state_dict and expected[k].shape != state_dict[k].shape]
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(source, missing, unexpected, mismatched)
    assign = any(t.is_meta for t in expected.values())
    if assign:
        state_dict = {k: torch.empty(v.shape, dtype=expected[k].dtype).copy_(v) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=assign)


def wan_transformer_kwargs(cfg: ModelConfig) -> dict:
    """The `WanTransformer3DModel.__init__` arguments for a ModelConfig shape."""
    return {
        "patch_size": tuple(cfg.patch_size),
        "num_attention_heads": cfg.num_attention_heads,
        "attention_head_dim": cfg.attention_head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "eps": cfg.eps,
        "rope_max_seq_len": cfg.rope_max_seq_len,
    }


def _comparable(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _stored_config(path: Path) -> dict | None:
    """The diffusers config.json of a model directory; None for a file or an original Wan config (whose shapes
    are checked key by key on load)."""
    if not path.is_dir():
        return None
    config_file = weights_directory(path) / "config.json"
    if not config_file.is_file():
        return None
    stored = json.loads(config_file.read_text())
    return stored if "num_attention_heads" in stored else None


def stored_shape(path: str | os.PathLike) -> dict:
    """The shape a diffusers model directory states, as ModelConfig fields ({} where it states none): a model
    saved at another size than the configured one (a smaller autoguidance guide) is built at its own."""
    stored = _stored_config(Path(path)) or {}
    return {key: _comparable(stored[key]) for key in wan_transformer_kwargs(ModelConfig()) if key in stored}


def _check_pretrained_config(path: Path, model: torch.nn.Module) -> None:
    """A diffusers directory states its shape in config.json: compare it with the model built from ModelConfig."""
    stored = _stored_config(path)
    if stored is None:
        return
    diffs = [(key, _comparable(value), _comparable(stored[key])) for key, value in model.config.items()
             if not key.startswith("_") and key in stored and _comparable(value) != _comparable(stored[key])]
    if diffs:
        raise WeightsMismatchError(str(path), config_diffs=diffs)


def build_wan_transformer(cfg: ModelConfig, cls: type[WanTransformer3DModel] = WanTransformer3DModel
                          ) -> WanTransformer3DModel:
    """A Wan transformer of the ModelConfig shape: `cfg.pretrained` weights if set, else a seeded random init.

    `cls` may be a subclass with the same constructor (the causal student). The random init is
    deterministic in `cfg.init_seed` and leaves the global RNG untouched; with pretrained weights the
    parameters are never randomly initialised at all.
    """
    kwargs = wan_transformer_kwargs(cfg)
    if cfg.pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            return cls(**kwargs)
    path = Path(cfg.pretrained)
    with accelerate.init_empty_weights(include_buffers=False):
        model = cls(**kwargs)
    _check_pretrained_config(path, model)
    load_into(model, load_transformer_state_dict(path), source=str(path))
    return model
