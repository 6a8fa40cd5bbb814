"""Continuous batching: many requests share every step of the frame loop.

One thread owns every MLX call (Metal is not thread-safe and MLX streams are per thread). Requests
are submitted from any thread and iterated from any thread; the engine thread admits them at frame
boundaries, prefills the joining prompts together in chunks between decode steps (so requests
that arrive together join at the same step, and running streams never wait for a whole long
prefill), then runs one backbone step and one depth-decoder pass over all
active rows per frame. A row leaves at its own end of speech, frame cap, repeat stop or
cancellation. Each row keeps its own sampling settings and its own random key, so a seeded request
gives the same frames alone or beside others, and the same frames CSM.generate gives; greedy, every
request gets the codes it gets alone. Bit for bit where the model runs on csm_mlx's CPU kernels
(csm_mlx.blas): there a row's numbers depend neither on its batch nor on how its prompt was split
into passes, which here follows the timing of other requests.

    engine = csm.engine(max_batch=8)
    request = engine.submit("Hello there.", speaker=0, temperature=0)
    for frame in request:        # Mimi codes (32,) per 80 ms frame, as they are generated
        ...
"""

import concurrent.futures
import itertools
import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache

from .context import fit_context
from .conversation import frame_cap
from .frames import PREFILL_ROWS, TokenizedSegment, audio_rows, decode_frame, prompt_rows, stack_frames
from .options import AUDIO_CODES, check_options, check_text
from .segment import Segment
from .text import chunk_text

if TYPE_CHECKING:
    from .api import CSM

log = logging.getLogger("csm_mlx")
T = TypeVar("T")

# Rows of a joining prompt run through the backbone per engine step. Smaller chunks shorten the
# longest pause a running stream sees while another request is admitted; larger ones admit faster.
PREFILL_CHUNK = 64
# Rows of context (a voice prompt, earlier turns) whose backbone cache the engine keeps for the
# next request with the same context: ~130 KB per row for csm-1b in float32, so ~540 MB.
PREFIX_CACHE_ROWS = 4096
# Seconds an idle engine waits after a request arrives for others sent with it (a server's
# concurrent clients arrive a few ms apart), so they are prefilled in one pass and join together.
ADMIT_WAIT = 0.02


class EngineError(RuntimeError):
    """The engine cannot take or finish a request; the message says why."""


class EngineFull(EngineError):
    """Every row is busy and the waiting queue is full: try again shortly."""


class RequestCancelled(EngineError):
    """Iterating a request that was cancelled."""


@dataclass
class _Chunk:
    text_tokens: List[int]
    max_frames: int


class Request:
    """One submitted utterance. Iterate it (from any thread) for its frames (32,) as they are
    generated; cancel() frees its row at the next frame boundary."""

    _ids = itertools.count(1)

    def __init__(self, history: List[TokenizedSegment], chunks: List[_Chunk], sampling: Dict[str, float],
                 seed: Optional[int], stop_after_repeats: Optional[int]):
        self.id = next(self._ids)
        self.history = history
        self.chunks = chunks
        self.sampling = sampling
        self.seed = seed if seed is not None else secrets.randbits(63)
        self.stop_after_repeats = stop_after_repeats
        self.frames = 0  # frames delivered so far
        self.prefilled_rows: List[int] = []  # rows run through the backbone before each chunk's first frame
        self.text_tokens = sum(len(c.text_tokens) for c in chunks)
        self.submitted = time.perf_counter()
        self.first_frame: Optional[float] = None  # perf_counter time of the first frame
        self._out: "queue.Queue[Any]" = queue.Queue()
        self._cancelled = threading.Event()
        self._done = False

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


@dataclass
class _Row:
    """A request on the engine thread: where it is in its chunks and what its cache holds."""

    request: Request
    key: mx.array
    chunk: int = 0
    cache: Optional[List[BatchKVCache]] = None  # its own cache while it prefills
    pending: Optional[Tuple[np.ndarray, np.ndarray]] = None  # prompt rows still to prefill
    prompt: Optional[Tuple[np.ndarray, np.ndarray]] = None  # the current chunk's prompt rows
    cached: Optional[Tuple[np.ndarray, np.ndarray]] = None  # rows its cache holds, between chunks
    h: Optional[mx.array] = None  # backbone state for its first frame, once prefilled
    produced: List[np.ndarray] = field(default_factory=list)  # frames of the current chunk, incl. a stop frame
    kept: List[np.ndarray] = field(default_factory=list)  # frames of the current chunk that were delivered
    run: int = 0  # frames in a row with the same codebook-0 code
    prefix_key: Optional[Tuple[bytes, bytes]] = None  # its context's rows, while its cache may come from or go to the store
    context: Optional[int] = None  # rows of its context, while its cache is to be kept at their end


def _common_prefix(a: Tuple[np.ndarray, np.ndarray], b: Tuple[np.ndarray, np.ndarray]) -> int:
    n = min(len(a[0]), len(b[0]))
    same = (a[0][:n] == b[0][:n]).all(axis=1) & (a[1][:n] == b[1][:n]).all(axis=1)
    return n if same.all() else int(np.argmin(same))


def _filter_top_p(logprobs: mx.array, top_p: mx.array) -> mx.array:
    """mlx-lm's top-p filter with one threshold per row (B, 1)."""
    sorted_logprobs = mx.sort(logprobs, axis=-1)
    sorted_probs = mx.exp(sorted_logprobs)
    mass_above = mx.cumsum(sorted_probs, axis=-1, reverse=True, inclusive=False)
    total_mass = mass_above[..., :1] + sorted_probs[..., :1]
    num_dropped = (mass_above >= top_p * total_mass).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(sorted_logprobs, num_dropped, axis=-1)
    return mx.where(logprobs < threshold, -float("inf"), logprobs)


def _filter_top_k(logprobs: mx.array, top_k: mx.array) -> mx.array:
    """Keep each row's top_k (B, 1) ids, as mlx-lm's argpartition filter does."""
    sorted_logprobs = mx.sort(logprobs, axis=-1)
    threshold = mx.take_along_axis(sorted_logprobs, logprobs.shape[-1] - top_k, axis=-1)
    return mx.where(logprobs < threshold, -float("inf"), logprobs)


@dataclass(frozen=True)
class _Filters:
    """Which filters some row of the batch uses: each variant is compiled once."""

    sample: bool
    top_p: bool
    min_p: bool
    top_k: bool


def _sample_rows(filters: _Filters, params: Dict[str, mx.array], logits: mx.array, keys: mx.array):
    """Codes (B,) for one codebook with per-row settings, and the rows' next keys.

    The same operations, in the same order, as make_frame_sampler's mlx-lm chain, and one split
    of the row's key per codebook as mx.random's global state makes: a seeded row gets the codes
    a seeded CSM.generate gets."""
    logits = logits[..., :AUDIO_CODES].astype(mx.float32)
    greedy = mx.argmax(logits, axis=-1)
    if not filters.sample:
        return greedy, keys
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if filters.top_p:
        logprobs = mx.where(params["use_top_p"], _filter_top_p(logprobs, params["top_p"]), logprobs)
    if filters.min_p:
        removed = logprobs < mx.max(logprobs, axis=-1, keepdims=True) + params["log_min_p"]
        logprobs = mx.where(params["use_min_p"] & removed, -float("inf"), logprobs)
    if filters.top_k:
        logprobs = mx.where(params["use_top_k"], _filter_top_k(logprobs, params["top_k"]), logprobs)
    split = mx.vmap(mx.random.split)(keys)
    scaled = logprobs * params["inv_temperature"]
    # categorical cannot be vmapped over keys: one draw per row
    sampled = mx.concatenate([mx.random.categorical(scaled[i : i + 1], key=split[i, 1]) for i in range(keys.shape[0])])
    return mx.where(params["greedy"], greedy, sampled), split[:, 0]


def _frame(model, filters: _Filters, h: mx.array, params: Dict[str, mx.array], keys: mx.array):
    """One frame's codes (B, 32) for the backbone states h (B, D), and the rows' next keys."""
    state = [keys]

    def sampler(logits):
        codes, state[0] = _sample_rows(filters, params, logits, state[0])
        return codes

    return decode_frame(model, h, sampler), state[0]


def _row_params(sampling: Dict[str, float]) -> Dict[str, np.ndarray]:
    temperature, top_k, top_p, min_p = (sampling[k] for k in ("temperature", "top_k", "top_p", "min_p"))
    return {
        "greedy": np.array(temperature == 0),  # (B,) once stacked, like the codes; the rest (B, 1)
        "inv_temperature": np.array([1.0 / temperature if temperature else 1.0], np.float32),
        "use_top_p": np.array([0 < top_p < 1]),
        "top_p": np.array([top_p], np.float32),
        "use_min_p": np.array([min_p != 0]),
        "log_min_p": np.array([np.log(min_p) if min_p else 0.0], np.float32),
        "use_top_k": np.array([0 < top_k < AUDIO_CODES]),
        "top_k": np.array([min(max(top_k, 1), AUDIO_CODES)], np.int32),
    }


def _merge(caches: List[List[BatchKVCache]]) -> List[BatchKVCache]:
    merged = caches[0]
    for cache in caches[1:]:
        for layer, other in zip(merged, cache):
            layer.extend(other)
    return merged


class Engine:
    """Continuous batching over one CSM model; see the module docstring.

    max_batch rows generate (or prefill) at once; up to max_queue more requests wait; beyond
    that submit() raises EngineFull. prefill_chunk is the rows of a joining prompt run per step.
    An idle engine waits admit_wait seconds after a request arrives, for others sent with it.
    The backbone cache of a request's context (up to prefix_cache_rows rows in all, the most
    recently used kept) is reused by the next request with the same context: a server's voice
    prompt is prefilled once, and each request after it runs only its own text."""

    def __init__(self, csm: "CSM", max_batch: int = 8, max_queue: int = 32, prefill_chunk: int = PREFILL_CHUNK,
                 prefix_cache_rows: int = PREFIX_CACHE_ROWS, admit_wait: float = ADMIT_WAIT):
        self.csm = csm
        self.model = csm.model
        self.max_batch = check_options(batch_size=max_batch)["batch_size"]
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be a whole number >= 0, got {max_queue!r}")
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a whole number >= 1, got {prefill_chunk!r}")
        if not isinstance(prefix_cache_rows, int) or prefix_cache_rows < 0:
            raise ValueError(f"prefix_cache_rows must be a whole number >= 0, got {prefix_cache_rows!r}")
        if isinstance(admit_wait, bool) or not isinstance(admit_wait, (int, float)) or not 0 <= admit_wait <= 1:
            raise ValueError(f"admit_wait must be a number of seconds in 0..1, got {admit_wait!r}")
        self.prefix_cache_rows = prefix_cache_rows
        self.admit_wait = admit_wait
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.window = self.model.args.backbone.max_seq_len
        # whether the engine computes on the CPU cores, where other threads of the process compete with it
        self.on_cpu = mx.default_device() == mx.cpu
        # A lazy array belongs to the stream of the thread that made it: evaluate every array the
        # model holds (private ones too, such as RoPE frequencies) so the engine thread can use them.
        mx.eval([v for _, m in self.model.named_modules() for v in m.values() if isinstance(v, mx.array)])
        self._inbox: "queue.Queue[Request]" = queue.Queue()
        self._jobs: "queue.Queue[Tuple[Callable[[], Any], concurrent.futures.Future]]" = queue.Queue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closed = False
        self._wake = threading.Event()
        self._compiled: Dict[_Filters, Any] = {}
        # engine-thread state
        self._rows: List[_Row] = []  # rows in the batch, in cache order
        self._joining: List[_Row] = []  # admitted, prefilling (in order) or prefilled
        self._cache: Optional[List[BatchKVCache]] = None
        self._last: Optional[mx.array] = None  # (B, 32) the batch's last frames
        # context rows (tokens, mask bytes) -> their backbone cache, least recently used first
        self._prefixes: "OrderedDict[Tuple[bytes, bytes], List[KVCache]]" = OrderedDict()
        self.steps = 0
        # MLX streams are per thread: the engine thread does all of the engine's work on its own
        self._stream = mx.new_thread_local_stream(mx.default_device())
        self._thread = threading.Thread(target=self._run, name="csm-engine", daemon=True)
        self._thread.start()

    # any thread
    @property
    def active(self) -> int:
        """Requests holding a row: generating or prefilling."""
        return len(self._rows) + len(self._joining)

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._in_flight - self.active

    def submit(self, text: str, speaker: int = 0, context: Sequence[Union[Segment, TokenizedSegment]] = (), *,
               chunk_chars: int = 250, max_audio_length_ms: Optional[float] = None, temperature: float = 0.9,
               top_k: int = 50, top_p: float = 0.0, min_p: float = 0.0, seed: Optional[int] = None,
               stop_after_repeats: Optional[int] = None) -> Request:
        """Queue text spoken by speaker after the context; arguments as for CSM.generate.

        Context segments with audio are encoded here (Mimi, on the caller's thread); pass
        TokenizedSegments to reuse codes. Bad input, a text that cannot fit the window beside the
        pinned context, and a full queue fail here, before anything is queued."""
        text = check_text(text)
        options = check_options(speaker=speaker, chunk_chars=chunk_chars, max_audio_length_ms=max_audio_length_ms,
                                temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                                stop_after_repeats=stop_after_repeats)
        history = [s if isinstance(s, TokenizedSegment) else self.csm.tokenize(s) for s in context]
        texts = chunk_text(text, options["chunk_chars"]) if options["chunk_chars"] else [text]
        chunks = [_Chunk(self.csm.tokenizer.encode(t, options["speaker"]), frame_cap(t, options["max_audio_length_ms"]))
                  for t in texts]
        for chunk in chunks:  # generated chunks are never pinned, so each fits if it fits beside the pinned context
            fit_context([s.rows for s in history], [s.pinned for s in history],
                        len(chunk.text_tokens) + chunk.max_frames, self.window)
        sampling = {k: options[k] for k in ("temperature", "top_k", "top_p", "min_p")}
        request = Request(history, chunks, sampling, options["seed"], options["stop_after_repeats"])
        with self._lock:
            if self._closed:
                raise EngineError("the engine is closed")
            if self._in_flight >= self.max_batch + self.max_queue:
                raise EngineFull(f"all {self.max_batch} rows are busy and {self.max_queue} requests wait: "
                                 "try again shortly")
            self._in_flight += 1
        self._inbox.put(request)
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

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # engine thread
    def _run(self) -> None:
        with mx.stream(self._stream):
            self._loop()

    def _loop(self) -> None:
        while True:
            idle = not self._rows and not self._joining and self._inbox.empty() and self._jobs.empty()
            if self._closed:
                self._fail_all(EngineError("the engine was closed"))
                while not self._jobs.empty():
                    self._jobs.get_nowait()[1].set_exception(EngineError("the engine was closed"))
                return
            if idle:
                self._wake.wait()
                self._wake.clear()
                time.sleep(self.admit_wait)
                continue
            self._run_jobs()
            try:
                self._admit()
                self._drop_cancelled()
                self._prefill()
                # an empty batch starts once every joiner is prefilled: together, rather than the
                # first ones stepping while the rest are fed in chunks between their steps
                if self._rows or (self._joining and all(row.h is not None for row in self._joining)):
                    self._step()
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
        for row in self._rows + self._joining:
            self._release(row, error)
        while not self._inbox.empty():
            self._release(_Row(self._inbox.get_nowait(), mx.random.key(0)), error)
        self._rows, self._joining, self._cache, self._last = [], [], None, None

    def _release(self, row: _Row, error: Optional[BaseException] = None) -> None:
        row.request._finish(error)
        with self._lock:
            self._in_flight -= 1

    def _admit(self) -> None:
        while self.active < self.max_batch and not self._inbox.empty():
            request = self._inbox.get_nowait()
            row = _Row(request, mx.random.key(request.seed))
            if request.cancelled:
                self._release(row)
                continue
            self._start_chunk(row)
            self._joining.append(row)

    def _drop_cancelled(self) -> None:
        for row in self._joining + self._rows:
            if row.request.cancelled:
                self._release(row)
        self._joining = [row for row in self._joining if not row.request.cancelled]
        keep = [i for i, row in enumerate(self._rows) if not row.request.cancelled]
        if len(keep) < len(self._rows):
            self._keep(keep)

    def _start_chunk(self, row: _Row) -> None:
        """The next chunk's prompt: the history that fits, then its text. Rows its cache already
        holds (the chunk before, as CSM.generate's conversation keeps them, or the same context
        of an earlier request) are not prefilled again."""
        chunk = row.request.chunks[row.chunk]
        history = row.request.history
        keep = fit_context([s.rows for s in history], [s.pinned for s in history],
                           len(chunk.text_tokens) + chunk.max_frames, self.window)
        rows = prompt_rows([history[i] for i in keep], chunk.text_tokens, self.model.args.audio_num_codebooks)
        context = len(rows[0]) - len(chunk.text_tokens)
        cached, row.context, row.prefix_key = 0, None, None
        if row.cache is not None:
            # at least one new row must run through the backbone to predict the first frame
            cached = min(_common_prefix(row.cached, rows), len(rows[0]) - 1)
            for layer in row.cache:
                layer.trim(layer.size() - cached)
        else:
            row.cache = [BatchKVCache([0]) for _ in self.model.backbone.layers]
            if 0 < context <= self.prefix_cache_rows:
                row.prefix_key = (rows[0][:context].tobytes(), rows[1][:context].tobytes())
        row.prompt, row.pending, row.h = rows, (rows[0][cached:], rows[1][cached:]), None
        row.produced, row.kept, row.run = [], [], 0
        row.request.prefilled_rows.append(len(rows[0]) - cached)

    def _take_prefix(self, row: _Row) -> bool:
        """Whether the row can prefill now. Its context's cache, when stored, replaces the
        context's rows; while another joining row prefills the same context, the row waits for it
        (requests with one voice arriving together run it once); else the row keeps its own."""
        key = row.prefix_key
        if key is None or row.context is not None:
            return True
        if key in self._prefixes:
            self._prefixes.move_to_end(key)
            context = self._prefixes[key][0].offset
            row.cache = [BatchKVCache.merge([layer]) for layer in self._prefixes[key]]
            row.pending = (row.pending[0][context:], row.pending[1][context:])
            row.request.prefilled_rows[-1] -= context
            row.prefix_key = None
            return True
        if any(other.prefix_key == key and other.context is not None for other in self._joining):
            return False
        row.context = len(row.prompt[0]) - len(row.request.chunks[row.chunk].text_tokens)
        return True

    def _keep_prefix(self, row: _Row) -> None:
        """Keep the row's cache as it stands, at the end of its context, for later requests."""
        layers = [layer.extract(0) for layer in row.cache]
        mx.eval([(layer.keys, layer.values) for layer in layers])
        self._prefixes[row.prefix_key] = layers
        total = sum(layers[0].offset for layers in self._prefixes.values())
        while total > self.prefix_cache_rows:
            _, dropped = self._prefixes.popitem(last=False)
            total -= dropped[0].offset
        row.context, row.prefix_key = None, None

    def _prefill(self) -> None:
        """One backbone pass over the joining prompts that still have rows to run: each runs its
        next rows, the shorter right-padded (as mlx-lm's BatchGenerator pads prompts), up to a
        budget of rows in all, so requests that arrive together join the batch at the same step."""
        # alone, in CSM.generate's long passes (the fastest); beside running rows, in short chunks
        budget = self.prefill_chunk if self._rows else PREFILL_ROWS
        group: List[_Row] = []
        counts: List[int] = []
        for row in self._joining:
            if row.pending is None or not self._take_prefix(row):
                continue
            n = min(len(row.pending[0]), budget)
            if row.context is not None:  # stop at the end of the context, to keep its cache
                n = min(n, row.context - (len(row.prompt[0]) - len(row.pending[0])))
            if group and (len(group) + 1) * max(counts + [n]) > budget:
                if (len(group) + 1) * max(counts) > budget:
                    continue
                n = min(n, max(counts))  # no wider than the rows already in the pass
            group.append(row)
            counts.append(n)
        if not group:
            return
        width = max(counts)
        tokens = np.zeros((len(group), width) + group[0].pending[0].shape[1:], group[0].pending[0].dtype)
        mask = np.zeros((len(group), width) + group[0].pending[1].shape[1:], group[0].pending[1].dtype)
        for i, (row, n) in enumerate(zip(group, counts)):
            tokens[i, :n], mask[i, :n] = row.pending[0][:n], row.pending[1][:n]
        cache = _merge([row.cache for row in group])
        padding = [width - n for n in counts]
        for layer in cache:
            layer.prepare(right_padding=padding)
        h = self.model.backbone(self.model.embed_rows(mx.array(tokens), mx.array(mask)), cache)
        for layer in cache:
            layer.finalize()
        for i, (row, n) in enumerate(zip(group, counts)):
            if len(group) > 1:
                row.cache = [BatchKVCache.merge([layer.extract(i)]) for layer in cache]
            if row.context == len(row.prompt[0]) - len(row.pending[0]) + n:
                self._keep_prefix(row)
            if n < len(row.pending[0]):
                row.pending = (row.pending[0][n:], row.pending[1][n:])
            else:
                row.h, row.pending = h[i : i + 1, n - 1], None
        mx.eval([row.h for row in group if row.h is not None], [c.state for row in group for c in row.cache])

    def _decoder(self, filters: _Filters):
        if filters not in self._compiled:
            self._compiled[filters] = mx.compile(partial(_frame, self.model, filters))
        return self._compiled[filters]

    def _step(self) -> None:
        """One frame for every row in the batch and every prefilled joiner, which then join it."""
        joiners = [row for row in self._joining if row.h is not None]
        states = []
        if self._rows:
            states.append(self.model.backbone(self.model.embed_frames(self._last[:, None]), self._cache)[:, -1])
        states += [row.h for row in joiners]
        self._cache = _merge(([self._cache] if self._rows else []) + [row.cache for row in joiners])
        self._joining = [row for row in self._joining if row.h is None]
        for row in joiners:
            row.cache, row.h = None, None
        self._rows += joiners
        samplings = [row.request.sampling for row in self._rows]
        filters = _Filters(any(s["temperature"] > 0 for s in samplings),
                           any(0 < s["top_p"] < 1 for s in samplings),
                           any(s["min_p"] != 0 for s in samplings),
                           any(0 < s["top_k"] < AUDIO_CODES for s in samplings))
        params = [_row_params(s) for s in samplings]
        params = {k: mx.array(np.stack([p[k] for p in params])) for k in params[0]}
        keys = mx.stack([row.key for row in self._rows])
        h = mx.concatenate(states) if len(states) > 1 else states[0]
        codes, keys = self._decoder(filters)(h, params, keys)
        mx.eval(codes, keys, [c.state for c in self._cache])
        self.steps += 1
        self._last = codes
        frames = np.array(codes)
        keep = []
        for i, row in enumerate(self._rows):
            row.key = keys[i]
            if self._advance(row, frames[i]):
                keep.append(i)
        if len(keep) < len(self._rows):
            self._keep(keep)

    def _advance(self, row: _Row, frame: np.ndarray) -> bool:
        """Deliver a frame or end the chunk; whether the row stays in the batch."""
        request, chunk = row.request, row.request.chunks[row.chunk]
        row.produced.append(frame)
        stop = not frame.any()  # the reference's end of speech: all 32 codes zero, not delivered
        if not stop:
            row.run = row.run + 1 if row.kept and frame[0] == row.kept[-1][0] else 1
            repeats = request.stop_after_repeats
            stop = repeats is not None and row.run >= repeats
        if not stop and not request.cancelled:
            row.kept.append(frame)
            request._deliver(frame)
            stop = len(row.kept) >= chunk.max_frames
        if not stop and not request.cancelled:
            return True
        self._end_chunk(row)
        return False

    def _end_chunk(self, row: _Row) -> None:
        """The chunk joins the history (as a conversation turn); the next chunk, if any, rejoins
        with its cache as it stands: the prompt, then every frame but the last one produced."""
        request = row.request
        request.history.append(TokenizedSegment(request.chunks[row.chunk].text_tokens, stack_frames(row.kept)))
        row.chunk += 1
        if row.chunk == len(request.chunks) or request.cancelled:
            self._release(row)
            return
        fed = stack_frames(row.produced[:-1])
        frame_tokens, frame_mask = audio_rows(fed)
        row.cached = (np.concatenate([row.prompt[0], frame_tokens[:-1]]),
                      np.concatenate([row.prompt[1], frame_mask[:-1]]))
        index = self._rows.index(row)
        row.cache = [BatchKVCache.merge([layer.extract(index)]) for layer in self._cache]
        self._start_chunk(row)
        self._joining.append(row)

    def _keep(self, keep: List[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache, self._last = None, None
            return
        index = mx.array(keep)
        for layer in self._cache:
            layer.filter(index)
        self._last = self._last[index]
