"""Training sequences as model rows and labels, and batches of them.

A sequence is laid out as the reference lays out a prompt: each turn's text rows, then its
audio rows and the all-zero end-of-audio row. Labels (32 per row) are the codes of the row,
IGNORE on text rows, on turns that are context only, and on padding. The depth decoder trains
on a random share of each sequence's frames (the rest keep codebook 0 only) and always on the
end-of-audio frame, as Sesame describes and transformers' processor does with its -101 labels.
"""

from typing import Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..prompt import audio_rows, text_rows
from ..models.csm import IGNORE
from .data import Example

DEPTH_DECODER_RATIO = 1 / 16


def sequence_rows(example: Example) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, mask (S, 33), labels (S, 32), frame (S,)): frame marks the audio frames whose
    depth-decoder labels may be left out (trained frames, not the end-of-audio rows)."""
    tokens, mask, labels, frame = [], [], [], []
    for segment in example.segments:
        n_codebooks, n_frames = segment.audio_codes.shape
        for t, m in (text_rows(segment.text_tokens, n_codebooks), audio_rows(segment.audio_codes, n_codebooks)):
            tokens.append(t)
            mask.append(m)
        labels.append(np.full((len(segment.text_tokens), n_codebooks), IGNORE, np.int32))
        audio_labels = tokens[-1][:, :-1].copy() if segment.train else np.full((n_frames + 1, n_codebooks), IGNORE)
        labels.append(audio_labels.astype(np.int32))
        frame.append(np.zeros(len(segment.text_tokens), bool))
        frame.append(np.r_[np.full(n_frames, segment.train), False])
    return tuple(np.concatenate(parts) for parts in (tokens, mask, labels, frame))


def amortize(labels: np.ndarray, frame: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """labels with codebooks 1..31 set to IGNORE on all but a random `ratio` of the frames
    (as many left out as transformers' processor leaves out: int(n * (1 - ratio)))."""
    frames = np.flatnonzero(frame)
    left_out = rng.choice(frames, int(len(frames) * (1 - ratio)), replace=False)
    labels = labels.copy()
    labels[left_out, 1:] = IGNORE
    return labels


def batch_arrays(rows: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Tuple[mx.array, mx.array, mx.array]:
    """Stack sequences, padded on the right (the backbone is causal: padding after a sequence
    does not change it) with masked rows and IGNORE labels."""
    length = max(len(t) for t, _, _ in rows)
    tokens = np.zeros((len(rows), length, rows[0][0].shape[1]), np.int32)
    mask = np.zeros(tokens.shape, bool)
    labels = np.full((len(rows), length, rows[0][2].shape[1]), IGNORE, np.int32)
    for i, (t, m, l) in enumerate(rows):
        tokens[i, : len(t)], mask[i, : len(t)], labels[i, : len(t)] = t, m, l
    return mx.array(tokens), mx.array(mask), mx.array(labels)


def iterate_batches(
    dataset: List[Example],
    batch_size: int,
    depth_decoder_ratio: float = DEPTH_DECODER_RATIO,
    loop: bool = False,
    seed: Optional[int] = None,
) -> Iterator[Tuple[mx.array, mx.array, mx.array]]:
    """Batches (tokens, mask, labels) of sequences of similar length, in random order; with loop,
    forever, drawing new depth-decoder frames each time. A remainder of fewer than batch_size
    sequences is left out, as mlx-lm does."""
    if not 0 < depth_decoder_ratio <= 1:
        raise ValueError(f"depth_decoder_ratio must be in (0, 1], got {depth_decoder_ratio}")
    if len(dataset) < batch_size:
        raise ValueError(f"the dataset has {len(dataset)} sequences, fewer than the batch size {batch_size}")
    rows = [sequence_rows(example) for example in dataset]
    order = sorted(range(len(dataset)), key=lambda i: len(rows[i][0]))
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    rng = np.random.default_rng(seed)
    while True:
        for b in rng.permutation(len(batches)):
            yield batch_arrays([(rows[i][0], rows[i][1], amortize(rows[i][2], rows[i][3], depth_decoder_ratio, rng))
                                for i in batches[b]])
        if not loop:
            return
