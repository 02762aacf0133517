"""Whole-sequence block-causal forward + backward of the student: FlexAttention vs a dense mask.

The training forward (ODE init, teacher forcing) attends block-causally over a whole window.
Prints agreement, time and peak memory for each attention path (a table, last) and writes JSON.

    python benchmarks/training_forward.py --device cuda --frames 21 --out training_forward.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sfpp_ray.models.causal_wan import CausalLayout, CausalWanTransformer3DModel

WAN13 = dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
             freq_dim=256, ffn_dim=8960, num_layers=30)
TINY = dict(num_attention_heads=2, attention_head_dim=12, in_channels=12, out_channels=12, text_dim=32,
            freq_dim=32, ffn_dim=48, num_layers=2)


def run(model, attention, x, t, text, repeats):
    model.set_layout(CausalLayout(3, x.shape[2], 0, attention=attention))
    times = []
    for i in range(repeats + 1):  # first run compiles / warms up
        model.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = model(x, t, text)
        out.float().square().mean().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if x.is_cuda else float("nan")
    grad = model.blocks[0].attn1.to_q.weight.grad.detach().float().clone()
    return out.detach().float(), grad, min(times), peak


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=["wan1.3b", "tiny"], default="wan1.3b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--frames", type=int, default=21)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="training_forward.json")
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec, hw = (WAN13, (60, 104)) if a.shape == "wan1.3b" else (TINY, (8, 8))
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalWanTransformer3DModel(patch_size=(1, 2, 2), **spec).to(dtype).train()
    model.enable_gradient_checkpointing()
    x = torch.randn(1, spec["in_channels"], a.frames, *hw, device=device, dtype=dtype)
    t = torch.rand(1, a.frames, device=device) * 1000
    text = torch.randn(1, 512 if a.shape == "wan1.3b" else 16, spec["text_dim"], device=device, dtype=dtype)
    rows, ref = [], None
    for attention in ("sdpa", "flex"):
        out, grad, seconds, peak = run(model, attention, x, t, text, a.repeats)
        if ref is None:
            ref = (out, grad)
        rows.append({"attention": attention, "seconds": seconds, "peak_gib": peak,
                     "out_rel_err_vs_dense": float((out - ref[0]).norm() / ref[0].norm()),
                     "grad_rel_err_vs_dense": float((grad - ref[1]).norm() / ref[1].norm())})
    result = {"shape": a.shape, "frames": a.frames, "dtype": str(dtype), "tokens": a.frames * hw[0] * hw[1] // 4,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "rows": rows}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nshape={a.shape} frames={a.frames} tokens={result['tokens']} device={result['device']} dtype={dtype}")
    print(f"{'attention':<10}{'fwd+bwd s':>11}{'peak GiB':>10}{'out err':>10}{'grad err':>10}")
    for r in rows:
        print(f"{r['attention']:<10}{r['seconds']:>11.3f}{r['peak_gib']:>10.2f}{r['out_rel_err_vs_dense']:>10.1e}{r['grad_rel_err_vs_dense']:>10.1e}")


if __name__ == "__main__":
    main()
