import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
