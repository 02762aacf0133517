"""Training prompts: a validated list on the controller, handed out in order by one feed actor.

Prompts are checked once, up front, so a bad line fails loudly with its line number in a report
instead of surfacing as a tokenizer error inside a rollout worker hours later. The feed is a
single actor so that every rollout worker draws from one ordered stream whose position can be
checkpointed and restored on resume.
"""

from __future__ import annotations

from pathlib import Path

import ray

from sfpp_ray.checks import read_prompts

BUILTIN_PROMPTS = [
    "a red ball bouncing across a wooden floor",
    "a paper boat drifting down a rainy street",
    "a cat walking along a garden wall at sunset",
    "waves rolling onto a sandy beach",
    "a hot air balloon rising over green hills",
    "a train crossing a bridge in the snow",
    "leaves falling from a tree in autumn wind",
    "a drone shot flying over a city at night",
]


def load_prompts(path: str | Path | None, max_chars: int) -> tuple[list[str], dict]:
    """Read prompts from a .txt (one per line) or .jsonl ({"prompt": ...}) file; None: the built-in list.

    Returns (prompts, report); the report counts kept and rejected lines and why, with the first
    few rejected line numbers per reason (checks.read_prompts, which config validation runs too). Raises
    if the file is missing, binary, of an unknown kind, or leaves no prompt at all.
    """
    if path is None:
        report = {"source": "built-in", "kept": len(BUILTIN_PROMPTS), "rejected": 0, "reasons": {}, "examples": {}}
        print(f"prompts: {len(BUILTIN_PROMPTS)} built-in")
        return list(BUILTIN_PROMPTS), report
    prompts, report = read_prompts(path, max_chars)
    why = ", ".join(f"{n} {r} (lines {report['examples'][r]})" for r, n in report["reasons"].items())
    print(f"prompts: {len(prompts)} kept, {report['rejected']} rejected from {path}" + (f": {why}" if why else ""))
    return prompts, report


@ray.remote(num_cpus=0)
class PromptFeed:
    """Hands out (index, prompt) in file order, cycling; its position is the resume point."""

    def __init__(self, prompts: list[str], position: int = 0):
        if not prompts:
            raise ValueError("PromptFeed needs at least one prompt")
        self.prompts = prompts
        self._position = position

    def next(self) -> tuple[int, str]:
        index = self._position % len(self.prompts)
        self._position += 1
        return index, self.prompts[index]

    def position(self) -> int:
        """Prompts handed out so far (across cycles)."""
        return self._position

    def seek(self, position: int) -> None:
        if position < 0:
            raise ValueError(f"feed position must be >= 0, got {position}")
        self._position = position
