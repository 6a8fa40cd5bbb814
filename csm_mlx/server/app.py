"""The OpenAI-compatible speech API over the engine (FastAPI): routes, request checks, OpenAI error
bodies, the API key and body limits.

    POST /v1/audio/speech          speech, streamed as it is generated (audio bytes or SSE)
    GET  /v1/audio/voices          presets, OpenAI names, user voices ("voices" and "data")
    POST /v1/audio/voices          a user voice from a clip and its transcript (multipart)
    PATCH  /v1/audio/voices/{id}   rename one of the user's voices (JSON {"name": ...})
    DELETE /v1/audio/voices/{id}
    GET  /v1/audio/voices/{id}/audio   what the voice prompt sounds like (WAV from its Mimi codes)
    POST /v1/audio/verify          does an uploaded file carry this server's watermark (multipart "file")
    GET  /v1/models, /v1/audio/models, /health
    GET  /                         the web page (ui.py), unless build_app(ui=False)
"""

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from fastapi import FastAPI, Request as HttpRequest, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from ..api import CSM
from ..audio import AudioError, audio_info, decode_audio, read_audio
from ..codec import SAMPLE_RATE, CodecError
from ..context import ContextError
from ..engine import Engine, EngineError, EngineFull
from ..prompt import TokenizedSegment
from ..options import OptionError, RULES, check_options, check_text
from ..watermark import SAMPLE_RATE as WATERMARK_RATE, WatermarkError, check_verify_rate
from .encoders import FORMATS, MEDIA_TYPES, WavEncoder
from .stream import AudioTransform, run_audio
from .mimi_pool import MimiPool
from .realtime import ChatModels, realtime
from .ui import UI_PREFIX, add_ui
from .voices import VoiceError, VoiceStore

log = logging.getLogger("csm_mlx.server")

MAX_INPUT_CHARS = 4096  # the OpenAI API's limits
MAX_INSTRUCTIONS_CHARS = 4096
MAX_CLIP_BYTES = 10 * 2**20
MAX_VOICE_NAME_CHARS = 128
MAX_BODY_BYTES = 16 * 2**20  # a speech request with a few context turns of audio
# A verify runs on the engine's thread and the running streams wait for it: 5 minutes of audio
# is a few seconds of that on a Mac; `csm-mlx verify` takes files of any length.
MAX_VERIFY_SECONDS = 300
MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# the CSM knobs a speech request may set, with the library's defaults
KNOBS: Dict[str, Any] = {"speaker": 0, "temperature": 0.9, "top_k": 50, "top_p": 0.0, "min_p": 0.0, "seed": None,
                         "max_audio_length_ms": None, "stop_after_repeats": None, "chunk_chars": 250, "codebooks": None}

# open even with an API key: they hold no secrets, and the page asks for the key itself
PUBLIC_PATHS = ("/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/")


def _json_body(schema: dict, content_type: str = "application/json") -> dict:
    return {"requestBody": {"required": True, "content": {content_type: {"schema": schema}}}}


# The request bodies for /openapi.json: the routes read their bodies themselves, so that every
# malformed one is an OpenAI error rather than FastAPI's own.
SPEECH_SCHEMA = _json_body({
    "type": "object",
    "required": ["model", "input", "voice"],
    "properties": {
        "model": {"type": "string", "description": "any name: csm-1b, tts-1, ..."},
        "input": {"type": "string", "maxLength": MAX_INPUT_CHARS},
        "voice": {"description": "a preset, an OpenAI voice name or a user voice's id",
                  "anyOf": [{"type": "string"}, {"type": "object", "properties": {"id": {"type": "string"}}}]},
        "response_format": {"type": "string", "enum": list(FORMATS), "default": "mp3"},
        "stream_format": {"type": "string", "enum": ["audio", "sse"], "default": "audio"},
        "speed": {"type": "number", "minimum": 0.25, "maximum": 4.0, "default": 1.0},
        "instructions": {"type": "string", "description": "accepted and ignored: CSM takes its style from context"},
        "context": {"type": "array", "description": "earlier turns: {speaker, text, audio (base64 file) or voice}",
                    "items": {"type": "object"}},
        **{name: {"description": f"CSM's {name} (default: {default})"} for name, default in KNOBS.items()},
    },
})
VOICE_SCHEMA = _json_body({
    "type": "object",
    "required": ["name", "audio_sample"],
    "properties": {"name": {"type": "string", "maxLength": MAX_VOICE_NAME_CHARS},
                   "transcript": {"type": "string", "description": "what the clip says (may be left out on a server "
                                                                  "started with --asr: the clip is transcribed)"},
                   "audio_sample": {"type": "string", "format": "binary", "description": "WAV, FLAC, OGG or MP3"}},
}, "multipart/form-data")
VERIFY_SCHEMA = _json_body({"type": "object", "required": ["file"],
                            "properties": {"file": {"type": "string", "format": "binary",
                                                    "description": "WAV, FLAC, OGG or MP3, 8 kHz or more"}}},
                           "multipart/form-data")
RENAME_SCHEMA = _json_body({"type": "object", "required": ["name"],
                            "properties": {"name": {"type": "string", "maxLength": MAX_VOICE_NAME_CHARS}}})


class ApiError(Exception):
    """An OpenAI error body with its status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(self.status, "invalid_request_error")
        if self.status >= 500:
            kind = "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, self.status, headers=self.headers)


class StreamAborted(Exception):
    """Generation failed after the response had started: the connection is closed without the
    chunked body's end, so the client sees a broken transfer, never a clean short file."""


def api_error(e: Exception) -> ApiError:
    """The library's errors as OpenAI errors."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, OptionError):
        return ApiError(400, str(e), e.param, "invalid_value")
    if isinstance(e, VoiceError):
        return ApiError(e.status, str(e), e.param, "voice_not_found" if e.status == 404 else "invalid_value")
    if isinstance(e, ContextError):
        return ApiError(400, f"the request does not fit the model's window: {e}", "input", "context_length_exceeded")
    if isinstance(e, EngineFull):
        return ApiError(429, str(e), None, "queue_full", {"Retry-After": "1"})
    if isinstance(e, (AudioError, CodecError)):
        return ApiError(400, str(e), "context", "invalid_audio")
    return ApiError(500, f"generation failed: {e}", None, "server_error")


async def read_form(http: HttpRequest, expected: str):
    """The multipart form of a request; anything else, or a malformed one, is a 400 naming expected."""
    content_type = http.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ApiError(400, f"expected a multipart form with {expected} (got content-type {content_type or 'none'!r})")
    try:
        return await http.form(max_files=1, max_fields=8)
    except ApiError:
        raise
    except ClientDisconnect:
        return None
    except Exception as e:  # starlette's and multipart's own errors: a malformed body
        if isinstance(e, HTTPException) and e.status_code != 400:
            raise
        reason = e.detail if isinstance(e, HTTPException) else e
        raise ApiError(400, f"expected a multipart form with {expected} ({reason})") from None


@dataclass
class SpeechRequest:
    """A checked speech request."""

    text: str
    voice: str
    fmt: str
    sse: bool
    speed: float
    options: Dict[str, Any]
    context: List[dict] = field(default_factory=list)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes, expected: str = "{model, input, voice, ...}") -> Any:
    """The body as JSON; anything that is not strict JSON (NaN, nesting deeper than Python's
    recursion allows, bytes in no Unicode encoding) is a 400."""
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "the body's JSON is nested too deeply", None, "invalid_json") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, f"the body must be JSON: {expected}", None, "invalid_json") from None


def _field(body: dict, name: str, default: Any = None) -> Any:
    """A field of the request; null means the default, as an absent field does."""
    value = body.get(name)
    return default if value is None else value


def _string(body: dict, name: str, limit: Optional[int] = None, required: bool = True) -> Optional[str]:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise ApiError(400, f"{name} must be a non-empty string", name, "invalid_value")
    if limit is not None and len(value) > limit:
        raise ApiError(400, f"{name} is {len(value)} characters long: at most {limit} are allowed", name,
                       "string_above_max_length")
    return value


def _choice(body: dict, name: str, choices, default: str) -> str:
    value = _field(body, name, default)
    if not isinstance(value, str) or value not in choices:
        raise ApiError(400, f"{name} must be one of {', '.join(choices)}, got {value!r}", name, "invalid_value")
    return value


def voice_name(name: Any) -> str:
    """A voice's name as given at creation or rename, stripped."""
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_VOICE_NAME_CHARS:
        raise ApiError(400, f"name must be a non-empty text field of at most {MAX_VOICE_NAME_CHARS} characters", "name")
    return name.strip()


def parse_speech(body: Any) -> SpeechRequest:
    """Every field of the OpenAI speech request, and CSM's knobs as extra fields; unknown fields
    are ignored, as clients add their own; null is the field's default."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", None, "invalid_json")
    _string(body, "model")
    text = _string(body, "input", MAX_INPUT_CHARS)
    check_text(text, "input")
    voice = body.get("voice")
    if isinstance(voice, dict):
        voice = voice.get("id")
    if not isinstance(voice, str) or not voice.strip():
        raise ApiError(400, 'voice must be a voice name or {"id": ...}: see GET /v1/audio/voices', "voice",
                       "invalid_value")
    fmt = _choice(body, "response_format", FORMATS, "mp3")
    sse = _choice(body, "stream_format", ("audio", "sse"), "audio") == "sse"
    _string(body, "instructions", MAX_INSTRUCTIONS_CHARS, required=False)
    knobs = {k: _field(body, k, default) for k, default in KNOBS.items()}
    options = check_options(speed=_field(body, "speed", 1.0), **knobs)
    speed = options.pop("speed")
    context = body.get("context") or []
    if not isinstance(context, list) or not all(isinstance(turn, dict) for turn in context):
        raise ApiError(400, "context must be a list of turns {speaker, text, audio (base64) or voice}", "context",
                       "invalid_value")
    return SpeechRequest(text, voice, fmt, sse, speed, options, context)


class Server:
    """What the routes share: the model, the engine, the voices and the Mimi pool."""

    def __init__(self, csm: CSM, engine: Engine, voices: VoiceStore, pool: MimiPool, model_name: str,
                 transform: Optional[Callable[[], AudioTransform]] = None, chat: Optional[ChatModels] = None):
        self.csm, self.engine, self.voices, self.pool = csm, engine, voices, pool
        self.model_name, self.transform = model_name, transform
        self.chat = chat  # the voice chat's models (serve --asr --llm); None: /v1/realtime says how to add them

    def context(self, speech: SpeechRequest) -> List[TokenizedSegment]:
        """The voice (pinned), then the context turns; runs on a worker thread (Mimi encodes)."""
        speaker = speech.options["speaker"]
        segments = [self.voices.segment(self.voices.resolve(speech.voice), speaker, self.csm.tokenizer)]
        for n, turn in enumerate(speech.context):
            param = f"context[{n}]"
            turn_speaker = RULES["speaker"].check(f"{param}.speaker", turn.get("speaker", speaker))
            if turn.get("voice") is not None:
                if not isinstance(turn["voice"], str):
                    raise ApiError(400, f"{param}.voice must be a voice name or id", param, "invalid_value")
                voice = self.voices.resolve(turn["voice"])
                segments.append(TokenizedSegment(self.csm.tokenizer.encode(voice.transcript, turn_speaker),
                                                 self.voices.codes(voice)))
                continue
            text = check_text(turn.get("text"), f"{param}.text")
            codes = None
            if turn.get("audio") is not None:
                try:
                    data = base64.b64decode(turn["audio"], validate=True)
                except (binascii.Error, TypeError, ValueError):
                    raise ApiError(400, f"{param}.audio must be base64 audio file bytes (WAV, FLAC, OGG, MP3)",
                                   param, "invalid_value") from None
                try:
                    audio = decode_audio(data, f"{param}.audio")
                except AudioError as e:
                    raise ApiError(400, str(e), param, "invalid_audio") from None
                with self.pool.take() as mimi:
                    codes = mimi.encode(audio)
            segments.append(TokenizedSegment(self.csm.tokenizer.encode(text, turn_speaker), codes))
        return segments

    def submit(self, speech: SpeechRequest):
        return self.engine.submit(speech.text, speech.options["speaker"], self.context(speech),
                                  **{k: v for k, v in speech.options.items() if k != "speaker"})


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_):
        yield
        # FastAPI keeps the routes' functions in a process-wide cache, and with them this server:
        # what it holds must be freed when it stops, not when it is collected.
        server.pool.close()

    app = FastAPI(title="csm-mlx", summary="Sesame CSM through the OpenAI speech API", redoc_url=None,
                  lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def on_api_error(_, e: ApiError):
        return e.response()

    @app.exception_handler(HTTPException)
    async def on_http_error(_, e: HTTPException):
        message = {404: "no such route: see /v1/audio/speech, /v1/audio/voices, /v1/models",
                   405: "method not allowed on this route"}.get(e.status_code, str(e.detail))
        return ApiError(e.status_code, message, None, None, dict(e.headers or {})).response()

    @app.exception_handler(Exception)
    async def on_error(_, e: Exception):
        log.error("unexpected error: %r", e)
        return ApiError(500, f"internal error: {e}", None, "server_error").response()

    @app.websocket("/v1/realtime")
    async def realtime_session(ws: WebSocket):
        await realtime(ws, server, server.chat)

    @app.get("/health")
    async def health():
        pool = server.pool
        return {"status": "ok", "active": server.engine.active, "waiting": server.engine.waiting,
                "max_batch": server.engine.max_batch, "watermark": server.csm.watermarker is not None,
                "mimi": {"loaded": pool.loaded, "lent": pool.lent, "peak": pool.peak_loaded, "limit": pool.size}}

    def models():
        created = int(time.time())
        return [{"id": name, "object": "model", "created": created, "owned_by": "csm-mlx"}
                for name in (server.model_name, *MODEL_ALIASES)]

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": models()}

    @app.get("/v1/audio/models")
    async def list_audio_models():
        return {"models": [{"id": m["id"]} for m in models()], "data": models()}

    @app.get("/v1/audio/voices")
    async def list_voices():
        voices = [v.describe() for v in await run_in_threadpool(server.voices.list)]
        return {"object": "list", "voices": voices, "data": voices}

    @app.post("/v1/audio/voices", openapi_extra=VOICE_SCHEMA)
    async def create_voice(http: HttpRequest):
        form = await read_form(http, "name, transcript and audio_sample")
        if form is None:
            return Response(status_code=499)
        name = form.get("name")
        transcript = form.get("transcript")
        clip = form.get("audio_sample")
        name = voice_name(name)
        recognizer = server.chat.recognizer if server.chat is not None else None
        if transcript is not None and not isinstance(transcript, str):
            raise ApiError(400, "transcript must be text, the words the clip says", "transcript")
        transcript = (transcript or "").strip()
        if not transcript and recognizer is None:
            raise ApiError(400, "transcript must be the text the clip says: CSM clones a voice from both "
                                "(a server started with --asr transcribes clips sent without one)", "transcript")
        if len(transcript) > MAX_INPUT_CHARS:
            raise ApiError(400, f"transcript is longer than {MAX_INPUT_CHARS} characters", "transcript")
        if not isinstance(clip, UploadFile):
            raise ApiError(400, "audio_sample must be an uploaded audio file (WAV, FLAC, OGG, MP3)", "audio_sample")
        data = await clip.read(MAX_CLIP_BYTES + 1)
        if len(data) > MAX_CLIP_BYTES:
            raise ApiError(413, f"audio_sample is larger than {MAX_CLIP_BYTES // 2**20} MiB", "audio_sample",
                           "file_too_large")

        def create():
            try:
                # its length is the store's to judge (413 past its limit), not the window's
                audio = decode_audio(data, "audio_sample", max_seconds=None)
            except AudioError as e:
                raise ApiError(400, str(e), "audio_sample", "invalid_audio") from None
            text = transcript or server.engine.call(lambda: recognizer.transcribe(audio))
            if not text:
                raise ApiError(400, "no words were recognized in audio_sample: send its transcript", "transcript")
            return server.voices.create(name, text, audio)

        try:
            voice = await run_in_threadpool(create)
        except VoiceError as e:
            raise api_error(e) from None
        return {"object": "audio.voice", "id": voice.id, "name": voice.name, "created_at": voice.created_at,
                "transcript": voice.transcript}

    @app.patch("/v1/audio/voices/{voice_id}", openapi_extra=RENAME_SCHEMA)
    async def rename_voice(voice_id: str, http: HttpRequest):
        body = parse_json(await http.body(), '{"name": ...}')
        if not isinstance(body, dict):
            raise ApiError(400, 'the body must be a JSON object: {"name": ...}', None, "invalid_json")
        try:
            voice = await run_in_threadpool(server.voices.rename, voice_id, voice_name(body.get("name")))
        except VoiceError as e:
            raise api_error(e) from None
        return voice.describe()

    @app.delete("/v1/audio/voices/{voice_id}")
    async def delete_voice(voice_id: str):
        try:
            await run_in_threadpool(server.voices.delete, voice_id)
        except VoiceError as e:
            raise api_error(e) from None
        return {"object": "audio.voice.deleted", "id": voice_id, "deleted": True}

    @app.get("/v1/audio/voices/{voice_id}/audio")
    async def voice_audio(voice_id: str):
        """The voice prompt as the model hears it: its Mimi codes decoded, as WAV."""
        def decode():
            codes = server.voices.codes(server.voices.resolve(voice_id))
            with server.pool.take() as mimi:
                audio = mimi.decode(codes)
            encoder = WavEncoder()
            return encoder.encode(audio) + encoder.finish()

        try:
            wav = await run_in_threadpool(decode)
        except VoiceError as e:
            raise api_error(e) from None
        return Response(wav, media_type="audio/wav", headers={"X-Sample-Rate": str(SAMPLE_RATE)})

    @app.post("/v1/audio/verify", openapi_extra=VERIFY_SCHEMA)
    async def verify(http: HttpRequest):
        """Whether an uploaded file carries this server's watermark key, as `csm-mlx verify` reads it."""
        watermarker = server.csm.watermarker
        if watermarker is None:
            raise ApiError(503, "this server runs with --no-watermark, so it has no watermark decoder loaded: "
                           "use `csm-mlx verify FILE`, or restart the server without --no-watermark", None,
                           "watermark_disabled")
        form = await read_form(http, "file (the audio to check)")
        if form is None:
            return Response(status_code=499)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "file must be an uploaded audio file (WAV, FLAC, OGG, MP3)", "file")
        data = await upload.read()
        if not data:
            raise ApiError(400, "file is empty: send the bytes of a WAV, FLAC, OGG or MP3 file", "file")

        def read():
            # the header check and the read (as `csm-mlx verify` does them) take a path: the upload
            # goes to a file of its own, removed at once
            fd, tmp = tempfile.mkstemp(prefix="csm-mlx-verify-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                try:
                    check_verify_rate(audio_info(tmp).samplerate)
                    return read_audio(tmp, MAX_VERIFY_SECONDS, WATERMARK_RATE)
                except AudioError as e:
                    message = str(e).replace(f"audio file {tmp}", "file").replace(tmp, "file")
                    message = message.replace("the model's window holds", "verify takes")
                    raise ApiError(400, message, "file", "invalid_audio") from None
            finally:
                os.unlink(tmp)

        key = server.csm.watermark_key
        try:
            audio = await run_in_threadpool(read)
            found, confidence = await run_in_threadpool(
                server.engine.call, lambda: watermarker.verify_blocks([audio], key=key))
        except WatermarkError as e:
            raise ApiError(400, str(e), "file", "invalid_audio") from None
        return {"watermarked": found == tuple(key), "key": list(found) if found is not None else None,
                "confidence": round(float(confidence), 4), "expected_key": list(key)}

    @app.post("/v1/audio/speech", openapi_extra=SPEECH_SCHEMA)
    async def speech(http: HttpRequest):
        try:
            data = await http.body()
        except ClientDisconnect:  # gone while sending its body: no one to answer
            return Response(status_code=499)
        try:
            speech_request = parse_speech(parse_json(data))
            request = await run_in_threadpool(server.submit, speech_request)
        except (ApiError, OptionError, VoiceError, ContextError, EngineError, AudioError, CodecError) as e:
            raise api_error(e) from None
        return await respond(http, request, speech_request)

    async def respond(http: HttpRequest, request, speech: SpeechRequest):
        loop = asyncio.get_running_loop()
        items: "asyncio.Queue[tuple]" = asyncio.Queue()

        def emit(kind, payload):
            try:
                loop.call_soon_threadsafe(items.put_nowait, (kind, payload))
            except RuntimeError:  # the server stopped and its loop closed: no one reads this response
                request.cancel()

        transform = server.transform() if server.transform is not None else None
        run_audio(request, server.pool, speech.fmt, speech.speed, transform, emit,
                  below_engine=server.engine.on_cpu)
        # The status goes out with the first audio: a failure before it is a proper error response.
        first = None
        while first is None:
            try:
                first = await asyncio.wait_for(items.get(), 0.25)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    request.cancel()
                    return Response(status_code=499)
        if first[0] == "error":
            return api_error(first[1]).response()

        def usage():
            return {"input_tokens": request.text_tokens, "output_tokens": request.frames,
                    "total_tokens": request.text_tokens + request.frames}

        async def body():
            item = first
            try:
                while True:
                    kind, payload = item
                    if kind == "data":
                        yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(payload).decode()}) \
                            if speech.sse else payload
                    elif kind == "end":
                        if speech.sse:
                            yield _sse({"type": "speech.audio.done", "usage": usage()})
                        return
                    elif speech.sse:  # the error is an event of its own, then the stream ends
                        error = api_error(payload)
                        yield _sse({"type": "error", "error": {"message": error.message, "type": "server_error",
                                                               "param": None, "code": error.code}})
                        return
                    else:
                        raise StreamAborted(str(payload))
                    item = await items.get()
            finally:
                request.cancel()  # a client that went away frees its row at the next frame

        media_type = "text/event-stream" if speech.sse else MEDIA_TYPES[speech.fmt]
        headers = {"X-Sample-Rate": str(SAMPLE_RATE), "Cache-Control": "no-cache"}
        return StreamingResponse(body(), media_type=media_type, headers=headers)

    return app


class Guard:
    """The API key and the body limit, checked before any route runs; and a stream that failed
    after it started ends as a broken transfer rather than a traceback."""

    def __init__(self, app, api_key: Optional[str] = None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            return await self._websocket(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        public = scope["path"] in PUBLIC_PATHS or scope["path"].startswith(UI_PREFIX)
        if self.api_key and not public:
            given = headers.get("authorization", "")
            scheme, _, key = given.strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
                problem = "no API key given" if not given else "the API key is wrong"
                response = ApiError(401, f"{problem}: send Authorization: Bearer <the server's --api-key>", None,
                                    "invalid_api_key")
                return await response.response()(scope, receive, send)
        limit = MAX_CLIP_BYTES + 2**20 if scope["path"] == "/v1/audio/voices" else MAX_BODY_BYTES
        too_large = ApiError(413, f"the request body is larger than {limit // 2**20} MiB", None, "payload_too_large")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return await too_large.response()(scope, receive, send)
        seen = 0

        async def limited_receive():  # a chunked body has no length to check up front
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise too_large
            return message

        try:
            await self.app(scope, limited_receive, send)
        except StreamAborted:
            pass

    async def _websocket(self, scope, receive, send):
        """A browser cannot set headers on a WebSocket: as with OpenAI's, the key may come as the
        subprotocol openai-insecure-api-key.KEY. Refused connections get HTTP 403."""
        if self.api_key:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            scheme, _, key = headers.get("authorization", "").strip().partition(" ")
            offered = [p.partition("openai-insecure-api-key.")[2] for p in scope.get("subprotocols", [])
                       if p.startswith("openai-insecure-api-key.")]
            keys = ([key.strip()] if scheme.lower() == "bearer" else []) + offered
            if not any(hmac.compare_digest(k.encode(), self.api_key.encode()) for k in keys):
                await receive()  # websocket.connect
                return await send({"type": "websocket.close", "code": 1008})
        return await self.app(scope, receive, send)


def build_app(csm: CSM, engine: Engine, voices_dir, *, api_key: Optional[str] = None, model_name: str = "csm-1b",
              transform: Optional[Callable[[], AudioTransform]] = None, cors_origins: Sequence[str] = (),
              ui: bool = True, chat: Optional[ChatModels] = None):
    """The ASGI app to serve: the routes behind the guard, and CORS in front of it when origins
    are given (a preflight carries no API key; the request after it must). Unless transform says
    otherwise, a model loaded with its watermark marks every response as CSM.stream does (blocks
    of one message), the marking run on the engine's thread. Mimi instances: one per row of the
    batch, all loaded up front, so the server's memory is fixed by --max-batch. ui: the web page at /.
    chat: the speech recognizer and language model of /v1/realtime's voice chat."""
    if transform is None and csm.watermarker is not None:
        def transform():
            return csm.watermarker.stream(csm.watermark_key, csm.sample_rate, run=engine.call)
    pool = MimiPool(csm.mimi.path, size=engine.max_batch, preload=engine.max_batch, run=engine.call,
                    num_codebooks=csm.mimi.num_codebooks)
    voices = VoiceStore(voices_dir, pool, lambda name: csm.voice(name).audio, csm.voices())
    api = create_app(Server(csm, engine, voices, pool, model_name, transform, chat))
    if ui:
        add_ui(api)
    app = Guard(api, api_key)
    if cors_origins:
        app = CORSMiddleware(app, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "PATCH", "DELETE"],
                             allow_headers=["*"], expose_headers=["X-Sample-Rate"],
                             max_age=600)
    return app
