"""Continuous batching for many threads: one thread runs a FrameBatch, requests come and go.

One thread owns every MLX call (Metal is not thread-safe and MLX streams are per thread).
Requests are submitted from any thread and iterated from any thread; the engine thread inserts
them into its FrameBatch at frame boundaries and steps it, so a request joins and leaves the
batch at its own time. Everything about generating is the FrameBatch's (csm_mlx.frame_batch): a
request gets the frames CSM.generate gives it with the same seed, because it is the same code (up
to the last-bit ties described there).
call() runs other MLX work (a stream's watermark, a Mimi load) on the engine thread between frames.

    engine = csm.engine(max_batch=8)
    request = engine.submit("Hello there.", speaker=0, temperature=0)
    for frame in request:        # Mimi codes (32,) per 80 ms frame, as they are generated
        ...
"""

import concurrent.futures
import itertools
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, TypeVar, Union

import mlx.core as mx
import numpy as np
from mlx_lm.generate import wired_limit

from .frame_batch import CONTEXT_CACHE_ROWS, PREFILL_CHUNK, FrameBatch, Row
from .models import Model
from .options import check_options
from .prompt import TokenizedSegment, stack_frames
from .segment import Segment
from .utterance import Utterance, make_utterance

log = logging.getLogger("csm_mlx")
T = TypeVar("T")

# Seconds an idle engine waits after a request arrives for others sent with it (a server's
# concurrent clients arrive a few ms apart), so they are prefilled in one pass and join together.
ADMIT_WAIT = 0.02


def _wait_for_thread_exit(thread: threading.Thread, timeout: float = 2.0) -> None:
    """Wait (on Linux; elsewhere return) until the joined thread's OS thread is gone. join()
    returns before it runs its thread-local destructors, and MLX's (its compiled traces) take the
    GIL: while the interpreter shuts down, a thread cannot, and the process aborts ("terminate
    called without an active exception") if the main thread got there first."""
    task = f"/proc/self/task/{thread.native_id}"
    deadline = time.monotonic() + timeout
    while os.path.exists(task) and time.monotonic() < deadline:
        time.sleep(0.001)


class EngineError(RuntimeError):
    """The engine cannot take or finish a request; the message says why."""


class EngineFull(EngineError):
    """Every row is busy and the waiting queue is full: try again shortly."""


class Request:
    """One submitted utterance. Iterate it (from any thread) for its frames (32,) as they are
    generated; cancel() frees its row at the next frame boundary."""

    _ids = itertools.count(1)

    def __init__(self, utterance: Utterance):
        self.id = next(self._ids)
        self.utterance = utterance
        self.frames = 0  # frames delivered so far
        self.text_tokens = sum(len(c.text_tokens) for c in utterance.chunks)
        self.submitted = time.perf_counter()
        self.first_frame: Optional[float] = None  # perf_counter time of the first frame
        self._out: "queue.Queue[Any]" = queue.Queue()
        self._cancelled = threading.Event()
        self._done = False

    @property
    def prefilled_rows(self):
        """Rows run through the backbone before each chunk's first frame."""
        return self.utterance.prefilled_rows

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating: the engine drops the row before its next step."""
        self._cancelled.set()

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        item = self.get()
        if item is None:
            raise StopIteration
        return item

    def get(self, timeout: Optional[float] = None) -> Optional[np.ndarray]:
        """The next frame (32,), or None at the end; raises the engine's error if it failed.
        With a timeout, raises queue.Empty when no frame came in time."""
        if self._done:
            return None
        item = self._out.get(timeout=timeout)
        if isinstance(item, np.ndarray):
            return item
        self._done = True
        if item is not None:
            raise item
        return None

    def codes(self) -> np.ndarray:
        """Wait for the whole utterance: Mimi codes (32, frames)."""
        return stack_frames(list(self))

    # engine side
    def _deliver(self, frame: np.ndarray) -> None:
        if self.first_frame is None:
            self.first_frame = time.perf_counter()
        self.frames += 1
        self._out.put(frame)

    def _finish(self, error: Optional[BaseException] = None) -> None:
        self._out.put(error)  # None: the end


class Engine:
    """Continuous batching over one CSM model; see the module docstring.

    max_batch rows generate (or prefill) at once; up to max_queue more requests wait; beyond
    that submit() raises EngineFull. prefill_chunk is the rows of joining prompts (padded, all
    together) run per step while others generate. An idle engine waits admit_wait seconds after a request arrives, for
    others sent with it. The backbone cache of a request's context (up to context_cache_rows
    rows in all, the most recently used kept) is reused by the next request with the same
    context: a server's voice prompt is prefilled once, and each request after it runs only its
    own text."""

    def __init__(self, model: Model, tokenizer, mimi, max_batch: int = 8, max_queue: int = 32,
                 prefill_chunk: int = PREFILL_CHUNK, context_cache_rows: int = CONTEXT_CACHE_ROWS,
                 admit_wait: float = ADMIT_WAIT):
        self.model, self.tokenizer, self.mimi = model, tokenizer, mimi
        self.max_batch = check_options(batch_size=max_batch)["batch_size"]
        for name, value, low in (("max_queue", max_queue, 0), ("prefill_chunk", prefill_chunk, 1),
                                 ("context_cache_rows", context_cache_rows, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
        if isinstance(admit_wait, bool) or not isinstance(admit_wait, (int, float)) or not 0 <= admit_wait <= 1:
            raise ValueError(f"admit_wait must be a number of seconds in 0..1, got {admit_wait!r}")
        self.max_queue = max_queue
        self.admit_wait = admit_wait
        self.window = model.args.backbone.max_seq_len
        # whether the engine computes on the CPU cores, where other threads of the process compete with it
        self.on_cpu = mx.default_device() == mx.cpu
        # A lazy array belongs to the stream of the thread that made it: evaluate every array the
        # model holds (private ones too, such as RoPE frequencies) so the engine thread can use them.
        mx.eval([v for _, m in model.named_modules() for v in m.values() if isinstance(v, mx.array)])
        self._batch = FrameBatch(model, prefill_chunk=prefill_chunk, context_cache_rows=context_cache_rows)
        self._inbox: "queue.Queue[Request]" = queue.Queue()
        self._jobs: "queue.Queue[Tuple[Callable[[], Any], concurrent.futures.Future]]" = queue.Queue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closed = False
        self._wake = threading.Event()
        self._requests: Dict[Row, Request] = {}  # engine thread: the requests holding a row
        # MLX streams are per thread: the engine thread does all of the engine's work on its own
        self._stream = mx.new_thread_local_stream(mx.default_device())
        self._thread = threading.Thread(target=self._run, name="csm-engine", daemon=True)
        self._thread.start()

    # any thread
    @property
    def steps(self) -> int:
        """Frames queued so far (each for every generating row)."""
        return self._batch.steps

    @property
    def active(self) -> int:
        """Requests holding a row: generating or prefilling."""
        return len(self._requests)

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._in_flight - self.active

    def submit(self, text: str, speaker: int = 0, context: Sequence[Union[Segment, TokenizedSegment]] = (),
               **options) -> Request:
        """Queue text spoken by speaker after the context; options as for CSM.generate.

        Context segments with audio are encoded here (Mimi, on the caller's thread); pass
        TokenizedSegments to reuse codes. Bad input, a text that cannot fit the window beside the
        pinned context, and a full queue fail here, before anything is queued."""
        request = Request(make_utterance(self.tokenizer, self.mimi, text, speaker, context, window=self.window,
                                         **options))
        with self._lock:
            if self._closed:
                raise EngineError("the engine is closed")
            if self._in_flight >= self.max_batch + self.max_queue:
                raise EngineFull(f"all {self.max_batch} rows are busy and {self.max_queue} requests wait: "
                                 "try again shortly")
            self._in_flight += 1
            self._inbox.put(request)  # under the lock: close() cannot slip in between and leave it unread
        self._wake.set()
        return request

    def generate(self, text: str, speaker: int = 0, context: Sequence[Union[Segment, TokenizedSegment]] = (),
                 **options) -> np.ndarray:
        """Mimi codes (32, frames) of one request, waiting for it; arguments as for submit()."""
        return self.submit(text, speaker, context, **options).codes()

    def call(self, fn: Callable[[], T]) -> T:
        """fn() run on the engine thread between two frames, its result returned here: how other
        threads get MLX work done (a stream's watermark, say) without touching MLX themselves.
        The running streams wait while it runs."""
        if threading.current_thread() is self._thread:
            return fn()
        job: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise EngineError("the engine is closed")
            self._jobs.put((fn, job))
        self._wake.set()
        return job.result()

    def close(self) -> None:
        """Stop the engine thread; requests still running end with an EngineError."""
        with self._lock:
            self._closed = True
        self._wake.set()
        self._thread.join()
        _wait_for_thread_exit(self._thread)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # engine thread
    def _run(self) -> None:
        # on Metal, keep the model's weights wired as mlx-lm's generation does (elsewhere a no-op)
        with mx.stream(self._stream), wired_limit(self.model, [self._stream]):
            self._loop()

    def _loop(self) -> None:
        while True:
            if self._closed:
                self._fail_all(EngineError("the engine was closed"))
                while not self._jobs.empty():
                    self._jobs.get_nowait()[1].set_exception(EngineError("the engine was closed"))
                return
            if not self._batch.busy and self._inbox.empty() and self._jobs.empty():
                self._wake.wait()
                self._wake.clear()
                time.sleep(self.admit_wait)
                continue
            self._run_jobs()
            try:
                self._admit()
                self._drop_cancelled()
                for row, frame in self._batch.step():
                    if frame is not None:
                        self._requests[row]._deliver(frame)
                    else:
                        self._release(row)
            except Exception as e:  # one failed step must not take the engine down: fail what it held
                log.exception("engine step failed")
                self._fail_all(EngineError(f"generation failed: {e}"))

    def _run_jobs(self) -> None:
        while not self._jobs.empty():
            fn, job = self._jobs.get_nowait()
            try:
                job.set_result(fn())
            except Exception as e:  # noqa: BLE001 - the caller's failure, raised on the caller's thread
                job.set_exception(e)

    def _fail_all(self, error: BaseException) -> None:
        for row in list(self._requests):
            self._release(row, error)
        while not self._inbox.empty():
            self._end(self._inbox.get_nowait(), error)
        self._batch = FrameBatch(self.model, prefill_chunk=self._batch.prefill_chunk,
                                 context_cache_rows=self._batch.context_cache_rows)

    def _end(self, request: Request, error: Optional[BaseException] = None) -> None:
        request._finish(error)
        with self._lock:
            self._in_flight -= 1

    def _release(self, row: Row, error: Optional[BaseException] = None) -> None:
        self._end(self._requests.pop(row), error)

    def _admit(self) -> None:
        while self._batch.size < self.max_batch and not self._inbox.empty():
            request = self._inbox.get_nowait()
            if request.cancelled:
                self._end(request)
                continue
            try:
                self._requests[self._batch.insert(request.utterance)] = request
            except Exception as e:
                self._end(request, EngineError(f"generation failed: {e}"))
                raise

    def _drop_cancelled(self) -> None:
        for row, request in list(self._requests.items()):
            if request.cancelled:
                self._batch.remove(row)
                self._release(row)
