"""The text encoder: Wan's padding rule, determinism across processes, caching, save/reload as kind umt5,
and training it together with a denoiser."""

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from sfpp_ray import components
from sfpp_ray.config import TextConfig, load_config, with_teacher
from sfpp_ray.models.text_encoder import (BYTE_OFFSET, EOS_ID, PAD_ID, UNK_ID, PromptConditioned, TextEncoder,
                                         byte_level_tokenizer)
from sfpp_ray.world.sprites import prompt as scene_prompt
from sfpp_ray.world.sprites import sample_scenes, vocabulary

MAX_LENGTH = 24
TINY_CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"
TEXT_DIM = 32


def random_prompt(length=8):
    letters = torch.randint(ord("a"), ord("z") + 1, (length,)).tolist()
    return "".join(map(chr, letters))


@pytest.fixture
def tiny():
    return TextEncoder.from_config(TextConfig(kind="tiny", max_length=MAX_LENGTH), TEXT_DIM)


def nonzero_positions(embedding):
    return (embedding.abs().sum(-1) > 0).tolist()


def test_byte_tokenizer_is_utf8_bytes_plus_offset():
    tokenizer = byte_level_tokenizer()
    prompt = "héllo <pad> 日"
    ids = tokenizer([prompt])["input_ids"][0]
    assert ids == [b + BYTE_OFFSET for b in prompt.encode("utf-8")] + [EOS_ID]
    padded = tokenizer([prompt], padding="max_length", max_length=32)["input_ids"][0]
    assert padded[len(ids):] == [PAD_ID] * (32 - len(ids))


def test_word_encoder_gives_every_world_word_one_token_and_reloads_as_umt5(tmp_path):
    words = TextEncoder.from_config(TextConfig(kind="tiny_words", max_length=MAX_LENGTH), TEXT_DIM)
    seed = int(torch.randint(0, 2**31, ()).item())
    prompts = [scene_prompt(s) for split in ("train", "heldout") for s in sample_scenes(seed, 50, split)]
    ids = words.tokenize(prompts)
    lengths = (ids != PAD_ID).sum(1)
    assert lengths.tolist() == [len(p.replace(",", " ,").split()) + 1 for p in prompts]  # a token a word, then EOS
    assert not (ids == UNK_ID).any()
    assert set(ids[ids > UNK_ID].tolist()) <= set(range(UNK_ID + 1, UNK_ID + 1 + len(vocabulary())))
    upper = words.tokenize([prompts[0].upper() + " zebra"])[0]  # case-blind; an unknown word is one UNK
    assert upper[:lengths[0] - 1].tolist() == ids[0, :lengths[0] - 1].tolist() and upper[lengths[0] - 1] == UNK_ID

    words.save_pretrained(tmp_path)
    reloaded = TextEncoder.from_config(TextConfig(kind="umt5", path=str(tmp_path), max_length=MAX_LENGTH), TEXT_DIM)
    assert torch.equal(reloaded.tokenize(prompts), ids)
    assert torch.equal(reloaded.encode(prompts[:4]), words.encode(prompts[:4]))


def test_embeddings_are_zero_past_each_prompt(tiny):
    short, long = random_prompt(5), random_prompt(200)
    embeddings = tiny.encode([short, long])
    assert embeddings.shape == (2, MAX_LENGTH, TEXT_DIM)
    assert nonzero_positions(embeddings[0]) == [True] * 6 + [False] * (MAX_LENGTH - 6)  # 5 bytes + EOS
    assert all(nonzero_positions(embeddings[1]))  # truncated to max_length


def test_whitespace_is_normalised_like_wan(tiny):
    prompt = random_prompt()
    torch.testing.assert_close(tiny.encode([f"  {prompt[:4]} \n\t {prompt[4:]} "]),
                               tiny.encode([f"{prompt[:4]} {prompt[4:]}"]))


def test_tiny_encoder_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = TextEncoder.from_config(TextConfig(kind="tiny", max_length=MAX_LENGTH), TEXT_DIM)
    b = TextEncoder.from_config(TextConfig(kind="tiny", max_length=MAX_LENGTH), TEXT_DIM)
    assert torch.equal(state, torch.random.get_rng_state())
    prompt = random_prompt()
    assert torch.equal(a.encode([prompt]), b.encode([prompt]))
    assert not torch.equal(a.encode([prompt]), a.encode([random_prompt(9)]))


def test_tiny_encoder_is_the_same_in_another_process(tiny, tmp_path):
    prompt = random_prompt()
    script = textwrap.dedent(f"""
        import torch
        from sfpp_ray.config import TextConfig
        from sfpp_ray.models.text_encoder import TextEncoder
        encoder = TextEncoder.from_config(TextConfig(kind="tiny", max_length={MAX_LENGTH}), {TEXT_DIM})
        torch.save(encoder.encode([{prompt!r}]), {str(tmp_path / "embedding.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    assert torch.equal(torch.load(tmp_path / "embedding.pt"), tiny.encode([prompt]))


def test_cache_hits_duplicates_and_bound(tiny, monkeypatch):
    prompts = [random_prompt() for _ in range(3)]
    first = tiny.encode([prompts[0], prompts[1], prompts[0]])
    assert torch.equal(first[0], first[2])
    batches = []
    run_encoder = tiny._run_encoder
    monkeypatch.setattr(tiny, "_run_encoder", lambda ps: batches.append(ps) or run_encoder(ps))
    again = tiny.encode([prompts[1], prompts[2], prompts[0]])
    assert batches == [[prompts[2]]]  # only the new prompt reaches the encoder
    assert torch.equal(again[0], first[1]) and torch.equal(again[2], first[0])
    torch.testing.assert_close(again[1], tiny.encode([prompts[2]])[0])

    tiny.cache_size = 2
    tiny.encode([random_prompt() for _ in range(5)])
    assert len(tiny._cache) == 2


def test_output_follows_the_module_dtype(tiny):
    prompt = random_prompt()
    tiny.encode([prompt])
    tiny.to(dtype=torch.bfloat16)
    embedding = tiny.encode([prompt])
    assert embedding.dtype == torch.bfloat16 and len(tiny._cache) == 1  # cache was rebuilt after the cast


def test_saved_tiny_encoder_reloads_as_umt5(tiny, tmp_path):
    prompts = [random_prompt(), random_prompt(40)]
    tiny.save_pretrained(tmp_path)
    assert (tmp_path / "text_encoder").is_dir() and (tmp_path / "tokenizer").is_dir()
    cfg = TextConfig(kind="umt5", path=str(tmp_path), max_length=MAX_LENGTH)
    reloaded = TextEncoder.from_config(cfg, TEXT_DIM)
    assert torch.equal(reloaded.encode(prompts), tiny.encode(prompts))

    flat = tmp_path / "flat"  # encoder and tokenizer files side by side
    tiny.encoder.save_pretrained(flat)
    tiny.tokenizer.save_pretrained(flat)
    assert torch.equal(TextEncoder.from_pretrained(flat, MAX_LENGTH).encode(prompts), tiny.encode(prompts))

    with pytest.raises(ValueError, match="makes 32-d embeddings but model.text_dim is 64"):
        TextEncoder.from_config(cfg, 64)


def test_bad_input_is_refused(tiny, tmp_path):
    with pytest.raises(TypeError, match="list of prompt strings"):
        tiny.encode("a single string")
    with pytest.raises(TypeError, match="list of prompt strings"):
        tiny.encode(["ok", 3])
    with pytest.raises(ValueError, match="at least one prompt"):
        tiny.encode([])
    with pytest.raises(FileNotFoundError, match="no UMT5 encoder"):
        TextEncoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs text.path"):
        TextEncoder.from_config(TextConfig(kind="umt5", path=None), TEXT_DIM)


def test_prompts_cut_off_at_max_length_warn_once(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny.encode([random_prompt(MAX_LENGTH - 1)])  # with its end token: exactly max_length, nothing cut
    with pytest.warns(UserWarning, match="text.max_length = 24"):
        tiny.encode([random_prompt(MAX_LENGTH + 5)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny.encode([random_prompt(MAX_LENGTH + 6)])  # said once per encoder
        TextEncoder.from_config(TextConfig(kind="tiny", max_length=MAX_LENGTH), TEXT_DIM).encode([random_prompt(5)])


def test_prompt_conditioned_denoiser_equals_it_on_the_encoders_embeddings_and_trains_it(tmp_path):
    cfg = load_config(TINY_CONFIG)
    text = components.build_text_encoder(cfg)
    denoiser = components.build_critic(cfg)
    model = PromptConditioned(denoiser, text)
    prompts = [random_prompt(12), random_prompt(30)]
    x = torch.randn(2, cfg.model.in_channels, 6, 8, 8)
    t = torch.rand(2) * 1000
    with torch.no_grad():
        expected = denoiser(x, t, text.encode(prompts), return_dict=False)[0]
    out = model(x, t, text.tokenize(prompts))[0]
    torch.testing.assert_close(out, expected)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text_encoder.parameters())

    model.save_pretrained(tmp_path)  # the teacher with text_encoder/ and tokenizer/ beside it
    reloaded = TextEncoder.from_config(TextConfig(kind="umt5", path=str(tmp_path), max_length=text.max_length),
                                       cfg.model.text_dim)
    text._cache.clear()
    torch.testing.assert_close(reloaded.encode(prompts), text.encode(prompts))
    teacher_cfg = with_teacher(cfg, tmp_path)
    assert (teacher_cfg.text.kind, teacher_cfg.text.path) == ("umt5", str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(components.build_teacher(teacher_cfg)(x, t, reloaded.encode(prompts), return_dict=False)[0],
                                   expected)
