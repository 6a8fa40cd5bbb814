"""`csm-mlx TEXT`: speak text, optionally in the voice of context audio, to a file or the speakers."""

import argparse
import sys
import time

import mlx.core as mx
import numpy as np

from csm_mlx.audio import check_output_path, write_audio
from csm_mlx.codec import FRAME_SAMPLES, SAMPLE_RATE
from csm_mlx.conversation import expected_seconds
from csm_mlx.frames import FRAME_MS
from csm_mlx.player import Player

from .args import (CliError, Parser, Progress, add_context_arguments, add_model_arguments, add_sampling_arguments,
                   load, non_negative_int, read_context, sampling_options)

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


