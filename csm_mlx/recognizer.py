"""Speech recognition for voice chat: a user's turn as text, with mlx-whisper or parakeet-mlx.

The model's own files say which: mlx-whisper's config.json holds Whisper's dimensions (n_mels,
...), parakeet-mlx's is NeMo's configuration (preprocessor, encoder, ...). mlx-whisper declares
torch but never imports it on this path, so it is installed without its declared requirements
(`pip install --no-deps mlx-whisper`; the `chat` extra has what it imports, and parakeet-mlx).
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
WHISPER_FILES = ["weights.safetensors", "weights.npz"]
PARAKEET_FILES = ["model.safetensors"]
RECOGNIZER_FILES = ["config.json", *WHISPER_FILES, *PARAKEET_FILES]
# Tokens a second of speech can hold, with room to spare (fast speech is ~4 words, ~6 tokens, a
# second): a cap per turn that ends Whisper's repetition loops on noise long before its 224.
TOKENS_PER_SECOND = 10
INSTALL = "pip install --no-deps mlx-whisper && pip install 'csm-mlx[chat]'"


class RecognizerError(ValueError):
    """A speech recognizer that cannot be loaded; the message says what to give instead."""


class Recognizer:
    """Transcribes 24 kHz mono float32 audio. Call it on the thread that does the MLX work.

    path: an mlx-whisper model directory, which mlx-whisper's transcribe() loads (and keeps);
    or, with parakeet, the directory a parakeet-mlx model was loaded from."""

    def __init__(self, path: Path, language: Optional[str] = None, fp16: bool = True, parakeet=None):
        self.path = path
        self.language = language  # Whisper: None detects it (multilingual models), "en" for English-only ones
        self.fp16 = fp16  # half precision: float16 for Whisper, bfloat16 for Parakeet
        self.parakeet = parakeet

    @classmethod
    def load(cls, name: str = DEFAULT_RECOGNIZER, language: Optional[str] = None) -> "Recognizer":
        """An mlx-whisper model (mlx-community/whisper-*, or a directory with config.json and
        weights.safetensors) or a parakeet-mlx one (mlx-community/parakeet-*, or a directory with
        config.json and model.safetensors): a hub id or a local directory. Parakeet detects the
        language itself; language is Whisper's."""
        path = hub.resolve_model(name, RECOGNIZER_FILES, "speech recognizer")
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            config = None
        # float16 (bfloat16 for Parakeet) as published, except on the CPU backend, whose half-precision
        # products have no fast kernels (the rule CSM.load follows for dtype "auto")
        half = mx.default_device().type != mx.cpu
        if isinstance(config, dict) and "n_mels" in config:
            return cls._whisper(name, path, language, half)
        if isinstance(config, dict) and {"preprocessor", "encoder", "decoder"} <= config.keys():
            return cls._parakeet(name, path, half)
        raise RecognizerError(f"speech recognizer {name} is neither an mlx-whisper nor a parakeet-mlx model (its "
                              "config.json has no n_mels, nor NeMo's preprocessor and encoder): give an "
                              "mlx-community/whisper-* or mlx-community/parakeet-* id, or a directory converted for one")

    @classmethod
    def _whisper(cls, name: str, path: Path, language: Optional[str], fp16: bool) -> "Recognizer":
        try:
            from mlx_whisper.transcribe import ModelHolder
        except ImportError:
            raise RecognizerError(f"speech recognition with Whisper needs mlx-whisper: {INSTALL}") from None
        if not any((path / f).is_file() for f in WHISPER_FILES):
            raise RecognizerError(f"speech recognizer {name} has no weights.safetensors or weights.npz")
        dtype = mx.float16 if fp16 else mx.float32
        try:  # mlx-whisper keeps the model it loaded for its transcribe(); load it now, not at the first turn
            ModelHolder.get_model(str(path), dtype).set_dtype(dtype)
        except (TypeError, ValueError, KeyError) as e:
            raise RecognizerError(f"speech recognizer {name} does not load with mlx-whisper ({e})") from None
        return cls(path, language, fp16)

    @classmethod
    def _parakeet(cls, name: str, path: Path, half: bool) -> "Recognizer":
        try:
            from parakeet_mlx import from_pretrained
        except ImportError:
            raise RecognizerError(f"speech recognition with Parakeet needs parakeet-mlx: {INSTALL}") from None
        if not (path / PARAKEET_FILES[0]).is_file():
            raise RecognizerError(f"speech recognizer {name} has no model.safetensors")
        try:  # parakeet-mlx tries its argument as a hub id first: an absolute path is never a valid one
            model = from_pretrained(str(path.resolve()), dtype=mx.bfloat16 if half else mx.float32)
        except (TypeError, ValueError, KeyError) as e:
            raise RecognizerError(f"speech recognizer {name} does not load with parakeet-mlx "
                                  f"({' '.join(str(e).split())})") from None
        return cls(path, fp16=half, parakeet=model)

    def transcribe(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> str:
        """The words of audio, stripped; "" when none were recognized."""
        audio = np.asarray(audio, np.float32).reshape(-1)
        if not len(audio):
            return ""
        if self.parakeet is not None:
            return self._parakeet_text(audio, sample_rate)
        import mlx_whisper

        audio16 = soxr.resample(audio, sample_rate, WHISPER_RATE).astype(np.float32)
        cap = min(224, 16 + math.ceil(len(audio) / sample_rate * TOKENS_PER_SECOND))
        # greedy, no timestamps, one pass per 30 s window: a chat turn waits for it
        result = mlx_whisper.transcribe(audio16, path_or_hf_repo=str(self.path), temperature=0.0,
                                        condition_on_previous_text=False, language=self.language, verbose=None,
                                        without_timestamps=True, sample_len=cap, fp16=self.fp16)
        return result["text"].strip()

    def _parakeet_text(self, audio: np.ndarray, sample_rate: int) -> str:
        """Parakeet's greedy transcript of the whole turn in one pass (its transcribe() for a file
        whose decoded samples these are)."""
        from parakeet_mlx.audio import get_logmel

        settings = self.parakeet.preprocessor_config
        audio = soxr.resample(audio, sample_rate, settings.sample_rate).astype(np.float32)
        if len(audio) < settings.hop_length:
            return ""
        mel = get_logmel(mx.array(audio, mx.bfloat16 if self.fp16 else mx.float32), settings)
        return self.parakeet.generate(mel)[0].text.strip()
