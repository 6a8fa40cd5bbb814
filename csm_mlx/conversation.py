"""A conversation that remembers: every turn becomes context for the next.

The backbone's KV cache is kept between turns: the next prompt shares the previous one's rows
up to where they differ (normally all of it: the previous prompt, then the frames it generated),
so only the new rows are prefilled. Turns that no longer fit the window are dropped oldest
first, never a pinned voice prompt.
"""

import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .context import fit_context
from .frames import (
    TokenizedSegment,
    audio_rows,
    generate_frames,
    prompt_rows,
    seeded_sampler,
    stack_frames,
)
from .options import FRAME_MS, check_options, check_text
from .segment import Segment, Speech, check_speaker
from .text import chunk_text

if TYPE_CHECKING:
    from .api import CSM


def max_audio_seconds(text: str) -> float:
    """The default frame cap: 3 s plus 0.12 s per non-space character. Speech runs at about
    12-15 characters a second, so a slow speaker gets ~50% headroom, while a model that never
    says it is done stops soon after the text could have been spoken."""
    return 3.0 + 0.12 * len("".join(text.split()))


def expected_seconds(text: str) -> float:
    """A rough length of text spoken at a conversational ~150 words per minute (0.4 s a word) plus
    half a second; used to plan playback, never to cut speech."""
    return 0.5 + 0.4 * len(text.split())


def frame_cap(text: str, max_audio_length_ms: Optional[float]) -> int:
    """Frames a chunk may take: max_audio_length_ms (checked: at least one frame), else from its length."""
    seconds = max_audio_seconds(text) if max_audio_length_ms is None else max_audio_length_ms / 1000
    return max(1, int(seconds * 1000 / FRAME_MS))


def until_repeats(frames: Iterator[np.ndarray], repeats: Optional[int]) -> Iterator[np.ndarray]:
    """Stop once codebook 0 has been the same for `repeats` frames in a row: the run-on of a
    model stuck in silence or a loop (the run's first repeats-1 frames are kept)."""
    run, last = 0, None
    for frame in frames:
        run = run + 1 if frame[0] == last else 1
        last = frame[0]
        if repeats is not None and run >= repeats:
            return
        yield frame


def _common_prefix(a: Tuple[np.ndarray, np.ndarray], b: Tuple[np.ndarray, np.ndarray]) -> int:
    n = min(len(a[0]), len(b[0]))
    same = (a[0][:n] == b[0][:n]).all(axis=1) & (a[1][:n] == b[1][:n]).all(axis=1)
    return n if same.all() else int(np.argmin(same))


class Conversation:
    """Turns spoken so far (given or generated) and the backbone cache over them."""

    def __init__(self, csm: "CSM", context: Sequence[Segment] = (), reuse_cache: bool = True):
        self.csm = csm
        self.history: List[TokenizedSegment] = [csm.tokenize(s) for s in context]
        self.reuse_cache = reuse_cache
        self._cache = None
        self._cached_rows: Optional[Tuple[np.ndarray, np.ndarray]] = None
        self.prefilled_rows: List[int] = []  # rows run through the backbone before each turn's first frame

    def add(self, segment: Segment) -> None:
        """A turn that was spoken, not generated (its audio, if any, becomes context)."""
        self.history.append(self.csm.tokenize(segment))

    def prompt(self, text_tokens: Sequence[int], max_frames: int) -> Tuple[np.ndarray, np.ndarray]:
        """Prompt rows for the next turn: the turns that fit, then its text."""
        window = self.csm.model.args.backbone.max_seq_len
        keep = fit_context([s.rows for s in self.history], [s.pinned for s in self.history],
                           len(text_tokens) + max_frames, window)
        return prompt_rows([self.history[i] for i in keep], text_tokens, self.csm.model.args.audio_num_codebooks)

    def _start(self, rows: Tuple[np.ndarray, np.ndarray]) -> int:
        """Make the cache hold a prefix of rows; return how many rows it holds."""
        if not self.reuse_cache or self._cache is None:
            self._cache = self.csm.model.backbone.make_cache()
            self._cached_rows = (rows[0][:0], rows[1][:0])
        # at least one new row must run through the backbone to predict the first frame
        keep = min(_common_prefix(self._cached_rows, rows), len(rows[0]) - 1)
        for layer in self._cache:
            layer.trim(layer.offset - keep)
        return keep

    def frames(
        self,
        text: str,
        speaker: int = 0,
        *,
        chunk_chars: int = 250,
        max_audio_length_ms: Optional[float] = None,
        temperature: float = 0.9,
        top_k: int = 50,
        top_p: float = 0.0,
        min_p: float = 0.0,
        seed: Optional[int] = None,
        stop_after_repeats: Optional[int] = None,
    ) -> Iterator[np.ndarray]:
        """Frames (32,) of the next turn as they are generated; the turn joins the history when
        the iteration ends (also when it is stopped early: what was generated is kept).

        Text longer than chunk_chars (0: never) is spoken chunk by chunk (sentences, then
        clauses), each chunk a turn of its own, so the chunks before are its context and the
        voice stays the same. Each chunk stops at the model's end of speech or at its frame cap:
        max_audio_length_ms, or by default one from its length (max_audio_seconds);
        stop_after_repeats ends it after that many frames with the same codebook-0 code.
        temperature 0 is greedy; top_k, top_p, min_p of 0 are off; seed makes sampling
        repeatable (one seed for the whole text). Bad input fails here, not at the first frame."""
        text = check_text(text)
        options = check_options(speaker=speaker, chunk_chars=chunk_chars, max_audio_length_ms=max_audio_length_ms,
                                temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                                stop_after_repeats=stop_after_repeats)
        speaker, chunk_chars, seed = options.pop("speaker"), options.pop("chunk_chars"), options.pop("seed")
        max_audio_length_ms, stop_after_repeats = options.pop("max_audio_length_ms"), options.pop("stop_after_repeats")
        chunks = chunk_text(text, chunk_chars) if chunk_chars else [text]
        sampling = options

        def speak():
            for n, chunk in enumerate(chunks):
                yield from self._chunk_frames(chunk, speaker, max_audio_length_ms, stop_after_repeats,
                                              seed=seed if n == 0 else None, **sampling)

        return speak()

    def _chunk_frames(self, text, speaker, max_audio_length_ms, stop_after_repeats, **sampling):
        text_tokens = self.csm.tokenizer.encode(text, speaker)
        max_frames = frame_cap(text, max_audio_length_ms)
        rows = self.prompt(text_tokens, max_frames)
        sampler = seeded_sampler(**sampling)
        cached = self._start(rows)
        self.prefilled_rows.append(len(rows[0]) - cached)
        source = generate_frames(self.csm.model, rows[0][cached:], rows[1][cached:], sampler, max_frames,
                                 cache=self._cache)
        kept: List[np.ndarray] = []
        try:
            for frame in until_repeats(source, stop_after_repeats):
                kept.append(frame)
                yield frame
        finally:
            source.close()
            self._finish(rows, TokenizedSegment(text_tokens, stack_frames(kept)))

    def _finish(self, rows: Tuple[np.ndarray, np.ndarray], turn: TokenizedSegment) -> None:
        """Record the turn; trim the cache to the rows it holds that the next prompt will share:
        the prompt, then the frames that were both kept and fed back."""
        self.history.append(turn)
        fed = self._cache[0].offset - len(rows[0])
        if fed < 0:  # stopped before the prompt was in: start afresh next turn
            self._cache = None
            return
        valid = min(fed, turn.audio_codes.shape[1])
        for layer in self._cache:
            layer.trim(fed - valid)
        frame_tokens, frame_mask = audio_rows(turn.audio_codes[:, :valid])
        self._cached_rows = (np.concatenate([rows[0], frame_tokens[:-1]]), np.concatenate([rows[1], frame_mask[:-1]]))

    def say(self, text: str, speaker: int = 0, **kwargs) -> Speech:
        """Generate the next turn and decode it; arguments as for frames()."""
        return self.csm.speech(stack_frames(list(self.frames(text, speaker, **kwargs))))


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


class ScriptError(ValueError):
    """A dialogue script that cannot be read; the message names the file and the turn."""


def read_script(path) -> List[Segment]:
    """Turns of a script: JSON/YAML (.json, .yaml, .yml) holding a list of {speaker, text, audio?}
    (audio paths relative to the file), or text lines "[speaker] text" (blank lines skipped)."""
    import yaml  # only scripts need it

    from .audio import AudioError, read_audio

    path = Path(path)
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScriptError(f"script {path} does not exist") from None
    except IsADirectoryError:
        raise ScriptError(f"script {path} is a directory: give a text, JSON or YAML file") from None
    except UnicodeDecodeError:
        raise ScriptError(f"script {path} is not UTF-8 text: convert it, e.g. with iconv -t UTF-8") from None
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        try:
            turns = yaml.safe_load(content)  # YAML is a superset of JSON
        except yaml.YAMLError as e:
            raise ScriptError(f"{path} is not valid JSON/YAML ({e})") from None
        if not isinstance(turns, list):
            raise ScriptError(f"{path} must hold a list of turns")
    else:
        turns = []
        for number, line in enumerate(content.splitlines(), 1):
            if line.strip():
                tag = re.fullmatch(r"\s*\[(\d+)\]\s*(.+)", line)
                if tag is None:
                    raise ScriptError(f"{path}:{number}: expected '[speaker] text', e.g. '[0] Hello'")
                turns.append({"speaker": int(tag.group(1)), "text": tag.group(2).strip()})
    segments = []
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or not isinstance(turn.get("text"), str) or not turn["text"].strip():
            raise ScriptError(f"{path}: turn {n} needs a speaker and a non-empty text")
        try:
            speaker = check_speaker(turn.get("speaker"))
        except ValueError as e:
            raise ScriptError(f"{path}: turn {n}: {e}") from None
        audio, source = None, None
        if turn.get("audio"):
            source = path.parent / str(turn["audio"])
            try:
                audio = read_audio(source)
            except AudioError as e:
                raise ScriptError(f"{path}: turn {n}: {e}") from None
        segments.append(Segment(speaker, turn["text"], audio, source=source))
    if not segments:
        raise ScriptError(f"{path} holds no turns")
    return segments
