"""Mimi, the audio codec, through rustymimi: up to 32 codes per 80 ms frame <-> 24 kHz mono audio.

Mimi is a residual quantizer: its first N codebooks are a coarser code of the same audio, and
decoding any prefix of them gives audio (csm-1b uses all 32, Moshi 8). rustymimi fixes N when an
instance is loaded, so an instance is reloaded (~0.3 s) when a stream asks for another N.

rustymimi's one-pass decode and encode hold the whole clip (about 2 GB of working memory for
30 s) and its decode panics past 4096 frames. Here both run on Mimi's streaming state, one
frame per step, so memory stays flat with length. Decoding a frame per step gives the same
samples however the frames are grouped into chunks (a stream, a file, a server response);
they equal the one-pass decode to ~1e-6. Encoding in steps (of any number of frames) gives exactly
the codes of the one-pass encode, which is faster, so clips up to ONE_PASS_ENCODE_FRAMES still
take it; longer ones go ENCODE_STEP_FRAMES at a time.

The streaming decoder too stops at 4096 frames (its RoPE table ends there, 5.5 minutes), and
its attention remembers everything before. rustymimi's reset() does not rewind those positions
(a second decode after a reset differs from a fresh instance's by ~1e-6), so a long-lived
process would hit the limit across many short streams: once RELOAD_AFTER positions are used,
a reset loads a fresh instance. A stream longer than the limit restarts the state and first
feeds it the last WARMUP_FRAMES again (their audio discarded): past that point the audio is a
close continuation, not the samples an endless decoder would give (none exists to compare with).
"""

import collections
import os
from typing import Iterable, Iterator

import numpy as np
import rustymimi

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920  # 80 ms at 24 kHz
NUM_CODEBOOKS = 32  # Mimi's codebooks; a model may use fewer
# 10 s: the one-pass encode needs ~0.7 GB for it and is ~2x faster than stepping.
ONE_PASS_ENCODE_FRAMES = 125
ENCODE_STEP_FRAMES = 8  # frames per encoder step past that: 0.03 s a frame on the x86 VM, against 0.08 s one at a time
STREAM_FRAMES = 4096  # positions of the streaming decoder's RoPE table
WARMUP_FRAMES = 250  # 20 s of context carried over a restart
RELOAD_AFTER = 1024  # positions used before a reset reloads (~0.4 s), leaving a stream >= 3072 frames


class CodecError(ValueError):
    """Mimi weights or codes that cannot be used; the message says what to do."""


class Mimi:
    """num_codebooks: how many codes per frame encode() gives (the model's); decode() takes any
    number from 1 to 32 (the first codebooks of a frame)."""

    def __init__(self, path: os.PathLike, num_codebooks: int = NUM_CODEBOOKS, stream_frames: int = STREAM_FRAMES,
                 warmup_frames: int = WARMUP_FRAMES, reload_after: int = RELOAD_AFTER):
        if not 1 <= num_codebooks <= NUM_CODEBOOKS:
            raise CodecError(f"Mimi has {NUM_CODEBOOKS} codebooks; {num_codebooks} cannot be used")
        self.path = path
        self.num_codebooks = num_codebooks
        self._loaded_codebooks = num_codebooks  # what the rustymimi instance is built for
        self.stream_frames, self.warmup_frames, self.reload_after = stream_frames, warmup_frames, reload_after
        self._recent: collections.deque = collections.deque(maxlen=warmup_frames)
        self._position = 0  # frames the decoder state holds since its restart
        self._used = 0  # steps run since the instance was loaded (reset() does not rewind them)
        self._load()

    def _load(self) -> None:
        try:
            self._mimi = rustymimi.Tokenizer(str(self.path), num_codebooks=self._loaded_codebooks)
        except Exception as e:  # rustymimi raises bare exceptions for missing or malformed files
            raise CodecError(
                f"{self.path} cannot be loaded as Mimi weights ({e}): expected "
                "kyutai/moshiko-pytorch-bf16's tokenizer-e351c8d8-checkpoint125.safetensors"
            ) from None
        self._used = 0

    @property
    def loaded_codebooks(self) -> int:
        """The codes per frame the instance decodes without a reload."""
        return self._loaded_codebooks

    def prepare(self, n_codebooks: int) -> None:
        """Load the instance for frames of n_codebooks codes now, rather than at the first
        frame of the next stream (a server does it between two frames of its engine)."""
        self._use(n_codebooks, in_stream=False)

    def _use(self, n_codebooks: int, in_stream: bool) -> None:
        """Make the instance take frames of n_codebooks codes: a fresh instance when it takes
        others, which a stream under way (in_stream) cannot change to."""
        if n_codebooks != self._loaded_codebooks:
            if in_stream and self._position:
                raise CodecError(f"a stream of {self._loaded_codebooks}-code frames cannot go on with "
                                 f"{n_codebooks}-code frames")
            self._loaded_codebooks = n_codebooks
            self._load()
            self._recent.clear()
            self._position = 0

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes (N, T) -> float32 audio (T * 1920,), from a fresh streaming state."""
        chunks = list(self.decode_chunks([codes]))
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)

    def decode_chunks(self, chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Audio for each chunk of codes (N, T_i) in turn, one streaming state across them all
        (reset at the start), so the audio joins with no seam and memory stays flat."""
        self.reset()
        for codes in chunks:
            yield self.decode_step(codes)

    def decode_step(self, codes: np.ndarray) -> np.ndarray:
        """Codes (N, T) -> audio (T * 1920,), continuing the streaming state."""
        # rustymimi takes one C-contiguous (1, N, 1) frame per step.
        frames = np.ascontiguousarray(_as_codes(codes).transpose(2, 0, 1)[..., None])
        if not len(frames):
            return np.zeros(0, np.float32)
        self._use(frames.shape[2], in_stream=True)
        return np.concatenate([self._decode_frame(frame) for frame in frames])

    def _decode_frame(self, frame: np.ndarray) -> np.ndarray:
        if self._position == self.stream_frames:
            self._load()
            for earlier in self._recent:
                self._step(earlier)
            self._position = len(self._recent)
        self._recent.append(frame)
        self._position += 1
        return self._step(frame)[0, 0]

    def _step(self, frame: np.ndarray) -> np.ndarray:
        self._used += 1
        return self._mimi.decode_step(frame)

    @property
    def worn(self) -> bool:
        """Whether reset() will load a fresh instance (this one has used RELOAD_AFTER positions)."""
        return self._used >= self.reload_after

    def reset(self) -> None:
        """A fresh streaming state (a fresh instance once this one is worn)."""
        if self.worn:
            self._load()
        else:
            self._mimi.reset()
        self._recent.clear()
        self._position = 0

    def encode(self, audio: np.ndarray) -> np.ndarray:
        """24 kHz mono audio (S,) -> codes (num_codebooks, ceil(S / 1920)) as int32."""
        audio = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
        self._use(self.num_codebooks, in_stream=False)
        n_frames = -(-len(audio) // FRAME_SAMPLES)
        if n_frames <= ONE_PASS_ENCODE_FRAMES:
            return self._mimi.encode(audio.reshape(1, 1, -1))[0].astype(np.int32)
        self.reset()
        step = ENCODE_STEP_FRAMES * FRAME_SAMPLES
        try:
            return np.concatenate([self.encode_step(audio[i : i + step]) for i in range(0, len(audio), step)], axis=-1)
        finally:
            self.reset()

    def encode_step(self, audio: np.ndarray) -> np.ndarray:
        """24 kHz audio of one frame or more -> their codes (num_codebooks, frames) as int32,
        continuing the encoder's streaming state (reset() starts a new one). A partial last frame
        is padded with zeros. Step by step, a clip gets exactly the codes encode() gives it, in
        steps of any number of frames; steps of several frames cost less per frame."""
        audio = np.asarray(audio, np.float32).reshape(-1)
        frames = np.zeros((1, 1, -(-len(audio) // FRAME_SAMPLES) * FRAME_SAMPLES), np.float32)
        frames[0, 0, : len(audio)] = audio
        self._use(self.num_codebooks, in_stream=False)
        self._used += frames.shape[2] // FRAME_SAMPLES
        return self._mimi.encode_step(frames)[0].astype(np.int32)


def _as_codes(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or not 1 <= codes.shape[0] <= NUM_CODEBOOKS:
        raise CodecError(f"expected codes of shape (codebooks, frames) with 1 to {NUM_CODEBOOKS} codebooks, "
                         f"got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= 2048):
        raise CodecError("Mimi codes must lie in 0..2047")
    return np.ascontiguousarray(codes, dtype=np.uint32)[None]
