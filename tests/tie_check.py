"""Comparing frames from two ways of generating: equal, or equal up to a last-bit tie.

A row's numbers can differ in the last bits with its batch or with how its prompt was split into
passes, on any backend. Where two candidates for a code are that close, either may win; from
there on the frames differ. assert_same_frames accepts that and nothing else: the first
differing code must be one whose two candidates scored within float32 rounding of each other.
"""

import mlx.core as mx
import numpy as np

from csm_mlx.sampling import Filters, Sampling, row_params, scores
from csm_mlx.utterance import random_key

RELATIVE_TIE = 1e-4  # float32 rounding through a few layers stays well below this


def _draw_key(seed: int, position: int) -> mx.array:
    """The key a seeded row draws with at its position-th code (32 per frame)."""
    key = random_key(seed)
    for _ in range(position):
        key = mx.random.split(key)[0]
    return mx.random.split(key)[1]


def assert_same_frames(model, rows, options, expected, got):
    """expected and got (32, T) are the codes of one chunk spoken after prompt rows (tokens,
    mask) with these sampling options (temperature, top_k, top_p, min_p, seed)."""
    if expected.shape == got.shape and (expected == got).all():
        return
    frames = min(expected.shape[1], got.shape[1])
    differ = np.argwhere(expected[:, :frames] != got[:, :frames])
    assert len(differ), f"same codes, different lengths: {expected.shape} vs {got.shape}"
    frame = differ[:, 1].min()
    codebook = differ[differ[:, 1] == frame, 0].min()
    tokens, mask = rows
    logits = model.teacher_forced_logits(mx.array(tokens)[None], mx.array(mask)[None],
                                         mx.array(expected[:, : frame + 1].T)[None])[0, frame, codebook][None]
    sampling = Sampling(**{k: v for k, v in options.items() if k in ("temperature", "top_k", "top_p", "min_p")})
    key = _draw_key(options.get("seed", 0), 32 * frame + codebook)[None]
    score = np.array(scores(Filters.of([sampling]), row_params([sampling]), logits, key))[0]
    a, b = expected[codebook, frame], got[codebook, frame]
    assert score.argmax() == a, f"frame {frame}, codebook {codebook}: the reference scores do not pick {a}"
    gap = abs(float(score[a]) - float(score[b]))
    assert gap <= RELATIVE_TIE * max(1.0, abs(float(score[a]))), (
        f"frame {frame}, codebook {codebook}: codes {a} vs {b} differ by {gap:.3g}, not a last-bit tie")


def assert_same_speech(csm, text, speaker, context, options, got):
    """got (32, T) are the codes some way of generating gave for csm.generate(text, speaker,
    context, **options): the same, or the same up to a last-bit tie in one of its chunks (after a
    first chunk, only greedy: a seeded row's key position there depends on the chunks before)."""
    from csm_mlx.prompt import stack_frames
    from csm_mlx.utterance import Chunk, chunk_prompt

    conversation = csm.conversation(context)
    expected = stack_frames(list(conversation.frames(text, speaker, **options)))
    if expected.shape == got.shape and (expected == got).all():
        return
    first = len(context)
    start = 0
    for n, turn in enumerate(conversation.history[first:]):
        frames = turn.audio_codes.shape[1]
        mine, theirs = expected[:, start : start + frames], got[:, start : start + frames]
        if not (mine.shape == theirs.shape and (mine == theirs).all()):
            assert n == 0 or options.get("temperature", 0.9) == 0, "a tie after the first chunk of a sampled text"
            rows = chunk_prompt(conversation.history[: first + n], Chunk(list(turn.text_tokens), frames),
                                csm.model.args.audio_num_codebooks, csm.model.args.backbone.max_seq_len)
            assert_same_frames(csm.model, rows, options, mine, got[:, start:])
            return
        start += frames
    raise AssertionError(f"the same chunks, then more frames: {expected.shape} vs {got.shape}")
