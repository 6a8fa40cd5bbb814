"""Voice chat: turn detection, the recognizer -> language model -> CSM pipeline, barge-in, memory
over many turns, the saved transcript, and `csm-mlx chat`'s errors. The user is espeak-ng speech
fed through the input path a microphone uses; the models are the tiny CSM and random Whisper and
Llama weights in mlx-whisper's and mlx-lm's own formats."""

import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf

from csm_mlx import CSM, Segment
from csm_mlx.audio import join_turns, read_audio
from csm_mlx.chat.local import LocalChat
from csm_mlx.cli.main import main as cli_main
from csm_mlx.chat.microphone import Recording
from csm_mlx.recognizer import Recognizer
from csm_mlx.chat.responder import Responder
from csm_mlx.chat.transcript import Transcript
from csm_mlx.chat.turns import SpeechStarted, SpeechStopped, TurnDetector, TurnSettings
from csm_mlx.chat.voice_chat import VoiceChat
from csm_mlx.codec import FRAME_SAMPLES
from csm_mlx.player import Player
from csm_mlx.script import read_script
from csm_mlx.text import split_sentences

from chat_fixtures import espeak, make_language_model, make_parakeet, make_whisper, speech_bounds
from speech_fixtures import PacedOutput, add_to_hub_cache, alsa_env

CLI = str(Path(sys.executable).parent / "csm-mlx")
RATE = 24_000
QUESTION = "Hello there. What is the weather like today?"
SPEECH = dict(temperature=0, max_audio_length_ms=1200)  # a second per sentence: the tests run in real time


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("espeak")
    return {"question": espeak(folder / "question.wav", QUESTION),
            "interruption": espeak(folder / "interruption.wav", "Wait, stop, I have another question."),
            "greeting": espeak(folder / "greeting.wav", "Hi there.")}


@pytest.fixture(scope="module")
def models(hub_cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-models")
    whisper = make_whisper(folder / "whisper")
    llm = make_language_model(folder / "llm")
    return CSM.load(watermark=False), Recognizer.load(str(whisper)), llm


def new_chat(models, max_tokens=12, max_context_tokens=4096, **speech) -> VoiceChat:
    csm, recognizer, llm = models
    responder = Responder.load(str(llm), max_tokens=max_tokens, max_context_tokens=max_context_tokens, seed=0)
    return VoiceChat(csm, recognizer, responder, csm.voice("conversational_a", 0), **{**SPEECH, **speech})


def feed(detector: TurnDetector, audio: np.ndarray, block: int = 480, muted: bool = False):
    """(samples fed when the event came, event) for audio fed in microphone-sized blocks."""
    events = []
    for start in range(0, len(audio), block):
        events += [(start + len(audio[start:start + block]), e) for e in detector.feed(audio[start:start + block], muted)]
    return events


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), np.float32)


def test_a_turn_is_speech_then_silence(clips):
    speech = clips["question"]
    onset, end = speech_bounds(speech)
    audio = np.concatenate([silence(0.5), speech, silence(1.5)])
    onset, end = onset + RATE // 2, end + RATE // 2
    settings = TurnSettings(silence_ms=500, prefix_ms=300)
    events = feed(TurnDetector(settings), audio)
    assert [type(e) for _, e in events] == [SpeechStarted, SpeechStopped], events
    (seen_start, started), (seen_stop, stopped) = events
    assert seen_start - onset <= 0.2 * RATE  # detected within 200 ms of the first sound
    assert onset - 0.4 * RATE <= started.start <= onset - 0.25 * RATE  # the prefix reaches back ~300 ms
    assert abs(stopped.end - end) <= 0.15 * RATE  # the turn ends where the sound does (its quiet tail: ~0.1 s)
    assert 0.5 * RATE <= seen_stop - end <= 0.65 * RATE  # and is over after 500 ms of silence
    np.testing.assert_array_equal(stopped.audio, audio[started.start:stopped.end])
    # a longer pause setting keeps the two sentences' gap inside the turn, a tiny one splits them
    assert len(feed(TurnDetector(TurnSettings(silence_ms=90)), audio)) > 2
    assert not feed(TurnDetector(settings), audio, muted=True)  # the assistant speaking: nothing starts
    assert not feed(TurnDetector(settings), np.concatenate([silence(2), 0.01 * np.sin(np.arange(48000) / 3)]))


class Speakers:
    """Makes a Player per reply over a PacedOutput, and keeps the outputs."""

    def __init__(self):
        self.outputs = []
        self.sound = threading.Event()  # set once a reply's audio is audible

    def __call__(self) -> Player:
        def output(**kwargs):
            captured = PacedOutput(**kwargs)
            callback = captured.callback

            def watched(out, *args):
                callback(out, *args)
                if np.any(out):
                    self.sound.set()
            captured.callback = watched
            self.outputs.append(captured)
            return captured, StopIteration
        return Player(output=output)


def played_audio(output: PacedOutput) -> np.ndarray:
    return np.concatenate(output.played) if output.played else np.zeros(0, np.float32)


def audible(audio: np.ndarray) -> np.ndarray:
    """The samples that are not zero: a player that runs dry (a busy machine) plays zeros between
    blocks, and PortAudio primes with zeros; generated audio has no exact zeros."""
    return audio[audio != 0]


def test_a_turn_goes_through_recognizer_language_model_and_csm(models, clips, tmp_path):
    path = tmp_path / "question.wav"
    sf.write(path, np.concatenate([silence(0.3), clips["question"]]), RATE, subtype="FLOAT")
    chat = new_chat(models)
    speakers, turns = Speakers(), []
    local = LocalChat(chat, Recording(path, tail_s=1.0), TurnSettings(), player=speakers, on_turn=turns.append)
    assert local.run() == 1
    user, assistant = turns
    assert (user.role, assistant.role, assistant.interrupted) == ("user", "assistant", False)
    # the transcript reaching the language model is the recognizer's for the turn's audio
    assert user.text and user.text == chat.recognizer.transcribe(user.audio)
    messages = chat.responder.messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant"] and messages[1]["content"] == user.text
    # CSM's context: the voice, the user's own audio and transcript, then the assistant's sentences as played
    csm, history = chat.csm, chat.conversation.history
    assert history[0].pinned and not any(turn.pinned for turn in history[1:])
    np.testing.assert_array_equal(history[1].audio_codes, csm.mimi.encode(user.audio))
    assert list(history[1].text_tokens) == csm.tokenizer.encode(user.text, 1)
    spoken = history[2:]
    assert [list(t.text_tokens) for t in spoken] == [csm.tokenizer.encode(s, 0) for s in split_sentences(assistant.text)]
    codes = np.concatenate([t.audio_codes for t in spoken], axis=1)
    assert len(assistant.audio) == codes.shape[1] * FRAME_SAMPLES
    np.testing.assert_array_equal(audible(played_audio(speakers.outputs[0])), audible(assistant.audio))
    np.testing.assert_allclose(assistant.audio, csm.mimi.decode(codes), atol=1e-5)


class InterruptingUser:
    """A WAV-backed input: asks, waits in silence until the answer is audible, lets it play for
    after_s, then speaks over it (all in real time, through LocalChat's input callback)."""

    def __init__(self, question, interruption, speakers: Speakers, after_s: float = 0.5):
        self.question, self.interruption, self.speakers, self.after_s = question, interruption, speakers, after_s
        self._ended = threading.Event()
        self.spoke_at = None

    ended = property(lambda self: self._ended.is_set())

    def start(self, on_audio):
        def play(audio):
            for start in range(0, len(audio), 480):
                on_audio(audio[start:start + 480])
                time.sleep(0.02)

        def run():
            play(np.concatenate([silence(0.3), self.question]))
            while not self.speakers.sound.is_set():
                play(silence(0.02))
            play(silence(self.after_s))
            self.spoke_at = time.perf_counter()
            play(np.concatenate([self.interruption, silence(1.0)]))
            self._ended.set()
        threading.Thread(target=run, daemon=True).start()

    def close(self):
        pass


def test_speaking_over_the_answer_stops_it_and_cuts_both_contexts(models, clips):
    chat = new_chat(models, max_tokens=40, max_audio_length_ms=8000)
    speakers, turns = Speakers(), []
    user = InterruptingUser(clips["question"], clips["interruption"], speakers)
    local = LocalChat(chat, user, TurnSettings(), echo="headphones", player=speakers, on_turn=turns.append)
    local.run(max_turns=2)
    assert [(t.role, t.interrupted) for t in turns] == [("user", False), ("assistant", True), ("user", False),
                                                          ("assistant", False)]
    interrupted = turns[1]
    (stopped_at,) = local.barge_ins
    # playback stopped at once: no block was pulled from the reply more than one block after the barge-in
    output = speakers.outputs[0]
    assert output.pulled[-1] - stopped_at <= 0.1
    assert stopped_at - user.spoke_at <= 0.3  # the detector's own delay: a few 30 ms frames
    np.testing.assert_array_equal(audible(played_audio(output)), audible(interrupted.audio))
    # CSM's context kept the frames heard, the language model's the words heard
    history = chat.conversation.history
    second_question = [np.array_equal(t.audio_codes, chat.csm.mimi.encode(turns[2].audio)) for t in history].index(True)
    cut = history[2:second_question]  # after the voice and the first question
    assert sum(t.audio_codes.shape[1] for t in cut) == math.ceil(len(interrupted.audio) / FRAME_SAMPLES)
    answer = [m for m in chat.responder.messages if m["role"] == "assistant"][0]["content"]
    assert answer == interrupted.text and interrupted.text


def rss() -> int:
    return psutil.Process().memory_info().rss


def test_fifty_turns_keep_memory_flat(models, clips):
    chat = new_chat(models, max_tokens=4, max_context_tokens=1024, max_audio_length_ms=160)
    question = clips["greeting"]
    sizes = []
    for turn in range(50):
        text = chat.hear(question)
        assert text
        assert sum(map(len, chat.reply(text))) % FRAME_SAMPLES == 0
        if turn in (9, 49):
            sizes.append(rss())
    assert sizes[1] - sizes[0] < 64 * 2**20, sizes
    # the language model's window filled and its oldest exchanges went, whole, the system prompt stayed
    messages = chat.responder.messages
    assert len(messages) < 1 + 2 * 50 and messages[0]["role"] == "system" and messages[1]["role"] == "user"
    assert len(chat.responder._cached) <= chat.responder.max_context_tokens


def test_the_saved_chat_is_a_dialogue_script(models, clips, tmp_path):
    path = tmp_path / "question.wav"
    sf.write(path, np.concatenate([silence(0.3), clips["question"]]), RATE, subtype="FLOAT")
    chat = new_chat(models)
    transcript = Transcript(tmp_path / "saved")
    turns = []

    def keep(turn):
        turns.append(turn)
        transcript.add(turn)
    LocalChat(chat, Recording(path, tail_s=1.0), player=Speakers(), on_turn=keep).run()
    script = read_script(tmp_path / "saved" / "chat.yaml")
    assert [(s.speaker, s.text) for s in script] == [(1, turns[0].text), (0, turns[1].text)]
    for segment, turn in zip(script, turns):
        np.testing.assert_allclose(segment.audio, turn.audio, atol=1e-6)
    with pytest.raises(ValueError, match="already holds a chat transcript"):
        Transcript(tmp_path / "saved")


def run_cli(*args, env=None, command="chat"):
    return subprocess.run([CLI, command, *args], capture_output=True, text=True, timeout=300, env=env)


def run_in_process(capsys, *args) -> tuple:
    code = cli_main(["chat", *map(str, args)])
    return code, capsys.readouterr().err


def test_chat_command_answers_a_recording_plays_it_and_saves_a_replayable_chat(models, clips, tmp_path):
    _, recognizer, llm = models
    wav = tmp_path / "greeting.wav"
    sf.write(wav, np.concatenate([silence(0.3), clips["greeting"]]), RATE, subtype="FLOAT")
    result = run_cli("--asr", str(recognizer.path), "--llm", str(llm), "--input-file", str(wav), "--save",
                     str(tmp_path / "saved"), "--temperature", "0", "--max-audio-length-ms", "800",
                     "--max-tokens", "8", env=alsa_env(tmp_path, capture=True))
    assert result.returncode == 0, result.stderr
    script = read_script(tmp_path / "saved" / "chat.yaml")
    assert [s.speaker for s in script] == [1, 0]
    assert result.stdout.splitlines() == [f"you: {script[0].text}", f"csm: {script[1].text}"]
    (_, stopped), = [e for e in feed(TurnDetector(), np.concatenate([read_audio(wav), silence(3)])) if isinstance(e[1], SpeechStopped)]
    np.testing.assert_array_equal(script[0].audio, stopped.audio)  # the user's turn as the detector cut it
    # PortAudio played the answer, watermarked, exactly as saved
    played = np.fromfile(tmp_path / "played.raw", dtype=np.float32)
    np.testing.assert_allclose(audible(played), audible(script[1].audio), atol=1e-6)
    replay = run_cli(str(tmp_path / "saved" / "chat.yaml"), "-o", str(tmp_path / "replay.wav"), command="dialogue")
    assert replay.returncode == 0, replay.stderr
    replayed, _ = sf.read(tmp_path / "replay.wav", dtype="float32")
    np.testing.assert_allclose(replayed, join_turns([s.audio for s in script], RATE), atol=1e-6)


def test_chat_errors_are_one_line(models, clips, tmp_path, capsys):
    _, _, llm = models
    wav = tmp_path / "q.wav"
    sf.write(wav, clips["question"], RATE)
    cases = [
        (["--llm", tmp_path / "missing", "--input-file", wav], "language model directory"),
        (["--asr", llm, "--llm", llm, "--input-file", wav], "is neither an mlx-whisper nor a parakeet-mlx model"),
        (["--llm", llm, "--input-file", tmp_path / "none.wav"], "does not exist"),
        (["--llm", llm], "no microphone"),  # this machine has no sound card
        (["--llm", llm, "--input-file", wav, "--input-device", "1"], "not both"),
    ]
    for args, message in cases:
        code, err = run_in_process(capsys, "-q", *args)
        assert code == 2, (args, err)
        assert err.count("\n") == 1 and err.startswith("csm-mlx: error:") and message in err, err


def test_context_audio_without_its_text_is_transcribed(models, clips, tmp_path):
    csm, recognizer, _ = models
    clip = tmp_path / "you.wav"
    sf.write(clip, clips["question"], RATE, subtype="FLOAT")
    audio = read_audio(clip)
    transcript = recognizer.transcribe(audio)
    options = dict(temperature=0, max_audio_length_ms=400)
    expected = csm.generate("Hi.", 0, [Segment(0, transcript, audio, pinned=True)], **options).audio
    result = subprocess.run([CLI, "Hi.", "--context-audio", str(clip), "--asr", str(recognizer.path), "--no-watermark",
                             "--temperature", "0", "--max-audio-length-ms", "400", "-o", str(tmp_path / "out.wav")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{clip} says: {transcript}" in result.stderr
    np.testing.assert_allclose(sf.read(tmp_path / "out.wav", dtype="float32")[0], expected, atol=1e-5)
    # the API: a segment with audio and no text, on a CSM loaded with a recognizer
    with_asr = CSM(csm.model, csm.tokenizer, csm.mimi, recognizer=recognizer)
    got = with_asr.generate("Hi.", 0, [Segment(0, None, audio, pinned=True)], **options).audio
    np.testing.assert_allclose(got, expected, atol=1e-5)  # Mimi (threaded) differs between calls in the last bits
    with pytest.raises(ValueError, match="CSM.load\\(asr=...\\)"):
        csm.generate("Hi.", 0, [Segment(0, None, audio)])


def test_a_parakeet_model_transcribes_the_turns(models, clips, hub_cache, tmp_path):
    """--asr with a parakeet-mlx model from the hub: a turn's transcript is parakeet-mlx's own greedy
    one of the turn at its 16 kHz (resampled by librosa here), and it joins CSM's context."""
    import librosa
    import mlx.core as mx
    from parakeet_mlx import from_pretrained
    from parakeet_mlx.audio import get_logmel

    folder = make_parakeet(tmp_path / "parakeet")
    snapshot = add_to_hub_cache(hub_cache, "mlx-community/parakeet-tdt-test", {
        "config.json": folder / "config.json", "model.safetensors": folder / "model.safetensors"})
    recognizer = Recognizer.load("mlx-community/parakeet-tdt-test")
    assert recognizer.path == snapshot and recognizer.parakeet is not None
    audio = clips["question"]
    reference = from_pretrained(str(folder), dtype=mx.float32)
    mel = get_logmel(mx.array(librosa.resample(audio, orig_sr=RATE, target_sr=16_000)), reference.preprocessor_config)
    expected = reference.generate(mel)[0].text.strip()
    assert expected and recognizer.transcribe(audio) == expected
    csm, _, llm = models
    chat = VoiceChat(csm, recognizer, Responder.load(str(llm), max_tokens=4, seed=0))
    assert chat.hear(audio) == expected
    assert chat.conversation.history[-1].text_tokens == csm.tokenizer.encode(expected, 1)
