"""Mimi, the audio codec, through rustymimi: 32 codes per 80 ms frame <-> 24 kHz mono audio."""

import os

import numpy as np
import rustymimi

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920  # 80 ms at 24 kHz
NUM_CODEBOOKS = 32


class CodecError(ValueError):
    """Mimi weights or codes that cannot be used; the message says what to do."""


class Mimi:
    def __init__(self, path: os.PathLike):
        self.path = path  # another instance, for another stream, loads the same weights
        try:
            # rustymimi's default is 8 codebooks; CSM uses all 32.
            self._mimi = rustymimi.Tokenizer(str(path), num_codebooks=NUM_CODEBOOKS)
        except Exception as e:  # rustymimi raises bare exceptions for missing or malformed files
            raise CodecError(
                f"{path} cannot be loaded as Mimi weights ({e}): expected "
                "kyutai/moshiko-pytorch-bf16's tokenizer-e351c8d8-checkpoint125.safetensors"
            ) from None

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes (32, T) -> float32 audio (T * 1920,). Resets the streaming state."""
        return self._mimi.decode(_as_codes(codes))[0, 0]

    def decode_step(self, codes: np.ndarray) -> np.ndarray:
        """Codes (32, T) -> audio (T * 1920,), continuing the streaming state."""
        # rustymimi takes one C-contiguous (1, 32, 1) frame per step.
        frames = np.ascontiguousarray(_as_codes(codes).transpose(2, 0, 1)[..., None])
        return np.concatenate([self._mimi.decode_step(frame)[0, 0] for frame in frames])

    def reset(self) -> None:
        self._mimi.reset()

    def encode(self, audio: np.ndarray) -> np.ndarray:
        """24 kHz mono audio (N,) -> codes (32, ceil(N / 1920)) as int32."""
        pcm = np.ascontiguousarray(audio, dtype=np.float32).reshape(1, 1, -1)
        return self._mimi.encode(pcm)[0].astype(np.int32)


def _as_codes(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] != NUM_CODEBOOKS:
        raise CodecError(f"expected codes of shape (32, frames), got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= 2048):
        raise CodecError("Mimi codes must lie in 0..2047")
    return np.ascontiguousarray(codes, dtype=np.uint32)[None]
