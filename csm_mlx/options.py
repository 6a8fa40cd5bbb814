"""The options every entry point takes (CLI, API, server), checked in one place before any work.

Each option has one rule: its type, its range and whether it may be left unset. A value that
breaks it raises OptionError naming the option as the API does (top_k); the CLI shows it as
its flag (--top-k) and the server as the field. Checking happens before a model is loaded,
a directory is created or MLX is touched, so a rejected call leaves nothing changed.

The files a user hands over (a fine-tuning config, an adapter's config, a model's config)
are mappings checked by the same rules (check_mapping), their errors naming the file and the key.
"""

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

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
    kind: type  # int, float, bool, str, list or dict
    low: Optional[float] = None
    high: Optional[float] = None
    optional: bool = False  # None allowed (means "off" or "from the text")
    unit: str = ""
    positive: bool = False  # more than 0 (a learning rate: 0 would train nothing)
    choices: Tuple[str, ...] = ()  # a str's known values
    items: Optional["Rule"] = None  # a list's items
    length: Optional[int] = None  # a list's length
    fields: Optional[Mapping[str, "Rule"]] = field(default=None, compare=False)  # a dict's keys
    required: bool = False  # as one of a dict's fields: the key must be there

    def check(self, param: str, value: Any):
        if value is None:
            if self.optional:
                return None
            raise OptionError(param, "must be given")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise OptionError(param, f"must be true or false, got {value!r}")
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise OptionError(param, f"must be a string, got {value!r}")
            if self.choices and value not in self.choices:
                raise OptionError(param, f"must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        if self.kind is list:
            if not isinstance(value, (list, tuple)):
                raise OptionError(param, f"must be a list, got {value!r}")
            if self.length is not None and len(value) != self.length:
                raise OptionError(param, f"must hold {self.length} values, got {len(value)}")
            return [self.items.check(f"{param}[{n}]", v) for n, v in enumerate(value)] if self.items else list(value)
        if self.kind is dict:
            return _check_fields(value, self.fields, param)
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
        if self.positive and not value > 0:
            raise OptionError(param, f"must be more than 0, got {_show(value)}")
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
    "codebooks": Rule(int, 1, 32, optional=True),  # Mimi's 32 at most; the model's own count is checked later
    "chunk_chars": Rule(int, 0, 100_000),
    "speaker": Rule(int, 0, 1_000_000),
    "chunk_frames": Rule(int, 1, WINDOW_FRAMES),
    "batch_size": Rule(int, 1, 256),
    "pause_ms": Rule(float, 0.0, 60_000.0, unit=" ms"),
    "speed": Rule(float, 0.25, 4.0),  # the OpenAI speech API's range
}


def check_options(**options) -> Dict[str, Any]:
    """The options with each value checked against its rule (and ints made plain ints);
    an unknown name is a TypeError, as for a function call."""
    unknown = sorted(set(options) - set(RULES))
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}: known options are {', '.join(RULES)}")
    return {name: RULES[name].check(name, value) for name, value in options.items()}


def _check_fields(values: Any, fields: Mapping[str, Rule], param: str) -> Dict[str, Any]:
    """A mapping whose keys are all known, the required ones there, each value checked by its rule;
    an error's param is the key's path (lora_parameters.rank)."""
    if not isinstance(values, dict):
        raise OptionError(param, f"must map names to values, got {values!r}")
    unknown = sorted(map(str, set(values) - set(fields)))
    if unknown:
        raise OptionError(param, f"has the unknown key {unknown[0]!r}: the known keys are {', '.join(fields)}")
    missing = [name for name, rule in fields.items() if rule.required and name not in values]
    if missing:
        raise OptionError(param, f"lacks the key {missing[0]!r}")
    return {name: fields[name].check(f"{param}.{name}" if param else name, value) for name, value in values.items()}


def check_mapping(values: Any, fields: Mapping[str, Rule], where: str) -> Dict[str, Any]:
    """values read from a file (YAML or JSON) checked against fields: unknown keys, missing
    required ones, types and ranges. An error is an OptionError naming where (the file) and the
    key: "config file f.yaml: lora_parameters.rank must be at least 1, got 0"."""
    try:
        return _check_fields(values, fields, "")
    except OptionError as e:
        raise OptionError(f"{where}: {e.param}" if e.param else where, e.problem) from None


def syntax_error(e: Exception) -> str:
    """A YAML or JSON syntax error in one line, with its line and column (PyYAML's own message
    spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {getattr(e, 'problem', None) or 'not valid YAML'}"
    if hasattr(e, "lineno") and hasattr(e, "colno"):
        return f"line {e.lineno}, column {e.colno}: {e.msg}"
    return " ".join(str(e).split())


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
