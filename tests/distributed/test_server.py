"""`sfpp-ray serve`'s deployment on the shared cluster, driven by a real HTTP client: a stream plays block by block,
its prompt switches while it plays, it is the student's own stream, bad requests get clear errors, and the page plays
it in a headless browser."""

import shutil
import subprocess

import cv2
import numpy as np
import pytest
import requests
import torch

from sfpp_ray.config import load_config
from sfpp_ray.distributed.server import free_port
from sfpp_ray.generate import VideoGenerator
from sfpp_ray.live_stream import LiveStream


def jpeg_parts(response):
    """The frames of a multipart/x-mixed-replace JPEG response, as they arrive: uint8 (H, W, 3) RGB."""
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while (head := buffer.find(b"\r\n\r\n")) >= 0 and b"Content-Length:" in buffer[:head]:
            length = int(buffer[:head].split(b"Content-Length: ")[1].split(b"\r\n")[0])
            if len(buffer) < head + 4 + length:
                break
            jpeg = np.frombuffer(buffer[head + 4:head + 4 + length], np.uint8)
            yield cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[..., ::-1]
            buffer = buffer[head + 4 + length + 2:]


def jpeg_round_trip(frame: np.ndarray, quality: int) -> np.ndarray:
    ok, jpeg = cv2.imencode(".jpg", frame[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[..., ::-1]


@pytest.fixture
def served(ray_cluster, tmp_path):
    from ray import serve

    from sfpp_ray.distributed import server

    seed = int(np.random.SeedSequence().entropy % 2**31)
    torch.manual_seed(seed)
    keys = [f"serve.port={free_port()}", "serve.realtime=false", "serve.max_streams=2", "serve.cpus_per_replica=0.25",
            "serve.max_seconds=30"]
    checkpoint = tmp_path / "student"  # a student and text encoder the test can stream itself, for comparison
    gen = VideoGenerator(load_config("configs/tiny.yaml", keys))
    gen.student.save_pretrained(checkpoint)
    gen.text.save_pretrained(checkpoint)
    cfg = load_config("configs/tiny.yaml", [*keys, "text.kind=umt5", f"text.path={checkpoint}"])
    url = server.start(cfg, str(checkpoint))
    try:
        yield url, cfg, str(checkpoint)
    finally:
        serve.shutdown()


def test_a_served_stream_plays_switches_and_is_the_students_stream(served):
    url, cfg, checkpoint = served
    assert "<img" in requests.get(url, timeout=60).text  # the page that plays a stream

    first = requests.post(url + "streams", json={"prompt": "a red circle bouncing", "seconds": 4, "seed": 3}, timeout=60)
    assert first.status_code == 200, first.text
    sid, blocks = first.json()["id"], first.json()["blocks"]
    assert blocks == 11  # 4 s at 8 fps: 32 frames, in whole 3-frame blocks
    frames, switched = [], None
    with requests.get(url + f"streams/{sid}/video", stream=True, timeout=120) as video:
        assert video.headers["content-type"].startswith("multipart/x-mixed-replace")
        for frame in jpeg_parts(video):
            frames.append(frame)
            if len(frames) == 3:  # the first block has arrived: switch while the stream plays
                switched = requests.post(url + f"streams/{sid}/switch", json={"prompt": "a blue square"}, timeout=60)
                stats = requests.get(url + f"streams/{sid}", timeout=60).json()
    assert switched.status_code == 200 and switched.json()["from_block"] >= 1
    assert stats["prompt"] == "a blue square" and stats["blocks"] >= 1 and stats["first_frame_s"] > 0
    assert len(frames) == 3 * blocks and frames[0].shape == (16, 16, 3)
    assert requests.get(url + f"streams/{sid}", timeout=60).status_code == 404  # finished: its cache is gone

    # the blocks before the switch are the student's own stream of that prompt and seed, through the same JPEG coding
    alone = LiveStream(VideoGenerator(cfg, checkpoint), "a red circle bouncing", 3)
    own = [jpeg_round_trip(f, cfg.serve.jpeg_quality) for _ in range(switched.json()["from_block"])
           for f in alone.next_block()]
    assert all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(frames, own))
    assert not np.array_equal(frames[0], frames[1])


def test_bad_requests_get_errors_that_name_the_field(served):
    url, cfg, _ = served
    empty = requests.post(url + "streams", json={"prompt": "  ", "seconds": 2}, timeout=60)
    assert empty.status_code == 422 and "prompt" in empty.text
    long = requests.post(url + "streams", json={"prompt": "a red circle", "seconds": 31}, timeout=60)
    assert long.status_code == 422 and "serve.max_seconds" in long.text
    missing = requests.get(url + "streams/nosuchstream/video", timeout=60)
    assert missing.status_code == 404
    ids = [requests.post(url + "streams", json={"prompt": "a red circle", "seconds": 1}, timeout=60) for _ in range(3)]
    assert [r.status_code for r in ids] == [200, 200, 429] and "serve.max_streams" in ids[2].text
    bad_switch = requests.post(url + f"streams/{ids[0].json()['id']}/switch", json={"prompt": ""}, timeout=60)
    assert bad_switch.status_code == 422


def test_a_student_under_cuda_graphs_is_served_one_stream_at_a_time():
    from sfpp_ray.config import ConfigError
    from sfpp_ray.distributed import server

    with pytest.raises(ConfigError) as e:
        server.check(load_config("configs/tiny.yaml", ["student.compile=reduce-overhead", "serve.max_streams=2"]))
    assert e.value.key == "serve.max_streams"
    server.check(load_config("configs/tiny.yaml", ["student.compile=reduce-overhead", "serve.max_streams=1"]))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium here (.ci/run installs Debian's)")
def test_the_page_plays_a_stream_in_a_headless_browser(served, tmp_path):
    url, cfg, _ = served
    shot = tmp_path / "page.png"
    done = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=640,720",
                           "--virtual-time-budget=8000", f"--screenshot={shot}",
                           url + "?prompt=a%20red%20circle%20bouncing&seconds=5"],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-2000:]
    page = cv2.imread(str(shot))[..., ::-1]
    white = (page > 245).all(axis=2)
    rows = np.flatnonzero(~white[:, 300])  # the page's controls at the top, then the 512-pixel-wide video
    video = page[100:700, 8:520][~white[100:700, 8:520]]
    assert len(video) > 0.5 * 512 * 512, f"no video on the page ({len(video)} non-white pixels; rows {rows[:5]}...)"
    assert len(np.unique(video.reshape(-1, 3) // 16, axis=0)) > 50  # a frame of the student's, not a flat box
