"""Time to the first frame in a fresh process, as every CLI run meets it: one greedy row after a
text prompt through FrameBatch (prefill, tracing the compiled frame, the frame itself), then the
second frame. --uncompiled runs the same frames without mx.compile, for comparison.

    python benchmarks/first_frame.py --size tiny --runs 5
    python benchmarks/first_frame.py --size csm-1b --runs 2 --uncompiled
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import csm_mlx  # noqa: F401  (loads the fast BLAS before mlx.core)
import mlx.core as mx

import csm_mlx.frame_batch as frame_batch
from csm_mlx.models import Model

sys.path.insert(0, str(Path(__file__).parent))
from bench import SIZES, greedy_rows  # noqa: E402

PROMPT_ROWS = 50


def child(size: str, compiled: bool) -> None:
    model = Model(SIZES[size]())
    mx.eval(model.parameters())
    if not compiled:
        frame_batch.frame_step = lambda model, filters, rows: partial(frame_batch._frame, model, filters)
    rows = greedy_rows(model, PROMPT_ROWS, 3)
    start = time.perf_counter()
    stamps = [time.perf_counter() - start for _, frame in rows.drain() if frame is not None]
    print(json.dumps({"first": stamps[0], "second": stamps[1] - stamps[0]}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--uncompiled", action="store_true", help="also time the frames without mx.compile")
    parser.add_argument("--child", choices=["compiled", "uncompiled"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.size, args.child == "compiled")
    print(f"# MLX {mx.__version__} on {mx.default_device()}, {PROMPT_ROWS}-row prompt, median of {args.runs} fresh processes")
    print("| size | frames | first frame (s) | second frame (s) |")
    print("|---|---|---|---|")
    for mode in ["compiled"] + (["uncompiled"] if args.uncompiled else []):
        runs = [json.loads(subprocess.run([sys.executable, __file__, "--size", args.size, "--child", mode],
                                          check=True, capture_output=True, text=True).stdout) for _ in range(args.runs)]
        print(f"| {args.size} | {mode} | {statistics.median(r['first'] for r in runs):.3f} | "
              f"{statistics.median(r['second'] for r in runs):.3f} |")


if __name__ == "__main__":
    main()
