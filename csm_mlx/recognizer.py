"""Speech recognition for voice chat: a user's turn as text, with mlx-whisper.

mlx-whisper declares torch but never imports it on this path, so it is installed without its
declared requirements (`pip install --no-deps mlx-whisper`; the `chat` extra has what it imports).
"""

import json
import math
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
import soxr

from . import hub
from .codec import SAMPLE_RATE

DEFAULT_RECOGNIZER = "mlx-community/whisper-large-v3-turbo"
WHISPER_RATE = 16_000
WHISPER_FILES = ["config.json", "weights.safetensors", "weights.npz"]
# Tokens a second of speech can hold, with room to spare (fast speech is ~4 words, ~6 tokens, a
# second): a cap per turn that ends Whisper's repetition loops on noise long before its 224.
TOKENS_PER_SECOND = 10
INSTALL = "pip install --no-deps mlx-whisper && pip install 'csm-mlx[chat]'"


class RecognizerError(ValueError):
    """A speech recognizer that cannot be loaded; the message says what to give instead."""


class Recognizer:
    """Transcribes 24 kHz mono float32 audio. Call it on the thread that does the MLX work."""

    def __init__(self, path: Path, language: Optional[str] = None, fp16: bool = True):
        self.path = path
        self.language = language  # None: detected by a multilingual model, "en" for an English-only one
        self.fp16 = fp16

    @classmethod
    def load(cls, name: str = DEFAULT_RECOGNIZER, language: Optional[str] = None) -> "Recognizer":
        """An mlx-whisper model: a hub id (mlx-community/whisper-*) or a directory with its
        config.json and weights.safetensors."""
        try:
            from mlx_whisper.transcribe import ModelHolder
        except ImportError:
            raise RecognizerError(f"speech recognition needs mlx-whisper: {INSTALL}") from None
        path = hub.resolve_model(name, WHISPER_FILES, "speech recognizer")
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            config = None
        if not isinstance(config, dict) or "n_mels" not in config:
            raise RecognizerError(f"speech recognizer {name} is not an mlx-whisper model (no config.json with "
                                  "n_mels): give an mlx-community/whisper-* id or a directory mlx-whisper converted")
        if not any((path / f).is_file() for f in WHISPER_FILES[1:]):
            raise RecognizerError(f"speech recognizer {name} has no weights.safetensors or weights.npz")
        # float16 as published, except on the CPU backend, whose float16 products have no fast kernels
        # (the rule CSM.load follows for dtype "auto")
        fp16 = mx.default_device().type != mx.cpu
        dtype = mx.float16 if fp16 else mx.float32
        try:  # mlx-whisper keeps the model it loaded for its transcribe(); load it now, not at the first turn
            ModelHolder.get_model(str(path), dtype).set_dtype(dtype)
        except (TypeError, ValueError, KeyError) as e:
            raise RecognizerError(f"speech recognizer {name} does not load with mlx-whisper ({e})") from None
        return cls(path, language, fp16)

    def transcribe(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> str:
        """The words of audio, stripped; "" when none were recognized."""
        import mlx_whisper

        audio = np.asarray(audio, np.float32).reshape(-1)
        if not len(audio):
            return ""
        audio16 = soxr.resample(audio, sample_rate, WHISPER_RATE).astype(np.float32)
        cap = min(224, 16 + math.ceil(len(audio) / sample_rate * TOKENS_PER_SECOND))
        # greedy, no timestamps, one pass per 30 s window: a chat turn waits for it
        result = mlx_whisper.transcribe(audio16, path_or_hf_repo=str(self.path), temperature=0.0,
                                        condition_on_previous_text=False, language=self.language, verbose=None,
                                        without_timestamps=True, sample_len=cap, fp16=self.fp16)
        return result["text"].strip()
