"""Reading context audio (any common format, rate, channel count) and writing output atomically."""

import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .codec import SAMPLE_RATE

# float WAV keeps the decoder's samples exactly; FLAC only stores integers.
OUTPUT_SUBTYPES = {".wav": ("WAV", "FLOAT"), ".flac": ("FLAC", "PCM_24")}


class AudioError(ValueError):
    """An audio file that cannot be read or written; the message names it and says why."""


def read_audio(path: os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The file's audio as mono float32 at sample_rate (24 kHz), down-mixed and resampled (soxr, high quality)."""
    if not Path(path).is_file():
        raise AudioError(f"audio file {path} does not exist")
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"cannot read audio file {path} ({e}): use WAV, FLAC, OGG or MP3") from None
    if audio.shape[0] == 0:
        raise AudioError(f"audio file {path} holds no samples")
    mono = audio.mean(axis=1)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def check_output_path(path: os.PathLike) -> Path:
    """Fail before any work if path cannot receive an output file."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUBTYPES:
        raise AudioError(f"output {path} must end in .wav or .flac")
    if path.is_dir():
        raise AudioError(f"output {path} is a directory: give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise AudioError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise AudioError(f"cannot write {path}: permission denied")
    return path


def write_audio(path: os.PathLike, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write mono audio to .wav/.flac via a temporary file renamed into place, so a reader
    never sees a half-written file and an interrupted write leaves the old file intact."""
    path = check_output_path(path)
    fmt, subtype = OUTPUT_SUBTYPES[path.suffix.lower()]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            sf.write(f, np.asarray(audio, dtype=np.float32), sample_rate, format=fmt, subtype=subtype)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
