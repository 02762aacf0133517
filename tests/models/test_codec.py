"""Both codecs: shapes and frame arithmetic, the pixel codec's exactness, streamed decoding equal to whole decoding."""

import pytest
import torch
from diffusers import AutoencoderKLWan

from sfpp_ray.config import CodecConfig
from sfpp_ray.models.codec import PixelUnshuffleCodec, VideoCodec, WanVAECodec, build_codec


def random_video(frames, height=32, width=32, batch=1):
    return torch.rand(batch, 3, frames, height, width) * 2 - 1


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny Wan VAE (8x space, 4x time, 16 channels) with non-default latent statistics, saved to disk."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, num_res_blocks=1,
                               latents_mean=torch.randn(16).tolist(), latents_std=(torch.rand(16) + 0.5).tolist())
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wan(vae_dir):
    return build_codec(CodecConfig(kind="wan_vae", path=str(vae_dir)))


# ---------------------------------------------------------------- pixel unshuffle


@pytest.mark.parametrize("spatial, temporal", [(1, 1), (2, 1), (2, 3), (4, 2)])
def test_pixel_codec_is_exact(spatial, temporal):
    codec = build_codec(CodecConfig(kind="pixel_unshuffle", spatial_factor=spatial, temporal_factor=temporal))
    video = random_video(6, 16, 24, batch=2)
    latents = codec.encode(video)
    assert latents.shape == (2, 3 * spatial * spatial * temporal, 6 // temporal, 16 // spatial, 24 // spatial)
    assert codec.latent_channels == latents.shape[1]
    assert torch.equal(codec.decode(latents), video)
    assert codec.video_frames(latents.shape[2]) == 6 and codec.latent_frames(6) == latents.shape[2]


def test_pixel_codec_groups_neighbouring_pixels():
    """Channels hold the s x s pixels of one latent position, so spatial structure is kept, not scrambled."""
    codec = PixelUnshuffleCodec(spatial_factor=2)
    video = random_video(1, 4, 4)
    latents = codec.encode(video)
    assert torch.equal(latents[0, :, 0, 1, 0].view(3, 2, 2), video[0, :, 0, 2:4, 0:2])


def test_pixel_codec_blocks_decode_independently():
    codec = PixelUnshuffleCodec(spatial_factor=2, temporal_factor=2)
    latents = torch.randn(1, 24, 5, 4, 4)
    blocks = [codec.decode_block(latents[:, :, i:i + 2]) for i in range(0, 5, 2)]
    assert torch.equal(torch.cat(blocks, dim=2), codec.decode(latents))


def test_pixel_codec_frame_math_and_errors():
    codec = PixelUnshuffleCodec(spatial_factor=2, temporal_factor=4)
    assert codec.latent_frames(9) == 3 and codec.video_frames(3) == 12
    with pytest.raises(ValueError, match="cannot be encoded"):
        codec.encode(random_video(6, 8, 8))
    with pytest.raises(ValueError, match="not divisible by the spatial factor 2"):
        codec.encode(random_video(4, 7, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, F, H, W\)"):
        codec.encode(torch.zeros(1, 4, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 48, f >= 1, h, w\)"):
        codec.decode(torch.zeros(1, 12, 2, 4, 4))
    with pytest.raises(ValueError, match="spatial_factor must be >= 1"):
        PixelUnshuffleCodec(spatial_factor=0)


def test_pixel_codec_save_and_load(tmp_path):
    codec = PixelUnshuffleCodec(spatial_factor=4, temporal_factor=2)
    codec.save_pretrained(tmp_path)
    loaded = PixelUnshuffleCodec.from_pretrained(tmp_path)
    assert (loaded.spatial_factor, loaded.temporal_factor, loaded.latent_channels) == (4, 2, 96)
    (tmp_path / "codec.json").write_text('{"kind": "wan_vae"}')
    with pytest.raises(ValueError, match="not pixel_unshuffle"):
        PixelUnshuffleCodec.from_pretrained(tmp_path)


# ---------------------------------------------------------------- Wan VAE


def test_wan_codec_shapes_and_frame_math(wan):
    assert isinstance(wan, VideoCodec)
    assert (wan.latent_channels, wan.spatial_factor, wan.temporal_factor) == (16, 8, 4)
    latents = wan.encode(random_video(9))
    assert latents.shape == (1, 16, 3, 4, 4)
    video = wan.decode(latents)
    assert video.shape == (1, 3, 9, 32, 32)
    assert video.min() >= -1 and video.max() <= 1
    assert [wan.latent_frames(n) for n in (1, 5, 9, 81, 10)] == [1, 2, 3, 21, 4]
    assert [wan.video_frames(n) for n in (1, 2, 21)] == [1, 5, 81]


def test_wan_codec_applies_latent_statistics(wan):
    vae, video = wan.vae, random_video(5, 16, 16)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        raw = vae.encode(video).latent_dist.mode()
        latents = wan.encode(video)
        torch.testing.assert_close(latents, (raw - mean) / std)
        torch.testing.assert_close(wan.decode(latents), vae.decode(latents * std + mean).sample)


def test_wan_streamed_decoding_equals_whole_decoding(wan):
    """The stream survives a whole-video decode in between, and a reset starts a new video."""
    latents = torch.randn(1, 16, 5, 2, 2)
    whole = wan.decode(latents)
    wan.reset_stream()
    first = wan.decode_block(latents[:, :, :1])
    wan.decode(torch.randn(1, 16, 2, 2, 2))
    blocks = [first, wan.decode_block(latents[:, :, 1:3]), wan.decode_block(latents[:, :, 3:])]
    assert [b.shape[2] for b in blocks] == [1, 8, 8]
    torch.testing.assert_close(torch.cat(blocks, dim=2), whole, rtol=0, atol=1e-5)

    wan.reset_stream()
    blocks = [wan.decode_block(latents[:, :, :3]), wan.decode_block(latents[:, :, 3:])]
    assert [b.shape[2] for b in blocks] == [9, 8]
    torch.testing.assert_close(torch.cat(blocks, dim=2), whole, rtol=0, atol=1e-5)


def test_wan_streams_taking_turns_each_decode_as_alone(wan):
    """Two videos decoded a block each in turn, each stream's state saved and restored, equal each decoded whole."""
    videos = [torch.randn(1, 16, 5, 2, 2), torch.randn(1, 16, 5, 2, 2)]
    states, parts = [None, None], [[], []]
    for block in ((0, 1), (1, 3), (3, 5)):
        for i, latents in enumerate(videos):
            wan.restore_stream(states[i])
            parts[i].append(wan.decode_block(latents[:, :, block[0]:block[1]]))
            states[i] = wan.stream_state()
    for latents, blocks in zip(videos, parts):
        torch.testing.assert_close(torch.cat(blocks, dim=2), wan.decode(latents), rtol=0, atol=1e-5)


def test_wan_codec_rejects_bad_input(wan):
    with pytest.raises(ValueError, match="cannot be encoded"):
        wan.encode(random_video(8))
    with pytest.raises(ValueError, match="spatial factor 8"):
        wan.encode(random_video(5, 20, 32))
    with pytest.raises(ValueError, match="B, 16"):
        wan.decode(torch.randn(1, 12, 2, 4, 4))


def test_wan_codec_loads_from_a_pipeline_root_and_saves(vae_dir, wan, tmp_path):
    root = tmp_path / "pipeline"
    wan.save_pretrained(root / "vae")
    loaded = WanVAECodec.from_pretrained(root, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert loaded.vae.config.latents_mean == wan.vae.config.latents_mean
    assert loaded.encode(random_video(1, 16, 16)).dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="no config.json"):
        WanVAECodec.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="codec.path"):
        build_codec(CodecConfig(kind="wan_vae", path=None))
