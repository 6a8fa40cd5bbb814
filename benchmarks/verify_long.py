"""`csm-mlx verify` on long files: peak memory (ru_maxrss) and time, each length in a fresh process.

    python benchmarks/verify_long.py                      # a 10-minute file
    python benchmarks/verify_long.py --minutes 0.5 1 2    # memory flat with length

Each file is voiced-like noise at 24 kHz (FLAC), verified by the CLI's path (read in blocks,
resampled as a stream, scored in 19.5 s windows) with SilentCipher's layer sizes on random
weights (nothing is downloaded). --search none is one decoder pass over the file (the default
fast search adds at most 24 passes over the first window). Prints a markdown table.
"""

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import resource, sys, time
from csm_mlx.cli.main import main
start = time.perf_counter()
code = main(["verify", sys.argv[1], "--weights", sys.argv[2], "--search", sys.argv[3]])
wall = time.perf_counter() - start
print(f"{code} {wall:.1f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
"""


def write_clip(path: Path, seconds: float) -> None:
    import numpy as np
    import soundfile as sf

    rate, rng = 24_000, np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", rate, 1, "PCM_16", format="FLAC") as f:
        for start in range(0, int(seconds * rate), 60 * rate):  # a minute at a time
            n = min(60 * rate, int(seconds * rate) - start)
            t = (start + np.arange(n)) / rate
            f.write((0.2 * np.sin(2 * np.pi * 140 * t) * (1 + np.sin(2 * np.pi * 3 * t))
                     + 0.02 * rng.standard_normal(n)).astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0])
    parser.add_argument("--search", default="none", choices=["none", "fast", "exhaustive"])
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from watermark_fixtures import write_silentcipher

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "silentcipher").mkdir()
        weights = write_silentcipher(Path(tmp) / "silentcipher")
        print(f"| file | `--search` | exit | time (s) | s per s of audio | peak memory (ru_maxrss, MB) |")
        print("|---|---|---|---|---|---|")
        for minutes in args.minutes:
            path = Path(tmp) / f"{minutes:g}min.flac"
            write_clip(path, minutes * 60)
            run = subprocess.run([sys.executable, "-c", CHILD, str(path), str(weights), args.search],
                                 capture_output=True, text=True)
            code, wall, rss_kb = run.stderr.strip().splitlines()[-1].split()
            print(f"| {minutes:g} min | {args.search} | {code} | {float(wall):.0f} | {float(wall) / (minutes * 60):.2f} "
                  f"| {int(rss_kb) / 1024:.0f} |", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
