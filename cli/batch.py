"""`csm-mlx batch`: many lines in one voice, several generated side by side."""

import argparse
import sys
import time
from pathlib import Path
from typing import List

from csm_mlx.audio import check_output_path

from .args import (CliError, OutDir, Parser, add_context_arguments, add_model_arguments, add_sampling_arguments,
                   check_not_inputs, checked_options, context_inputs, load, non_negative_int, read_context,
                   write_as_done)

EXAMPLES = """examples:
  csm-mlx batch prompts.txt --out-dir clips/ --voice conversational_a --temperature 0
  csm-mlx batch chapter.txt -o chapter.wav --batch-size 8 --pause-ms 400

Lines longer than --chunk-chars are split into sentence chunks, generated side by side and joined.
Greedy (--temperature 0), each line is the audio it gets when spoken alone.
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="csm-mlx batch", description="Speak many lines in one voice, several at a time: each step "
               "reads the weights once for the whole batch. Each line is spoken after the same context only "
               "(not after the lines before it).", epilog=EXAMPLES,
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



def run(args) -> None:
    if args.stop_after_repeats is not None:
        raise CliError("--stop-after-repeats is not supported with batch: use --max-audio-length-ms")
    options = checked_options(args, speaker=args.speaker, batch_size=args.batch_size, pause_ms=args.pause_ms)
    speaker, batch_size, pause_ms = options.pop("speaker"), options.pop("batch_size"), options.pop("pause_ms")
    del options["stop_after_repeats"]
    if not args.output and not args.out_dir:
        raise CliError("nowhere to put the audio: give -o FILE.wav, --out-dir DIR, or both")
    output = check_output_path(args.output) if args.output else None
    lines = read_lines(args.lines)
    if not lines:
        raise CliError(f"{args.lines} has no text: give one utterance per line")
    context = read_context(args)
    inputs = context_inputs(args, context) + ([Path(args.lines)] if args.lines != "-" else [])
    check_not_inputs(output, inputs)
    out_dir = OutDir(args.out_dir, "line_{:03d}.wav", len(lines), inputs)
    csm = load(args, [args.voice] if args.voice else [])
    if args.voice:
        context.insert(0, csm.voice(args.voice, speaker))

    start = time.perf_counter()
    speeches = csm.generate_many(lines, speaker, context, batch_size=batch_size, **options)
    durations = write_as_done(
        speeches, output, out_dir.file, pause_ms,
        None if args.quiet else lambda n, speech: f"line {n}/{len(lines)}: {speech.duration:.2f} s", "line")
    if not args.quiet:
        wall, audio_s = time.perf_counter() - start, sum(durations)
        print(f"{len(lines)} lines, {audio_s:.2f} s audio in {wall:.2f} s (RTF {wall / max(audio_s, 1e-9):.2f})"
              + (f"; wrote {output}" if output else ""), file=sys.stderr)


def read_lines(path: str) -> List[str]:
    """The non-empty lines of a UTF-8 text file (- for standard input), stripped."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"{path} does not exist: give a text file with one utterance per line") from None
    except IsADirectoryError:
        raise CliError(f"{path} is a directory: give a text file with one utterance per line") from None
    except UnicodeDecodeError:
        raise CliError(f"{path} is not UTF-8 text: convert it, e.g. with iconv -t UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


