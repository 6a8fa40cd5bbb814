"""The SilentCipher watermark: parity with SilentCipher's own code on random weights in the true
.ckpt layout, the decoding logic, the restricted checkpoint loader, and the mark on every path
csm-mlx produces audio (CLI files, API results, streaming), plus `csm-mlx verify`."""

import copy
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

import csm_mlx.watermark as watermark
from csm_mlx import CSM, Segment
from csm_mlx.cli.main import main as cli_main
from csm_mlx.torch_pickle import TorchCheckpointError, load_torch_checkpoint
from csm_mlx.watermark import (MESSAGE_LEN, PUBLIC_KEY, Watermarker, WatermarkError, decode_symbols, fast_search,
                               message_symbols, search_offsets)

CLI = str(Path(sys.executable).parent / "csm-mlx")
FRAMES = 12  # 0.96 s: one watermark message (at least 0.88 s with the phase search)
GREEDY = dict(temperature=0, max_audio_length_ms=4 * 80)
OTHER_KEY = (1, 2, 3, 4, 5)


@pytest.fixture(scope="module")
def wm(silentcipher_dir):
    return Watermarker.load(silentcipher_dir)


@pytest.fixture(scope="module")
def ref(silentcipher_dir):
    from watermark_fixtures import reference_model

    return reference_model(silentcipher_dir)


def clip(n: int, seed: int = 0, rate: int = 44_100, noise: float = 0.02) -> np.ndarray:
    """Voiced-like audio: two partials, a 3 Hz syllable envelope, noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    voiced = np.sin(2 * np.pi * (140 + 40 * seed) * t) + 0.5 * np.sin(2 * np.pi * (420 + 90 * seed) * t)
    return (0.2 * voiced * (1 + np.sin(2 * np.pi * 3 * t)) + noise * rng.standard_normal(n)).astype(np.float32)


def reference_encode(ref, audio):
    marked, sdr = ref.encode_wav(audio, 44_100, list(PUBLIC_KEY), calc_sdr=False, message_sdr=36)
    assert sdr == 0
    return marked


def snr_db(signal, other):
    return 10 * np.log10(np.sum(signal.astype(np.float64) ** 2) / np.sum((signal - other).astype(np.float64) ** 2))


# -- parity with SilentCipher ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoded(wm, ref):
    """Clips, SilentCipher's encode_wav of them and ours: lengths that are (padded by a whole
    4096) and are not multiples of 4096."""
    clips = {n: clip(n, seed=1) for n in (8 * 4096, 88_211)}
    return {n: (audio, reference_encode(ref, audio), wm.encode(audio, PUBLIC_KEY)) for n, audio in clips.items()}


@pytest.mark.parametrize("n", [8 * 4096, 88_211])
def test_encode_matches_silentcipher(encoded, n):
    audio, want, got = encoded[n]
    assert got.shape == audio.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(want - audio).max() > 1e-3  # the mark itself is far above the tolerance
    print(f"encode, {n} samples: max |MLX - SilentCipher| {np.abs(got - want).max():.1e}, "
          f"mark at {snr_db(audio, want):.1f} dB SNR")


def test_batchnorm_runs_in_training_mode_as_in_silentcipher(encoded, ref):
    """SilentCipher never calls .eval(): BatchNorm normalises with each clip's own statistics.
    With the running statistics (eval mode) the audio is different, and ours is not that."""
    audio, training_mode, got = encoded[8 * 4096]
    modules = [ref.enc_c, ref.dec_c]
    try:
        for m in modules:
            m.eval()
        eval_mode = reference_encode(ref, audio)
    finally:
        for m in modules:
            m.train()
    assert np.abs(got - training_mode).max() <= 1e-5
    assert np.abs(got - eval_mode).max() > 100 * 1e-5


def test_silent_clip_comes_back_as_it_is(wm, ref):
    silent = np.zeros(30_000, np.float32)
    np.testing.assert_array_equal(wm.encode(silent, PUBLIC_KEY), reference_encode(ref, silent))
    np.testing.assert_array_equal(wm.watermark(np.zeros(24_000, np.float32), PUBLIC_KEY), np.zeros(24_000))


def test_message_logits_match_silentcipher(wm, ref):
    """Ten layers of training-mode BatchNorm meet outliers of 100 standard deviations: float32
    itself is off by ~5e-5 here. Against the same decoder in float64, ours is within that, as
    SilentCipher's own float32 run is (which of the two float32 runs is closer varies with the
    libraries' versions: 1.6e-5 against 1.2e-5 with this pair)."""
    audio = clip(20_000, seed=2, noise=0.1)  # broadband, as speech is
    y = audio * np.sqrt(ref.average_energy_VCTK / np.mean(audio**2))
    carrier, _ = ref.stft.transform(torch.FloatTensor(y)[None])
    with torch.no_grad():
        want = ref.dec_m[0](carrier[:, None])[0, 0].numpy()
        exact = copy.deepcopy(ref.dec_m[0]).double()(carrier[:, None].double())[0, 0].numpy()
    got = wm.message_logits(audio)
    assert got.shape == want.shape == (5, 11)
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(got - exact).max() <= 5e-5
    np.testing.assert_array_equal(got.argmax(0), want.argmax(0))


def test_phase_search_picks_the_offset_silentcipher_picks(wm, ref, monkeypatch):
    """The exhaustive search scores offsets as the reference does and keeps the same one. Here
    over offsets 0 and 10 (the reference scans range(0, HOP_LENGTH, 10); its STFT keeps hop 2048)."""
    monkeypatch.setattr(watermark, "PHASE_OFFSETS", range(0, 20, 10))
    monkeypatch.setattr(ref.config, "HOP_LENGTH", 20)
    audio = clip(81_930, seed=0)  # two rows of 21 frames at both offsets: they score differently
    y = audio * np.sqrt(ref.average_energy_VCTK / np.mean(audio**2))
    decoder, symbols_at = ref.dec_m[0], []

    def recording(carrier):  # the reference's own decoder; its symbols at each offset kept
        logits = decoder(carrier)
        symbols_at.append(logits[0, 0].argmax(0).numpy())
        return logits

    monkeypatch.setattr(ref, "dec_m", [recording])
    with torch.no_grad():  # as decode_wav calls it
        best = ref.get_best_ps(y)
    assert best != 0  # the scores decide, not the order
    offset, symbols = wm.search_phase(audio, search="exhaustive")
    assert offset == best
    np.testing.assert_array_equal(symbols, symbols_at[best // 10])


# -- decoding: symbols -> key --------------------------------------------------------------------


class PlantedDecoder(torch.nn.Module):
    """Stands in for SilentCipher's message decoder: logits that pick the planted symbols."""

    def __init__(self, symbols):
        super().__init__()
        self.symbols = symbols

    def forward(self, carrier):
        frames = carrier.shape[-1]
        assert frames == len(self.symbols)
        logits = torch.zeros(1, 1, 5, frames)
        logits[0, 0, torch.as_tensor(self.symbols), torch.arange(frames)] = 1.0
        return logits


def reference_decode(ref, symbols, monkeypatch):
    """SilentCipher's decode_wav (mode per column, end marker, bytes) on planted symbols: (key,
    confidence), or (None, None) where it finds no message."""
    monkeypatch.setattr(ref, "dec_m", [PlantedDecoder(symbols)])
    n = (len(symbols) - 1) * 2048 - 4095  # padded to (len - 1) * 2048: len(symbols) STFT frames (len odd)
    result = ref.decode_wav(clip(n, seed=4), 44_100, phase_shift_decoding=False)
    return (tuple(result["messages"][0]), result["confidences"][0]) if result["status"] else (None, None)


def test_planted_message_decodes_at_every_rotation(ref, monkeypatch):
    rng = np.random.default_rng(0)
    message = message_symbols(PUBLIC_KEY)
    for rotation in range(MESSAGE_LEN):
        rows = np.tile(np.roll(message, rotation), (4, 1))
        rows[rng.integers(0, 4, 5), rng.integers(0, MESSAGE_LEN, 5)] = rng.integers(1, 5, 5)  # a few wrong symbols
        symbols = np.concatenate([rows.reshape(-1), rng.integers(0, 5, 7)])  # + frames short of a row
        key, confidence = decode_symbols(symbols)
        assert key == PUBLIC_KEY and 0.9 < confidence <= 1.0
        want_key, want_confidence = reference_decode(ref, symbols, monkeypatch)
        assert (key, confidence) == (want_key, pytest.approx(want_confidence, abs=1e-7))


@pytest.mark.parametrize("modes, key", [
    ([1, 2, 3, 4] * 5 + [4], None),  # no end marker
    ([0, 1, 2, 3, 4, 0] + [1] * 15, (27, -64, 0, 0, 0)),  # a second 0 is "-1" in the bits, here a byte's sign
    ([0, 1, 0] + [1] * 18, None),  # ... here a malformed byte
    ([0] * 21, None),
])
def test_stray_end_markers_decode_as_the_reference_decodes_them(ref, monkeypatch, modes, key):
    symbols = np.tile(modes, 3)
    assert decode_symbols(symbols)[0] == reference_decode(ref, symbols, monkeypatch)[0] == key


def test_too_little_audio_for_a_message_is_refused(wm):
    with pytest.raises(WatermarkError, match="no whole message"):
        decode_symbols(np.ones(MESSAGE_LEN - 1, np.int64))
    with pytest.raises(WatermarkError, match="too short to hold a watermark message"):
        wm.verify(clip(watermark.MIN_SAMPLES + 2039), 44_100)  # 21 frames at offset 0, 20 at offset 2040
    with pytest.raises(WatermarkError, match="too short"):
        wm.verify(clip(20_000, rate=24_000), 24_000, search="none")


# -- long files: read in blocks, scored in windows ----------------------------------------------


def test_blocks_of_a_file_are_its_samples_read_at_once(tmp_path):
    from csm_mlx.audio import read_audio, read_audio_blocks

    sf.write(tmp_path / "stereo.flac", np.stack([clip(70_000, rate=22_050), clip(70_000, seed=2, rate=22_050)], 1), 22_050)
    blocks = list(read_audio_blocks(tmp_path / "stereo.flac", 44_100, block_seconds=0.3))
    assert len(blocks) > 5
    whole = read_audio(tmp_path / "stereo.flac", max_seconds=None, sample_rate=44_100)
    np.testing.assert_array_equal(np.concatenate(blocks), whole)  # so a short file verifies exactly as before


def test_short_audio_in_blocks_verifies_as_a_whole(wm):
    audio = clip(44_100, seed=3)
    whole = wm.verify(audio, 44_100, search="none")
    assert wm.verify_blocks(np.split(audio, [1000, 30_000, 30_001]), search="none") == whole


def planted_message(lengths):
    """A message decoder that reads PUBLIC_KEY's message in every window (each from its frame 0),
    recording the length of audio each pass reads."""
    message = message_symbols(PUBLIC_KEY)

    def logits(self, y):
        lengths.append(len(y))
        frames = (len(y) + watermark.N_FFT - len(y) % watermark.N_FFT) // watermark.HOP + 1
        return watermark.mx.array(np.eye(5, dtype=np.float32)[message[np.arange(frames) % MESSAGE_LEN]])

    return logits


def test_long_audio_is_scored_in_bounded_windows(monkeypatch, wm):
    """Each decoder pass reads at most LONG samples; the windows' rows line up, so a message
    planted in every window decodes with full confidence; progress reaches the end."""
    lengths = []
    monkeypatch.setattr(Watermarker, "_logits", planted_message(lengths))
    total = int(2.6 * watermark.WINDOW)
    audio = clip(total, seed=5)
    done = []
    key, confidence = wm.verify_blocks((audio[i : i + 44_100] for i in range(0, total, 44_100)), key=PUBLIC_KEY,
                                       progress=done.append)
    assert (key, confidence) == (PUBLIC_KEY, 1.0)
    assert max(lengths) <= watermark.LONG and len(lengths) == 1 + 3  # offset 0 holds the key; 3 windows
    assert done == sorted(done) and done[-1] == total
    with pytest.raises(WatermarkError, match="a sample rate of 1 Hz"):
        wm.verify(audio[:100], 1)


def test_verify_reads_a_long_file_in_windows(silentcipher_dir, tmp_path, capsys, monkeypatch):
    lengths = []
    monkeypatch.setattr(Watermarker, "_logits", planted_message(lengths))
    sf.write(tmp_path / "long.flac", clip(45 * 24_000, rate=24_000), 24_000)
    assert cli_main(["verify", str(tmp_path / "long.flac"), "--weights", str(silentcipher_dir)]) == 0
    out = capsys.readouterr()
    assert out.out == f"{tmp_path / 'long.flac'}: watermarked (key 212,211,146,56,201, confidence 1.00)\n"
    assert out.err == "" and max(lengths) <= watermark.LONG and len(lengths) == 1 + 3


# -- the phase search on planted score landscapes ------------------------------------------------


class Landscape:
    """Scores of offsets: a peak of height top at peak, falling off by 0.002 per sample."""

    def __init__(self, peak, top=0.95, floor=0.45):
        self.peak, self.top, self.floor, self.scored = peak, top, floor, []

    def __call__(self, offset):
        self.scored.append(offset)
        return max(self.floor, self.top - 0.002 * abs(offset - self.peak))


@pytest.mark.parametrize("peak", [0, 250, 1230, 2040])
def test_fast_search_finds_the_peak_in_at_most_25_passes(peak):
    exhaustive = Landscape(peak)
    assert search_offsets(exhaustive, watermark.PHASE_OFFSETS) == peak
    assert sorted(exhaustive.scored) == list(watermark.PHASE_OFFSETS)
    fast = Landscape(peak)
    assert fast_search(fast, lambda offset: False) == peak
    assert len(set(fast.scored)) <= 25


def test_searches_stop_where_the_answer_is_certain():
    perfect = Landscape(300, top=1.0)
    assert search_offsets(perfect, watermark.PHASE_OFFSETS) == 300
    assert max(perfect.scored) == 300  # nothing after a perfect score can win: later offsets lose ties
    keyed = Landscape(1000)
    assert fast_search(keyed, lambda offset: offset == 0) == 0 and keyed.scored == [0]
    flat = Landscape(0, top=0.5, floor=0.5)  # all equal: the first offset, as the reference keeps it
    assert search_offsets(flat, watermark.PHASE_OFFSETS) == 0 and fast_search(flat, lambda offset: False) == 0


# -- the restricted checkpoint loader ------------------------------------------------------------


def test_loader_reads_what_torch_saved(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = OrderedDict(plain=torch.randn(3, 5), transposed=base.t(), sliced=base[1:3, 2:], scalar=torch.tensor(7),
                        half=torch.randn(4).half(), flags=torch.tensor([True, False]), ints=torch.arange(5).int())
    torch.save(state, tmp_path / "state.ckpt")
    got = load_torch_checkpoint(tmp_path / "state.ckpt")
    assert list(got) == list(state)
    for name, tensor in state.items():
        assert got[name].dtype == tensor.numpy().dtype and got[name].shape == tuple(tensor.shape)
        np.testing.assert_array_equal(got[name], tensor.numpy())


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_loader_refuses_a_pickle_that_would_run_a_command(tmp_path, capsys):
    marker = tmp_path / "it-ran"
    with zipfile.ZipFile(tmp_path / "enc_c.ckpt", "w") as archive:  # laid out as torch.save lays it
        archive.writestr("enc_c/data.pkl", pickle.dumps(OrderedDict(weight=RunsACommand(marker)), protocol=2))
        archive.writestr("enc_c/byteorder", "little")
    with pytest.raises(TorchCheckpointError, match=r"refers to (posix|os)\.system.*refusing"):
        load_torch_checkpoint(tmp_path / "enc_c.ckpt")
    sf.write(tmp_path / "x.wav", clip(44_100), 44_100)  # a readable file: the weights are loaded for it
    assert cli_main(["verify", "--weights", str(tmp_path), str(tmp_path / "x.wav")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to load it" in err[0]
    assert not marker.exists()


def test_truncated_checkpoint_is_one_line(silentcipher_dir, tmp_path, capsys):
    weights = shutil.copytree(silentcipher_dir, tmp_path / "weights")
    data = (weights / "dec_c.ckpt").read_bytes()
    (weights / "dec_c.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(TorchCheckpointError, match="dec_c.ckpt is not a readable torch checkpoint.*truncated"):
        Watermarker.load(weights)
    assert cli_main(["verify", "--weights", str(weights), str(tmp_path / "x.wav")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated" in err[0]


def test_weights_of_another_model_are_refused(silentcipher_dir, tmp_path):
    weights = shutil.copytree(silentcipher_dir, tmp_path / "weights")
    (weights / "hparams.yaml").write_text((weights / "hparams.yaml").read_text().replace("44100", "16000"))
    with pytest.raises(WatermarkError, match="describes another SilentCipher model"):
        Watermarker.load(weights)
    shutil.copy(weights / "enc_c.ckpt", weights / "dec_c.ckpt")
    (weights / "hparams.yaml").unlink()
    with pytest.raises(WatermarkError, match="dec_c.ckpt does not hold the 44.1 kHz SilentCipher decoder"):
        Watermarker.load(weights)


# -- the mark on what csm-mlx makes ---------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(hub_cache):
    return CSM.load(watermark=False)


@pytest.fixture(scope="module")
def marked(hub_cache):
    return CSM.load()


def run_cli(*args):
    return cli_main([str(a) for a in args])


def marked_in_regions(wm, unmarked, key=PUBLIC_KEY):
    """A stream's marking, done at once: resampled to 44.1 kHz as a whole; each region of the
    grid (1, 2, 4, 8, 16, 24, ... hops) marked in a window 7 hops wider on both sides, its frames
    carrying the stream's symbols; resampled back."""
    up = soxr.resample(unmarked, 24_000, 44_100, quality="HQ")
    hop, reach = watermark.HOP, 7 * watermark.HOP
    ends = [hop, 2 * hop, 4 * hop] + list(range(8 * hop, len(up) + 8 * hop, 8 * hop))
    parts, start = [], 0
    for end in (min(e, len(up)) for e in ends):
        if start < end:
            low = max(0, start - reach)
            window = up[low : end + reach]
            parts.append(wm.encode(window, key, first_frame=low // hop)[start - low : end - low])
        start = end
    return soxr.resample(np.concatenate(parts), 44_100, 24_000, quality="HQ")[: len(unmarked)]


def test_cli_output_is_the_marked_no_watermark_output(hub_cache, wm, tmp_path):
    """The CLI writes the stream as it is generated: marked in blocks, as --play plays it."""
    def audio(name, *flags):
        out = tmp_path / f"{name}.wav"
        assert run_cli("Hello there", "-q", "-o", out, "--seed", 2, "--max-audio-length-ms", 6 * 80, *flags) == 0
        return sf.read(out, dtype="float32")[0]

    unmarked, default, private = audio("plain", "--no-watermark"), audio("marked"), audio("private", "--watermark-key",
                                                                                          "1,2,3,4,5")
    np.testing.assert_allclose(default, marked_in_regions(wm, unmarked), atol=1e-5)
    np.testing.assert_allclose(private, marked_in_regions(wm, unmarked, OTHER_KEY), atol=1e-5)
    assert np.abs(private - default).max() > 1e-3
    # the mark is embedded 36 dB below the signal (per frame, and it only attenuates); resampling
    # to 44.1 kHz and back also drops what lies near 12 kHz, where random Mimi weights put much
    round_trip = soxr.resample(soxr.resample(unmarked, 24_000, 44_100, quality="HQ"), 44_100, 24_000, quality="HQ")
    mark = snr_db(round_trip[: len(unmarked)], default)
    print(f"watermarked vs --no-watermark: SNR {snr_db(unmarked, default):.1f} dB; the mark alone "
          f"(vs the 24-44.1-24 kHz round trip) {mark:.1f} dB")
    assert 33 < mark < 45


def test_api_results_are_marked(plain, marked, wm):
    voice = Segment(1, "what you said", plain.voice("conversational_a").audio)
    # Mimi's decode (rustymimi, threaded) differs between calls in the last bits
    speech = marked.generate("Hi", 0, **GREEDY)
    np.testing.assert_allclose(speech.audio, wm.watermark(plain.generate("Hi", 0, **GREEDY).audio, PUBLIC_KEY),
                               atol=1e-5)
    many = [s.audio for s in marked.generate_many(["One.", "Two."], 0, batch_size=2, **GREEDY)]
    for audio, text in zip(many, ["One.", "Two."]):
        np.testing.assert_allclose(audio, wm.watermark(plain.generate(text, 0, **GREEDY).audio, PUBLIC_KEY), atol=1e-5)
    turns = list(marked.dialogue([voice, Segment(0, "Hello.")], **GREEDY))
    np.testing.assert_array_equal(turns[0].audio, voice.audio)  # given audio comes back as it is
    unmarked = list(plain.dialogue([voice, Segment(0, "Hello.")], **GREEDY))[1].audio
    np.testing.assert_allclose(turns[1].audio, wm.watermark(unmarked, PUBLIC_KEY), atol=1e-5)


def test_stream_is_marked_region_by_region(plain, marked, wm):
    """The stream is resampled to 44.1 kHz as a whole, marked region by region on a fixed grid,
    each in its window, and resampled back: the chunks are exactly that, whatever their size."""
    args = dict(temperature=0, max_audio_length_ms=14 * 80)  # 1.12 s: 6 regions, the last cut short
    unmarked = np.concatenate(list(plain.stream("Stream it.", 0, **args)))
    expected = marked_in_regions(wm, unmarked)
    for chunk_frames in (1, 7):
        chunks = list(marked.stream("Stream it.", 0, chunk_frames=chunk_frames, **args))
        assert [len(c) for c in chunks[:-1]] == [chunk_frames * 1920] * (len(chunks) - 1)
        streamed = np.concatenate(chunks)
        assert len(streamed) == len(unmarked) == 14 * 1920
        np.testing.assert_allclose(streamed, expected, atol=1e-5)
    assert np.abs(streamed - unmarked).max() > 1e-3


def test_a_marked_stream_waits_only_for_the_marking_models_reach(plain, marked):
    """The first chunk comes once the first region (one hop, 46 ms at 44.1 kHz) and the 7 hops the
    marking model sees beyond it are there: 4.6 frames and the resamplers' delays, 7 frames in all
    (0.56 s of audio), not the 13 a block of one message needed."""
    frames = list(plain.frames("Stream it.", 0, temperature=0, max_audio_length_ms=14 * 80))
    pulled = []

    def source():
        for frame in frames:
            pulled.append(frame)
            yield frame
    first = next(iter(marked.audio(source())))
    assert len(first) == 1920
    assert len(pulled) <= 7, len(pulled)


def test_a_streamed_mark_is_the_whole_clips_within_a_small_part_of_it(plain, wm):
    """Each region is normalised (power, BatchNorm) in its own window: how far that moves the mark
    from the one the whole clip gets at once, beside marking in separate blocks of one message."""
    unmarked = plain.generate("A longer clip to mark.", 0, temperature=0, max_audio_length_ms=40 * 80).audio
    whole = wm.watermark(unmarked, PUBLIC_KEY)
    marker = wm.stream(PUBLIC_KEY)
    streamed = np.concatenate([marker.feed(unmarked[i : i + 1920]) for i in range(0, len(unmarked), 1920)]
                              + [marker.flush()])
    up = soxr.resample(unmarked, 24_000, 44_100, quality="HQ")
    block = watermark.MESSAGE_LEN * watermark.HOP
    in_blocks = soxr.resample(np.concatenate([wm.encode(up[i : i + block], PUBLIC_KEY)
                                              for i in range(0, len(up), block)]), 44_100, 24_000, quality="HQ")
    round_trip = soxr.resample(up, 44_100, 24_000, quality="HQ")[: len(unmarked)]
    mark = whole - round_trip
    streamed_db, blocks_db = snr_db(mark, streamed - round_trip), snr_db(mark, in_blocks[: len(unmarked)] - round_trip)
    print(f"the mark over its difference from the whole clip's: streamed {streamed_db:.1f} dB, "
          f"in blocks of one message {blocks_db:.1f} dB")
    assert streamed_db > 6 and streamed_db > blocks_db  # measured: 7.8 dB, and 4.0 dB in blocks


def test_verify_exit_codes(hub_cache, tmp_path, capsys):
    other, unmarked = tmp_path / "other.wav", tmp_path / "plain.flac"
    assert run_cli("Check me", "-q", "-o", other, "--max-audio-length-ms", FRAMES * 80, "--watermark-key", "9,9,9,9,9") == 0
    assert run_cli("Check me", "-q", "-o", unmarked, "--max-audio-length-ms", FRAMES * 80, "--no-watermark") == 0
    (tmp_path / "garbage.wav").write_bytes(b"RIFF\x00\x00garbage")
    sf.write(tmp_path / "short.wav", np.zeros(12_000, np.float32), 24_000)
    capsys.readouterr()

    assert run_cli("verify", other, unmarked) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(": not watermarked (with key 212,211,146,56,201;" in line for line in lines)
    for bad, fragment in (("garbage.wav", "cannot read audio file"), ("missing.wav", "does not exist"),
                          ("short.wav", "too short")):
        assert run_cli("verify", tmp_path / bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("csm-mlx: error: ") and fragment in err[0], err
    assert run_cli("verify", other, tmp_path / "missing.wav", "--key", "9,9,9,9,9") == 2  # errors win
    with pytest.raises(SystemExit, match="2"):
        run_cli("verify", other, "--key", "9,9,9,9")
    assert "a watermark key is 5 comma-separated bytes" in capsys.readouterr().err


def test_no_watermark_weights_offline_is_one_line_unless_turned_off(transformers_dir, tokenizer_path, mimi_path,
                                                                     tmp_path):
    empty = tmp_path / "empty-hub"
    empty.mkdir()
    env = {**os.environ, "HF_HUB_CACHE": str(empty), "HF_HUB_OFFLINE": "1"}
    argv = [CLI, "Hi", "-o", str(tmp_path / "out.wav"), "--model", str(transformers_dir), "--tokenizer",
            str(tokenizer_path), "--mimi", str(mimi_path), "--max-audio-length-ms", "160"]
    failed = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert failed.returncode == 2 and not (tmp_path / "out.wav").exists()
    err = failed.stderr.strip().splitlines()
    assert len(err) == 1 and "Sony/SilentCipher" in err[0] and "--no-watermark" in err[0], err
    assert subprocess.run([*argv, "--no-watermark"], capture_output=True, text=True, env=env).returncode == 0
    assert sf.info(tmp_path / "out.wav").frames == 2 * 1920
