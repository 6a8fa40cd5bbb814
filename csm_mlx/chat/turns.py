"""Turn detection: when the user starts speaking and when they have finished.

WebRTC's voice activity detector (webrtcvad-wheels: no torch, wheels for macOS arm64 and Linux)
classifies each 30 ms frame of 16 kHz audio as speech or not. A turn starts after min_speech_ms of
speech in a row and ends after silence_ms without speech; its audio keeps prefix_ms from before
the start (the detector needs a few frames to be sure, and a word's onset is quiet). Pure numpy:
it runs on the audio input's own thread, so a barge-in is seen within one input block, whatever the
MLX thread is doing.
"""

import collections
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import soxr

from ..codec import SAMPLE_RATE

VAD_RATE = 16_000
VAD_FRAME = 480  # 30 ms at 16 kHz, one of the three frame lengths WebRTC's detector takes
VAD_FRAME_SECONDS = VAD_FRAME / VAD_RATE


@dataclass
class TurnSettings:
    """How turns are detected; the defaults are the OpenAI Realtime API's server VAD's."""

    silence_ms: float = 500  # silence after speech that ends the turn
    prefix_ms: float = 300  # audio kept from before the detected start
    min_speech_ms: float = 90  # speech in a row that starts a turn (shorter: a click, a cough)
    aggressiveness: int = 3  # WebRTC's mode, 0..3: higher rejects more non-speech
    max_turn_s: float = 30  # a turn this long ends even without a pause (CSM's context holds ~2 min of audio)

    def __post_init__(self):
        for name, low, top in (("silence_ms", 30, 10_000), ("prefix_ms", 0, 10_000), ("min_speech_ms", 0, 10_000),
                               ("max_turn_s", 1, 120)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= top:
                raise ValueError(f"{name} must be a number in {low}..{top}, got {value!r}")
        if self.aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"the detector's aggressiveness must be 0, 1, 2 or 3, got {self.aggressiveness!r}")


@dataclass
class SpeechStarted:
    start: int  # the turn's first sample (prefix included), counted from the first sample fed


@dataclass
class SpeechStopped:
    end: int  # the sample after the turn's last speech frame
    audio: np.ndarray  # the turn, 24 kHz mono float32, from its start (prefix included) to its end


class TurnDetector:
    """Feed 24 kHz mono float32 audio as it arrives; get the turn events it completes.

    muted() says whether to ignore speech now (the assistant speaking through loudspeakers):
    audio fed while muted never starts a turn."""

    def __init__(self, settings: TurnSettings = TurnSettings(), sample_rate: int = SAMPLE_RATE):
        import webrtcvad  # only voice chat needs it

        self.settings = settings
        self.sample_rate = sample_rate
        self._vad = webrtcvad.Vad(settings.aggressiveness)
        self._resampler = soxr.ResampleStream(sample_rate, VAD_RATE, 1, dtype="float32", quality="HQ")
        self._pending16 = np.zeros(0, np.float32)
        self._fed = 0  # samples fed (at sample_rate)
        self._classified = 0  # 16 kHz samples classified
        self._start_frames = max(1, round(settings.min_speech_ms / 1000 / VAD_FRAME_SECONDS))
        self._end_frames = max(1, round(settings.silence_ms / 1000 / VAD_FRAME_SECONDS))
        self._prefix = round(settings.prefix_ms / 1000 * sample_rate)
        # audio before a turn: what a start could reach back to (its speech run and the prefix)
        self._keep = self._prefix + round((self._start_frames + 2) * VAD_FRAME_SECONDS * sample_rate)
        self._recent: collections.deque = collections.deque()
        self._recent_samples = 0
        self._turn: Optional[List[np.ndarray]] = None  # the open turn's audio
        self._turn_start = 0
        self._speech_run = 0  # speech frames in a row
        self._silence_run = 0  # non-speech frames in a row, in a turn
        self._last_speech_end = 0

    @property
    def in_turn(self) -> bool:
        return self._turn is not None

    def feed(self, audio: np.ndarray, muted: bool = False) -> list:
        """Events (SpeechStarted, SpeechStopped) that audio completes, in order."""
        audio = np.asarray(audio, np.float32).reshape(-1)
        self._remember(audio)
        self._fed += len(audio)
        self._pending16 = np.concatenate([self._pending16, self._resampler.resample_chunk(audio)])
        events = []
        while len(self._pending16) >= VAD_FRAME:
            frame, self._pending16 = self._pending16[:VAD_FRAME], self._pending16[VAD_FRAME:]
            pcm = (np.clip(frame, -1, 1) * 32767).astype("<i2").tobytes()
            speech = self._vad.is_speech(pcm, VAD_RATE) and not (muted and self._turn is None)
            self._classified += VAD_FRAME
            event = self._step(speech)
            if event is not None:
                events.append(event)
        return events

    def _at(self, classified16: int) -> int:
        """The input sample at a 16 kHz position (the resampler's delay is ignored: a few ms)."""
        return min(self._fed, round(classified16 * self.sample_rate / VAD_RATE))

    def _step(self, speech: bool):
        if speech:
            self._speech_run += 1
            self._silence_run = 0
            self._last_speech_end = self._at(self._classified)
        else:
            self._speech_run = 0
            self._silence_run += 1
        if self._turn is None and self._speech_run >= self._start_frames:
            first_speech = self._at(self._classified - self._speech_run * VAD_FRAME)
            self._turn_start = max(first_speech - self._prefix, self._fed - self._recent_samples)
            audio = np.concatenate(list(self._recent)) if self._recent else np.zeros(0, np.float32)
            self._turn = [audio[self._turn_start - (self._fed - self._recent_samples):]]
            return SpeechStarted(self._turn_start)
        too_long = self._fed - self._turn_start >= self.settings.max_turn_s * self.sample_rate
        if self._turn is not None and (self._silence_run >= self._end_frames or too_long):
            if too_long:
                self._last_speech_end = self._at(self._classified)
            audio = np.concatenate(self._turn)[: self._last_speech_end - self._turn_start]
            self._turn = None
            return SpeechStopped(self._last_speech_end, audio)
        return None

    def _remember(self, audio: np.ndarray) -> None:
        if self._turn is not None:
            self._turn.append(audio)
        self._recent.append(audio)
        self._recent_samples += len(audio)
        while self._recent and self._recent_samples - len(self._recent[0]) >= self._keep:
            self._recent_samples -= len(self._recent.popleft())

    def end_turn(self) -> Optional[SpeechStopped]:
        """End the open turn now (a client committing it), with the audio so far; None if none is open."""
        if self._turn is None:
            return None
        audio = np.concatenate(self._turn)
        self._turn = None
        self._speech_run = self._silence_run = 0
        return SpeechStopped(self._turn_start + len(audio), audio)

    def reset(self) -> None:
        """Forget any open turn (after a barge-in was handled, say); timing goes on."""
        self._turn = None
        self._speech_run = self._silence_run = 0
