"""Speak a list of lines in one voice, several at a time (each step reads the weights once for the
whole batch), writing each line's WAV as soon as it is done.

    python examples/batch_lines.py [--model sesame/csm-1b] [--batch-size 8]
"""

import argparse

from csm_mlx import CSM
from csm_mlx.audio import write_audio

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="sesame/csm-1b", help="hub id or model directory")
parser.add_argument("--batch-size", type=int, default=8)
args = parser.parse_args()

csm = CSM.load(args.model)
voice = csm.voice("conversational_a", speaker=0)
lines = [
    "Welcome back to the show.",
    "Today we are talking about speech models that run on a laptop.",
    "Our first guest built one over the weekend.",
    "Let's find out how.",
]
speeches = csm.generate_many(lines, speaker=0, context=[voice], batch_size=args.batch_size, temperature=0.8, seed=1)
for n, speech in enumerate(speeches, 1):
    write_audio(f"line_{n:03d}.wav", speech.audio, speech.sample_rate)
    print(f"line_{n:03d}.wav: {speech.duration:.2f} s")
