"""Streaming decode, and playback through the real PortAudio path and a real-time paced output."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from csm_mlx import CSM
from csm_mlx.player import Player

from speech_fixtures import PacedOutput, alsa_env, interruptible

CLI = str(Path(sys.executable).parent / "csm-mlx")
FRAMES = 12


@pytest.fixture(scope="module")
def csm(hub_cache):
    return CSM.load(watermark=False)


@pytest.mark.parametrize("chunk_frames", [1, 3, 10])
def test_streamed_chunks_equal_one_shot_decode(csm, chunk_frames):
    args = dict(max_audio_length_ms=FRAMES * 80, temperature=0)
    codes = csm.generate("Streaming test.", 0, **args).codes
    assert codes.shape == (32, FRAMES)
    expected = csm.mimi.decode(codes)
    for _ in range(2):  # a second stream starts from a fresh decoder state
        chunks = list(csm.stream("Streaming test.", 0, chunk_frames=chunk_frames, **args))
        assert [len(c) for c in chunks[:-1]] == [chunk_frames * 1920] * (len(chunks) - 1)
        assert np.abs(np.concatenate(chunks) - expected).max() <= 1e-5


PLAY_GENERATED = """
import sys, numpy as np
from csm_mlx import CSM
from csm_mlx.player import Player

chunks = list(CSM.load(watermark=False).stream("Play me back.", 0, max_audio_length_ms=960, seed=0))
np.save(sys.argv[1], np.concatenate(chunks))
# ALSA's null device is not paced: it drains as fast as it can, so a stream started before the
# last chunk is in would run dry (and count underruns) whenever the feeder is held back. The stream
# starts at finish(), with everything buffered; the start rule and chunk joins are the paced tests' part.
player = Player(expected_seconds=3600)
player.feed(np.concatenate(chunks))  # one chunk tells the start rule nothing: it waits
player.finish()
print(player.underruns)
"""


def test_playback_through_portaudio_plays_exactly_the_generated_audio(hub_cache, tmp_path):
    """ALSA's file plugin records what PortAudio was given. Any gap or click would show as
    samples that differ from the generated audio."""
    generated_path = tmp_path / "generated.npy"
    result = subprocess.run([sys.executable, "-c", PLAY_GENERATED, str(generated_path)],
                            capture_output=True, text=True, env=alsa_env(tmp_path, capture=True), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "0"  # underruns
    generated = np.load(generated_path)
    played = np.fromfile(tmp_path / "played.raw", dtype=np.float32)
    start = np.flatnonzero(played)[0] - np.flatnonzero(generated)[0]  # PortAudio primes with silence
    assert 0 <= start <= 8192
    assert not played[:start].any()
    np.testing.assert_array_equal(played[start : start + len(generated)], generated)
    assert not played[start + len(generated) :].any()


def paced(**kwargs):
    return PacedOutput(**kwargs), StopIteration


def play_slow_producer(expected_seconds):
    """1.6 s of audio produced at half real time (80 ms chunks every 160 ms)."""
    player = Player(expected_seconds=expected_seconds, output=paced)
    for _ in range(20):
        time.sleep(0.16)
        player.feed(np.full(1920, 0.1, np.float32))
    player.finish()
    return player


def test_slow_producer_plays_without_underruns_after_start():
    player = play_slow_producer(expected_seconds=1.6)
    # B >= R (1/r - 1) + margin with r = 0.5: B >= 1.6 - B + 0.1, so B >= 0.85 s, about 1.7 s of producing
    print(f"slow producer (r = 0.5): playback started {player.start_delay:.2f} s after the first chunk")
    assert player.underruns == 0
    assert 1.4 <= player.start_delay <= 2.2


def test_starting_at_once_with_a_slow_producer_underruns():
    assert play_slow_producer(expected_seconds=None).underruns > 0


def test_cli_play_writes_what_it_played(hub_cache, tmp_path):
    """Watermarked (the default), played in blocks: -o holds exactly the samples played."""
    out = tmp_path / "out.wav"
    result = subprocess.run([CLI, "Hello", "--play", "-o", str(out), "--stream-chunk-frames", "3",
                             "--max-audio-length-ms", "480", "--seed", "1"],
                            capture_output=True, text=True, env=alsa_env(tmp_path, capture=True), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "first audio after" in result.stderr and "underruns" in result.stderr
    written, _ = sf.read(out, dtype="float32")
    assert len(written) == 6 * 1920
    played = np.fromfile(tmp_path / "played.raw", dtype=np.float32)
    start = np.flatnonzero(played)[0] - np.flatnonzero(written)[0]
    np.testing.assert_array_equal(played[start : start + len(written)], written)
    assert not played[:start].any() and not played[start + len(written) :].any()


def test_ctrl_c_during_playback_keeps_what_was_generated(hub_cache, tmp_path):
    out = tmp_path / "partial.wav"
    proc = subprocess.Popen([CLI, "Hello", "--play", "-o", str(out), "-v", "--max-audio-length-ms", "150000",
                             "--no-watermark"],
                            stderr=subprocess.PIPE, text=True, env=alsa_env(tmp_path, capture=False),
                            preexec_fn=interruptible)
    for line in proc.stderr:
        if "first audio after" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "generated so far" in err
    frames = sf.info(out).frames
    assert frames > 0 and frames % 1920 == 0
