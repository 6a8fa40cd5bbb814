"""Streaming audio containers: one encoder per response, fed 24 kHz float32 chunks as they are
decoded, giving bytes as soon as the container has them (no per-chunk files, no seams).

wav (a header with unknown length, then PCM16), pcm (raw PCM16), mp3 (lameenc, no Xing header),
opus in Ogg and aac in ADTS through PyAV (FFmpeg), writing to a sink that cannot seek, so no muxer
goes back to patch a header. FLAC is the exception: libsndfile (soundfile, librosa) reads a
STREAMINFO of unknown length as an endless file, so a FLAC response is written whole into a
seekable buffer, its length and MD5 patched in at the end, and sent when it is complete.
speed != 1 is FFmpeg's atempo filter (pitch kept)."""

import io
import struct
from fractions import Fraction
from typing import Dict, List, Tuple

import av
import lameenc
import numpy as np

from ..codec import SAMPLE_RATE

MEDIA_TYPES: Dict[str, str] = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
FORMATS = tuple(MEDIA_TYPES)
WHOLE_FORMATS = ("flac",)  # sent when complete: their readers need the length in the header
MP3_KBPS = 64  # speech at 24 kHz mono
# FFmpeg (container, codec, bit rate, muxer options): Ogg pages of ~20 ms, or libogg emits them in
# bursts of a second
AV_FORMATS: Dict[str, Tuple[str, str, int, Dict[str, str]]] = {
    "opus": ("ogg", "libopus", 48_000, {"page_duration": "20000"}),
    "aac": ("adts", "aac", 64_000, {}),
    "flac": ("flac", "flac", 0, {}),
}


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] as 16-bit signed little-endian samples (clipped, rounded)."""
    return np.round(np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")


class Encoder:
    """encode(audio) -> bytes ready now; finish() -> the rest."""

    def encode(self, audio: np.ndarray) -> bytes:
        raise NotImplementedError

    def finish(self) -> bytes:
        return b""


class PcmEncoder(Encoder):
    def encode(self, audio: np.ndarray) -> bytes:
        return to_pcm16(audio).tobytes()


class WavEncoder(PcmEncoder):
    """A RIFF header whose sizes say "unknown" (0xFFFFFFFF), as streaming players expect, then PCM16."""

    def __init__(self):
        self._header = (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
                        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16)
                        + b"data" + struct.pack("<I", 0xFFFFFFFF))

    def encode(self, audio: np.ndarray) -> bytes:
        header, self._header = self._header, b""
        return header + super().encode(audio)

    def finish(self) -> bytes:
        return self._header


class Mp3Encoder(Encoder):
    def __init__(self):
        self._lame = lameenc.Encoder()
        self._lame.set_bit_rate(MP3_KBPS)
        self._lame.set_in_sample_rate(SAMPLE_RATE)
        self._lame.set_channels(1)
        self._lame.set_quality(2)

    def encode(self, audio: np.ndarray) -> bytes:
        return bytes(self._lame.encode(to_pcm16(audio).tobytes()))

    def finish(self) -> bytes:
        return bytes(self._lame.flush())


class _Sink:
    """A write-only file for PyAV: with no seek(), muxers write a streamable file."""

    def __init__(self):
        self._parts: List[bytes] = []

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class AvEncoder(Encoder):
    def __init__(self, fmt: str):
        container, codec, bit_rate, options = AV_FORMATS[fmt]
        self._whole = fmt in WHOLE_FORMATS
        self._sink = io.BytesIO() if self._whole else _Sink()
        self._container = av.open(self._sink, mode="w", format=container, options=options)
        self._stream = self._container.add_stream(codec, rate=SAMPLE_RATE, layout="mono")
        if bit_rate:
            self._stream.bit_rate = bit_rate
        context = self._stream.codec_context
        # flac gets the same PCM16 samples as wav and pcm (lossless); the lossy codecs get floats
        self._pcm16 = context.format.name.startswith("s16")
        self._frame_size = context.frame_size or 1152
        self._fifo = av.AudioFifo()
        self._resampler = av.AudioResampler(format=context.format.name, layout="mono", rate=SAMPLE_RATE)
        self._pts = 0

    def _frames(self, audio: np.ndarray):
        if self._pcm16:
            frame = av.AudioFrame.from_ndarray(to_pcm16(audio).astype(np.int16)[None], format="s16", layout="mono")
        else:
            frame = av.AudioFrame.from_ndarray(np.asarray(audio, np.float32)[None], format="flt", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts, frame.time_base = self._pts, Fraction(1, SAMPLE_RATE)
        self._pts += len(audio)
        return self._resampler.resample(frame)

    def _mux(self, frame) -> None:
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def encode(self, audio: np.ndarray) -> bytes:
        if len(audio):
            for frame in self._frames(audio):
                self._fifo.write(frame)
        while self._fifo.samples >= self._frame_size:
            self._mux(self._fifo.read(self._frame_size))
        return b"" if self._whole else self._sink.take()

    def finish(self) -> bytes:
        if self._fifo.samples:
            self._mux(self._fifo.read())
        self._mux(None)
        self._container.close()  # a seekable sink gets its header patched here
        return self._sink.getvalue() if self._whole else self._sink.take()


def make_encoder(fmt: str) -> Encoder:
    if fmt in AV_FORMATS:
        return AvEncoder(fmt)
    return {"wav": WavEncoder, "pcm": PcmEncoder, "mp3": Mp3Encoder}[fmt]()


class Tempo:
    """Speed change without a pitch change: FFmpeg's atempo, chained for factors below 0.5."""

    def __init__(self, speed: float):
        self._graph = av.filter.Graph()
        nodes = [self._graph.add_abuffer(format="flt", sample_rate=SAMPLE_RATE, layout="mono",
                                         time_base=Fraction(1, SAMPLE_RATE))]
        while speed < 0.5:
            nodes.append(self._graph.add("atempo", "0.5"))
            speed /= 0.5
        nodes.append(self._graph.add("atempo", repr(speed)))
        nodes.append(self._graph.add("abuffersink"))
        self._graph.link_nodes(*nodes).configure()
        self._pts = 0

    def _pull(self) -> np.ndarray:
        out = []
        while True:
            try:
                out.append(self._graph.pull().to_ndarray().reshape(-1))
            except (av.BlockingIOError, av.EOFError):
                return np.concatenate(out) if out else np.zeros(0, np.float32)

    def process(self, audio: np.ndarray) -> np.ndarray:
        frame = av.AudioFrame.from_ndarray(np.asarray(audio, np.float32)[None], format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, self._pts, Fraction(1, SAMPLE_RATE)
        self._pts += len(audio)
        self._graph.push(frame)
        return self._pull()

    def finish(self) -> np.ndarray:
        self._graph.push(None)
        return self._pull()
