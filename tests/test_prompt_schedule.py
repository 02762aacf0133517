"""Prompts by time: parsed from --switch values or a JSONL file, refused when malformed, mapped to blocks."""

import random

import pytest

from sfpp_ray.prompt_schedule import PromptSchedule


def test_switches_parse_from_values_and_jsonl_in_time_order(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"t": 45, "prompt": "c"}\n\n{"t": 7.5, "prompt": "d: with a colon"}\n')
    s = PromptSchedule.parse("a", ["20:b", str(tmp_path / "s.jsonl")])
    assert s == PromptSchedule("a", ((7.5, "d: with a colon"), (20.0, "b"), (45.0, "c")))


@pytest.mark.parametrize("values", [["soon:b"], ["0:b"], ["-3:b"], ["5:"], ["5: "], ["b"], ["5:b", "5:c"]])
def test_bad_switches_are_refused(values):
    with pytest.raises(ValueError):
        PromptSchedule.parse("a", values)


def test_a_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"t": 3, "prompt": "b"}\n{"time": 4, "prompt": "c"}\n')
    with pytest.raises(ValueError, match="s.jsonl:2"):
        PromptSchedule.parse("a", [str(tmp_path / "s.jsonl")])


@pytest.mark.parametrize("temporal", [1, 4])
def test_each_switch_lands_on_the_first_block_at_or_after_its_time(temporal):
    """With a codec that keeps every frame and with Wan's (1 + 4k frames): the switch block starts at or after the
    switch's latent frame, and the block before it starts before."""
    fps, fpb = 16, 3
    latent_of = (lambda n: n) if temporal == 1 else (lambda n: 1 + (n - 1) // 4)
    for _ in range(50):
        t = random.uniform(0.01, 30)
        (b, p), = PromptSchedule("a", ((t, "b"),)).blocks(latent_of, fps, fpb, 10**4).items()
        first = latent_of(max(1, round(t * fps)))
        assert p == "b" and b * fpb >= first > (b - 1) * fpb
    assert PromptSchedule("a", ((100.0, "b"),)).blocks(latent_of, fps, fpb, 5) == {}  # past the stream's end
    assert list(PromptSchedule("a", ((1.0, "b"), (1.01, "c"))).blocks(latent_of, fps, fpb, 99).values()) == ["c"]  # one block: the later
