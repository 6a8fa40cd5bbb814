"""Cost of fine-tuning csm-1b: step time and peak memory of the training loop at several batch
sizes, on random weights of the true sizes (nothing is downloaded).

Each batch size runs the library's loop (csm_mlx.finetune.trainer.train, the same the CLI runs)
for --steps steps on sequences of one clip each (--text-tokens text rows, --seconds of audio), with
the default recipe unless told otherwise: LoRA rank 32, scale 1 on all 16 backbone layers and the
depth decoder, the depth decoder on 1/16 of the frames, Adam. The first step is a warm-up.

    .venv/bin/python benchmarks/finetune_bench.py --batch 1 --batch 2 --batch 4
    .venv/bin/python benchmarks/finetune_bench.py --batch 1 --dtype bfloat16 --steps 2
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import csm_mlx  # noqa: F401  (loads the fast BLAS before mlx.core)
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from csm_mlx.checkpoint import DTYPES
from csm_mlx.finetune.adapters import LORA_PARAMETERS, prepare_model
from csm_mlx.finetune.batches import DEPTH_DECODER_RATIO
from csm_mlx.finetune.data import Example, TrainingSegment
from csm_mlx.finetune.trainer import TrainingArgs, train
from csm_mlx.options import FRAME_MS
from csm_mlx.models import Model, ModelArgs


def nbytes(params) -> int:
    return sum(v.nbytes for _, v in tree_flatten(params))


def matmul_gflops(dtype) -> float:
    """What this machine delivers right now on a backbone-sized product (a shared machine's load
    moves step times; this puts them in scale)."""
    x, w = mx.random.normal((512, 2048)).astype(dtype), mx.random.normal((8192, 2048)).astype(dtype)
    mx.eval(x, w)
    times = []
    for _ in range(3):
        tic = time.perf_counter()
        mx.eval(x @ w.T)
        times.append(time.perf_counter() - tic)
    return 2 * 512 * 2048 * 8192 / statistics.median(times) / 1e9


def clips(args: ModelArgs, n: int, text_tokens: int, seconds: float):
    rng = np.random.default_rng(0)
    frames = int(seconds * 1000 / FRAME_MS)
    return [Example([TrainingSegment(rng.integers(0, args.text_vocab_size, text_tokens).tolist(),
                                     rng.integers(0, 2048, (args.audio_num_codebooks, frames)).astype(np.int32))],
                    f"clip {i}") for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable; default 1, 2, 4)")
    p.add_argument("--steps", type=int, default=4, help="steps per batch size, the first a warm-up (default 4)")
    p.add_argument("--seconds", type=float, default=10.0, help="audio per sequence (default 10 s)")
    p.add_argument("--text-tokens", type=int, default=40, help="text rows per sequence (default 40)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--fine-tune-type", choices=["lora", "full"], default="lora")
    p.add_argument("--depth-decoder-ratio", type=float, default=DEPTH_DECODER_RATIO)
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    o = p.parse_args()

    args = ModelArgs.from_flavors("llama-1B", "llama-100M")
    model = Model(args)
    model.set_dtype(DTYPES[o.dtype])
    mx.eval(model.parameters())
    weights = nbytes(model.parameters())
    mx.random.seed(0)
    prepare_model(model, o.fine_tune_type, -1, LORA_PARAMETERS)
    trainable = nbytes(model.trainable_parameters())
    print(f"csm-1b {o.dtype}, {o.fine_tune_type}: weights {weights / 1e9:.2f} GB, trainable {trainable / 1e6:.1f} MB; "
          f"{o.text_tokens} text rows + {o.seconds:g} s audio per sequence; MLX {mx.__version__}, "
          f"{platform.machine()}", file=sys.stderr)

    rows = []
    for batch in o.batch or [1, 2, 4]:
        reports = []
        gflops = matmul_gflops(DTYPES[o.dtype])
        mx.reset_peak_memory()
        with tempfile.TemporaryDirectory() as tmp:
            training = TrainingArgs(batch_size=batch, iters=o.steps, steps_per_report=1, steps_per_save=10**9,
                                    adapter_file=str(Path(tmp) / "adapters.safetensors"),
                                    grad_checkpoint=o.grad_checkpoint)
            tic = time.perf_counter()
            train(model, optim.Adam(learning_rate=2e-4), clips(args, batch, o.text_tokens, o.seconds), None, training,
                  o.depth_decoder_ratio, seed=0, on_report=reports.append)
            wall = time.perf_counter() - tic
        seq_rows = o.text_tokens + int(o.seconds * 1000 / FRAME_MS) + 1
        step_s = [batch * seq_rows / r.tokens_per_second for r in reports[1:]] or [wall]
        row = {
            "batch": batch, "dtype": o.dtype, "fine_tune_type": o.fine_tune_type, "rows_per_sequence": seq_rows,
            "grad_checkpoint": o.grad_checkpoint, "depth_decoder_ratio": o.depth_decoder_ratio,
            "s_per_step": statistics.median(step_s), "tokens_per_s": batch * seq_rows / statistics.median(step_s),
            "peak_gb": mx.get_peak_memory() / 1e9, "weights_gb": weights / 1e9, "trainable_mb": trainable / 1e6,
            "losses": [round(r.loss, 3) for r in reports], "matmul_gflops": gflops,
        }
        row["beyond_weights_gb"] = row["peak_gb"] - row["weights_gb"]
        rows.append(row)
        print(f"batch {batch}: {row['s_per_step']:.2f} s/step, {row['tokens_per_s']:.0f} tokens/s, peak "
              f"{row['peak_gb']:.2f} GB ({row['beyond_weights_gb']:.2f} GB beyond the weights); matmul "
              f"{gflops:.0f} GFLOP/s", file=sys.stderr)

    print("| batch | dtype | rows/seq | s/step | tokens/s | peak GB | beyond weights GB | matmul GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['dtype']}{' +ckpt' if r['grad_checkpoint'] else ''} | {r['rows_per_sequence']} | "
              f"{r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_gb']:.2f} | {r['beyond_weights_gb']:.2f} | "
              f"{r['matmul_gflops']:.0f} |")
    if o.json:
        Path(o.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
