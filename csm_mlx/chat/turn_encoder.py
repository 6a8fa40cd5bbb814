"""Mimi's codes of the user's turn, made while the user speaks.

CSM's context holds the user's turn as Mimi codes, and encoding it once the turn has ended puts
that work between the end of speech and the first audio (~0.9 s for 3.6 s of speech on a 2-core
x86 VM). Here each 80 ms frame is encoded as soon as it has arrived, on a thread of its own with a
Mimi instance of its own (rustymimi runs no MLX, so Metal's one-thread rule does not bind it): at
the end of a turn at most a frame or two are left.

A turn's codes cover whole frames: the turn's audio up to the next frame boundary, with the audio
that followed it (the detector ends a turn only after silence has come in), or zeros where none
has come. They are exactly what Mimi.encode gives for that audio, which comes back with them.
"""

import queue
import threading
from concurrent.futures import Future
from typing import Tuple

import numpy as np

from ..codec import FRAME_SAMPLES, Mimi


class TurnEncoder:
    """start(audio) when a turn starts (its audio so far), feed(audio) as more of it arrives,
    finish(samples) when it ends: a Future of (codes, audio), the turn's first `samples` samples
    to the next frame boundary and their codes. The calls queue in order, so a turn may start before the last one's
    codes are done. Any thread may call them."""

    def __init__(self, mimi_path, num_codebooks: int):
        self._path, self._num_codebooks = mimi_path, num_codebooks
        self._mimi = Mimi(mimi_path, num_codebooks)
        self._inbox: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="csm-mlx turn encoder", daemon=True)
        self._thread.start()

    def start(self, audio: np.ndarray) -> None:
        self._inbox.put(("start", np.array(audio, np.float32)))

    def feed(self, audio: np.ndarray) -> None:
        self._inbox.put(("feed", np.array(audio, np.float32)))

    def finish(self, samples: int) -> "Future[Tuple[np.ndarray, np.ndarray]]":
        done: Future = Future()
        self._inbox.put(("finish", samples, done))
        return done

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join()

    def _run(self) -> None:
        audio = np.zeros(0, np.float32)  # the open turn's audio
        codes = []  # its frames encoded so far
        open_turn = False
        while True:
            message = self._inbox.get()
            if message is None:
                return
            kind = message[0]
            if kind == "start":
                audio, codes, open_turn = message[1], [], True
            elif kind == "feed" and open_turn:
                audio = np.concatenate([audio, message[1]])
            elif kind == "finish":
                done: Future = message[2]
                try:
                    frames = -(-message[1] // FRAME_SAMPLES)
                    whole = np.zeros(frames * FRAME_SAMPLES, np.float32)  # zeros where a committed turn ends mid-frame
                    whole[: min(len(audio), len(whole))] = audio[: len(whole)]
                    codes += self._encode(whole, len(codes), frames)
                    done.set_result((np.concatenate(codes[:frames], axis=1) if frames else
                                     np.zeros((self._mimi.num_codebooks, 0), np.int32), whole))
                except Exception as e:  # the MLX thread waits on it: it raises there
                    done.set_exception(e)
                # a fresh instance for the next turn (~0.3 s, before it starts, normally): reset()
                # keeps the positions the encoder's attention has used, and they change the codes
                self._mimi = Mimi(self._path, self._num_codebooks)
                open_turn = False
                continue
            if open_turn:
                codes += self._encode(audio, len(codes), len(audio) // FRAME_SAMPLES)

    def _encode(self, audio: np.ndarray, first: int, end: int) -> list:
        """Codes of frames first..end-1 of audio (the last one zero-padded if it is short)."""
        return [self._mimi.encode_step(audio[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]) for i in range(first, end)]

