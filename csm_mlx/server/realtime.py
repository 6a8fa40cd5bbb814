"""/v1/realtime: voice chat over a WebSocket, in the OpenAI Realtime API's events (the subset in
docs/realtime.md), so that Realtime clients can talk to CSM.

Audio both ways is pcm16: 16-bit little-endian mono at 24 kHz, base64 in the events. Turn
detection runs on the server (server_vad, on by default, with the Realtime API's defaults); with
turn_detection null the client commits the buffer and asks for responses itself. Each connection
holds a VoiceChat: its own CSM conversation and language-model messages over the server's shared
models. Its MLX work runs on the engine's thread, one step at a time (a transcription, a language
model token or a CSM frame, per engine.call), between the frames of the speech requests.
"""

import asyncio
import base64
import binascii
import itertools
import json
import logging
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..recognizer import Recognizer
from ..chat.responder import Responder
from ..chat.turn_encoder import TurnEncoder
from ..chat.turns import SpeechStarted, SpeechStopped, TurnDetector, TurnSettings
from ..chat.voice_chat import VoiceChat
from ..codec import SAMPLE_RATE
from .encoders import to_pcm16
from .mimi_pool import PoolStopped
from .voices import VoiceError

log = logging.getLogger("csm_mlx")
SERVER_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
              "create_response": True, "interrupt_response": True}
MAX_BUFFER_SECONDS = 120  # a committed turn longer than this cannot be CSM context anyway
NEEDS_MODELS = ("/v1/realtime needs a speech recognizer and a language model: start the server with --asr and --llm "
                "(e.g. csm-mlx serve --asr mlx-community/whisper-large-v3-turbo "
                "--llm mlx-community/Llama-3.2-1B-Instruct-4bit)")
_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}_{next(_ids):012d}"


@dataclass
class ChatModels:
    """What every session shares: the recognizer and the language model (a Responder to copy)."""

    recognizer: Recognizer  # also transcribes voice clips uploaded without a transcript
    responder: Optional[Responder]  # each session's is a copy, with its instructions; None: no /v1/realtime
    system: str
    speech: dict = field(default_factory=dict)  # CSM's options for every sentence (temperature, ...)

    def responder_for(self, instructions: str) -> Responder:
        return self.responder.copy(instructions)


class EventError(Exception):
    """A client event that cannot be done: sent back as an `error` event, the session stays open."""

    def __init__(self, message: str, code: str = "invalid_value", param: Optional[str] = None):
        super().__init__(message)
        self.code, self.param = code, param


@dataclass
class Response:
    id: str
    item_id: str
    task: Optional[asyncio.Task] = None
    cancelled: Optional[str] = None  # why it was cancelled: "client_cancelled", "turn_detected"
    reply: Any = None
    sent: int = 0  # samples sent
    transcript: str = ""


class RealtimeSession:
    def __init__(self, ws: WebSocket, server, models: ChatModels):
        self.ws, self.server, self.models = ws, server, models
        self.session = {"id": new_id("sess"), "object": "realtime.session", "model": server.model_name,
                        "modalities": ["audio", "text"], "instructions": models.system, "voice": "alloy",
                        "input_audio_format": "pcm16", "output_audio_format": "pcm16",
                        "input_audio_transcription": {"model": "csm-mlx"}, "turn_detection": dict(SERVER_VAD)}
        self.detector: Optional[TurnDetector] = TurnDetector(TurnSettings())
        self.buffer: list = []  # appended audio, when the client commits turns itself
        self.chat: Optional[VoiceChat] = None
        self.response: Optional[Response] = None
        self.last_response: Optional[Response] = None
        self.pending: Optional[str] = None  # the user's last turn, not yet answered
        self.last_item: Optional[str] = None
        self.turn_item: Optional[str] = None  # the user item being spoken
        self.turns = asyncio.Lock()  # user turns are handled one at a time, in order
        self.tasks: set = set()  # transcriptions running: asyncio holds only weak references to tasks
        self.closed = False
        self.encoder: Optional[TurnEncoder] = None  # Mimi for the user's turns, off the engine's thread

    # plumbing
    async def send(self, kind: str, **fields) -> None:
        if self.closed:
            return
        try:
            await self.ws.send_text(json.dumps({"type": kind, "event_id": new_id("event"), **fields}))
        except (WebSocketDisconnect, RuntimeError):  # the client left; the receive loop sees it too
            self.closed = True

    async def error(self, message: str, code: str = "invalid_value", param: Optional[str] = None,
                    event_id: Optional[str] = None) -> None:
        await self.send("error", error={"type": "invalid_request_error", "code": code, "message": message,
                                        "param": param, "event_id": event_id})

    async def mlx(self, fn: Callable[[], Any]) -> Any:
        """fn() on the engine's thread (MLX's), awaited here."""
        return await asyncio.get_running_loop().run_in_executor(None, self.server.engine.call, fn)

    # the connection
    async def run(self) -> None:
        await self.send("session.created", session=self.session)
        try:
            while not self.closed:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                await self.handle(message.get("text"))
        except WebSocketDisconnect:
            pass
        finally:
            self.closed = True
            if self.response is not None:
                log.info("realtime: the client left during a response; it was cancelled")
                await self.cancel("client_left")
            if self.encoder is not None:
                await asyncio.get_running_loop().run_in_executor(None, self.encoder.close)

    async def handle(self, text: Optional[str]) -> None:
        event_id = None
        try:
            if text is None:
                raise EventError("send events as JSON text messages, not binary ones", "invalid_event")
            try:
                event = json.loads(text)
            except ValueError:
                raise EventError("the message is not a JSON event", "invalid_json") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise EventError("an event is a JSON object with a string field type", "invalid_event", "type")
            event_id = event.get("event_id")
            handler = HANDLERS.get(event["type"])
            if handler is None:
                raise EventError(f"unknown event type {event['type']!r}: this server handles "
                                 f"{', '.join(sorted(HANDLERS))}", "invalid_event", "type")
            await handler(self, event)
        except EventError as e:
            await self.error(str(e), e.code, e.param, event_id)
        except VoiceError as e:
            await self.error(str(e), "invalid_value", "session.voice", event_id)

    # client events
    async def session_update(self, event: dict) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise EventError("session.update needs a session object", param="session")
        audio = session.get("audio") if isinstance(session.get("audio"), dict) else {}  # the GA layout
        inputs = audio.get("input") if isinstance(audio.get("input"), dict) else {}
        outputs = audio.get("output") if isinstance(audio.get("output"), dict) else {}
        for name, value in (("input_audio_format", session.get("input_audio_format", inputs.get("format"))),
                            ("output_audio_format", session.get("output_audio_format", outputs.get("format")))):
            if value is not None and value != "pcm16" and value != {"type": "audio/pcm", "rate": SAMPLE_RATE}:
                raise EventError(f"{name} must be pcm16 (24 kHz mono 16-bit): the only audio format here",
                                 "unsupported_format", f"session.{name}")
        voice = session.get("voice", outputs.get("voice"))
        if voice is not None:
            if self.chat is not None and voice != self.session["voice"]:
                raise EventError("the voice can only change before the conversation starts", param="session.voice")
            if not isinstance(voice, str):
                raise EventError("session.voice must be a voice name or id", param="session.voice")
            self.server.voices.resolve(voice)
            self.session["voice"] = voice
        instructions = session.get("instructions")
        if instructions is not None:
            if not isinstance(instructions, str):
                raise EventError("session.instructions must be a string", param="session.instructions")
            self.session["instructions"] = instructions
            if self.chat is not None:
                self.chat.responder.messages[0] = {"role": "system", "content": instructions}
        if "turn_detection" in session or "turn_detection" in inputs:
            self.set_turn_detection(session.get("turn_detection", inputs.get("turn_detection")))
        await self.send("session.updated", session=self.session)

    def set_turn_detection(self, value) -> None:
        if value is None:
            self.detector, self.session["turn_detection"] = None, None
            return
        if not isinstance(value, dict) or value.get("type", "server_vad") != "server_vad":
            raise EventError("turn_detection must be null or {type: server_vad, ...}: semantic_vad is not "
                             "available here", param="session.turn_detection")
        merged = {**SERVER_VAD, **{k: v for k, v in value.items() if v is not None}}
        try:
            settings = TurnSettings(silence_ms=merged["silence_duration_ms"], prefix_ms=merged["prefix_padding_ms"])
        except ValueError as e:
            raise EventError(f"turn_detection: {e}", param="session.turn_detection") from None
        self.detector, self.session["turn_detection"] = TurnDetector(settings), merged

    async def append(self, event: dict) -> None:
        try:
            data = base64.b64decode(event.get("audio") or "", validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise EventError("audio must be base64 pcm16 (24 kHz mono 16-bit little-endian)", param="audio") from None
        if len(data) % 2:
            raise EventError("pcm16 audio has an even number of bytes", param="audio")
        audio = np.frombuffer(data, "<i2").astype(np.float32) / 32768
        if self.detector is None:
            if sum(map(len, self.buffer)) + len(audio) > MAX_BUFFER_SECONDS * SAMPLE_RATE:
                raise EventError(f"the input audio buffer holds at most {MAX_BUFFER_SECONDS} s: commit it",
                                 "buffer_too_large", "audio")
            self.buffer.append(audio)
            return
        for turn in self.detector.feed(audio):
            await self.on_turn_event(turn)

    async def on_turn_event(self, turn) -> None:
        if isinstance(turn, SpeechStarted):
            self.turn_item = new_id("item")
            await self.send("input_audio_buffer.speech_started", audio_start_ms=round(turn.start * 1000 / SAMPLE_RATE),
                            item_id=self.turn_item)
            if self.response is not None and self.session["turn_detection"]["interrupt_response"]:
                await self.cancel("turn_detected")
        elif isinstance(turn, SpeechStopped):
            await self.send("input_audio_buffer.speech_stopped", audio_end_ms=round(turn.end * 1000 / SAMPLE_RATE),
                            item_id=self.turn_item)
            await self.commit_turn(self.turn_item, turn.audio, self.session["turn_detection"]["create_response"])

    async def commit(self, event: dict) -> None:
        if self.detector is not None:
            stopped = self.detector.end_turn()
            if stopped is None:
                raise EventError("the input audio buffer holds no speech to commit", "input_audio_buffer_commit_empty")
            await self.on_turn_event(stopped)
            return
        if not self.buffer:
            raise EventError("the input audio buffer is empty: append audio first", "input_audio_buffer_commit_empty")
        audio, self.buffer = np.concatenate(self.buffer), []
        await self.commit_turn(new_id("item"), audio, create_response=False)

    async def clear(self, event: dict) -> None:
        self.buffer = []
        if self.detector is not None:
            self.detector.reset()
        await self.send("input_audio_buffer.cleared")

    async def commit_turn(self, item_id: str, audio: np.ndarray, create_response: bool) -> None:
        if self.encoder is None:  # a Mimi instance of its own: loaded once, and not on the engine's thread
            mimi = self.server.csm.mimi
            self.encoder = await asyncio.get_running_loop().run_in_executor(
                None, lambda: TurnEncoder(mimi.path, mimi.num_codebooks))
        codes = self.encoder.encode(audio)  # while the engine's thread transcribes the turn
        await self.send("input_audio_buffer.committed", item_id=item_id, previous_item_id=self.last_item)
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": None}]}
        await self.send("conversation.item.created", previous_item_id=self.last_item, item=item)
        self.last_item = item_id
        task = asyncio.create_task(self.transcribe(item_id, audio, codes, create_response))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def transcribe(self, item_id: str, audio: np.ndarray, codes: Future, create_response: bool) -> None:
        async with self.turns:
            chat = await self.ensure_chat()
            text = await self.mlx(lambda: chat.hear(audio, codes))
            await self.send("conversation.item.input_audio_transcription.completed", item_id=item_id,
                            content_index=0, transcript=text)
            if text:
                self.pending = text
                if create_response and self.response is None:
                    await self.start_response()

    async def create_item(self, event: dict) -> None:
        item = event.get("item")
        content = item.get("content") if isinstance(item, dict) else None
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "input_text"] \
            if isinstance(content, list) else []
        if not isinstance(item, dict) or item.get("role") != "user" or not texts or not all(
                isinstance(t, str) and t.strip() for t in texts):
            raise EventError("conversation.item.create takes a user message with input_text content here: "
                             "{type: message, role: user, content: [{type: input_text, text: ...}]}", param="item")
        text = " ".join(t.strip() for t in texts)
        item_id = item.get("id") if isinstance(item.get("id"), str) else new_id("item")
        async with self.turns:
            chat = await self.ensure_chat()
            await self.mlx(lambda: chat.read(text))
            self.pending = text
        await self.send("conversation.item.created", previous_item_id=self.last_item,
                        item={"id": item_id, "object": "realtime.item", "type": "message", "role": "user",
                              "status": "completed", "content": [{"type": "input_text", "text": text}]})
        self.last_item = item_id

    async def create_response(self, event: dict) -> None:
        if self.response is not None:
            raise EventError("a response is in progress: wait for response.done or send response.cancel",
                             "conversation_already_has_active_response")
        async with self.turns:  # a transcription still running may bring the text to answer
            pass
        if self.pending is None:
            raise EventError("there is no user turn to respond to: send audio or a conversation.item.create first",
                             "no_user_turn")
        await self.start_response()

    async def cancel_response(self, event: dict) -> None:
        if self.response is None:
            raise EventError("there is no response in progress to cancel", "response_cancel_not_active")
        await self.cancel("client_cancelled")

    async def truncate(self, event: dict) -> None:
        last = self.last_response
        if last is None or event.get("item_id") != last.item_id or self.response is not None:
            raise EventError("only the last assistant item can be truncated, once its response is done",
                             "item_truncate_invalid_item_id", "item_id")
        end_ms = event.get("audio_end_ms")
        if isinstance(end_ms, bool) or not isinstance(end_ms, int) or not 0 <= end_ms:
            raise EventError("audio_end_ms must be a whole number of milliseconds >= 0", param="audio_end_ms")
        heard = end_ms * SAMPLE_RATE // 1000
        if heard > last.sent:
            raise EventError(f"audio_end_ms {end_ms} is past the item's audio ({last.sent * 1000 // SAMPLE_RATE} ms)",
                             "invalid_value", "audio_end_ms")
        last.transcript = await self.mlx(lambda: last.reply.cut(heard))
        last.sent = heard
        await self.send("conversation.item.truncated", item_id=last.item_id, content_index=0, audio_end_ms=end_ms)

    # responses
    async def ensure_chat(self) -> VoiceChat:
        if self.chat is None:
            voice = self.server.voices.resolve(self.session["voice"])

            def build():
                segment = self.server.voices.segment(voice, 0, self.server.csm.tokenizer)
                responder = self.models.responder_for(self.session["instructions"])
                return VoiceChat(self.server.csm, self.models.recognizer, responder, segment, **self.models.speech)
            self.chat = await self.mlx(build)
        return self.chat

    async def start_response(self) -> None:
        text, self.pending = self.pending, None
        response = Response(new_id("resp"), new_id("item"))
        self.response = response
        response.task = asyncio.create_task(self.respond(response, text))

    async def cancel(self, reason: str) -> None:
        response = self.response
        if response is None:
            return
        response.cancelled = reason
        await asyncio.shield(response.task)

    async def respond(self, response: Response, text: str) -> None:
        chat = await self.ensure_chat()
        ids = dict(response_id=response.id, item_id=response.item_id, output_index=0, content_index=0)
        item = {"id": response.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}
        await self.send("response.created", response={"id": response.id, "object": "realtime.response",
                                                      "status": "in_progress", "output": []})
        await self.send("response.output_item.added", response_id=response.id, output_index=0, item=item)
        await self.send("conversation.item.created", previous_item_id=self.last_item, item=item)
        self.last_item = response.item_id
        loop = asyncio.get_running_loop()
        lease = self.server.pool.take(stopped=lambda: response.cancelled is not None)
        status = "completed"
        try:
            mimi = await loop.run_in_executor(None, lease.__enter__)
            try:
                response.reply = reply = await self.mlx(lambda: chat.reply(text, mimi))
                chunks = iter(reply)
                said = 0
                while response.cancelled is None and not self.closed:
                    chunk = await self.mlx(lambda: next(chunks, None))
                    if chunk is None:
                        break
                    for sentence in reply.sentences[said:]:
                        await self.send("response.audio_transcript.delta", **ids, delta=(" " if said else "") + sentence)
                        said += 1
                    await self.send("response.audio.delta", **ids,
                                    delta=base64.b64encode(to_pcm16(chunk).tobytes()).decode())
                    response.sent += len(chunk)
                if response.cancelled is not None or self.closed:
                    status = "cancelled"  # cut to what was sent; the client may truncate to what it played
                    response.transcript = await self.mlx(lambda: reply.cut(response.sent))
                else:
                    response.transcript = " ".join(reply.sentences)
            finally:
                await loop.run_in_executor(None, lease.__exit__, None, None, None)
        except PoolStopped:  # cancelled while waiting for a Mimi instance
            status = "cancelled"
        except Exception as e:  # noqa: BLE001 - the client hears why; the session goes on
            if not self.closed:
                log.exception("realtime response failed")
            status = "failed"
            await self.error(f"the response failed: {e}", "response_failed")
        finally:
            self.response = None
            self.last_response = response
        item = {**item, "status": "completed" if status == "completed" else "incomplete",
                "content": [{"type": "audio", "transcript": response.transcript}]}
        await self.send("response.audio.done", **ids)
        await self.send("response.audio_transcript.done", **ids, transcript=response.transcript)
        await self.send("response.output_item.done", response_id=response.id, output_index=0, item=item)
        done = {"id": response.id, "object": "realtime.response", "status": status, "output": [item]}
        if status == "cancelled":
            done["status_details"] = {"type": "cancelled", "reason": response.cancelled or "client_left"}
        await self.send("response.done", response=done)


HANDLERS = {
    "session.update": RealtimeSession.session_update,
    "input_audio_buffer.append": RealtimeSession.append,
    "input_audio_buffer.commit": RealtimeSession.commit,
    "input_audio_buffer.clear": RealtimeSession.clear,
    "conversation.item.create": RealtimeSession.create_item,
    "conversation.item.truncate": RealtimeSession.truncate,
    "response.create": RealtimeSession.create_response,
    "response.cancel": RealtimeSession.cancel_response,
}


async def realtime(ws: WebSocket, server, models: Optional[ChatModels]) -> None:
    """One /v1/realtime connection, from accept to close."""
    await ws.accept(subprotocol="realtime" if "realtime" in ws.scope.get("subprotocols", []) else None)
    if models is None or models.responder is None:
        await ws.send_text(json.dumps({"type": "error", "event_id": new_id("event"), "error": {
            "type": "invalid_request_error", "code": "realtime_unavailable", "message": NEEDS_MODELS, "param": None}}))
        await ws.close(code=1011)
        return
    await RealtimeSession(ws, server, models).run()
