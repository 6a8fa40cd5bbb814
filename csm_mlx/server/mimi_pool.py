"""The pool of Mimi instances: Mimi's streaming decoder keeps one state per instance, so every
response that is decoding holds an instance of its own. The pool's size is the server's memory
bound for Mimi: past it, a response waits for an instance to come back."""

import os
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, TypeVar

from ..codec import NUM_CODEBOOKS, Mimi
from ..engine import EngineError

T = TypeVar("T")


class PoolStopped(Exception):
    """The response waiting for an instance was cancelled."""


class MimiPool:
    """At most size Mimi instances (~450 MB each), lent one per response and reset for the next
    when it comes back. rustymimi holds the GIL while it loads, which stops every thread, the
    engine's too: ~0.2 s alone, but seconds while the engine's threads compute. So the pool loads
    (to grow, or to replace a worn instance) through run, the engine's call: between two frames,
    nothing else computing. A reused instance decodes ~1e-6 off a fresh one (its positions run
    on), as CSM.generate's own instance does: at most one PCM16 step."""

    def __init__(self, path: os.PathLike, size: int, preload: int = 0,
                 run: Callable[[Callable[[], T]], T] = lambda fn: fn(), num_codebooks: int = NUM_CODEBOOKS):
        if size < 1:
            raise ValueError("a Mimi pool needs at least one instance")
        self._path, self.size, self._run, self.num_codebooks = path, size, run, num_codebooks
        self._idle: List[Mimi] = [Mimi(path, num_codebooks) for _ in range(min(preload, size))]
        self.loaded = len(self._idle)  # instances alive: idle, lent, or being loaded
        self.peak_loaded = self.loaded
        self._changed = threading.Condition()
        self._closed = False

    @property
    def lent(self) -> int:
        """Instances in use (or being loaded) by responses, voices and context turns."""
        with self._changed:
            return self.loaded - len(self._idle)

    @contextmanager
    def take(self, stopped: Callable[[], bool] = lambda: False, codebooks: Optional[int] = None) -> Iterator[Mimi]:
        """An instance of its own for the caller, ready to decode frames of codebooks codes (the
        model's count by default); waits while all size are lent, and raises PoolStopped if
        stopped() turns true while it waits."""
        mimi = self._idle_or_slot(stopped)
        codebooks = codebooks or self.num_codebooks
        try:
            if mimi is None:
                mimi = self._run(lambda: Mimi(self._path, self.num_codebooks))
            if mimi.loaded_codebooks != codebooks:
                self._run(lambda: mimi.prepare(codebooks))
        except BaseException:
            self._drop()
            raise
        try:
            yield mimi
        finally:
            self._give_back(mimi)

    def _idle_or_slot(self, stopped: Callable[[], bool]):
        """An idle instance, or None when the caller may load a new one (its slot is counted)."""
        with self._changed:
            while True:
                if self._idle:
                    return self._idle.pop()
                if self.loaded < self.size:
                    self.loaded += 1
                    self.peak_loaded = max(self.peak_loaded, self.loaded)
                    return None
                if stopped():
                    raise PoolStopped()
                self._changed.wait(0.25)

    def close(self) -> None:
        """Free the idle instances now and each lent one when it comes back (the server stopped)."""
        with self._changed:
            self._closed = True
            self.loaded -= len(self._idle)
            self._idle.clear()
            self._changed.notify_all()

    def _drop(self) -> None:
        with self._changed:
            self.loaded -= 1
            self._changed.notify()

    def _give_back(self, mimi: Mimi) -> None:
        try:
            if mimi.worn:
                self._run(mimi.reset)
            else:
                mimi.reset()
        except EngineError:  # the server is closing: the instance is dropped
            self._drop()
            return
        with self._changed:
            if self._closed:
                self.loaded -= 1
            else:
                self._idle.append(mimi)
            self._changed.notify()
