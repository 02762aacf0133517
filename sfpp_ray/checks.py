"""What a run is given, checked before anything is built: weights files by their headers and the prompts file by
its text, read without torch, so that a bad one fails in one line naming its path before Ray or a model starts.
Also the error a non-finite value stops a run with."""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from pathlib import Path

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# What torch.save wrote before its zip format: pickle protocol 2, then torch's magic number as a pickled long
LEGACY_TORCH_HEAD = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
MAX_SAFETENSORS_HEADER = 100 * 1024**2  # safetensors' own limit on its JSON header


class CheckError(ValueError):
    """A file that cannot be what it is given as; the message starts with its path."""


class NonFiniteError(RuntimeError):
    """A loss, gradient or latent that is NaN or infinite where going on would hide it (a skipped step too many,
    a video of garbage); the message names where it was."""


def check_safetensors(path: Path) -> None:
    """The 8-byte header length, the JSON header it frames, and that the file holds every tensor the header lists."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise CheckError(f"{path}: not a safetensors file (its first 8 bytes give a header of {n} bytes; "
                             f"the file holds {size})")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckError(f"{path}: not a safetensors file (its header is not a JSON object)")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckError(f"{path}: not a safetensors file (tensor {name!r} has no data offsets in its header)")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise CheckError(f"{path}: truncated: its header lists {8 + n + end} bytes, the file holds {size}")


def check_torch_file(path: Path) -> None:
    """torch.save's zip format (the zip's index sits at the end, so a truncated file has none) or its legacy one."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckError(f"{path}: not a readable torch checkpoint ({e})") from None
        if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            raise CheckError(f"{path}: a zip file but not a torch checkpoint (no data.pkl in it)")
        return
    with path.open("rb") as f:
        head = f.read(len(LEGACY_TORCH_HEAD))
    if head != LEGACY_TORCH_HEAD:
        raise CheckError(f"{path}: not a torch checkpoint (no zip index at its end and no legacy torch header: "
                         "truncated, or another format)")


def check_weights_file(path: Path) -> None:
    if path.name.endswith(".safetensors.index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise CheckError(f"{path}: not a safetensors index (a JSON object with a weight_map)") from None
        for shard in shards:
            if not (path.parent / shard).is_file():
                raise CheckError(f"{path}: lists the shard {shard!r}, which does not exist")
            check_safetensors(path.parent / shard)
    elif path.suffix == ".safetensors":
        check_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        check_torch_file(path)
    else:
        raise CheckError(f"{path}: unknown weights format {path.suffix!r} "
                         "(expected .safetensors, .safetensors.index.json, .pt, .pth, .bin, .ckpt)")


def weights_directory(path: Path) -> Path:
    """A diffusers pipeline root keeps the transformer in `transformer/`; a model directory holds it directly."""
    sub = path / "transformer"
    return sub if sub.is_dir() and not (path / "config.json").is_file() else path


def weights_files(directory: Path) -> list[Path]:
    """The one file a weights directory is read from (models.loading reads what this names): a shard index, or
    its one weights file, in the directory or a pipeline root's transformer/."""
    directory = weights_directory(directory)
    preferred = directory / "diffusion_pytorch_model.safetensors.index.json"
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if preferred.is_file() or len(indexes) == 1:
        return [preferred if preferred.is_file() else indexes[0]]
    if len(indexes) > 1:
        raise CheckError(f"{directory}: holds several shard indexes {[p.name for p in indexes]}; name the one to load")
    for pattern in ("*.safetensors", "*.pt", "*.pth", "*.bin"):
        files = sorted(directory.glob(pattern))
        preferred = directory / f"diffusion_pytorch_model{pattern[1:]}"
        if preferred.is_file() or len(files) == 1:
            return [preferred if preferred.is_file() else files[0]]
        if len(files) > 1:
            raise CheckError(f"{directory}: holds several weight files {[p.name for p in files]}; name the one to load")
    raise CheckError(f"{directory}: holds no .safetensors, .pt, .pth or .bin weights")


def check_weights(path: str | Path) -> None:
    """Transformer weights as models.loading reads them (a directory or a file), checked by their headers."""
    path = Path(path)
    if not path.exists():
        raise CheckError(f"{path}: does not exist")
    for file in weights_files(path) if path.is_dir() else [path]:
        check_weights_file(file)


def read_prompts(path: str | Path, max_chars: int) -> tuple[list[str], dict]:
    """Prompts from a .txt (one a line) or .jsonl ({"prompt": ...}) file, and a report counting the lines kept and
    rejected and why, with the first few rejected line numbers a reason. A missing, binary or prompt-less file, or
    one of another kind, is a CheckError."""
    path = Path(path)
    if not path.is_file():
        raise CheckError(f"{path}: does not exist" if not path.exists() else f"{path}: not a file")
    if path.suffix not in (".txt", ".jsonl"):
        raise CheckError(f"{path}: expected .txt (one prompt a line) or .jsonl ({{\"prompt\": ...}})")
    data = path.read_bytes()
    if b"\0" in data:
        raise CheckError(f"{path}: a binary file (it holds NUL bytes), not prompts")
    prompts: list[str] = []
    reasons: Counter[str] = Counter()
    examples: dict[str, list[int]] = {}

    def reject(reason: str, line_no: int) -> None:
        reasons[reason] += 1
        if len(examples.setdefault(reason, [])) < 5:
            examples[reason].append(line_no)

    for line_no, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            reject("not utf-8", line_no)
            continue
        if path.suffix == ".jsonl":
            if not line.strip():
                reject("empty", line_no)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                reject("bad json", line_no)
                continue
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                reject("no string 'prompt' field", line_no)
                continue
            line = record["prompt"]
        prompt = line.strip()
        if not prompt:
            reject("empty", line_no)
        elif len(prompt) > max_chars:
            reject(f"longer than {max_chars} chars", line_no)
        else:
            prompts.append(prompt)
    report = {"source": str(path), "kept": len(prompts), "rejected": sum(reasons.values()),
              "reasons": dict(reasons), "examples": examples}
    if not prompts:
        why = ", ".join(f"{n} {r} (lines {examples[r]})" for r, n in reasons.items())
        raise CheckError(f"{path}: holds no usable prompt ({why or 'it is empty'})")
    return prompts, report
