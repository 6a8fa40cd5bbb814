"""`csm-mlx dialogue`: a whole script, turn by turn, each turn with the ones before as context."""

import argparse
import sys
import time
from pathlib import Path

from csm_mlx.voices import VOICES
from csm_mlx.audio import check_output_path, read_audio
from csm_mlx.script import read_script
from csm_mlx.segment import Segment

from .args import (CliError, OutDir, Parser, add_model_arguments, add_sampling_arguments, check_not_inputs,
                   checked_options, load, speaker_value, write_as_done)

EXAMPLES = """A script is text lines "[speaker] text":
  [0] Hey, how are you doing?
  [1] Pretty good, pretty good. How about you?
or a JSON/YAML list of turns {speaker, text, audio}; turns with audio are taken as spoken.
Each generated turn becomes context for the next.
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="csm-mlx dialogue", description="Speak a dialogue script turn by turn, each turn with the ones "
               "before as context, into one audio file.", epilog=EXAMPLES,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("script", help='text lines "[speaker] text", or a JSON/YAML list of turns')
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="the whole dialogue, .wav or .flac")
    p.add_argument("--turns-dir", metavar="DIR", help="also write each turn to DIR/turn_001.wav, ... as it is done")
    p.add_argument("--pause-ms", type=float, default=300, metavar="MS", help="silence between turns (default: 300)")
    g = p.add_argument_group("voices (pinned: never dropped from the context)")
    g.add_argument("--voice", action="append", default=[], type=speaker_value, metavar="SPEAKER=NAME",
                   help=f"a voice preset for a speaker, e.g. 0=conversational_a: the model repo's own or {', '.join(VOICES)}")
    g.add_argument("--voice-audio", action="append", default=[], type=speaker_value, metavar="SPEAKER=FILE",
                   help="a recorded voice prompt for a speaker")
    g.add_argument("--voice-text", action="append", default=[], type=speaker_value, metavar="SPEAKER=TEXT",
                   help="the transcript of that speaker's --voice-audio")
    add_model_arguments(p)
    add_sampling_arguments(p)
    return p



def run(args) -> None:
    options = checked_options(args, pause_ms=args.pause_ms)
    pause_ms = options.pop("pause_ms")
    output = check_output_path(args.output)
    turns = read_script(args.script)
    texts = dict(args.voice_text)
    recorded = []
    for speaker, path in args.voice_audio:
        if speaker not in texts:
            raise CliError(f"--voice-audio {speaker}={path} needs --voice-text {speaker}=TRANSCRIPT")
        recorded.append(Segment(speaker, texts[speaker], read_audio(path), source=Path(path)))
    inputs = [Path(args.script)] + [s.source for s in turns + recorded if s.source is not None]
    check_not_inputs(output, inputs)
    turns_dir = OutDir(args.turns_dir, "turn_{:03d}.wav", len(turns), inputs)
    csm = load(args, [name for _, name in args.voice])
    voices = [csm.voice(name, speaker) for speaker, name in args.voice] + recorded

    start = time.perf_counter()
    speeches = csm.dialogue(turns, voices, **options)
    durations = write_as_done(
        speeches, output, turns_dir.file, pause_ms,
        None if args.quiet else lambda n, speech: f"turn {n}/{len(turns)} (speaker {turns[n - 1].speaker}): "
                                                  f"{speech.duration:.2f} s", "turn")
    if not args.quiet:
        print(f"wrote {output}: {len(turns)} turns, {sum(durations):.2f} s of speech in "
              f"{time.perf_counter() - start:.2f} s", file=sys.stderr)
