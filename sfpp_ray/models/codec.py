"""Video codecs: pixels <-> the latents the transformer denoises.

Two implementations behind one interface: the Wan VAE for real runs, and a weightless, lossless pixel
unshuffle for tests and toy runs (its "latents" are the pixels rearranged, so any error downstream is
the model's, never the codec's). Videos are (B, 3, F, H, W) in [-1, 1]; latents are (B, C, f, h, w).
"""

from __future__ import annotations

import abc
import json
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

from sfpp_ray.config import CodecConfig

PIXEL_CODEC_FILE = "codec.json"


class VideoCodec(abc.ABC):
    """The codec interface the rollout, trainer and evaluation code program against."""

    latent_channels: int
    spatial_factor: int
    temporal_factor: int

    @abc.abstractmethod
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> (B, C, f, h, w); F must be exactly `video_frames(f)`."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, f, h, w) -> (B, 3, video_frames(f), H, W) in [-1, 1]."""

    @abc.abstractmethod
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next block of a streamed latent video, continuing this codec's current stream.

        Concatenating the outputs of all blocks of a stream along time gives `decode` of the whole latent
        video (up to float rounding). A codec starts with a fresh stream; call `reset_stream` before
        streaming another video.
        """

    @abc.abstractmethod
    def reset_stream(self) -> None:
        """Forget the streamed video so the next `decode_block` starts a new one."""

    def stream_state(self) -> object:
        """What `decode_block` carries from one block of the current stream to the next (None: nothing), so that
        streams taking turns on one codec each continue their own (`restore_stream`)."""
        return None

    def restore_stream(self, state: object) -> None:
        """Continue the stream whose `stream_state` this is at the next `decode_block`; None: a new stream."""
        self.reset_stream()

    @abc.abstractmethod
    def latent_frames(self, num_video_frames: int) -> int:
        """Latent frames whose decoding covers `num_video_frames` (exact when that count is encodable)."""

    @abc.abstractmethod
    def video_frames(self, num_latent_frames: int) -> int:
        """Video frames that `num_latent_frames` latent frames decode to."""

    @abc.abstractmethod
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the codec so `from_pretrained(directory)` rebuilds it."""

    def _check_video(self, video: torch.Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a video of shape (B, 3, F, H, W), got {tuple(video.shape)}")
        height, width = video.shape[-2:]
        if height % self.spatial_factor or width % self.spatial_factor:
            raise ValueError(f"video size {height}x{width} is not divisible by the spatial factor "
                             f"{self.spatial_factor}")
        if self.video_frames(self.latent_frames(video.shape[2])) != video.shape[2]:
            raise ValueError(f"{video.shape[2]} video frames cannot be encoded; valid counts are "
                             f"{[self.video_frames(n) for n in range(1, 5)]}, ...")

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels or latents.shape[2] < 1:
            raise ValueError(f"expected latents of shape (B, {self.latent_channels}, f >= 1, h, w), "
                             f"got {tuple(latents.shape)}")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


class PixelUnshuffleCodec(VideoCodec):
    """Lossless space-and-time-to-depth rearrangement: s x s pixels of t frames become 3*s*s*t channels.

    Frames map in groups of t (F = t * f), so every latent frame decodes on its own and streamed blocks
    need no state. Outputs keep the input's device and dtype.
    """

    def __init__(self, spatial_factor: int = 2, temporal_factor: int = 1):
        _positive("spatial_factor", spatial_factor)
        _positive("temporal_factor", temporal_factor)
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor
        self.latent_channels = 3 * spatial_factor**2 * temporal_factor

    def latent_frames(self, num_video_frames: int) -> int:
        _positive("num_video_frames", num_video_frames)
        return math.ceil(num_video_frames / self.temporal_factor)

    def video_frames(self, num_latent_frames: int) -> int:
        _positive("num_latent_frames", num_latent_frames)
        return num_latent_frames * self.temporal_factor

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self._check_video(video)
        s, t = self.spatial_factor, self.temporal_factor
        b, c, frames, height, width = video.shape
        x = video.reshape(b, c, frames // t, t, height // s, s, width // s, s)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # (b, c, t, s, s, f, h, w)
        return x.reshape(b, self.latent_channels, frames // t, height // s, width // s)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_latents(latents)
        s, t = self.spatial_factor, self.temporal_factor
        b, _, f, h, w = latents.shape
        x = latents.reshape(b, 3, t, s, s, f, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)  # (b, c, f, t, h, s, w, s)
        return x.reshape(b, 3, f * t, h * s, w * s)

    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode(latents)

    def reset_stream(self) -> None:
        """Blocks decode independently: there is no stream state."""

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"kind": "pixel_unshuffle", "spatial_factor": self.spatial_factor,
                  "temporal_factor": self.temporal_factor}
        (directory / PIXEL_CODEC_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PixelUnshuffleCodec:
        path = Path(directory) / PIXEL_CODEC_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        config = json.loads(path.read_text())
        if config.get("kind") != "pixel_unshuffle":
            raise ValueError(f"{path} describes a {config.get('kind')!r} codec, not pixel_unshuffle")
        return cls(config["spatial_factor"], config["temporal_factor"])


class WanVAECodec(VideoCodec):
    """diffusers' `AutoencoderKLWan` with Wan's fixed per-channel latent normalisation.

    Latents are normalised as Wan's pipeline does, (z - latents_mean) / latents_std, so the transformer
    sees roughly unit-variance inputs. Encoding returns the posterior mean (deterministic). The VAE is
    causal in time: 1 + k*t video frames <-> 1 + k latent frames (t = 4 for Wan2.1). The VAE is frozen;
    everything runs without gradient.

    Streamed decoding keeps the decoder's causal feature cache (diffusers' own `feat_cache` mechanism)
    between blocks, so a stream runs the same frame-by-frame computation as decoding the whole video: the
    first block of k latent frames gives 1 + t*(k-1) video frames, every later block t*k. The cache holds
    the last two frames of each causal convolution, so memory does not grow with the stream. One stream
    per codec at a time; `encode` and `decode` do not touch it.
    """

    def __init__(self, vae: AutoencoderKLWan):
        self.vae = vae.eval().requires_grad_(False)
        config = vae.config
        self.latent_channels = config.z_dim
        self.spatial_factor = config.scale_factor_spatial
        self.temporal_factor = config.scale_factor_temporal
        shape = (1, config.z_dim, 1, 1, 1)
        self._latents_mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(shape)
        self._latents_std = torch.tensor(config.latents_std, dtype=torch.float32).view(shape)
        self._decoder_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self.reset_stream()

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_frames(self, num_video_frames: int) -> int:
        _positive("num_video_frames", num_video_frames)
        return 1 + math.ceil((num_video_frames - 1) / self.temporal_factor)

    def video_frames(self, num_latent_frames: int) -> int:
        _positive("num_latent_frames", num_latent_frames)
        return 1 + self.temporal_factor * (num_latent_frames - 1)

    def _normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._latents_mean.to(z.device), self._latents_std.to(z.device)
        return ((z.float() - mean) / std).to(self.dtype)

    def _denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.device)
        mean, std = self._latents_mean.to(latents.device), self._latents_std.to(latents.device)
        return (latents.float() * std + mean).to(self.dtype)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self._check_video(video)
        posterior = self.vae.encode(video.to(self.device, self.dtype)).latent_dist
        return self._normalize(posterior.mode())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_latents(latents)
        return self.vae.decode(self._denormalize(latents)).sample

    def reset_stream(self) -> None:
        self._stream_cache: list[torch.Tensor | None] = [None] * self._decoder_convs
        self._stream_started = False

    def stream_state(self) -> object:
        return list(self._stream_cache), self._stream_started

    def restore_stream(self, state: object) -> None:
        if state is None:
            self.reset_stream()
        else:
            cache, started = state
            self._stream_cache, self._stream_started = list(cache), started

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_latents(latents)
        x = self.vae.post_quant_conv(self._denormalize(latents))  # 1x1x1: no temporal state
        frames = []
        for i in range(x.shape[2]):
            frames.append(self.vae.decoder(x[:, :, i:i + 1], feat_cache=self._stream_cache, feat_idx=[0],
                                           first_chunk=not self._stream_started))
            self._stream_started = True
        video = torch.cat(frames, dim=2)
        if self.vae.config.patch_size is not None:
            video = unpatchify(video, patch_size=self.vae.config.patch_size)
        return video.clamp(-1.0, 1.0)

    def save_pretrained(self, directory: str | Path) -> None:
        self.vae.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> WanVAECodec:
        """Load from an AutoencoderKLWan directory or a diffusers pipeline root holding one in `vae/`."""
        path = Path(path)
        if (path / "vae").is_dir() and not (path / "config.json").is_file():
            path = path / "vae"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not an AutoencoderKLWan directory (no config.json)")
        vae = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        return cls(vae.to(device))


def build_codec(cfg: CodecConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                ) -> VideoCodec:
    """The codec the config names; the pixel codec has no weights, so device and dtype follow its inputs."""
    if cfg.kind == "pixel_unshuffle":
        return PixelUnshuffleCodec(cfg.spatial_factor, cfg.temporal_factor)
    if cfg.kind == "wan_vae":
        if cfg.path is None:
            raise ValueError("codec kind wan_vae needs codec.path, a local AutoencoderKLWan directory")
        return WanVAECodec.from_pretrained(cfg.path, device=device, dtype=dtype)
    raise ValueError(f"unknown codec kind {cfg.kind!r}")
