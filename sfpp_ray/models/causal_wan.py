"""The causal student: Wan's own module tree with block-causal attention and a rolling KV cache.

`CausalWanTransformer3DModel` subclasses diffusers' `WanTransformer3DModel` and adds nothing to
its parameters, so every Wan checkpoint loads into it and `save_pretrained` writes a checkpoint
the bidirectional model reads. What changes is the forward:
- per-frame timesteps (B, F): each block can sit at its own noise level;
- rotary positions chosen per pass (see kv_cache.py for the position rule);
- one attention code path for (a) a whole sequence with a block-causal (optionally windowed)
  mask, used in training, and (b) streaming a block against `RollingKVCache`, used by the rollout.
With `causal=False` it is the bidirectional Wan forward (checked against diffusers in tests).
`save_pretrained` also writes the layout beside the weights (LAYOUT_FILE), so inference can stream
with the blocks, window and sinks the student was trained with (`saved_layout`).
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from torch.utils.checkpoint import checkpoint

from sfpp_ray.models.bidirectional_wan import flow_from_sample
from sfpp_ray.models.kv_cache import RollingKVCache, frame_positions, visible_frames


@dataclass
class CausalLayout:
    """How the student groups frames: block size, attention window and sink frames (in latent frames)."""

    frames_per_block: int = 3
    window_frames: int = 21
    sink_frames: int = 0
    position_rule: str = "window_relative"
    attention: str = "auto"  # auto: FlexAttention on CUDA, dense mask on CPU
    fold_context_pass: bool = False  # the rollout runs each context pass inside the next block's first pass
    compile: str = "none"  # the gradient-free streaming step under torch.compile: none, default or reduce-overhead
    compile_backend: str = "inductor"  # aot_eager traces and checks the step without making kernels (no C++ compiler)


LAYOUT_FILE = "causal_layout.json"
SAVED_LAYOUT_FIELDS = ("frames_per_block", "window_frames", "sink_frames", "position_rule")  # not attention, folding, compile: how it runs


def saved_layout(path: str | os.PathLike) -> dict | None:
    """The layout fields a student was saved with, read from beside its weights; None where none was saved
    (original Wan, Self-Forcing or CausVid files, models saved by diffusers itself)."""
    path = Path(path)
    if path.is_dir():  # a model directory, or a pipeline root holding the transformer in transformer/
        home = path / "transformer" if (path / "transformer").is_dir() and not (path / "config.json").is_file() else path
    elif (path.parent / "config.json").is_file():  # the weights file of a model directory
        home = path.parent
    else:
        return None
    if not (home / LAYOUT_FILE).is_file():
        return None
    stored = json.loads((home / LAYOUT_FILE).read_text())
    return {k: stored[k] for k in SAVED_LAYOUT_FIELDS if k in stored}


def _rope_1d(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved rotary cos/sin (len(positions), dim) at arbitrary (unbounded) integer positions."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device)[: dim // 2] / dim))
    ang = torch.outer(positions.to(torch.float64), inv)
    return ang.cos().repeat_interleave(2, dim=1).float(), ang.sin().repeat_interleave(2, dim=1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D); cos/sin (L, D), pairs (2i, 2i+1) rotated as in Wan."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)


@functools.cache
def _compiled_flex_attention():
    """FlexAttention is only fast compiled; compile once per process, on first use."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _stream_step(mode: str, backend: str, device_type: str):
    """(compiled streaming step, mode it runs in): reduce-overhead replays CUDA graphs; elsewhere it compiles as default."""
    if mode == "reduce-overhead" and device_type != "cuda":  # the default filter prints this once
        warnings.warn(f"student.compile=reduce-overhead records CUDA graphs; on {device_type} the step compiles as default")
        mode = "default"
    return _compiled_body(mode, backend), mode


@functools.cache
def _compiled_body(mode: str, backend: str):
    """The streaming step compiled whole (embedding, every block, head) and without graph breaks, one graph per pass
    shape and per filling or full window (see RollingKVCache.static); once per process, shared by every student."""
    # per block size: unfolded and folded passes, each group filling or full
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    kw = {"mode": mode} if backend == "inductor" else {}
    return torch.compile(CausalWanTransformer3DModel._body, fullgraph=True, dynamic=False, backend=backend, **kw)


class CrossAttentionCache:
    """The prompt's cross-attention K/V for every layer, computed once per rollout."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]]):
        self.kv = kv


class CausalWanTransformer3DModel(WanTransformer3DModel):
    layout: CausalLayout = CausalLayout()
    prediction: str = "flow"  # or "sample": see BidirectionalWanTransformer3DModel

    def set_layout(self, layout: CausalLayout) -> CausalWanTransformer3DModel:
        self.layout = layout
        return self

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **kwargs) -> None:
        """diffusers' save, plus the layout in LAYOUT_FILE: the student then streams with the window it was trained with."""
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            saved = {k: getattr(self.layout, k) for k in SAVED_LAYOUT_FIELDS}
            (Path(save_directory) / LAYOUT_FILE).write_text(json.dumps(saved, indent=2) + "\n")

    # ------------------------------------------------------------------ helpers
    @property
    def heads(self) -> int:
        return self.config.num_attention_heads

    def tokens_per_frame(self, height: int, width: int) -> int:
        _, ph, pw = self.config.patch_size
        return (height // ph) * (width // pw)

    def new_cache(self, batch_size: int, height: int, width: int, dtype=None, device=None) -> RollingKVCache:
        """A fresh cache; static (whole-ring passes) when the streaming step is compiled. Under CUDA graphs
        the buffers must keep their addresses, so one cache per shape is kept and reset: one stream at a time."""
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, torch.device(device or p.device)
        compiled = self.layout.compile != "none"
        lay = self.layout
        make = functools.partial(
            RollingKVCache, num_layers=len(self.blocks), batch_size=batch_size, num_heads=self.heads,
            head_dim=self.config.attention_head_dim, tokens_per_frame=self.tokens_per_frame(height, width),
            window_frames=lay.window_frames, sink_frames=lay.sink_frames, position_rule=lay.position_rule,
            max_position=self.config.rope_max_seq_len, dtype=dtype, device=device, static=compiled)
        if not (lay.compile == "reduce-overhead" and device.type == "cuda"):
            return make()
        key = (batch_size, height, width, dtype, str(device), lay.window_frames, lay.sink_frames, lay.position_rule)
        pool = self.__dict__.setdefault("_cache_pool", {})
        if key not in pool:
            pool[key] = make()
            torch._dynamo.mark_static_address(pool[key].k)
            torch._dynamo.mark_static_address(pool[key].v)
        pool[key].reset()
        return pool[key]

    def cross_attention_cache(self, text_embeds: torch.Tensor) -> CrossAttentionCache:
        """Project the prompt once; every block and denoising step of a rollout reuses it."""
        ctx = self.condition_embedder.text_embedder(text_embeds)
        kv = []
        for block in self.blocks:
            a = block.attn2
            k = a.norm_k(a.to_k(ctx)).unflatten(2, (a.heads, -1)).transpose(1, 2)
            v = a.to_v(ctx).unflatten(2, (a.heads, -1)).transpose(1, 2)
            kv.append((k, v))
        return CrossAttentionCache(kv)

    def _rope(self, frame_pos: torch.Tensor, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (len(frame_pos) * h * w, head_dim) for frames at the given positions, cached.

        Under the window-relative rule a full window always sees positions 0..W-1, so streaming
        hits this cache on every pass once the window has filled.
        """
        key = (tuple(frame_pos.tolist()), h, w, str(device))
        cache = self.__dict__.setdefault("_rope_cache", {})
        if key not in cache:
            if len(cache) > 64:
                cache.clear()
            r = self.rope
            ct, st = _rope_1d(frame_pos.to(device), r.t_dim)
            hs, ws = slice(r.t_dim, r.t_dim + r.h_dim), slice(r.t_dim + r.h_dim, None)
            f = len(frame_pos)

            def grid(t, table):
                table = table.float().to(device)
                return torch.cat([t.view(f, 1, 1, -1).expand(f, h, w, -1), table[:h, hs].view(1, h, 1, -1).expand(f, h, w, -1),
                                  table[:w, ws].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, -1)

            cache[key] = (grid(ct, r.freqs_cos), grid(st, r.freqs_sin))
        return cache[key]

    def _use_flex(self, device) -> bool:
        att = self.layout.attention
        return att == "flex" or (att == "auto" and torch.device(device).type == "cuda")

    def _mask(self, num_frames: int, tpf: int, device):
        """Who sees whom in a whole-sequence pass: a query in block b sees the sink frames and its window
        up to the end of b. A FlexAttention BlockMask (skips masked tiles) on CUDA, else a dense (L, L) mask."""
        lay = self.layout
        fpb, sink, rolling = lay.frames_per_block, lay.sink_frames, lay.window_frames - lay.sink_frames

        def visible(q_frame, k_frame):
            q_end = (q_frame // fpb + 1) * fpb  # exclusive end of the query's block
            return (k_frame < q_end) & ((k_frame < sink) | (k_frame >= q_end - rolling))

        key = (num_frames, tpf, str(device), fpb, sink, rolling, self._use_flex(device))
        cache = self.__dict__.setdefault("_mask_cache", {})
        if key not in cache:
            if len(cache) > 8:
                cache.clear()
            if self._use_flex(device):
                from torch.nn.attention.flex_attention import create_block_mask

                L = num_frames * tpf
                cache[key] = create_block_mask(lambda b, h, q, k: visible(q // tpf, k // tpf), None, None, L, L, device=device)
            else:
                frame = torch.arange(num_frames, device=device)
                cache[key] = visible(frame[:, None], frame[None, :]).repeat_interleave(tpf, 0).repeat_interleave(tpf, 1)
        return cache[key]

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                *, cross_cache: CrossAttentionCache | None = None, kv_cache: RollingKVCache | None = None,
                causal: bool = True, context_frames: int = 0, cache_only: bool = False, return_dict: bool = False,
                **_unused) -> torch.Tensor | None:
        """Predict the flow for latents (B, C, F, H, W).

        timestep: (B,) or (B, F). With `kv_cache`, the F frames are the next frames of the stream
        (one block); their un-rotated K/V are written into the cache (call `kv_cache.commit()`
        after the clean context pass). Without it, the F frames are a whole sequence starting at
        frame 0, attended block-causally (or bidirectionally with causal=False).

        context_frames > 0 folds the context pass into the next block's first pass: the first
        context_frames frames are the clean block the cache last began (at the context timestep),
        the rest the next block. Each group attends exactly as its own pass would (see
        `RollingKVCache.begin_folded`); the clean K/V are written and committed, and only the
        next block's flow is returned. One pass instead of two: fewer launches, larger matmuls.

        cache_only: a context pass, whose flow nobody reads: the last block stops once its K/V are written and
        None is returned (the cache holds what the full pass writes; about a ninth of the pass saved).
        """
        B, _, nf, H, W = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        if p_t != 1:
            raise ValueError("the causal student needs a temporal patch size of 1")
        h, w = H // p_h, W // p_w
        tpf = h * w
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(B, nf)
        if cross_cache is None:
            if encoder_hidden_states is None:
                raise ValueError("pass encoder_hidden_states or cross_cache")
            cross_cache = self.cross_attention_cache(encoder_hidden_states)

        recompute = torch.is_grad_enabled() and self.gradient_checkpointing
        if context_frames and (kv_cache is None or recompute):
            raise ValueError("a folded context pass streams against a KV cache, without activation checkpointing")
        if cache_only and (kv_cache is None or context_frames or torch.is_grad_enabled()):
            raise ValueError("cache_only is for an unfolded context pass against a KV cache, without gradients")
        mask = None
        if kv_cache is not None:  # q_rope: per group of the pass, rotary (query, cached key or None) cos/sin, key mask
            groups = kv_cache.begin_folded(context_frames, nf - context_frames) if context_frames else [kv_cache.begin(nf)]
            q_rope = [(self._rope(qp, h, w, hidden_states.device), None if kp is None else self._rope(kp, h, w, hidden_states.device), m)
                      for (qp, kp), m in zip(groups, kv_cache.masks)]
            k_rope = None
            if self.layout.compile != "none" and not torch.is_grad_enabled():
                if not kv_cache.static:
                    raise ValueError("a compiled streaming step needs a static cache: make it with new_cache after set_layout")
                step, mode = _stream_step(self.layout.compile, self.layout.compile_backend, hidden_states.device.type)
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                # contiguous: a block sliced from the whole rollout's noise has strides that depend on its length,
                # and the compiled step would be compiled again for every length
                out = step(self, hidden_states.contiguous(), timestep, cross_cache.kv, q_rope, k_rope, mask, kv_cache, context_frames, False)
                if cache_only:  # the compiled step is the whole pass: its flow is dropped, the cache is what counts
                    return None
                return out.clone() if mode == "reduce-overhead" else out  # the graph's output buffer is rewritten by the next replay
        elif causal and self._needs_per_block_positions(nf):
            q_rope = k_rope = (h, w)  # positions depend on the query block: see _per_block_attention
        else:
            q_rope = k_rope = self._rope(torch.arange(nf), h, w, hidden_states.device)
            if causal:
                mask = self._mask(nf, tpf, hidden_states.device)
        return self._body(hidden_states, timestep, cross_cache.kv, q_rope, k_rope, mask, kv_cache, context_frames, recompute,
                          cache_only)

    def _body(self, hidden_states, timestep, cross_kv, q_rope, k_rope, mask, kv_cache, context_frames: int, recompute: bool,
              cache_only: bool = False):
        """The forward from patches to the flow, the attention's positions and masks chosen: what the streaming step compiles."""
        B, _, nf, H, W = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        h, w = H // p_h, W // p_w
        tpf = h * w
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)  # (B, L, D)
        ce = self.condition_embedder
        t_emb = ce.timesteps_proj(timestep.reshape(-1).float())
        temb = ce.time_embedder(t_emb.to(ce.time_embedder.linear_1.weight.dtype)).type_as(x).view(B, nf, -1)  # (B, F, D)
        mod = ce.time_proj(ce.act_fn(temb)).unflatten(2, (6, -1))  # (B, F, 6, D)

        for i, block in enumerate(self.blocks):
            if cache_only and i == len(self.blocks) - 1:
                self._write_kv(block, x, mod, q_rope[0][0], kv_cache, i, nf)
                return None
            if recompute:  # the block re-runs in the backward, against the cache as this pass saw it
                layer_cache = None if kv_cache is None else kv_cache.frozen(i)
                x = checkpoint(self._block, block, x, mod, cross_kv[i], q_rope, k_rope, mask, layer_cache, i, nf,
                               use_reentrant=False)
            else:
                x = self._block(block, x, mod, cross_kv[i], q_rope, k_rope, mask, kv_cache, i, nf)

        xo = x.view(B, nf, tpf, -1)
        if context_frames:  # the clean block's output is not needed
            xo, temb, hidden_states, timestep = xo[:, context_frames:], temb[:, context_frames:], hidden_states[:, :, context_frames:], timestep[:, context_frames:]
            nf -= context_frames
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unbind(2)  # (B, F, D)
        xo = (self.norm_out(xo.float()) * (1 + scale[:, :, None]) + shift[:, :, None]).type_as(x)
        out = self.proj_out(xo).reshape(B, nf, h, w, p_t, p_h, p_w, -1)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return flow_from_sample(hidden_states, out, timestep) if self.prediction == "sample" else out

    def _needs_per_block_positions(self, num_frames: int) -> bool:
        lay = self.layout
        return lay.position_rule == "window_relative" and lay.sink_frames > 0 and num_frames > lay.window_frames

    def _block(self, block, x, mod, cross_kv, q_rope, k_rope, mask, kv_cache, layer, nf):
        """One Wan block (same arithmetic as diffusers' WanTransformerBlock) with our self-attention."""
        B, L, D = x.shape
        e = (block.scale_shift_table.unsqueeze(0) + mod.float()).unbind(2)  # six (B, F, D)
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = (t[:, :, None] for t in e)
        xf = x.view(B, nf, -1, D)
        y = (block.norm1(xf.float()) * (1 + scale_msa) + shift_msa).type_as(x)
        attn = self._self_attention(block.attn1, y.view(B, L, D), q_rope, k_rope, mask, kv_cache, layer)
        xf = (xf.float() + attn.view(B, nf, -1, D) * gate_msa).type_as(x)
        y = block.norm2(xf.float()).type_as(x)
        xf = xf + self._cross_attention(block.attn2, y.view(B, L, D), cross_kv).view(B, nf, -1, D)
        y = (block.norm3(xf.float()) * (1 + c_scale) + c_shift).type_as(x)
        xf = (xf.float() + block.ffn(y).float() * c_gate).type_as(x)
        return xf.view(B, L, D)

    def _write_kv(self, block, x, mod, q_rope, kv_cache, layer, nf):
        """The part of `_block` a cache-only pass needs: this layer's K/V of the pass, written into the cache."""
        B, L, D = x.shape
        shift, scale = (t[:, :, None] for t in (block.scale_shift_table.unsqueeze(0) + mod.float()).unbind(2)[:2])
        y = (block.norm1(x.view(B, nf, -1, D).float()) * (1 + scale) + shift).type_as(x).view(B, L, D)
        a = block.attn1
        k, v = (a.to_qkv(y).chunk(3, dim=-1)[1:] if getattr(a, "fused_projections", False) else (a.to_k(y), a.to_v(y)))
        k, v = (t.unflatten(2, (a.heads, -1)).transpose(1, 2) for t in (a.norm_k(k), v))
        kv_cache.write(layer, apply_rope(k, *q_rope) if kv_cache.keys_rotated else k, v)

    def _self_attention(self, a, x, q_rope, k_rope, mask, kv_cache, layer):
        if getattr(a, "fused_projections", False):
            q, k, v = a.to_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = a.to_q(x), a.to_k(x), a.to_v(x)
        q, k = a.norm_q(q), a.norm_k(k)
        q, k, v = (t.unflatten(2, (a.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
        if kv_cache is not None:
            out = self._stream_attention(q, k, v, q_rope, kv_cache, layer)
        elif isinstance(q_rope[0], int):
            out = self._per_block_attention(q, k, v, *q_rope)
        else:
            out = self._attend(apply_rope(q, *q_rope), apply_rope(k, *k_rope), v, mask)
        return a.to_out[0](out.transpose(1, 2).flatten(2).type_as(x))

    def _stream_attention(self, q, k, v, groups, kv_cache, layer):
        """The pass's frames against the cache, group by group: each group writes its K/V, then attends to
        what its own pass would see, before the next group's writes can evict any of it."""
        outs, lo = [], 0
        for g, (q_rope, k_rope, mask) in enumerate(groups):
            hi = lo + q_rope[0].shape[0]
            kg, vg = k[:, :, lo:hi], v[:, :, lo:hi]
            if k_rope is None:  # keys are cached rotated
                kc, vc = kv_cache.write(layer, apply_rope(kg, *q_rope), vg, group=g)
            else:
                kc, vc = kv_cache.write(layer, kg, vg, group=g)
                kc = apply_rope(kc, *k_rope)
            outs.append(self._attend(apply_rope(q[:, :, lo:hi], *q_rope), kc, vc, mask))
            lo = hi
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _per_block_attention(self, q, k, v, h, w):
        """Whole sequence, sinks and a rolled window: each query block sees its window with that window's positions."""
        lay, tpf = self.layout, h * w
        nf = q.shape[2] // tpf
        out = torch.empty_like(q)
        for start in range(0, nf, lay.frames_per_block):
            end = min(start + lay.frames_per_block, nf)
            frames = visible_frames(end, lay.window_frames, lay.sink_frames)
            pos = frame_positions(frames, end, lay.window_frames, lay.sink_frames, lay.position_rule, self.config.rope_max_seq_len)
            kc, ks = self._rope(pos, h, w, q.device)
            qc, qs = self._rope(pos[-(end - start):], h, w, q.device)
            idx = (frames[:, None] * tpf + torch.arange(tpf)).reshape(-1).to(q.device)
            qb = apply_rope(q[:, :, start * tpf:end * tpf], qc, qs)
            kb = apply_rope(k.index_select(2, idx), kc, ks)
            out[:, :, start * tpf:end * tpf] = F.scaled_dot_product_attention(qb, kb, v.index_select(2, idx))
        return out

    def _attend(self, q, k, v, mask):
        if mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask
            return _compiled_flex_attention()(q, k, v, block_mask=mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    @staticmethod
    def _cross_attention(a, x, cross_kv):
        k, v = cross_kv
        q = a.norm_q(a.to_q(x)).unflatten(2, (a.heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return a.to_out[0](out.transpose(1, 2).flatten(2).type_as(x))
