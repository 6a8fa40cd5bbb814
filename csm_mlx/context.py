"""The context budget: which conversation turns fit the backbone's window.

Rows are counted exactly as the prompt is built: a segment's text tokens, plus its audio
frames and one end-of-audio row when it has audio; then the new text's tokens and the frames
still to generate. When that is more than the window, whole segments are dropped, oldest
first, never a pinned one (a voice prompt); a segment is never split.
"""

import logging
from typing import List, Sequence

log = logging.getLogger("csm_mlx")


class ContextError(ValueError):
    """The pinned context alone does not fit; the message says by how much."""


def fit_context(rows: Sequence[int], pinned: Sequence[bool], fixed_rows: int, window: int) -> List[int]:
    """Indices of the segments to keep, in order, so that their rows plus fixed_rows (the new
    text and the frames to generate) fit the window."""
    pinned_rows = sum(r for r, p in zip(rows, pinned) if p)
    if pinned_rows + fixed_rows > window:
        raise ContextError(
            f"the pinned voice prompt ({pinned_rows} rows) plus the text and the frames to generate "
            f"({fixed_rows} rows) need {pinned_rows + fixed_rows} rows, "
            f"{pinned_rows + fixed_rows - window} more than the model's {window}-row window: "
            "use a shorter voice prompt or text, or a lower maximum audio length"
        )
    keep = list(range(len(rows)))
    total = sum(rows) + fixed_rows
    for i in range(len(rows)):
        if total <= window:
            break
        if not pinned[i]:
            keep.remove(i)
            total -= rows[i]
    dropped = len(rows) - len(keep)
    if dropped:
        log.info("dropped the %d oldest context turn(s) to fit the %d-row window", dropped, window)
    return keep

