"""`csm-mlx`: speak text with CSM-1b on MLX; `csm-mlx dialogue`: a whole script; `csm-mlx batch`: many lines at once."""

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import numpy as np

from csm_mlx import hub
from csm_mlx.audio import AudioError, check_output_path, read_audio, write_audio
from csm_mlx.checkpoint import DTYPES, CheckpointError
from csm_mlx.codec import FRAME_SAMPLES, SAMPLE_RATE, CodecError
from csm_mlx.context import ContextError
from csm_mlx.conversation import ScriptError, expected_seconds, join_turns, read_script
from csm_mlx.generation import FRAME_MS
from csm_mlx.generator import CSM, VOICES
from csm_mlx.player import PlaybackError, Player
from csm_mlx.segment import Segment
from csm_mlx.tokenizer import TokenizerError

EXAMPLES = """examples:
  csm-mlx "Hello from MLX." --speaker 0 -o hello.wav
  echo "Read from stdin." | csm-mlx -o out.flac
  csm-mlx "Same voice as the demo." --voice conversational_a -o a.wav
  csm-mlx "Answering you." --speaker 1 --context-audio you.wav --context-text "What did you say?" \\
          --context-speaker 0 -o reply.wav
  csm-mlx "Next line." --conversation chat.yaml -o next.wav --temperature 0
  csm-mlx "Hear it as it is generated." --play
  csm-mlx dialogue script.txt -o conversation.wav --voice 0=conversational_a --voice 1=conversational_b
  csm-mlx batch lines.txt --out-dir clips/ --voice conversational_a

Text longer than --chunk-chars is spoken sentence by sentence in one voice. A conversation file
is a list of turns: [{"speaker": 0, "text": "...", "audio": "turn1.wav"}, ...] (JSON or YAML;
audio paths are relative to the file; audio is optional).
"""

BATCH_EXAMPLES = """examples:
  csm-mlx batch prompts.txt --out-dir clips/ --voice conversational_a --temperature 0
  csm-mlx batch chapter.txt -o chapter.wav --batch-size 8 --pause-ms 400

Lines longer than --chunk-chars are split into sentence chunks, generated side by side and joined.
Greedy (--temperature 0), each line is the audio it gets when spoken alone.
"""

DIALOGUE_EXAMPLES = """A script is text lines "[speaker] text":
  [0] Hey, how are you doing?
  [1] Pretty good, pretty good. How about you?
or a JSON/YAML list of turns {speaker, text, audio}; turns with audio are taken as spoken.
Each generated turn becomes context for the next.
"""

USER_ERRORS = (PlaybackError, ValueError, CheckpointError, hub.HubError, AudioError, CodecError, TokenizerError,
               FileNotFoundError, ContextError, ScriptError)


class CliError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value!r}")
    return number


def speaker_value(value: str):
    """SPEAKER=VALUE, as in --voice 0=conversational_a."""
    speaker, sep, rest = value.partition("=")
    if not sep or not rest:
        raise argparse.ArgumentTypeError(f"expected SPEAKER=VALUE, got {value!r}")
    return non_negative_int(speaker), rest


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=hub.DEFAULT_MODEL, metavar="ID_OR_DIR",
                   help=f"hub id or directory: original, transformers or converted MLX (default: {hub.DEFAULT_MODEL})")
    g.add_argument("--tokenizer", metavar="PATH", help="path to a Llama-3.2 tokenizer.json (default: beside the model, else the hub)")
    g.add_argument("--mimi", metavar="PATH", help="path to Mimi weights (default: beside the model, else kyutai/moshiko-pytorch-bf16)")
    g.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="dtype of an unquantized model (default: auto, float32 on a CPU, as stored on a GPU)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling and stopping")
    g.add_argument("--max-audio-length-ms", type=float, metavar="MS",
                   help="frame cap per chunk or turn (default: from its length, 3 s + 0.12 s per character)")
    g.add_argument("--stop-after-repeats", type=int, metavar="N",
                   help="also stop after N frames in a row with the same codebook-0 code (silence or a loop)")
    g.add_argument("--chunk-chars", type=int, default=250, metavar="N",
                   help="speak longer text in chunks of up to N characters, in one voice (default: 250; 0: never)")
    g.add_argument("--temperature", type=float, default=0.9, metavar="T", help="0 is greedy (default: 0.9)")
    g.add_argument("--top-k", type=int, default=50, metavar="K", help="0 disables (default: 50)")
    g.add_argument("--top-p", type=float, default=0.0, metavar="P", help="nucleus sampling, 0 disables (default: 0)")
    g.add_argument("--min-p", type=float, default=0.0, metavar="P", help="0 disables (default: 0)")
    g.add_argument("--seed", type=int, metavar="N", help="seed for reproducible sampling")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    g.add_argument("-v", "--verbose", action="store_true", help="say what is loaded and what context is dropped")


def add_context_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("context (the conversation so far; it sets the voice)")
    g.add_argument("--voice", choices=list(VOICES), metavar="NAME",
                   help=f"voice prompt of the reference demo, spoken as --speaker: {', '.join(VOICES)}")
    g.add_argument("--context-audio", action="append", default=[], metavar="FILE", help="audio of a context turn (repeatable)")
    g.add_argument("--context-text", action="append", default=[], metavar="TEXT", help="transcript of that turn (repeatable)")
    g.add_argument("--context-speaker", action="append", default=[], type=non_negative_int, metavar="N",
                   help="speaker of that turn (repeatable; default: --speaker)")
    g.add_argument("--conversation", metavar="FILE", help="JSON/YAML list of turns {speaker, text, audio}")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="csm-mlx", description="Speak text with Sesame's CSM-1b on MLX, optionally in the voice of context "
               "audio. `csm-mlx dialogue -h` speaks whole scripts, `csm-mlx batch -h` many lines at once.", epilog=EXAMPLES,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="?", help="the text to speak (read from standard input when omitted)")
    p.add_argument("-o", "--output", metavar="FILE", help="output audio file, .wav or .flac (24 kHz mono)")
    p.add_argument("--speaker", type=non_negative_int, default=0, metavar="N", help="speaker id of the new turn (default: 0)")
    add_model_arguments(p)
    add_context_arguments(p)
    g = p.add_argument_group("playback")
    g.add_argument("--play", action="store_true", help="play the speech as it is generated (also writes -o if given)")
    g.add_argument("--stream-chunk-frames", type=int, default=1, metavar="N",
                   help="frames per streamed chunk, 80 ms each (default: 1, lowest latency)")
    add_sampling_arguments(p)
    return p


def build_dialogue_parser() -> argparse.ArgumentParser:
    p = Parser(prog="csm-mlx dialogue", description="Speak a dialogue script turn by turn, each turn with the ones "
               "before as context, into one audio file.", epilog=DIALOGUE_EXAMPLES,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("script", help='text lines "[speaker] text", or a JSON/YAML list of turns')
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="the whole dialogue, .wav or .flac")
    p.add_argument("--turns-dir", metavar="DIR", help="also write each turn to DIR/turn_001.wav, ... as it is done")
    p.add_argument("--pause-ms", type=float, default=300, metavar="MS", help="silence between turns (default: 300)")
    g = p.add_argument_group("voices (pinned: never dropped from the context)")
    g.add_argument("--voice", action="append", default=[], type=speaker_value, metavar="SPEAKER=NAME",
                   help=f"a voice preset for a speaker, e.g. 0=conversational_a ({', '.join(VOICES)})")
    g.add_argument("--voice-audio", action="append", default=[], type=speaker_value, metavar="SPEAKER=FILE",
                   help="a recorded voice prompt for a speaker")
    g.add_argument("--voice-text", action="append", default=[], type=speaker_value, metavar="SPEAKER=TEXT",
                   help="the transcript of that speaker's --voice-audio")
    add_model_arguments(p)
    add_sampling_arguments(p)
    return p


def build_batch_parser() -> argparse.ArgumentParser:
    p = Parser(prog="csm-mlx batch", description="Speak many lines in one voice, several at a time: each step "
               "reads the weights once for the whole batch. Each line is spoken after the same context only "
               "(not after the lines before it).", epilog=BATCH_EXAMPLES,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lines", metavar="FILE", help="text file, one utterance per non-empty line (- for standard input)")
    p.add_argument("-o", "--output", metavar="FILE", help="all lines in one file, .wav or .flac, --pause-ms apart")
    p.add_argument("--out-dir", metavar="DIR", help="one file per line: DIR/line_001.wav, ... (written as each is done)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="chunks generated together (default: 8)")
    p.add_argument("--pause-ms", type=float, default=300, metavar="MS", help="silence between lines in -o (default: 300)")
    p.add_argument("--speaker", type=non_negative_int, default=0, metavar="N", help="speaker id of the lines (default: 0)")
    add_model_arguments(p)
    add_context_arguments(p)
    add_sampling_arguments(p)
    return p


def read_context(args) -> List[Segment]:
    if len(args.context_audio) != len(args.context_text):
        raise CliError("give one --context-text for each --context-audio")
    if args.context_speaker and len(args.context_speaker) != len(args.context_audio):
        raise CliError("give one --context-speaker for each --context-audio, or none")
    segments = read_script(args.conversation) if args.conversation else []
    speakers = args.context_speaker or [args.speaker] * len(args.context_audio)
    # Explicit context sets the voice: pinned, while a conversation's older turns may be dropped.
    for audio, text, speaker in zip(args.context_audio, args.context_text, speakers):
        segments.append(Segment(speaker, text, read_audio(audio), pinned=True))
    return segments


def sampling_options(args) -> dict:
    return dict(max_audio_length_ms=args.max_audio_length_ms, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop_after_repeats=args.stop_after_repeats)


def load(args) -> CSM:
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="csm-mlx: %(message)s")
    logging.getLogger("csm_mlx").info("loading %s", args.model)
    csm = CSM.load(args.model, tokenizer=args.tokenizer, mimi=args.mimi, dtype=args.dtype)
    logging.getLogger("csm_mlx").info("model from %s", csm.model_dir)
    return csm


class Progress:
    """One status line on stderr, rewritten as frames arrive."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.frames = 0

    def __call__(self, frames: int) -> None:
        self.frames = frames
        if self.enabled:
            audio_s = frames * FRAME_MS / 1000
            wall = time.perf_counter() - self.start
            print(f"\rframe {frames} | {audio_s:.2f} s audio | RTF {wall / audio_s:.2f}", end="", file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)

    def summary(self, report: str) -> str:
        wall = time.perf_counter() - self.start
        audio_s = self.frames * FRAME_MS / 1000
        rtf = f"{wall / audio_s:.2f}" if audio_s else "-"
        return (f"{report} ({self.frames} frames) in {wall:.2f} s, RTF {rtf}, "
                f"peak memory {mx.get_peak_memory() / 1e9:.2f} GB")


def run(args) -> None:
    text = args.text if args.text is not None else sys.stdin.read()
    if not text.strip():
        raise CliError("text is empty: give the words to speak as an argument or on standard input")
    if not args.output and not args.play:
        raise CliError("nowhere to put the audio: give -o FILE.wav, --play, or both")
    output = check_output_path(args.output) if args.output else None
    context = read_context(args)
    csm = load(args)
    if args.voice:
        context.insert(0, csm.voice(args.voice, args.speaker))

    options = dict(sampling_options(args), chunk_chars=args.chunk_chars)
    progress = Progress(not args.quiet)
    mx.reset_peak_memory()
    if args.play:
        report = play(csm, text, args.speaker, context, options, args.stream_chunk_frames, progress, output)
    else:
        speech = csm.generate(text, args.speaker, context, on_frame=progress, **options)
        progress.close()
        write_audio(output, speech.audio, speech.sample_rate)
        report = f"wrote {output}: {speech.duration:.2f} s audio"
    if not args.quiet:
        print(progress.summary(report), file=sys.stderr)


def play(csm, text, speaker, context, options, chunk_frames, progress, output) -> str:
    """Play the speech as it is generated; write it to output too (also when interrupted)."""
    cap = options["max_audio_length_ms"]
    player = Player(expected_seconds=min(expected_seconds(text), cap / 1000 if cap else float("inf")))
    chunks, samples, first_audio = [], 0, None
    try:
        for chunk in csm.stream(text, speaker, context, chunk_frames=chunk_frames, **options):
            first_audio = first_audio or time.perf_counter() - progress.start
            chunks.append(chunk)
            samples += len(chunk)
            player.feed(chunk)
            progress(samples // FRAME_SAMPLES)
        player.finish()
    except KeyboardInterrupt:
        player.stop()
        progress.close()
        if output and chunks:
            write_audio(output, np.concatenate(chunks))
            print(f"csm-mlx: wrote the {samples / SAMPLE_RATE:.2f} s generated so far to {output}", file=sys.stderr)
        raise
    progress.close()
    report = (f"played {progress.frames * FRAME_MS / 1000:.2f} s audio, first audio after {first_audio or 0:.2f} s, "
              f"playback started {player.start_delay or 0:.2f} s later, {player.underruns} underruns")
    if output:
        write_audio(output, np.concatenate(chunks) if chunks else np.zeros(0, np.float32))
        report += f"; wrote {output}"
    return report


def run_dialogue(args) -> None:
    output = check_output_path(args.output)
    turns_dir = Path(args.turns_dir) if args.turns_dir else None
    if turns_dir is not None:
        turns_dir.mkdir(parents=True, exist_ok=True)
        check_output_path(turns_dir / "turn_001.wav")
    turns = read_script(args.script)
    texts = dict(args.voice_text)
    recorded = []
    for speaker, path in args.voice_audio:
        if speaker not in texts:
            raise CliError(f"--voice-audio {speaker}={path} needs --voice-text {speaker}=TRANSCRIPT")
        recorded.append(Segment(speaker, texts[speaker], read_audio(path)))
    csm = load(args)
    voices = [csm.voice(name, speaker) for speaker, name in args.voice] + recorded

    start = time.perf_counter()
    speeches = csm.dialogue(turns, voices, chunk_chars=args.chunk_chars, **sampling_options(args))
    finished = write_as_done(
        speeches, output, lambda n: turns_dir / f"turn_{n:03d}.wav" if turns_dir else None, args.pause_ms,
        None if args.quiet else lambda n, speech: f"turn {n}/{len(turns)} (speaker {turns[n - 1].speaker}): "
                                                  f"{speech.duration:.2f} s", "turn")
    if not args.quiet:
        print(f"wrote {output}: {len(turns)} turns, {sum(map(len, finished)) / SAMPLE_RATE:.2f} s of speech in "
              f"{time.perf_counter() - start:.2f} s", file=sys.stderr)


def write_as_done(speeches, output: Optional[Path], each_path, pause_ms: float, describe, noun: str) -> List[np.ndarray]:
    """Write each Speech to each_path(n) (when not None) as it is done and all of them, pause_ms
    apart, to output; interrupted, output still gets the finished ones. Returns their audio."""
    finished: List[np.ndarray] = []
    try:
        for n, speech in enumerate(speeches, 1):
            finished.append(speech.audio)
            path = each_path(n)
            if path is not None:
                write_audio(path, speech.audio)
            if describe is not None:
                print(describe(n, speech), file=sys.stderr)
    except KeyboardInterrupt:
        if output and finished:
            write_audio(output, join_turns(finished, SAMPLE_RATE, pause_ms))
            print(f"csm-mlx: interrupted; wrote the {len(finished)} finished {noun}(s) to {output}", file=sys.stderr)
        raise
    if output:
        write_audio(output, join_turns(finished, SAMPLE_RATE, pause_ms))
    return finished


def run_batch(args) -> None:
    if not args.output and not args.out_dir:
        raise CliError("nowhere to put the audio: give -o FILE.wav, --out-dir DIR, or both")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    output = check_output_path(args.output) if args.output else None
    lines = read_lines(args.lines)
    if not lines:
        raise CliError(f"{args.lines} has no text: give one utterance per line")
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        check_output_path(out_dir / "line_001.wav")
    context = read_context(args)
    csm = load(args)
    if args.voice:
        context.insert(0, csm.voice(args.voice, args.speaker))

    options = sampling_options(args)
    if options.pop("stop_after_repeats") is not None:
        raise CliError("--stop-after-repeats is not supported with batch: use --max-audio-length-ms")
    start = time.perf_counter()
    speeches = csm.generate_many(lines, args.speaker, context, batch_size=args.batch_size,
                                 chunk_chars=args.chunk_chars, **options)
    finished = write_as_done(
        speeches, output, lambda n: out_dir / f"line_{n:03d}.wav" if out_dir else None, args.pause_ms,
        None if args.quiet else lambda n, speech: f"line {n}/{len(lines)}: {speech.duration:.2f} s", "line")
    if not args.quiet:
        wall, audio_s = time.perf_counter() - start, sum(map(len, finished)) / SAMPLE_RATE
        print(f"{len(lines)} lines, {audio_s:.2f} s audio in {wall:.2f} s (RTF {wall / max(audio_s, 1e-9):.2f})"
              + (f"; wrote {output}" if output else ""), file=sys.stderr)


def read_lines(path: str) -> List[str]:
    """The non-empty lines of a UTF-8 text file (- for standard input), stripped."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"{path} does not exist: give a text file with one utterance per line") from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise CliError(f"{path} is not a UTF-8 text file: give one utterance per line") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


COMMANDS = {"dialogue": (build_dialogue_parser, run_dialogue), "batch": (build_batch_parser, run_batch)}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in COMMANDS:
        build, command = COMMANDS[argv[0]]
        args = build().parse_args(argv[1:])
    else:
        args, command = build_parser().parse_args(argv), run
    try:
        command(args)
    except (CliError, *USER_ERRORS) as e:
        print(f"csm-mlx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("csm-mlx: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
