"""Text (and conversation context) in, 24 kHz speech out: the API for apps.

    from csm_mlx import CSM, Segment
    csm = CSM.load()                              # sesame/csm-1b, Mimi and the tokenizer from the hub
    speech = csm.generate("Hello there.", speaker=0)
    speech.audio, speech.sample_rate              # float32 numpy array, 24000
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from . import hub
from .audio import AudioError, read_audio
from .checkpoint import load_model
from .codec import SAMPLE_RATE, Mimi
from .generation import FRAME_MS, TokenizedSegment, frames, generate_batch
from .models import Model
from .tokenizer import TextTokenizer

MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_REPO = "unsloth/Llama-3.2-1B"  # an ungated copy of the Llama-3.2 tokenizer
TOKENIZER_FILE = "tokenizer.json"

# The reference demo's voice prompts (files in the sesame/csm-1b repo) and their transcripts.
VOICES: Dict[str, str] = {
    "conversational_a": (
        "like revising for an exam I'd have to try and like keep up the momentum because I'd "
        "start really early I'd be like okay I'm gonna start revising now and then like "
        "you're revising for ages and then I just like start losing steam I didn't do that "
        "for the exam we had recently to be fair that was a more of a last minute scenario "
        "but like yeah I'm trying to like yeah I noticed this yesterday that like Mondays I "
        "sort of start the day with this not like a panic but like a"
    ),
    "conversational_b": (
        "like a super Mario level. Like it's very like high detail. And like, once you get "
        "into the park, it just like, everything looks like a computer game and they have all "
        "these, like, you know, if, if there's like a, you know, like in a Mario game, they "
        "will have like a question block. And if you like, you know, punch it, a coin will "
        "come out. So like everyone, when they come into the park, they get like this little "
        "bracelet and then you can go punching question blocks around."
    ),
}


@dataclass
class Segment:
    """One turn of a conversation: who spoke, what they said, and (for context) how it sounded.

    audio is 24 kHz mono float32; use csm_mlx.audio.read_audio to load any file."""

    speaker: int
    text: str
    audio: Optional[np.ndarray] = None


@dataclass
class Speech:
    audio: np.ndarray  # float32 (samples,)
    sample_rate: int
    codes: np.ndarray  # Mimi codes (32, frames)

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


def expected_seconds(text: str) -> float:
    """A rough length of text spoken at a conversational ~150 words per minute (0.4 s a word) plus
    half a second; used to plan playback, never to cut speech."""
    return 0.5 + 0.4 * len(text.split())


def _max_frames(max_audio_length_ms: float) -> int:
    """The frame cap, as the reference computes it."""
    max_frames = int(max_audio_length_ms / FRAME_MS)
    if max_frames < 1:
        raise ValueError(f"max_audio_length_ms must be at least {FRAME_MS} (one frame)")
    return max_frames


def check_speaker(speaker) -> int:
    if isinstance(speaker, bool) or not isinstance(speaker, (int, np.integer)) or speaker < 0:
        raise ValueError(f"speaker must be a non-negative integer, got {speaker!r}")
    return int(speaker)


def _local_or_hub(explicit: Optional[os.PathLike], beside_model: Path, repo: str, filename: str) -> Path:
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        return path
    if beside_model.is_file():
        return beside_model
    return hub.download(repo, [filename]) / filename


def find_tokenizer(model_dir: Path, explicit: Optional[os.PathLike] = None) -> Path:
    """The tokenizer.json to use: explicit, else beside the model, else the ungated hub copy."""
    return _local_or_hub(explicit, model_dir / TOKENIZER_FILE, TOKENIZER_REPO, TOKENIZER_FILE)


def find_mimi(model_dir: Path, explicit: Optional[os.PathLike] = None) -> Path:
    """The Mimi weights to use: explicit, else beside the model, else Kyutai's hub repo."""
    return _local_or_hub(explicit, model_dir / MIMI_FILE, MIMI_REPO, MIMI_FILE)


class CSM:
    sample_rate = SAMPLE_RATE

    def __init__(self, model: Model, tokenizer: TextTokenizer, mimi: Mimi, model_dir: Optional[Path] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.mimi = mimi
        self.model_dir = model_dir

    @classmethod
    def load(
        cls,
        model: str = hub.DEFAULT_MODEL,
        *,
        tokenizer: Optional[os.PathLike] = None,
        mimi: Optional[os.PathLike] = None,
        dtype: Optional[str] = None,
    ) -> "CSM":
        """Load a model (hub id, or a directory in original, transformers or MLX format).

        The tokenizer and Mimi weights come from the given paths, else from beside the
        model (a self-contained converted directory), else from the hub."""
        model_dir = hub.resolve_model(model)
        tokenizer_path, mimi_path = find_tokenizer(model_dir, tokenizer), find_mimi(model_dir, mimi)
        csm_model, _ = load_model(model_dir, dtype=dtype)
        return cls(csm_model, TextTokenizer(tokenizer_path), Mimi(mimi_path), model_dir)

    def voice(self, name: str, speaker: int = 0) -> Segment:
        """A voice preset of the reference demo as a context segment for speaker."""
        if name not in VOICES:
            raise ValueError(f"unknown voice {name!r}: choose one of {', '.join(VOICES)}")
        filename = f"prompts/{name}.wav"
        local = self.model_dir / filename if self.model_dir else None
        path = local if local is not None and local.is_file() else hub.download(hub.DEFAULT_MODEL, [filename]) / filename
        return Segment(speaker, VOICES[name], read_audio(path))

    def tokenize(self, segment: Segment) -> TokenizedSegment:
        check_speaker(segment.speaker)
        codes = None
        if segment.audio is not None:
            audio = np.asarray(segment.audio, dtype=np.float32)
            if audio.ndim != 1 or audio.size == 0:
                raise AudioError(f"context audio of speaker {segment.speaker} must be non-empty mono (samples,)")
            codes = self.mimi.encode(audio)
        return TokenizedSegment(self.tokenizer.encode(segment.text, segment.speaker), codes)

    def frames(
        self,
        text: str,
        speaker: int = 0,
        context: Sequence[Segment] = (),
        *,
        max_audio_length_ms: float = 10_000,
        temperature: float = 0.9,
        top_k: int = 50,
        top_p: float = 0.0,
        min_p: float = 0.0,
        seed: Optional[int] = None,
    ) -> Iterator[np.ndarray]:
        """Mimi frames (32,) of text spoken by speaker after the context, as they are generated.

        Stops at the model's end of speech or after max_audio_length_ms (the frame cap).
        temperature 0 is greedy; top_k / top_p / min_p of 0 are off; seed makes sampling repeatable."""
        if not text or not text.strip():
            raise ValueError("text is empty: give the words to speak")
        return frames(
            self.model,
            self.tokenizer.encode(text, check_speaker(speaker)),
            [self.tokenize(s) for s in context],
            max_frames=_max_frames(max_audio_length_ms),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seed=seed,
        )

    def generate(
        self,
        text: str,
        speaker: int = 0,
        context: Sequence[Segment] = (),
        *,
        on_frame: Optional[Callable[[int], None]] = None,
        **sampling,
    ) -> Speech:
        """Speak text as speaker after the context turns; sampling arguments as for frames().
        on_frame(n) is called after each frame."""
        codes = []
        for frame in self.frames(text, speaker, context, **sampling):
            codes.append(frame)
            if on_frame is not None:
                on_frame(len(codes))
        return self._speech(np.stack(codes, axis=1) if codes else np.zeros((32, 0), np.int32))

    def _speech(self, codes: np.ndarray) -> Speech:
        audio = self.mimi.decode(codes) if codes.shape[1] else np.zeros(0, np.float32)
        return Speech(audio, self.sample_rate, codes)

    def generate_batch(
        self,
        texts: Sequence[str],
        speaker: int = 0,
        context: Sequence[Segment] = (),
        *,
        max_audio_length_ms: float = 10_000,
        temperature: float = 0.9,
        top_k: int = 50,
        top_p: float = 0.0,
        min_p: float = 0.0,
        seed: Optional[int] = None,
    ) -> List[Speech]:
        """Speak several texts at once after the same context (a voice prompt, say).

        Generation reads the weights once per step for the whole batch, so n texts take
        little more time than one; greedy, each text gets the audio it gets alone."""
        if not texts or any(not t or not t.strip() for t in texts):
            raise ValueError("every text of a batch must be non-empty")
        speaker = check_speaker(speaker)
        shared = [self.tokenize(s) for s in context]
        codes = generate_batch(
            self.model,
            [(self.tokenizer.encode(t, speaker), shared) for t in texts],
            max_frames=_max_frames(max_audio_length_ms),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seed=seed,
        )
        return [self._speech(c) for c in codes]

    def stream(
        self,
        text: str,
        speaker: int = 0,
        context: Sequence[Segment] = (),
        *,
        chunk_frames: int = 1,
        **sampling,
    ) -> Iterator[np.ndarray]:
        """Audio chunks (float32, chunk_frames * 1920 samples; the last may be shorter) as frames
        are generated; sampling arguments as for frames().

        Decoding is Mimi's streaming decoder: one state for the whole stream, reset when a
        stream starts, so chunks join with no seam. One stream at a time per CSM object."""
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be at least 1, got {chunk_frames}")
        source = self.frames(text, speaker, context, **sampling)
        self.mimi.reset()
        pending = []
        for frame in source:
            pending.append(frame)
            if len(pending) == chunk_frames:
                yield self.mimi.decode_step(np.stack(pending, axis=1))
                pending.clear()
        if pending:
            yield self.mimi.decode_step(np.stack(pending, axis=1))
