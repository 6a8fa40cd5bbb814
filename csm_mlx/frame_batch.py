"""The frame core: a batch of rows, each speaking one utterance, stepped one frame at a time.

Every way of generating runs on this class: CSM.generate, stream and frames (one row), a
conversation (one row whose cache is kept across turns), static batches and generate_many
(several rows), and the server's engine (rows joining and leaving as requests come and go).

    batch = FrameBatch(model)
    row = batch.insert(utterance)
    while batch.busy:
        for row, frame in batch.step():   # frame: codes (N,), or None when the row is done
            ...

A row joins by prefilling its prompt (rows it shares with a kept cache are not run again; the
prompts of rows joining together run side by side, right-padded, in passes of PREFILL_ROWS rows,
or PREFILL_CHUNK while other rows are generating, so that they never wait long). Then every step
runs one backbone step over the frames the rows produced last and the depth decoder's steps (31
for csm-1b's 32 codebooks), each row sampled with its own settings and key (csm_mlx.sampling). A
row may ask for fewer codebooks than the model's (utterance.codebooks, a lower quality level): the
depth decoder then stops after the most any row asks for, and each row's frames, delivered and fed
back, hold only its own first N codes. The next frame is queued
before the last one is read back, so the device never waits for the host between frames. A row
ends a chunk at its end of speech (an all-zero frame, not delivered), its frame cap or its repeat
stop; the chunk joins the row's history as a turn, and the next chunk rejoins with the cache as
it stands, as the next turn of a conversation does.

A row's numbers can differ in the last bits with the rows beside it or how its prompt was split
into passes (matrix products and attention sum in an order that depends on the shapes); that
changes a code only where two candidates are tied to the last bits.
"""

from collections import OrderedDict
from functools import partial
from typing import Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache

from .models import Model
from .prompt import Rows, TokenizedSegment, audio_rows, shared_rows, stack_frames
from .sampling import Filters, row_params, sample_codes
from .utterance import KeptCache, Utterance

# Rows of a prompt per backbone pass when no row is generating: on the CPU backend attention
# builds the whole score matrix, and passes of 512 rows were 18% faster for 1500 rows, with less memory.
PREFILL_ROWS = 512
# Rows of joining prompts per step while other rows generate: smaller chunks shorten the longest
# pause a running stream sees while another row joins; larger ones let it join sooner.
PREFILL_CHUNK = 64
# Rows of context (a voice prompt) whose backbone cache a batch keeps for the next row with the
# same context: 64 KiB per row for csm-1b in float32, so 256 MiB.
CONTEXT_CACHE_ROWS = 4096


def decode_frame(model: Model, h: mx.array, sample, n_codebooks: int) -> mx.array:
    """Codes (B, n_codebooks) of one frame from the backbone's last hidden states h (B, D):
    codebook 0 from the backbone's head, then one depth-decoder step per further codebook.
    sample(logits) -> codes."""
    codes = [sample(model.codebook0_head(h))]
    cache = model.decoder.make_cache()
    # The backbone state and codebook 0 enter the depth decoder one position at a time: BLAS
    # runs a product of 2B rows as a (threaded) matrix-matrix product that costs ~3x two of B
    # rows on a CPU; on a GPU one extra small pass is all it costs.
    model.decoder(model.projection(h[:, None]), cache)
    x = model.embed_audio(0, codes[0])[:, None]
    for k in range(1, n_codebooks):
        d = model.decoder(model.projection(x), cache)[:, -1]
        codes.append(sample(model.codebook_logits(k, d)))
        x = model.embed_audio(k, codes[-1])[:, None]
    return mx.stack(codes, axis=1)


def _frame(model: Model, filters: Filters, n_codebooks: int, h: mx.array, params: Dict[str, mx.array],
           keys: mx.array):
    keys = [keys]

    def sample(logits):
        codes, keys[0] = sample_codes(filters, params, logits, keys[0])
        return codes

    return decode_frame(model, h, sample, n_codebooks), keys[0]


def frame_step(model: Model, filters: Filters, rows: int, n_codebooks: Optional[int] = None):
    """(h, params, keys) -> (codes (B, n_codebooks), next keys): one frame of rows rows (the first
    n_codebooks codes of it; None: all of the model's). A
    frame's depth-decoder steps always have the same shapes (the cache starts empty every
    frame), so they trace into one compiled graph per batch size; the model keeps one per
    filter variant and number of codebooks.

    The first frame of a batch size runs uncompiled: tracing is host work (0.1 s on a tiny
    model, ~0.5 s on csm-1b), so a process's first frame (the first audio of every CLI run)
    does not wait for it; the next frame traces."""
    n_codebooks = n_codebooks or model.args.audio_num_codebooks
    compiled = model.__dict__.setdefault("_compiled_frames", {})  # not a Module attribute: no parameters
    variant = (filters, n_codebooks)
    if variant not in compiled:
        compiled[variant] = (mx.compile(partial(_frame, model, filters, n_codebooks)), set())
    step, traced = compiled[variant]
    if rows in traced:
        return step
    traced.add(rows)
    return partial(_frame, model, filters, n_codebooks)


class Row:
    """One utterance in the batch. done is set when the last chunk ends (or the row was removed);
    then kept holds its cache when the utterance asked, and key its random key as it stands."""

    def __init__(self, utterance: Utterance, model_codebooks: int):
        self.utterance = utterance
        self.model_codebooks = model_codebooks
        self.codebooks = utterance.codebooks or model_codebooks  # codes in each of its frames
        self.key = utterance.key
        self.chunk = 0
        self.done = False
        self.kept: Optional[KeptCache] = None
        self._cache: Optional[List[BatchKVCache]] = None  # its own, while it joins
        self._prompt: Optional[Rows] = None  # the current chunk's prompt rows
        self._pending: Optional[Rows] = None  # prompt rows still to prefill
        self._h: Optional[mx.array] = None  # backbone state for its first frame, once prefilled
        self._produced: List[np.ndarray] = []  # the chunk's frames, incl. a stop frame
        self._fed = 0  # how many of them the cache holds
        self._spoken: List[np.ndarray] = []  # the chunk's delivered frames
        self._run = 0  # frames in a row with the same codebook-0 code
        self._context_key: Optional[Tuple[bytes, bytes]] = None  # its context's rows, while the store may serve it
        self._context: Optional[int] = None  # rows of its context, while its cache is to be stored at their end

    def _held_rows(self) -> Rows:
        """The rows its cache holds: the prompt (less what is still to prefill), then the frames fed back."""
        tokens, mask = self._prompt
        if self._pending is not None:
            n = len(tokens) - len(self._pending[0])
            return tokens[:n], mask[:n]
        frames = audio_rows(stack_frames(self._produced[: self._fed], self.codebooks), self.model_codebooks)
        return np.concatenate([tokens, frames[0][:-1]]), np.concatenate([mask, frames[1][:-1]])


def _one_row_cache(layers: List[KVCache], rows: int) -> List[BatchKVCache]:
    """A joining row's own cache: a copy of the first rows of layers (the store's or a kept
    cache stay as they are)."""
    if rows == 0:
        return [BatchKVCache([0]) for _ in layers]
    caches = []
    for layer in layers:
        first = KVCache()
        first.keys, first.values, first.offset = layer.keys[..., :rows, :], layer.values[..., :rows, :], rows
        caches.append(BatchKVCache.merge([first]))
    return caches


def _merge(caches: List[List[BatchKVCache]]) -> List[BatchKVCache]:
    merged = caches[0]
    for cache in caches[1:]:
        for layer, other in zip(merged, cache):
            layer.extend(other)
    return merged


class FrameBatch:
    """Rows generating together over one model; see the module docstring.

    prefill_rows and prefill_chunk: prompt rows per pass when no row generates, and while some do.
    context_cache_rows: rows of context caches kept for later rows with the same context (0: none)."""

    def __init__(self, model: Model, *, prefill_rows: int = PREFILL_ROWS, prefill_chunk: int = PREFILL_CHUNK,
                 context_cache_rows: int = 0):
        self.model = model
        self.window = model.args.backbone.max_seq_len
        self.prefill_rows = prefill_rows
        self.prefill_chunk = prefill_chunk
        self.context_cache_rows = context_cache_rows
        self.steps = 0
        self._rows: List[Row] = []  # generating, in cache order
        self._joining: List[Row] = []  # prefilling, or prefilled and waiting to join
        self._cache: Optional[List[BatchKVCache]] = None
        # (codes (B, N), keys after them) of the generating rows' last frames, queued, not read yet
        self._queued: Optional[Tuple[mx.array, mx.array]] = None
        self._unread = False  # whether _queued's codes are still to be delivered
        # of _rows, made when they change: filters, per-row parameters, codebooks to generate
        self._sampling: Optional[Tuple[Filters, Dict[str, mx.array], int]] = None
        # context rows (tokens, mask bytes) -> their cache, least recently used first
        self._contexts: "OrderedDict[Tuple[bytes, bytes], List[KVCache]]" = OrderedDict()

    @property
    def size(self) -> int:
        """Rows in the batch: generating or joining."""
        return len(self._rows) + len(self._joining)

    @property
    def busy(self) -> bool:
        return self.size > 0

    def insert(self, utterance: Utterance) -> Row:
        """Add a row for the utterance; it starts generating at a later step."""
        row = Row(utterance, self.model.args.audio_num_codebooks)
        self._start_chunk(row, utterance.kept)
        self._joining.append(row)
        return row

    def remove(self, row: Row) -> None:
        """Take a row out now (cancelled, or its reader stopped): the frames it delivered of its
        chunk join its history, and with utterance.keep_cache its cache is kept."""
        if row.done:
            return
        if row in self._joining:  # nothing of its chunk was spoken yet
            self._joining.remove(row)
            keep = row.utterance.keep_cache and row._cache[0].keys is not None
            kept = KeptCache([layer.extract(0) for layer in row._cache], row._held_rows()) if keep else None
            self._finish(row, kept, end_chunk=False)
            return
        index = self._rows.index(row)
        self._finish(row, self._extract(index) if row.utterance.keep_cache else None, end_chunk=True)
        self._keep([i for i in range(len(self._rows)) if i != index])

    def step(self) -> List[Tuple[Row, Optional[np.ndarray]]]:
        """One prefill pass for joining rows, and one frame for every generating row: the
        frames (N,) delivered, and (row, None) for each row that is done."""
        events: List[Tuple[Row, Optional[np.ndarray]]] = []
        self._prefill()
        joiners = [row for row in self._joining if row._h is not None]
        # an empty batch starts once every joiner is prefilled: together, rather than the first
        # ones stepping while the rest are fed in chunks between their steps
        if not self._rows and (not joiners or len(joiners) < len(self._joining)):
            return events
        if self._unread and (any(not row._produced for row in self._rows)
                             or not joiners and all(self._last_by_cap(row) for row in self._rows)):
            # read before queueing more: a row's first frame goes out at once (not after the next
            # frame's graph, or its trace, is built), or every row ends with this frame
            self._read(self._rows, self._queued, events)
            return events
        reading, unread = self._rows, self._queued if self._unread else None
        self._queue(joiners)
        if unread is not None:
            self._read(reading, unread, events)
        return events

    def _read(self, reading: List[Row], queued: Tuple[mx.array, mx.array], events) -> None:
        """Deliver the frames queued for the rows reading (the first rows of the batch)."""
        frames = np.array(queued[0])
        if queued is self._queued:
            self._unread = False
        keep = []
        for i, row in enumerate(reading):
            row.key = queued[1][i]
            if self._advance(row, frames[i, : row.codebooks], events):
                keep.append(i)
            elif not row.done:
                self._leave_for_next_chunk(row, i)
        self._keep(keep + list(range(len(reading), len(self._rows))))

    def drain(self) -> Iterator[Tuple[Row, Optional[np.ndarray]]]:
        """Step until every row is done."""
        while self.busy:
            yield from self.step()

    # chunks
    def _start_chunk(self, row: Row, kept: Optional[KeptCache]) -> None:
        """The next chunk's prompt; rows a kept cache shares with it are not prefilled again."""
        utterance = row.utterance
        chunk = utterance.chunks[row.chunk]
        rows = utterance.prompt(chunk, self.model.args.audio_num_codebooks, self.window)
        context = len(rows[0]) - len(chunk.text_tokens)
        shared, row._context, row._context_key = 0, None, None
        if kept is not None:
            # at least one new row must run through the backbone to predict the first frame
            shared = min(shared_rows(kept.rows, rows), len(rows[0]) - 1)
            row._cache = _one_row_cache(kept.layers, shared)
        else:
            row._cache = [BatchKVCache([0]) for _ in self.model.backbone.layers]
            if 0 < context <= self.context_cache_rows:
                row._context_key = (rows[0][:context].tobytes(), rows[1][:context].tobytes())
        row._prompt, row._pending, row._h = rows, (rows[0][shared:], rows[1][shared:]), None
        row._produced, row._fed, row._spoken, row._run = [], 0, [], 0
        utterance.prefilled_rows.append(len(rows[0]) - shared)

    def _advance(self, row: Row, frame: np.ndarray, events) -> bool:
        """Deliver a frame or end the chunk; whether the row goes on generating."""
        utterance, chunk = row.utterance, row.utterance.chunks[row.chunk]
        row._produced.append(frame)
        stop = not frame.any()  # the reference's end of speech: all codes zero, not delivered
        if not stop:
            row._run = row._run + 1 if row._spoken and frame[0] == row._spoken[-1][0] else 1
            stop = utterance.stop_after_repeats is not None and row._run >= utterance.stop_after_repeats
        if not stop:
            row._spoken.append(frame)
            events.append((row, frame))
            stop = len(row._spoken) >= chunk.max_frames
        if not stop:
            return True
        last = row.chunk + 1 == len(utterance.chunks)
        if last:
            kept = self._extract(self._rows.index(row)) if utterance.keep_cache else None
            self._finish(row, kept, end_chunk=True)
            events.append((row, None))
        return False

    def _last_by_cap(self, row: Row) -> bool:
        return len(row._spoken) + 1 >= row.utterance.chunks[row.chunk].max_frames

    def _leave_for_next_chunk(self, row: Row, index: int) -> None:
        """The chunk joins the history; the row rejoins with its cache as it stands."""
        kept = self._extract(index)
        self._end_chunk(row)
        row.chunk += 1
        self._start_chunk(row, kept)
        self._joining.append(row)

    def _end_chunk(self, row: Row) -> None:
        chunk = row.utterance.chunks[row.chunk]
        row.utterance.history.append(TokenizedSegment(chunk.text_tokens, stack_frames(row._spoken, row.codebooks)))

    def _finish(self, row: Row, kept: Optional[KeptCache], end_chunk: bool) -> None:
        if end_chunk:
            self._end_chunk(row)
        row.kept = kept
        row.done = True

    def _extract(self, index: int) -> KeptCache:
        """The cache of generating row index, as it stands, and the rows it holds."""
        return KeptCache([layer.extract(index) for layer in self._cache], self._rows[index]._held_rows())

    # prefill
    def _take_context(self, row: Row) -> bool:
        """Whether the row can prefill now. Its context's stored cache, if any, replaces the
        context's rows; while another joining row prefills the same context, the row waits for
        it (rows with one voice arriving together run it once); else it will store its own."""
        key = row._context_key
        if key is None or row._context is not None:
            return True
        if key in self._contexts:
            self._contexts.move_to_end(key)
            layers = self._contexts[key]
            context = layers[0].offset
            row._cache = _one_row_cache(layers, context)
            row._pending = (row._pending[0][context:], row._pending[1][context:])
            row.utterance.prefilled_rows[-1] -= context
            row._context_key = None
            return True
        if any(other._context_key == key and other._context is not None for other in self._joining):
            return False
        row._context = len(row._prompt[0]) - len(row.utterance.chunks[row.chunk].text_tokens)
        return True

    def _store_context(self, row: Row) -> None:
        """Keep the row's cache as it stands, at the end of its context, for later rows."""
        layers = [layer.extract(0) for layer in row._cache]
        mx.eval([(layer.keys, layer.values) for layer in layers])
        self._contexts[row._context_key] = layers
        total = sum(layers[0].offset for layers in self._contexts.values())
        while total > self.context_cache_rows:
            _, dropped = self._contexts.popitem(last=False)
            total -= dropped[0].offset
        row._context, row._context_key = None, None

    def _prefill(self) -> None:
        """One backbone pass over the joining prompts that still have rows to run: each runs its
        next rows, the shorter right-padded, up to a budget of rows in all."""
        budget = self.prefill_chunk if self._rows else self.prefill_rows
        group: List[Row] = []
        counts: List[int] = []
        for row in self._joining:
            if row._pending is None or not self._take_context(row):
                continue
            n = min(len(row._pending[0]), budget)
            if row._context is not None:  # stop at the end of the context, to store its cache
                n = min(n, row._context - (len(row._prompt[0]) - len(row._pending[0])))
            if group and (len(group) + 1) * max(counts + [n]) > budget:
                if (len(group) + 1) * max(counts) > budget:
                    continue
                n = min(n, max(counts))  # no wider than the rows already in the pass
            group.append(row)
            counts.append(n)
        if not group:
            return
        width = max(counts)
        tokens = np.zeros((len(group), width) + group[0]._pending[0].shape[1:], np.int32)
        mask = np.zeros((len(group), width) + group[0]._pending[1].shape[1:], bool)
        for i, (row, n) in enumerate(zip(group, counts)):
            tokens[i, :n], mask[i, :n] = row._pending[0][:n], row._pending[1][:n]
        cache = _merge([row._cache for row in group])
        for layer in cache:
            layer.prepare(right_padding=[width - n for n in counts])
        h = self.model.backbone(self.model.embed_rows(mx.array(tokens), mx.array(mask)), cache)
        for layer in cache:
            layer.finalize()
        for i, (row, n) in enumerate(zip(group, counts)):
            if len(group) > 1:
                row._cache = [BatchKVCache.merge([layer.extract(i)]) for layer in cache]
            if row._context == len(row._prompt[0]) - len(row._pending[0]) + n:
                self._store_context(row)
            if n < len(row._pending[0]):
                row._pending = (row._pending[0][n:], row._pending[1][n:])
            else:
                row._h, row._pending = h[i : i + 1, n - 1], None
        mx.async_eval([row._h for row in group if row._h is not None], [c.state for row in group for c in row._cache])

    # frames
    def _queue(self, joiners: List[Row]) -> None:
        """Queue the next frame of every generating row (fed its last frame) and of the joiners."""
        states, keys = [], []
        if self._rows:
            codes, keys_after = self._queued
            counts = [row.codebooks for row in self._rows]
            per_row = None if min(counts) == codes.shape[1] else mx.array(counts)
            fed = self.model.embed_frames(codes[:, None], per_row)
            states.append(self.model.backbone(fed, self._cache)[:, -1])
            keys.append(keys_after)
            for row in self._rows:
                row._fed += 1
        states += [row._h for row in joiners]
        keys += [row.key[None] for row in joiners]
        self._cache = _merge(([self._cache] if self._rows else []) + [row._cache for row in joiners])
        self._joining = [row for row in self._joining if row._h is None]
        for row in joiners:
            row._cache, row._h = None, None
        if joiners:
            self._rows, self._sampling = self._rows + joiners, None
        if self._sampling is None:
            samplings = [row.utterance.sampling for row in self._rows]
            n_codebooks = max(row.codebooks for row in self._rows)
            self._sampling = Filters.of(samplings), row_params(samplings), n_codebooks
        filters, params, n_codebooks = self._sampling
        h = mx.concatenate(states) if len(states) > 1 else states[0]
        keys = mx.concatenate(keys) if len(keys) > 1 else keys[0]
        codes, keys = frame_step(self.model, filters, len(self._rows), n_codebooks)(h, params, keys)
        mx.async_eval(codes, keys)
        self._queued, self._unread = (codes, keys), True
        self.steps += 1

    def _keep(self, keep: List[int]) -> None:
        """Keep only these generating rows (indices into the batch, in order)."""
        if len(keep) == len(self._rows):
            return
        self._rows, self._sampling = [self._rows[i] for i in keep], None
        if not keep:
            self._cache, self._queued, self._unread = None, None, False
            return
        index = mx.array(keep)
        for layer in self._cache:
            layer.filter(index)
        if self._queued is not None:
            self._queued = (self._queued[0][index], self._queued[1][index])
