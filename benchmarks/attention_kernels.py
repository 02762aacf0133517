"""The streaming pass's self-attention on every kernel this torch offers: time, TFLOP/s and error.

One call as the student makes it with a full window: a block of `student.frames_per_block` frames of queries against
`student.window_frames` frames of keys and values, the head count and width of the config's model, the token count
of its video shape (queries laid out (batch, tokens, heads, dim) and transposed, as the model does), to pick
the kernel by measurement. Prints a table (last) and writes JSON.

    python benchmarks/attention_kernels.py --config configs/wan2.1_t2v_1.3b.yaml --device cuda --dtype bfloat16 \
        text.kind=tiny codec.path=<an AutoencoderKLWan directory>
    python benchmarks/attention_kernels.py --config configs/tiny.yaml --device cpu

A kernel that cannot run the call (not built for this device, dtype or shape) gets a row saying why. The error is
the largest absolute difference from the float32 result of the same inputs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sfpp_ray import components
from sfpp_ray.config import load_config

SDPA = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
KERNELS = (*SDPA, "flex")


def call_shape(cfg) -> dict:
    """Heads, head width, query and key tokens of one self-attention call of a streaming pass with a full window."""
    codec = components.build_video_codec(cfg)
    _, _, _, h, w = components.latent_shape(cfg, codec, cfg.student.frames_per_block)
    _, ph, pw = cfg.model.patch_size
    tokens = (h // ph) * (w // pw)
    return {"heads": cfg.model.num_attention_heads, "head_dim": cfg.model.attention_head_dim,
            "queries": cfg.student.frames_per_block * tokens, "keys": cfg.student.window_frames * tokens}


def attention(kernel: str):
    if kernel == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        return torch.compile(flex_attention, dynamic=False)

    def sdpa(q, k, v):
        with sdpa_kernel(SDPA[kernel]):
            return F.scaled_dot_product_attention(q, k, v)
    return sdpa


def timed(fn, repeats: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--kernels", default=",".join(KERNELS))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="attention_kernels.json")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (the call's shape needs no weights)")
    args = p.parse_args(argv)
    kernels = args.kernels.split(",")
    if unknown := [k for k in kernels if k not in KERNELS]:
        p.error(f"--kernels: unknown {unknown}; choose from {', '.join(KERNELS)}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = call_shape(load_config(args.config, args.overrides))
    H, D, Lq, Lk = shape["heads"], shape["head_dim"], shape["queries"], shape["keys"]
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, L, H, D, generator=g).to(device).transpose(1, 2) for L in (Lq, Lk, Lk))
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        reference = F.scaled_dot_product_attention(q, k, v)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    flop = 4 * H * Lq * Lk * D  # the two matmuls, 2 FLOPs a multiply-add
    rows = []
    for kernel in kernels:
        fn = attention(kernel)
        try:
            out = fn(q, k, v)  # also the warm-up (and flex's compile)
            seconds = timed(lambda: fn(q, k, v), args.repeats, device)
        except Exception as e:  # a kernel this build or device lacks: recorded, the others still timed
            rows.append({"kernel": kernel, "unavailable": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"})
            continue
        rows.append({"kernel": kernel, "ms": seconds * 1e3, "tflops": flop / seconds / 1e12,
                     "max_abs_error": (out.float() - reference).abs().max().item()})
    result = {"shape": shape, "dtype": args.dtype, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "torch": torch.__version__, "config": args.config, "repeats": args.repeats, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{result['device']}, torch {torch.__version__}, {args.dtype}: {H} heads of {D}, {Lq} queries x {Lk} keys, "
          f"{flop / 1e12:.3f} TFLOP a call")
    print(f"{'kernel':<10} {'ms':>9} {'TFLOP/s':>9} {'max err':>9}")
    for r in rows:
        if "unavailable" in r:
            print(f"{r['kernel']:<10} unavailable: {r['unavailable']}")
        else:
            print(f"{r['kernel']:<10} {r['ms']:9.3f} {r['tflops']:9.3g} {r['max_abs_error']:9.2e}")
    return result


if __name__ == "__main__":
    main()
