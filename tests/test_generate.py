"""`sfpp-ray generate` on the tiny config writes a playable video of the expected length, with the student's layout."""

import json
import math
import shutil
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from sfpp_ray import components
from sfpp_ray import generate as generate_module
from sfpp_ray.checks import NonFiniteError
from sfpp_ray.cli import main
from sfpp_ray.config import load_config
from sfpp_ray.generate import generate
from sfpp_ray.models.causal_wan import LAYOUT_FILE, CausalWanTransformer3DModel
from sfpp_ray.prompt_schedule import PromptSchedule
from sfpp_ray.video_io import read_video

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_generate_cli_writes_a_playable_mp4_20x_the_teacher_horizon(tmp_path, capsys):
    cfg = load_config(TINY)
    horizon_s = cfg.video.teacher_frames / cfg.video.fps  # tiny codec: one video frame per latent frame
    out = tmp_path / "video.mp4"
    assert main(["generate", "--config", str(TINY), "--prompt", "two red squares bouncing",
                 "--seconds", str(20 * horizon_s), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out)  # stdout: one JSON line
    frames = read_video(out)
    assert frames.shape == (20 * cfg.video.teacher_frames, cfg.video.height, cfg.video.width, 3)
    assert result["video_frames"] == frames.shape[0] and result["path"] == str(out)
    assert result["video_seconds"] == pytest.approx(20 * horizon_s) and result["elapsed_s"] > 0
    assert "seconds" not in result  # the time taken is elapsed_s, never beside --seconds under its name
    assert printed.err.strip().splitlines()[-1] == (f"wrote {out}: {20 * horizon_s:g} s of video, {frames.shape[0]} "
                                                   f"frames ({frames.shape[0]} latent), in {result['elapsed_s']:.1f} s")


def test_generate_is_deterministic_by_seed_and_prompt(tmp_path):
    cfg = load_config(TINY, ["rollout.decode_overlap=false"])
    a = read_video(generate(cfg, "a blue circle", 1.5, tmp_path / "a.gif", seed=3, progress=False)["path"])
    b = read_video(generate(cfg, "a blue circle", 1.5, tmp_path / "b.gif", seed=3, progress=False)["path"])
    c = read_video(generate(cfg, "a blue circle", 1.5, tmp_path / "c.gif", seed=4, progress=False)["path"])
    assert (a == b).all() and not (a == c).all()


@pytest.mark.parametrize("prompt,seconds", [(" ", 1.0), ("x", 0.0), ("x", -2.0)])
def test_bad_generate_input_is_refused(tmp_path, prompt, seconds):
    with pytest.raises(ValueError):
        generate(load_config(TINY), prompt, seconds, tmp_path / "x.mp4", progress=False)


@pytest.mark.parametrize("overlap", [True, False])
def test_a_student_that_makes_nan_writes_no_video(tmp_path, overlap):
    """Non-finite latents (here from a NaN weight) stop the stream with an error naming the block, and leave no
    file: decoded, NaN becomes black frames that would pass for a video."""
    cfg = load_config(TINY, [f"rollout.decode_overlap={str(overlap).lower()}"])
    student = components.build_student(cfg)
    weight = student.proj_out.bias.data
    weight[int(torch.randint(weight.numel(), ()))] = float("nan")
    student.save_pretrained(tmp_path / "student")
    out = tmp_path / "v.gif"
    with pytest.raises(NonFiniteError, match="block 1 of .*NaN or inf"):
        generate(cfg, "a blue circle", 2.0, out, checkpoint=str(tmp_path / "student"), progress=False)
    assert not out.exists()


def _random_layout() -> tuple[int, int, int]:
    """(frames_per_block, window_frames, sink_frames): 1-3 frames a block, 2-4 blocks beside no sinks or one block."""
    fpb = int(torch.randint(1, 4, ()))
    sink = fpb * int(torch.randint(0, 2, ()))
    return fpb, sink + fpb * int(torch.randint(2, 5, ())), sink


def test_a_saved_student_streams_with_the_blocks_and_window_it_was_saved_with(tmp_path, monkeypatch):
    saved, other = _random_layout(), _random_layout()
    while other[1] == saved[1]:
        other = _random_layout()
    layout = lambda fpb, window, sink: [f"student.frames_per_block={fpb}", f"student.window_frames={window}",  # noqa: E731
                                        f"student.sink_frames={sink}", "rollout.decode_overlap=false"]
    components.build_student(load_config(TINY, layout(*saved))).save_pretrained(tmp_path / "student")
    shutil.copytree(tmp_path / "student", tmp_path / "weights_only")
    (tmp_path / "weights_only" / LAYOUT_FILE).unlink()
    caches, rollouts = [], []
    new_cache, rollout = CausalWanTransformer3DModel.new_cache, generate_module.rollout
    monkeypatch.setattr(CausalWanTransformer3DModel, "new_cache", lambda *a, **k: caches.append(new_cache(*a, **k)) or caches[-1])
    monkeypatch.setattr(generate_module, "rollout", lambda *a, **k: rollouts.append(out := rollout(*a, **k)) or out)
    n = 36 + int(torch.randint(1, 3, ()))  # latent frames past every window, not whole blocks of 2 or 3

    def stream(layout_overrides, checkpoint):
        cfg = load_config(TINY, layout_overrides)
        result = generate(cfg, "a blue circle", n / cfg.video.fps, tmp_path / "v.gif", checkpoint=str(tmp_path / checkpoint),
                          seed=5, progress=False)
        cache, latents = caches.pop(), rollouts.pop().latents
        assert result["latent_frames"] == latents.shape[2]
        return (cache.window, cache.sink, latents.shape[2]), latents

    whole_blocks = lambda fpb: math.ceil(n / fpb) * fpb  # noqa: E731
    run, streamed = stream(layout(*other), "student")
    assert run == (saved[1], saved[2], whole_blocks(saved[0]))
    assert torch.equal(streamed, stream(layout(*saved), "student")[1])
    run, unsaved = stream(layout(*other), "weights_only")  # no saved layout: the config's
    assert run == (other[1], other[2], whole_blocks(other[0]))
    assert not torch.allclose(unsaved[:, :, :n], streamed[:, :, :n])


def test_a_batch_streams_each_prompt_as_it_streams_alone():
    """stream_batch: each video is the one `stream` makes of its prompt and seed alone (up to float rounding),
    with the rolling cache and context noise on; swapping the seeds swaps the videos."""
    cfg = load_config(TINY, ["rollout.decode_overlap=false", "schedule.context_noise=100"])
    gen = generate_module.VideoGenerator(cfg)
    prompts, seeds = ["a blue circle", "two red squares bouncing", "a green triangle"], torch.randint(0, 10**6, (3,)).tolist()
    nf = 4 * cfg.student.frames_per_block  # past the tiny student's cache window

    class Frames(list):
        def video(self):
            return torch.from_numpy(np.concatenate(self)).int()

    alone = []
    for p, s in zip(prompts, seeds):
        gen.stream(p, nf, frames := Frames(), s)
        alone.append(frames.video())
    batch = [Frames() for _ in prompts]
    gen.stream_batch(prompts, nf, batch, seeds)
    for one, together in zip(alone, batch):
        assert one.shape == together.video().shape
        assert (one - together.video()).abs().max() <= 1  # uint8 levels
    swapped = [Frames(), Frames()]
    gen.stream_batch(prompts[:2], nf, swapped, seeds[1::-1])
    assert (swapped[0].video() - alone[0]).abs().float().mean() > 1  # another seed, another video


class _Frames(list):
    def video(self) -> np.ndarray:
        return np.concatenate(self)


@pytest.mark.parametrize("switch_cache", ["keep", "recache"])
def test_a_prompt_schedule_switches_at_its_block_through_the_stream(switch_cache):
    """A switch at t seconds takes effect at the first block starting at or after t: the video before it is the
    unswitched video, the one after it another; keep and recache differ after it (the config key reaches it)."""
    cfg = load_config(TINY, ["rollout.decode_overlap=false", f"rollout.switch_cache={switch_cache}"])
    gen = generate_module.VideoGenerator(cfg)
    fpb, nf, seed = cfg.student.frames_per_block, 8 * cfg.student.frames_per_block, int(torch.randint(0, 10**6, ()))
    block = int(torch.randint(3, 8, ()))  # after the tiny window (2 blocks) has rolled
    t = (block * fpb - float(torch.rand(())) * (fpb - 1)) / cfg.video.fps  # inside the frames before the block
    plain, switched, other = _Frames(), _Frames(), _Frames()
    gen.stream("a blue circle", nf, plain, seed)
    stats = gen.stream(PromptSchedule("a blue circle", ((t, "two red squares bouncing"),)), nf, switched, seed)
    assert stats["switch_blocks"] == [block]
    s = block * fpb  # one video frame per latent frame in the tiny codec
    assert np.array_equal(plain.video()[:s], switched.video()[:s])
    assert np.abs(plain.video()[s:].astype(int) - switched.video()[s:]).mean() > 0.1  # a random student: text moves it little
    gen.cfg = load_config(TINY, ["rollout.decode_overlap=false",
                                 f"rollout.switch_cache={'keep' if switch_cache == 'recache' else 'recache'}"])
    gen.stream(PromptSchedule("a blue circle", ((t, "two red squares bouncing"),)), nf, other, seed)
    assert np.array_equal(other.video()[:s], switched.video()[:s]) and not np.array_equal(other.video(), switched.video())


def _still_png(tmp_path, cfg) -> tuple[Path, np.ndarray]:
    from sfpp_ray.world.sprites import WorldSpec, render, sample_scenes

    scene = sample_scenes(int(torch.randint(0, 10**6, ())), 1, world=WorldSpec(height=cfg.video.height, width=cfg.video.width))[0]
    frame = render(scene, 0, 1)[0]
    imageio.imwrite(tmp_path / "start.png", frame)
    return tmp_path / "start.png", frame


def test_an_image_start_is_the_cache_its_frames_context_pass_leaves(tmp_path):
    """--image: the PNG, encoded by the codec as a one-block still, is prefilled as clean context: the video opens
    with it, and the stream is the one that follows a cache made by the student's context pass over those frames."""
    cfg = load_config(TINY, ["rollout.decode_overlap=false", "student.sink_frames=3", "student.window_frames=9"])
    gen = generate_module.VideoGenerator(cfg)
    png, frame = _still_png(tmp_path, cfg)
    start = gen.start_latents(png)
    fpb, nf = cfg.student.frames_per_block, 4 * cfg.student.frames_per_block
    still = torch.from_numpy(np.repeat(frame[None], fpb, 0)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    assert torch.equal(start, gen.codec.encode(still))
    frames, seed = _Frames(), int(torch.randint(0, 10**6, ()))
    gen.stream("a blue circle", nf, frames, seed, start=start)
    video = frames.video()
    assert video.shape[0] == fpb + nf and np.array_equal(video[:fpb], np.repeat(frame[None], fpb, 0))

    # the same stream from a cache the context pass wrote by hand
    text = gen.text.encode(["a blue circle"])
    cross, cache = gen.student.cross_attention_cache(text), gen.student.new_cache(1, *start.shape[-2:])
    with torch.no_grad():
        gen.student(start, torch.zeros(1, fpb), cross_cache=cross, kv_cache=cache)
        cache.commit()
        g = torch.Generator().manual_seed(seed)
        noise = generate_module.randn(components.latent_shape(cfg, gen.codec, nf, 1), [g], "cpu")
        steps = gen.schedule.student_timesteps(cfg.schedule)
        prefilled = gen.student.new_cache(1, *start.shape[-2:])
        generate_module.rollout(gen.student, cross, noise[:, :, :0], steps, gen.schedule, cache=prefilled, context=start)
        assert prefilled.frames_done == cache.frames_done == fpb and torch.equal(prefilled.slot_frame, cache.slot_frame)
        assert torch.equal(prefilled.k, cache.k) and torch.equal(prefilled.v, cache.v)  # the prefill is that pass
        by_hand = generate_module.rollout(gen.student, cross, noise, steps, gen.schedule, cache=cache, generator=[g]).latents
    from sfpp_ray.video_io import to_uint8

    assert np.abs(to_uint8(gen.codec.decode(by_hand)).astype(int) - video[fpb:]).max() <= 1


def test_generate_cli_switches_and_starts_from_an_image(tmp_path, capsys):
    cfg = load_config(TINY)
    png, _ = _still_png(tmp_path, cfg)
    (tmp_path / "s.jsonl").write_text('{"t": 1.0, "prompt": "a green triangle"}\n')
    out = tmp_path / "v.mp4"  # a gif would merge the start's repeated frames
    assert main(["generate", "--config", str(TINY), "--prompt", "a blue circle", "--seconds", "3", "--out", str(out),
                 "--switch", "2:two red squares bouncing", "--switch", str(tmp_path / "s.jsonl"),
                 "--image", str(png)]) == 0
    result = json.loads(capsys.readouterr().out)
    fps, fpb = cfg.video.fps, cfg.student.frames_per_block
    assert result["switch_blocks"] == [math.ceil(fps / fpb) - 1, math.ceil(2 * fps / fpb) - 1]  # after the start block
    assert read_video(out).shape[0] == result["video_frames"] == fpb + 3 * fps
    for bad in (["--switch", "soon:x"], ["--switch=-1:x"], ["--switch", "2:"], ["--image", str(tmp_path / "no.png")]):
        assert main(["generate", "--config", str(TINY), "--prompt", "a", "--seconds", "1", "--out", str(out), *bad]) == 2
        assert bad[0].split("=")[0] in capsys.readouterr().err
