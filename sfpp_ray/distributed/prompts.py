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
    """Hands out (index, prompt) in file order, cycling; its position is the resume point.

    A rollout worker takes prompts under its index and marks them done once their samples reached the
    buffer; a restarted worker's prompts still in flight are lost samples, handed out again first.
    """

    def __init__(self, prompts: list[str], position: int = 0):
        if not prompts:
            raise ValueError("PromptFeed needs at least one prompt")
        self.prompts = prompts
        self._position = position
        self._in_flight: dict[int, list[int]] = {}  # worker -> indices taken, not yet done
        self._again: list[int] = []  # indices of lost samples, served before new ones
        self._restarts = 0
        self._lost = 0

    def next(self, worker: int | None = None) -> tuple[int, str]:
        index = self._again.pop(0) if self._again else self._fresh()
        if worker is not None:
            self._in_flight.setdefault(worker, []).append(index)
        return index, self.prompts[index]

    def _fresh(self) -> int:
        index = self._position % len(self.prompts)
        self._position += 1
        return index

    def done(self, worker: int, indices: list[int]) -> None:
        """The worker's samples of these prompts reached the buffer (or were refused by it)."""
        pending = self._in_flight.get(worker, [])
        for index in indices:
            pending.remove(index)

    def restarted(self, worker: int) -> int:
        """The worker's process died and was replaced: its prompts in flight are lost; returns how many."""
        lost = self._in_flight.pop(worker, [])
        self._again.extend(lost)
        self._restarts += 1
        self._lost += len(lost)
        return len(lost)

    def stats(self) -> dict[str, int]:
        return {"position": self._position, "worker_restarts": self._restarts, "lost_in_flight": self._lost}

    def position(self) -> int:
        """Prompts handed out so far (across cycles), not counting those handed out again."""
        return self._position

    def state_dict(self) -> dict[str, int | list[int]]:
        """The resume point: what was handed out, what is to be handed out again, and the counts so far. Prompts in
        flight at a checkpoint are handed out again on resume (their samples never reached the checkpoint)."""
        again = self._again + [i for indices in self._in_flight.values() for i in indices]
        return {"position": self._position, "again": again, "worker_restarts": self._restarts,
                "lost_in_flight": self._lost}

    def load_state_dict(self, state: dict) -> None:
        self.seek(int(state["position"]))
        self._again = [int(i) for i in state["again"]]
        self._restarts, self._lost = int(state["worker_restarts"]), int(state["lost_in_flight"])

    def seek(self, position: int) -> None:
        if position < 0:
            raise ValueError(f"feed position must be >= 0, got {position}")
        self._position = position
