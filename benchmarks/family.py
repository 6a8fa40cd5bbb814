"""Each CSM-architecture model at each quality level (--codebooks): seconds per frame and real-time
factor on random weights of the true sizes, and the weight bytes one frame reads, with what those
bytes cost in 8-bit and bfloat16 at the memory bandwidth of M4-series Macs: a floor on the real-time
factor (frame time / 80 ms), as a frame of batch 1 is bound by reading its weights there.

    python benchmarks/family.py                                  # csm-1b and marvis-250m, float32
    python benchmarks/family.py --size marvis-250m --precision 8-bit --codebooks 32 8

MisoTTS (8B) is on paper only by default: its float32 weights (33 GB) do not fit a 24 GB machine.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import csm_mlx  # noqa: F401  (loads the fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np

from csm_mlx.frame_batch import FrameBatch
from csm_mlx.models import Model, ModelArgs
from csm_mlx.options import FRAME_MS
from csm_mlx.sampling import Sampling
from csm_mlx.utterance import Chunk, Utterance, random_key

sys.path.insert(0, str(Path(__file__).parent))
from bench import PRECISIONS, print_table, with_precision  # noqa: E402

MODELS = {
    "csm-1b": ModelArgs.from_flavors("llama-1B", "llama-100M"),
    "marvis-250m": ModelArgs.from_flavors("llama-250M", "llama-60M", text_vocab_size=49_152),
    "misotts-8b": ModelArgs.from_flavors("llama-8B", "llama-300M"),
}
# Bytes per weight as MLX stores it: 8- and 4-bit carry a 16-bit scale and bias per group of 64.
BYTES_PER_WEIGHT = {"float32": 4, "bfloat16": 2, "float16": 2, "8-bit": 1 + 4 / 64, "4-bit": 0.5 + 4 / 64}
# On paper: (precision, Mac, its unified memory bandwidth from Apple's specifications).
ON_PAPER = [("8-bit", "M4", 120e9), ("8-bit", "M4 Pro", 273e9), ("8-bit", "M4 Max", 546e9), ("bfloat16", "M4 Max", 546e9)]


def stack_weights(t) -> int:
    attention = t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
    return t.num_layers * (attention + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size) + t.hidden_size


def frame_weights(args: ModelArgs, codebooks: int) -> int:
    """Weights one frame reads: the backbone and codebook-0 head once; the projection and the depth
    decoder once per further codebook (plus the pass over the backbone state); each used head once."""
    d, dd, v = args.backbone.hidden_size, args.decoder.hidden_size, args.audio_vocab_size
    return (stack_weights(args.backbone) + d * v + codebooks * (stack_weights(args.decoder) + d * dd)
            + (codebooks - 1) * dd * v)


def seconds_per_frame(model: Model, codebooks: int, frames: int, warmup: int = 3) -> float:
    """Median time between frames of one greedy row after a 200-row text prompt."""
    tokens = np.random.default_rng(0).integers(0, model.args.text_vocab_size, 200).tolist()
    batch = FrameBatch(model)
    batch.insert(Utterance([], [Chunk(tokens, frames + warmup + 1)], Sampling(temperature=0), random_key(0),
                           codebooks=codebooks))
    stamps = [time.perf_counter() for _, frame in batch.drain() if frame is not None]
    return statistics.median(np.diff(stamps)[warmup:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(MODELS), action="append", help="repeatable (default: csm-1b, marvis-250m)")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32")
    parser.add_argument("--codebooks", type=int, nargs="+", default=[32, 16, 8])
    parser.add_argument("--frames", type=int, default=10, help="frames timed after warm-up (default: 10)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    import csm_mlx.blas

    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cores, MLX {mx.__version__} "
          f"on {mx.default_device()}, BLAS: {csm_mlx.blas.FAST_BLAS or 'bundled reference'}; {args.precision}")
    rows = []
    for size in args.size or ["csm-1b", "marvis-250m"]:
        model_args = MODELS[size]
        measured = size != "misotts-8b"
        if measured:
            model = with_precision(Model(model_args), args.precision)
        for codebooks in args.codebooks:
            weights = frame_weights(model_args, codebooks)
            row = {"model": size, "codebooks": codebooks, "weights_read_M": weights / 1e6,
                   f"GB_per_frame {args.precision}": weights * BYTES_PER_WEIGHT[args.precision] / 1e9}
            if measured:
                per_frame = seconds_per_frame(model, codebooks, args.frames)
                row.update(s_per_frame=per_frame, rtf=per_frame / (FRAME_MS / 1000))
            for precision, mac, bandwidth in ON_PAPER:
                seconds = weights * BYTES_PER_WEIGHT[precision] / bandwidth
                row[f"rtf_floor {precision} {mac}"] = seconds / (FRAME_MS / 1000)
            rows.append(row)
            print(row, flush=True)
        if measured:
            del model
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
