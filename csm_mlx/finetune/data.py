"""Training data a user brings, read and Mimi-encoded once.

A data directory holds train.jsonl (and optionally valid.jsonl). Each line is one clip,
    {"audio": "clips/0001.wav", "text": "what it says", "speaker": 0}
or one conversation, whose turns are the context of the ones after them,
    {"segments": [{"audio": ..., "text": ..., "speaker": 1, "train": false}, {...}]}
where a turn with "train": false is context only (nothing of it is scored). Audio paths are
relative to the directory; any format soundfile reads, any rate, any channel count.

Mimi codes are cached in DIR/.csm-mlx-cache, one file per piece of audio, named by the hash of
its 24 kHz samples and of the codec, so an unchanged clip is never encoded twice. A clip longer
than max_clip_seconds is cut at pauses between sentences (see split_at_pauses).
"""

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..audio import AudioError, read_audio
from ..codec import FRAME_SAMPLES, SAMPLE_RATE, Mimi
from ..segment import check_speaker
from ..text import split_sentences
from ..tokenizer import TextTokenizer
from .files import write_atomically

log = logging.getLogger("csm_mlx")

CACHE_DIR = ".csm-mlx-cache"
CLIP_KEYS = ("audio", "text", "speaker")
TURN_KEYS = CLIP_KEYS + ("train",)
MAX_CLIP_SECONDS = 15.0

# Pause detection for splitting long clips: 20 ms windows, a window is quiet 35 dB under the
# loudest one, and a pause is at least 0.2 s of quiet windows.
PAUSE_WINDOW = SAMPLE_RATE // 50
PAUSE_DB = -35.0
MIN_PAUSE_WINDOWS = 10


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and line."""


@dataclass
class Turn:
    """One segment of a training line, as read: who, what, and where its audio is."""

    speaker: int
    text: str
    audio: Path
    train: bool = True


@dataclass
class TrainingSegment:
    """A turn ready for training: text token ids and Mimi codes (32, frames)."""

    text_tokens: List[int]
    audio_codes: np.ndarray
    train: bool = True

    @property
    def rows(self) -> int:
        return len(self.text_tokens) + self.audio_codes.shape[1] + 1


@dataclass
class Example:
    """One training sequence and where it came from (file:line, for messages)."""

    segments: List[TrainingSegment]
    source: str

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.segments)


def _turn(entry, where: str, data_dir: Path, keys: Sequence[str]) -> Turn:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with {', '.join(keys)}")
    unknown = sorted(set(entry) - set(keys))
    if unknown:
        raise DataError(f"{where}: unknown key {unknown[0]!r} (a clip has {', '.join(keys)})")
    if not isinstance(entry.get("audio"), str) or not entry["audio"].strip():
        raise DataError(f"{where}: no \"audio\": give the path of the clip, relative to {data_dir}")
    text = entry.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: clip {entry['audio']} has no transcript: give its words as \"text\"")
    try:
        speaker = check_speaker(entry.get("speaker", 0))
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    train = entry.get("train", True)
    if not isinstance(train, bool):
        raise DataError(f"{where}: \"train\" must be true or false, got {train!r}")
    audio = data_dir / entry["audio"]
    if not audio.is_file():
        raise DataError(f"{where}: audio file {audio} does not exist")
    return Turn(speaker, " ".join(text.split()), audio, train)


def read_lines(path: Path) -> List[Tuple[str, List[Turn]]]:
    """The lines of a .jsonl file as (file:line, turns); every problem is a DataError."""
    try:
        content = path.read_text()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not a text file ({e})") from None
    lines = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        if isinstance(entry, dict) and "segments" in entry:
            if set(entry) != {"segments"} or not isinstance(entry["segments"], list) or not entry["segments"]:
                raise DataError(f"{where}: a conversation is {{\"segments\": [turn, ...]}} with at least one turn")
            turns = [_turn(t, f"{where}: turn {n}", path.parent, TURN_KEYS) for n, t in enumerate(entry["segments"], 1)]
            if not any(t.train for t in turns):
                raise DataError(f"{where}: every turn is marked \"train\": false, so nothing would be trained")
        else:
            turns = [_turn(entry, where, path.parent, CLIP_KEYS)]
        lines.append((where, turns))
    if not lines:
        raise DataError(f"{path} holds no clips: give one JSON object per line")
    return lines


def _pauses(audio: np.ndarray) -> List[Tuple[float, float]]:
    """(middle in seconds, length in seconds) of every pause of at least MIN_PAUSE_WINDOWS windows."""
    n = len(audio) // PAUSE_WINDOW
    if n == 0:
        return []
    power = (audio[: n * PAUSE_WINDOW].reshape(n, PAUSE_WINDOW) ** 2).mean(axis=1) + 1e-12
    quiet = 10 * np.log10(power / power.max()) < PAUSE_DB
    pauses, start = [], None
    for i, q in enumerate(np.append(quiet, False)):
        if q and start is None:
            start = i
        elif not q and start is not None:
            if i - start >= MIN_PAUSE_WINDOWS:
                pauses.append(((start + i) / 2 * PAUSE_WINDOW / SAMPLE_RATE, (i - start) * PAUSE_WINDOW / SAMPLE_RATE))
            start = None
    return pauses


def split_at_pauses(audio: np.ndarray, text: str, max_seconds: float) -> Optional[List[Tuple[int, int, str]]]:
    """Pieces (start sample, end sample, text) of at most max_seconds, cut at pauses between
    sentences; None when the clip cannot be cut that way.

    Without a forced aligner, where a sentence ends is estimated from its share of the
    characters; the cut goes at the longest pause within 1 s + 10% of the clip of that estimate
    (sentence ends are the longer pauses of read speech). Each piece is made as long as allowed."""
    duration = len(audio) / SAMPLE_RATE
    sentences = split_sentences(text)
    pauses = _pauses(audio)
    if len(sentences) < 2 or not pauses:
        return None
    ends = np.cumsum([len(s) + 1 for s in sentences])[:-1] / (sum(len(s) + 1 for s in sentences))
    tolerance = 1.0 + 0.1 * duration
    cuts = {}  # sentence boundary -> cut time
    for boundary, share in enumerate(ends, 1):
        near = [p for p in pauses if abs(p[0] - share * duration) <= tolerance]
        if near:
            cuts[boundary] = max(near, key=lambda p: p[1])[0]
    pieces, start, first = [], 0.0, 0
    while duration - start > max_seconds:
        fitting = [b for b, t in cuts.items() if b > first and start < t <= start + max_seconds]
        if not fitting:
            return None
        boundary = max(fitting)
        pieces.append((start, cuts[boundary], " ".join(sentences[first:boundary])))
        start, first = cuts[boundary], boundary
    pieces.append((start, duration, " ".join(sentences[first:])))
    return [(int(round(a * SAMPLE_RATE)), int(round(b * SAMPLE_RATE)), t) for a, b, t in pieces]


class CodeCache:
    """Mimi codes of audio pieces, stored as .npy files named by a hash of the samples and the codec."""

    def __init__(self, directory: Path, mimi: Mimi):
        self.directory = directory
        self.mimi = mimi
        # The codes of a fixed probe identify the codec weights without knowing their path.
        probe = np.sin(np.arange(FRAME_SAMPLES, dtype=np.float32) * 0.05) * 0.5
        self._codec_id = hashlib.sha256(mimi.encode(probe).tobytes()).hexdigest()

    def encode(self, audio: np.ndarray) -> np.ndarray:
        key = hashlib.sha256(self._codec_id.encode() + np.ascontiguousarray(audio, np.float32).tobytes()).hexdigest()
        path = self.directory / f"{key}.npy"
        if path.is_file():
            try:
                return np.load(path, allow_pickle=False)
            except (ValueError, OSError):
                pass  # a damaged cache file is encoded again
        codes = self.mimi.encode(audio)
        self.directory.mkdir(exist_ok=True)

        def write(name):
            with open(name, "xb") as f:
                np.save(f, codes, allow_pickle=False)

        write_atomically(path, write)
        return codes


def _clip_pieces(turn: Turn, audio: np.ndarray, max_seconds: float) -> List[Tuple[Turn, np.ndarray]]:
    pieces = split_at_pauses(audio, turn.text, max_seconds) if len(audio) > max_seconds * SAMPLE_RATE else None
    if pieces is None:
        return [(turn, audio)]
    return [(Turn(turn.speaker, text, turn.audio), audio[a:b]) for a, b, text in pieces]


def prepare(
    path: Path,
    mimi: Mimi,
    tokenizer: TextTokenizer,
    window: int,
    max_clip_seconds: float = MAX_CLIP_SECONDS,
    progress: Optional[Callable[[int, int], None]] = None,
) -> List[Example]:
    """The examples of one .jsonl file: each clip (or each piece of a clip longer than
    max_clip_seconds, cut at pauses) or conversation, Mimi-encoded or read from the cache, and
    checked against the backbone's window. progress(done, total) is called after each line."""
    lines = read_lines(path)
    cache = CodeCache(path.parent / CACHE_DIR, mimi)
    examples = []
    for done, (where, turns) in enumerate(lines, 1):
        audio = []
        for turn in turns:
            try:
                audio.append(read_audio(turn.audio, max_seconds=None))  # long clips are cut below
            except AudioError as e:
                raise DataError(f"{where}: {e}") from None
        if len(turns) == 1:
            sequences = [[piece] for piece in _clip_pieces(turns[0], audio[0], max_clip_seconds)]
        else:
            sequences = [list(zip(turns, audio))]
        for sequence in sequences:
            tokens = [tokenizer.encode(turn.text, turn.speaker) for turn, _ in sequence]
            # Checked before encoding, so a clip too long fails at once, not after Mimi.
            rows = sum(len(t) + -(-len(a) // FRAME_SAMPLES) + 1 for t, (_, a) in zip(tokens, sequence))
            if rows > window:
                what = (f"{turns[0].audio} ({len(audio[0]) / SAMPLE_RATE:.1f} s)" if len(turns) == 1
                        else "the conversation")
                raise DataError(f"{where}: {what} needs {rows} rows with its text, more than the model's "
                                f"{window}-row window: cut it into clips of about 10 s")
            if len(sequence) == 1 and len(sequence[0][1]) > max_clip_seconds * SAMPLE_RATE:
                log.warning("%s: %s is %.1f s, longer than %g s, with no pause between sentences to cut at: "
                            "kept whole", where, turns[0].audio, len(sequence[0][1]) / SAMPLE_RATE, max_clip_seconds)
            segments = [TrainingSegment(t, cache.encode(a), turn.train) for t, (turn, a) in zip(tokens, sequence)]
            examples.append(Example(segments, where))
        if progress is not None:
            progress(done, len(lines))
    return examples
