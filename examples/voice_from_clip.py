"""Speak new text in the voice of a recorded clip: the clip and its transcript become context.

    python examples/voice_from_clip.py clip.wav "What the clip says." "New text to speak."
"""

import argparse

from csm_mlx import CSM, Segment
from csm_mlx.audio import read_audio, write_audio

parser = argparse.ArgumentParser()
parser.add_argument("clip", help="any common audio file; it is down-mixed and resampled to 24 kHz")
parser.add_argument("transcript", help="what is said in the clip")
parser.add_argument("text", help="what to say in that voice")
parser.add_argument("--model", default="sesame/csm-1b")
parser.add_argument("-o", "--output", default="voice_from_clip.wav")
args = parser.parse_args()

csm = CSM.load(args.model)
voice = Segment(speaker=0, text=args.transcript, audio=read_audio(args.clip))
speech = csm.generate(args.text, speaker=0, context=[voice], temperature=0.9, top_k=50)
write_audio(args.output, speech.audio, speech.sample_rate)
print(f"{args.output}: {speech.duration:.2f} s")
