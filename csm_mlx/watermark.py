"""SilentCipher's 44.1 kHz audio watermark (Sony), the mark the reference puts on all CSM speech, in MLX.

    wm = Watermarker.load()                        # Sony/SilentCipher from the hub (or a directory)
    marked = wm.watermark(audio_24k, PUBLIC_KEY)   # 24 -> 44.1 -> 24 kHz, same length
    key, confidence = wm.verify(marked, 24_000)    # PUBLIC_KEY, with the phase search

Embedding works on the STFT magnitude (n_fft 4096, hop 2048): a carrier encoder and a carrier
decoder turn the magnitude and a 5-byte key into an attenuation of the 0-11 kHz bins, one
two-bit symbol per STFT frame, the 21-frame message repeating over the clip. A message decoder
reads the symbols back. Every layer is BatchNorm(conv(x) * sigmoid(gate(x))) with BatchNorm in
training mode, as the reference runs it: each clip is normalised with its own statistics.
"""

import math
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import soxr

from . import hub
from .torch_pickle import load_torch_checkpoint

SAMPLE_RATE = 44_100
N_FFT = 4096
HOP = N_FFT // 2
BINS = N_FFT // 2 + 1
BAND = 1024  # bins 0-11 kHz carry the message
KEY_BYTES = 5
MESSAGE_LEN = 4 * KEY_BYTES + 1  # two-bit symbols (each + 1), then the end marker 0
SYMBOLS = 5
AVERAGE_POWER = 0.002837200844477648  # every clip is scaled to this mean power (VCTK's) and back
BN_EPS = 1e-5
PHASE_OFFSETS = range(0, HOP, 10)  # the reference's phase search: 205 sample offsets
SEARCHES = ("fast", "exhaustive", "none")
MIN_SAMPLES = (MESSAGE_LEN - 1) * HOP - N_FFT  # fewest 44.1 kHz samples whose STFT has 21 frames
# verify reads longer audio in windows of 20 messages (19.5 s; a multiple of a message, so every
# window's rows line up with the first's): a decoder pass holds ~22 MB per second it reads.
WINDOW = 20 * MESSAGE_LEN * HOP
LONG = WINDOW + PHASE_OFFSETS[-1]  # up to this many samples, audio is verified whole
# Below this rate a file holds none of the 0-4 kHz where speech (and most of the mark) lives;
# resampling a 1 Hz file to 44.1 kHz would take minutes for nothing.
MIN_VERIFY_RATE = 8000
PUBLIC_KEY = (212, 211, 146, 56, 201)  # the reference's key for the GitHub release of CSM-1b
MESSAGE_SDR = 36.0  # dB, as the reference embeds it
HUB_REPO = "Sony/SilentCipher"
HUB_FOLDER = "44_1_khz/73999_iteration"
CHECKPOINTS = {"encoder": "enc_c.ckpt", "decoder": "dec_c.ckpt", "message_decoder": "dec_m_0.ckpt"}
# hparams.yaml of the 44.1 kHz model: what this port implements
HPARAMS = {"SR": SAMPLE_RATE, "N_FFT": N_FFT, "HOP_LENGTH": HOP, "message_band_size": BAND, "message_dim": SYMBOLS,
           "message_len": MESSAGE_LEN, "n_messages": 1, "enc_n_layers": 3, "dec_c_n_layers": 4,
           "ensure_negative_message": True, "utterance_level_normalization": True, "frame_level_normalization": False,
           "no_normalization": False}


class WatermarkError(ValueError):
    """Watermark weights, keys or audio that cannot be used; the message says what to do."""


def check_key(key: Iterable[int]) -> Tuple[int, ...]:
    """A key as a tuple of 5 bytes."""
    try:
        given = list(key)
        values = tuple(int(b) for b in given)
        ok = len(values) == KEY_BYTES and all(0 <= b <= 255 and b == k for b, k in zip(values, given))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise WatermarkError(f"a watermark key is {KEY_BYTES} bytes (integers 0-255), got {key!r}")
    return values


def parse_key(text: str) -> Tuple[int, ...]:
    """A key written as five comma-separated bytes, e.g. "212,211,146,56,201"."""
    try:
        return check_key(int(part) for part in text.split(","))
    except ValueError:
        raise WatermarkError(f"a watermark key is {KEY_BYTES} comma-separated bytes 0-255, e.g. "
                             f"{','.join(map(str, PUBLIC_KEY))}; got {text!r}") from None


def format_key(key: Sequence[int]) -> str:
    return ",".join(str(b) for b in key)


# -- the message: key bytes <-> symbols -------------------------------------------------------


def message_symbols(key: Sequence[int]) -> np.ndarray:
    """The 21 symbols a key is sent as: its 40 bits as 2-bit values (high bits first) + 1, then 0."""
    key = check_key(key)
    pairs = [(byte >> shift) & 3 for byte in key for shift in (6, 4, 2, 0)]
    return np.array([p + 1 for p in pairs] + [0], np.int64)


def _symbol_counts(rows: np.ndarray) -> np.ndarray:
    """How often each symbol occurs in each column: (5, 21)."""
    return np.stack([(rows == s).sum(axis=0) for s in range(SYMBOLS)])


def column_modes(rows: np.ndarray) -> np.ndarray:
    """The most frequent symbol of each column (the smallest one on ties)."""
    return _symbol_counts(rows).argmax(axis=0)


def consistency(rows: np.ndarray) -> float:
    """The phase search's score: the mean over columns of the share of rows agreeing with the
    column's mode, summed in the reference's order so that ties compare as they do there."""
    score = 0.0
    for count in _symbol_counts(rows).max(axis=0).tolist():
        score += count / rows.shape[0]
    return score / MESSAGE_LEN


def decode_symbols(symbols: np.ndarray) -> Tuple[Optional[Tuple[int, ...]], float]:
    """(key, confidence) from the symbol decoded in each STFT frame: rows of 21 frames, the mode
    of each column, rotated so that the first 0 (the end marker) comes last. key is None when the
    modes hold no end marker or the rest is not a key; confidence is the share of symbols that
    agree with their column's mode."""
    rows = len(symbols) // MESSAGE_LEN
    if rows == 0:
        raise WatermarkError(f"{len(symbols)} STFT frames hold no whole message (it takes {MESSAGE_LEN})")
    grid = np.asarray(symbols[: rows * MESSAGE_LEN]).reshape(rows, MESSAGE_LEN)
    modes = column_modes(grid)
    confidence = float(np.mean((grid == modes[None]).astype(np.float32)))
    ends = np.flatnonzero(modes == 0)
    if not len(ends):
        return None, confidence
    values = np.concatenate([modes[ends[0] + 1 :], modes[: ends[0]]]) - 1
    # the reference writes each value as "{:02b}" (so a stray 0 becomes "-1") and reads bytes back
    bits = "".join(f"{v:02b}" for v in values.tolist())
    try:
        key = tuple(int(bits[i : i + 8], 2) for i in range(0, 8 * (len(bits) // 8), 8))
    except ValueError:
        return None, confidence
    return key, confidence


# -- STFT, as SilentCipher frames it -----------------------------------------------------------


def _window() -> mx.array:
    n = mx.arange(N_FFT, dtype=mx.float32)
    return 0.5 - 0.5 * mx.cos(2 * math.pi * n / N_FFT)  # periodic Hann


def stft(y: mx.array) -> mx.array:
    """Complex spectrogram (frames, 2049) of y padded with zeros to the next multiple of 4096
    (a whole 4096 when it is one already), centred with reflect padding."""
    n = y.shape[0]
    length = n + N_FFT - n % N_FFT
    y = mx.concatenate([y, mx.zeros((length - n,), y.dtype)])
    half = N_FFT // 2
    padded = mx.concatenate([y[1 : half + 1][::-1], y, y[length - half - 1 : length - 1][::-1]])
    halves = padded.reshape(-1, HOP)  # hop = n_fft / 2: frame t is halves t and t + 1
    return mx.fft.rfft(mx.concatenate([halves[:-1], halves[1:]], axis=1) * _window())


def istft(spec: mx.array) -> mx.array:
    """Inverse of stft: overlap-add of the windowed frames over the summed squared window."""
    window = _window()
    frames = mx.fft.irfft(spec, n=N_FFT) * window
    square = window * window
    # centre trimming drops exactly the first and last half-frames
    return ((frames[:-1, HOP:] + frames[1:, :HOP]) / (square[HOP:] + square[:HOP])).reshape(-1)


def _normalize_power(audio: np.ndarray) -> Tuple[np.ndarray, np.float32]:
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1:
        raise WatermarkError(f"watermarking takes mono audio (samples,), got shape {audio.shape}")
    power = np.mean(audio**2) if audio.size else np.float32(0)
    if power == 0:
        return audio, power
    return audio * np.sqrt(AVERAGE_POWER / power), power


# -- the networks -------------------------------------------------------------------------------


class GatedConv(nn.Module):
    """BatchNorm(conv(x) * sigmoid(gate(x))), same padding; conv and gate are one convolution
    of 2 x dims_out channels."""

    def __init__(self, dims_in: int, dims_out: int, kernel: int = 3):
        super().__init__()
        self.kernel = kernel
        self.weight = mx.zeros((2 * dims_out, kernel, kernel, dims_in))
        self.bias = mx.zeros((2 * dims_out,))
        self.bn_weight = mx.ones((dims_out,))
        self.bn_bias = mx.zeros((dims_out,))

    def gated(self, x: mx.array) -> mx.array:
        """Before BatchNorm, for x (batch, freq, time + 2 * halo, dims_in) already padded in time."""
        y = mx.conv2d(x, self.weight, padding=(self.kernel // 2, 0)) + self.bias
        a, g = mx.split(y, 2, axis=-1)
        return a * mx.sigmoid(g)


def _chunk_frames(bins: int, dims_in: int) -> int:
    """Frames per convolution call. A convolution unrolls its input 9-fold (im2col): on the CPU
    keep that within the last-level cache (about twice the speed of larger calls here); on a GPU
    larger calls only bound temporary memory."""
    budget = (16 if mx.default_device().type == mx.cpu else 512) << 20
    return max(1, budget // (9 * 4 * dims_in * bins))


def run_layers(layers: Sequence[GatedConv], x: mx.array) -> mx.array:
    """Run gated layers over x (batch, freq, frames, dims), in time chunks.

    BatchNorm needs the statistics of the whole layer output before the next layer, so the
    layers run one after the other over all chunks, each chunk with a halo of neighbouring
    frames (zeros at the clip's ends, as same padding has)."""
    frames = _chunk_frames(x.shape[1], max(layer.weight.shape[-1] for layer in layers))
    chunks = [x[:, :, t : t + frames] for t in range(0, x.shape[2], frames)]
    mean = scale = shift = None

    def normalized(x: mx.array) -> mx.array:
        # centred first: x * scale + (bias - mean * scale) would cancel digits where |mean| >> std
        return x if scale is None else (x - mean) * scale + shift

    for layer in layers:
        halo = layer.kernel // 2
        out = []
        for i, chunk in enumerate(chunks):
            x = normalized(chunk)
            if halo:
                edge = mx.zeros((*x.shape[:2], halo, x.shape[3]), x.dtype)
                before = normalized(chunks[i - 1][:, :, -halo:]) if i else edge
                after = normalized(chunks[i + 1][:, :, :halo]) if i + 1 < len(chunks) else edge
                x = mx.concatenate([before, x, after], axis=2)
            out.append(layer.gated(x))
            mx.eval(out[-1])
        count = sum(c.shape[1] * c.shape[2] for c in out)
        mean = _sum_chunks(out) / count
        var = _sum_chunks([mx.square(c - mean) for c in out]) / count  # biased, as BatchNorm normalises
        scale, shift = layer.bn_weight * mx.rsqrt(var + BN_EPS), layer.bn_bias
        mx.eval(mean, scale)
        chunks = out
    return normalized(mx.concatenate(chunks, axis=2))


def _tree_sum(x: mx.array, axis: int) -> mx.array:
    """Sum over axis in blocks of 64 and then over the block sums: float32 sums of many values
    in one run lose digits that BatchNorm's outliers (100 standard deviations and more) show."""
    while x.shape[axis] > 64:
        pad = -x.shape[axis] % 64
        if pad:
            x = mx.concatenate([x, mx.zeros((*x.shape[:axis], pad, *x.shape[axis + 1 :]), x.dtype)], axis=axis)
        x = x.reshape(*x.shape[:axis], -1, 64, *x.shape[axis + 1 :]).sum(axis=axis + 1)
    return x.sum(axis=axis, keepdims=True)


def _sum_chunks(chunks: List[mx.array]) -> mx.array:
    """Per item and channel, the sum over frequency and time of chunks (batch, freq, frames, dims)."""
    sums = mx.stack([_tree_sum(_tree_sum(c, 2), 1) for c in chunks])
    return _tree_sum(sums, 0)[0]


class CarrierEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [GatedConv(1, 32), GatedConv(32, 32), GatedConv(32, 32)]
        self.message = nn.Linear(SYMBOLS, BAND)


class CarrierDecoder(nn.Module):
    """Takes the encoder's 32 channels, the magnitude and the message. The reference repeats the
    last two 32 times each (96 channels); the first layer's weights are summed over the copies
    instead, which computes the same convolution on 34 channels."""

    def __init__(self):
        super().__init__()
        self.layers = [GatedConv(34, 96), GatedConv(96, 96), GatedConv(96, 96), GatedConv(96, 1, kernel=1)]


class MessageDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [GatedConv(1, 128)] + [GatedConv(128, 128) for _ in range(8)] + [GatedConv(128, SYMBOLS)]
        self.linear = nn.Linear(BAND, 1)


def sanitize(name: str, state: dict) -> dict:
    """A SilentCipher state dict (torch layout, keys main.{i}.{conv,gate,bn}.*) -> this port's
    parameters: conv and gate stacked, OIHW -> OHWI, the Sequential's dropout slots skipped."""
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("main.")})
    params = {}
    for n, i in enumerate(indices):
        p = f"main.{i}"
        try:
            weight = np.concatenate([state[f"{p}.conv.weight"], state[f"{p}.gate.weight"]]).transpose(0, 2, 3, 1)
            params[f"layers.{n}.weight"] = weight
            params[f"layers.{n}.bias"] = np.concatenate([state[f"{p}.conv.bias"], state[f"{p}.gate.bias"]])
            params[f"layers.{n}.bn_weight"] = state[f"{p}.bn.weight"]
            params[f"layers.{n}.bn_bias"] = state[f"{p}.bn.bias"]
        except (KeyError, ValueError) as e:
            raise WatermarkError(f"{name} is not a SilentCipher checkpoint (layer {i}: {e})") from None
    if name == "decoder" and "layers.0.weight" in params:
        w = params["layers.0.weight"]
        if w.shape[-1] == 96:
            params["layers.0.weight"] = np.concatenate(
                [w[..., :32], w[..., 32:64].sum(-1, keepdims=True), w[..., 64:].sum(-1, keepdims=True)], axis=-1)
    prefix = {"encoder": "message", "message_decoder": "linear"}.get(name)
    if prefix:
        for part in ("weight", "bias"):
            if f"linear.{part}" in state:
                params[f"{prefix}.{part}"] = state[f"linear.{part}"]
    return params


def _load_module(module: nn.Module, name: str, state: dict) -> None:
    params = sanitize(name, state)
    expected = dict(nn.utils.tree_flatten(module.parameters()))
    if set(params) != set(expected) or any(params[k].shape != tuple(v.shape) for k, v in expected.items()):
        got = {k: v.shape for k, v in params.items()}
        want = {k: tuple(v.shape) for k, v in expected.items()}
        diff = sorted(set(got.items()) ^ set(want.items()))[:3]
        raise WatermarkError(f"{CHECKPOINTS[name]} does not hold the 44.1 kHz SilentCipher {name} "
                             f"(mismatched: {diff}): use {HUB_REPO}/{HUB_FOLDER}")
    module.load_weights([(k, mx.array(v.astype(np.float32))) for k, v in params.items()])


def weights_dir(path: Optional[os.PathLike] = None) -> Path:
    """The directory of SilentCipher's 44.1 kHz weights: path, or the hub's (downloaded once)."""
    if path is not None:
        directory = Path(path).expanduser()
        if not directory.is_dir():
            raise WatermarkError(f"watermark directory {directory} does not exist")
        return directory
    files = [f"{HUB_FOLDER}/{f}" for f in (*CHECKPOINTS.values(), "hparams.yaml")]
    try:
        return hub.download(HUB_REPO, files) / HUB_FOLDER
    except hub.HubError as e:
        raise WatermarkError(f"the watermark weights cannot be had: {e}; or turn the watermark off "
                             "(--no-watermark, watermark=False)") from None


def _check_hparams(path: Path) -> None:
    import yaml

    try:
        hparams = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise WatermarkError(f"cannot read {path} ({e})") from None
    wrong = {k: hparams.get(k) for k, v in HPARAMS.items() if not isinstance(hparams, dict) or hparams.get(k) != v}
    if wrong:
        raise WatermarkError(f"{path} describes another SilentCipher model ({wrong}): use {HUB_REPO}/{HUB_FOLDER}")


# -- the watermarker ----------------------------------------------------------------------------


class Watermarker:
    sample_rate = SAMPLE_RATE

    def __init__(self, encoder: CarrierEncoder, decoder: CarrierDecoder, message_decoder: MessageDecoder):
        self.encoder, self.decoder, self.message_decoder = encoder, decoder, message_decoder

    @classmethod
    def load(cls, path: Optional[os.PathLike] = None) -> "Watermarker":
        """The 44.1 kHz model from a directory holding enc_c.ckpt, dec_c.ckpt and dec_m_0.ckpt
        (and hparams.yaml, checked when present), or from the hub repo Sony/SilentCipher."""
        directory = weights_dir(path)
        if (directory / "hparams.yaml").is_file():
            _check_hparams(directory / "hparams.yaml")
        modules = {"encoder": CarrierEncoder(), "decoder": CarrierDecoder(), "message_decoder": MessageDecoder()}
        for name, module in modules.items():
            _load_module(module, name, load_torch_checkpoint(directory / CHECKPOINTS[name]))
        return cls(**modules)

    # embedding

    def encode(self, audio_44k: np.ndarray, key: Sequence[int], message_sdr: float = MESSAGE_SDR,
               first_frame: int = 0) -> np.ndarray:
        """Mark 44.1 kHz mono audio with key: SilentCipher's encode_wav(audio, 44100, key,
        calc_sdr=False, message_sdr). Silence comes back as it is. first_frame: the STFT frame of
        a longer stream the audio starts at (its first sample is first_frame * HOP of it), so that
        each frame carries the stream's symbol for it; 0 is the reference's."""
        symbols = message_symbols(key)
        y, power = _normalize_power(audio_44k)
        if power == 0:
            return y.copy()
        spec = stft(mx.array(y))
        magnitude = mx.abs(spec)
        frames = spec.shape[0]
        carrier = magnitude.T[None, :, :, None]  # (1, bins, frames, 1)
        linear = self.encoder.message
        band = (linear.weight[:, mx.array(symbols[(first_frame + np.arange(frames)) % MESSAGE_LEN])]
                + linear.bias[:, None])
        message = mx.concatenate([band, mx.zeros((BINS - BAND, frames))])[None, :, :, None]
        encoded = run_layers(self.encoder.layers, carrier)
        h = run_layers(self.decoder.layers, mx.concatenate([encoded, carrier, message], axis=-1))[0, :, :, 0]
        h = mx.abs(h) * (mx.arange(BINS) < BAND)[:, None]
        h = h / mx.sqrt(mx.mean(h * h, axis=0, keepdims=True)) / 10 ** (message_sdr / 20)
        attenuation = h * mx.sqrt(mx.mean(carrier * carrier))
        marked = mx.maximum(magnitude - attenuation.T, 0)
        phase = mx.where(magnitude > 0, spec / mx.maximum(magnitude, 1e-30), mx.array(1, mx.complex64))
        out = np.array(istft(marked * phase)[: len(y)])
        return out * np.sqrt(power / AVERAGE_POWER)

    def watermark(self, audio_24k: np.ndarray, key: Sequence[int], sample_rate: int = 24_000) -> np.ndarray:
        """The reference's wrapper: resample to 44.1 kHz, encode at 36 dB, resample back; same length."""
        check_key(key)
        audio = np.asarray(audio_24k, np.float32)
        if not audio.size:
            return audio.copy()
        marked = self.encode(soxr.resample(audio, sample_rate, SAMPLE_RATE, quality="HQ"), key)
        return _fit(soxr.resample(marked, SAMPLE_RATE, sample_rate, quality="HQ"), len(audio))

    def stream(self, key: Sequence[int], sample_rate: int = 24_000,
               run: Callable[[Callable[[], np.ndarray]], np.ndarray] = lambda mark: mark()) -> "StreamWatermarker":
        return StreamWatermarker(self, key, sample_rate, run)

    # detection

    def _logits(self, y: np.ndarray) -> mx.array:
        """Message-decoder logits (frames, 5) of power-normalised 44.1 kHz audio."""
        carrier = mx.abs(stft(mx.array(y)))[:, :BAND].T[None, :, :, None]
        h = run_layers(self.message_decoder.layers, carrier)  # (1, band, frames, 5)
        return (h[0].transpose(1, 2, 0) @ self.message_decoder.linear.weight.T)[..., 0] + self.message_decoder.linear.bias

    def message_logits(self, audio_44k: np.ndarray) -> np.ndarray:
        """The message decoder's logits (5, frames) for 44.1 kHz mono audio, at phase 0."""
        y, _ = _normalize_power(audio_44k)
        return np.array(self._logits(y).T)

    def verify(self, audio: np.ndarray, sample_rate: int, *, key: Optional[Sequence[int]] = None,
               search: str = "fast") -> Tuple[Optional[Tuple[int, ...]], float]:
        """(key, confidence) of the message in mono audio at any rate, as the reference's
        decode_wav(phase_shift_decoding=True) finds it; key is None when there is none.

        The reference scores every sample offset 0, 10, ..., 2040 with a full decoder pass (205
        passes) and decodes at the most consistent one (the first on ties). search "exhaustive"
        does the same; it stops early only where the reference's choice is already certain (a
        consistency of 1 cannot be beaten). "fast" (the default) scores offset 0 first (where
        csm-mlx's own files are aligned) and stops there if it holds key (when given) or is
        fully consistent; otherwise it scores a grid of offsets 160 samples apart and refines
        around the best at 40 and then 10 samples: at most 25 passes. "none": offset 0 only."""
        if key is not None:
            key = check_key(key)
        if search not in SEARCHES:
            raise WatermarkError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1:
            raise WatermarkError(f"verify takes mono audio (samples,), got shape {audio.shape}")
        check_verify_rate(sample_rate)
        if sample_rate != SAMPLE_RATE and audio.size:
            audio = soxr.resample(audio, sample_rate, SAMPLE_RATE, quality="HQ")
        shortest = MIN_SAMPLES + (0 if search == "none" else PHASE_OFFSETS[-1])
        if len(audio) < shortest:
            raise WatermarkError(f"{len(audio) / SAMPLE_RATE:.2f} s of audio is too short to hold a watermark "
                                 f"message: it takes {shortest / SAMPLE_RATE:.2f} s")
        if not np.any(audio):
            return None, 0.0  # silence carries no mark (the reference fails on it)
        return decode_symbols(self.search_phase(audio, search=search, key=key)[1])

    def verify_blocks(self, blocks: Iterable[np.ndarray], *, key: Optional[Sequence[int]] = None,
                      search: str = "fast", progress: Optional[Callable[[int], None]] = None
                      ) -> Tuple[Optional[Tuple[int, ...]], float]:
        """verify for 44.1 kHz mono audio that arrives in blocks (a file read piece by piece), in
        memory bounded by WINDOW whatever the length.

        Audio of up to LONG samples (19.6 s) is verified whole, exactly as verify does. Longer
        audio is read in windows of WINDOW samples, each normalised (power, BatchNorm) as a clip
        of its own: the phase search runs on the first window, every window is then decoded at
        the offset it chose, and the rows of all windows vote together on each symbol.
        progress(samples) is called after each window."""
        if key is not None:
            key = check_key(key)
        if search not in SEARCHES:
            raise WatermarkError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
        blocks = iter(blocks)
        head = _take(blocks, np.zeros(0, np.float32), LONG + 1)
        if len(head) <= LONG:
            return self.verify(head, SAMPLE_RATE, key=key, search=search)
        offset = self.search_phase(head[:LONG], search=search, key=key)[0]
        rest, symbols, done = head[offset:], [], offset
        while True:
            rest = _take(blocks, rest, WINDOW)
            if not len(rest):
                break
            window, rest = rest[:WINDOW], rest[WINDOW:]
            if len(window) >= MIN_SAMPLES and np.any(window):  # silence carries no mark
                read = np.array(mx.argmax(self._logits(_normalize_power(window)[0]), axis=1))
                symbols.append(read[: len(read) // MESSAGE_LEN * MESSAGE_LEN])
            done += len(window)
            if progress is not None:
                progress(done)
        return decode_symbols(np.concatenate(symbols)) if symbols else (None, 0.0)

    def search_phase(self, audio_44k: np.ndarray, *, search: str = "fast",
                     key: Optional[Sequence[int]] = None) -> Tuple[int, np.ndarray]:
        """The sample offset verify decodes at and the symbols (argmax per STFT frame) read there."""
        y, _ = _normalize_power(audio_44k)
        scored = {}

        def score(offset: int) -> float:
            if offset not in scored:
                symbols = np.array(mx.argmax(self._logits(y[offset:]), axis=1))
                rows = len(symbols) // MESSAGE_LEN
                scored[offset] = (consistency(symbols[: rows * MESSAGE_LEN].reshape(rows, MESSAGE_LEN)), symbols)
            return scored[offset][0]

        def holds_key(offset: int) -> bool:
            return key is not None and decode_symbols(scored[offset][1])[0] == tuple(key)

        if search == "exhaustive":
            best = search_offsets(score, PHASE_OFFSETS)
        elif search == "fast":
            best = fast_search(score, holds_key)
        else:
            best = 0
        score(best)
        return best, scored[best][1]


def check_verify_rate(sample_rate: int) -> None:
    if sample_rate < MIN_VERIFY_RATE:
        raise WatermarkError(f"a sample rate of {sample_rate} Hz holds no speech band (the mark lives in 0-11 kHz): "
                             f"verify audio of at least {MIN_VERIFY_RATE} Hz")


def _take(blocks: Iterator[np.ndarray], have: np.ndarray, count: int) -> np.ndarray:
    """have, with blocks appended until it holds count samples or the blocks end."""
    parts, size = [have], len(have)
    while size < count:
        block = next(blocks, None)
        if block is None:
            break
        parts.append(block)
        size += len(block)
    return np.concatenate(parts) if len(parts) > 1 else have


def search_offsets(score, offsets: Iterable[int], best: Optional[int] = None) -> int:
    """The offset with the highest score (among offsets and best, the best so far), the smallest
    on ties, as the reference picks it scanning offsets upwards; a score of 1 cannot be beaten,
    so the scan stops there."""
    chosen, top = None, -1.0
    for offset in sorted(set(offsets) | ({best} if best is not None else set())):
        if top == 1.0:
            break
        s = score(offset)
        if s > top:
            chosen, top = offset, s
    return chosen


def fast_search(score, holds_key) -> int:
    """Offset 0 first; then a coarse grid and two refinements around the best (see verify)."""
    if score(0) == 1.0 or holds_key(0):
        return 0
    best = search_offsets(score, range(0, HOP, 160), 0)
    for step, span in ((40, 120), (10, 30)):
        if score(best) == 1.0 or holds_key(best):
            break
        best = search_offsets(score, range(max(0, best - span), min(PHASE_OFFSETS[-1], best + span) + 1, step), best)
    return best


def _fit(audio: np.ndarray, length: int) -> np.ndarray:
    """audio cut or zero-padded to length (resampling there and back may be a sample off)."""
    if len(audio) >= length:
        return np.ascontiguousarray(audio[:length], np.float32)
    return np.concatenate([audio, np.zeros(length - len(audio), np.float32)])


# A marked frame depends on the carrier of the 6 frames on each side (six 3x3 convolutions in time:
# the carrier encoder's 3, the carrier decoder's 3), and a hop's samples on the frame after it.
REACH = 7 * HOP


def stream_regions() -> Iterator[int]:
    """Where a stream's marked regions end, in 44.1 kHz samples: after 1, 2, 4 and 8 hops (46 ms
    to 0.37 s), then every 8 hops. Small at first, so that the first audio waits little; then
    larger, so that the windows' overlap costs less (each region is marked in a window of the
    region and REACH on both sides: 2.75x the work of marking the stream at once)."""
    yield from (HOP, 2 * HOP, 4 * HOP)
    end = 8 * HOP
    while True:
        yield end
        end += 8 * HOP


class StreamWatermarker:
    """Marks audio that arrives in pieces, for streaming and playback.

    The pieces are resampled to 44.1 kHz as one stream (soxr's stream gives the samples of a
    one-shot resampling) and marked region by region (see stream_regions), each region in a
    window reaching REACH (7 hops, 0.33 s) on both sides of it: as far as the marking model sees,
    so a region waits only for 0.33 s of audio after it, and its frames carry the stream's own
    symbols (first_frame). The regions are on a fixed grid, so the output does not depend on how
    the audio arrives. Each window is normalised (power, BatchNorm) on its own, as the reference
    normalises a clip: the mark differs a little from the whole clip's (benchmarks/watermark.py
    measures how much). Marked audio is resampled back as one stream; flush() marks the rest. In
    total the output has as many samples as the input. run(mark) calls mark(), the MLX work,
    where MLX may run: a server passes its engine's call, so one thread keeps every MLX call."""

    def __init__(self, watermarker: Watermarker, key: Sequence[int], sample_rate: int = 24_000,
                 run: Callable[[Callable[[], np.ndarray]], np.ndarray] = lambda mark: mark()):
        self.watermarker, self.key, self.run = watermarker, check_key(key), run
        self.up = soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        self.down = soxr.ResampleStream(SAMPLE_RATE, sample_rate, 1, dtype="float32", quality="HQ")
        self.kept = np.zeros(0, np.float32)  # the 44.1 kHz stream from kept_from on
        self.kept_from = 0
        self.received = 0  # 44.1 kHz samples so far
        self.marked = 0  # 44.1 kHz samples marked so far (a region's end)
        self.regions = stream_regions()
        self.region_end = next(self.regions)
        self.samples_in = self.samples_out = 0

    def _mark(self, end: int) -> np.ndarray:
        """The region from self.marked to end, marked in its window."""
        start = max(0, self.marked - REACH)  # a multiple of HOP: the window's frames are the stream's
        window = self.kept[start - self.kept_from : end + REACH - self.kept_from]
        marked = self.run(lambda: self.watermarker.encode(window, self.key, first_frame=start // HOP))
        region = marked[self.marked - start : end - start]
        self.marked = end
        drop = max(0, self.marked - REACH) - self.kept_from
        self.kept, self.kept_from = self.kept[drop:], self.kept_from + drop
        return region

    def _out(self, regions: List[np.ndarray], last: bool) -> np.ndarray:
        out = self.down.resample_chunk(np.concatenate(regions) if regions else np.zeros(0, np.float32), last=last)
        self.samples_out += len(out)
        return out

    def _receive(self, audio_44k: np.ndarray) -> None:
        self.kept = np.concatenate([self.kept, audio_44k])
        self.received += len(audio_44k)

    def feed(self, audio: np.ndarray) -> np.ndarray:
        """Marked audio that is ready (possibly none) after adding audio."""
        audio = np.asarray(audio, np.float32)
        self.samples_in += len(audio)
        self._receive(self.up.resample_chunk(audio))
        regions = []
        while self.received >= self.region_end + REACH:
            regions.append(self._mark(self.region_end))
            self.region_end = next(self.regions)
        return self._out(regions, last=False)

    def flush(self) -> np.ndarray:
        """The rest of the marked audio: its last region ends where the stream does."""
        self._receive(self.up.resample_chunk(np.zeros(0, np.float32), last=True))
        regions = []
        while self.marked < self.received:
            regions.append(self._mark(min(self.region_end, self.received)))
            self.region_end = next(self.regions)
        out = self._out(regions, last=True)
        missing = self.samples_in - (self.samples_out - len(out))
        self.samples_out = self.samples_in
        return _fit(out, max(missing, 0))
