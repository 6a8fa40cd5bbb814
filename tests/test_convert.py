"""Converter: quantized round trips and clear errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from csm_fixtures import TINY_ARGS, TINY_BACKBONE, TINY_DECODER, generate_codes, write_original
from csm_mlx import CheckpointError, load_model
from csm_mlx.convert import convert
from csm_mlx.hub import HubError
from csm_mlx.prompt import prompt_rows

CONVERT = str(Path(sys.executable).parent / "csm-mlx-convert")


def c0_logits(model, text_tokens, frames):
    tokens, mask = prompt_rows([], text_tokens)
    logits = model.teacher_forced_logits(mx.array(tokens)[None], mx.array(mask)[None], mx.array(frames)[None])
    return np.array(logits[0, :, 0].astype(mx.float32))


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(4).integers(0, 2048, (12, 32))


def relative_rms(got, ref):
    return np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2))


@pytest.fixture(scope="module")
def float_c0(original_dir, text_tokens, frames):
    return c0_logits(load_model(original_dir)[0], text_tokens, frames)


@pytest.fixture(scope="module")
def quantized_error(tmp_path_factory, original_dir, text_tokens, frames, float_c0):
    """Convert -> load round trip at each bit width; returns bits -> relative RMS error of c0 logits."""
    errors = {}
    for bits in (8, 4):
        out = convert(str(original_dir), tmp_path_factory.mktemp("q") / f"q{bits}", dtype="float32",
                      quantize_weights=True, q_bits=bits)
        assert json.loads((out / "config.json").read_text())["quantization"] == {"group_size": 64, "bits": bits}
        model, info = load_model(out)
        assert info["quantization"] == {"group_size": 64, "bits": bits}
        assert model.backbone.layers[0].self_attn.q_proj.bits == bits
        assert model.audio_embeddings.bits == bits
        codes = generate_codes(model, text_tokens, max_frames=6, temperature=0.9, top_k=50, seed=0)
        assert codes.shape == (32, 6) and codes.dtype.kind in "iu"
        assert codes.min() >= 0 and codes.max() < 2048
        errors[bits] = relative_rms(c0_logits(model, text_tokens, frames), float_c0)
    return errors


def test_8bit_is_as_close_to_float_as_bfloat16(original_dir, text_tokens, frames, float_c0, quantized_error):
    """Measured on the tiny std-0.2 model: bf16 3.2%, 8-bit 4.8% relative RMS on codebook-0 logits
    (max abs 0.68 for logits up to 9.4). 8-bit must stay within 2x of bf16 inference."""
    bf16 = relative_rms(c0_logits(load_model(original_dir, dtype="bfloat16")[0], text_tokens, frames), float_c0)
    assert quantized_error[8] <= min(2 * bf16, 0.1)


def test_4bit_round_trip_is_coarser_than_8bit(quantized_error):
    # A random std-0.2 network is far less robust to 4 bits than trained weights (66% here):
    # the 4-bit checks are the round trip above and that the weights really are 4-bit.
    assert quantized_error[4] > 4 * quantized_error[8]


def test_convert_cli_writes_a_loadable_model(tmp_path, transformers_dir):
    out = tmp_path / "bf16"
    result = subprocess.run(
        [CONVERT, "--hf-path", str(transformers_dir), "--mlx-path", str(out)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    model, info = load_model(out)
    assert info == {"format": "mlx", "dtype": "bfloat16", "quantization": None}
    assert model.codebook0_head.weight.dtype == mx.bfloat16


def run_convert_cli(*args):
    return subprocess.run(
        [CONVERT, *map(str, args)], capture_output=True, text=True
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_directory(tmp_path):
    result = run_convert_cli("--hf-path", tmp_path / "nope", "--mlx-path", tmp_path / "out")
    assert_one_line_error(result, "does not exist")
    assert not (tmp_path / "out").exists()


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        convert(str(tmp_path / "empty"), tmp_path / "out")


def test_unknown_format(tmp_path, original_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    result = run_convert_cli("--hf-path", bad, "--mlx-path", tmp_path / "out")
    assert_one_line_error(result, "is not a CSM checkpoint")
    assert not (tmp_path / "out").exists()


def test_unknown_flavor(tmp_path, original_state):
    path = write_original(tmp_path / "m", original_state, TINY_ARGS, "llama-7B", TINY_DECODER)
    with pytest.raises(CheckpointError, match="unknown flavor 'llama-7B'"):
        load_model(path)


def test_wrong_shapes(tmp_path, original_state):
    state = dict(original_state)
    state["projection.weight"] = state["projection.weight"][:, :64].copy()
    path = write_original(tmp_path / "m", state, TINY_ARGS, TINY_BACKBONE, TINY_DECODER)
    with pytest.raises(CheckpointError, match=r"wrong shape \(first: projection.weight \(64, 64\) \(expected \(64, 128\)\)"):
        load_model(path)


def test_missing_tensor(tmp_path, original_state):
    state = {k: v for k, v in original_state.items() if k != "audio_head"}
    path = write_original(tmp_path / "m", state, TINY_ARGS, TINY_BACKBONE, TINY_DECODER)
    with pytest.raises(CheckpointError, match="31 missing .first: audio_head.0.weight"):
        load_model(path)


def test_truncated_safetensors(tmp_path, transformers_dir):
    bad = tmp_path / "truncated"
    bad.mkdir()
    (bad / "config.json").write_bytes((transformers_dir / "config.json").read_bytes())
    data = (transformers_dir / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = run_convert_cli("--hf-path", bad, "--mlx-path", tmp_path / "out")
    assert_one_line_error(result, "truncated or corrupt")
    assert not (tmp_path / "out").exists()


def test_no_weights(tmp_path, original_dir):
    bad = tmp_path / "noweights"
    bad.mkdir()
    (bad / "config.json").write_bytes((original_dir / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="no model\\*.safetensors"):
        load_model(bad)


def test_existing_output_is_never_overwritten(tmp_path, original_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="already exists"):
        convert(str(original_dir), out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_unsupported_quantization(tmp_path, original_dir):
    with pytest.raises(CheckpointError, match="use 4 or 8"):
        convert(str(original_dir), tmp_path / "q3", quantize_weights=True, q_bits=3)
    assert not (tmp_path / "q3").exists()


def test_missing_hub_repo_offline(tmp_path):
    with pytest.raises(HubError, match="not in the local hub cache"):
        convert("someone/not-a-model", tmp_path / "out")
