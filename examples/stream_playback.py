"""Hear speech while it is generated: stream 80 ms chunks into the real-time player.

    python examples/stream_playback.py "Text to speak as soon as possible."
"""

import sys

from csm_mlx import CSM
from csm_mlx.text import expected_seconds
from csm_mlx.player import Player

text = sys.argv[1] if len(sys.argv) > 1 else "Streaming speech starts playing before it is finished."
csm = CSM.load()
# The player starts once its buffer covers the expected shortfall, so a slow machine waits just
# long enough to play without gaps, and a fast one starts at once.
with Player(expected_seconds=expected_seconds(text)) as player:
    for chunk in csm.stream(text, speaker=0, chunk_frames=1):
        player.feed(chunk)
print(f"playback started {player.start_delay:.2f} s after the first chunk, {player.underruns} underruns")
