"""The engine alone (no HTTP, no Mimi) on random weights: 1 and 4 concurrent seeded requests.

    python benchmarks/engine_alone.py csm-1b 1.6    # size, seconds of audio per request
"""
import sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent)); sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import serve_bench as sb
import soundfile as sf
from csm_mlx import Segment
workdir = Path(tempfile.mkdtemp())
csm = sb.build_csm(sys.argv[1], workdir)
clip, _ = sf.read(sb.write_voice(workdir / "v.wav", seconds=2.0), dtype="float32")
rows = sb.engine_alone(csm, Segment(0, sb.VOICE_TEXT, clip, pinned=True), [1, 4], float(sys.argv[2]))
print(rows, "x4/x1:", rows[1]["audio_s_per_s"] / rows[0]["audio_s_per_s"])
