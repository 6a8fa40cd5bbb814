"""A conversation that remembers: every turn becomes context for the next.

Each turn is one row of a FrameBatch whose backbone cache is kept when the turn ends: the next
prompt shares the previous one's rows up to where they differ (normally all of it: the previous
prompt, then the frames it generated), so only the new rows are prefilled. Turns that no longer
fit the window are dropped oldest first, never a pinned voice prompt.
"""

from typing import Callable, Iterator, List, Optional, Sequence, Union

import numpy as np
from mlx_lm.generate import wired_limit

from .frame_batch import FrameBatch
from .prompt import Rows, TokenizedSegment, stack_frames
from .segment import Segment, Speech
from .utterance import Chunk, KeptCache, chunk_prompt, make_utterance, tokenize_segment


class Conversation:
    """Turns spoken so far (given or generated) and the backbone cache over them.

    speech turns a turn's codes into Speech (decoded, watermarked) for say()."""

    def __init__(self, model, tokenizer, mimi, context: Sequence[Segment] = (),
                 speech: Optional[Callable[[np.ndarray], Speech]] = None, reuse_cache: bool = True):
        self.model, self.tokenizer, self.mimi = model, tokenizer, mimi
        self.history: List[TokenizedSegment] = [tokenize_segment(tokenizer, mimi, s) for s in context]
        self.reuse_cache = reuse_cache
        self.prefilled_rows: List[int] = []  # rows run through the backbone before each chunk's first frame
        self._speech = speech
        self._kept: Optional[KeptCache] = None
        self._key = None  # the random key where the last turn left it: unseeded turns go on from it

    def add(self, segment: Union[Segment, TokenizedSegment]) -> None:
        """A turn that was spoken, not generated (its audio, if any, becomes context); a
        TokenizedSegment is taken as it is (its audio already encoded)."""
        self.history.append(segment if isinstance(segment, TokenizedSegment)
                            else tokenize_segment(self.tokenizer, self.mimi, segment))

    def prompt(self, text_tokens: Sequence[int], max_frames: int) -> Rows:
        """Prompt rows for a next turn of these text tokens: the turns that fit, then its text."""
        return chunk_prompt(self.history, Chunk(list(text_tokens), max_frames), self.model.args.audio_num_codebooks,
                            self.window)

    @property
    def window(self) -> int:
        return self.model.args.backbone.max_seq_len

    def frames(self, text: str, speaker: int = 0, **options) -> Iterator[np.ndarray]:
        """Frames (32,) of the next turn as they are generated; the turn joins the history when
        the iteration ends (also when it is stopped early: what was generated is kept).

        Options as for csm_mlx.utterance.make_utterance: chunk_chars, max_audio_length_ms,
        temperature, top_k, top_p, min_p, seed, stop_after_repeats. Text longer than chunk_chars
        is spoken chunk by chunk, each chunk a turn of its own, so the chunks before are its
        context and the voice stays the same. Without a seed, sampling goes on from where the
        last turn left it. Bad input fails here, not at the first frame."""
        utterance = make_utterance(self.tokenizer, self.mimi, text, speaker, self.history, window=self.window,
                                   key=self._key, **options)
        utterance.keep_cache = self.reuse_cache
        said = len(self.history)

        def speak():
            utterance.kept = self._kept  # None without reuse_cache: no cache is kept then
            batch = FrameBatch(self.model)
            row = batch.insert(utterance)
            try:
                with wired_limit(self.model):  # on Metal, as mlx-lm's generation does; elsewhere a no-op
                    for _, frame in batch.drain():
                        if frame is not None:
                            yield frame
            finally:
                batch.remove(row)
                self.history.extend(utterance.history[said:])
                self._kept, self._key = row.kept, row.key
                self.prefilled_rows += utterance.prefilled_rows

        return speak()

    def say(self, text: str, speaker: int = 0, **options) -> Speech:
        """Generate the next turn and decode it; arguments as for frames()."""
        return self._speech(stack_frames(list(self.frames(text, speaker, **options))))
