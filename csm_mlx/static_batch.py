"""Static batches: a list of utterances through one FrameBatch, a number of rows at a time."""

from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
from mlx_lm.generate import wired_limit

from .frame_batch import CONTEXT_CACHE_ROWS, FrameBatch, Row
from .models import Model
from .prompt import stack_frames
from .utterance import Utterance


def speak_all(model: Model, utterances: Sequence[Utterance], max_rows: int) -> Iterator[Tuple[int, np.ndarray]]:
    """(index, codes (32, T)) of each utterance as soon as it is done. Up to max_rows generate
    at once; the next one joins as soon as a row is free. A context they share (a voice prompt)
    is prefilled once."""
    batch = FrameBatch(model, context_cache_rows=CONTEXT_CACHE_ROWS)
    waiting = list(enumerate(utterances))
    index: Dict[Row, int] = {}
    frames: Dict[Row, List[np.ndarray]] = {}
    with wired_limit(model):  # on Metal, as mlx-lm's generation does; elsewhere a no-op
        while waiting or batch.busy:
            while waiting and batch.size < max_rows:
                n, utterance = waiting.pop(0)
                row = batch.insert(utterance)
                index[row], frames[row] = n, []
            for row, frame in batch.step():
                if frame is not None:
                    frames[row].append(frame)
                else:
                    yield index.pop(row), stack_frames(frames.pop(row), model.args.audio_num_codebooks)
