"""`csm-mlx`: speak text with CSM-1b on MLX."""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import numpy as np
import yaml

from csm_mlx import hub
from csm_mlx.audio import AudioError, check_output_path, read_audio, write_audio
from csm_mlx.checkpoint import DTYPES, CheckpointError
from csm_mlx.codec import FRAME_SAMPLES, SAMPLE_RATE, CodecError
from csm_mlx.generation import FRAME_MS
from csm_mlx.generator import CSM, VOICES, Segment, expected_seconds
from csm_mlx.player import PlaybackError, Player
from csm_mlx.tokenizer import TokenizerError

EXAMPLES = """examples:
  csm-mlx "Hello from MLX." --speaker 0 -o hello.wav
  echo "Read from stdin." | csm-mlx -o out.flac
  csm-mlx "Same voice as the demo." --voice conversational_a -o a.wav
  csm-mlx "Answering you." --speaker 1 --context-audio you.wav --context-text "What did you say?" \\
          --context-speaker 0 -o reply.wav
  csm-mlx "Next line." --conversation chat.yaml -o next.wav --temperature 0 --max-audio-length-ms 5000

A conversation file is a list of turns: [{"speaker": 0, "text": "...", "audio": "turn1.wav"}, ...]
(JSON or YAML; audio paths are relative to the file; audio is optional).
"""

USER_ERRORS = (PlaybackError, ValueError, CheckpointError, hub.HubError, AudioError, CodecError, TokenizerError, FileNotFoundError)


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


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="csm-mlx",
        description="Speak text with Sesame's CSM-1b on MLX, optionally in the voice of context audio.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("text", nargs="?", help="the text to speak (read from standard input when omitted)")
    p.add_argument("-o", "--output", metavar="FILE", help="output audio file, .wav or .flac (24 kHz mono)")
    p.add_argument("--speaker", type=non_negative_int, default=0, metavar="N", help="speaker id of the new turn (default: 0)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default=hub.DEFAULT_MODEL, metavar="ID_OR_DIR",
                   help=f"hub id or directory: original, transformers or converted MLX (default: {hub.DEFAULT_MODEL})")
    g.add_argument("--tokenizer", metavar="PATH", help="path to a Llama-3.2 tokenizer.json (default: beside the model, else the hub)")
    g.add_argument("--mimi", metavar="PATH", help="path to Mimi weights (default: beside the model, else kyutai/moshiko-pytorch-bf16)")
    g.add_argument("--dtype", choices=list(DTYPES), help="cast an unquantized model to this dtype")

    g = p.add_argument_group("context (the conversation so far; it sets the voice)")
    g.add_argument("--voice", choices=list(VOICES), metavar="NAME", help=f"voice prompt of the reference demo, spoken as --speaker: {', '.join(VOICES)}")
    g.add_argument("--context-audio", action="append", default=[], metavar="FILE", help="audio of a context turn (repeatable)")
    g.add_argument("--context-text", action="append", default=[], metavar="TEXT", help="transcript of that turn (repeatable)")
    g.add_argument("--context-speaker", action="append", default=[], type=non_negative_int, metavar="N",
                   help="speaker of that turn (repeatable; default: --speaker)")
    g.add_argument("--conversation", metavar="FILE", help="JSON/YAML list of turns {speaker, text, audio}")

    g = p.add_argument_group("sampling")
    g.add_argument("--max-audio-length-ms", type=float, default=10_000, metavar="MS", help="frame cap in ms (default: 10000)")
    g.add_argument("--temperature", type=float, default=0.9, metavar="T", help="0 is greedy (default: 0.9)")
    g.add_argument("--top-k", type=int, default=50, metavar="K", help="0 disables (default: 50)")
    g.add_argument("--top-p", type=float, default=0.0, metavar="P", help="nucleus sampling, 0 disables (default: 0)")
    g.add_argument("--min-p", type=float, default=0.0, metavar="P", help="0 disables (default: 0)")
    g.add_argument("--seed", type=int, metavar="N", help="seed for reproducible sampling")

    g = p.add_argument_group("playback")
    g.add_argument("--play", action="store_true", help="play the speech as it is generated (also writes -o if given)")
    g.add_argument("--stream-chunk-frames", type=int, default=1, metavar="N",
                   help="frames per streamed chunk, 80 ms each (default: 1, lowest latency)")

    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    g.add_argument("-v", "--verbose", action="store_true", help="say what is loaded from where")
    return p


def read_conversation(path: Path) -> List[Segment]:
    try:
        turns = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except FileNotFoundError:
        raise CliError(f"conversation file {path} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CliError(f"conversation file {path} is not valid JSON/YAML ({e})") from None
    if not isinstance(turns, list):
        raise CliError(f"conversation file {path} must hold a list of turns")
    segments = []
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or not isinstance(turn.get("text"), str) or "speaker" not in turn:
            raise CliError(f"{path}: turn {n} needs a speaker and a text")
        audio = None
        if turn.get("audio"):
            try:
                audio = read_audio(path.parent / turn["audio"])
            except AudioError as e:
                raise CliError(f"{path}: turn {n}: {e}") from None
        segments.append(Segment(turn["speaker"], turn["text"], audio))
    return segments


def read_context(args) -> List[Segment]:
    if len(args.context_audio) != len(args.context_text):
        raise CliError("give one --context-text for each --context-audio")
    if args.context_speaker and len(args.context_speaker) != len(args.context_audio):
        raise CliError("give one --context-speaker for each --context-audio, or none")
    segments = read_conversation(Path(args.conversation)) if args.conversation else []
    speakers = args.context_speaker or [args.speaker] * len(args.context_audio)
    for audio, text, speaker in zip(args.context_audio, args.context_text, speakers):
        segments.append(Segment(speaker, text, read_audio(audio)))
    return segments


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


def run(args) -> None:
    text = args.text if args.text is not None else sys.stdin.read()
    if not text.strip():
        raise CliError("text is empty: give the words to speak as an argument or on standard input")
    if not args.output and not args.play:
        raise CliError("nowhere to put the audio: give -o FILE.wav, --play, or both")
    output = check_output_path(args.output) if args.output else None
    context = read_context(args)

    log = (lambda msg: print(msg, file=sys.stderr)) if args.verbose else (lambda msg: None)
    log(f"loading {args.model}")
    csm = CSM.load(args.model, tokenizer=args.tokenizer, mimi=args.mimi, dtype=args.dtype)
    log(f"model from {csm.model_dir}")
    if args.voice:
        context.insert(0, csm.voice(args.voice, args.speaker))

    sampling = dict(max_audio_length_ms=args.max_audio_length_ms, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, seed=args.seed)
    progress = Progress(not args.quiet)
    mx.reset_peak_memory()
    if args.play:
        report = play(csm, text, args.speaker, context, sampling, args.stream_chunk_frames, progress, output)
    else:
        speech = csm.generate(text, args.speaker, context, on_frame=progress, **sampling)
        progress.close()
        write_audio(output, speech.audio, speech.sample_rate)
        report = f"wrote {output}: {speech.duration:.2f} s audio"
    wall = time.perf_counter() - progress.start
    if not args.quiet:
        audio_s = progress.frames * FRAME_MS / 1000
        rtf = f"{wall / audio_s:.2f}" if audio_s else "-"
        print(f"{report} ({progress.frames} frames) in {wall:.2f} s, RTF {rtf}, "
              f"peak memory {mx.get_peak_memory() / 1e9:.2f} GB", file=sys.stderr)


def play(csm, text, speaker, context, sampling, chunk_frames, progress, output) -> str:
    """Play the speech as it is generated; write it to output too (also when interrupted)."""
    expected = min(expected_seconds(text), sampling["max_audio_length_ms"] / 1000)
    player = Player(expected_seconds=expected)
    chunks, first_audio = [], None
    try:
        for chunk in csm.stream(text, speaker, context, chunk_frames=chunk_frames, **sampling):
            first_audio = first_audio or time.perf_counter() - progress.start
            chunks.append(chunk)
            player.feed(chunk)
            progress(sum(map(len, chunks)) // FRAME_SAMPLES)
        player.finish()
    except KeyboardInterrupt:
        player.stop()
        progress.close()
        if output and chunks:
            write_audio(output, np.concatenate(chunks))
            print(f"csm-mlx: wrote the {len(np.concatenate(chunks)) / SAMPLE_RATE:.2f} s generated so far to {output}",
                  file=sys.stderr)
        raise
    progress.close()
    report = (f"played {progress.frames * FRAME_MS / 1000:.2f} s audio, first audio after {first_audio or 0:.2f} s, "
              f"playback started {player.start_delay or 0:.2f} s later, {player.underruns} underruns")
    if output:
        write_audio(output, np.concatenate(chunks) if chunks else np.zeros(0, np.float32))
        report += f"; wrote {output}"
    return report


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (CliError, *USER_ERRORS) as e:
        print(f"csm-mlx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("csm-mlx: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
