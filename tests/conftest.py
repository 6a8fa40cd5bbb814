import atexit
import os
import shutil
import tempfile
from pathlib import Path

# huggingface_hub reads these at import: every test runs against a local hub cache, offline.
HUB_CACHE = Path(tempfile.mkdtemp(prefix="csm-mlx-hub-"))
atexit.register(shutil.rmtree, HUB_CACHE, True)
os.environ["HF_HUB_CACHE"] = str(HUB_CACHE)
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from transformers.utils import logging as hf_logging

from csm_fixtures import (
    TINY_ARGS,
    TINY_BACKBONE,
    TINY_DECODER,
    random_original_state,
    transformers_reference,
    write_original,
)
from csm_mlx.watermark import HUB_FOLDER, HUB_REPO
from speech_fixtures import add_to_hub_cache, make_mimi, make_tokenizer, write_voice
from watermark_fixtures import write_silentcipher

torch.set_num_threads(2)
hf_logging.set_verbosity_error()


@pytest.fixture(scope="session")
def original_state():
    return random_original_state(TINY_ARGS)


@pytest.fixture(scope="session")
def reference(original_state):
    """transformers' CsmForConditionalGeneration holding the same weights (float32, CPU)."""
    return transformers_reference(original_state, TINY_ARGS)


@pytest.fixture(scope="session")
def original_dir(tmp_path_factory, original_state):
    return write_original(tmp_path_factory.mktemp("original"), original_state, TINY_ARGS, TINY_BACKBONE, TINY_DECODER)


@pytest.fixture(scope="session")
def transformers_dir(tmp_path_factory, reference):
    path = tmp_path_factory.mktemp("transformers")
    reference.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_tokens():
    return np.random.default_rng(1).integers(0, TINY_ARGS.text_vocab_size, 12).tolist()


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


@pytest.fixture(scope="session")
def mimi_path(tmp_path_factory):
    return make_mimi(tmp_path_factory.mktemp("mimi") / "tokenizer-e351c8d8-checkpoint125.safetensors")


@pytest.fixture(scope="session")
def silentcipher_dir(tmp_path_factory):
    """Random SilentCipher weights (44.1 kHz model) in the hub's layout."""
    return write_silentcipher(tmp_path_factory.mktemp("silentcipher"))


@pytest.fixture(scope="session")
def hub_cache(transformers_dir, tokenizer_path, mimi_path, silentcipher_dir, tmp_path_factory):
    """The default repos in the local hub cache: sesame/csm-1b as the hub serves it
    (transformers format, tokenizer.json, voice prompts), Mimi from kyutai and the watermark's
    weights from Sony/SilentCipher."""
    voices = tmp_path_factory.mktemp("voices")
    add_to_hub_cache(HUB_CACHE, "sesame/csm-1b", {
        "config.json": transformers_dir / "config.json",
        "model.safetensors": transformers_dir / "model.safetensors",
        "tokenizer.json": tokenizer_path,
        "prompts/conversational_a.wav": write_voice(voices / "a.wav", seed=1),
        "prompts/conversational_b.wav": write_voice(voices / "b.wav", seed=2),
        **{f"prompts/read_speech_{x}.wav": write_voice(voices / f"read_{x}.wav", seed=3 + n) for n, x in enumerate("abcd")},
    })
    add_to_hub_cache(HUB_CACHE, "kyutai/moshiko-pytorch-bf16", {mimi_path.name: mimi_path})
    add_to_hub_cache(HUB_CACHE, HUB_REPO, {f"{HUB_FOLDER}/{p.name}": p for p in silentcipher_dir.iterdir()})
    return HUB_CACHE
