"""One response's audio path, on a thread of its own (never the engine's): frames from the engine
-> Mimi's streaming decoder (an instance of the pool, one state per response) -> speed -> the
block-wise transform -> the container encoder -> bytes handed to the event loop."""

import itertools
import logging
import os
import sys
import threading
from typing import Callable, Optional, Protocol

import numpy as np

from ..engine import Request
from .encoders import Tempo, make_encoder
from .mimi_pool import MimiPool, PoolStopped

log = logging.getLogger("csm_mlx.server")

# How far below the engine an audio thread runs when they share the CPU (Linux nice steps): each
# stream waits on the engine's next frame, so decoding should fill the engine's idle moments
# rather than take a core from its step. Measured on csm-1b with 4 streams on 2 cores.
AUDIO_NICE = 10


class AudioTransform(Protocol):
    """A transform of the response's audio in blocks of its choosing (the watermark's
    StreamWatermarker): feed() may hold audio back and return it later; flush() returns the rest."""

    def feed(self, audio: np.ndarray) -> np.ndarray: ...

    def flush(self) -> np.ndarray: ...


def yield_to_engine() -> None:
    """Lower the calling thread's CPU priority by AUDIO_NICE (Linux, where a thread's nice is its
    own; elsewhere, or where the OS refuses, the thread keeps its priority)."""
    if not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + AUDIO_NICE))
    except OSError:
        pass


def run_audio(request: Request, pool: MimiPool, fmt: str, speed: float,
              transform: Optional[AudioTransform], emit: Callable[[str, object], None],
              below_engine: bool = False) -> threading.Thread:
    """Start the thread; emit("data", bytes) as the container has bytes, then emit("end", None),
    or emit("error", exception). The engine request is cancelled if this path fails.
    below_engine: the thread runs at a lower CPU priority than the engine (an engine on the CPU)."""

    def run():
        if below_engine:
            yield_to_engine()
        try:
            encoder = make_encoder(fmt)
            tempo = Tempo(speed) if speed != 1 else None
            frames = iter(request)
            first = next(frames, None)  # a queued request holds no Mimi instance while it waits
            codebooks = len(first) if first is not None else None
            with pool.take(stopped=lambda: request.cancelled, codebooks=codebooks) as mimi:
                for frame in itertools.chain([first] if first is not None else [], frames):
                    if request.cancelled:  # its client is gone: its frames are decoded for no one
                        return
                    audio = mimi.decode_step(frame[:, None])
                    if tempo is not None:
                        audio = tempo.process(audio)
                    if transform is not None:
                        audio = transform.feed(audio)
                    data = encoder.encode(audio)
                    if data:
                        emit("data", data)
                tail = tempo.finish() if tempo is not None else np.zeros(0, np.float32)
                if transform is not None:
                    tail = np.concatenate([transform.feed(tail), transform.flush()])
                data = encoder.encode(tail) + encoder.finish()
                if data:
                    emit("data", data)
                emit("end", None)  # before the instance goes back (a worn one reloads between frames)
        except PoolStopped:  # cancelled while it waited for an instance
            return
        except Exception as e:  # noqa: BLE001 - every failure must reach the client, not just the log
            request.cancel()
            log.warning("request %d failed while streaming: %s", request.id, e)
            emit("error", e)

    thread = threading.Thread(target=run, name=f"csm-audio-{request.id}")
    thread.start()
    return thread
