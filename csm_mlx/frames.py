"""Prompt rows and the frame loop: backbone -> codebook 0 -> 31 depth-decoder steps -> next frame."""

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.sample_utils import make_sampler

from .models import Model
# ids 2048..2050 of the 2051-id audio vocabulary are not audio (AUDIO_CODES), so they are
# never sampled: Mimi would fail on them.
from .options import AUDIO_CODES, check_options
# Long prompts are prefilled in passes of this many rows: on the CPU backend attention builds the
# whole score matrix, and passes of 512 rows were 18% faster for 1500 rows, with less memory.
PREFILL_ROWS = 512
# sampling settings whose compiled frame decoder a model keeps
COMPILED_DECODERS = 16

Sampler = Callable[[mx.array], mx.array]


@dataclass
class TokenizedSegment:
    """One context turn: its text token ids and, optionally, its Mimi codes (32, T)."""

    text_tokens: Sequence[int]
    audio_codes: Optional[np.ndarray] = None
    pinned: bool = False  # a voice prompt: never dropped to fit the window

    @property
    def rows(self) -> int:
        """Prompt rows: one per text token; per audio frame plus the end-of-audio row."""
        audio = 0 if self.audio_codes is None else np.shape(self.audio_codes)[1] + 1
        return len(self.text_tokens) + audio


def text_rows(text_tokens: Sequence[int], n_codebooks: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(text_tokens), n_codebooks + 1), np.int32)
    mask = np.zeros(tokens.shape, bool)
    tokens[:, -1] = text_tokens
    mask[:, -1] = True
    return tokens, mask


def audio_rows(codes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Rows for Mimi codes (32, T): one per frame, then the all-zero end-of-audio row."""
    n_codebooks, n_frames = codes.shape
    tokens = np.zeros((n_frames + 1, n_codebooks + 1), np.int32)
    mask = np.zeros(tokens.shape, bool)
    tokens[:n_frames, :-1] = codes.T
    mask[:, :-1] = True
    return tokens, mask


def prompt_rows(
    context: Sequence[TokenizedSegment], text_tokens: Sequence[int], n_codebooks: int = 32
) -> Tuple[np.ndarray, np.ndarray]:
    """The reference prompt: each context segment's text rows then audio rows, then the new text."""
    parts = []
    for segment in context:
        parts.append(text_rows(segment.text_tokens, n_codebooks))
        if segment.audio_codes is not None:
            parts.append(audio_rows(np.asarray(segment.audio_codes)))
    parts.append(text_rows(text_tokens, n_codebooks))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@lru_cache(maxsize=COMPILED_DECODERS)
def make_frame_sampler(
    temperature: float = 0.9, top_k: int = 50, top_p: float = 0.0, min_p: float = 0.0
) -> Sampler:
    """A sampler over the decodable audio ids, used for all codebooks (as the reference does).

    temperature 0 is greedy. Filters are mlx-lm's; they expect log-probabilities."""
    checked = check_options(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    temperature, top_k, top_p, min_p = (checked[k] for k in ("temperature", "top_k", "top_p", "min_p"))
    if temperature == 0:
        return lambda logits: mx.argmax(logits[..., :AUDIO_CODES], axis=-1)
    sample = make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k)

    def sampler(logits: mx.array) -> mx.array:
        logits = logits[..., :AUDIO_CODES].astype(mx.float32)
        return sample(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    return sampler


def decode_frame(model: Model, h: mx.array, sampler: Sampler, with_logits: bool = False):
    """Codes (B, 32) of one frame from the backbone's last hidden state h (B, D), and with
    with_logits also the logits (B, 32, vocab) each codebook was sampled from."""
    logits = [model.codebook0_head(h)]
    codes = [sampler(logits[0])]
    cache = model.decoder.make_cache()
    x = mx.stack([h, model.embed_audio(0, codes[0])], axis=1)
    if h.shape[0] == 1:
        # One row at a time: MKL runs a 2-row product as a threaded sgemm that costs ~3x a
        # matrix-vector product. Only position 0's keys and values are kept (lazily, the rest
        # of its pass is never computed).
        model.decoder(model.projection(x[:, :1]), cache)
        x = x[:, 1:]
    for k in range(1, model.args.audio_num_codebooks):
        d = model.decoder(model.projection(x), cache)[:, -1]
        logits.append(model.codebook_logits(k, d))
        codes.append(sampler(logits[-1]))
        x = model.embed_audio(k, codes[-1])[:, None]
    codes = mx.stack(codes, axis=1)
    return (codes, mx.stack(logits, axis=1)) if with_logits else codes


def frame_decoder(model: Model, sampler: Sampler, compiled: bool = True, with_logits: bool = False):
    """decode_frame for this model and sampler. Compiled, a frame's 31 depth-decoder steps
    (always the same shapes: the cache starts empty every frame) trace into one graph; the
    random state is threaded through it, so seeded sampling gives the same codes either way.

    Compiling costs ~0.4 s, so the model keeps its last COMPILED_DECODERS compiled decoders,
    one per sampler (make_frame_sampler gives the same sampler for the same settings)."""
    decode = partial(decode_frame, model, sampler=sampler, with_logits=with_logits)
    if not compiled:
        return decode
    # in the instance's __dict__, not as a Module attribute, which would join the parameter tree
    kept = model.__dict__.setdefault("_compiled_frame_decoders", OrderedDict())
    key = (sampler, with_logits)
    if key not in kept:
        kept[key] = mx.compile(decode, inputs=mx.random.state, outputs=mx.random.state)
        if len(kept) > COMPILED_DECODERS:
            kept.popitem(last=False)
    kept.move_to_end(key)
    return kept[key]


def prefill(model: Model, x: mx.array, cache: List[Any]) -> mx.array:
    """Run prompt rows x (B, S, D) through the backbone into cache, PREFILL_ROWS at a time;
    the backbone's output for the last pass."""
    for start in range(0, x.shape[1], PREFILL_ROWS):
        h = model.backbone(x[:, start : start + PREFILL_ROWS], cache)
        if start + PREFILL_ROWS < x.shape[1]:
            mx.eval([c.state for c in cache])
    return h


def generate_frames(
    model: Model,
    tokens: np.ndarray,
    mask: np.ndarray,
    sampler: Sampler,
    max_frames: int,
    compiled: bool = True,
    cache: Optional[List[Any]] = None,
) -> Iterator[np.ndarray]:
    """Yield frames (32,) int codes until the end-of-speech frame or max_frames.

    End of speech is the reference's: a frame whose codes are all zero, not yielded.
    With a backbone cache that already holds earlier rows, tokens/mask are the rows that
    follow them; the generated frames are appended to the cache as they are fed back."""
    for codes, _ in generate_batch_frames(model, [(tokens, mask)], sampler, max_frames, compiled, cache):
        yield codes[0]


def generate_batch_frames(
    model: Model,
    prompts: Sequence[Tuple[np.ndarray, np.ndarray]],
    sampler: Sampler,
    max_frames: int,
    compiled: bool = True,
    cache: Optional[List[Any]] = None,
) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Generate for several prompts (tokens, mask) at once; yield (frames (B, 32), active (B,)).

    Each step reads the weights once for the whole batch, so B utterances cost little more
    than one. Prompts are left-padded; each item keeps its own positions, so (greedy) it gets
    the frames it gets alone. An item is done after its end-of-speech frame (all zeros, marked
    inactive from then on); iteration stops when every item is done. The next frame is queued
    before the current one is read back, so the device never waits for the host between frames.
    """
    limit = model.args.backbone.max_seq_len
    cached = cache[0].offset if cache is not None else 0
    longest = cached + max(len(t) for t, _ in prompts)
    if longest + max_frames > limit:
        raise ValueError(
            f"prompt of {longest} rows plus {max_frames} frames exceeds the model's "
            f"{limit}-row window: shorten the context or the maximum audio length"
        )
    padding = [longest - cached - len(t) for t, _ in prompts]
    tokens = np.stack([np.pad(t, ((p, 0), (0, 0))) for (t, _), p in zip(prompts, padding)])
    mask = np.stack([np.pad(m, ((p, 0), (0, 0))) for (_, m), p in zip(prompts, padding)])
    decode = frame_decoder(model, sampler, compiled)
    if cache is None:
        # Without padding (one prompt, or equal lengths) the plain cache needs no per-step mask.
        cache = [BatchKVCache(padding) for _ in model.backbone.layers] if any(padding) else model.backbone.make_cache()
    elif len(prompts) > 1:
        raise ValueError("continuing from a cache takes a single prompt")
    h = prefill(model, model.embed_rows(mx.array(tokens), mx.array(mask)), cache)
    frame = decode(h[:, -1])
    mx.async_eval(frame)
    active = np.ones(len(prompts), bool)
    next_frame = None
    for i in range(max_frames):
        if i + 1 < max_frames:
            h = model.backbone(model.embed_frames(frame[:, None]), cache)
            next_frame = decode(h[:, -1])
            mx.async_eval(next_frame)
        codes = np.array(frame)
        active &= codes.any(axis=1)
        if not active.any():
            return
        yield codes, active.copy()
        frame = next_frame


def seeded_sampler(temperature: float, top_k: int, top_p: float, min_p: float, seed: Optional[int]) -> Sampler:
    sampler = make_frame_sampler(temperature, top_k, top_p, min_p)
    if seed is not None:
        mx.random.seed(seed)
    return sampler


def frames(
    model: Model,
    text_tokens: Sequence[int],
    context: Sequence[TokenizedSegment] = (),
    *,
    max_frames: int = 125,
    temperature: float = 0.9,
    top_k: int = 50,
    top_p: float = 0.0,
    min_p: float = 0.0,
    seed: Optional[int] = None,
) -> Iterator[np.ndarray]:
    """Frames (32,) of text_tokens spoken after the context, as they are generated."""
    tokens, mask = prompt_rows(context, text_tokens, model.args.audio_num_codebooks)
    sampler = seeded_sampler(temperature, top_k, top_p, min_p, seed)
    return generate_frames(model, tokens, mask, sampler, max_frames)


def generate(
    model: Model,
    text_tokens: Sequence[int],
    context: Sequence[TokenizedSegment] = (),
    *,
    on_frame: Optional[Callable[[int], None]] = None,
    **sampling,
) -> np.ndarray:
    """Mimi codes (32, T) of text_tokens spoken after the context; sampling as for frames().

    on_frame(n) is called after the n-th frame (for progress displays)."""
    codes: List[np.ndarray] = []
    for frame in frames(model, text_tokens, context, **sampling):
        codes.append(frame)
        if on_frame is not None:
            on_frame(len(codes))
    return stack_frames(codes, model.args.audio_num_codebooks)


def generate_batch(
    model: Model,
    prompts: Sequence[Tuple[np.ndarray, np.ndarray]],
    *,
    max_frames: Union[int, Sequence[int]] = 125,
    temperature: float = 0.9,
    top_k: int = 50,
    top_p: float = 0.0,
    min_p: float = 0.0,
    seed: Optional[int] = None,
) -> List[np.ndarray]:
    """Mimi codes (32, T_i) for several prompts (tokens, mask) generated together.

    max_frames is one cap for all or one per prompt. Greedy, each item gets the frames it
    gets alone; each stops at its own end of speech or cap."""
    caps = [max_frames] * len(prompts) if isinstance(max_frames, int) else list(max_frames)
    sampler = seeded_sampler(temperature, top_k, top_p, min_p, seed)
    codes: List[List[np.ndarray]] = [[] for _ in prompts]
    for step, (batch, active) in enumerate(generate_batch_frames(model, prompts, sampler, max(caps))):
        for i in np.flatnonzero(active):
            if step < caps[i]:
                codes[i].append(batch[i])
    return [stack_frames(c, model.args.audio_num_codebooks) for c in codes]


def stack_frames(frames: Sequence[np.ndarray], n_codebooks: int = 32) -> np.ndarray:
    """Frames (32,) as codes (32, T); T may be 0."""
    return np.stack(frames, axis=1) if len(frames) else np.zeros((n_codebooks, 0), np.int32)
