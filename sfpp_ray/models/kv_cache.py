"""Rolling KV cache for block-wise streaming: a preallocated ring of latent-frame slots.

Layout: per layer, K and V of shape (B, heads, window_frames * tokens_per_frame, head_dim).
The first `sink_frames` slots keep the first frames of the video for ever; frame n >= sink
lives in slot sink + (n - sink) mod (window - sink), so writing a new block overwrites exactly
the frames that leave the window. Nothing is reallocated or concatenated during a rollout, and
the slots that hold frames always form a prefix, so attention reads one contiguous slice.

Position rule. Keys are stored *before* the rotary embedding, with the frame index each slot
holds. Every pass rotates queries and cached keys with positions of its choice:
- "window_relative" (default): the frames a pass sees are numbered 0..n-1 in temporal order,
  sinks first. Positions never exceed the window, so a stream has no length limit. Without sinks
  this gives the same attention as absolute positions (RoPE depends only on differences).
- "absolute": the frame index itself (the paper's behaviour); defined only while the stream is
  shorter than the rotary table (1024 latent frames for Wan).
Training forwards over a whole sequence use the same rule (see CausalWanTransformer3DModel).
"""

from __future__ import annotations

import torch


@torch.library.custom_op("sfpp_ray::store_into_ring", mutates_args=("k_ring", "v_ring"))
def _store_into_ring(k_ring: torch.Tensor, v_ring: torch.Tensor, idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """One layer's K/V written into its ring slots, as an op the compiler cannot see into.

    Traced as a plain index_copy_ on a view of the cache, the write is functionalised into an out-of-place copy
    of the whole layer and a copy of every layer back at the end of the pass: about 24 GB of memory traffic a
    1.3B pass. As a custom op that mutates its arguments, inductor writes into the ring in place.
    """
    k_ring.index_copy_(2, idx, k)
    v_ring.index_copy_(2, idx, v)


@_store_into_ring.register_fake
def _(k_ring, v_ring, idx, k, v) -> None:
    return None


def visible_frames(end: int, window: int, sink: int) -> torch.Tensor:
    """Frames a pass whose newest frame is end - 1 attends to: the sinks, then the rolling window."""
    first_rolling = max(sink, end - (window - sink))
    return torch.cat([torch.arange(min(sink, end)), torch.arange(first_rolling, end)])


def frame_positions(frames: torch.Tensor, end: int, window: int, sink: int, rule: str, max_position: int) -> torch.Tensor:
    """Rotary frame positions of `frames` as seen by a pass whose newest frame is end - 1."""
    if rule == "absolute":
        if end > max_position:
            raise ValueError(f"absolute positions are defined up to {max_position} latent frames; "
                             f"this stream reached {end}: use position_rule 'window_relative'")
        return frames.clone()
    first_rolling = max(sink, end - (window - sink))
    return torch.where(frames < sink, frames, frames - first_rolling + sink)


class RollingKVCache:
    def __init__(self, num_layers: int, batch_size: int, num_heads: int, head_dim: int, tokens_per_frame: int,
                 window_frames: int, sink_frames: int = 0, position_rule: str = "window_relative",
                 max_position: int = 1024, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 static: bool = False):
        if not 0 <= sink_frames < window_frames:
            raise ValueError(f"sink_frames ({sink_frames}) must lie in [0, window_frames={window_frames})")
        if position_rule not in ("window_relative", "absolute"):
            raise ValueError(f"unknown position rule {position_rule!r}")
        self.window, self.sink, self.tpf = window_frames, sink_frames, tokens_per_frame
        self.position_rule, self.max_position = position_rule, max_position
        shape = (num_layers, batch_size, num_heads, window_frames * tokens_per_frame, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_frame = torch.full((window_frames,), -1, dtype=torch.long)
        # Without sinks, window-relative and absolute positions give the same attention, so keys can
        # be stored rotated at their absolute frame (angles computed exactly, with no table limit)
        # and only the new block is rotated per pass. With sinks, keys are re-rotated every pass.
        self.keys_rotated = sink_frames == 0 or position_rule == "absolute"
        self.frames_done = 0  # frames whose clean K/V are committed
        # static: every pass attends over the whole buffer, the slots not yet filled masked out, so a compiled
        # step sees one shape per pass kind from the first block on (see `masks`)
        self.static = static
        self._active: tuple[int, int] | None = None
        # per group of the pass: (slot token indices, key tokens attended, key mask or None)
        self._groups: list[tuple[torch.Tensor, int, torch.Tensor | None]] = []

    @staticmethod
    def analytic_bytes(num_layers: int, batch_size: int, num_heads: int, head_dim: int, tokens_per_frame: int,
                       window_frames: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * batch_size * num_heads * window_frames * tokens_per_frame * head_dim * elem

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reset(self) -> None:
        self.slot_frame.fill_(-1)
        self.frames_done = 0
        self._active = None
        self._groups = []

    def slot(self, frame: int) -> int:
        if frame < self.sink:
            return frame
        return self.sink + (frame - self.sink) % (self.window - self.sink)

    def begin(self, num_frames: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Claim slots for the next `num_frames` frames; returns (query positions, key positions per valid slot).

        Key positions are None when stored keys are already rotated (see `keys_rotated`).

        A pass over the frames being denoised calls this each step (same slots, rewritten);
        `commit` then makes them context for the next block.
        """
        self._groups = []
        return self._claim(self.frames_done, num_frames)

    def begin_folded(self, context_frames: int, num_frames: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """One pass over [the uncommitted clean frames ; the next `num_frames` frames]: (query, key positions) of each group.

        Group 0 (write(..., group=0)) is the context pass of the frames claimed by the last `begin`, group 1 the
        first pass of the next block. Each group's positions and visible slots are those its own pass would have,
        computed before group 1 claims slots that may evict frames group 0 still sees; so group 0 must attend
        before group 1 writes. The clean frames count as committed from here on.
        """
        start = self.frames_done
        if self._active != (start, start + context_frames):
            raise ValueError(f"the folded pass's {context_frames} context frames are not the block the cache last began")
        self._groups = []
        ctx = self._claim(start, context_frames)
        self.frames_done = start + context_frames
        return [ctx, self._claim(self.frames_done, num_frames)]

    def _claim(self, start: int, num_frames: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        end = start + num_frames
        if num_frames > self.window - self.sink:
            raise ValueError(f"a pass of {num_frames} frames does not fit the rolling part of the window")
        for n in range(start, end):
            self.slot_frame[self.slot(n)] = n
        self._active = (start, end)
        self._idx = torch.cat([torch.arange(self.slot(n) * self.tpf, (self.slot(n) + 1) * self.tpf)
                               for n in range(start, end)]).to(self.k.device)
        valid = min(end, self.window)
        if self.static:  # the whole ring; until it fills, a mask hides the empty slots (which hold zeros or an old stream)
            mask = None if valid == self.window else (torch.arange(self.window * self.tpf, device=self.k.device) < valid * self.tpf)[None]
            self._groups.append((self._idx, self.window * self.tpf, mask))
            frames = self.slot_frame.clamp(min=0)  # an empty slot's position is never attended
        else:
            self._groups.append((self._idx, valid * self.tpf, None))
            frames = self.slot_frame[:valid]
        q_frames = torch.arange(start, end)
        if self.keys_rotated:
            if self.position_rule == "absolute":
                self.positions(q_frames, end)  # raises past the rotary table
            return q_frames, None
        return self.positions(q_frames, end), self.positions(frames, end)

    @property
    def masks(self) -> list[torch.Tensor | None]:
        """Per group of the pass, the keys it may attend ((1, keys) bool), or None where it attends all it is given."""
        return [m for _, _, m in self._groups]

    def positions(self, frames: torch.Tensor, end: int) -> torch.Tensor:
        return frame_positions(frames, end, self.window, self.sink, self.position_rule, self.max_position)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k (rotated or not, see `keys_rotated`), v (B, H, n*tpf, D) of the active frames; return the valid prefix of the layer.

        `group` picks the frames of a folded pass (see `begin_folded`). The buffer never carries autograd
        history. When k/v require grad (a training exit step), the returned prefix is an out-of-place copy
        holding the differentiable k/v in the active slots, so later writes to the buffer cannot invalidate the graph.
        """
        idx, valid, _ = self._groups[group]
        self._store(layer, idx, k, v)
        kp, vp = self.k[layer, :, :, :valid], self.v[layer, :, :, :valid]
        if k.requires_grad or v.requires_grad:
            kp, vp = kp.index_copy(2, idx, k), vp.index_copy(2, idx, v)
        return kp, vp

    def _store(self, layer: int, idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if torch.compiler.is_compiling():
            _store_into_ring(self.k[layer], self.v[layer], idx, k.detach(), v.detach())
        else:  # eager: the same write without the custom op's dispatch cost (60 calls a pass)
            self.k[layer].index_copy_(2, idx, k.detach())
            self.v[layer].index_copy_(2, idx, v.detach())

    def _valid_tokens(self) -> int:
        return self._groups[0][1]

    def frozen(self, layer: int) -> FrozenLayerCache:
        """This layer's cache as the active pass sees it, for a block that re-runs in the backward (see FrozenLayerCache)."""
        return FrozenLayerCache(self, layer)

    def commit(self) -> None:
        start, end = self._active
        self.frames_done = end
        self._active = None


class FrozenLayerCache:
    """One layer of the cache for a pass under activation checkpointing, where the block runs twice.

    Between the forward and the backward's re-run, later passes rewrite the ring (the context pass,
    the next blocks), so the re-run must neither write again nor read the buffer. This holds a detached
    copy of the layer's valid prefix taken before the pass and the pass's slots: every call attends
    over that copy with the new k/v placed out of place, so both runs see the same keys; only the
    first call writes the new K/V into the cache.
    """

    def __init__(self, cache: RollingKVCache, layer: int):
        valid = cache._valid_tokens()
        self.cache, self.layer, self.idx = cache, layer, cache._idx
        self.k, self.v = cache.k[layer, :, :, :valid].clone(), cache.v[layer, :, :, :valid].clone()
        self.written = False

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as RollingKVCache.write, for a pass of one group; the returned prefix is always out of place."""
        if group:
            raise ValueError("a folded pass does not run under activation checkpointing")
        if not self.written:
            self.cache._store(self.layer, self.idx, k, v)
            self.written = True
        return self.k.index_copy(2, self.idx, k), self.v.index_copy(2, self.idx, v)
