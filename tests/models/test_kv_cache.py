"""The rolling cache: fixed analytic memory, no growth, unbounded streams, position rules."""

import pytest
import torch

from sfpp_ray.models.causal_wan import CausalLayout, CausalWanTransformer3DModel
from sfpp_ray.models.kv_cache import RollingKVCache, frame_positions, visible_frames

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, out_channels=12,
            text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2)


def test_cache_bytes_are_analytic_and_constant_over_a_long_rollout():
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    student = CausalWanTransformer3DModel(**TINY).eval().set_layout(CausalLayout(3, 6, 0))
    cache = student.new_cache(1, 8, 8)
    expected = RollingKVCache.analytic_bytes(2, 1, 2, 12, 16, 6, torch.float32)
    assert cache.nbytes == expected
    ptrs = (cache.k.data_ptr(), cache.v.data_ptr())
    cross = student.cross_attention_cache(torch.randn(1, 7, 32))
    with torch.no_grad():
        for _ in range(20 * 6 // 3):  # 20x the window
            student(torch.randn(1, 12, 3, 8, 8), torch.full((1, 3), 500.0), cross_cache=cross, kv_cache=cache)
            cache.commit()
            assert cache.nbytes == expected and (cache.k.data_ptr(), cache.v.data_ptr()) == ptrs
    assert cache.frames_done == 120


def test_a_stream_runs_past_the_rotary_table():
    student = CausalWanTransformer3DModel(**{**TINY, "num_layers": 1, "rope_max_seq_len": 32}).eval()
    student.set_layout(CausalLayout(3, 6, 0))
    cache = student.new_cache(1, 4, 4)
    cross = student.cross_attention_cache(torch.randn(1, 3, 32))
    with torch.no_grad():
        for _ in range(1050 // 3):  # past 1024 latent frames
            out = student(torch.randn(1, 12, 3, 4, 4), torch.full((1, 3), 0.0), cross_cache=cross, kv_cache=cache)
            cache.commit()
    assert cache.frames_done >= 1050 and torch.isfinite(out).all()


def test_absolute_positions_refuse_to_run_past_the_table():
    with pytest.raises(ValueError, match="window_relative"):
        frame_positions(torch.arange(3), 1030, 21, 0, "absolute", 1024)


def test_window_relative_positions_stay_inside_the_window():
    for end in range(3, 300, 3):
        for sink in (0, 3):
            pos = frame_positions(visible_frames(end, 21, sink), end, 21, sink, "window_relative", 1024)
            assert pos.tolist() == list(range(min(end, 21)))


def test_slots_evict_the_oldest_non_sink_frames():
    cache = RollingKVCache(1, 1, 1, 2, 1, window_frames=6, sink_frames=2)
    seen = []
    for _ in range(6):
        cache.begin(2)
        cache.commit()
        seen.append(cache.slot_frame.tolist())
    assert seen[-1][:2] == [0, 1]  # sinks stay
    assert sorted(seen[-1][2:]) == [8, 9, 10, 11]  # the newest rolling frames


def test_a_folded_pass_needs_the_block_the_cache_last_began():
    student = CausalWanTransformer3DModel(**TINY).eval().set_layout(CausalLayout(3, 6, 0))
    cache, cross = student.new_cache(1, 8, 8), student.cross_attention_cache(torch.randn(1, 5, 32))
    x, t = torch.randn(1, 12, 6, 8, 8), torch.full((1, 6), 500.0)
    with torch.no_grad():
        with pytest.raises(ValueError, match="context frames"):  # nothing began: no clean block to fold
            student(x, t, cross_cache=cross, kv_cache=cache, context_frames=3)
        with pytest.raises(ValueError, match="KV cache"):
            student(x, t, cross_cache=cross, context_frames=3)
        student(x[:, :, :3], t[:, :3], cross_cache=cross, kv_cache=cache)
        out = student(x, t, cross_cache=cross, kv_cache=cache, context_frames=3)
    assert out.shape == (1, 12, 3, 8, 8) and cache.frames_done == 3 and cache._active == (3, 6)


def test_a_compiled_write_stores_into_the_ring_in_place():
    """Under inductor the write must not copy the ring: traced as index_copy_ on a view of the cache it became an
    out-of-place copy of every layer plus a copy back (tens of GB a 1.3B pass); the generated code must only call
    the store on the cache's own memory, and leave the same cache as an eager write."""
    from torch._inductor.utils import run_and_get_code

    caches = [RollingKVCache(3, 1, 2, 4, 5, window_frames=4, static=True) for _ in range(2)]
    k, v = torch.randn(3, 1, 2, 10, 4), torch.randn(3, 1, 2, 10, 4)

    def write(cache, k, v):
        for layer in range(3):
            cache.write(layer, k[layer], v[layer])

    for cache in caches:
        cache.begin(1)
        cache.commit()
        cache.begin(2)  # slots 1 and 2 of 4
    write(caches[0], k, v)
    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(write, fullgraph=True, backend="inductor"), caches[1], k, v)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    assert caches[1].k[:, :, :, 5:15].abs().sum() > 0 and caches[1].k[:, :, :, 15:].abs().sum() == 0
    code = "\n".join(code)
    assert code.count("store_into_ring.default(") == 3
    assert "cpp_fused" not in code and "triton" not in code  # no kernel: nothing is copied
