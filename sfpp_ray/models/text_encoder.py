"""Prompt embeddings for the Wan transformer's cross-attention: a UMT5 encoder and its tokenizer.

Three kinds: the real umT5-xxl Wan was trained with (loaded from a local directory), and tiny ones built
in process from a fixed seed, for tests and toy runs: over bytes ("tiny") or over the sprite world's
words, one token per word ("tiny_words"). All are ordinary transformers objects, so a tiny encoder saved
with `save_pretrained` loads back as kind "umt5".
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from sfpp_ray.config import TextConfig
from sfpp_ray.world.sprites import vocabulary as world_vocabulary

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # UMT5's own special ids
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids PAD_ID, EOS_ID, UNK_ID
BYTE_OFFSET = 3  # token id of byte b is b + BYTE_OFFSET
TINY_SEED = 0
TINY_LAYERS = 2
TINY_HEADS = 2


def _byte_symbols() -> list[str]:
    """One printable character per byte value, so a byte-level vocabulary can be written as text.

    Printable Latin-1 bytes stand for themselves; the rest are moved to code points from 256 upward.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """Deterministic offline tokenizer: token id = UTF-8 byte + BYTE_OFFSET, then EOS, padded with PAD.

    Built as a `tokenizers` BPE without merges over the 256 byte symbols, so it saves and reloads through
    `AutoTokenizer` like any other tokenizer. Text that looks like a special token ("<pad>") stays bytes.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({symbol: byte + BYTE_OFFSET for byte, symbol in enumerate(_byte_symbols())})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return _umt5_style(backend)


def word_level_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """One token per word (lower-cased; punctuation is a word of its own), then EOS, padded with PAD;
    a word outside `words` is UNK. Why: a small encoder trained with a small model reads "grey" as one
    token far more easily than as four bytes."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({word: i + len(SPECIAL_TOKENS) for i, word in enumerate(dict.fromkeys(words))})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return _umt5_style(backend)


def _umt5_style(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """EOS after every prompt and UMT5's special tokens, as a transformers tokenizer that saves and reloads."""
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS_ID)])
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", split_special_tokens=True)


def tiny_umt5(text_dim: int, seed: int = TINY_SEED, vocab_size: int = 256 + BYTE_OFFSET) -> UMT5EncoderModel:
    """A small UMT5 encoder (by default over the byte vocabulary); the same seed gives the same weights in
    every process."""
    config = UMT5Config(vocab_size=vocab_size, d_model=text_dim, d_kv=max(1, text_dim // TINY_HEADS),
                        d_ff=2 * text_dim, num_layers=TINY_LAYERS, num_heads=TINY_HEADS, dropout_rate=0.0,
                        is_encoder_decoder=False, use_cache=False, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UMT5EncoderModel(config).eval()


def clean_prompt(prompt: str) -> str:
    """Collapse runs of whitespace, as Wan's pipeline does before tokenizing."""
    return re.sub(r"\s+", " ", prompt).strip()


def _resolve_dirs(path: Path) -> tuple[Path, Path]:
    """(encoder dir, tokenizer dir) from a dir holding both or a diffusers pipeline root."""
    if (path / "text_encoder").is_dir():
        tokenizer_dir = path / "tokenizer"
        return path / "text_encoder", tokenizer_dir if tokenizer_dir.is_dir() else path
    return path, path


class TextEncoder(torch.nn.Module):
    """Prompts -> (B, max_length, text_dim) embeddings, zero past each prompt's tokens, as Wan feeds them.

    The encoder is frozen, and training asks for the same prompts again and again, so embeddings are
    cached per prompt string (least recently used dropped first). Moving or casting the module clears
    the cache.
    """

    def __init__(self, encoder: UMT5EncoderModel, tokenizer, max_length: int, cache_size: int = 1024):
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._warned_truncation = False

    @property
    def text_dim(self) -> int:
        return self.encoder.config.d_model

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    @classmethod
    def tiny(cls, text_dim: int, max_length: int, seed: int = TINY_SEED) -> TextEncoder:
        return cls(tiny_umt5(text_dim, seed), byte_level_tokenizer(), max_length)

    @classmethod
    def tiny_words(cls, text_dim: int, max_length: int, seed: int = TINY_SEED) -> TextEncoder:
        """A tiny encoder over the sprite world's words."""
        tokenizer = word_level_tokenizer(world_vocabulary())
        return cls(tiny_umt5(text_dim, seed, vocab_size=len(tokenizer)), tokenizer, max_length)

    @classmethod
    def from_pretrained(cls, path: str | Path, max_length: int = 512, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> TextEncoder:
        """A UMT5 encoder and tokenizer from a local directory (never the hub)."""
        encoder_dir, tokenizer_dir = _resolve_dirs(Path(path))
        if not (encoder_dir / "config.json").is_file():
            raise FileNotFoundError(f"no UMT5 encoder in {path}: expected config.json there or in text_encoder/")
        encoder = UMT5EncoderModel.from_pretrained(encoder_dir, local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(encoder, tokenizer, max_length).to(device)

    @classmethod
    def from_config(cls, cfg: TextConfig, text_dim: int, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> TextEncoder:
        if cfg.kind == "tiny":
            encoder = cls.tiny(text_dim, cfg.max_length)
        elif cfg.kind == "tiny_words":
            encoder = cls.tiny_words(text_dim, cfg.max_length)
        elif cfg.kind == "umt5":
            if cfg.path is None:
                raise ValueError("text kind umt5 needs text.path, a local directory with the encoder and tokenizer")
            encoder = cls.from_pretrained(cfg.path, cfg.max_length, dtype=dtype)
        else:
            raise ValueError(f"unknown text encoder kind {cfg.kind!r}")
        if encoder.text_dim != text_dim:
            raise ValueError(f"the text encoder makes {encoder.text_dim}-d embeddings but model.text_dim is {text_dim}")
        return encoder.to(device, dtype)

    def save_pretrained(self, directory: str | Path) -> None:
        """Writes the diffusers pipeline layout (text_encoder/, tokenizer/), which `from_pretrained` reads."""
        directory = Path(directory)
        self.encoder.save_pretrained(directory / "text_encoder")
        self.tokenizer.save_pretrained(directory / "tokenizer")

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_length, text_dim) on the module's device and dtype."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("encode takes a list of prompt strings")
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        found: dict[str, torch.Tensor] = {}
        for prompt in prompts:
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                found[prompt] = self._cache[prompt]
        new = list(dict.fromkeys(p for p in prompts if p not in found))
        if new:
            for prompt, embedding in zip(new, self._run_encoder(new)):
                found[prompt] = embedding
                self._remember(prompt, embedding.clone())
        return torch.stack([found[p] for p in prompts]).to(self.device, self.dtype)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (B, max_length) on the module's device, padded with PAD_ID; the padding is the mask."""
        prompts = [clean_prompt(p) for p in prompts]
        # One token more than kept shows which prompts are too long; only those are tokenized again.
        ids = self._token_ids(prompts, self.max_length + 1)
        too_long = (ids[:, -1] != self.tokenizer.pad_token_id).nonzero().flatten().tolist()
        ids = ids[:, :-1]
        if too_long:
            ids[too_long] = self._token_ids([prompts[i] for i in too_long], self.max_length)
            if not self._warned_truncation:
                self._warned_truncation = True
                warnings.warn(f"prompts longer than text.max_length = {self.max_length} tokens are cut off",
                              stacklevel=2)
        if self.device.type == "cuda":  # from pageable memory the copy would wait for the GPU's queue to drain
            return ids.pin_memory().to(self.device, non_blocking=True)
        return ids.to(self.device)

    def _token_ids(self, prompts: list[str], length: int) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", truncation=True, max_length=length,
                              add_special_tokens=True, return_tensors="pt")["input_ids"]

    def _run_encoder(self, prompts: list[str]) -> torch.Tensor:
        return embed_tokens(self.encoder, self.tokenize(prompts), self.tokenizer.pad_token_id)

    def _remember(self, prompt: str, embedding: torch.Tensor) -> None:
        if self.cache_size == 0:
            return
        self._cache[prompt] = embedding
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


def embed_tokens(encoder: UMT5EncoderModel, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Encoder states of right-padded token ids, zero at the padding, as Wan feeds them."""
    mask = (ids != pad_id).long()
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)


class PromptConditioned(torch.nn.Module):
    """A denoiser trained together with its text encoder: the forward takes token ids (B, L) from
    `TextEncoder.tokenize` where the denoiser alone takes embeddings. Why: a text encoder that was never
    trained (the tiny one) carries the words only weakly; trained with the teacher it learns to carry
    what the video needs. `save_pretrained` writes the denoiser with text_encoder/ and tokenizer/ beside
    it, the layout `TextEncoder.from_pretrained` (text kind umt5) reads."""

    def __init__(self, denoiser: torch.nn.Module, text: TextEncoder):
        super().__init__()
        self.denoiser = denoiser
        self.text_encoder = text.encoder.train().requires_grad_(True)
        self.tokenizer = text.tokenizer
        self.pad_id = int(text.tokenizer.pad_token_id)  # read once: a tokenizer lookup would break a compiled trace

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, token_ids: torch.Tensor,
                return_dict: bool = False):
        context = embed_tokens(self.text_encoder, token_ids, self.pad_id).to(hidden_states.dtype)
        return self.denoiser(hidden_states, timestep, context, return_dict=return_dict)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.denoiser.save_pretrained(directory)
        self.text_encoder.save_pretrained(directory / "text_encoder")
        self.tokenizer.save_pretrained(directory / "tokenizer")
