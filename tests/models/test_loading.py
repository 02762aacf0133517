"""Wan transformer weights in every published layout load back bit-exactly; bad checkpoints fail by name."""

import dataclasses

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from sfpp_ray.config import ModelConfig
from sfpp_ray.models.loading import (
    WeightsMismatchError,
    build_wan_transformer,
    diffusers_to_original,
    load_into,
    load_transformer_state_dict,
    original_to_diffusers,
    stored_shape,
    wan_transformer_kwargs,
)

TINY = ModelConfig(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=12,
                   out_channels=12, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2)


class Subclassed(WanTransformer3DModel):
    """Stands in for the causal student: same constructor, different class."""


@pytest.fixture
def source():
    """A model with fresh random weights, so no test can pass by comparing against another default init."""
    model = build_wan_transformer(dataclasses.replace(TINY, init_seed=int(torch.randint(1, 2**31, ()))))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def assert_same_weights(model, state_dict):
    got = model.state_dict()
    assert got.keys() == state_dict.keys()
    for key, tensor in state_dict.items():
        assert torch.equal(got[key], tensor), key


def forward(model, generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    x = torch.randn(1, 12, 2, 4, 4, generator=g)
    text = torch.randn(1, 5, 32, generator=g)
    return model(x, torch.tensor([500.0]), text, return_dict=False)[0]


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build_wan_transformer(TINY), build_wan_transformer(TINY)
    c = build_wan_transformer(dataclasses.replace(TINY, init_seed=1))
    assert torch.equal(state, torch.random.get_rng_state())
    assert_same_weights(b, a.state_dict())
    assert not torch.equal(a.proj_out.weight, c.proj_out.weight)
    assert a.config.num_layers == 2 and tuple(a.config.patch_size) == (1, 2, 2)


def test_diffusers_directory_round_trip(source, tmp_path):
    source.save_pretrained(tmp_path / "transformer")
    assert_same_weights(source, load_transformer_state_dict(tmp_path / "transformer"))
    assert_same_weights(source, load_transformer_state_dict(tmp_path))  # a pipeline root finds transformer/
    model = build_wan_transformer(dataclasses.replace(TINY, pretrained=str(tmp_path / "transformer")))
    assert_same_weights(model, source.state_dict())
    assert torch.equal(forward(model), forward(source))
    assert not any(p.is_meta for p in model.parameters())


def test_sharded_diffusers_directory(source, tmp_path):
    source.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert_same_weights(source, load_transformer_state_dict(tmp_path))
    index, = tmp_path.glob("*.safetensors.index.json")
    assert_same_weights(source, load_transformer_state_dict(index))


def test_original_layout_training_checkpoint(source, tmp_path):
    original = diffusers_to_original(source.state_dict())
    assert "blocks.1.self_attn.q.weight" in original and "head.modulation" in original
    path = tmp_path / "self_forcing.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in original.items()}, "step": torch.tensor(7)}, path)
    model = build_wan_transformer(dataclasses.replace(TINY, pretrained=str(path)), cls=Subclassed)
    assert type(model) is Subclassed
    assert_same_weights(model, source.state_dict())
    assert torch.equal(forward(model), forward(source))


def test_ema_entry_is_preferred_and_selectable(source, tmp_path):
    original = diffusers_to_original(source.state_dict())
    other = {k: v + 1 for k, v in original.items()}
    path = tmp_path / "checkpoint.pt"
    torch.save({"generator": other, "generator_ema": original}, path)
    assert_same_weights(source, load_transformer_state_dict(path))
    generator = load_transformer_state_dict(path, entry="generator")
    assert torch.equal(generator["proj_out.weight"], source.proj_out.weight + 1)
    with pytest.raises(KeyError, match="critic"):
        load_transformer_state_dict(path, entry="critic")


@pytest.mark.parametrize("zip_format", [True, False])
def test_diffusers_layout_torch_file(source, tmp_path, zip_format):
    """DDP / DeepSpeed save `module.`-prefixed diffusers keys; old files are not zip archives and cannot be mapped."""
    path = tmp_path / "student.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path,
               _use_new_zipfile_serialization=zip_format)
    assert_same_weights(source, load_transformer_state_dict(path))


def test_original_layout_safetensors_with_wrapper_prefixes(source, tmp_path):
    original = diffusers_to_original(source.state_dict())
    wrapped = {f"model.diffusion_model._fsdp_wrapped_module.{k}": v.contiguous() for k, v in original.items()}
    save_file(wrapped, tmp_path / "wan.safetensors")
    model = build_wan_transformer(dataclasses.replace(TINY, pretrained=str(tmp_path / "wan.safetensors")))
    assert_same_weights(model, source.state_dict())


def test_original_file_in_a_directory(source, tmp_path):
    """The original Wan release is a directory too: config.json in Wan's own terms plus original-layout weights."""
    save_file({k: v.contiguous() for k, v in diffusers_to_original(source.state_dict()).items()},
              tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text('{"_class_name": "WanModel", "dim": 24, "num_layers": 2}')
    model = build_wan_transformer(dataclasses.replace(TINY, pretrained=str(tmp_path)))
    assert_same_weights(model, source.state_dict())


def test_conversion_matches_diffusers_converter(source):
    original = diffusers_to_original(source.state_dict())
    ours = original_to_diffusers(original)
    theirs = convert_wan_transformer_to_diffusers(dict(original))
    assert ours.keys() == theirs.keys() == source.state_dict().keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    prefixed = {f"model.diffusion_model.{k}": v for k, v in original.items()}
    assert convert_wan_transformer_to_diffusers(dict(prefixed)).keys() == ours.keys()


def test_unknown_original_key_is_named():
    with pytest.raises(WeightsMismatchError, match="img_emb.proj.0.weight"):
        original_to_diffusers({"blocks.0.self_attn.q.weight": torch.zeros(1), "img_emb.proj.0.weight": torch.zeros(1)})


def test_wrong_shape_and_missing_keys_are_named(source, tmp_path):
    state_dict = source.state_dict()
    bad = dict(state_dict)
    bad["blocks.0.attn1.to_q.weight"] = torch.randn(24, 25)
    del bad["proj_out.bias"]
    bad["blocks.9.attn1.to_q.weight"] = torch.randn(24, 24)
    with pytest.raises(WeightsMismatchError) as err:
        load_into(build_wan_transformer(TINY), bad)
    message = str(err.value)
    assert "blocks.0.attn1.to_q.weight: (24, 24) vs (24, 25)" in message
    assert "1 missing keys" in message and "proj_out.bias" in message
    assert "1 unexpected keys" in message and "blocks.9.attn1.to_q.weight" in message
    assert err.value.missing == ["proj_out.bias"]

    torch.save({"generator": diffusers_to_original({k: v for k, v in state_dict.items() if "blocks.1." not in k})},
               tmp_path / "partial.pt")
    with pytest.raises(WeightsMismatchError, match=r"\d+ missing keys") as err:
        build_wan_transformer(dataclasses.replace(TINY, pretrained=str(tmp_path / "partial.pt")))
    assert all(k.startswith("blocks.1.") for k in err.value.missing)


def test_error_lists_are_capped():
    model = build_wan_transformer(TINY)
    with pytest.raises(WeightsMismatchError) as err:
        load_into(model, {})
    total = len(model.state_dict())
    assert f"{total} missing keys" in str(err.value) and f"and {total - 20} more" in str(err.value)


def test_diffusers_directory_of_another_shape_names_the_config_keys(source, tmp_path):
    source.save_pretrained(tmp_path)
    with pytest.raises(WeightsMismatchError, match="num_layers: 3 vs 2") as err:
        build_wan_transformer(dataclasses.replace(TINY, pretrained=str(tmp_path), num_layers=3))
    assert [d[0] for d in err.value.config_diffs] == ["num_layers"]


def test_stored_shape_is_the_directorys_own(source, tmp_path):
    source.save_pretrained(tmp_path / "diffusers")
    assert stored_shape(tmp_path / "diffusers") == wan_transformer_kwargs(TINY) | {"patch_size": list(TINY.patch_size)}
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    assert stored_shape(tmp_path / "weights.pt") == {}  # a file states no shape


def test_bad_paths_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_transformer_state_dict(tmp_path / "nowhere.pt")
    with pytest.raises(ValueError, match="no .safetensors"):
        load_transformer_state_dict(tmp_path)
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown weights format"):
        load_transformer_state_dict(tmp_path / "weights.npz")
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}, "epoch": 3}, tmp_path / "not_a_model.pt")
    with pytest.raises(ValueError, match="top-level keys"):
        load_transformer_state_dict(tmp_path / "not_a_model.pt")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other_model.pt")
    with pytest.raises(ValueError, match="no Wan transformer keys"):
        load_transformer_state_dict(tmp_path / "other_model.pt")


class Pickled:
    """Not a tensor: a weights-only load refuses it."""


def test_a_corrupt_weights_file_is_refused_naming_the_path_and_what_is_wrong(source, tmp_path):
    """Truncated, random, foreign-pickle and garbage files fail with a CheckError (a ValueError) that starts with
    the path and says what is wrong, whether read on their own or through the directory that holds them."""
    from sfpp_ray.checks import CheckError

    torch.save(source.state_dict(), tmp_path / "good.pt")
    save_file(source.state_dict(), tmp_path / "good.safetensors")
    cut = lambda name: (tmp_path / name).read_bytes()[:int(torch.randint(100, 2000, ()))]  # noqa: E731
    bad = {"truncated.pt": (cut("good.pt"), "no zip index"),
           "random.pt": (bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist()), "not a torch checkpoint"),
           "truncated.safetensors": (cut("good.safetensors"), "truncated|header"),
           "garbage.safetensors": (b"\xff" * 64, "not a safetensors file")}
    for name, (data, why) in bad.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"model": Pickled()}, tmp_path / "pickled.pt")
    bad["pickled.pt"] = (None, "weights-only load refuses")
    for name, (_, why) in bad.items():
        with pytest.raises(CheckError, match=why) as e:
            load_transformer_state_dict(tmp_path / name)
        assert str(e.value).startswith(str(tmp_path / name)) and "\n" not in str(e.value)
        directory = tmp_path / f"dir_{name}"
        directory.mkdir()
        (directory / name).write_bytes((tmp_path / name).read_bytes())
        with pytest.raises(CheckError, match=why):
            load_transformer_state_dict(directory)
    assert load_transformer_state_dict(tmp_path / "good.pt").keys() == source.state_dict().keys()
