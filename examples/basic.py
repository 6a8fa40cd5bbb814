"""Load CSM once, speak a few lines, write each to a WAV file.

    python examples/basic.py [--model sesame/csm-1b]
"""

import argparse

from csm_mlx import CSM
from csm_mlx.audio import write_audio

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="sesame/csm-1b", help="hub id or model directory")
args = parser.parse_args()

csm = CSM.load(args.model)
lines = ["Hello from MLX.", "This is the second line, spoken by the same speaker."]
for n, line in enumerate(lines):
    speech = csm.generate(line, speaker=0, max_audio_length_ms=10_000, seed=n)
    write_audio(f"basic_{n}.wav", speech.audio, speech.sample_rate)
    print(f"basic_{n}.wav: {speech.duration:.2f} s")
