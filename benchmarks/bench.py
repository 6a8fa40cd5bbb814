"""Speed of csm-mlx on random weights of the true sizes (no download), beside transformers.

    python benchmarks/bench.py --size csm-1b --precision float32 --reference
    python benchmarks/bench.py --size tiny --precision float32 --reference --naive --json tiny.json

For each precision it prints one row: prefill of a 200- and a 1500-row prompt, seconds per frame
(median over --frames frames after warm-up), the backbone's and the depth decoder's share of a
frame, time to first audio (prefill + first frame + Mimi's streaming decode of it), real-time
factor (frame time / 80 ms), s/frame at frame 1000 of a long generation, peak
memory, and the floor: the weight bytes one frame must read over the measured matrix-vector
bandwidth. --reference adds transformers' CsmForConditionalGeneration (CPU torch) on the same
weights; --naive adds an eager loop that waits for every codebook, the baseline for the loop.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import csm_mlx  # noqa: F401  (loads the fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from csm_mlx.checkpoint import DTYPES, quantize
from csm_mlx.codec import Mimi
from csm_mlx.frame_batch import PREFILL_ROWS, FrameBatch, frame_step
from csm_mlx.models import Model, ModelArgs, TransformerArgs
from csm_mlx.options import FRAME_MS
from csm_mlx.prompt import text_rows
from csm_mlx.sampling import Filters, Sampling, row_params
from csm_mlx.utterance import Chunk, Utterance, random_key

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from speech_fixtures import make_mimi  # noqa: E402  (random Mimi weights in the real layout)

SIZES = {
    "csm-1b": lambda: ModelArgs.from_flavors("llama-1B", "llama-100M"),
    "tiny": lambda: ModelArgs(TransformerArgs(2, 128, 4, 2, 256), TransformerArgs(2, 64, 4, 2, 128), text_vocab_size=384),
}
PRECISIONS = ["float32", "bfloat16", "float16", "8-bit", "4-bit"]


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def text_tokens(model: Model, rows: int):
    return np.random.default_rng(0).integers(0, model.args.text_vocab_size, rows).tolist()


def text_prompt(model: Model, rows: int):
    return text_rows(text_tokens(model, rows), model.args.audio_num_codebooks)


def greedy_rows(model: Model, prompt_rows: int, frames: int, batch: int = 1):
    """A FrameBatch of batch greedy rows after a text prompt, each capped at frames frames (the
    random model never sends its end of speech, so every run has the same length)."""
    frame_batch = FrameBatch(model)
    for _ in range(batch):
        frame_batch.insert(Utterance([], [Chunk(text_tokens(model, prompt_rows), frames)], Sampling(temperature=0),
                                     random_key(0)))
    return frame_batch


def random_weights(args: ModelArgs, reference: bool):
    """(MLX model, transformers model or None) with the same random float32 weights."""
    if not reference:
        model = Model(args)
        mx.eval(model.parameters())
        return model, None
    import torch

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from csm_fixtures import transformers_config
    from transformers import CsmForConditionalGeneration

    torch.manual_seed(0)
    ref = CsmForConditionalGeneration(transformers_config(args)).eval()
    model = Model(args)
    state = {k: mx.array(v.numpy()) for k, v in ref.state_dict().items() if not k.startswith("codec_model.")}
    model.load_weights(list(model.sanitize(state).items()))
    mx.eval(model.parameters())
    return model, ref


def with_precision(model: Model, precision: str) -> Model:
    if precision.endswith("-bit"):
        quantize(model, int(precision.split("-")[0]), 64)
    else:
        model.set_dtype(DTYPES[precision])
    mx.eval(model.parameters())
    return model


def frame_bytes(model: Model) -> int:
    """Weight bytes one frame reads: the backbone and codebook-0 head once, the depth decoder
    and projection once per depth-decoder pass (31), each codebook head once."""
    size = lambda m: sum(v.nbytes for _, v in tree_flatten(m.parameters()))
    passes = model.args.audio_num_codebooks - 1
    return (size(model.backbone) + size(model.codebook0_head) + passes * (size(model.decoder) + size(model.projection))
            + sum(size(h) for h in model.audio_head))


def matvec_bandwidth(precision: str) -> float:
    """Bytes/s of a large matrix-vector product (8192 x 8192) in this precision."""
    layer = nn.Linear(8192, 8192, bias=False)
    layer = with_precision(layer, precision) if precision != "float32" else layer
    x = mx.random.normal((1, 8192)).astype(mx.float32 if precision.endswith("-bit") else DTYPES.get(precision, mx.float32))
    mx.eval(layer.parameters(), x)
    mx.eval(layer(x))
    seconds = median_time(lambda: mx.eval(layer(x)), 10)
    return sum(v.nbytes for _, v in tree_flatten(layer.parameters())) / seconds


def prefill_time(model: Model, rows: int) -> float:
    tokens, mask = text_prompt(model, rows)
    x = model.embed_rows(mx.array(tokens)[None], mx.array(mask)[None])
    mx.eval(x)

    def run():
        cache = model.backbone.make_cache()
        for start in range(0, rows, PREFILL_ROWS):  # in FrameBatch's passes
            mx.eval(model.backbone(x[:, start : start + PREFILL_ROWS], cache))

    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    return first if first > 10 else min(first, median_time(run, 2))


def frame_times(model: Model, prompt_rows: int, frames: int, warmup: int = 3):
    frame_batch = greedy_rows(model, prompt_rows, frames + warmup + 1)
    start = time.perf_counter()
    stamps, first_frame = [], None
    for _, frame in frame_batch.drain():
        if frame is not None:
            stamps.append(time.perf_counter())
            first_frame = first_frame if first_frame is not None else frame
    return stamps[0] - start, first_frame, statistics.median(np.diff(stamps)[warmup:])


def clock_shares(model: Model, repeat: int = 5):
    """Seconds of one backbone step and one depth-decoder frame, each run on its own."""
    cache = model.backbone.make_cache()
    tokens, mask = text_prompt(model, 200)
    mx.eval(model.backbone(model.embed_rows(mx.array(tokens)[None], mx.array(mask)[None]), cache))
    row = model.embed_frames(mx.ones((1, 1, model.args.audio_num_codebooks), mx.int32))
    h = mx.random.normal((1, model.args.backbone.hidden_size)).astype(row.dtype)
    greedy = [Sampling(temperature=0)]
    frame_step(model, Filters.of(greedy), 1)  # the first call of a batch size runs uncompiled
    decode = frame_step(model, Filters.of(greedy), 1)
    params, keys = row_params(greedy), random_key(0)[None]
    mx.eval(row, h, decode(h, params, keys))

    def step():
        mx.eval(model.backbone(row, cache))
        for c in cache:
            c.trim(1)

    return median_time(step, repeat), median_time(lambda: mx.eval(decode(h, params, keys)), repeat)


def batch_frames_per_s(model: Model, batch: int, frames: int, warmup: int = 3) -> float:
    """Frames per second summed over a batch of 200-row prompts generated together."""
    frame_batch = greedy_rows(model, 200, frames + warmup + 1, batch)
    stamps = []
    while frame_batch.busy:
        if any(frame is not None for _, frame in frame_batch.step()):
            stamps.append(time.perf_counter())
    return batch / statistics.median(np.diff(stamps)[warmup:])


def naive_frame_time(model: Model, frames: int) -> float:
    """The straightforward loop: eager, and waits for each codebook before the next."""
    sampler = lambda logits: mx.argmax(logits[..., :2048], axis=-1)  # noqa: E731
    tokens, mask = text_prompt(model, 200)
    cache = model.backbone.make_cache()
    h = model.backbone(model.embed_rows(mx.array(tokens)[None], mx.array(mask)[None]), cache)[:, -1]
    stamps = []
    for _ in range(frames + 3):
        codes = [sampler(model.codebook0_head(h))]
        mx.eval(codes[0])
        depth_cache = model.decoder.make_cache()
        x = mx.stack([h, model.embed_audio(0, codes[0])], axis=1)
        for k in range(1, 32):
            d = model.decoder(model.projection(x), depth_cache)[:, -1]
            codes.append(sampler(model.codebook_logits(k, d)))
            mx.eval(codes[-1])
            x = model.embed_audio(k, codes[-1])[:, None]
        frame = mx.stack(codes, axis=1)
        mx.eval(frame)
        h = model.backbone(model.embed_frames(frame[:, None]), cache)[:, -1]
        mx.eval(h)
        stamps.append(time.perf_counter())
    return statistics.median(np.diff(stamps)[1:])


def reference_times(ref, prompt_rows: int, frames: int):
    """transformers: prefill of 200 / 1500 rows and s/frame of greedy generate (CPU torch)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.tensor(np.random.default_rng(0).integers(0, ref.config.text_vocab_size, prompt_rows))[None]
    with torch.no_grad():
        prefill = {}
        for rows in (200, 1500):
            x = ref.embed_text_tokens(torch.tensor(np.random.default_rng(0).integers(0, ref.config.text_vocab_size, rows))[None])
            prefill[rows] = median_time(lambda: ref.backbone_model(inputs_embeds=x), 2)
        stamps = Stamps()
        ref.generate(input_ids=ids, max_new_tokens=frames + 3, do_sample=False, depth_decoder_do_sample=False,
                     streamer=stamps, min_new_tokens=frames + 3)
    return prefill, statistics.median(np.diff(stamps.times)[2:])


def run(size: str, precisions, frames: int, reference: bool, naive: bool, growth: bool, batch: int,
        long_prefill: bool = True):
    args = SIZES[size]()
    base, ref = random_weights(args, reference)
    float_state = dict(tree_flatten(base.parameters()))
    mimi = Mimi(make_mimi(Path(tempfile.mkdtemp()) / "mimi.safetensors"))
    rows = []
    if ref is not None:
        prefill, per_frame = reference_times(ref, 200, frames)
        rows.append({"impl": "transformers (torch CPU)", "size": size, "precision": "float32",
                     "prefill_200_s": prefill[200], "prefill_1500_s": prefill[1500], "s_per_frame": per_frame,
                     "rtf": per_frame / (FRAME_MS / 1000)})
        del ref
    for precision in precisions:
        model = Model(args)
        model.load_weights(list(float_state.items()))
        model = with_precision(model, precision)
        mx.reset_peak_memory()
        first_frame_s, first_frame, per_frame = frame_times(model, 200, frames)
        mimi.reset()
        start = time.perf_counter()
        mimi.decode_step(first_frame[:, None])
        first_audio_s = first_frame_s + time.perf_counter() - start
        backbone_s, depth_s = clock_shares(model)
        floor = frame_bytes(model) / matvec_bandwidth(precision)
        row = {
            "impl": "csm-mlx", "size": size, "precision": precision,
            "prefill_200_s": prefill_time(model, 200),
            "prefill_1500_s": prefill_time(model, 1500) if long_prefill else float("nan"),
            "s_per_frame": per_frame, "rtf": per_frame / (FRAME_MS / 1000),
            "backbone_share": backbone_s / (backbone_s + depth_s), "depth_share": depth_s / (backbone_s + depth_s),
            "first_audio_s": first_audio_s,
            "floor_s_per_frame": floor, "x_floor": per_frame / floor,
            "peak_GB": mx.get_peak_memory() / 1e9,
        }
        if growth:
            # A frame costs what the rows in the cache make it cost: frame 1000 after the 200-row
            # prompt is a frame after 1200 rows, without generating the 1000 frames first.
            row["s_per_frame_at_frame_1000"] = frame_times(model, 200 + 1000, frames)[2]
        if batch > 1:
            one, many = batch_frames_per_s(model, 1, frames), batch_frames_per_s(model, batch, frames)
            row[f"frames_per_s_batch_{batch}"] = many
            row[f"x_batch_{batch}_vs_1"] = many / one
        if naive:
            row["naive_s_per_frame"] = naive_frame_time(model, frames)
            row["x_faster_than_naive"] = row["naive_s_per_frame"] / per_frame
        if reference:
            row["x_transformers"] = per_frame / rows[0]["s_per_frame"]
        rows.append(row)
    return rows


def print_table(rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--precision", choices=PRECISIONS, action="append", help="repeatable (default: float32)")
    parser.add_argument("--frames", type=int, default=20, help="frames timed after warm-up (default: 20)")
    parser.add_argument("--reference", action="store_true", help="also time transformers on the same weights")
    parser.add_argument("--naive", action="store_true", help="also time the naive eager loop")
    parser.add_argument("--no-growth", action="store_true", help="skip s/frame at frame 1000 of a long generation")
    parser.add_argument("--no-long-prefill", action="store_true",
                        help="skip the 1500-row prefill (minutes in bfloat16 or quantized on a CPU)")
    parser.add_argument("--batch", type=int, default=8, help="batch size for the throughput column (1: skip)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    import csm_mlx.blas

    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cores, MLX {mx.__version__} "
          f"on {mx.default_device()}, BLAS: {csm_mlx.blas.FAST_BLAS or 'bundled reference'}")
    rows = run(args.size, args.precision or ["float32"], args.frames, args.reference, args.naive, not args.no_growth,
               args.batch, not args.no_long_prefill)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
