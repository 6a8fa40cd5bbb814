"""/v1/realtime: the OpenAI Realtime events over a real WebSocket (the `websockets` client) to the
real server on a loopback port, with espeak-ng speech as the user's microphone audio."""

import asyncio
import base64
import json

import httpx2 as httpx
import numpy as np
import pytest
import soundfile as sf
import websockets

from csm_mlx import CSM
from csm_mlx.audio import read_audio
from csm_mlx.recognizer import Recognizer
from csm_mlx.chat.responder import Responder
from csm_mlx.chat.turns import SpeechStopped, TurnDetector
from csm_mlx.codec import FRAME_SAMPLES
from csm_mlx.server.encoders import to_pcm16
from csm_mlx.server.realtime import ChatModels

from chat_fixtures import espeak, make_language_model, make_whisper
from test_server import LiveServer

RATE = 24_000


@pytest.fixture(scope="module")
def parts(hub_cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("realtime")
    clips = {name: espeak(folder / f"{name}.wav", text) for name, text in (
        ("question", "Hello there. What is the weather like today?"),
        ("interruption", "Wait, stop, I have another question."))}
    return CSM.load(watermark=False), make_whisper(folder / "whisper"), make_language_model(folder / "llm"), clips


def chat_models(parts):
    _, whisper, llm, _ = parts

    def load(engine):
        responder = engine.call(lambda: Responder.load(str(llm), "Be brief.", max_tokens=40, seed=0))
        return ChatModels(engine.call(lambda: Recognizer.load(str(whisper))), responder, "Be brief.",
                          dict(temperature=0, max_audio_length_ms=6000))
    return load


@pytest.fixture(scope="module")
def server(parts, tmp_path_factory):
    live = LiveServer(parts[0], tmp_path_factory.mktemp("voices"), chat=chat_models(parts))
    yield live
    live.stop()


def ws_url(server) -> str:
    return server.url.replace("http://", "ws://") + "/v1/realtime?model=csm-1b"


def pcm16_events(audio: np.ndarray, block: int = 480):
    data = to_pcm16(audio).tobytes()
    return [json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(data[i:i + 2 * block]).decode()})
            for i in range(0, len(data), 2 * block)]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), np.float32)


async def events_until(ws, done, timeout: float = 180):
    """Server events until one for which done(event) is true (included)."""
    seen = []
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        seen.append(event)
        if done(event):
            return seen


def types(events):
    return [e["type"] for e in events]


def speech_of(events) -> np.ndarray:
    chunks = [base64.b64decode(e["delta"]) for e in events if e["type"] == "response.audio.delta"]
    return np.frombuffer(b"".join(chunks), "<i2")


def test_spoken_turn_gets_the_realtime_events_in_order(server, parts):
    csm, whisper, _, clips = parts
    audio = np.concatenate([silence(0.3), clips["question"], silence(1.5)])

    async def talk():
        async with websockets.connect(ws_url(server)) as ws:
            created = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "session.update", "session": {
                "voice": "alloy", "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}))
            updated = await events_until(ws, lambda e: e["type"] == "session.updated")
            for event in pcm16_events(audio):
                await ws.send(event)
            return created, updated, await events_until(ws, lambda e: e["type"] == "response.done")

    created, updated, events = asyncio.run(talk())
    assert created["type"] == "session.created" and created["session"]["turn_detection"]["type"] == "server_vad"
    assert updated[-1]["session"]["turn_detection"]["silence_duration_ms"] == 500
    kinds = types(events)
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
             "conversation.item.created", "conversation.item.input_audio_transcription.completed", "response.created",
             "response.output_item.added", "response.audio_transcript.delta", "response.audio.delta",
             "response.audio.done", "response.audio_transcript.done", "response.output_item.done", "response.done"]
    positions = [kinds.index(k) for k in order]
    assert positions == sorted(positions), kinds
    assert "error" not in kinds
    # the transcript is the recognizer's for the turn the detector cuts from the same pcm16 audio
    heard = to_pcm16(audio).astype(np.float32) / 32768
    (stopped,) = [e for e in TurnDetector().feed(heard) if isinstance(e, SpeechStopped)]
    transcription = next(e for e in events if e["type"].endswith("transcription.completed"))
    assert transcription["transcript"] == Recognizer(whisper, fp16=False).transcribe(stopped.audio) != ""
    started = events[kinds.index("input_audio_buffer.speech_started")]
    stopped_event = events[kinds.index("input_audio_buffer.speech_stopped")]
    assert started["item_id"] == stopped_event["item_id"] == transcription["item_id"]
    assert abs(stopped_event["audio_end_ms"] - stopped.end * 1000 / RATE) <= 1
    done = events[-1]["response"]
    assert done["status"] == "completed"
    text = "".join(e["delta"] for e in events if e["type"] == "response.audio_transcript.delta")
    assert done["output"][0]["content"][0]["transcript"] == text != ""
    samples = speech_of(events)
    assert len(samples) and len(samples) % FRAME_SAMPLES == 0 and np.abs(samples).max() > 0


def test_typed_turns_cancel_truncate_and_bad_events(server):
    async def talk():
        async with websockets.connect(ws_url(server)) as ws:
            await ws.recv()
            results = {}
            await ws.send("not json")
            results["bad json"] = await events_until(ws, lambda e: True)
            await ws.send(json.dumps({"type": "response.cancel"}))
            results["nothing to cancel"] = await events_until(ws, lambda e: True)
            await ws.send(json.dumps({"type": "response.create"}))
            results["nothing to answer"] = await events_until(ws, lambda e: True)
            await ws.send(json.dumps({"type": "session.update", "session": {"output_audio_format": "g711_ulaw"}}))
            results["format"] = await events_until(ws, lambda e: True)
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell me a story."}]}}))
            await ws.send(json.dumps({"type": "response.create"}))
            first = await events_until(ws, lambda e: e["type"] == "response.audio.delta")
            await ws.send(json.dumps({"type": "response.cancel"}))
            rest = await events_until(ws, lambda e: e["type"] == "response.done")
            results["cancelled"] = first + rest
            item_id = rest[-1]["response"]["output"][0]["id"]
            await ws.send(json.dumps({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                                      "audio_end_ms": 40}))
            results["truncated"] = await events_until(ws, lambda e: True)
            await ws.send(json.dumps({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                                      "audio_end_ms": 10**6}))
            results["past the end"] = await events_until(ws, lambda e: True)
            return results

    results = asyncio.run(talk())
    for case, code in (("bad json", "invalid_json"), ("nothing to cancel", "response_cancel_not_active"),
                       ("nothing to answer", "no_user_turn"), ("format", "unsupported_format"),
                       ("past the end", "invalid_value")):
        (event,) = results[case]
        assert event["type"] == "error" and event["error"]["code"] == code and event["error"]["message"], (case, event)
    kinds = types(results["cancelled"])
    assert kinds[0] == "conversation.item.created" and "response.created" in kinds
    done = results["cancelled"][-1]["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
    (truncated,) = results["truncated"]
    assert truncated["type"] == "conversation.item.truncated" and truncated["audio_end_ms"] == 40


def test_speech_over_a_response_cancels_it_and_starts_the_next_turn(server, parts):
    clips = parts[3]

    async def talk():
        async with websockets.connect(ws_url(server)) as ws:
            await ws.recv()
            for event in pcm16_events(np.concatenate([silence(0.3), clips["question"], silence(0.8)])):
                await ws.send(event)
            before = await events_until(ws, lambda e: e["type"] == "response.audio.delta")
            for event in pcm16_events(np.concatenate([clips["interruption"], silence(1.0)])):
                await ws.send(event)
            after = await events_until(ws, lambda e: e["type"] == "response.done")
            later = await events_until(ws, lambda e: e["type"] == "response.done")
            return before, after, later

    before, after, later = asyncio.run(talk())
    kinds = types(after)
    assert "input_audio_buffer.speech_started" in kinds, (types(before), kinds)
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("response.done"), (types(before), kinds)
    assert after[-1]["response"]["status"] == "cancelled"
    assert after[-1]["response"]["status_details"]["reason"] == "turn_detected"
    assert "conversation.item.input_audio_transcription.completed" in types(later)
    assert later[-1]["response"]["status"] == "completed"


def test_a_client_leaving_mid_response_leaves_the_server_serving(server):
    async def leave():
        async with websockets.connect(ws_url(server)) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello."}]}}))
            await ws.send(json.dumps({"type": "response.create"}))
            await events_until(ws, lambda e: e["type"] == "response.audio.delta")

    asyncio.run(leave())
    assert server.client().audio.speech.create(model="tts-1", voice="alloy", input="Still here.",
                                               response_format="pcm").content


def test_without_a_recognizer_and_a_language_model_one_error_then_close(parts, tmp_path):
    live = LiveServer(parts[0], tmp_path, api_key="key")

    async def connect(**kw):
        async with websockets.connect(ws_url(live), **kw) as ws:
            events = []
            with pytest.raises(websockets.ConnectionClosedError) as closed:
                while True:
                    events.append(json.loads(await ws.recv()))
            assert closed.value.rcvd.code == 1011  # the server cannot do what the client came for
            return events

    try:
        with pytest.raises(websockets.InvalidStatus):
            asyncio.run(connect())
        (event,) = asyncio.run(connect(subprotocols=["realtime", "openai-insecure-api-key.key"]))
        assert event["type"] == "error" and "--asr" in event["error"]["message"] and "--llm" in event["error"]["message"]
        (event,) = asyncio.run(connect(additional_headers={"Authorization": "Bearer key"}))
        assert event["error"]["code"] == "realtime_unavailable"
        sf.write(tmp_path / "me.wav", parts[3]["question"], RATE)
        with open(tmp_path / "me.wav", "rb") as f:
            refused = httpx.post(live.url + "/v1/audio/voices", data={"name": "me"}, headers={"Authorization": "Bearer key"},
                                 files={"audio_sample": ("me.wav", f, "audio/wav")}, timeout=60)
        assert refused.status_code == 400 and "--asr" in refused.json()["error"]["message"]
    finally:
        live.stop()


def test_a_voice_uploaded_without_a_transcript_is_transcribed(server, parts, tmp_path):
    _, whisper, _, clips = parts
    path = tmp_path / "me.wav"
    sf.write(path, clips["question"], RATE, subtype="PCM_16")
    with open(path, "rb") as f:
        made = httpx.post(server.url + "/v1/audio/voices", data={"name": "me"},
                          files={"audio_sample": ("me.wav", f, "audio/wav")}, timeout=120)
    assert made.status_code == 200, made.text
    expected = Recognizer(whisper, fp16=False).transcribe(read_audio(path))
    assert made.json()["transcript"] == expected != ""
    listed = {v["name"]: v for v in httpx.get(server.url + "/v1/audio/voices").json()["data"]}
    assert listed["me"]["transcript"] == expected
