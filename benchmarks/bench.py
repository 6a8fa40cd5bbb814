"""Speed of the frame loop on random weights of the true sizes (no download).

    python benchmarks/bench.py --size csm-1b --dtype float32 --frames 8

Prints one table row: time to the first frame (prefill + one frame), time to first audio (that
plus Mimi's streaming decode of it; needs the Mimi weights, --mimi), seconds per frame (median
after the first), real-time factor (frame time / 80 ms) and peak MLX memory.
"""

import argparse
import json
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from csm_mlx.checkpoint import DTYPES, quantize
from csm_mlx.codec import Mimi
from csm_mlx.generation import FRAME_MS, generate_frames, make_frame_sampler
from csm_mlx.models import Model, ModelArgs, TransformerArgs

SIZES = {
    "csm-1b": lambda: ModelArgs.from_flavors("llama-1B", "llama-100M"),
    "tiny": lambda: ModelArgs(
        TransformerArgs(2, 128, 4, 2, 256), TransformerArgs(2, 64, 4, 2, 128), text_vocab_size=384
    ),
}


def build(size: str, dtype: str, bits: int = 0) -> Model:
    model = Model(SIZES[size]())
    model.set_dtype(DTYPES[dtype])
    if bits:
        quantize(model, bits, 64)
    mx.eval(model.parameters())
    return model


def run(size: str, dtype: str, bits: int, frames: int, prompt_rows: int, mimi: str = None) -> dict:
    model = build(size, dtype, bits)
    weight_bytes = sum(v.nbytes for _, v in nn.utils.tree_flatten(model.parameters()))
    rng = np.random.default_rng(0)
    tokens = np.zeros((prompt_rows, 33), np.int32)
    tokens[:, -1] = rng.integers(0, model.args.text_vocab_size, prompt_rows)
    mask = np.zeros_like(tokens, bool)
    mask[:, -1] = True
    # Never stops early: the sampler below cannot produce the all-zero frame.
    greedy = make_frame_sampler(temperature=0)

    def sampler(logits):
        return mx.maximum(greedy(logits), 1)

    mx.reset_peak_memory()
    start = time.perf_counter()
    stamps, frames_out = [], []
    for frame in generate_frames(model, tokens, mask, sampler, frames + 1):
        stamps.append(time.perf_counter())
        frames_out.append(frame)
    first = stamps[0] - start
    per_frame = statistics.median(np.diff(stamps))
    first_audio = float("nan")
    if mimi:
        codec = Mimi(mimi)  # loaded before the clock starts, as an app loads it once
        decode_start = time.perf_counter()
        codec.decode_step(frames_out[0][:, None])
        first_audio = first + time.perf_counter() - decode_start
    return {
        "size": size,
        "precision": f"{bits}-bit" if bits else dtype,
        "weights_GB": weight_bytes / 1e9,
        "prompt_rows": prompt_rows,
        "first_frame_s": first,
        "first_audio_s": first_audio,
        "s_per_frame": per_frame,
        "rtf": per_frame / (FRAME_MS / 1000),
        "peak_GB": mx.get_peak_memory() / 1e9,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--bits", type=int, choices=[0, 4, 8], default=0, help="quantize (0: no)")
    parser.add_argument("--frames", type=int, default=20, help="frames timed after the first")
    parser.add_argument("--prompt-rows", type=int, default=200)
    parser.add_argument("--mimi", help="Mimi weights, to measure time to first audio")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    result = run(args.size, args.dtype, args.bits, args.frames, args.prompt_rows, args.mimi)
    print(" | ".join(result))
    print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in result.values()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
