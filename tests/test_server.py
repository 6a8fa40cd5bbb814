"""The speech server: started for real on a loopback port, spoken to with the official openai client."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import librosa
import httpx2 as httpx  # the openai client's own HTTP library
import numpy as np
import openai
import psutil
import pytest
import soundfile as sf
import uvicorn

from csm_mlx import CSM
from csm_mlx.cli.main import main as cli_main
from csm_mlx.codec import Mimi
from csm_mlx.server.app import KNOBS
from csm_mlx.server.mimi_pool import MimiPool, PoolStopped
from csm_mlx.server import build_app
from csm_mlx.server.encoders import FORMATS, to_pcm16
from csm_mlx.server.graceful import GracefulServer
from csm_mlx.server.stream import AUDIO_NICE

CLI = str(Path(sys.executable).parent / "csm-mlx")
FRAMES = 8
SHORT = FRAMES * 80
GREEDY = {"temperature": 0, "max_audio_length_ms": SHORT}


@pytest.fixture(scope="module")
def csm(hub_cache):
    """Unmarked, so that a response can equal CSM.generate's frames decoded; the watermark has its own test."""
    return CSM.load(watermark=False)


class LiveServer:
    """uvicorn on 127.0.0.1 and a free port, in a thread of this process (sharing the loaded model)."""

    def __init__(self, csm, voices_dir, max_batch=4, max_queue=1, api_key=None, transform=None, cors_origins=(),
                 chat=None):
        self.engine = csm.engine(max_batch, max_queue=max_queue, prefill_chunk=8)
        app = build_app(csm, self.engine, voices_dir, api_key=api_key, transform=transform, cors_origins=cors_origins,
                        chat=chat(self.engine) if chat else None)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = GracefulServer(uvicorn.Config(app, log_level="warning"), shutdown_timeout=1)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def client(self, api_key="unused", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join()
        self.engine.close()
        self.sock.close()


@pytest.fixture(scope="module")
def live(csm, tmp_path_factory):
    server = LiveServer(csm, tmp_path_factory.mktemp("voices"))
    yield server
    server.stop()


def speak(client, fmt="wav", voice="alloy", text="Hello from the server.", **extra) -> bytes:
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice=voice, input=text,
                                                            response_format=fmt, extra_body=extra) as response:
        assert response.status_code == 200
        return b"".join(response.iter_bytes())


def decode(data: bytes) -> np.ndarray:
    """Any container back to float samples at 24 kHz (FFmpeg through PyAV)."""
    container = av.open(io.BytesIO(data))
    resampler = av.AudioResampler(format="flt", layout="mono", rate=24_000)
    frames = [f for frame in [*container.decode(audio=0), None] for f in resampler.resample(frame)]
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames])


def pcm16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<i2")


def assert_pcm_close(got: np.ndarray, expected: np.ndarray) -> None:
    """The same samples, each within one PCM16 step: the server's Mimi instances are reused, and
    rustymimi's reset() leaves ~1e-6 behind."""
    assert got.shape == expected.shape
    assert np.abs(got.astype(np.int32) - expected.astype(np.int32)).max() <= 1


def best_correlation(a: np.ndarray, b: np.ndarray, max_shift: int = 4000) -> float:
    """Correlation of b with a at the codec delay that fits best (encoders prime with silence)."""
    n = min(len(a), len(b) - max_shift)
    shift = int(np.argmax(np.correlate(b[: n + max_shift], a[:n], "valid")))
    return float(np.corrcoef(a[:n], b[shift : shift + n])[0, 1])


def reference(csm, text="Hello from the server.", preset="conversational_a", speaker=0, **options) -> np.ndarray:
    """CSM.generate's frames for the request, through a fresh Mimi's streaming decoder."""
    codes = csm.generate(text, speaker, [csm.voice(preset, speaker)], **{**GREEDY, **options}).codes
    return Mimi(csm.mimi.path).decode_step(codes)


def test_every_format_streams_the_audio_csm_generate_gives(csm, live):
    expected = reference(csm)
    assert len(expected) == FRAMES * 1920
    client = live.client()
    wav = speak(client, "wav", **GREEDY)
    assert wav[:4] == b"RIFF" and wav[4:8] == b"\xff\xff\xff\xff"  # a streamed header: length unknown
    assert_pcm_close(pcm16(wav[44:]), to_pcm16(expected))
    assert_pcm_close(pcm16(speak(client, "pcm", **GREEDY)), to_pcm16(expected))
    flac = speak(client, "flac", **GREEDY)
    assert flac[:4] == b"fLaC"
    assert_pcm_close(np.round(decode(flac) * 32768).astype(np.int16), to_pcm16(expected))
    for fmt, magic in (("mp3", b"\xff"), ("opus", b"OggS"), ("aac", b"\xff")):
        data = speak(client, fmt, **GREEDY)
        assert data.startswith(magic) and b"Xing" not in data and b"Info" not in data[:200]
        audio = decode(data)
        assert len(expected) <= len(audio) <= len(expected) + 3000, fmt  # codec delay and padding only
        if fmt != "aac":
            assert best_correlation(expected, audio) > 0.9, fmt
    # mp3 is the default format, as LibreChat expects
    default = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello from the server.", extra_body=GREEDY)
    assert default.content[:1] == b"\xff" and len(decode(default.content)) >= len(expected)


def test_a_flac_response_opens_in_every_reader_as_the_wav_response(live):
    """libsndfile (soundfile, librosa) reads a FLAC header of unknown length as an endless file:
    the response carries its length and MD5, and every reader gets the WAV response's samples."""
    client = live.client()
    wav = pcm16(speak(client, "wav", **GREEDY)[44:])
    flac = speak(client, "flac", **GREEDY)
    streaminfo = flac[8:42]
    assert int.from_bytes(streaminfo[13:18], "big") & (2**36 - 1) == len(wav)
    assert streaminfo[18:] != bytes(16)  # the MD5 of the samples, which readers may check
    samples, rate = sf.read(io.BytesIO(flac), dtype="int16")
    assert rate == 24_000
    assert_pcm_close(samples, wav)
    loaded, rate = librosa.load(io.BytesIO(flac), sr=None)
    assert rate == 24_000
    assert_pcm_close(np.round(loaded * 32768).astype(np.int16), wav)
    assert_pcm_close(np.round(decode(flac) * 32768).astype(np.int16), wav)  # PyAV (FFmpeg)


def test_a_watermarked_model_marks_every_response_as_its_stream_does(csm, tmp_path):
    """Marked region by region, as CSM.stream marks, with the MLX work on the engine's
    thread. The reference marks the unmarked response's audio in one go with the same key."""
    marked_csm = CSM.load(watermark_key=[1, 2, 3, 4, 5])
    server = LiveServer(marked_csm, tmp_path)
    try:
        assert httpx.get(server.url + "/health").json()["watermark"] is True
        text = "A marked response that runs past one watermark block."
        options = {**GREEDY, "max_audio_length_ms": 1600}
        got = pcm16(speak(server.client(), "pcm", text=text, **options)).astype(np.int32)
    finally:
        server.stop()
    plain = reference(csm, text, max_audio_length_ms=1600)
    marker = marked_csm.watermarker.stream([1, 2, 3, 4, 5])
    expected = np.concatenate([marker.feed(plain), marker.flush()])
    assert len(got) == len(plain) == 20 * 1920
    assert np.abs(got - to_pcm16(expected)).max() <= 1  # float rounding of the resamplers
    assert np.abs(got - to_pcm16(plain)).max() > 1  # and marked it is


def test_sse_deltas_join_to_the_same_audio(live):
    client = live.client()
    raw = speak(client, "pcm", **GREEDY)
    with client.audio.speech.with_streaming_response.create(model="gpt-4o-mini-tts", voice={"id": "alloy"},
                                                            input="Hello from the server.", response_format="pcm",
                                                            stream_format="sse", extra_body=GREEDY) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2 and events[-1]["type"] == "speech.audio.done"
    assert_pcm_close(pcm16(b"".join(base64.b64decode(e["audio"]) for e in deltas)), pcm16(raw))
    usage = events[-1]["usage"]
    assert usage["output_tokens"] == FRAMES and usage["total_tokens"] == usage["input_tokens"] + FRAMES


CLIENTS = [
    dict(text="The first client speaks.", voice="alloy", temperature=0, max_audio_length_ms=720),
    dict(text="A second one, in another voice.", voice="read_speech_b", speaker=1, temperature=0.9, top_k=40,
         seed=5, max_audio_length_ms=560),
    dict(text="Third.", voice="nova", temperature=1.0, top_p=0.8, min_p=0.02, seed=9, max_audio_length_ms=640),
    dict(text="The fourth text is long enough for two chunks. Here is the second.", voice="conversational_b",
         chunk_chars=40, temperature=0, max_audio_length_ms=480),
]


def test_concurrent_clients_get_their_solo_audio_and_the_fifth_waits_or_is_refused(live):
    client = live.client()

    def request(spec, chunks):
        spec = dict(spec)
        with client.audio.speech.with_streaming_response.create(
                model="tts-1", voice=spec.pop("voice"), input=spec.pop("text"), response_format="pcm",
                extra_body=spec) as response:
            for chunk in response.iter_bytes():
                chunks.append(chunk)

    alone = []
    for spec in CLIENTS:
        alone.append([])
        request(spec, alone[-1])
    together = [[] for _ in CLIENTS]
    threads = [threading.Thread(target=request, args=(spec, out)) for spec, out in zip(CLIENTS, together)]
    for t in threads:
        t.start()
    while live.engine.active < 4:
        time.sleep(0.002)
    waiting = []
    fifth = threading.Thread(target=request, args=(CLIENTS[0], waiting))  # --max-queue 1: it waits
    fifth.start()
    while live.engine.waiting < 1:
        time.sleep(0.002)
    with pytest.raises(openai.RateLimitError) as refused:  # and a sixth finds the queue full
        speak(client, "pcm", **GREEDY)
    assert refused.value.response.headers["retry-after"] == "1"
    assert refused.value.body["code"] == "queue_full"
    for t in threads + [fifth]:
        t.join()
    for solo, batched in zip(alone, together):
        assert len(b"".join(solo)) > 0
        assert_pcm_close(pcm16(b"".join(batched)), pcm16(b"".join(solo)))
    assert_pcm_close(pcm16(b"".join(waiting)), pcm16(b"".join(alone[0])))
    assert live.engine.active == 0


def goes_idle(engine, seconds: float = 5) -> bool:
    deadline = time.time() + seconds
    while engine.active and time.time() < deadline:
        time.sleep(0.01)
    return engine.active == 0


def test_a_client_that_disconnects_is_dropped_from_the_batch(live):
    client = live.client()
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input="Talk for a long while.", response_format="pcm",
            extra_body={"max_audio_length_ms": 60_000, "temperature": 0}) as response:
        next(response.iter_bytes())
        assert live.engine.active == 1
    assert goes_idle(live.engine)
    assert httpx.get(live.url + "/health").json()["active"] == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice is Linux's")
def test_audio_threads_run_below_the_engine_on_a_cpu(live):
    """On Linux with the engine on the CPU, a response's audio thread runs AUDIO_NICE steps
    below the engine's (the engine's step is what every stream waits on); the engine keeps its own."""
    assert live.engine.on_cpu
    client = live.client()
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input="Talk for a while.", response_format="pcm",
            extra_body={"max_audio_length_ms": 60_000, "temperature": 0}) as response:
        next(response.iter_bytes())
        threads = {t.name: t.native_id for t in threading.enumerate()}
        # an earlier test's audio thread may still be ending: every one alive must be lowered
        audio = [tid for name, tid in threads.items() if name.startswith("csm-audio-")]
        assert audio
        base = os.getpriority(os.PRIO_PROCESS, 0)
        assert {os.getpriority(os.PRIO_PROCESS, tid) for tid in audio} == {min(19, base + AUDIO_NICE)}
        assert os.getpriority(os.PRIO_PROCESS, threads["csm-engine"]) == base
    assert goes_idle(live.engine)


def test_voice_upload_list_speak_restart_delete(csm, tmp_path):
    clip = reference(csm, "A clip to clone.", max_audio_length_ms=960)
    wav = io.BytesIO()
    sf.write(wav, clip, 24_000, format="WAV", subtype="PCM_16")
    server = LiveServer(csm, tmp_path)
    try:
        response = httpx.post(server.url + "/v1/audio/voices", data={"name": "mine", "transcript": "A clip to clone."},
                              files={"audio_sample": ("clip.wav", wav.getvalue(), "audio/wav")})
        assert response.status_code == 200, response.text
        voice = response.json()
        assert voice["object"] == "audio.voice" and voice["name"] == "mine" and voice["id"].startswith("voice_")
        listed = httpx.get(server.url + "/v1/audio/voices").json()
        assert voice["id"] in [v["id"] for v in listed["voices"]] and listed["voices"] == listed["data"]
        assert {"conversational_a", "read_speech_d", "alloy"} <= {v["id"] for v in listed["voices"]}
        first = speak(server.client(), "pcm", voice=voice["id"], **GREEDY)
        by_name = speak(server.client(), "pcm", voice="mine", **GREEDY)
        assert_pcm_close(pcm16(by_name), pcm16(first))
        other = pcm16(speak(server.client(), "pcm", voice="alloy", **GREEDY)).astype(np.int32)
        assert np.abs(other - pcm16(first)).max() > 1
    finally:
        server.stop()
    assert [p.suffix for p in tmp_path.iterdir()] == [".json"]  # Mimi codes and text, no audio
    server = LiveServer(csm, tmp_path)
    try:
        assert voice["id"] in [v["id"] for v in httpx.get(server.url + "/v1/audio/voices").json()["data"]]
        assert_pcm_close(pcm16(speak(server.client(), "pcm", voice={"id": voice["id"]}, **GREEDY)), pcm16(first))
        assert httpx.delete(server.url + f"/v1/audio/voices/{voice['id']}").json()["deleted"] is True
        assert httpx.delete(server.url + f"/v1/audio/voices/{voice['id']}").status_code == 404
        with pytest.raises(openai.BadRequestError, match="is not a voice"):
            speak(server.client(), "pcm", voice=voice["id"], **GREEDY)
    finally:
        server.stop()
    assert not list(tmp_path.iterdir())


def _post(url, body=None, **kw):
    return httpx.post(url + "/v1/audio/speech", **({"json": body} if body is not None else {}), **kw)


def test_bad_requests_get_openai_errors(live, tmp_path):
    ok = {"model": "tts-1", "input": "Hi.", "voice": "alloy"}
    url = live.url
    wav = io.BytesIO()
    sf.write(wav, np.zeros(4800, np.float32), 24_000, format="WAV")
    nan_wav = io.BytesIO()
    sf.write(nan_wav, np.full(4800, np.nan, np.float32), 24_000, format="WAV", subtype="FLOAT")
    cases = [
        (_post(url, {**ok, "input": ""}), 400, "input", "empty"),
        (_post(url, {**ok, "input": "   "}), 400, "input", "empty"),
        (_post(url, {**ok, "input": "a" * 4097}), 400, "input", "at most 4096"),
        (_post(url, {k: v for k, v in ok.items() if k != "input"}), 400, "input", "non-empty string"),
        (_post(url, {k: v for k, v in ok.items() if k != "model"}), 400, "model", "non-empty string"),
        (_post(url, {**ok, "voice": "nobody"}), 400, "voice", "is not a voice"),
        (_post(url, {**ok, "voice": {"name": "x"}}), 400, "voice", "voice name"),
        (_post(url, {**ok, "response_format": "ogg"}), 400, "response_format", "must be one of"),
        (_post(url, {**ok, "stream_format": "chunks"}), 400, "stream_format", "must be one of"),
        (_post(url, {**ok, "speed": 5}), 400, "speed", "at most 4"),
        (_post(url, {**ok, "speed": 0.1}), 400, "speed", "at least 0.25"),
        (_post(url, {**ok, "temperature": -1}), 400, "temperature", "at least 0"),
        (_post(url, {**ok, "top_p": 1.5}), 400, "top_p", "at most 1"),
        (_post(url, {**ok, "top_k": "many"}), 400, "top_k", "whole number"),
        (_post(url, {**ok, "seed": -3}), 400, "seed", "at least 0"),
        (_post(url, {**ok, "max_audio_length_ms": 10}), 400, "max_audio_length_ms", "at least 80"),
        (_post(url, {**ok, "speaker": 1.5}), 400, "speaker", "whole number"),
        (_post(url, {**ok, "instructions": "x" * 5000}), 400, "instructions", "at most 4096"),
        (_post(url, {**ok, "max_audio_length_ms": 160_000}), 400, "input", "window"),
        (_post(url, {**ok, "context": "earlier"}), 400, "context", "list of turns"),
        (_post(url, {**ok, "context": [{"text": "x", "audio": "%%%"}]}), 400, "context[0]", "base64"),
        (_post(url, {**ok, "context": [{"text": "x", "audio": base64.b64encode(b"not audio").decode()}]}), 400,
         "context[0]", "cannot read"),
        (_post(url, {**ok, "context": [{"text": "x", "audio": base64.b64encode(nan_wav.getvalue()).decode()}]}), 400,
         "context[0]", "NaN"),
        (_post(url, {**ok, "context": [{"speaker": -1, "text": "x"}]}), 400, "context[0].speaker", "at least 0"),
        (_post(url, content=b"{not json", headers={"content-type": "application/json"}), 400, None, "must be JSON"),
        (_post(url, ["a list"]), 400, None, "JSON object"),
        (_post(url, content=b"[" * 100_000), 400, None, "nested too deeply"),
        (_post(url, content=b'{"a": ' * 50_000 + b"1" + b"}" * 50_000), 400, None, "nested too deeply"),
        (_post(url, content=json.dumps(ok)[:-1].encode() + b', "speed": NaN}'), 400, None, "must be JSON"),
        (_post(url, content=b"\xff\xfe\x00\xd8garbage"), 400, None, "must be JSON"),
        (_post(url, content=b""), 400, None, "must be JSON"),
        (_post(url, {**ok, "response_format": 5}), 400, "response_format", "must be one of"),
        (_post(url, {**ok, "response_format": ["mp3"]}), 400, "response_format", "must be one of"),
        (_post(url, {**ok, "speed": "fast"}), 400, "speed", "number"),
        (_post(url, content=json.dumps(ok)[:-1].encode() + b', "speed": 1e999}'), 400, "speed", "finite number"),
        (_post(url, content=b"x" * (17 * 2**20)), 413, None, "larger than 16 MiB"),
        (httpx.get(url + "/v1/audio/speech"), 405, None, "method not allowed"),
        (httpx.get(url + "/v1/nothing"), 404, None, "no such route"),
        (httpx.post(url + "/v1/audio/voices", data={"name": "x", "transcript": "y"}), 400, "audio_sample", "uploaded"),
        (httpx.post(url + "/v1/audio/voices", data={"name": "x"}, files={"audio_sample": ("a.wav", wav.getvalue())}),
         400, "transcript", "the text the clip says"),
        (httpx.post(url + "/v1/audio/voices", data={"name": "x", "transcript": "y"},
                    files={"audio_sample": ("a.wav", b"RIFF garbage")}), 400, "audio_sample", "cannot read"),
        (httpx.post(url + "/v1/audio/voices", data={"name": "x", "transcript": "y"},
                    files={"audio_sample": ("a.wav", b"")}), 400, "audio_sample", "is empty"),
        (httpx.post(url + "/v1/audio/voices", content=b"--b\r\ngarbage\r\n\r\n--",
                    headers={"content-type": "multipart/form-data; boundary=b"}), 400, None, "multipart form"),
        (httpx.post(url + "/v1/audio/voices", content=b"\x00" * 100,
                    headers={"content-type": "multipart/form-data"}), 400, None, "multipart form"),
        (httpx.post(url + "/v1/audio/voices", content=b"name=x", headers={"content-type": "text/plain"}), 400,
         None, "multipart form"),
        (httpx.post(url + "/v1/audio/voices", data={"name": "x", "transcript": "y"},
                    files={"audio_sample": ("a.wav", b"\0" * (10 * 2**20 + 10))}), 413, "audio_sample", "larger than"),
        (httpx.delete(url + "/v1/audio/voices/../../etc"), 404, None, "no such route"),
        (httpx.delete(url + "/v1/audio/voices/alloy"), 400, "voice", "presets cannot be deleted"),
        (httpx.delete(url + "/v1/audio/voices/voice_" + "0" * 32), 404, "voice", "does not exist"),
    ]
    for n, (response, status, param, fragment) in enumerate(cases):
        error = response.json()["error"]
        assert (response.status_code, error["param"]) == (status, param), (n, response.text)
        assert fragment in error["message"] and "Traceback" not in response.text, (n, error)
        assert " object at 0x" not in error["message"], (n, error)
        assert set(error) == {"message", "type", "param", "code"}
    assert live.engine.active == 0 and not list(Path(tmp_path).iterdir())


def test_null_is_the_default_for_every_optional_field(live):
    """Clients that send null for "default" get what an absent field gives."""
    nulls = {name: None for name in ("response_format", "stream_format", "speed", "instructions", "context", *KNOBS)}
    body = {"model": "tts-1", "input": "Hello from the server.", "voice": "alloy"}
    response = _post(live.url, {**body, **nulls, **GREEDY})
    assert response.status_code == 200 and response.headers["content-type"] == "audio/mpeg"
    assert len(decode(response.content)) >= FRAMES * 1920
    response = _post(live.url, {**body, **nulls, **GREEDY, "response_format": "pcm"})
    assert response.status_code == 200
    assert_pcm_close(pcm16(response.content), pcm16(speak(live.client(), "pcm", **GREEDY)))


def test_codebooks_field_streams_the_lower_quality_level(csm, live):
    """"codebooks": 8 streams what CSM.generate gives with codebooks=8; 0 or more than the model's
    32 is a 400 naming the field."""
    expected = reference(csm, codebooks=8)
    assert len(expected) == FRAMES * 1920
    assert_pcm_close(pcm16(speak(live.client(), "pcm", codebooks=8, **GREEDY)), to_pcm16(expected))
    assert np.abs(to_pcm16(expected) - to_pcm16(reference(csm))).max() > 100  # not the full frames
    for bad in (0, 33, "8"):
        response = _post(live.url, {"model": "tts-1", "input": "Hi", "voice": "alloy", "codebooks": bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == "codebooks", bad


def test_speed_is_a_time_stretch(live):
    normal = pcm16(speak(live.client(), "pcm", **GREEDY))
    fast = pcm16(speak(live.client(), "pcm", speed=2.0, **GREEDY))
    slow = pcm16(speak(live.client(), "pcm", speed=0.5, **GREEDY))
    # atempo keeps the length to within its analysis window (~40 ms at the end)
    assert abs(len(fast) - len(normal) / 2) < 1920 and abs(len(slow) - len(normal) * 2) < 1920
    assert np.abs(fast).max() > 100  # audio, not silence


class FailAfter:
    """A block transform (where a watermark goes) that breaks after a few blocks."""

    def __init__(self, blocks):
        self.blocks = blocks

    def feed(self, audio):
        self.blocks -= 1
        if self.blocks < 0:
            raise RuntimeError("transform broke")
        return audio

    def flush(self):
        return np.zeros(0, np.float32)


def test_an_error_after_streaming_started_breaks_the_stream_visibly(csm, tmp_path):
    server = LiveServer(csm, tmp_path, transform=lambda: FailAfter(2))
    try:
        client = server.client()
        received = []
        with pytest.raises(httpx.RemoteProtocolError):  # no clean end of the chunked body
            with client.audio.speech.with_streaming_response.create(
                    model="tts-1", voice="alloy", input="Break me.", response_format="pcm", extra_body=GREEDY) as r:
                assert r.status_code == 200
                for chunk in r.iter_bytes():
                    received.append(chunk)
        assert 0 < len(b"".join(received)) < FRAMES * 1920 * 2
        with client.audio.speech.with_streaming_response.create(
                model="tts-1", voice="alloy", input="Break me.", response_format="pcm", stream_format="sse",
                extra_body=GREEDY) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1]["type"] == "error" and "transform broke" in events[-1]["error"]["message"]
        assert goes_idle(server.engine)  # the failed stream's row is freed within a frame or two
    finally:
        server.stop()


def test_api_key_and_listings(csm, tmp_path):
    server = LiveServer(csm, tmp_path, api_key="sesame")
    try:
        with pytest.raises(openai.AuthenticationError, match="no API key given|API key is wrong"):
            speak(server.client(api_key="wrong"), "pcm", **GREEDY)
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
        for scheme, status in (("bearer", 200), ("BEARER", 200), ("Basic", 401), ("", 401)):
            headers = {"Authorization": f"{scheme} sesame".strip()}
            assert httpx.get(server.url + "/v1/models", headers=headers).status_code == status, scheme
        # the API's documentation is open: it holds no secrets
        assert "swagger" in httpx.get(server.url + "/docs").text.lower()
        schema = httpx.get(server.url + "/openapi.json").json()
        body = schema["paths"]["/v1/audio/speech"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["required"] == ["model", "input", "voice"] and "flac" in body["properties"]["response_format"]["enum"]
        for path in ("/v1/audio/voices", "/v1/audio/verify"):
            assert "multipart/form-data" in schema["paths"][path]["post"]["requestBody"]["content"], path
        client = server.client(api_key="sesame")
        assert {"csm-1b", "tts-1"} <= {m.id for m in client.models.list()}
        models = httpx.get(server.url + "/v1/audio/models", headers={"Authorization": "Bearer sesame"}).json()
        assert {"id": "tts-1"} in models["models"]
        assert len(speak(client, "pcm", **GREEDY)) == FRAMES * 1920 * 2
    finally:
        server.stop()


def test_cors_lets_a_page_on_another_origin_call_with_its_key(csm, tmp_path, live):
    origin = "http://localhost:3000"
    server = LiveServer(csm, tmp_path, api_key="sesame", cors_origins=(origin,))
    url = server.url + "/v1/audio/speech"
    body = {"model": "tts-1", "input": "Hi.", "voice": "alloy", "response_format": "pcm", **GREEDY}
    try:
        preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
        answer = httpx.options(url, headers=preflight)  # a preflight carries no key
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin
        assert "POST" in answer.headers["access-control-allow-methods"]
        assert "authorization" in answer.headers["access-control-allow-headers"].lower()
        refused = httpx.post(url, json=body, headers={"Origin": origin})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == origin
        spoken = httpx.post(url, json=body, headers={"Origin": origin, "Authorization": "Bearer sesame"})
        assert spoken.status_code == 200 and len(spoken.content) == FRAMES * 1920 * 2
        assert spoken.headers["access-control-allow-origin"] == origin
        assert "x-sample-rate" in spoken.headers["access-control-expose-headers"].lower()
        stranger = httpx.options(url, headers={**preflight, "Origin": "http://elsewhere.example"})
        assert stranger.status_code == 400 and "access-control-allow-origin" not in stranger.headers
    finally:
        server.stop()
    # off by default: no page elsewhere may call
    answer = httpx.options(live.url + "/v1/audio/speech", headers=preflight)
    assert answer.status_code == 405 and "access-control-allow-origin" not in answer.headers


def test_serve_command(hub_cache, tmp_path, capsys, monkeypatch):
    """The real command: a taken port or a missing extra is one line; then it serves with a key until Ctrl-C."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert cli_main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot listen" in err
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "uvicorn", None)
        assert cli_main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'csm-mlx[server]'" in err
    server = ServeProcess(tmp_path, "--api-key", "k", "--max-batch", "2")
    try:
        assert server.health["max_batch"] == 2
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
        assert len(speak(client, "wav", **GREEDY)) == 44 + FRAMES * 1920 * 2
    finally:
        code, stderr = server.stop(signal.SIGINT)
    assert code == 0, stderr  # Ctrl-C is how a server stops
    assert "Traceback" not in stderr and stderr.strip().endswith("csm-mlx: stopped"), stderr


class ServeProcess:
    """`csm-mlx serve` as a user runs it, in a process of its own, ready to answer."""

    def __init__(self, voices_dir, *args):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([CLI, "serve", "--port", str(port), "--voices-dir", str(voices_dir), *args],
                                        stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while True:
            try:
                self.health = httpx.get(self.url + "/health").json()
                return
            except httpx.TransportError:
                if self.process.poll() is not None or time.time() > deadline:
                    self.process.kill()
                    raise AssertionError(f"the server did not start: {self.process.stderr.read()}") from None
                time.sleep(0.2)

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def stop(self, *signals, timeout: float = 30):
        """Send the signals (0.2 s apart); its exit code and stderr."""
        for n, sig in enumerate(signals):
            if n:
                time.sleep(0.2)
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        return code, self.process.stderr.read()


def stream_in_background(url: str, seconds: int = 60):
    """A long greedy PCM stream on a thread: (thread, its chunks, what ended it)."""
    chunks, ended = [], []

    def run():
        body = {"model": "tts-1", "input": "Talk for a long while.", "voice": "alloy", "response_format": "pcm",
                "temperature": 0, "max_audio_length_ms": seconds * 1000}
        try:
            with httpx.stream("POST", url + "/v1/audio/speech", json=body, timeout=60) as response:
                for chunk in response.iter_bytes():
                    chunks.append(chunk)
            ended.append("complete")
        except httpx.HTTPError as e:
            ended.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 30
    while not chunks and thread.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    assert chunks, ended
    return thread, chunks, ended


# What a flood may add to the resident memory of a server that has served one request: the
# other batch size's buffers, threads, queued frames and encoders; less
# than one more Mimi instance per row (~450 MB each).
FLOOD_RSS_MARGIN = 2**30


def flood(server, requests: int = 50) -> list:
    """Requests at once, in every format, a quarter of them hanging up after their first bytes:
    each one's outcome (bytes received, "hung up" or "refused")."""
    outcomes = []

    def request(n):
        body = {"model": "tts-1", "input": f"Request {n}.", "voice": "alloy", "temperature": 0,
                "response_format": FORMATS[n % len(FORMATS)], "max_audio_length_ms": SHORT}
        with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, timeout=120) as response:
            if response.status_code == 429:
                outcomes.append("refused")
            elif n % 4 == 3:
                next(response.iter_bytes())
                outcomes.append("hung up")
            else:
                outcomes.append(len(response.read()) if response.status_code == 200 else response.status_code)

    threads = [threading.Thread(target=request, args=(n,)) for n in range(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return outcomes


def test_a_flood_keeps_mimi_instances_and_memory_within_the_bound(hub_cache, tmp_path):
    """A flood of 50 requests on --max-batch 2 --max-queue 8: some are served (some of those hang
    up mid-stream) and the rest refused, and one more connection drops while sending its body.
    The server never holds more than max-batch Mimi instances, its RSS stays within
    FLOOD_RSS_MARGIN of a served request's, and its log has no traceback. Without the watermark:
    marking is a test of its own, and on this CPU it would be most of the flood's time."""
    server = ServeProcess(tmp_path, "--max-batch", "2", "--max-queue", "8", "--no-watermark")
    try:
        assert server.health["mimi"] == {"loaded": 2, "lent": 0, "peak": 2, "limit": 2}
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        speak(client, "opus", **GREEDY)
        baseline = server.rss()
        peaks, done = [baseline], threading.Event()

        def watch():
            while not done.is_set():
                peaks.append(server.rss())
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as dropped:
            dropped.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 1000\r\n\r\n{\"model\": ")
        outcomes = flood(server)
        served = [o for o in outcomes if isinstance(o, int)]
        assert len(outcomes) == 50 and all(size > 1000 for size in served), outcomes
        assert outcomes.count("refused") >= 1 and len(served) + outcomes.count("hung up") >= 10
        deadline = time.time() + 10  # every response's audio thread done: its Mimi instance back
        while httpx.get(server.url + "/health").json()["mimi"]["lent"] and time.time() < deadline:
            time.sleep(0.1)
        done.set()
        watcher.join()
        health = httpx.get(server.url + "/health").json()
        assert health["mimi"]["peak"] <= 2 and health["mimi"]["loaded"] <= 2 and health["mimi"]["lent"] == 0
        print(f"RSS: {baseline >> 20} MiB after one request, {max(peaks) >> 20} MiB peak in the flood")
        assert max(peaks) - baseline < FLOOD_RSS_MARGIN, (baseline, max(peaks))
    finally:
        code, stderr = server.stop(signal.SIGINT)
    assert code == 0 and "Traceback" not in stderr and "ERROR" not in stderr, stderr


def test_sigterm_lets_streams_run_until_the_timeout_then_cuts_them_and_exits_0(hub_cache, tmp_path):
    server = ServeProcess(tmp_path, "--shutdown-timeout", "1")
    try:
        thread, chunks, ended = stream_in_background(server.url)
        start = time.time()
        code, stderr = server.stop(signal.SIGTERM)
        took = time.time() - start
    finally:
        server.process.kill()
    thread.join(10)
    print(f"SIGTERM to exit with --shutdown-timeout 1: {took:.2f} s")
    assert code == 0 and 1 <= took < 1 + 2, (code, took, stderr)
    assert isinstance(ended[0], httpx.RemoteProtocolError)  # a cut chunked body, not a clean short file
    assert len(b"".join(chunks)) < 60 * 24_000 * 2
    assert "Traceback" not in stderr and stderr.strip().endswith("csm-mlx: stopped"), stderr


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_at_once(hub_cache, tmp_path, second):
    server = ServeProcess(tmp_path, "--shutdown-timeout", "60")
    try:
        thread, chunks, ended = stream_in_background(server.url)
        start = time.time()
        code, stderr = server.stop(signal.SIGTERM, second)
        took = time.time() - start
    finally:
        server.process.kill()
    thread.join(10)
    assert code == 0 and took < 0.2 + 2.5, (code, took, stderr)
    assert isinstance(ended[0], httpx.RemoteProtocolError)
    assert "Traceback" not in stderr and stderr.strip().endswith("csm-mlx: stopped"), stderr


def test_the_mimi_pool_is_bounded_reuses_instances_and_loads_through_run(csm):
    """Never more than size instances: past it a taker waits (or stops when its request is
    cancelled). Instances go back reset and come out again; a load (to grow, or to replace a worn
    one) goes through run, as the server runs it on the engine's thread between frames."""
    loads, third = [], []

    def run(fn):
        loads.append(fn)
        return fn()

    def take_a_third():
        with pool.take() as mimi:
            third.append(mimi)

    pool = MimiPool(csm.mimi.path, size=2, preload=1, run=run)
    codes = np.random.default_rng(0).integers(0, 2048, (32, 3))
    with pool.take() as first, pool.take() as second:
        assert first is not second and len(loads) == 1  # the second was loaded to grow the pool
        first.decode_step(codes)
        fresh = second.decode_step(codes)
        with pytest.raises(PoolStopped):
            with pool.take(stopped=lambda: True):
                pass
        waiter = threading.Thread(target=take_a_third)
        waiter.start()
        time.sleep(0.5)
        assert not third and (pool.loaded, pool.lent) == (2, 2)
    waiter.join(5)
    assert third[0] in (first, second) and (pool.loaded, pool.peak_loaded, len(loads)) == (2, 2, 1)
    with pool.take() as again:
        assert again is first and len(loads) == 1  # used, reset, not reloaded
        assert np.abs(again.decode_step(codes) - fresh).max() < 1e-5
        again.reload_after = 1  # worn: its reset loads a fresh instance, through run
    assert len(loads) == 2


def test_renaming_a_voice_keeps_its_clip_and_refuses_bad_names(csm, tmp_path):
    wav = io.BytesIO()
    sf.write(wav, 0.3 * np.sin(np.arange(24_000) * 2 * np.pi * 220 / 24_000), 24_000, format="WAV", subtype="PCM_16")
    server = LiveServer(csm, tmp_path)
    try:
        voice = httpx.post(server.url + "/v1/audio/voices", data={"name": "before", "transcript": "A tone."},
                           files={"audio_sample": ("clip.wav", wav.getvalue(), "audio/wav")}).json()
        path = tmp_path / f"{voice['id']}.json"
        codes = json.loads(path.read_text())["codes"]
        url = server.url + f"/v1/audio/voices/{voice['id']}"
        renamed = httpx.patch(url, json={"name": "  after  "})
        assert renamed.status_code == 200, renamed.text
        assert renamed.json() == {**renamed.json(), "id": voice["id"], "name": "after", "transcript": "A tone.",
                                  "created_at": voice["created_at"]}
        listed = {v["id"]: v["name"] for v in httpx.get(server.url + "/v1/audio/voices").json()["voices"]}
        assert listed[voice["id"]] == "after"
        stored = json.loads(path.read_text())
        assert stored["name"] == "after" and stored["codes"] == codes
        assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind
        cases = [
            (httpx.patch(url, json={"name": ""}), 400, "name", "non-empty"),
            (httpx.patch(url, json={"name": "   "}), 400, "name", "non-empty"),
            (httpx.patch(url, json={}), 400, "name", "non-empty"),
            (httpx.patch(url, json={"name": 5}), 400, "name", "non-empty"),
            (httpx.patch(url, json={"name": "x" * 129}), 400, "name", "at most 128"),
            (httpx.patch(url, content=b"name=x"), 400, None, 'must be JSON: {"name": ...}'),
            (httpx.patch(url, json=["x"]), 400, None, "JSON object"),
            (httpx.patch(server.url + "/v1/audio/voices/alloy", json={"name": "x"}), 400, "voice",
             "presets cannot be renamed"),
            (httpx.patch(server.url + "/v1/audio/voices/conversational_a", json={"name": "x"}), 400, "voice",
             "presets cannot be renamed"),
            (httpx.patch(server.url + "/v1/audio/voices/voice_" + "0" * 32, json={"name": "x"}), 404, "voice",
             "does not exist"),
            (httpx.patch(server.url + "/v1/audio/voices/nobody", json={"name": "x"}), 404, "voice", "not a user voice"),
        ]
        for n, (response, status, param, fragment) in enumerate(cases):
            error = response.json()["error"]
            assert (response.status_code, error["param"]) == (status, param), (n, response.text)
            assert fragment in error["message"], (n, error)
        assert json.loads(path.read_text())["name"] == "after"
        assert "patch" in httpx.get(server.url + "/openapi.json").json()["paths"]["/v1/audio/voices/{voice_id}"]
    finally:
        server.stop()
