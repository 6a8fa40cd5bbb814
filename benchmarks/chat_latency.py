"""The latency of a voice-chat turn, broken down, on random weights (nothing is downloaded).

    python benchmarks/chat_latency.py --csm tiny              # the pipeline's own overhead
    python benchmarks/chat_latency.py --csm csm-1b --turns 2  # with CSM at its true size

The user is espeak-ng speech followed by silence, fed in 20 ms blocks as a microphone would. For
each turn it prints when, after the last sound of the user's speech, the turn was detected, the
transcript was ready (and the turn's Mimi codes: CSM's context holds the user's audio as codes;
as in `csm-mlx chat`, they are made on a thread of their own while the turn is transcribed), the
language model's first sentence was complete and the first audio chunk was ready to play. Then the
time spent inside the models' own calls on the way, timed in the same run: the recognizer, the
wait for the turn's codes after it, the language model up to its first sentence, CSM up to its
first frame and Mimi's decoding of it; and the overhead: the time from detection to first audio
spent outside them (the pipeline's own work). The speech recognizer and the language model are tiny
random models in mlx-whisper's and mlx-lm's formats (their real sizes' costs are the published
ones, see benchmarks/README.md).
"""

import argparse
import collections
import shutil
import sys
import tempfile
import time
from pathlib import Path

import csm_mlx  # noqa: F401  (loads the fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np

from csm_mlx.api import CSM
from csm_mlx.audio import read_audio
from csm_mlx.recognizer import Recognizer
from csm_mlx.chat.responder import Responder
from csm_mlx.chat.turn_encoder import TurnEncoder
from csm_mlx.chat.turns import SpeechStopped, TurnDetector, TurnSettings
from csm_mlx.chat.voice_chat import VoiceChat
from csm_mlx.codec import Mimi
from csm_mlx.models import Model
from csm_mlx.segment import Segment
from csm_mlx.tokenizer import TextTokenizer

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from bench import SIZES, print_table, with_precision  # noqa: E402
from chat_fixtures import espeak, make_language_model, make_whisper, speech_bounds  # noqa: E402
from speech_fixtures import make_mimi, make_tokenizer, write_voice  # noqa: E402

RATE = 24_000
BLOCK = 480  # 20 ms
QUESTION = "Hello there. What is the weather like today?"


def build(size: str, precision: str, folder: Path):
    model = with_precision(Model(SIZES[size]()), precision)
    csm = CSM(model, TextTokenizer(make_tokenizer(folder / "tokenizer.json")),
              Mimi(make_mimi(folder / "mimi.safetensors")))
    recognizer = Recognizer.load(str(make_whisper(folder / "whisper")))
    llm = make_language_model(folder / "llm")
    clip = read_audio(write_voice(folder / "voice.wav", seconds=3.0))
    voice = csm.tokenize(Segment(0, "A voice prompt.", clip, pinned=True))
    return csm, recognizer, llm, voice


class Stopwatch:
    """Seconds spent inside the calls it wraps, per name: the models' own work within the turn."""

    def __init__(self):
        self.spent = collections.defaultdict(float)

    def call(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[name] += time.perf_counter() - t0
        return timed

    def generator(self, name: str, fn):
        """fn returns a generator: the time inside each of its steps counts, not the time between."""
        def timed(*args, **kwargs):
            steps = fn(*args, **kwargs)
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(steps)
                except StopIteration:
                    return
                finally:
                    self.spent[name] += time.perf_counter() - t0
                yield item
        return timed


def one_turn(csm, recognizer, llm, voice, encoder, audio, speech_end: int, settings: TurnSettings) -> dict:
    chat = VoiceChat(csm, recognizer, Responder.load(str(llm), max_tokens=24, seed=0), voice, temperature=0)
    watch = Stopwatch()  # around the calls into the models, on this chat's objects only
    recognizer_transcribe, mimi_decode = recognizer.transcribe, csm.mimi.decode_step
    transcribed_at = []

    def transcribe(*args):
        try:
            return watch.call("asr", recognizer_transcribe)(*args)
        finally:
            transcribed_at.append(time.perf_counter())
    recognizer.transcribe = transcribe
    csm.mimi.decode_step = watch.call("decode", mimi_decode)
    chat.responder.reply = watch.generator("llm", chat.responder.reply)
    chat.conversation.frames = watch.generator("csm", chat.conversation.frames)
    detector = TurnDetector(settings)
    stopped = None
    start = time.perf_counter()
    try:
        for at in range(0, len(audio), BLOCK):  # in real time: block n arrives at start + n * 20 ms
            time.sleep(max(0.0, start + at / RATE - time.perf_counter()))
            events = [e for e in detector.feed(audio[at:at + BLOCK]) if isinstance(e, SpeechStopped)]
            if events:
                stopped = events[0]
                codes = encoder.encode(stopped.audio)  # as csm-mlx chat does, from the input's thread
                break
        detected = time.perf_counter()
        encoded = []
        codes.add_done_callback(lambda _: encoded.append(time.perf_counter()))
        spoke = start + speech_end / RATE  # when the last sound of the speech came in
        text = chat.hear(stopped.audio, codes)
        transcribed = time.perf_counter()
        reply = chat.reply(text or "Hello.")
        first_chunk = next(iter(reply))
        audio_ready = time.perf_counter()
        spent = dict(watch.spent)  # to the first audio
        spent["turn encode"] = max(0.0, encoded[0] - transcribed_at[0])  # the MLX thread's wait for the codes
        reply.cut(len(first_chunk))
    finally:
        recognizer.transcribe, csm.mimi.decode_step = recognizer_transcribe, mimi_decode
    work = sum(spent.values())
    return {"speech end -> detected (ms)": 1000 * (detected - spoke),
            "-> transcript and turn encoded (ms)": 1000 * (transcribed - spoke),
            "-> first sentence (ms)": 1000 * (reply.first_sentence_at - spoke),
            "-> first audio (ms)": 1000 * (audio_ready - spoke),
            "asr (ms)": 1000 * spent["asr"], "turn's codes after detection (ms)": 1000 * (encoded[0] - detected),
            "waiting for them after asr (ms)": 1000 * spent["turn encode"],
            "llm to 1st sentence (ms)": 1000 * spent["llm"], "csm to 1st frame (ms)": 1000 * spent["csm"],
            "mimi decode (ms)": 1000 * spent["decode"],
            "overhead (ms)": 1000 * ((audio_ready - detected) - work)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csm", choices=list(SIZES), default="tiny")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--silence-ms", type=float, default=500)
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is missing: apt-get install espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        csm, recognizer, llm, voice = build(args.csm, args.precision, folder)
        speech = espeak(folder / "question.wav", QUESTION)
        audio = np.concatenate([np.zeros(RATE // 2, np.float32), speech, np.zeros(2 * RATE, np.float32)])
        speech_end = RATE // 2 + speech_bounds(speech)[1]
        settings = TurnSettings(silence_ms=args.silence_ms)
        encoder = TurnEncoder(csm.mimi.path, csm.mimi.num_codebooks)
        rows = []
        for turn in range(args.turns + 1):  # the first warms up (compilation, caches)
            row = one_turn(csm, recognizer, llm, voice, encoder, audio, speech_end, settings)
            if turn:
                rows.append({"csm": f"{args.csm} {args.precision}", "turn": turn, **row})
        encoder.close()
    print(f"# {time.strftime('%Y-%m-%d')}, MLX {mx.__version__} on {mx.default_device()}, silence {args.silence_ms:.0f} ms")
    print_table(rows)


if __name__ == "__main__":
    main()
