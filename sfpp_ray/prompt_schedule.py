"""Prompts by time for a streaming video: `generate --prompt a --switch 20:b --switch 45:c`, or a JSONL file."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PromptSchedule:
    """A prompt, then (seconds, prompt) switches in increasing time: the prompt in force from each time on."""

    prompt: str
    switches: tuple[tuple[float, str], ...] = ()

    def __post_init__(self):
        if not self.prompt.strip():
            raise ValueError("the prompt is empty")
        times = [t for t, _ in self.switches]
        for t, p in self.switches:
            if not t > 0:
                raise ValueError(f"a switch at {t} s: switch times must be > 0 seconds")
            if not p.strip():
                raise ValueError(f"the prompt switched to at {t:g} s is empty")
        if times != sorted(set(times)):
            raise ValueError(f"switch times must increase, got {times}")

    @classmethod
    def parse(cls, prompt: str, switches: list[str] = ()) -> PromptSchedule:
        """`generate --switch` values: SECONDS:PROMPT, or a .jsonl file of {"t": seconds, "prompt": ...} lines."""
        out = []
        for item in switches:
            if item.endswith(".jsonl") and Path(item).is_file():
                out += cls.read_jsonl(item)
                continue
            t, sep, p = item.partition(":")
            try:
                out.append((float(t), p))
            except ValueError:
                sep = ""
            if not sep:
                raise ValueError(f"--switch {item!r}: expected SECONDS:PROMPT or a .jsonl file") from None
        return cls(prompt, tuple(sorted(out, key=lambda x: x[0])))

    @staticmethod
    def read_jsonl(path: str | Path) -> list[tuple[float, str]]:
        out = []
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append((float(row["t"]), str(row["prompt"])))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected {{\"t\": seconds, \"prompt\": ...}}, got {line.strip()!r}") from e
        return out

    def blocks(self, latent_frames_of, fps: int, frames_per_block: int, num_blocks: int) -> dict[int, str]:
        """{block: prompt} for the switches inside a stream of `num_blocks`: each at the first block starting at or
        after its time (latent_frames_of(video frames): the codec's count)."""
        out = {}
        for t, p in self.switches:
            b = math.ceil(latent_frames_of(max(1, round(t * fps))) / frames_per_block)
            if b < num_blocks:
                out[b] = p  # two switches inside one block: the later one wins
        return out
