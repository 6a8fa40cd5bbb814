"""The engine alone (no HTTP, no Mimi) on random weights: 1 and 4 concurrent seeded requests.

    python benchmarks/engine_alone.py csm-1b 1.6    # size, seconds of audio per request
"""

import sys
import tempfile
from pathlib import Path

import soundfile as sf

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import serve_bench  # noqa: E402  (loads csm_mlx, hence MKL, before mlx.core)

from csm_mlx import Segment  # noqa: E402


def main():
    size, seconds = sys.argv[1], float(sys.argv[2])
    workdir = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    csm = serve_bench.build_csm(size, workdir)
    clip, _ = sf.read(serve_bench.write_voice(workdir / "voice.wav", seconds=2.0), dtype="float32")
    voice = Segment(0, serve_bench.VOICE_TEXT, clip, pinned=True)
    one, four = serve_bench.engine_alone(csm, voice, [1, 4], seconds)
    print(f"1 request {one['audio_s_per_s']:.3f} audio s/s, 4 requests {four['audio_s_per_s']:.3f} "
          f"({four['audio_s_per_s'] / one['audio_s_per_s']:.2f}x)")


if __name__ == "__main__":
    main()
