"""The one sampler: each row of a batch draws its codes with its own settings and its own key.

Every path (a single stream, a static batch, a conversation, the server) samples here, so a
seeded row draws the same codes whichever batch it runs in. Filters, in this order, on the
log-probabilities of the 2048 decodable codes: top-p, min-p, top-k; then a categorical draw at
the row's temperature (0: greedy), as the argmax of the scaled log-probabilities plus Gumbel
noise. Each codebook splits a sampling row's key once.
"""

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import mlx.core as mx
import numpy as np

# ids 2048..2050 of the 2051-id audio vocabulary are not audio, so they are never sampled:
# Mimi would fail on them.
from .options import AUDIO_CODES


@dataclass(frozen=True)
class Sampling:
    """One row's settings; top_k, top_p, min_p of 0 are off (top_p 1 too)."""

    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 0.0
    min_p: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def filters(self) -> "Filters":
        return Filters(not self.greedy, 0 < self.top_p < 1, self.min_p != 0, 0 < self.top_k < AUDIO_CODES)


@dataclass(frozen=True)
class Filters:
    """Which steps some row of a batch needs: a compiled frame is traced once per variant."""

    sample: bool
    top_p: bool
    min_p: bool
    top_k: bool

    @classmethod
    def of(cls, samplings: Sequence[Sampling]) -> "Filters":
        each = [s.filters() for s in samplings]
        return cls(*(any(getattr(f, name) for f in each) for name in ("sample", "top_p", "min_p", "top_k")))


def row_params(samplings: Sequence[Sampling]) -> Dict[str, mx.array]:
    """The rows' settings as arrays: greedy (B,), the rest (B, 1)."""
    rows = [
        {
            "greedy": np.array(s.greedy),
            "inv_temperature": np.array([1.0 / s.temperature if s.temperature else 1.0], np.float32),
            "use_top_p": np.array([0 < s.top_p < 1]),
            "top_p": np.array([s.top_p], np.float32),
            "use_min_p": np.array([s.min_p != 0]),
            "log_min_p": np.array([np.log(s.min_p) if s.min_p else 0.0], np.float32),
            "use_top_k": np.array([0 < s.top_k < AUDIO_CODES]),
            "top_k": np.array([min(max(s.top_k, 1), AUDIO_CODES)], np.int32),
        }
        for s in samplings
    ]
    return {k: mx.array(np.stack([r[k] for r in rows])) for k in rows[0]}


def _top_p(logprobs: mx.array, top_p: mx.array) -> mx.array:
    """Keep the smallest set of most likely codes whose mass reaches top_p (B, 1)."""
    sorted_logprobs = mx.sort(logprobs, axis=-1)
    sorted_probs = mx.exp(sorted_logprobs)
    mass_above = mx.cumsum(sorted_probs, axis=-1, reverse=True, inclusive=False)
    total_mass = mass_above[..., :1] + sorted_probs[..., :1]
    # at most all but one (a row with top-p off has top_p 0, and its result is not used)
    dropped = mx.minimum((mass_above >= top_p * total_mass).sum(axis=-1, keepdims=True), logprobs.shape[-1] - 1)
    threshold = mx.take_along_axis(sorted_logprobs, dropped, axis=-1)
    return mx.where(logprobs < threshold, -float("inf"), logprobs)


def _top_k(logprobs: mx.array, top_k: mx.array) -> mx.array:
    """Keep each row's top_k (B, 1) codes."""
    sorted_logprobs = mx.sort(logprobs, axis=-1)
    threshold = mx.take_along_axis(sorted_logprobs, logprobs.shape[-1] - top_k, axis=-1)
    return mx.where(logprobs < threshold, -float("inf"), logprobs)


def scores(filters: Filters, params: Dict[str, mx.array], logits: mx.array, draw_keys: mx.array) -> mx.array:
    """What each row's code is the argmax of (B, 2048): its filtered log-probabilities at its
    temperature plus Gumbel noise from its draw key (a categorical draw), or for a greedy row
    its logits."""
    logits = logits[..., :AUDIO_CODES].astype(mx.float32)
    if not filters.sample:
        return logits
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if filters.top_p:
        logprobs = mx.where(params["use_top_p"], _top_p(logprobs, params["top_p"]), logprobs)
    if filters.min_p:
        removed = logprobs < mx.max(logprobs, axis=-1, keepdims=True) + params["log_min_p"]
        logprobs = mx.where(params["use_min_p"] & removed, -float("inf"), logprobs)
    if filters.top_k:
        logprobs = mx.where(params["use_top_k"], _top_k(logprobs, params["top_k"]), logprobs)
    # one draw per row with its own key, so a row's noise does not depend on the batch
    noise = mx.concatenate([mx.random.gumbel((1, AUDIO_CODES), key=draw_keys[i]) for i in range(logits.shape[0])])
    return mx.where(params["greedy"][:, None], logits, logprobs * params["inv_temperature"] + noise)


def sample_codes(filters: Filters, params: Dict[str, mx.array], logits: mx.array,
                 keys: mx.array) -> Tuple[mx.array, mx.array]:
    """Codes (B,) for one codebook from logits (B, vocab), and the rows' next keys (B, 2)."""
    if not filters.sample:
        return mx.argmax(logits[..., :AUDIO_CODES], axis=-1), keys
    split = mx.vmap(mx.random.split)(keys)
    return mx.argmax(scores(filters, params, logits, split[:, 1]), axis=-1), split[:, 0]
