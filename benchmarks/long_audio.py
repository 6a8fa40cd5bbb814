"""Long outputs and long context clips through the real CLI: time and peak memory.

    python benchmarks/long_audio.py                 # 1- and 10-minute outputs, 150 s and 10-minute context clips
    python benchmarks/long_audio.py --minutes 1     # a quicker look

The model is the tiny random one (generation is cheap, so Mimi's decoding and the file writing
dominate, which is what this measures); its tokenizer and random Mimi weights are bundled beside
it. Random weights never say they are done, so every chunk runs to --max-audio-length-ms and the
output length is exact. Peak memory is the CLI process's maximum resident set (wait4's rusage).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import csm_mlx  # noqa: F401  (loads the fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np
import soundfile as sf

from csm_mlx.checkpoint import save_model
from csm_mlx.models import Model, ModelArgs, TransformerArgs

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from speech_fixtures import make_mimi, make_tokenizer  # noqa: E402  (random weights in the real layouts)

CLI = str(Path(sys.executable).parent / "csm-mlx")
CHUNK_SECONDS = 20
SENTENCE = "This sentence is one of many in a long chapter that is read aloud from start to end. "


def tiny_model_dir(root: Path) -> Path:
    model = Model(ModelArgs(TransformerArgs(2, 128, 4, 2, 256), TransformerArgs(2, 64, 4, 2, 128),
                            text_vocab_size=384))
    mx.eval(model.parameters())
    extra = {"tokenizer.json": make_tokenizer(root / "src" / "tokenizer.json"),
             "tokenizer-e351c8d8-checkpoint125.safetensors": make_mimi(root / "src" / "mimi.safetensors")}
    save_model(model, root / "tiny", "float32", None, extra)
    return root / "tiny"


def run(argv) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen([CLI, *map(str, argv)], stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    return {"exit": os.waitstatus_to_exitcode(status), "wall_s": time.perf_counter() - start,
            "peak_gb": usage.ru_maxrss / 1e6, "stderr": err.strip().splitlines()[-1] if err.strip() else ""}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10], help="output lengths to generate")
    parser.add_argument("--context-seconds", type=float, nargs="+", default=[150, 600], help="context clip lengths")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="csm-long-"))
    model = tiny_model_dir(root)
    rows = []
    for minutes in args.minutes:
        chunks = int(minutes * 60 / CHUNK_SECONDS)
        text = " ".join([SENTENCE * 2] * chunks)  # ~170 characters: one chunk per pair of sentences
        out = root / f"out_{minutes:g}min.wav"
        result = run([text, "-o", out, "--model", model, "--chunk-chars", "200", "--max-audio-length-ms",
                      CHUNK_SECONDS * 1000, "--seed", "0", "-q"])
        seconds = sf.info(out).duration if out.exists() else 0.0
        rows.append((f"{minutes:g}-minute output", result, f"{seconds:.0f} s of audio, {seconds / 0.08:.0f} frames"))
        out.unlink(missing_ok=True)
    for seconds in args.context_seconds:
        clip = root / f"context_{seconds:g}s.wav"
        t = np.arange(int(seconds * 24_000)) / 24_000
        sf.write(clip, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24_000, subtype="PCM_16")
        result = run(["Hello.", "-o", root / "reply.wav", "--model", model, "--context-audio", clip,
                      "--context-text", "a long recording", "--max-audio-length-ms", 800, "-q"])
        rows.append((f"{seconds:g} s context clip", result, result["stderr"][:90] or "accepted"))
    print(f"{'run':<22} {'exit':>4} {'wall s':>8} {'peak GB':>8}  result")
    for name, r, note in rows:
        print(f"{name:<22} {r['exit']:>4} {r['wall_s']:>8.1f} {r['peak_gb']:>8.2f}  {note}")


if __name__ == "__main__":
    main()
