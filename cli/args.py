"""Argument helpers shared by the csm-mlx commands: model, context and sampling flags, loading, progress."""

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from csm_mlx import hub
from csm_mlx.api import CSM
from csm_mlx.audio import AudioError, AudioWriter, check_output_path, fade_ends, read_audio, write_audio
from csm_mlx.chat.microphone import MicrophoneError
from csm_mlx.checkpoint import DTYPES, CheckpointError
from csm_mlx.codec import SAMPLE_RATE, CodecError
from csm_mlx.context import ContextError
from csm_mlx.options import FRAME_MS, RULES, OptionError, check_options, check_text
from csm_mlx.player import PlaybackError
from csm_mlx.recognizer import DEFAULT_RECOGNIZER, Recognizer
from csm_mlx.script import ScriptError, read_script
from csm_mlx.segment import Segment
from csm_mlx.tokenizer import TokenizerError
from csm_mlx.voices import VOICES, presets
from csm_mlx.watermark import PUBLIC_KEY, WatermarkError, format_key, parse_key

USER_ERRORS = (PlaybackError, ValueError, CheckpointError, hub.HubError, AudioError, CodecError, TokenizerError,
               ContextError, ScriptError, MicrophoneError)
# options whose flag is not the option's own name
FLAGS = {"chunk_frames": "--stream-chunk-frames"}


class CliError(Exception):
    pass


def user_error_message(e: Exception) -> Optional[str]:
    """The one-line message for an error the user can fix, in the CLI's terms; None for a bug."""
    message = _user_error_message(e)
    return None if message is None else " ".join(message.split())  # a library's message may span lines


def _user_error_message(e: Exception) -> Optional[str]:
    if isinstance(e, OptionError):
        if e.param not in RULES:  # not a flag: the text, say
            return str(e)
        return f"{FLAGS.get(e.param, '--' + e.param.replace('_', '-'))} {e.problem}"
    if isinstance(e, USER_ERRORS):
        return str(e)
    if isinstance(e, OSError):  # the file system said no: name the file and its reason
        if not e.strerror:
            return str(e)
        return f"{e.strerror.lower()}" + (f": {e.filename}" if e.filename else "")
    if isinstance(e, MemoryError):
        return "out of memory: use a quantized model, a shorter text or context, or a smaller --batch-size"
    return None


def checked_options(args, **extra) -> dict:
    """The command's sampling and stopping options (and extra ones), checked before any work."""
    return check_options(**sampling_options(args), chunk_chars=args.chunk_chars, **extra)


def read_text(text: Optional[str]) -> str:
    """The text to speak: the argument, else standard input; must be UTF-8."""
    if text is None:
        try:
            text = sys.stdin.read()
            text.encode("utf-8")  # undecodable bytes arrive as lone surrogates where Python escapes them
        except (UnicodeDecodeError, UnicodeEncodeError):
            raise CliError("standard input is not UTF-8 text: convert it, e.g. with iconv -t UTF-8") from None
    if not text.strip():
        raise CliError("text is empty: give the words to speak as an argument or on standard input")
    return check_text(text)


class OutDir:
    """A directory for one file per turn or line, checked up front and created with its first file,
    so a run that fails or is stopped before then leaves no empty directory behind."""

    def __init__(self, path: Optional[str], pattern: str, count: int, inputs: Iterable[Path] = ()):
        self.path = Path(path) if path else None
        self.pattern = pattern
        if self.path is None:
            return
        if self.path.exists() and not self.path.is_dir():
            raise CliError(f"{self.path} exists and is not a directory: give a directory for the files")
        ancestor = self.path
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
            raise CliError(f"cannot create files in {self.path}: {ancestor} is not a writable directory")
        if self.path.exists():  # a directory still to be made holds no input
            inputs = list(inputs)
            for n in range(1, count + 1):
                check_not_inputs(self.path / pattern.format(n), inputs)

    def file(self, n: int) -> Optional[Path]:
        if self.path is None:
            return None
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path / self.pattern.format(n)


def check_not_inputs(output: Optional[Path], inputs: Iterable) -> None:
    """Refuse an output that is one of the files read (a recording must never be overwritten)."""
    if output is not None:
        check_output_path(output, [p for p in inputs if p is not None])


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


def watermark_key(value: str):
    try:
        return parse_key(value)
    except WatermarkError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_arguments(p: argparse.ArgumentParser, training: bool = False) -> None:
    """The model to load; a command that speaks also takes an adapter and the watermark's flags
    (training writes the adapter, and makes no audio)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=hub.DEFAULT_MODEL, metavar="ID_OR_DIR",
                   help=f"hub id or directory: original, transformers or converted MLX (default: {hub.DEFAULT_MODEL})")
    g.add_argument("--tokenizer", metavar="PATH", help="path to a Llama-3.2 tokenizer.json (default: beside the model, else the hub)")
    g.add_argument("--mimi", metavar="PATH", help="path to Mimi weights (default: beside the model, else kyutai/moshiko-pytorch-bf16)")
    on_gpu = "bfloat16" if training else "as stored"
    g.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help=f"dtype of the {'weights trained on' if training else 'unquantized model'} "
                        f"(default: auto, float32 on a CPU, {on_gpu} on a GPU)")
    if training:
        return
    g.add_argument("--adapter-path", metavar="DIR", help="apply the adapter that `csm-mlx finetune` wrote to DIR")
    g = p.add_argument_group("watermark (SilentCipher, as the reference marks all CSM speech as AI-generated)")
    g.add_argument("--watermark-key", type=watermark_key, default=PUBLIC_KEY, metavar="B,B,B,B,B",
                   help=f"your own 5-byte key (default: the reference's public key {format_key(PUBLIC_KEY)})")
    g.add_argument("--no-watermark", action="store_true",
                   help="write unmarked audio (please keep it on: it lets anyone tell the speech is generated)")


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
    g.add_argument("--codebooks", type=int, metavar="N",
                   help="generate and decode only the first N codebooks of each frame: faster, lower quality "
                        "(default: all of the model's, 32 for csm-1b; 8 is Moshi's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    g.add_argument("-v", "--verbose", action="store_true", help="say what is loaded and what context is dropped")


def add_context_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("context (the conversation so far; it sets the voice)")
    g.add_argument("--voice", metavar="NAME",
                   help=f"voice prompt, spoken as --speaker: the model repo's own (prompts/NAME.wav), or one of "
                        f"the reference demo's: {', '.join(VOICES)}")
    g.add_argument("--context-audio", action="append", default=[], metavar="FILE", help="audio of a context turn (repeatable)")
    g.add_argument("--context-text", action="append", default=[], metavar="TEXT", help="transcript of that turn (repeatable)")
    g.add_argument("--context-speaker", action="append", default=[], type=non_negative_int, metavar="N",
                   help="speaker of that turn (repeatable; default: --speaker)")
    g.add_argument("--conversation", metavar="FILE", help="JSON/YAML list of turns {speaker, text, audio}")
    g.add_argument("--asr", default=DEFAULT_RECOGNIZER, metavar="ID_OR_DIR",
                   help="speech recognizer that transcribes --context-audio given without --context-text, an "
                        f"mlx-whisper or parakeet-mlx model (default: {DEFAULT_RECOGNIZER}; needs the chat extra)")



def read_context(args) -> List[Segment]:
    """The context the flags give; --context-audio without any --context-text is transcribed."""
    if args.context_text and len(args.context_audio) != len(args.context_text):
        raise CliError("give one --context-text for each --context-audio (or none, to have them transcribed)")
    if args.context_speaker and len(args.context_speaker) != len(args.context_audio):
        raise CliError("give one --context-speaker for each --context-audio, or none")
    segments = read_script(args.conversation) if args.conversation else []
    speakers = args.context_speaker or [args.speaker] * len(args.context_audio)
    # Explicit context sets the voice: pinned, while a conversation's older turns may be dropped.
    clips = [read_audio(audio) for audio in args.context_audio]
    texts = args.context_text or transcripts(args, clips)
    for path, clip, text, speaker in zip(args.context_audio, clips, texts, speakers):
        segments.append(Segment(speaker, text, clip, pinned=True, source=Path(path)))
    return segments


def transcripts(args, clips: Sequence[np.ndarray]) -> List[str]:
    """What each clip says, by the --asr recognizer; a clip with no words is an error."""
    if not clips:
        return []
    recognizer = Recognizer.load(args.asr)
    texts = []
    for path, clip in zip(args.context_audio, clips):
        text = recognizer.transcribe(clip)
        if not text:
            raise CliError(f"no words were recognized in --context-audio {path}: give its --context-text")
        if not args.quiet:
            print(f"csm-mlx: {path} says: {text}", file=sys.stderr)
        texts.append(text)
    return texts


def context_inputs(args, segments: Iterable[Segment]) -> List[Path]:
    """Every file the context was read from."""
    files = [s.source for s in segments if s.source is not None]
    return files + ([Path(args.conversation)] if args.conversation else [])


def sampling_options(args) -> dict:
    return dict(max_audio_length_ms=args.max_audio_length_ms, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop_after_repeats=args.stop_after_repeats,
                codebooks=args.codebooks)


def load(args, voices: Sequence[str] = ()) -> CSM:
    """The model the flags name; the voice presets asked for are checked first, from the model's
    directory alone, so that a wrong name fails before anything loads."""
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="csm-mlx: %(message)s")
    if voices:
        known = presets(hub.resolve_model(args.model))
        unknown = [name for name in voices if name not in known]
        if unknown:
            raise CliError(f"--voice {unknown[0]!r} is not a voice preset of this model: choose one of {', '.join(known)}")
    logging.getLogger("csm_mlx").info("loading %s", args.model)
    csm = CSM.load(args.model, tokenizer=args.tokenizer, mimi=args.mimi, dtype=args.dtype, adapter_path=args.adapter_path,
                   watermark=not args.no_watermark, watermark_key=args.watermark_key)
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



def write_as_done(speeches, output: Optional[Path], each_path, pause_ms: float, describe, noun: str) -> List[float]:
    """Write each Speech to each_path(n) (when not None) as it is done, and all of them, pause_ms
    apart, to output as they come; interrupted, output keeps the finished ones. Returns their
    durations in seconds."""
    joined = AudioWriter(output) if output else None
    pause = np.zeros(int(SAMPLE_RATE * pause_ms / 1000), np.float32)
    durations: List[float] = []
    try:
        for n, speech in enumerate(speeches, 1):
            path = each_path(n)
            if path is not None:
                write_audio(path, speech.audio)
            if joined is not None:
                joined.write(fade_ends(speech.audio, SAMPLE_RATE) if n == 1 else
                             np.concatenate([pause, fade_ends(speech.audio, SAMPLE_RATE)]))
            durations.append(speech.duration)
            if describe is not None:
                print(describe(n, speech), file=sys.stderr)
    except KeyboardInterrupt:
        if joined is not None:
            if durations:
                joined.close()
                print(f"csm-mlx: stopped; wrote the {len(durations)} finished {noun}(s) to {output}", file=sys.stderr)
            else:
                joined.abort()
        raise
    except BaseException:
        if joined is not None:
            joined.abort()
        raise
    if joined is not None:
        joined.close()
    return durations
