"""Audio input for voice chat: the microphone, or a recording fed in as the microphone would be.

Both hand 24 kHz mono float32 blocks of block_s to on_audio, on their own thread (PortAudio's, or
the recording's), at the pace of real time; neither touches MLX.
"""

import os
import threading
import time
from typing import Callable, Optional

import numpy as np

from ..audio import read_audio
from ..codec import SAMPLE_RATE

BLOCK_SECONDS = 0.02


class MicrophoneError(RuntimeError):
    """No audio input could be opened; the message says what to do."""


class Microphone:
    """The default input device (or device, a sounddevice name or index)."""

    ended = False  # a microphone never runs out

    def __init__(self, device=None, block_s: float = BLOCK_SECONDS):
        """Checks that the device exists (before any model is loaded); opened by start()."""
        self.device, self.block = device, round(block_s * SAMPLE_RATE)
        self._stream = None
        sd = self._sounddevice()
        try:
            sd.query_devices(device, kind="input")
        except (sd.PortAudioError, ValueError) as e:
            raise MicrophoneError(f"no microphone{'' if device is None else f' {device!r}'} "
                                  f"({' '.join(str(e).split())}): connect one, choose it with --input-device, "
                                  "or give a recording with --input-file") from None

    @staticmethod
    def _sounddevice():
        try:
            import sounddevice as sd
        except OSError as e:  # the Linux wheel needs the system's PortAudio
            raise MicrophoneError(f"cannot load PortAudio ({e}): install it, e.g. `apt-get install libportaudio2`") from None
        return sd

    def start(self, on_audio: Callable[[np.ndarray], None]) -> None:
        sd = self._sounddevice()
        try:
            self._stream = sd.InputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32", blocksize=self.block,
                                          device=self.device,
                                          callback=lambda data, frames, when, status: on_audio(data[:, 0].copy()))
            self._stream.start()
        except (sd.PortAudioError, ValueError) as e:
            raise MicrophoneError(f"cannot open a microphone ({' '.join(str(e).split())}): connect one, "
                                  "choose it with --input-device, or give a recording with --input-file") from None

    def close(self) -> None:
        if self._stream is not None:
            self._stream.abort()
            self._stream.close()


class Recording:
    """A recording played in as the user's microphone: its blocks in real time (or as fast as
    they are taken, realtime=False), then tail_s of silence so that its last turn ends."""

    def __init__(self, path: os.PathLike, block_s: float = BLOCK_SECONDS, tail_s: float = 3.0, realtime: bool = True):
        self.audio = read_audio(path, max_seconds=None)
        self.block, self.tail, self.realtime = round(block_s * SAMPLE_RATE), round(tail_s * SAMPLE_RATE), realtime
        self._closed = threading.Event()
        self._ended = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def start(self, on_audio: Callable[[np.ndarray], None]) -> None:
        self._thread = threading.Thread(target=self._play, args=(on_audio,), name="csm-recording", daemon=True)
        self._thread.start()

    def _play(self, on_audio) -> None:
        audio = np.concatenate([self.audio, np.zeros(self.tail, np.float32)])
        began = time.perf_counter()
        for start in range(0, len(audio), self.block):
            if self._closed.is_set():
                break
            if self.realtime:
                self._closed.wait(max(0.0, began + start / SAMPLE_RATE - time.perf_counter()))
            on_audio(audio[start : start + self.block])
        self._ended.set()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()
