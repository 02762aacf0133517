"""A trained model directory as the repository ships it: every float tensor in float16 safetensors, the
rest (config, tokenizer) as it is, the stage record with its per-step losses averaged down to at most
LOSS_POINTS, and `made_by.json` naming the command and commit that trained it, so no one trains it twice.

    python experiments/ship_weights.py --src outputs/teacher/teacher --dst weights/world_teacher \
        --command "sfpp-ray pretrain-teacher --config configs/world_gpu.yaml ..." --commit <sha>
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


LOSS_POINTS = 500  # a 30000-step record is 0.7 MB of losses; 500 means draw the same curve


def condensed_record(record: dict) -> dict:
    """The stage record with `losses` averaged over consecutive runs of steps (`loss_every` steps a point)."""
    losses = record.get("losses") or []
    if len(losses) <= LOSS_POINTS:
        return record
    every = -(-len(losses) // LOSS_POINTS)
    means = [sum(chunk) / len(chunk) for chunk in (losses[i:i + every] for i in range(0, len(losses), every))]
    return {**record, "losses": means, "loss_every": every}


def ship(src: Path, dst: Path, command: str, commit: str) -> dict:
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} holds no model (no config.json)")
    dst.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            weights = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
            save_file({k: v.contiguous() for k, v in weights.items()}, out)
        elif path.name == "stage.json":
            out.write_text(json.dumps(condensed_record(json.loads(path.read_text())), indent=2) + "\n")
        else:
            shutil.copyfile(path, out)
        sizes[str(out.relative_to(dst))] = out.stat().st_size
    record = {"command": command, "commit": commit, "dtype": "float16", "files": sizes,
              "bytes": sum(sizes.values())}
    (dst / "made_by.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, type=Path)
    p.add_argument("--dst", required=True, type=Path)
    p.add_argument("--command", required=True, help="the command that trained the model")
    p.add_argument("--commit", required=True, help="the commit it was trained at")
    args = p.parse_args(argv)
    record = ship(args.src, args.dst, args.command, args.commit)
    print(f"{args.dst}: {record['bytes'] / 2**20:.1f} MiB in {len(record['files'])} files")
    return record


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
