"""Text to speech end to end: tokenizer, Mimi through rustymimi, hub loading, the CLI and the API."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rustymimi
import soundfile as sf
import soxr

from csm_mlx import CSM, Segment
from csm_mlx.audio import join_turns
from csm_mlx.cli.main import main as cli_main
from csm_mlx.codec import Mimi
from csm_mlx.hub import HubError
from csm_mlx.prompt import TokenizedSegment
from csm_mlx.text import chunk_text
from csm_mlx.tokenizer import TextTokenizer
from csm_mlx.voices import VOICES

from csm_fixtures import generate_codes
from tie_check import assert_same_speech

CLI = str(Path(sys.executable).parent / "csm-mlx")
FRAMES = 6
SHORT = ["--max-audio-length-ms", str(FRAMES * 80), "--no-watermark"]  # test_watermark.py tests the mark


@pytest.fixture(scope="module")
def csm(hub_cache):
    return CSM.load(watermark=False)


def rustymimi_decode(mimi_path, codes):
    return rustymimi.Tokenizer(str(mimi_path), num_codebooks=32).decode(np.ascontiguousarray(codes[None], np.uint32))[0, 0]


def rustymimi_encode(mimi_path, audio):
    pcm = np.ascontiguousarray(audio, np.float32).reshape(1, 1, -1)
    return rustymimi.Tokenizer(str(mimi_path), num_codebooks=32).encode(pcm)[0]


@pytest.mark.parametrize("speaker, text", [(0, "Hello"), (1, "Hello from MLX. How are you today?"),
                                           (12, "  Numbers like 3.14, \"quotes\" and émigré ünïcode…"), (0, "[1] nested tag")])
def test_tokenizer_framing_matches_reference(tokenizer_path, speaker, text):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path), bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    expected = [ref.bos_token_id] + ref.encode(f"[{speaker}]{text}", add_special_tokens=False) + [ref.eos_token_id]
    assert TextTokenizer(tokenizer_path).encode(text, speaker) == expected
    assert expected[0] == 0 and expected[-1] == 1  # this tokenizer's own ids, not Llama-3's 128000/128001


def test_mimi_decode_and_stream_match_rustymimi(mimi_path):
    codes = np.random.default_rng(0).integers(0, 2048, (32, 5))
    mimi = Mimi(mimi_path)
    audio = mimi.decode(codes)
    assert audio.shape == (5 * 1920,) and audio.dtype == np.float32
    # stepped frame by frame on the streaming state: the one-pass decode to rounding
    assert np.abs(audio - rustymimi_decode(mimi_path, codes)).max() <= 1e-5
    # and the same however the frames are grouped (a reset rewinds all but rustymimi's positions: 1e-6)
    streamed = np.concatenate(list(mimi.decode_chunks([codes[:, :2], codes[:, 2:]])))
    assert np.abs(streamed - audio).max() <= 1e-5
    # the random decoder must depend on the codes, or these comparisons prove little
    assert np.abs(mimi.decode(codes[:, ::-1]) - audio).max() > 0.01


def test_cli_writes_the_decoded_audio(hub_cache, mimi_path, tmp_path, csm):
    out = tmp_path / "out.wav"
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([CLI, "Hello", "--speaker", "0", "-o", str(out), "--seed", "3", *SHORT],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "RTF" in result.stderr and "peak memory" in result.stderr
    audio, rate = sf.read(out, dtype="float32", always_2d=True)
    assert rate == 24_000 and audio.shape == (FRAMES * 1920, 1)

    speech = csm.generate("Hello", 0, max_audio_length_ms=FRAMES * 80, seed=3)
    assert speech.codes.shape == (32, FRAMES)
    assert np.abs(audio[:, 0] - rustymimi_decode(mimi_path, speech.codes)).max() <= 1e-5


def test_codebooks_flag_writes_the_first_codebooks_decoded(mimi_path, tmp_path, csm):
    """--codebooks 8: the frames csm.generate gives with codebooks=8 (8 codes each), decoded by a
    Mimi built for 8 codebooks."""
    out = tmp_path / "eight.wav"
    assert run_cli("Hello", "-q", "-o", out, "--seed", 3, "--codebooks", 8, *SHORT) == 0
    speech = csm.generate("Hello", 0, max_audio_length_ms=FRAMES * 80, seed=3, codebooks=8)
    assert speech.codes.shape == (8, FRAMES)
    eight = rustymimi.Tokenizer(str(mimi_path), num_codebooks=8)
    expected = eight.decode(np.ascontiguousarray(speech.codes[None], np.uint32))[0, 0]
    assert np.abs(sf.read(out, dtype="float32")[0] - expected).max() <= 1e-5
    assert run_cli("Hello", "-q", "-o", tmp_path / "bad.wav", "--codebooks", 33, *SHORT) == 2
    assert not (tmp_path / "bad.wav").exists()


def test_context_audio_any_rate_and_channels(csm, mimi_path, tmp_path):
    rng = np.random.default_rng(5)
    n = 44_100 * 3 // 4
    stereo = np.stack([np.sin(np.arange(n) * 0.05), rng.uniform(-0.5, 0.5, n)], axis=1).astype(np.float32) * 0.5
    path = tmp_path / "context.wav"
    sf.write(path, stereo, 44_100)

    from csm_mlx.audio import read_audio

    mono_24k = soxr.resample(stereo.mean(axis=1), 44_100, 24_000, quality="HQ")
    expected_codes = rustymimi_encode(mimi_path, mono_24k)
    segment = csm.tokenize(Segment(1, "what you said", read_audio(path)))
    np.testing.assert_array_equal(segment.audio_codes, expected_codes)
    assert segment.audio_codes.shape == (32, -(-len(mono_24k) // 1920))

    # what reaches the model: the same greedy frames as a prompt built by hand from those codes
    via_api = csm.generate("reply", 0, [Segment(1, "what you said", read_audio(path))],
                           max_audio_length_ms=FRAMES * 80, temperature=0).codes
    by_hand = generate_codes(csm.model, csm.tokenizer.encode("reply", 0),
                       [TokenizedSegment(csm.tokenizer.encode("what you said", 1), expected_codes)],
                       max_frames=FRAMES, temperature=0)
    np.testing.assert_array_equal(via_api, by_hand)


def run_cli(*args):
    """The CLI in-process (same code path as the command, minus interpreter start-up)."""
    return cli_main([str(a) for a in args])


def test_same_seed_same_audio_and_every_flag_changes_it(hub_cache, tmp_path):
    def audio(name, *flags):
        out = tmp_path / f"{name}.wav"
        assert run_cli("Hello there", "-q", "-o", out, *SHORT, *flags) == 0
        return sf.read(out, dtype="float32")[0]

    base = audio("base", "--seed", 1)
    np.testing.assert_array_equal(base, audio("again", "--seed", 1))
    for flags in (["--seed", 2], ["--seed", 1, "--temperature", 1.6], ["--seed", 1, "--top-k", 3],
                  ["--seed", 1, "--top-p", 0.3], ["--seed", 1, "--min-p", 0.3], ["--seed", 1, "--speaker", 4],
                  ["--seed", 1, "--codebooks", 16]):
        assert not np.array_equal(base, audio("x", *flags)), flags


def test_voice_preset_uses_the_repo_prompt(csm, hub_cache):
    segment = csm.voice("conversational_b", speaker=1)
    assert segment.speaker == 1 and segment.text == VOICES["conversational_b"]
    assert segment.audio.shape == (12_000,)  # the 0.5 s prompt in the cache, at 24 kHz
    plain = csm.generate("Hi", 1, max_audio_length_ms=FRAMES * 80, temperature=0).codes
    voiced = csm.generate("Hi", 1, [segment], max_audio_length_ms=FRAMES * 80, temperature=0).codes
    assert not np.array_equal(plain, voiced)


def test_conversation_file(hub_cache, tmp_path):
    sf.write(tmp_path / "turn1.wav", np.zeros(4800, np.float32), 16_000)
    (tmp_path / "chat.yaml").write_text("- {speaker: 0, text: 'Hi there', audio: turn1.wav}\n- {speaker: 1, text: 'Hello'}\n")
    assert run_cli("How are you?", "-q", "-o", tmp_path / "out.flac", "--conversation", tmp_path / "chat.yaml", *SHORT) == 0
    audio, rate = sf.read(tmp_path / "out.flac")
    assert rate == 24_000 and len(audio) == FRAMES * 1920


def assert_clean_failure(capsys, code, out, *fragments):
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_bad_input(hub_cache, tmp_path, capsys):
    out = tmp_path / "out.wav"
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage")
    cases = [
        (["   ", "-o", out], "text is empty"),
        (["Hi", "-o", out, "--context-audio", tmp_path / "corrupt.wav", "--context-text", "x"], "cannot read audio file"),
        (["Hi", "-o", out, "--context-audio", tmp_path / "missing.wav", "--context-text", "x"], "missing.wav does not exist"),
        (["Hi", "-o", out, "--model", tmp_path / "no-model"], "model directory"),
        (["Hi", "-o", out, "--speaker", "-1"], "must be a non-negative integer"),
        (["Hi", "-o", out, "--speaker", "one"], "must be a non-negative integer"),
        (["Hi", "-o", out, "--context-text", "word " * 2100, "--context-audio", tmp_path / "short.wav"], "2048-row window"),
        (["Hi", "-o", out, "--temperature", "-1"], "temperature"),
    ]
    sf.write(tmp_path / "short.wav", np.zeros(2400, np.float32), 24_000)
    for argv, fragment in cases:
        try:
            code = run_cli(*argv)
        except SystemExit as e:  # argparse's own errors
            code = e.code
        assert_clean_failure(capsys, code, out, fragment)


def test_unwritable_output_is_refused_before_loading(tmp_path, capsys):
    # the model does not exist either: the output check must come first
    missing_dir = tmp_path / "no" / "such" / "dir" / "out.wav"
    assert run_cli("Hi", "-o", missing_dir, "--model", tmp_path / "nothing") == 2
    assert f"directory {missing_dir.parent} does not exist" in capsys.readouterr().err
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    code = run_cli("Hi", "-o", readonly / "out.wav", "--model", tmp_path / "nothing")
    readonly.chmod(0o700)
    err = capsys.readouterr().err
    if os.geteuid() != 0:  # root may write anywhere
        assert code == 2 and "permission denied" in err
    assert run_cli("Hi", "-o", tmp_path / "out.mp3") == 2
    assert "must end in .wav or .flac" in capsys.readouterr().err


def test_missing_tokenizer_repo_offline(tmp_path, transformers_dir, mimi_path):
    with pytest.raises(HubError, match="unsloth/Llama-3.2-1B is not in the local hub cache"):
        CSM.load(str(transformers_dir), mimi=mimi_path, watermark=False)


def test_bundled_mlx_directory_works_offline_without_the_hub(hub_cache, tmp_path):
    """A converted, quantized, bundled directory is all an offline app needs: the CLI runs
    from it with an empty hub cache, and --voice finds the prompts inside it."""
    from csm_mlx.convert import convert

    model_dir = convert("sesame/csm-1b", tmp_path / "csm-8bit", quantize_weights=True, q_bits=8, bundle=True)
    assert {p.name for p in model_dir.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                      "tokenizer-e351c8d8-checkpoint125.safetensors", "prompts",
                                                      "silentcipher"}
    empty_cache = tmp_path / "empty-hub"
    empty_cache.mkdir()
    env = {**os.environ, "HF_HUB_CACHE": str(empty_cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out.wav"
    result = subprocess.run([CLI, "Offline.", "--model", str(model_dir), "--voice", "conversational_a", "-o", str(out),
                             "--seed", "0", "--max-audio-length-ms", str(FRAMES * 80)],  # watermarked, from the bundle
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert sf.info(out).frames == FRAMES * 1920


def test_auto_dtype_is_float32_on_a_cpu_and_as_stored_on_a_gpu(tmp_path, original_dir, tokenizer_path, mimi_path):
    import mlx.core as mx

    from csm_mlx.convert import convert

    bf16 = convert(str(original_dir), tmp_path / "bf16", dtype="bfloat16")
    auto = CSM.load(str(bf16), tokenizer=tokenizer_path, mimi=mimi_path, watermark=False)
    stored = CSM.load(str(bf16), tokenizer=tokenizer_path, mimi=mimi_path, dtype=None, watermark=False)
    on_cpu = mx.default_device().type == mx.cpu
    assert auto.model.codebook0_head.weight.dtype == (mx.float32 if on_cpu else mx.bfloat16)
    assert stored.model.codebook0_head.weight.dtype == mx.bfloat16
    q8 = CSM.load(str(convert(str(original_dir), tmp_path / "q8", dtype="bfloat16", quantize_weights=True, q_bits=8)),
                  tokenizer=tokenizer_path, mimi=mimi_path, watermark=False)
    assert q8.model.codebook0_head.scales.dtype == mx.bfloat16  # quantized models stay as converted


GREEDY = dict(temperature=0, max_audio_length_ms=FRAMES * 80)


def test_many_lines_and_their_chunks_get_their_solo_frames(csm):
    """batch_size 2 over 4 chunks: the second text's two chunks land in different batches."""
    voice = csm.voice("conversational_a", speaker=1)
    texts = ["Good morning.", "This is the first part. And this is the second one.", "Bye now."]
    assert len(chunk_text(texts[1], 30)) == 2
    speeches = list(csm.generate_many(texts, 1, [voice], batch_size=2, chunk_chars=30, **GREEDY))
    assert len(speeches) == 3
    for text, speech in zip(texts, speeches):
        start = 0
        for chunk in chunk_text(text, 30):
            frames = csm.generate(chunk, 1, [voice], chunk_chars=0, **GREEDY).codes.shape[1]
            assert_same_speech(csm, chunk, 1, [voice], dict(GREEDY, chunk_chars=0), speech.codes[:, start : start + frames])
            start += frames
        assert start == speech.codes.shape[1]
        # Mimi's decode (rustymimi, threaded) differs between calls in the last bits
        np.testing.assert_allclose(speech.audio, csm.speech(speech.codes).audio, atol=1e-5)


def test_batch_cli_writes_each_line_and_the_joined_lines(csm, tmp_path):
    (tmp_path / "lines.txt").write_text("Good morning.\n\n   Bye now.  \nSee you.\n")
    assert run_cli("batch", tmp_path / "lines.txt", "-q", "-o", tmp_path / "all.wav", "--out-dir", tmp_path / "clips",
                   "--batch-size", 2, "--pause-ms", 100, "--temperature", 0, *SHORT) == 0
    solo = [csm.generate(text, 0, **GREEDY).audio for text in ["Good morning.", "Bye now.", "See you."]]
    assert sorted(p.name for p in (tmp_path / "clips").iterdir()) == ["line_001.wav", "line_002.wav", "line_003.wav"]
    for n, audio in enumerate(solo, 1):
        got, rate = sf.read(tmp_path / "clips" / f"line_{n:03d}.wav", dtype="float32")
        assert rate == 24_000
        np.testing.assert_allclose(got, audio, atol=1e-5)
    joined, _ = sf.read(tmp_path / "all.wav", dtype="float32")
    np.testing.assert_allclose(joined, join_turns(solo, 24_000, 100), atol=1e-5)


def test_batch_bad_input(hub_cache, tmp_path, capsys):
    out = tmp_path / "out.wav"
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "lines.txt").write_text("Hi\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    cases = [
        ([tmp_path / "lines.txt"], "nowhere to put the audio"),
        ([tmp_path / "missing.txt", "-o", out], "missing.txt does not exist"),
        ([tmp_path / "empty.txt", "-o", out], "has no text"),
        ([tmp_path / "binary.txt", "-o", out], "is not UTF-8 text"),
        ([tmp_path / "lines.txt", "-o", out, "--batch-size", 0], "--batch-size must be at least 1"),
        ([tmp_path / "lines.txt", "-o", tmp_path / "out.mp3"], "must end in .wav or .flac"),
    ]
    for argv, fragment in cases:
        assert_clean_failure(capsys, run_cli("batch", *argv), out, fragment)
