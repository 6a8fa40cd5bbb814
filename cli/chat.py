"""`csm-mlx chat`: talk with a language model through the microphone; CSM speaks its answers."""

import argparse
import sys

from csm_mlx.chat.local import ECHO_MODES, LocalChat
from csm_mlx.chat.microphone import Microphone, Recording
from csm_mlx.recognizer import DEFAULT_RECOGNIZER, Recognizer
from csm_mlx.chat.responder import DEFAULT_LANGUAGE_MODEL, DEFAULT_SYSTEM, Responder
from csm_mlx.chat.transcript import Transcript
from csm_mlx.chat.turns import TurnSettings
from csm_mlx.chat.voice_chat import VoiceChat
from csm_mlx.player import Player

from .args import (CliError, Parser, add_model_arguments, add_sampling_arguments, checked_options, load,
                   non_negative_int)

DEFAULT_VOICE = "conversational_a"
EXAMPLES = f"""examples:
  csm-mlx chat                                   # talk; Ctrl-C ends the chat
  csm-mlx chat --echo headphones                 # with headphones: interrupt it by speaking
  csm-mlx chat --llm mlx-community/Qwen3-1.7B-4bit --system "You are a pirate." --save chats/today
  csm-mlx chat --input-file question.wav --save out/   # a recording as the microphone
  csm-mlx dialogue chats/today/chat.yaml -o today.wav  # the saved chat as one file

Each turn: you speak; {', '.join(['silence ends your turn', 'the recognizer transcribes it',
'the language model answers, sentence by sentence', 'CSM speaks each sentence'])}. CSM hears the
whole conversation: your turns as you said them, its own as it said them.
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="csm-mlx chat", description="A spoken conversation: speech recognition, a language model and "
               "CSM as the voice, all on this machine.", epilog=EXAMPLES,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the conversation")
    g.add_argument("--asr", default=DEFAULT_RECOGNIZER, metavar="ID_OR_DIR",
                   help=f"speech recognizer, an mlx-whisper or parakeet-mlx model, e.g. "
                        f"mlx-community/parakeet-tdt-0.6b-v3 (default: {DEFAULT_RECOGNIZER})")
    g.add_argument("--language", metavar="CODE", help="the language you speak, e.g. en (default: detected each turn; Whisper only)")
    g.add_argument("--llm", default=DEFAULT_LANGUAGE_MODEL, metavar="ID_OR_DIR",
                   help=f"language model, any mlx-lm model (default: {DEFAULT_LANGUAGE_MODEL})")
    g.add_argument("--system", default=DEFAULT_SYSTEM, metavar="TEXT",
                   help="the language model's system prompt (default: short, spoken answers)")
    g.add_argument("--max-tokens", type=positive_int, default=200, metavar="N", help="longest answer in tokens (default: 200)")
    g.add_argument("--voice", default=DEFAULT_VOICE, metavar="NAME",
                   help=f"CSM's voice: a voice preset of the model (default: {DEFAULT_VOICE})")
    g.add_argument("--save", metavar="DIR",
                   help="save the chat to DIR as it goes: each turn's audio and DIR/chat.yaml, a dialogue script")
    g.add_argument("--max-turns", type=non_negative_int, metavar="N", help="end after answering N turns")
    g = p.add_argument_group("audio")
    g.add_argument("--input-device", metavar="NAME_OR_INDEX", help="microphone (default: the system's)")
    g.add_argument("--output-device", metavar="NAME_OR_INDEX", help="speakers (default: the system's)")
    g.add_argument("--input-file", metavar="FILE",
                   help="a recording played in as the microphone, in real time; the chat ends after it")
    g.add_argument("--echo", choices=ECHO_MODES, default="speakers",
                   help="speakers (default): it does not listen while it speaks, so it never answers itself; "
                        "headphones: speaking while it talks interrupts it")
    g.add_argument("--silence-ms", type=float, default=500, metavar="MS",
                   help="silence that ends your turn (default: 500)")
    g.add_argument("--vad-aggressiveness", type=int, default=3, choices=range(4), metavar="0-3",
                   help="how strictly sound must look like speech to count (default: 3, the strictest)")
    add_model_arguments(p)
    add_sampling_arguments(p)
    return p


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}")
    return int(value)


def device(value):
    return int(value) if value is not None and value.isdigit() else value


def run(args) -> None:
    if args.input_file and args.input_device:
        raise CliError("give --input-file or --input-device, not both")
    options = checked_options(args)
    options.pop("chunk_chars")  # each sentence is spoken whole
    settings = TurnSettings(silence_ms=args.silence_ms, aggressiveness=args.vad_aggressiveness)
    # the cheap checks first (the input, the transcript directory), then the three models
    source = Recording(args.input_file) if args.input_file else Microphone(device(args.input_device))
    transcript = Transcript(args.save) if args.save else None
    say = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr))
    say(f"loading the language model {args.llm}")
    responder = Responder.load(args.llm, args.system, max_tokens=args.max_tokens)
    say(f"loading the speech recognizer {args.asr}")
    recognizer = Recognizer.load(args.asr, args.language)
    csm = load(args, [args.voice])
    chat = VoiceChat(csm, recognizer, responder, csm.voice(args.voice, 0), **options)

    def on_turn(turn):
        if turn.text:
            print(f"{'you' if turn.role == 'user' else 'csm'}: {turn.text}{' [interrupted]' if turn.interrupted else ''}",
                  flush=True)
        if transcript is not None:
            transcript.add(turn)

    local = LocalChat(chat, source, settings, echo=args.echo, on_turn=on_turn,
                      player=lambda: Player(device=device(args.output_device)))
    say("listening: speak, and pause when you are done (Ctrl-C ends the chat)")
    try:
        local.run(args.max_turns)
    finally:
        if transcript is not None and transcript.turns:
            say(f"saved {len(transcript.turns)} turns to {transcript.directory}")
