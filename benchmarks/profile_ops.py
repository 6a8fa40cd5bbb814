"""Per-op evidence for the two targets this CPU does not reach (see README.md).

    python benchmarks/profile_ops.py matmul   # batch: cost of each csm-1b layer's product at 1..16 rows
    python benchmarks/profile_ops.py tiny     # loop: graph nodes per depth-decoder step and where a frame's time goes

matmul times ``x @ W.T`` (what every Linear runs) for the model's own layer shapes, float32, median
of 15, and its cost relative to one row: batched generation can only be as much faster than batch
1 as these ratios allow. tiny counts the primitives of one depth-decoder step (from MLX's own graph
export) and splits a compiled frame's CPU time between the thread that builds and dispatches the
graph and MLX's CPU stream thread that runs the kernels.
"""

import argparse
import os
import re
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import csm_mlx  # noqa: F401  (loads the optimized BLAS before MLX runs anything)
import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))
from bench import SIZES  # noqa: E402

from csm_mlx.frame_batch import frame_step  # noqa: E402
from csm_mlx.sampling import Filters, Sampling, row_params  # noqa: E402
from csm_mlx.utterance import random_key  # noqa: E402
from csm_mlx.models import Model  # noqa: E402

LAYERS = {
    "backbone q/o 2048->2048": (2048, 2048),
    "backbone MLP up 2048->8192": (2048, 8192),
    "backbone MLP down 8192->2048": (8192, 2048),
    "depth decoder q/o 1024->1024": (1024, 1024),
    "depth decoder MLP up 1024->8192": (1024, 8192),
    "depth decoder MLP down 8192->1024": (8192, 1024),
    "codebook head 1024->2051": (1024, 2051),
}
ROWS = (1, 2, 8, 16)


def median_ms(fn, repeat=15):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def matmul_table():
    print("| layer | " + " | ".join(f"{b} row{'s' if b > 1 else ''} (ms)" for b in ROWS)
          + " | " + " | ".join(f"{b} / 1" for b in ROWS[1:]) + " | GB/s at 1 row | GFLOP/s at 8 rows |")
    print("|---" * (2 * len(ROWS) + 2) + "|")
    for name, (n_in, n_out) in LAYERS.items():
        w = mx.random.normal((n_out, n_in))
        mx.eval(w)
        ms = {}
        for b in ROWS:
            x = mx.random.normal((b, n_in))
            mx.eval(x)
            ms[b] = median_ms(lambda: mx.eval(x @ w.T))
        print(f"| {name} | " + " | ".join(f"{ms[b]:.3f}" for b in ROWS) + " | "
              + " | ".join(f"{ms[b] / ms[1]:.2f}" for b in ROWS[1:])
              + f" | {w.nbytes / ms[1] / 1e6:.1f} | {2 * 8 * n_in * n_out / ms[8] / 1e6:.1f} |")


def thread_cpu_seconds():
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def tiny_profile(frames=300):
    args = SIZES["tiny"]()
    model = Model(args)
    mx.eval(model.parameters())
    sampler = lambda logits: mx.argmax(logits[..., :2048], axis=-1)  # noqa: E731

    cache = model.decoder.make_cache()
    model.decoder(model.projection(mx.zeros((1, 2, args.backbone.hidden_size))), cache)
    mx.eval([c.state for c in cache])
    hidden = model.decoder(model.projection(model.embed_audio(2, mx.array([5]))[:, None]), cache)[:, -1]
    code = sampler(model.codebook_logits(2, hidden))
    dot = Path("/tmp") / f"csm-step-{os.getpid()}.dot"
    mx.export_to_dot(str(dot), code)
    nodes = Counter(re.findall(r'label ?= ?"([A-Za-z]+)', dot.read_text()))
    dot.unlink()
    print(f"one depth-decoder step (2 layers, codebook head, sampling): {sum(nodes.values())} graph nodes")
    print("  " + ", ".join(f"{k} {v}" for k, v in nodes.most_common()))

    greedy = [Sampling(temperature=0)]
    frame_step(model, Filters.of(greedy), 1)  # the first call of a batch size runs uncompiled
    step, params, keys = frame_step(model, Filters.of(greedy), 1), row_params(greedy), random_key(0)[None]
    h = mx.random.normal((1, args.backbone.hidden_size))
    decode = lambda h: step(h, params, keys)[0]  # noqa: E731
    for _ in range(10):
        mx.eval(decode(h))
    before = thread_cpu_seconds()
    start = time.perf_counter()
    for _ in range(frames):
        mx.eval(decode(h))
    wall = (time.perf_counter() - start) / frames
    after = thread_cpu_seconds()
    main = threading.get_native_id()
    busy = sorted(((after[t] - before.get(t, 0)) / frames, t) for t in after)
    per_frame_nodes = (args.audio_num_codebooks - 1) * sum(nodes.values())
    print(f"compiled frame (31 steps): {wall * 1e3:.2f} ms wall, ~{per_frame_nodes} nodes before compile "
          f"({wall * 1e6 / per_frame_nodes:.2f} us per node)")
    for cpu, tid in reversed(busy):
        if cpu > 0:
            role = "the calling thread: replays the compiled graph, allocates, dispatches" if tid == main else (
                "MLX's CPU stream (runs the kernels) or a BLAS worker")
            print(f"  thread {tid}: {cpu * 1e3:.2f} ms CPU per frame ({role})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["matmul", "tiny"])
    what = parser.parse_args().what
    print(f"# MLX {mx.__version__} on {mx.default_device()}, BLAS: {csm_mlx.blas.FAST_BLAS or 'bundled reference'}")
    matmul_table() if what == "matmul" else tiny_profile()


if __name__ == "__main__":
    main()
