"""What one row of the frame batch speaks: a text's chunks, each after the context and the
chunks before it, with the row's sampling settings and random key.

Building one checks everything a caller can get wrong (text, options, whether each chunk fits
the window beside the pinned context) before any work starts.
"""

import secrets
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from .audio import check_context_audio
from .context import fit_context
from .options import OptionError, check_options, check_text
from .prompt import Rows, TokenizedSegment, prompt_rows
from .sampling import Sampling
from .segment import Segment, check_speaker
from .text import chunk_text, frame_cap


@dataclass
class Chunk:
    text_tokens: List[int]
    max_frames: int


@dataclass
class KeptCache:
    """One row's backbone cache and the prompt rows it holds: a later prompt that starts with the
    same rows (the next turn of a conversation, the next chunk of a text) prefills only the rest."""

    layers: List[KVCache]
    rows: Rows


@dataclass
class Utterance:
    history: List[TokenizedSegment]  # the context; each spoken chunk joins it as a turn
    chunks: List[Chunk]
    sampling: Sampling
    key: mx.array  # the row's random key, split once per codebook
    stop_after_repeats: Optional[int] = None  # frames in a row with the same codebook-0 code that end a chunk
    codebooks: Optional[int] = None  # codes per frame to generate; None: all of the model's
    kept: Optional[KeptCache] = None  # a cache to start from (the conversation's so far)
    keep_cache: bool = False  # whether the row's cache is kept when it is done, for a next turn
    prefilled_rows: List[int] = field(default_factory=list)  # rows run through the backbone before each chunk

    def prompt(self, chunk: Chunk, n_codebooks: int, window: int) -> Rows:
        return chunk_prompt(self.history, chunk, n_codebooks, window)


def chunk_prompt(history: Sequence[TokenizedSegment], chunk: Chunk, n_codebooks: int, window: int) -> Rows:
    """A chunk's prompt rows: the history that fits the window beside it, then its text."""
    keep = fit_context([s.rows for s in history], [s.pinned for s in history],
                       len(chunk.text_tokens) + chunk.max_frames, window)
    return prompt_rows([history[i] for i in keep], chunk.text_tokens, n_codebooks)


def random_key(seed: Optional[int] = None) -> mx.array:
    """The key of a row seeded with seed, or of a fresh random one."""
    return mx.random.key(secrets.randbits(63) if seed is None else seed)


def tokenize_segment(tokenizer, mimi, segment: Segment) -> TokenizedSegment:
    """A context turn as the model reads it: its text's tokens and its audio's Mimi codes."""
    check_speaker(segment.speaker)
    check_text(segment.text, "context text")
    codes = None
    if segment.audio is not None:
        codes = mimi.encode(check_context_audio(segment.audio, f"context audio of speaker {segment.speaker}"))
    return TokenizedSegment(tokenizer.encode(segment.text, segment.speaker), codes, segment.pinned)


def make_utterance(tokenizer, mimi, text: str, speaker: int = 0,
                   context: Sequence[Union[Segment, TokenizedSegment]] = (), *, window: int,
                   chunk_chars: int = 250, max_audio_length_ms: Optional[float] = None, temperature: float = 0.9,
                   top_k: int = 50, top_p: float = 0.0, min_p: float = 0.0, seed: Optional[int] = None,
                   stop_after_repeats: Optional[int] = None, codebooks: Optional[int] = None,
                   key: Optional[mx.array] = None) -> Utterance:
    """text spoken by speaker after the context (Segments are encoded here; TokenizedSegments are
    taken as they are). Text longer than chunk_chars (0: never) is spoken in sentence chunks.
    Each chunk stops at the model's end of speech, at its frame cap (max_audio_length_ms, or
    one from its length) or after stop_after_repeats frames with the same codebook-0 code.
    seed (else key, else a random one) makes sampling repeatable. codebooks: generate only the
    first N of each frame's codes (the model's own count is mimi.num_codebooks). Raises on bad input, and
    ContextError when a chunk cannot fit the window beside the pinned context."""
    text = check_text(text)
    options = check_options(speaker=speaker, chunk_chars=chunk_chars, max_audio_length_ms=max_audio_length_ms,
                            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                            stop_after_repeats=stop_after_repeats, codebooks=codebooks)
    if options["codebooks"] is not None and options["codebooks"] > mimi.num_codebooks:
        raise OptionError("codebooks", f"must be at most {mimi.num_codebooks} (the model's), got {options['codebooks']}")
    sampling = Sampling(*(options[k] for k in ("temperature", "top_k", "top_p", "min_p")))
    history = [s if isinstance(s, TokenizedSegment) else tokenize_segment(tokenizer, mimi, s) for s in context]
    texts = chunk_text(text, options["chunk_chars"]) if options["chunk_chars"] else [text]
    chunks = [Chunk(tokenizer.encode(t, options["speaker"]), frame_cap(t, options["max_audio_length_ms"]))
              for t in texts]
    pinned = [s for s in history if s.pinned]
    for chunk in chunks:  # spoken chunks are never pinned: a chunk fits if it fits beside the pinned context
        fit_context([s.rows for s in pinned], [True] * len(pinned), len(chunk.text_tokens) + chunk.max_frames, window)
    if options["seed"] is not None or key is None:
        key = random_key(options["seed"])
    return Utterance(history, chunks, sampling, key, options["stop_after_repeats"], options["codebooks"])
