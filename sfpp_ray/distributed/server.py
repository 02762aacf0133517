"""`sfpp-ray serve`: the student streamed over HTTP by a Ray Serve deployment.

Each replica holds one student and serves up to serve.max_streams streams, which take turns on it a block at a
time (each with its own KV cache: sfpp_ray.live_stream). A stream is a multipart JPEG response (what a browser's
<img> plays as it arrives); its prompt can be switched while it plays.

    POST /streams                {"prompt": ..., "seconds": 60, "seed": 0}  -> {"id": ...}
    GET  /streams/<id>/video     multipart/x-mixed-replace JPEG frames, block by block
    POST /streams/<id>/switch    {"prompt": ...}: the next block follows it
    GET  /streams/<id>           blocks made, time to first frame, per-block latency
    GET  /                       a page that starts a stream, plays it and switches its prompt
"""

import asyncio
import math
import socket
import threading
import time
import uuid

import cv2
from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel
from ray import serve

from sfpp_ray.config import Config, ConfigError
from sfpp_ray.generate import VideoGenerator
from sfpp_ray.live_stream import LiveStream, StreamTimer

BOUNDARY = "frame"
app = FastAPI(title="sfpp-ray")


# Ray Serve rebuilds the class in its replicas, where only names defined before it resolve: the page comes first
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sfpp-ray stream</title></head>
<body style="font-family: sans-serif">
<form id="start"><input id="prompt" size="80" placeholder="prompt"> <input id="seconds" size="4" value="30"> s
<button>stream</button></form>
<form id="switch"><input id="next" size="80" placeholder="switch to"> <button>switch</button></form>
<p><img id="video" width="512" style="image-rendering: pixelated" alt=""></p>
<p id="status"></p>
<script>
let id = null;
const $ = (x) => document.getElementById(x);
async function post(url, body) {
  const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const j = await r.json();
  if (!r.ok) throw new Error(JSON.stringify(j.detail));
  return j;
}
$("start").onsubmit = async (e) => {
  e.preventDefault();
  try {
    const s = await post("streams", {prompt: $("prompt").value, seconds: Number($("seconds").value)});
    id = s.id; $("video").src = "streams/" + id + "/video"; $("status").textContent = "stream " + id;
  } catch (err) { $("status").textContent = err.message; }
};
const given = new URLSearchParams(location.search);  // /?prompt=...&seconds=...: start at once
if (given.get("prompt")) {
  $("prompt").value = given.get("prompt");
  if (given.get("seconds")) $("seconds").value = given.get("seconds");
  $("start").requestSubmit();
}
$("switch").onsubmit = async (e) => {
  e.preventDefault();
  if (!id) return;
  try { const s = await post("streams/" + id + "/switch", {prompt: $("next").value});
        $("status").textContent = "switched at block " + s.from_block; }
  catch (err) { $("status").textContent = err.message; }
};
</script></body></html>
"""


class StreamRequest(BaseModel):
    prompt: str
    seconds: float = 10.0
    seed: int = 0


class SwitchRequest(BaseModel):
    prompt: str


class Stream:
    def __init__(self, live: LiveStream, blocks: int):
        self.live, self.blocks, self.timer, self.playing = live, blocks, None, False


@serve.deployment(name="student")
@serve.ingress(app)
class StudentServer:
    def __init__(self, cfg: Config, checkpoint: str | None):
        self.gen = VideoGenerator(cfg, checkpoint)
        self.cfg = self.gen.cfg  # the checkpoint's layout
        self.streams: dict[str, Stream] = {}
        self.turn = threading.Lock()  # one block at a time on the student

    @app.post("/streams")
    async def create(self, req: StreamRequest) -> dict:
        sv, fpb = self.cfg.serve, self.cfg.student.frames_per_block
        if not req.prompt.strip():
            raise HTTPException(422, "prompt: is empty")
        if not (math.isfinite(req.seconds) and 0 < req.seconds <= sv.max_seconds):
            raise HTTPException(422, f"seconds: must lie in (0, {sv.max_seconds:g}] (serve.max_seconds), "
                                     f"got {req.seconds:g}")
        if len(self.streams) >= sv.max_streams:
            raise HTTPException(429, f"this replica serves {sv.max_streams} streams at once (serve.max_streams)")
        frames = self.gen.codec.latent_frames(max(1, round(req.seconds * self.cfg.video.fps)))
        sid = uuid.uuid4().hex[:12]
        self.streams[sid] = Stream(LiveStream(self.gen, req.prompt, req.seed), -(-frames // fpb))
        return {"id": sid, "blocks": self.streams[sid].blocks, "fps": self.cfg.video.fps}

    def _stream(self, sid: str) -> Stream:
        if sid not in self.streams:
            raise HTTPException(404, f"no stream {sid!r} (finished, or never started)")
        return self.streams[sid]

    @app.post("/streams/{sid}/switch")
    async def switch(self, sid: str, req: SwitchRequest) -> dict:
        stream = self._stream(sid)
        if not req.prompt.strip():
            raise HTTPException(422, "prompt: is empty")
        return {"id": sid, "prompt": req.prompt,
                "from_block": await asyncio.to_thread(self._switch, stream, req.prompt)}

    def _switch(self, stream: Stream, prompt: str) -> int:
        with self.turn:  # between blocks, not inside one
            stream.live.switch(prompt)
            return stream.live.blocks

    @app.get("/streams/{sid}")
    async def stats(self, sid: str) -> dict:
        stream = self._stream(sid)
        timing = stream.timer.summary() if stream.timer else {"blocks": 0}
        return {"id": sid, "prompt": stream.live.prompt, "blocks_total": stream.blocks, **timing}

    @app.get("/streams/{sid}/video")
    async def video(self, sid: str) -> StreamingResponse:
        stream = self._stream(sid)
        if stream.playing:
            raise HTTPException(409, f"stream {sid!r} is already playing")
        stream.playing, stream.timer = True, StreamTimer()
        return StreamingResponse(self._parts(sid, stream), media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}")

    def _block(self, stream: Stream):
        with self.turn:
            return stream.live.next_block()

    async def _parts(self, sid: str, stream: Stream):
        sv, fps = self.cfg.serve, self.cfg.video.fps
        quality = [cv2.IMWRITE_JPEG_QUALITY, sv.jpeg_quality]
        sent = 0
        try:
            for _ in range(stream.blocks):
                frames = await asyncio.to_thread(self._block, stream)
                stream.timer.block_done()
                sent += len(frames)
                for frame in frames:
                    ok, jpeg = cv2.imencode(".jpg", frame[..., ::-1], quality)
                    if not ok:
                        raise RuntimeError("JPEG encoding failed")
                    yield (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                           .encode() + jpeg.tobytes() + b"\r\n")
                if sv.realtime:  # no faster than the video plays: the next block is made while this one shows
                    ahead = sent / fps - (time.perf_counter() - stream.timer.start)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            yield f"--{BOUNDARY}--\r\n".encode()
        finally:  # finished, failed or the client left: the stream's cache goes
            self.streams.pop(sid, None)

    @app.get("/")
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE)


def deployment(cfg: Config, checkpoint: str | None):
    """The application serve.run starts: serve.num_replicas replicas of the student server."""
    sv = cfg.serve
    return StudentServer.options(
        num_replicas=sv.num_replicas,
        max_ongoing_requests=4 * sv.max_streams + 8,  # streams, their switches and status queries
        ray_actor_options={"num_cpus": sv.cpus_per_replica, "num_gpus": sv.gpus_per_replica},
    ).bind(cfg, checkpoint)


def check(cfg: Config) -> None:
    """What serving adds to the config's own checks."""
    if cfg.student.compile == "reduce-overhead" and cfg.serve.max_streams > 1:
        raise ConfigError("serve.max_streams", "student.compile reduce-overhead keeps one cache per shape (CUDA "
                                               "graphs): one stream at a time; set serve.max_streams=1 or another "
                                               "student.compile")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now: for a server started beside others (tests, benchmarks)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(cfg: Config, checkpoint: str | None) -> str:
    """Start (or update) the deployment on the Ray cluster and return the URL it answers at."""
    check(cfg)
    sv = cfg.serve
    serve.start(http_options={"host": sv.host, "port": sv.port})
    serve.run(deployment(cfg, checkpoint), name="sfpp-ray", route_prefix="/")
    return f"http://{sv.host}:{sv.port}/"
