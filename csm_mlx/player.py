"""Gap-free real-time playback of generated audio through a sounddevice callback stream.

The stream starts once the buffered audio covers the expected shortfall. If production runs
at r audio seconds per wall second and R seconds are still to come, producing them takes R / r
while playing them (plus what is buffered, B) takes B + R, so playback never starves when
B >= R * (1/r - 1). A machine faster than real time (r >= 1) starts at once.
"""

import collections
import threading
import time
from typing import Callable, Optional

import numpy as np

from .codec import SAMPLE_RATE


class PlaybackError(RuntimeError):
    """No audio output could be opened; the message says what to do."""


def _sounddevice_stream(**kwargs):
    try:
        import sounddevice as sd
    except OSError as e:  # the Linux wheel needs the system's PortAudio
        raise PlaybackError(f"cannot load PortAudio ({e}): install it, e.g. `apt-get install libportaudio2`") from None
    try:
        return sd.OutputStream(**kwargs), sd.CallbackStop
    except sd.PortAudioError as e:
        raise PlaybackError(f"cannot open the audio output ({e}): check the output device") from None


class Player:
    """Plays float32 mono chunks as they are fed, from a thread-safe buffer.

    expected_seconds is the expected total length of the audio (for the start rule);
    None starts as soon as audio arrives. Use as a context manager, or call finish()."""

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        *,
        expected_seconds: Optional[float] = None,
        margin_seconds: float = 0.1,
        blocksize: int = 960,
        device=None,
        output: Callable = _sounddevice_stream,
    ):
        self.sample_rate = sample_rate
        self.expected_seconds = expected_seconds
        self.margin_seconds = margin_seconds
        self._open = lambda: output(samplerate=sample_rate, channels=1, dtype="float32", blocksize=blocksize,
                                    device=device, callback=self._callback, finished_callback=self._done.set)
        self._lock = threading.Lock()
        self._chunks: collections.deque = collections.deque()
        self._offset = 0
        self._produced = 0
        self._first_chunk: Optional[tuple] = None  # (time, samples)
        self._finished = False
        self._done = threading.Event()
        self._stream = None
        self._stream_open = False
        self._stopped = False
        self._stop = None
        self.underruns = 0
        self.played = 0  # samples handed to the output so far
        self.started_at: Optional[float] = None
        self.start_delay: Optional[float] = None  # from the first chunk to the start of playback

    def __enter__(self) -> "Player":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.stop()

    @property
    def buffered_seconds(self) -> float:
        with self._lock:
            return (sum(len(c) for c in self._chunks) - self._offset) / self.sample_rate

    def feed(self, chunk: np.ndarray) -> None:
        now = time.perf_counter()
        chunk = np.ascontiguousarray(chunk, dtype=np.float32).reshape(-1)
        with self._lock:
            self._chunks.append(chunk)
            self._produced += len(chunk)
        if self._first_chunk is None:
            self._first_chunk = (now, len(chunk))
        if self._stream is None and not self._finished and self._ready(now):
            self._start(now)

    def _ready(self, now: float) -> bool:
        if self.expected_seconds is None:
            return True
        produced = self._produced / self.sample_rate
        remaining = self.expected_seconds - produced
        if remaining <= 0:
            return True
        first_time, first_samples = self._first_chunk
        elapsed = now - first_time
        if elapsed <= 0:
            return False  # one chunk tells nothing about the rate
        rate = (self._produced - first_samples) / self.sample_rate / elapsed
        if rate >= 1:
            return True
        return rate > 0 and self.buffered_seconds >= remaining * (1 / rate - 1) + self.margin_seconds

    def _start(self, now: float) -> None:
        self._stream, self._stop = self._open()
        self._stream_open = True
        self.started_at = now
        self.start_delay = now - self._first_chunk[0]
        self._stream.start()

    def _callback(self, outdata, frames, time_info, status) -> None:
        out = outdata[:, 0]
        filled = 0
        with self._lock:
            while filled < frames and self._chunks:
                chunk = self._chunks[0]
                n = min(frames - filled, len(chunk) - self._offset)
                out[filled : filled + n] = chunk[self._offset : self._offset + n]
                filled += n
                self._offset += n
                if self._offset == len(chunk):
                    self._chunks.popleft()
                    self._offset = 0
            self.played += filled
            finished = self._finished
        if filled < frames:
            out[filled:] = 0
            if finished:
                raise self._stop
            self.underruns += 1

    def finish(self, timeout: Optional[float] = None) -> None:
        """No more audio: play what is buffered to the end, then close."""
        with self._lock:
            self._finished = True
            if self._stopped:
                return
        if self._stream is None:
            if not self._produced:
                return
            self._start(time.perf_counter())
        wait = timeout if timeout is not None else self.buffered_seconds + 5.0
        self._done.wait(wait)
        self._close()

    def stop(self) -> None:
        """Stop at once (Ctrl-C, a barge-in; from any thread), dropping what is buffered."""
        with self._lock:
            self._finished = True
            self._chunks.clear()
            self._stopped = True
            was_open, self._stream_open = self._stream_open, False
        if was_open:
            self._stream.abort()
            self._stream.close()

    def _close(self) -> None:
        with self._lock:  # a stop() from another thread may have closed it
            was_open, self._stream_open = self._stream_open, False
        if was_open:
            self._stream.close()
