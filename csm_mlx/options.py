"""The options every entry point takes (CLI, API, server), checked in one place before any work.

Each option has one rule: its type, its range and whether it may be left unset. A value that
breaks it raises OptionError naming the option as the API does (top_k); the CLI shows it as
its flag (--top-k) and the server as the field. Checking happens before a model is loaded,
a directory is created or MLX is touched, so a rejected call leaves nothing changed.
"""

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Optional

# A Mimi codebook has 2048 entries: the audio ids that are ever sampled.
AUDIO_CODES = 2048
FRAME_MS = 80
# The backbone's window is 2048 rows; no utterance or context clip can be longer than that many frames.
WINDOW_FRAMES = 2048
MAX_AUDIO_MS = WINDOW_FRAMES * FRAME_MS


class OptionError(ValueError):
    """An option of the wrong type or out of range. param is its API name; problem reads after it."""

    def __init__(self, param: str, problem: str):
        self.param, self.problem = param, problem
        super().__init__(f"{param} {problem}")


@dataclass(frozen=True)
class Rule:
    kind: type  # int or float
    low: Optional[float] = None
    high: Optional[float] = None
    optional: bool = False  # None allowed (means "off" or "from the text")
    unit: str = ""

    def check(self, param: str, value: Any):
        if value is None:
            if self.optional:
                return None
            raise OptionError(param, "must be given")
        integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        real = integral or (isinstance(value, numbers.Real) and not isinstance(value, bool))
        if self.kind is int and not integral:
            if real and float(value).is_integer() and math.isfinite(value):
                value = int(value)
            else:
                raise OptionError(param, f"must be a whole number, got {value!r}")
        if self.kind is float:
            if not real:
                raise OptionError(param, f"must be a number, got {value!r}")
            if not math.isfinite(value):
                raise OptionError(param, f"must be a finite number, got {value!r}")
        value = self.kind(value)
        if self.low is not None and value < self.low:
            raise OptionError(param, f"must be at least {_show(self.low)}{self.unit}, got {_show(value)}")
        if self.high is not None and value > self.high:
            raise OptionError(param, f"must be at most {_show(self.high)}{self.unit}, got {_show(value)}")
        return value


def _show(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


RULES: Dict[str, Rule] = {
    "temperature": Rule(float, 0.0, 100.0),
    "top_k": Rule(int, 0, AUDIO_CODES),
    "top_p": Rule(float, 0.0, 1.0),
    "min_p": Rule(float, 0.0, 1.0),
    "seed": Rule(int, 0, 2**63 - 1, optional=True),
    "max_audio_length_ms": Rule(float, FRAME_MS, MAX_AUDIO_MS, optional=True, unit=" ms"),
    "stop_after_repeats": Rule(int, 1, WINDOW_FRAMES, optional=True),
    "chunk_chars": Rule(int, 0, 100_000),
    "speaker": Rule(int, 0, 1_000_000),
    "chunk_frames": Rule(int, 1, WINDOW_FRAMES),
    "batch_size": Rule(int, 1, 256),
    "pause_ms": Rule(float, 0.0, 60_000.0, unit=" ms"),
}


def check_options(**options) -> Dict[str, Any]:
    """The options with each value checked against its rule (and ints made plain ints);
    an unknown name is a TypeError, as for a function call."""
    unknown = sorted(set(options) - set(RULES))
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}: known options are {', '.join(RULES)}")
    return {name: RULES[name].check(name, value) for name, value in options.items()}


def check_text(text: Any, param: str = "text") -> str:
    """Text to speak: a non-empty string."""
    if not isinstance(text, str):
        raise OptionError(param, f"must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of a command line arrive as lone surrogates
        raise OptionError(param, "is not valid UTF-8: convert it, e.g. with iconv -t UTF-8") from None
    if not text.strip():
        raise OptionError(param, "is empty: give the words to speak")
    return text


def check_texts(texts: Any, param: str = "texts") -> list:
    """Several texts: a list or tuple of non-empty strings (a lone string is refused, not spoken letter by letter)."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, (list, tuple)):
        raise OptionError(param, f"must be a list of strings, got {type(texts).__name__}")
    if not texts:
        raise OptionError(param, "is empty: give at least one text")
    for n, text in enumerate(texts):
        check_text(text, f"{param}[{n}]")
    return list(texts)
