"""Prompt rows: the backbone's input layout (the reference's), one row per text token or audio frame.

A row has K + 1 columns (33 for csm-1b): the model's K codebooks of an audio frame, then one
text token; its mask says which columns are on. A frame generated with fewer codebooks than the
model's (a lower quality level) has the rest off. Pure numpy: rows are built on the host and handed to the model.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

Rows = Tuple[np.ndarray, np.ndarray]  # tokens (S, K + 1) int32, mask (S, K + 1) bool


@dataclass
class TokenizedSegment:
    """One context turn: its text token ids and, optionally, its Mimi codes (codebooks, T)."""

    text_tokens: Sequence[int]
    audio_codes: Optional[np.ndarray] = None
    pinned: bool = False  # a voice prompt: never dropped to fit the window

    @property
    def rows(self) -> int:
        """Prompt rows: one per text token; per audio frame plus the end-of-audio row."""
        audio = 0 if self.audio_codes is None else np.shape(self.audio_codes)[1] + 1
        return len(self.text_tokens) + audio


def text_rows(text_tokens: Sequence[int], n_codebooks: int = 32) -> Rows:
    tokens = np.zeros((len(text_tokens), n_codebooks + 1), np.int32)
    mask = np.zeros(tokens.shape, bool)
    tokens[:, -1] = text_tokens
    mask[:, -1] = True
    return tokens, mask


def audio_rows(codes: np.ndarray, n_codebooks: int = 32) -> Rows:
    """Rows for Mimi codes (N, T), N <= n_codebooks: one per frame, then the all-zero
    end-of-audio row; the codebooks past N are off."""
    given, n_frames = codes.shape
    if given > n_codebooks:
        raise ValueError(f"codes of {given} codebooks do not fit rows of {n_codebooks}")
    tokens = np.zeros((n_frames + 1, n_codebooks + 1), np.int32)
    mask = np.zeros(tokens.shape, bool)
    tokens[:n_frames, :given] = codes.T
    mask[:, :given] = True
    return tokens, mask


def prompt_rows(context: Sequence[TokenizedSegment], text_tokens: Sequence[int], n_codebooks: int = 32) -> Rows:
    """The reference prompt: each context segment's text rows then audio rows, then the new text."""
    parts = []
    for segment in context:
        parts.append(text_rows(segment.text_tokens, n_codebooks))
        if segment.audio_codes is not None:
            parts.append(audio_rows(np.asarray(segment.audio_codes), n_codebooks))
    parts.append(text_rows(text_tokens, n_codebooks))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def shared_rows(a: Rows, b: Rows) -> int:
    """How many leading rows a and b have in common."""
    n = min(len(a[0]), len(b[0]))
    same = (a[0][:n] == b[0][:n]).all(axis=1) & (a[1][:n] == b[1][:n]).all(axis=1)
    return n if same.all() else int(np.argmin(same))


def stack_frames(frames: Sequence[np.ndarray], n_codebooks: int = 32) -> np.ndarray:
    """Frames (N,) as codes (N, T); T may be 0."""
    return np.stack(frames, axis=1) if len(frames) else np.zeros((n_codebooks, 0), np.int32)
