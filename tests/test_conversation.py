"""Conversations, long text, the context budget and the stopping rules."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from csm_mlx import CSM, Segment
from csm_mlx.context import ContextError, fit_context
from csm_mlx.prompt import prompt_rows
from csm_mlx.script import ScriptError, read_script
from csm_mlx.text import chunk_text, frame_cap, max_audio_seconds, split_sentences

from speech_fixtures import interruptible
from tie_check import assert_same_frames

CLI = str(Path(sys.executable).parent / "csm-mlx")
TURNS = [(0, "Hi there."), (1, "Hello, how are you?"), (0, "Fine, thanks."), (1, "Good to hear.")]
SHORT = dict(max_audio_length_ms=5 * 80, temperature=0)


@pytest.fixture(scope="module")
def csm(hub_cache):
    return CSM.load(watermark=False)


def reference_layout(tokenizer, turns, codes, next_turn):
    """The prompt the reference builds: per turn its framed text rows, then one row per audio
    frame and the all-zero end-of-audio row; then the next turn's text rows."""
    tokens, mask = [], []
    for (speaker, text), turn_codes in zip(turns, codes):
        for token in tokenizer.encode(text, speaker):
            tokens.append([0] * 32 + [token])
            mask.append([False] * 32 + [True])
        for t in range(turn_codes.shape[1]):
            tokens.append(list(turn_codes[:, t]) + [0])
            mask.append([True] * 32 + [False])
        tokens.append([0] * 33)
        mask.append([True] * 32 + [False])
    for token in tokenizer.encode(next_turn[1], next_turn[0]):
        tokens.append([0] * 32 + [token])
        mask.append([False] * 32 + [True])
    return np.array(tokens), np.array(mask)


def test_fourth_turn_prompt_is_the_reference_layout(csm):
    conversation = csm.conversation()
    codes = [conversation.say(text, speaker, **SHORT).codes for speaker, text in TURNS[:3]]
    tokens, mask = conversation.prompt(csm.tokenizer.encode(TURNS[3][1], TURNS[3][0]), 5)
    expected_tokens, expected_mask = reference_layout(csm.tokenizer, TURNS[:3], codes, TURNS[3])
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_array_equal(mask, expected_mask)


def test_kv_cache_reuse_gives_the_codes_of_a_fresh_prefill(csm):
    reused, fresh = csm.conversation(), csm.conversation()
    fresh.reuse_cache = False
    for speaker, text in TURNS:
        rows = fresh.prompt(csm.tokenizer.encode(text, speaker), 5)
        expected = fresh.say(text, speaker, **SHORT).codes
        assert_same_frames(csm.model, rows, SHORT, expected, reused.say(text, speaker, **SHORT).codes)
    # turn n only prefills the previous turn's last frame and end-of-audio row, and its own text
    text_rows = [len(csm.tokenizer.encode(t, s)) for s, t in TURNS]
    assert reused.prefilled_rows == [text_rows[0]] + [1 + 1 + n for n in text_rows[1:]]
    assert fresh.prefilled_rows[-1] > 3 * 5


def test_long_text_is_spoken_chunk_by_chunk_in_one_conversation(csm):
    text = "The first sentence is here. " * 6 + "And a last one."
    chunks = chunk_text(text, 60)
    assert len(chunks) > 2
    speech = csm.generate(text, 0, chunk_chars=60, **SHORT)
    conversation = csm.conversation()
    by_hand = np.concatenate([conversation.say(c, 0, **SHORT).codes for c in chunks], axis=1)
    np.testing.assert_array_equal(speech.codes, by_hand)
    # joined by one decode of all frames: no seam between chunks (rustymimi repeats itself to ~1e-6)
    assert np.abs(speech.audio - csm.mimi.decode(by_hand)).max() <= 1e-5


@settings(max_examples=200, deadline=None)
@given(
    segments=st.lists(st.tuples(st.integers(1, 900), st.booleans()), max_size=12),
    fixed=st.integers(1, 1500),
)
def test_budget_properties(segments, fixed):
    rows = [r for r, _ in segments]
    pinned = [p for _, p in segments]
    pinned_rows = sum(r for r, p in segments if p)
    if pinned_rows + fixed > 2048:
        with pytest.raises(ContextError, match=f"{pinned_rows + fixed - 2048} more than"):
            fit_context(rows, pinned, fixed, 2048)
        return
    keep = fit_context(rows, pinned, fixed, 2048)
    assert keep == sorted(keep)  # order kept, whole segments only
    assert sum(rows[i] for i in keep) + fixed <= 2048
    assert all(i in keep for i, p in enumerate(pinned) if p)
    dropped = [i for i in range(len(rows)) if i not in keep]
    # oldest first: every unpinned segment older than a kept one was dropped only if needed
    if dropped:
        last = max(dropped)
        assert all(i in dropped for i in range(last) if not pinned[i])
        # and dropping stopped as soon as it fit: keeping the newest dropped one would not fit
        assert sum(rows[i] for i in keep) + rows[last] + fixed > 2048
    else:
        assert sum(rows) + fixed <= 2048


def test_a_voice_prompt_too_long_for_the_window_says_by_how_much(csm):
    voice = Segment(0, "word " * 1900, pinned=True)
    with pytest.raises(ContextError, match="more than the model's 2048-row window"):
        csm.generate("Hi", 0, [voice], **SHORT)


def test_old_turns_are_dropped_to_fit_and_the_voice_stays(csm, caplog):
    voice = Segment(0, "A pinned voice prompt.", np.zeros(24_000, np.float32), pinned=True)
    history = [Segment(1, f"turn {n} " + "word " * 150) for n in range(6)]
    conversation = csm.conversation([voice] + history)
    voice_rows, turn_rows = conversation.history[0].rows, conversation.history[1].rows
    fits = (2048 - 103 - voice_rows) // turn_rows  # the newest turns that fit beside 3 text rows + 100 frames
    assert 0 < fits < 6
    with caplog.at_level("INFO", logger="csm_mlx"):
        tokens, _ = conversation.prompt([1, 2, 3], 100)
    assert f"dropped the {6 - fits} oldest context turn(s)" in caplog.text
    assert len(tokens) == voice_rows + fits * turn_rows + 3
    expected_first_kept = prompt_rows([conversation.history[0], conversation.history[7 - fits]], [1])[0]
    np.testing.assert_array_equal(tokens[: voice_rows + turn_rows], expected_first_kept[:-1])


@pytest.mark.parametrize("text, expected", [
    ("Dr. Smith went to Washington. He arrived at 3 p.m. today.",
     ["Dr. Smith went to Washington.", "He arrived at 3 p.m. today."]),
    ('He said "Stop." Then he left!', ['He said "Stop."', "Then he left!"]),
    ("Pi is 3.14159. It is irrational... Really?! Yes.", ["Pi is 3.14159.", "It is irrational...", "Really?!", "Yes."]),
    ("J. R. R. Tolkien wrote books. U.S. troops, e.g. this one, left.",
     ["J. R. R. Tolkien wrote books.", "U.S. troops, e.g. this one, left."]),
    ("no punctuation at all here", ["no punctuation at all here"]),
    ("  Spaces   everywhere .  Next\n\nline ", ["Spaces everywhere .", "Next line"]),
    ("Mr. and Mrs. Jones live on Main St. near the park. OK.", ["Mr. and Mrs. Jones live on Main St. near the park.", "OK."]),
])
def test_sentence_splitting(text, expected):
    assert split_sentences(text) == expected


def test_chunking_long_sentences_and_words():
    clauses = "First clause, second clause; third clause: fourth clause, and the end."
    assert chunk_text(clauses, 30) == ["First clause, second clause;", "third clause: fourth clause,", "and the end."]
    words = chunk_text("word " * 100, 60)
    assert all(len(c) <= 60 for c in words) and " ".join(words) == ("word " * 100).strip()
    assert chunk_text("x" * 130, 50) == ["x" * 50, "x" * 50, "x" * 30]
    assert chunk_text("Short one. Short two.", 250) == ["Short one. Short two."]


def test_frame_cap_stops_a_model_that_never_ends(csm):
    text = "Hello there, friend."
    assert frame_cap(text, None) == int(max_audio_seconds(text) * 12.5) == int((3 + 0.12 * 18) * 12.5)
    codes = csm.generate(text, 0, temperature=0).codes  # the random model never emits the end frame
    assert codes.shape[1] == frame_cap(text, None)


def test_end_of_speech_comes_before_the_cap(original_dir, tokenizer_path, mimi_path):
    silent = CSM.load(str(original_dir), tokenizer=tokenizer_path, mimi=mimi_path, watermark=False)
    for head in [silent.model.codebook0_head, *silent.model.audio_head]:
        head.weight = head.weight * 0  # every logit equal: greedy picks code 0 in every codebook
    assert silent.generate("Hello there, friend.", 0, temperature=0).codes.shape[1] == 0


def test_stop_after_repeated_frames(original_dir, tokenizer_path, mimi_path):
    stuck = CSM.load(str(original_dir), tokenizer=tokenizer_path, mimi=mimi_path, watermark=False)
    stuck.model.codebook0_head.weight = stuck.model.codebook0_head.weight * 0  # codebook 0 always 0
    codes = stuck.generate("Hello there, friend.", 0, temperature=0, stop_after_repeats=4).codes
    assert codes.shape[1] == 3 and (codes[0] == 0).all() and codes[1:].any()


def test_script_errors_name_the_file_and_turn(tmp_path):
    (tmp_path / "bad.txt").write_text("[0] Hello\nno tag here\n")
    with pytest.raises(ScriptError, match=r"bad.txt:2: expected '\[speaker\] text'"):
        read_script(tmp_path / "bad.txt")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF....garbage")
    (tmp_path / "s.json").write_text('[{"speaker": 0, "text": "Hi"}, {"speaker": 1, "text": "Yo", "audio": "corrupt.wav"}]')
    with pytest.raises(ScriptError, match="s.json: turn 2: cannot read audio file .*corrupt.wav"):
        read_script(tmp_path / "s.json")
    (tmp_path / "m.yaml").write_text("- {speaker: 0, text: Hi, audio: missing.wav}\n")
    with pytest.raises(ScriptError, match="m.yaml: turn 1: audio file .*missing.wav does not exist"):
        read_script(tmp_path / "m.yaml")


def test_dialogue_cli_writes_the_joined_turns(hub_cache, tmp_path):
    (tmp_path / "script.txt").write_text("\n".join(f"[{s}] {t}" for s, t in TURNS) + "\n")
    out = tmp_path / "dialogue.wav"
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([CLI, "dialogue", str(tmp_path / "script.txt"), "-o", str(out), "--turns-dir",
                             str(tmp_path / "turns"), "--voice", "0=conversational_a", "--pause-ms", "200",
                             "--max-audio-length-ms", "400", "--seed", "0"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    turns = sorted((tmp_path / "turns").iterdir())
    assert [p.name for p in turns] == [f"turn_00{n}.wav" for n in range(1, 5)]
    assert all(sf.info(p).frames == 5 * 1920 for p in turns)
    assert sf.info(out).frames == 4 * 5 * 1920 + 3 * 4800


def test_interrupted_dialogue_keeps_finished_turns(hub_cache, tmp_path):
    # the third turn is 40 chunks long: the signal comes while it is being generated
    (tmp_path / "script.txt").write_text("[0] One.\n[1] Two.\n[0] " + "Three is a much longer turn. " * 200 + "\n")
    out = tmp_path / "dialogue.wav"
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([CLI, "dialogue", str(tmp_path / "script.txt"), "-o", str(out), "--turns-dir",
                             str(tmp_path / "turns"), "--max-audio-length-ms", "400", "--no-watermark"],
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=interruptible)
    for line in proc.stderr:
        if line.startswith("turn 2/3"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "wrote the 2 finished turn(s)" in err
    assert sf.info(out).frames == 2 * 5 * 1920 + 7200
    assert len(list((tmp_path / "turns").iterdir())) == 2
