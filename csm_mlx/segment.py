"""What a conversation is made of: turns (segments) in, speech out."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import numpy as np

from .options import RULES, OptionError


@dataclass
class Segment:
    """One turn of a conversation: who spoke, what they said, and (for context) how it sounded.

    audio is 24 kHz mono float32; use csm_mlx.audio.read_audio to load any file. text None (with
    audio): transcribed by the speech recognizer CSM.load(asr=...) loaded.
    A pinned segment (a voice prompt) is never dropped to fit the context window.
    source is the file the audio was read from, if any (so that no output overwrites it)."""

    speaker: int
    text: Optional[str]
    audio: Optional[np.ndarray] = None
    pinned: bool = False
    source: Optional[Path] = None


@dataclass
class Speech:
    audio: np.ndarray  # float32 (samples,)
    sample_rate: int
    codes: np.ndarray  # Mimi codes (32, frames)

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


def check_speaker(speaker) -> int:
    return RULES["speaker"].check("speaker", speaker)


def check_segments(segments: Any, param: str = "context") -> List[Segment]:
    """Turns given to the API: a list or tuple of Segments (a lone Segment or a string is refused)."""
    if not isinstance(segments, (list, tuple)):
        raise OptionError(param, f"must be a list of Segments, got {type(segments).__name__}")
    for n, segment in enumerate(segments):
        if not isinstance(segment, Segment):
            raise OptionError(f"{param}[{n}]", f"must be a Segment, got {type(segment).__name__}")
    return list(segments)
