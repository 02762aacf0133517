"""The causal student: streaming equals the block-causal forward, causality, Wan equivalence, the saved layout."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel

from sfpp_ray.models.causal_wan import LAYOUT_FILE, CausalLayout, CausalWanTransformer3DModel, saved_layout

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, out_channels=12,
            text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2)


def _models(seed):
    torch.manual_seed(seed)
    teacher = WanTransformer3DModel(**TINY).eval()
    student = CausalWanTransformer3DModel(**TINY).eval()
    student.load_state_dict(teacher.state_dict())
    return teacher, student


def _stream(student, x, t, text):
    fpb = student.layout.frames_per_block
    cache = student.new_cache(x.shape[0], x.shape[3], x.shape[4])
    cross = student.cross_attention_cache(text)
    outs = []
    for s in range(0, x.shape[2], fpb):
        outs.append(student(x[:, :, s:s + fpb], t[:, s:s + fpb], cross_cache=cross, kv_cache=cache))
        cache.commit()
    return torch.cat(outs, dim=2)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("fpb,window,sink", [(1, 4, 0), (3, 6, 0), (1, 4, 1), (3, 9, 3)])
def test_streaming_equals_block_causal_forward_after_the_window_rolls(fpb, window, sink):
    seed = int(torch.randint(0, 2**31, ()))
    _, student = _models(seed)
    student.set_layout(CausalLayout(frames_per_block=fpb, window_frames=window, sink_frames=sink))
    nf = 4 * window  # the window rolls several times
    x, t, text = torch.randn(2, 12, nf, 8, 8), torch.rand(2, nf) * 1000, torch.randn(2, 7, 32)
    with torch.no_grad():
        full = student(x, t, text)
        stream = _stream(student, x, t, text)
    assert _rel(stream, full) <= 1e-5


def test_streaming_equals_full_forward_before_the_window_fills():
    _, student = _models(int(torch.randint(0, 2**31, ())))
    student.set_layout(CausalLayout(frames_per_block=3, window_frames=21))
    x, t, text = torch.randn(1, 12, 12, 8, 8), torch.rand(1, 12) * 1000, torch.randn(1, 5, 32)
    with torch.no_grad():
        assert _rel(_stream(student, x, t, text), student(x, t, text)) <= 1e-5


def test_window_rollout_matches_a_forward_over_exactly_what_the_window_holds():
    """Without sinks, the last block's output equals a fresh forward over the frames its window held,
    when those frames' cached K/V came from the same context (a 1-layer model makes K/V context-free)."""
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    student = CausalWanTransformer3DModel(**{**TINY, "num_layers": 1}).eval().set_layout(CausalLayout(3, 6, 0))
    x, t, text = torch.randn(1, 12, 15, 8, 8), torch.rand(1, 15) * 1000, torch.randn(1, 7, 32)
    with torch.no_grad():
        last = _stream(student, x, t, text)[:, :, -3:]
        window = student(x[:, :, -6:], t[:, -6:], text)[:, :, -3:]
    assert _rel(last, window) <= 1e-5


@pytest.mark.parametrize("fpb", [1, 3])
def test_block_causality(fpb):
    _, student = _models(int(torch.randint(0, 2**31, ())))
    student.set_layout(CausalLayout(frames_per_block=fpb, window_frames=6))
    nf = 9
    x, t, text = torch.randn(1, 12, nf, 8, 8), torch.rand(1, nf) * 1000, torch.randn(1, 7, 32)
    for b in range(1, nf // fpb):
        y = x.clone()
        y[:, :, b * fpb:(b + 1) * fpb] += torch.randn_like(y[:, :, b * fpb:(b + 1) * fpb])
        with torch.no_grad():
            a, c = student(x, t, text), student(y, t, text)
        assert torch.equal(a[:, :, :b * fpb], c[:, :, :b * fpb])
        assert not torch.allclose(a[:, :, b * fpb:], c[:, :, b * fpb:])


def test_non_causal_forward_equals_diffusers_wan():
    teacher, student = _models(int(torch.randint(0, 2**31, ())))
    x, t, text = torch.randn(2, 12, 5, 8, 8), torch.rand(2) * 1000, torch.randn(2, 7, 32)
    with torch.no_grad():
        ref = teacher(x, t, text, return_dict=False)[0]
        ours = student(x, t, text, causal=False)
    assert _rel(ours, ref) <= 1e-5


def test_per_frame_timesteps_equal_uniform_when_all_frames_agree():
    teacher, student = _models(int(torch.randint(0, 2**31, ())))
    x, text = torch.randn(1, 12, 3, 8, 8), torch.randn(1, 7, 32)
    t = torch.rand(1) * 1000
    with torch.no_grad():
        assert torch.allclose(student(x, t, text, causal=False), student(x, t.expand(1, 3), text, causal=False))


def test_student_state_dict_is_wan_state_dict():
    teacher, student = _models(0)
    assert teacher.state_dict().keys() == student.state_dict().keys()


def test_gradients_flow_through_the_training_forward():
    _, student = _models(int(torch.randint(0, 2**31, ())))
    student.set_layout(CausalLayout(3, 6, 0)).train()
    student.enable_gradient_checkpointing()
    x, t, text = torch.randn(1, 12, 6, 8, 8), torch.rand(1, 6) * 1000, torch.randn(1, 7, 32)
    student(x, t, text).square().mean().backward()
    assert all(p.grad is not None for p in student.blocks[0].attn1.parameters())


def test_sample_prediction_is_read_as_the_flow_through_the_noise_level():
    """With prediction="sample" both models return (x_t - net(x_t)) / sigma, so x_t - sigma * flow is the network's
    clean prediction; the causal student and the bidirectional model still agree without a mask."""
    from sfpp_ray.models.bidirectional_wan import BidirectionalWanTransformer3DModel

    teacher, student = _models(int(torch.randint(0, 2**31, ())))
    bidirectional = BidirectionalWanTransformer3DModel(**TINY).eval()
    bidirectional.load_state_dict(teacher.state_dict())
    x, text = torch.randn(2, 12, 3, 8, 8), torch.randn(2, 7, 32)
    t = torch.rand(2) * 900 + 100
    sigma = (t / 1000).view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        raw = teacher(x, t, text, return_dict=False)[0]
        assert torch.equal(bidirectional(x, t, text, return_dict=False)[0], raw)  # "flow": diffusers' output
        bidirectional.prediction = student.prediction = "sample"
        flow = bidirectional(x, t, text, return_dict=False)[0]
        assert torch.allclose(x - sigma * flow, raw, atol=1e-5)
        assert _rel(student(x, t, text, causal=False), flow) <= 1e-5
        tiny = torch.full((2,), 1.0)  # below the smallest noise level a sample is divided by
        assert torch.allclose(bidirectional(x, tiny, text, return_dict=False)[0],
                              (x - teacher(x, tiny, text, return_dict=False)[0]) / 0.05, atol=1e-4)


def test_save_pretrained_writes_the_layout_beside_the_weights(tmp_path):
    teacher, student = _models(int(torch.randint(0, 2**31, ())))
    fpb = int(torch.randint(1, 4, ()))
    sink = fpb * int(torch.randint(0, 2, ()))
    rule = ["window_relative", "absolute"][int(torch.randint(0, 2, ()))]
    student.set_layout(CausalLayout(fpb, sink + fpb * int(torch.randint(1, 8, ())), sink, rule, attention="sdpa"))
    expected = {k: getattr(student.layout, k) for k in ("frames_per_block", "window_frames", "sink_frames", "position_rule")}
    student.save_pretrained(tmp_path / "pipeline" / "transformer")
    home = tmp_path / "pipeline" / "transformer"
    assert json.loads((home / LAYOUT_FILE).read_text()) == expected  # not the attention kernel: a runtime choice
    assert saved_layout(home) == saved_layout(tmp_path / "pipeline") == expected
    assert saved_layout(home / "diffusion_pytorch_model.safetensors") == expected
    loaded = CausalWanTransformer3DModel.from_pretrained(home)  # still a diffusers directory
    assert all(torch.equal(p, student.state_dict()[k]) for k, p in loaded.state_dict().items())

    teacher.save_pretrained(tmp_path / "teacher")  # diffusers' own save states no layout
    torch.save(student.state_dict(), tmp_path / "single.pt")  # nor does a single file
    assert saved_layout(tmp_path / "teacher") is None and saved_layout(tmp_path / "single.pt") is None


@pytest.mark.parametrize("fpb,window,sink,rule", [(3, 6, 0, "window_relative"), (1, 4, 1, "window_relative"),
                                                  (2, 6, 2, "absolute")])
def test_cache_only_context_pass_writes_what_the_full_pass_writes(fpb, window, sink, rule):
    """A context pass that stops after the last layer's K/V write leaves the cache exactly as the full pass does,
    block after block as the window rolls (rotated and unrotated keys), and refuses where its output is needed."""
    _, student = _models(int(torch.randint(0, 2**31, ())))
    student.set_layout(CausalLayout(frames_per_block=fpb, window_frames=window, sink_frames=sink, position_rule=rule))
    nf = 3 * window
    x, t, text = torch.randn(2, 12, nf, 8, 8), torch.rand(2, nf) * 1000, torch.randn(2, 5, 32)
    full, short = student.new_cache(2, 8, 8), student.new_cache(2, 8, 8)
    cross = student.cross_attention_cache(text)
    with torch.no_grad():
        for s in range(0, nf, fpb):
            block, bt = x[:, :, s:s + fpb], t[:, s:s + fpb]
            assert student(block, bt, cross_cache=cross, kv_cache=short, cache_only=True) is None
            student(block, bt, cross_cache=cross, kv_cache=full)
            full.commit(), short.commit()
            assert torch.equal(short.k, full.k) and torch.equal(short.v, full.v)
        with pytest.raises(ValueError, match="cache_only"):
            student(x[:, :, :fpb], t[:, :fpb], cross_cache=cross, cache_only=True)
    with pytest.raises(ValueError, match="cache_only"):
        student(x[:, :, :fpb], t[:, :fpb], cross_cache=cross, kv_cache=full, cache_only=True)
