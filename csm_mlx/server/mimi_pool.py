"""The pool of Mimi instances: Mimi's streaming decoder keeps one state per instance, so every
response that is decoding holds an instance of its own."""

import os
import queue
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

from ..codec import Mimi
from ..engine import EngineError

T = TypeVar("T")


class MimiPool:
    """Mimi instances, one lent per response and reset for the next when it is done. rustymimi
    holds the GIL while it loads, which stops every thread, the engine's too: ~0.2 s alone, but
    seconds while the engine's threads compute. So the pool loads (to grow, or to replace a worn
    instance) through run, the engine's call: between two frames, nothing else computing. A
    reused instance decodes ~1e-6 off a fresh one (its positions run on), as CSM.generate's own
    instance does: at most one PCM16 step. Up to keep idle instances stay loaded (~450 MB each);
    the server preloads one per row of its batch, so no request waits for a load."""

    def __init__(self, path: os.PathLike, preload: int = 2, keep: int = 8,
                 run: Callable[[Callable[[], T]], T] = lambda fn: fn()):
        self._path, self._keep, self._run = path, keep, run
        self._idle: "queue.LifoQueue[Mimi]" = queue.LifoQueue()
        for _ in range(preload):
            self._idle.put(Mimi(path))

    @contextmanager
    def take(self) -> Iterator[Mimi]:
        try:
            mimi = self._idle.get_nowait()
        except queue.Empty:
            mimi = self._run(lambda: Mimi(self._path))
        try:
            yield mimi
        finally:
            self._give_back(mimi)

    def _give_back(self, mimi: Mimi) -> None:
        try:
            if mimi.worn:
                self._run(mimi.reset)
            else:
                mimi.reset()
        except EngineError:  # the server is closing: the instance is dropped
            return
        if self._idle.qsize() < self._keep:
            self._idle.put(mimi)
