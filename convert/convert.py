"""`csm-mlx-convert`: a CSM checkpoint (csm-1b, Marvis, MisoTTS; original or transformers format)
-> an MLX model directory."""

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from csm_mlx.checkpoint import (DTYPES, CheckpointError, check_finite, check_quantization, load_model, quantize,
                                read_config, save_model, text_config, text_settings)
from csm_mlx.hub import MIMI_FILE, TOKENIZER_FILE, WATERMARK_DIR, find_mimi, find_tokenizer, find_watermark
from csm_mlx.cli.main import guarded
from csm_mlx.finetune import adapters
from csm_mlx.finetune.adapters import AdapterError, fuse, load_adapters
from csm_mlx.hub import HubError, resolve_model
from csm_mlx.watermark import CHECKPOINTS, WatermarkError, weights_dir


def convert(
    hf_path: str,
    mlx_path: str,
    dtype: str = "bfloat16",
    quantize_weights: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    bundle: bool = False,
    adapter_path: Optional[str] = None,
) -> Path:
    """Convert hf_path (a directory or hub repo id) into a new MLX directory mlx_path.

    bundle also copies the tokenizer, the Mimi weights, the voice prompts and the watermark's
    weights into it, so that the directory alone serves an offline app. adapter_path (a
    `csm-mlx finetune` output) is fused into the weights first."""
    mlx_path = Path(mlx_path)
    if mlx_path.exists() and (not mlx_path.is_dir() or any(mlx_path.iterdir())):
        raise CheckpointError(f"{mlx_path} already exists: choose a new --mlx-path or remove it first")
    if quantize_weights:
        check_quantization(q_bits, q_group_size)
    parent = mlx_path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"cannot create {mlx_path}: {parent} is not writable")
    if adapter_path is not None:
        adapters.read_config(adapter_path)
    source = resolve_model(hf_path)
    _, _, source_config = read_config(source)
    extra_files = {}
    if bundle:
        extra_files[TOKENIZER_FILE] = find_tokenizer(source, repo=text_settings(source_config)[1])
        extra_files[MIMI_FILE] = find_mimi(source)
        extra_files.update({f"prompts/{p.name}": p for p in sorted(source.glob("prompts/*"))
                            if p.suffix in (".wav", ".txt")})
        watermark = weights_dir(find_watermark(source))
        extra_files.update({f"{WATERMARK_DIR}/{name}": watermark / name for name in (*CHECKPOINTS.values(), "hparams.yaml")
                            if (watermark / name).is_file()})
    if adapter_path is None:
        model, _ = load_model(source, dtype=dtype)
    else:
        # fused in float32, so that the sum is rounded to dtype once
        model, _ = load_model(source, dtype="float32")
        fuse(load_adapters(model, adapter_path))
        model.set_dtype(DTYPES[dtype])
        check_finite(model, f"{source} fused with {adapter_path}")
    quantization = None
    if quantize_weights:
        quantize(model, q_bits, q_group_size)
        quantization = {"group_size": q_group_size, "bits": q_bits}
    save_model(model, mlx_path, dtype, quantization, extra_files, text_config(source_config))
    return mlx_path


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="csm-mlx-convert",
        description="Convert a CSM checkpoint (csm-1b, Marvis, MisoTTS; Sesame or transformers format) to MLX.",
    )
    parser.add_argument("--hf-path", required=True, help="checkpoint directory or hub repo id (e.g. sesame/csm-1b)")
    parser.add_argument("--mlx-path", required=True, help="new directory for the MLX model")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="weight dtype (default: bfloat16)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize linear and embedding weights")
    parser.add_argument("--q-bits", type=int, default=4, help="bits per weight when quantizing: 4 or 8 (default: 4)")
    parser.add_argument("--q-group-size", type=int, default=64, help="quantization group size (default: 64)")
    parser.add_argument("--bundle", action="store_true",
                        help="also copy the tokenizer, Mimi and watermark weights and voice prompts: a self-contained "
                             "directory")
    parser.add_argument("--adapter-path", metavar="DIR",
                        help="fuse the adapter that `csm-mlx finetune` wrote to DIR into the converted model")
    args = parser.parse_args(argv)
    return guarded("csm-mlx-convert", lambda: _run(args))


def _run(args) -> int:
    try:
        out = convert(args.hf_path, args.mlx_path, args.dtype, args.quantize, args.q_bits, args.q_group_size,
                      args.bundle, args.adapter_path)
    except (CheckpointError, HubError, WatermarkError, AdapterError) as e:
        print(f"csm-mlx-convert: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"csm-mlx-convert: error: cannot write {args.mlx_path}: {(e.strerror or str(e)).lower()}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
