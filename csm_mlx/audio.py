"""Reading context audio (any common format, rate, channel count) and writing output atomically."""

import io
import os
import secrets
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import soundfile as sf
import soxr

from .codec import SAMPLE_RATE
from .options import MAX_AUDIO_MS

# float WAV keeps the decoder's samples exactly; FLAC only stores integers.
OUTPUT_SUBTYPES = {".wav": ("WAV", "FLOAT"), ".flac": ("FLAC", "PCM_24")}
# The backbone's window holds at most this much audio, context included; a longer clip can never be used.
MAX_CONTEXT_SECONDS = MAX_AUDIO_MS / 1000


class AudioError(ValueError):
    """An audio file that cannot be read or written; the message names it and says why."""


def _check_readable(path: Path, what: str) -> None:
    if path.is_dir():
        raise AudioError(f"{what} {path} is a directory: give an audio file")
    if not path.exists():
        raise AudioError(f"{what} {path} does not exist")
    if not path.is_file():  # a FIFO would block the read until a writer comes, a device never ends
        raise AudioError(f"{what} {path} is not a regular file (a pipe or a device): give an audio file")
    if not os.access(path, os.R_OK):
        raise AudioError(f"cannot read {what} {path}: permission denied")


def read_audio(path: os.PathLike, max_seconds: Optional[float] = MAX_CONTEXT_SECONDS,
               sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The file's audio as mono float32 at sample_rate (24 kHz), down-mixed and resampled (soxr, high quality).

    A clip longer than max_seconds is refused from its header, before its samples are read."""
    path = Path(path)
    _check_readable(path, "audio file")
    return _decode(str(path), f"audio file {path}", max_seconds, sample_rate)


def decode_audio(data: bytes, name: str = "audio", max_seconds: Optional[float] = MAX_CONTEXT_SECONDS) -> np.ndarray:
    """Audio file bytes (an upload, say) as 24 kHz mono float32, checked as read_audio checks a file."""
    if not data:
        raise AudioError(f"{name} is empty: send the bytes of a WAV, FLAC, OGG or MP3 file")
    return _decode(io.BytesIO(data), name, max_seconds, SAMPLE_RATE)


def _decode(source, name: str, max_seconds: Optional[float], sample_rate: int) -> np.ndarray:
    try:
        info = sf.info(source)
        if max_seconds is not None and info.frames > max_seconds * info.samplerate:
            raise AudioError(
                f"{name} is {info.frames / info.samplerate:.0f} s long; the model's window holds at most "
                f"{max_seconds:.0f} s of audio, context included: use a shorter clip (5-20 s makes a good voice prompt)"
            )
        if isinstance(source, io.BytesIO):
            source.seek(0)
        audio, rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        # libsndfile's message names its source, which for bytes is an object's repr
        reason = e.error_string if isinstance(e, sf.LibsndfileError) else str(e)
        raise AudioError(f"cannot read {name} ({reason}): use WAV, FLAC, OGG or MP3") from None
    if audio.shape[0] == 0:
        raise AudioError(f"{name} holds no samples")
    if not np.isfinite(audio).all():
        raise AudioError(f"{name} holds NaN or infinite samples: it is corrupt")
    mono = audio.mean(axis=1)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def audio_info(path: os.PathLike, what: str = "audio file"):
    """The file's soundfile header (frames, samplerate, channels), its errors as one-line AudioErrors."""
    path = Path(path)
    _check_readable(path, what)
    try:
        return sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as e:
        reason = e.error_string if isinstance(e, sf.LibsndfileError) else str(e)
        raise AudioError(f"cannot read {what} {path} ({reason}): use WAV, FLAC, OGG or MP3") from None


def read_audio_blocks(path: os.PathLike, sample_rate: int, block_seconds: float = 10.0) -> Iterator[np.ndarray]:
    """The file's audio as read_audio gives it (mono float32 at sample_rate, soxr's stream giving
    the samples of its one-shot resampling), in blocks of about block_seconds: memory stays flat
    with the file's length."""
    path = Path(path)
    info = audio_info(path)
    resampler = soxr.ResampleStream(info.samplerate, sample_rate, 1, dtype="float32", quality="HQ")
    try:
        with sf.SoundFile(str(path)) as f:
            for block in f.blocks(blocksize=max(1, int(block_seconds * info.samplerate)), dtype="float32",
                                  always_2d=True):
                if not np.isfinite(block).all():
                    raise AudioError(f"audio file {path} holds NaN or infinite samples: it is corrupt")
                yield resampler.resample_chunk(block.mean(axis=1))
    except (sf.LibsndfileError, RuntimeError) as e:
        reason = e.error_string if isinstance(e, sf.LibsndfileError) else str(e)
        raise AudioError(f"cannot read audio file {path} ({reason}): use WAV, FLAC, OGG or MP3") from None
    yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)


def write_error(path: os.PathLike) -> str:
    """Why writing to path failed, for writers that do not say: libsndfile reports "System error"
    and MLX "[write] Unable to write". More bytes written directly onto the same file tell the
    reason (no space left on device, file too large...)."""
    try:
        with open(path, "ab") as f:
            f.write(bytes(65536))
            f.flush()
            os.fsync(f.fileno())
    except OSError as probe:
        return (probe.strerror or "the write failed").lower()
    return "the write failed"


def check_context_audio(audio, what: str = "context audio") -> np.ndarray:
    """Audio given to the API as context: finite mono float samples (N,) that fit the window."""
    audio = np.asarray(audio)
    if audio.ndim != 1 or audio.size == 0 or not np.issubdtype(audio.dtype, np.number):
        raise AudioError(f"{what} must be non-empty mono samples (N,), got shape {audio.shape} of {audio.dtype}")
    audio = audio.astype(np.float32)
    if not np.isfinite(audio).all():
        raise AudioError(f"{what} holds NaN or infinite samples")
    if audio.size > MAX_CONTEXT_SECONDS * SAMPLE_RATE:
        raise AudioError(f"{what} is {audio.size / SAMPLE_RATE:.0f} s long; the model's window holds at most "
                         f"{MAX_CONTEXT_SECONDS:.0f} s of audio: use a shorter clip")
    return audio


def check_output_path(path: os.PathLike, inputs: Iterable[os.PathLike] = ()) -> Path:
    """Fail before any work if path cannot receive an output file, or is one of the inputs."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUBTYPES:
        raise AudioError(f"output {path} must end in .wav or .flac")
    if path.is_dir():
        raise AudioError(f"output {path} is a directory: give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise AudioError(f"cannot write {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise AudioError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise AudioError(f"cannot write {path}: permission denied")
    for source in inputs:
        if path.exists() and Path(source).exists() and os.path.samefile(path, source):
            raise AudioError(f"output {path} is also an input ({source}): choose another output name")
    return path


class AudioWriter:
    """An output file written as audio arrives, so memory stays flat with length.

    The samples go to a temporary sibling that close() renames into place; abort() removes
    it, and so does leaving a with-block by an error or a signal. A reader never sees a
    half-written file, and a file already at path stays intact until the new one is whole."""

    def __init__(self, path: os.PathLike, sample_rate: int = SAMPLE_RATE):
        self.path = check_output_path(path)
        self.samples = 0
        fmt, subtype = OUTPUT_SUBTYPES[self.path.suffix.lower()]
        self._tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.part")
        self._file = None
        try:
            # libsndfile creates it with the usual mode (0666 less the umask)
            self._file = sf.SoundFile(str(self._tmp), "x", sample_rate, 1, subtype, format=fmt)
        except BaseException as e:
            self._fail(e)

    def write(self, audio: np.ndarray) -> None:
        """Append samples. A failed write removes the file; a signal (raised once the write is done)
        leaves it to the caller to close() or abort()."""
        try:
            self._file.write(np.asarray(audio, dtype=np.float32).reshape(-1))
        except (sf.LibsndfileError, OSError, RuntimeError) as e:
            self._fail(e)
        self.samples += np.size(audio)

    def close(self) -> Path:
        """Finish the file and move it into place."""
        try:
            self._file.close()
            os.replace(self._tmp, self.path)
        except BaseException as e:
            self._fail(e)
        return self.path

    def abort(self) -> None:
        """Drop the file being written; whatever was at path stays as it was."""
        if self._file is not None and not self._file.closed:
            try:
                self._file.close()
            except (sf.LibsndfileError, OSError, RuntimeError):
                pass  # the write that failed already said why; the file is removed below
        self._remove()

    def _remove(self) -> None:
        self._tmp.unlink(missing_ok=True)

    def _fail(self, e: BaseException) -> None:
        """Remove the temporary file and raise: an I/O failure as an AudioError saying why, anything
        else (a signal, a bug) as it is."""
        error = AudioError(f"cannot write {self.path}: {self._reason(e)}") if isinstance(
            e, (sf.LibsndfileError, OSError, RuntimeError)) else e
        self.abort()
        raise error from None

    def _reason(self, e: BaseException) -> str:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror.lower()
        return write_error(self._tmp)

    def __enter__(self) -> "AudioWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_audio(path: os.PathLike, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write mono audio to .wav/.flac atomically (see AudioWriter)."""
    with AudioWriter(path, sample_rate) as writer:
        writer.write(audio)
    return writer.path


def fade_ends(audio: np.ndarray, sample_rate: int, fade_ms: float = 5) -> np.ndarray:
    """A copy of audio with a short fade in and out, so a turn that starts or stops off zero does not click."""
    audio = np.array(audio, dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, min(int(sample_rate * fade_ms / 1000), len(audio) // 2), dtype=np.float32)
    if len(ramp):
        audio[: len(ramp)] *= ramp
        audio[len(audio) - len(ramp) :] *= ramp[::-1]
    return audio


def join_turns(turns: Sequence[np.ndarray], sample_rate: int, pause_ms: float = 300, fade_ms: float = 5) -> np.ndarray:
    """One track from separately decoded turns: each faded at its ends, pause_ms of silence between."""
    pause = np.zeros(int(sample_rate * pause_ms / 1000), np.float32)
    parts = []
    for n, audio in enumerate(turns):
        parts += [pause, fade_ends(audio, sample_rate, fade_ms)] if n else [fade_ends(audio, sample_rate, fade_ms)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
