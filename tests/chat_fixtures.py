"""Small real artefacts for voice chat: speech from espeak-ng, and random speech-recognizer and
language-model weights in mlx-whisper's and mlx-lm's own formats, loaded by their own code."""

import json
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from csm_mlx.audio import read_audio

from speech_fixtures import make_tokenizer

CHAT_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start|>", "<|end|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")


def _random_weights(module, seed: int, dtype, std: float = 0.2) -> dict:
    rng = np.random.default_rng(seed)
    weights = {}
    for name, value in tree_flatten(module.parameters()):
        if name.endswith(("norm.weight", "ln.weight", "running_var")):
            array = np.ones(value.shape, np.float32)
        elif name.endswith("running_mean"):
            array = np.zeros(value.shape, np.float32)
        else:
            array = rng.normal(0.0, std, value.shape).astype(np.float32)
        weights[name] = mx.array(array).astype(dtype)
    return weights


def make_whisper(path: Path, seed: int = 0) -> Path:
    """A one-layer English-only Whisper (n_vocab 51864: no language detection) with random float16
    weights, as mlx-community's conversions lay it out: config.json + weights.safetensors."""
    from mlx_whisper.whisper import ModelDimensions, Whisper

    dims = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1, n_vocab=51864,
                n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=1)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**dims, "model_type": "whisper"}))
    model = Whisper(ModelDimensions(**dims), mx.float16)
    mx.save_safetensors(str(path / "weights.safetensors"), _random_weights(model, seed, mx.float16))
    return path


PARAKEET_VOCABULARY = ["▁hello", "▁there", "▁what", "▁is", "▁the", "▁weather", "▁like", "▁to", "day", "s", "▁a", "."]


def make_parakeet(path: Path, seed: int = 0) -> Path:
    """A one-layer Parakeet TDT with random float32 weights, as mlx-community's conversions lay it out:
    NeMo's configuration as config.json (its sizes cut down) + model.safetensors."""
    from parakeet_mlx.utils import from_config

    durations = [0, 1, 2, 3, 4]
    vocabulary = len(PARAKEET_VOCABULARY)
    config = {
        "target": "nemo.collections.asr.models.rnnt_bpe_models.EncDecRNNTBPEModel",
        "model_defaults": {"tdt_durations": durations},
        "preprocessor": {"sample_rate": 16000, "normalize": "per_feature", "window_size": 0.025,
                         "window_stride": 0.01, "window": "hann", "features": 80, "n_fft": 512, "dither": 1e-05,
                         "pad_to": 0, "pad_value": 0.0},
        "encoder": {"feat_in": 80, "n_layers": 1, "d_model": 64, "n_heads": 2, "ff_expansion_factor": 2,
                    "subsampling_factor": 8, "self_attention_model": "rel_pos", "subsampling": "dw_striding",
                    "conv_kernel_size": 9, "subsampling_conv_channels": 32, "pos_emb_max_len": 5000},
        "decoder": {"blank_as_pad": True, "vocab_size": vocabulary, "prednet": {"pred_hidden": 64, "pred_rnn_layers": 1}},
        "joint": {"num_classes": vocabulary, "vocabulary": PARAKEET_VOCABULARY, "num_extra_outputs": len(durations),
                  "jointnet": {"joint_hidden": 64, "activation": "relu", "encoder_hidden": 64, "pred_hidden": 64}},
        "decoding": {"model_type": "tdt", "durations": durations, "greedy": {"max_symbols": 10}},
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"), _random_weights(from_config(config), seed, mx.float32, 0.5))
    return path


def make_language_model(path: Path, seed: int = 0) -> Path:
    """A two-layer Llama with random weights and a small BPE tokenizer with a chat template, as
    mlx-lm reads a model directory: config.json, model.safetensors, tokenizer files."""
    from mlx_lm.models.llama import Model, ModelArgs

    make_tokenizer(path / "tokenizer.json", vocab_size=400, special_tokens=CHAT_SPECIAL)
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    config = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=len(vocab) + 4,
                  tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=10000.0)
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|end|>",
        "chat_template": CHAT_TEMPLATE}))
    model = Model(ModelArgs.from_dict(config))
    mx.save_safetensors(str(path / "model.safetensors"), _random_weights(model, seed, mx.float32, std=0.5))
    return path


def espeak(path: Path, text: str, speed: int = 175) -> np.ndarray:
    """text spoken by espeak-ng (22.05 kHz), as 24 kHz float32 (the file is kept at path)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: `apt-get install espeak-ng` (.ci/run installs it)")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", str(speed), "-w", str(path), text], check=True)
    return read_audio(path)


def speech_bounds(audio: np.ndarray, sample_rate: int = 24_000, threshold: float = 0.02) -> tuple:
    """First and last sample of the clip's sound (10 ms windows above threshold RMS)."""
    window = sample_rate // 100
    rms = np.sqrt(np.mean(audio[: len(audio) // window * window].reshape(-1, window) ** 2, axis=1))
    loud = np.flatnonzero(rms > threshold)
    return loud[0] * window, (loud[-1] + 1) * window
