"""Voices for the server: the model repo's presets, OpenAI's names mapped onto them, and user voices
kept under --voices-dir as Mimi codes + transcript (encoded once at upload, never per request)."""

import base64
import json
import os
import re
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from ..codec import FRAME_SAMPLES, SAMPLE_RATE
from ..prompt import TokenizedSegment
from ..tokenizer import TextTokenizer
from ..voices import VOICES
from .mimi_pool import MimiPool

# OpenAI's voice names, so a client that only knows those gets a CSM voice.
OPENAI_VOICES: Dict[str, str] = {
    "alloy": "conversational_a", "echo": "conversational_b", "fable": "read_speech_a", "onyx": "read_speech_b",
    "nova": "read_speech_c", "shimmer": "read_speech_d", "ash": "conversational_b", "ballad": "read_speech_a",
    "coral": "conversational_a", "sage": "read_speech_c", "verse": "read_speech_d", "marin": "conversational_a",
    "cedar": "conversational_b",
}
MAX_CLIP_SECONDS = 60  # a voice prompt longer than this leaves little of the 2048-row window to speak in
_ID = re.compile(r"voice_[0-9a-f]{32}")


class VoiceError(ValueError):
    """A voice that does not exist or cannot be made; status is the HTTP status it deserves."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = "voice"):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class Voice:
    id: str
    name: str
    transcript: str
    kind: str  # preset, alias or custom
    created_at: int = 0
    preset: Optional[str] = None  # what an alias or a preset speaks with

    def describe(self) -> dict:
        info = {"id": self.id, "name": self.name, "object": "audio.voice", "type": self.kind,
                "created_at": self.created_at}
        if self.kind == "alias":
            info["preset"] = self.preset
        if self.kind == "custom":
            info["transcript"] = self.transcript
        return info


class VoiceStore:
    """Presets (encoded on first use, then kept), aliases, and the user voices in directory."""

    def __init__(self, directory: Path, pool: MimiPool, preset_audio: Callable[[str], np.ndarray],
                 presets: Optional[Dict[str, str]] = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._pool, self._preset_audio = pool, preset_audio
        self.presets = dict(VOICES if presets is None else presets)  # name -> transcript
        self._preset_codes: Dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        # a rename reads and rewrites a record: a delete between the two would bring the voice back
        self._records = threading.Lock()

    def _path(self, voice_id: str) -> Path:
        # ids are made here and checked against their pattern: no request names a path
        return self.directory / f"{voice_id}.json"

    def _custom(self) -> List[dict]:
        voices = []
        for path in sorted(self.directory.glob("voice_*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # a half-copied or foreign file is not a voice
            if isinstance(record, dict) and _ID.fullmatch(str(record.get("id", ""))):
                voices.append(record)
        return voices

    def list(self) -> List[Voice]:
        voices = [Voice(name, name, text, "preset", preset=name) for name, text in self.presets.items()]
        voices += [Voice(alias, alias, self.presets[preset], "alias", preset=preset)
                   for alias, preset in OPENAI_VOICES.items() if preset in self.presets]
        voices += [Voice(r["id"], r["name"], r["transcript"], "custom", r["created_at"]) for r in self._custom()]
        return voices

    def resolve(self, voice: str) -> Voice:
        """A voice by preset name, OpenAI name, user voice id or (unique) user voice name."""
        matches = [v for v in self.list() if v.id == voice] or [v for v in self.list() if v.name == voice]
        if len(matches) != 1:
            known = ", ".join(list(self.presets) + list(OPENAI_VOICES))
            problem = "names several voices: use its id" if matches else "is not a voice"
            raise VoiceError(f"voice {voice!r} {problem}; presets are {known}, and GET /v1/audio/voices lists "
                             "user voices")
        return matches[0]

    def segment(self, voice: Voice, speaker: int, tokenizer: TextTokenizer) -> TokenizedSegment:
        """The voice as a pinned context turn spoken by speaker: its transcript and its codes."""
        return TokenizedSegment(tokenizer.encode(voice.transcript, speaker), self.codes(voice), pinned=True)

    def codes(self, voice: Voice) -> np.ndarray:
        """The voice's Mimi codes (32, frames)."""
        if voice.kind == "custom":
            try:
                record = json.loads(self._path(voice.id).read_text())
            except (OSError, ValueError):
                raise VoiceError(f"voice {voice.id} was deleted", 404) from None
            shape = tuple(record["codes_shape"])
            return np.frombuffer(base64.b64decode(record["codes"]), "<u2").reshape(shape).astype(np.int32)
        with self._lock:
            if voice.preset not in self._preset_codes:
                with self._pool.take() as mimi:
                    self._preset_codes[voice.preset] = mimi.encode(self._preset_audio(voice.preset))
            return self._preset_codes[voice.preset]

    def create(self, name: str, transcript: str, audio: np.ndarray) -> Voice:
        """Encode the clip once and store it; the voice survives a restart."""
        if len(audio) > MAX_CLIP_SECONDS * SAMPLE_RATE:
            raise VoiceError(f"the voice clip is {len(audio) / SAMPLE_RATE:.0f} s long: give at most "
                             f"{MAX_CLIP_SECONDS} s (5-20 s of clear speech works best)", 413, "audio_sample")
        if len(audio) < FRAME_SAMPLES:
            raise VoiceError("the voice clip is shorter than 80 ms: give 5-20 s of clear speech", 400, "audio_sample")
        with self._pool.take() as mimi:
            codes = mimi.encode(audio)
        voice = Voice(f"voice_{uuid.uuid4().hex}", name, transcript, "custom", int(time.time()))
        self._write({"id": voice.id, "name": name, "transcript": transcript, "created_at": voice.created_at,
                     "codes_shape": list(codes.shape),
                     "codes": base64.b64encode(codes.astype("<u2").tobytes()).decode()})
        return voice

    def _write(self, record: dict) -> None:
        """A temporary sibling renamed over the record: a reader never sees half a voice."""
        fd, tmp = tempfile.mkstemp(prefix=".voice-", suffix=".part", dir=self.directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            os.replace(tmp, self._path(record["id"]))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _check_user_id(self, voice_id: str, action: str) -> None:
        if not _ID.fullmatch(voice_id):
            raise VoiceError(f"{voice_id!r} is not a user voice id (voice_ and 32 hex digits); presets cannot be "
                             f"{action}", 400 if voice_id in self.presets or voice_id in OPENAI_VOICES else 404)

    def rename(self, voice_id: str, name: str) -> Voice:
        self._check_user_id(voice_id, "renamed")
        with self._records:
            try:
                record = json.loads(self._path(voice_id).read_text())
            except FileNotFoundError:
                raise VoiceError(f"voice {voice_id} does not exist", 404) from None
            record["name"] = name
            self._write(record)
        return Voice(record["id"], name, record["transcript"], "custom", record["created_at"])

    def delete(self, voice_id: str) -> None:
        self._check_user_id(voice_id, "deleted")
        with self._records:
            try:
                self._path(voice_id).unlink()
            except FileNotFoundError:
                raise VoiceError(f"voice {voice_id} does not exist", 404) from None
