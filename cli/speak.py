"""`csm-mlx TEXT`: speak text, optionally in the voice of context audio, to a file or the speakers."""

import argparse
import logging
import sys
import time
from typing import Optional

import mlx.core as mx

from csm_mlx.audio import AudioWriter, check_output_path
from csm_mlx.codec import FRAME_SAMPLES, SAMPLE_RATE
from csm_mlx.text import expected_seconds
from csm_mlx.player import Player

from .args import (CliError, Parser, Progress, add_context_arguments, add_model_arguments, add_sampling_arguments,
                   check_not_inputs, checked_options, context_inputs, load, non_negative_int, read_context, read_text)

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
  csm-mlx verify hello.wav                  # the watermark all output carries (--no-watermark: none)

Text longer than --chunk-chars is spoken sentence by sentence in one voice. A conversation file
is a list of turns: [{"speaker": 0, "text": "...", "audio": "turn1.wav"}, ...] (JSON or YAML;
audio paths are relative to the file; audio is optional).
"""


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



def run(args) -> None:
    text = read_text(args.text)
    options = checked_options(args, speaker=args.speaker, chunk_frames=args.stream_chunk_frames)
    speaker, chunk_frames = options.pop("speaker"), options.pop("chunk_frames")
    if not args.output and not args.play:
        raise CliError("nowhere to put the audio: give -o FILE.wav, --play, or both")
    output = check_output_path(args.output) if args.output else None
    context = read_context(args)
    check_not_inputs(output, context_inputs(args, context))
    csm = load(args, [args.voice] if args.voice else [])
    if args.voice:
        context.insert(0, csm.voice(args.voice, speaker))

    progress = Progress(not args.quiet)
    mx.reset_peak_memory()
    chunks = csm.stream(text, speaker, context, chunk_frames=chunk_frames, **options)
    cap = options["max_audio_length_ms"]
    player = Player(expected_seconds=min(expected_seconds(text), cap / 1000 if cap else float("inf"))) if args.play else None
    report = speak(chunks, player, AudioWriter(output) if output else None, progress)
    if not args.quiet:
        print(progress.summary(report), file=sys.stderr)


def speak(chunks, player: Optional[Player], writer: Optional[AudioWriter], progress: Progress) -> str:
    """Play and/or write the audio chunks as they are generated. Stopped by a signal, playback ends
    at once and the audio generated so far is still written; any other failure leaves no file."""
    samples, first_audio = 0, None
    try:
        for chunk in chunks:
            arrived = time.perf_counter() - progress.start
            if writer is not None:
                writer.write(chunk)
            # counted (and announced) once written: a signal before then must not claim the chunk
            samples += len(chunk)
            if first_audio is None:
                first_audio = arrived
                logging.getLogger("csm_mlx").info("first audio after %.2f s", first_audio)
            if player is not None:
                player.feed(chunk)
            progress(samples // FRAME_SAMPLES)
        if player is not None:
            player.finish()
    except KeyboardInterrupt:
        if player is not None:
            player.stop()
        progress.close()
        if writer is not None and samples:
            writer.close()
            print(f"csm-mlx: wrote the {samples / SAMPLE_RATE:.2f} s generated so far to {writer.path}", file=sys.stderr)
        elif writer is not None:
            writer.abort()
        raise
    except BaseException:
        if player is not None:
            player.stop()
        if writer is not None:
            writer.abort()
        raise
    progress.close()
    seconds = samples / SAMPLE_RATE
    if player is None:
        writer.close()
        return f"wrote {writer.path}: {seconds:.2f} s audio"
    report = (f"played {seconds:.2f} s audio, first audio after {first_audio or 0:.2f} s, "
              f"playback started {player.start_delay or 0:.2f} s later, {player.underruns} underruns")
    if writer is not None:
        writer.close()
        report += f"; wrote {writer.path}"
    return report
