"""Small real artefacts for the text-to-speech path: a BPE tokenizer.json with the Llama-3
special tokens, random Mimi weights in the real layout, and a local Hugging Face hub cache."""

import hashlib
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from safetensors.numpy import save_file

DATA = Path(__file__).parent / "data"
CORPUS = [
    "Hello from MLX. How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Conversational speech needs context, and the voice should stay the same.",
    "Numbers like 3.14 and 2048, quotes \"like this\", and [0] speaker tags.",
]


LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"]
SMOLLM2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2's


def make_tokenizer(path: Path, vocab_size: int = 380, special_tokens=tuple(LLAMA3_SPECIAL)) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def _shape(text: str):
    return tuple(int(n) for n in text.strip("[]").split(", "))


def make_mimi(path: Path, seed: int = 0) -> Path:
    """Random Mimi weights with the real names and shapes (tests/data/mimi-keys.tsv).

    PyTorch-default init (uniform +-1/sqrt(fan_in)) makes the decoded audio barely depend on
    the codes; scaling the decoder convolutions by sqrt(3) and the quantizer output
    projections by 30 makes it depend on them, with |audio| < 1."""
    rng = np.random.default_rng(seed)
    spec = {k: _shape(s) for k, s, _ in (line.split("\t") for line in (DATA / "mimi-keys.tsv").read_text().splitlines())}
    state = {}
    for key, shape in spec.items():
        if key.endswith("_codebook.embedding_sum"):
            continue  # written with its cluster_usage below
        if key.endswith("_codebook.cluster_usage"):
            usage = rng.uniform(0.5, 2.0, shape).astype(np.float32)
            embedding = rng.normal(0.0, 0.01, spec[key.replace("cluster_usage", "embedding_sum")]).astype(np.float32)
            state[key] = usage
            state[key.replace("cluster_usage", "embedding_sum")] = embedding * usage[:, None]
        elif key.endswith("_initialized") or key.endswith(".scale") or ("norm" in key and key.endswith(".weight")):
            state[key] = np.ones(shape, np.float32)
        elif "norm" in key and key.endswith(".bias"):
            state[key] = np.zeros(shape, np.float32)
        else:
            weight_shape = spec[key[: -len("bias")] + "weight"] if key.endswith(".bias") else shape
            bound = 1.0 / math.sqrt(math.prod(weight_shape[1:]))
            if key.startswith("decoder.") and ".conv" in key:
                bound *= math.sqrt(3)
            if key.startswith("quantizer.") and "output_proj" in key:
                bound *= 30
            state[key] = rng.uniform(-bound, bound, shape).astype(np.float32)
    save_file(state, str(path))
    return path


def write_voice(path: Path, seconds: float = 0.5, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(24_000 * seconds)) / 24_000
    audio = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio.astype(np.float32), 24_000, subtype="PCM_16")
    return path


def alsa_env(tmp_path: Path, capture: bool) -> dict:
    """The environment for a process whose audio output goes to ALSA's null device, or (capture)
    through its file plugin into tmp_path/played.raw (float32), where this machine has no sound card."""
    if capture:
        conf = (DATA / "alsa-capture.conf").read_text().replace("PLAYED_RAW_PATH", str(tmp_path / "played.raw"))
    else:
        conf = (DATA / "alsa-null.conf").read_text()
    (tmp_path / "alsa.conf").write_text(conf)
    return {**os.environ, "ALSA_CONFIG_PATH": f"/usr/share/alsa/alsa.conf:{tmp_path / 'alsa.conf'}"}


class PacedOutput:
    """A sound card where none exists (a Player's output): pulls one block per block duration, in
    real time, and keeps what it played and when it pulled each block."""

    def __init__(self, samplerate, blocksize, callback, finished_callback, **_):
        self.block, self.period = blocksize, blocksize / samplerate
        self.callback, self.finished_callback = callback, finished_callback
        self.aborted = False
        self.played, self.pulled = [], []
        self.thread = threading.Thread(target=self.run)

    def run(self):
        deadline = time.perf_counter()
        while not self.aborted:
            out = np.zeros((self.block, 1), np.float32)
            try:
                self.callback(out, self.block, None, None)
            except StopIteration:
                break
            finally:
                self.played.append(out[:, 0].copy())
                self.pulled.append(time.perf_counter())
            deadline += self.period
            time.sleep(max(0.0, deadline - time.perf_counter()))
        self.finished_callback()

    def start(self):
        self.thread.start()

    def abort(self):
        self.aborted = True

    def close(self):
        self.thread.join()


def interruptible() -> None:
    """preexec_fn for a CLI under test: Ctrl-C reaches it even when the tests run as a background
    job (which starts with SIGINT ignored, and Python then keeps ignoring it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def add_to_hub_cache(cache: Path, repo_id: str, files: dict) -> Path:
    """Lay out files as huggingface_hub caches a downloaded repo (refs/main -> snapshot)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
