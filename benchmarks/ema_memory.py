"""The moving average's float32 memory per rank below ZeRO-3: one whole copy on every rank, against the
average split over the ranks (each averages the whole parameters it owns, `EMA(..., ranks=N, rank=r)`).

The student of the config's model section is built on the meta device (no memory, any size: the Wan
1.3B config runs on a laptop, without the weights, text encoder and VAE its other sections name) and the EMA is made for every rank of each rank count, so the table counts what the EMA code
itself keeps; the largest rank's share against the even 1/N shows how well whole parameters deal out.
Prints a table (last) and writes JSON.

    python benchmarks/ema_memory.py --config configs/wan2.1_t2v_1.3b.yaml --out ema_memory.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from sfpp_ray.algorithm.dmd import EMA
from sfpp_ray.config import load_section
from sfpp_ray.models.causal_wan import CausalWanTransformer3DModel
from sfpp_ray.models.loading import build_wan_transformer

GB = 1e9


def shadow_bytes(ema: EMA) -> int:
    return sum(t.numel() * t.element_size() for t in ema.shadow.values())


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--ranks", default="1,2,4,8,16", help="comma-separated rank counts")
    p.add_argument("--out", default=None, help="JSON file")
    args = p.parse_args(argv)
    model = dataclasses.replace(load_section(args.config, "model"), pretrained=None)
    with torch.device("meta"):
        student = build_wan_transformer(model, cls=CausalWanTransformer3DModel)
    params = sum(t.numel() for t in student.parameters())
    whole = shadow_bytes(EMA(student, 0.99))
    rows = []
    for n in (int(r) for r in args.ranks.split(",")):
        shares = [shadow_bytes(EMA(student, 0.99, ranks=n, rank=r)) for r in range(n)]
        assert sum(shares) == whole  # every value kept on exactly one rank
        rows.append({"ranks": n, "whole_gb_per_rank": whole / GB, "split_max_gb": max(shares) / GB,
                     "split_min_gb": min(shares) / GB, "largest_over_even": max(shares) / (whole / n)})
    print(f"{args.config}: {params / 1e6:.1f}M parameters, {len(list(student.parameters()))} tensors")
    print(f"{'ranks':>5} {'whole / rank GB':>16} {'split: largest GB':>18} {'smallest GB':>12} {'largest / even':>15}")
    for r in rows:
        print(f"{r['ranks']:>5} {r['whole_gb_per_rank']:>16.3f} {r['split_max_gb']:>18.3f} {r['split_min_gb']:>12.3f} "
              f"{r['largest_over_even']:>15.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "parameters": params, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
